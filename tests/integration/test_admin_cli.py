"""Admin operations through the `pacsnode` command line, as an operator types them.

Jobs are written straight into an embedded-mode database; the commands run as subprocesses
and the audit trail is read back from the Event table.
"""

from __future__ import annotations

import base64
import getpass
import json
import logging
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import select

from node.config import Config, load_config
from node.db.models import Event, Job, JobState, utcnow
from node.db.session import session_scope
from tests.peers import REPO
from tests.unit.jobs_data import make_job

pytestmark = pytest.mark.integration


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"path": str(tmp_path / "spool")},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
    }))
    return path


def pacsnode(config_file: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "--config", str(config_file), *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO, env=env)


@pytest.fixture
def config(config_file: Path) -> Config:
    assert pacsnode(config_file, "db", "upgrade").returncode == 0
    return load_config(config_file)


def _failed(config: Config, hours_ago: float, stage: str, error: str) -> int:
    then = utcnow() - timedelta(hours=hours_ago)
    return make_job(config, JobState.FAILED, age_s=hours_ago * 3600, failed_at=then, error_stage=stage, error=error)


def _queued_tasks(config: Config) -> list[tuple[str, int]]:
    folder = config.storage.path / "queue" / "messages"
    msgs = [json.loads(p.read_text()) for p in sorted(folder.glob("*"))]
    return sorted((m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0][0]) for m in msgs)


def test_jobs_state_failed_shows_stage_and_error_on_one_readable_line(config_file: Path, config: Config) -> None:
    failed = _failed(config, 1, "decode", "cannot decode pixel data:\n  JPEG 2000 stream truncated")
    done = make_job(config, JobState.DONE)
    out = pacsnode(config_file, "jobs", "--state", "failed")
    assert out.returncode == 0, out.stderr
    header, *rows = out.stdout.splitlines()
    assert header.split() == ["ID", "STUDY_INSTANCE_UID", "PIPELINE", "STATE", "ATTEMPT", "WORKER", "UPDATED",
                              "TOTAL_S", "ERROR_STAGE", "ERROR"]
    assert len(rows) == 1 and rows[0].split()[0] == str(failed)
    assert "decode" in rows[0] and "cannot decode pixel data: JPEG 2000 stream truncated" in rows[0]
    as_json = json.loads(pacsnode(config_file, "jobs", "--state", "failed", "--json").stdout)
    assert [(j["id"], j["error_stage"]) for j in as_json] == [(failed, "decode")]
    assert done not in {j["id"] for j in as_json}


def test_replay_failed_since_replays_only_recent_failures_and_audits_them(config_file: Path, config: Config) -> None:
    old = _failed(config, 48, "send", "PACS refused")
    recent = [_failed(config, 2, "send", "PACS down"), _failed(config, 1, "internal", "bug")]
    out = pacsnode(config_file, "replay", "--failed", "--since", "12h", "--reason", "PACS is back", "--json")
    assert out.returncode == 0, out.stderr
    replays = json.loads(out.stdout)
    assert [r["replayed"] for r in replays] == recent
    new_ids = [r["job"] for r in replays]
    with session_scope(config.database.url) as s:
        for old_id, new_id in zip(recent, new_ids, strict=True):
            job = s.get(Job, new_id)
            assert job is not None and job.state == JobState.QUEUED and job.replay_of == old_id
            ev = s.scalar(select(Event).where(Event.kind == "replay", Event.job_id == new_id))
            assert ev is not None  # who, when, why
            assert ev.actor is not None and ev.actor.startswith(getpass.getuser() + "@")
            assert ev.at is not None and (utcnow() - ev.at).total_seconds() < 60
            assert ev.detail == f"replay of job {old_id}: PACS is back"
        assert s.scalar(select(Job).where(Job.replay_of == old)) is None
    assert _queued_tasks(config) == [("pacsnode.run_job", i) for i in new_ids]
    # An ISO time works too; nothing failed since a minute from now.
    future = (utcnow() + timedelta(minutes=1)).isoformat()
    again = pacsnode(config_file, "replay", "--failed", "--since", future, "--json")
    assert again.returncode == 0 and json.loads(again.stdout) == []
    assert "no failed jobs to replay" in again.stderr


def test_replay_refuses_unknown_and_active_jobs_with_a_message(config_file: Path, config: Config) -> None:
    queued = make_job(config, JobState.QUEUED)
    out = pacsnode(config_file, "replay", "9999")
    assert out.returncode == 1 and "no job 9999" in out.stderr
    out = pacsnode(config_file, "replay", str(queued))
    assert out.returncode == 1 and "cancel it before replaying" in out.stderr
    out = pacsnode(config_file, "replay", "--failed", "--since", "yesterday")
    assert out.returncode == 2 and "neither an ISO time nor an age" in out.stderr


def test_cancel_is_audited_and_refused_for_finished_jobs(config_file: Path, config: Config) -> None:
    queued = make_job(config, JobState.QUEUED)
    out = pacsnode(config_file, "cancel", str(queued), "--reason", "wrong patient")
    assert out.returncode == 0 and f"job {queued} cancelled" in out.stdout
    with session_scope(config.database.url) as s:
        assert s.get(Job, queued).state == JobState.CANCELLED  # type: ignore[union-attr]
        ev = s.scalar(select(Event).where(Event.kind == "cancel", Event.job_id == queued))
        assert ev is not None and ev.detail == "wrong patient" and (ev.actor or "").startswith(getpass.getuser())
    out = pacsnode(config_file, "cancel", str(queued))
    assert out.returncode == 1 and "cancelled -> cancelled is not allowed" in out.stderr


def _pin(config_file: Path, bundle: Path, version: str | None) -> None:
    cfg = yaml.safe_load(config_file.read_text())
    cfg["pipelines"] = {"chest_xray": {"bundle": str(bundle), "device": "cpu", "version": version}}
    config_file.write_text(yaml.safe_dump(cfg))


def test_run_refuses_a_bundle_other_than_the_pinned_version(config_file: Path, demo_bundle: Path, tmp_path: Path) -> None:
    _pin(config_file, demo_bundle, "2.0.0")
    out = pacsnode(config_file, "run")
    assert out.returncode == 2
    assert f"pipelines.chest_xray: model bundle {demo_bundle} is version 0.1.0; the configuration asks for 2.0.0" in out.stderr
    assert "listening" not in out.stdout
    listed = pacsnode(config_file, "models", "list")
    assert listed.returncode == 1 and "config.yaml pins version 2.0.0" in listed.stdout
    # production starts `pacsnode worker -Q inference` itself: it refuses just the same
    out = pacsnode(config_file, "worker", "-Q", "inference")
    assert out.returncode == 2 and "is version 0.1.0; the configuration asks for 2.0.0" in out.stderr

    # a pinned version is never replaced by demo weights
    _pin(config_file, tmp_path / "missing", "2.0.0")
    out = pacsnode(config_file, "run")
    assert out.returncode == 2 and "(version 2.0.0) is missing; install it with `python -m training export`" in out.stderr
    assert not (tmp_path / "missing").exists()
    _pin(config_file, tmp_path / "missing", None)  # a worker never trains demo weights either
    out = pacsnode(config_file, "worker", "-Q", "inference")
    assert out.returncode == 2 and "missing; install it with `python -m training export`" in out.stderr
    assert not (tmp_path / "missing").exists()

    _pin(config_file, demo_bundle, "0.1.0")
    listed = pacsnode(config_file, "models", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["version"] == "0.1.0"


def test_the_node_refuses_to_start_without_the_validators_its_gate_needs(config_file: Path, tmp_path: Path) -> None:
    """Fail closed: no dciodvfy (or dcmpschk while GSPS are built) means no start, not an unchecked object."""
    bare = tmp_path / "bin"
    bare.mkdir()
    env = {**os.environ, "PATH": str(bare)}  # neither dicom3tools nor DCMTK on it
    for command in (("run",), ("worker", "-Q", "inference")):
        out = pacsnode(config_file, *command, env=env)
        assert out.returncode == 2, out.stderr
        assert ("validation.tools: validators not installed: dciodvfy (Debian package dicom3tools), "
                "dcmpschk (Debian package dcmtk). Install them, or remove them from validation.tools") in out.stderr
        assert "listening" not in out.stdout
    cfg = yaml.safe_load(config_file.read_text())
    cfg["export"] = {"objects": ["sr", "seg"]}  # no presentation state is ever built: dcmpschk is not needed
    config_file.write_text(yaml.safe_dump(cfg))
    out = pacsnode(config_file, "worker", "-Q", "inference", env=env)
    assert out.returncode == 2 and "validators not installed: dciodvfy (Debian package dicom3tools). Install" in out.stderr


def test_a_weaker_gate_is_said_at_start(config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    from node.cli import check_gate

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing installed, and nothing required
    cfg = yaml.safe_load(config_file.read_text())
    cfg["validation"] = {"tools": []}
    config_file.write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.WARNING, logger="pacsnode"):
        check_gate(load_config(config_file))
    assert "validation gate without dciodvfy, dcmpschk (validation.tools): result objects are checked by pydicom" \
        in caplog.text
