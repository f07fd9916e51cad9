"""Job state machine, replay, cancel and reconciliation as plain function calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from node.cli import db_upgrade
from node.config import Config, parse_config
from node.db.models import Event, Job, JobState
from node.db.session import session_scope
from node.jobs import TransitionError, cancel, heartbeat, reconcile, replay, transition
from node.spool import write_atomic
from tests.unit.jobs_data import make_job


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = parse_config({
        "storage": {"path": str(tmp_path / "spool")},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "queue": {"task_time_limit": 60},
    })
    db_upgrade(cfg)
    return cfg


def _queued_messages(config: Config) -> list[dict]:
    folder = config.storage.path / "queue" / "messages"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*"))] if folder.exists() else []


def test_transition_stamps_each_state_and_refuses_illegal_moves(config: Config) -> None:
    job_id = make_job(config, JobState.QUEUED)
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        for st in (JobState.RUNNING, JobState.ENCODED, JobState.SENDING, JobState.DONE):
            transition(job, st)
            assert getattr(job, f"{st.value}_at") is not None
        with pytest.raises(TransitionError, match="done -> running is not allowed"):
            transition(job, JobState.RUNNING)


def test_replay_creates_an_audited_job_and_refuses_active_ones(config: Config) -> None:
    failed = make_job(config, JobState.FAILED)
    new_id = replay(config, failed, actor="admin", reason="PACS was down")
    with session_scope(config.database.url) as s:
        new = s.get(Job, new_id)
        assert new is not None and new.state == JobState.QUEUED and new.replay_of == failed
        ev = s.scalar(select(Event).where(Event.kind == "replay"))
        assert ev is not None and ev.actor == "admin" and "PACS was down" in (ev.detail or "")
    with pytest.raises(TransitionError, match="cancel it before replaying"):
        replay(config, new_id, actor="admin", reason="again")
    with pytest.raises(LookupError, match="no job 999"):
        replay(config, 999, actor="admin", reason="x")


def test_cancel(config: Config) -> None:
    job_id = make_job(config, JobState.QUEUED)
    cancel(config, job_id, actor="admin", reason="wrong patient")
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.CANCELLED and "wrong patient" in (job.error or "")


def test_reconcile_requeues_only_stuck_jobs(config: Config) -> None:
    fresh = make_job(config, JobState.RUNNING, age_s=5)
    stuck_running = make_job(config, JobState.RUNNING, age_s=3600)
    stuck_sending = make_job(config, JobState.SENDING, age_s=3600)
    done = make_job(config, JobState.DONE, age_s=3600)
    assert sorted(reconcile(config)) == sorted([stuck_running, stuck_sending])
    with session_scope(config.database.url) as s:
        assert s.get(Job, stuck_running).state == JobState.QUEUED  # type: ignore[union-attr]
        assert s.get(Job, fresh).state == JobState.RUNNING  # type: ignore[union-attr]
        assert s.get(Job, done).state == JobState.DONE  # type: ignore[union-attr]
    # The work went back on the embedded broker: inference for one, export for the other.
    import base64

    tasks = sorted((m["headers"]["task"], json.loads(base64.b64decode(m["body"]))[0][0]) for m in _queued_messages(config))
    assert tasks == sorted([("pacsnode.run_job", stuck_running), ("pacsnode.export_job", stuck_sending)])


def _running(config: Config, worker: str, age_s: float) -> int:
    job_id = make_job(config, JobState.RUNNING, age_s=age_s)
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.worker = worker
    return job_id


def test_heartbeat_keeps_a_long_running_job_from_being_taken_over(config: Config) -> None:
    lost_after = config.queue.lost_after_seconds
    job_id = _running(config, "inference@a", age_s=lost_after + 5)
    assert heartbeat(config, job_id, "inference@a")
    assert not heartbeat(config, job_id, "inference@b")  # only the holder beats
    assert reconcile(config) == []
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.RUNNING and job.worker == "inference@a"


def test_reconcile_takes_over_a_running_job_whose_heartbeat_stopped(config: Config) -> None:
    job_id = _running(config, "inference@a", age_s=config.queue.lost_after_seconds + 1)
    assert reconcile(config) == [job_id]
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.QUEUED and job.worker is None
        ev = s.scalar(select(Event).where(Event.kind == "requeue", Event.job_id == job_id))
        assert ev is not None and ev.actor == "reconciler" and "inference@a" in (ev.detail or "")


def test_reconcile_resends_a_queued_job_once_per_period(config: Config) -> None:
    """A queued job whose message was lost (Redis restarted empty) goes on the queue again."""
    waited = config.queue.requeue_queued_seconds
    lost = make_job(config, JobState.QUEUED, age_s=waited + 1)
    recent = make_job(config, JobState.QUEUED, age_s=waited / 2)
    assert reconcile(config) == [lost]
    assert reconcile(config) == []  # the re-send counts as a change: not sent again at once
    with session_scope(config.database.url) as s:
        assert s.get(Job, recent).state == JobState.QUEUED  # type: ignore[union-attr]


def test_a_duplicate_delivery_leaves_a_live_running_job_alone(config: Config) -> None:
    from node.engine.inference import run_inference

    job_id = _running(config, "inference@a", age_s=1)
    run_inference(config, job_id, "inference@b")
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.RUNNING and job.worker == "inference@a"


def test_two_workers_that_read_one_queued_job_together_run_it_once(config: Config,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker's own message and another's batch (`_claim_more`) can read a job queued at the
    same moment. SQLite drops FOR UPDATE: both used to write "running" and both ran it; the
    slower one then failed the job ("sending -> encoded is not allowed", 16 cores, 2 workers)."""
    import threading

    from sqlalchemy.orm import Session

    from node.engine.inference import JobInput, _start

    job_id = make_job(config, JobState.QUEUED)
    both_read = threading.Barrier(2)
    get = Session.get

    def get_then_wait(self: Session, entity: object, *args: object, **kwargs: object) -> object:
        found = get(self, entity, *args, **kwargs)  # type: ignore[call-overload]
        if entity is Job:
            both_read.wait(timeout=10)  # neither writes before both have read it queued
        return found

    monkeypatch.setattr(Session, "get", get_then_wait)
    claimed: dict[str, JobInput | None] = {}

    def work(worker: str) -> None:
        claimed[worker] = _start(config, job_id, worker)

    threads = [threading.Thread(target=work, args=(f"inference{i}@host",)) for i in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(claimed) == 2
    winners = [w for w, ji in claimed.items() if ji is not None]
    assert len(winners) == 1, claimed
    monkeypatch.undo()
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.RUNNING and job.worker == winners[0] and job.attempt == 1


def test_reconcile_waits_for_a_moving_queue_before_resending_queued_jobs(config: Config) -> None:
    """Messages still waiting mean the queue moves: a deep backlog is not flooded with duplicates."""
    from node.queue import enqueue_job

    lost = make_job(config, JobState.QUEUED, age_s=config.queue.requeue_queued_seconds + 1)
    behind = make_job(config, JobState.QUEUED)
    enqueue_job(config, behind)
    assert reconcile(config) == []
    for message in (config.storage.path / "queue" / "messages").glob("*"):
        message.unlink()  # the backlog drained
    assert reconcile(config) == [lost]


def test_send_states_move_by_their_table_and_a_resend_resets_them(config: Config) -> None:
    from node.db.models import Output, Send, SendState
    from node.jobs import may_become, move_send, resend

    job_id = make_job(config, JobState.DONE)
    with session_scope(config.database.url) as s:
        out = Output(job_id=job_id, kind="sr", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34", sop_instance_uid="1.2.9",
                     series_instance_uid="1.2.8", path="outputs/x.dcm")
        write_atomic(config.storage.path, "outputs/x.dcm", b"DICM")  # a re-send sends the file
        s.add(out)
        s.flush()
        sd = Send(output_id=out.id, destination="pacs", state=SendState.PENDING, attempts=0)
        s.add(sd)
        s.flush()
        for st in (SendState.SENDING, SendState.STORED, SendState.SENDING, SendState.SENT):
            move_send(sd, st)
        with pytest.raises(TransitionError, match="send .* to pacs: sent -> sending is not allowed"):
            move_send(sd, SendState.SENDING)
        sd.attempts = 3
    # A claim may take pending, failed, stored, overdue committing and stale sending rows, never a sent one.
    assert set(may_become(SendState.SENDING)) == {SendState.PENDING, SendState.FAILED, SendState.STORED,
                                                  SendState.COMMITTING, SendState.SENDING}
    resend(config, job_id, actor="admin", reason="PACS lost it")
    with session_scope(config.database.url) as s:
        sent = s.scalars(select(Send)).one()
        assert (sent.state, sent.attempts) == (SendState.PENDING, 0)
