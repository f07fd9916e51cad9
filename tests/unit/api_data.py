"""A node config with a migrated database, one user per role with a token, and a TestClient."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient

from node.api.app import create_app
from node.cli import db_upgrade
from node.config import Config, parse_config
from node.services import users

PASSWORD = "correct horse battery"


@dataclass
class Api:
    config: Config
    client: TestClient
    tokens: dict[str, str]

    def as_(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def make_api(tmp_path: Path, **overrides: object) -> Api:
    cfg = parse_config({
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "api": {"state_dir": str(tmp_path / "var"), "identifier_key": "k" * 32, **overrides},
    })
    db_upgrade(cfg)
    tokens = {}
    for role in ("viewer", "operator", "admin"):
        users.add_user(cfg, role, role, PASSWORD)
        tokens[role] = users.create_token(cfg, role)[1]
    return Api(cfg, TestClient(create_app(cfg)), tokens)
