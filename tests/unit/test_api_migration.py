"""Migration 0008 (dashboard indexes, an SR output's findings) and its downgrade."""

from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import inspect

from node.cli import MIGRATIONS
from node.db.session import engine_for


def test_0008_adds_the_dashboards_indexes_and_findings_and_its_downgrade_removes_them(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm8.db'}"
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url)
    command.upgrade(cfg, "0008")
    insp = inspect(engine_for(url))

    def indexes(table: str) -> dict[str, list[str]]:
        return {ix["name"]: ix["column_names"] for ix in inspect(engine_for(url)).get_indexes(table)}

    assert "findings" in {c["name"] for c in insp.get_columns("output")}
    assert indexes("job")["ix_job_state_id"] == ["state", "id"] and "ix_job_state" not in indexes("job")
    assert {"ix_job_done_at", "ix_job_replay_of"} <= set(indexes("job"))
    assert indexes("job")["ix_job_updated_at_state"] == ["updated_at", "state"]
    assert indexes("study")["ix_study_state_id"] == ["state", "id"]
    assert indexes("study")["ix_study_completed_at_state"] == ["completed_at", "state"]
    assert "ix_study_first_received_at" in indexes("study")
    assert indexes("send")["ix_send_state_updated_at"] == ["state", "updated_at"]
    assert indexes("event")["ix_event_kind_at"] == ["kind", "at"]
    command.downgrade(cfg, "0007")
    assert "findings" not in {c["name"] for c in inspect(engine_for(url)).get_columns("output")}
    assert indexes("job").get("ix_job_state") == ["state"] and not {"ix_job_state_id", "ix_job_replay_of"} & set(indexes("job"))
    assert not {"ix_study_state_id", "ix_study_completed_at_state"} & set(indexes("study"))
