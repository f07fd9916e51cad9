"""A node config with a migrated database, one user per role with a token, and a TestClient."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import text

from node.api.app import create_app
from node.cli import db_upgrade
from node.config import Config, parse_config
from node.db.session import engine_for
from node.services import users

PASSWORD = "correct horse battery"
ROLES = ("viewer", "operator", "admin")


@dataclass
class Api:
    config: Config
    client: TestClient
    tokens: dict[str, str]

    def as_(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


def _config(folder: Path, destinations: list[dict[str, object]] | None = None, **overrides: object) -> Config:
    return parse_config({
        "storage": {"path": str(folder / "spool"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{folder / 'db.sqlite'}"},
        "api": {"state_dir": str(folder / "var"), "identifier_key": "k" * 32, **overrides},
        "destinations": destinations or [],
    })


@cache
def _template() -> tuple[Path, dict[str, str]]:
    """A migrated database with one user and token per role, made once per test process:
    migrations and argon2 hashes take seconds, and every API test starts from this state."""
    folder = Path(tempfile.mkdtemp(prefix="pacsnode-api-template-"))
    atexit.register(shutil.rmtree, folder, True)
    cfg = _config(folder)
    db_upgrade(cfg)
    tokens = {}
    for role in ROLES:
        users.add_user(cfg, role, role, PASSWORD, actor="test")
        tokens[role] = users.create_token(cfg, role, actor="test")[1]
    engine = engine_for(cfg.database.url)
    with engine.connect() as conn:
        conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    engine.dispose()
    return folder / "db.sqlite", tokens


def make_api(tmp_path: Path, destinations: list[dict[str, object]] | None = None, **overrides: object) -> Api:
    """An app on a copy of the template database; `overrides` go to the config's api section."""
    template, tokens = _template()
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, tmp_path / "db.sqlite")
    cfg = _config(tmp_path, destinations, **overrides)
    return Api(cfg, TestClient(create_app(cfg)), dict(tokens))
