"""Migrations and models agree; downgrade really removes what upgrade made."""

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import inspect

from node.cli import MIGRATIONS
from node.db.session import engine_for


def _alembic(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def test_upgrade_matches_models_and_downgrade_empties(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = _alembic(url)
    command.upgrade(cfg, "head")
    command.check(cfg)  # raises if the models and the migrations disagree
    assert {"study", "series", "instance", "job", "output", "send", "event"} <= set(inspect(engine_for(url)).get_table_names())
    command.downgrade(cfg, "base")
    assert set(inspect(engine_for(url)).get_table_names()) == {"alembic_version"}


def test_0002_adds_routing_columns_and_its_downgrade_removes_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm2.db'}"
    cfg = _alembic(url)
    command.upgrade(cfg, "0002")
    cols = {t: {c["name"] for c in inspect(engine_for(url)).get_columns(t)} for t in ("job", "series")}
    assert {"priority", "destinations"} <= cols["job"]
    assert {"routing_attributes", "routing_rule", "pipelines", "priority", "destinations"} <= cols["series"]
    command.downgrade(cfg, "0001")
    insp = inspect(engine_for(url))
    assert "priority" not in {c["name"] for c in insp.get_columns("job")}
    assert "routing_attributes" not in {c["name"] for c in insp.get_columns("series")}


def test_0009_adds_gate_checks_and_commitment_columns_and_its_downgrade_removes_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm9.db'}"
    cfg = _alembic(url)
    command.upgrade(cfg, "0009")
    insp = inspect(engine_for(url))
    assert "checks" in {c["name"] for c in insp.get_columns("output")}
    assert "commitment_uid" in {c["name"] for c in insp.get_columns("send")}
    assert "ix_send_commitment_uid" in {i["name"] for i in insp.get_indexes("send")}
    command.downgrade(cfg, "0008")
    insp = inspect(engine_for(url))
    assert "checks" not in {c["name"] for c in insp.get_columns("output")}
    assert "commitment_uid" not in {c["name"] for c in insp.get_columns("send")}
