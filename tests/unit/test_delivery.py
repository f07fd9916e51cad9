"""Delivery's pieces that need no peer: reading Storage Commitment reports."""

from __future__ import annotations

import pytest


def test_a_commitment_report_is_read_from_its_event_information() -> None:
    from pydicom import Dataset

    from node.engine.commitment import CommitmentReport, failure_reason, read_report

    info = Dataset()
    info.TransactionUID = "2.25.42"
    ok, bad = Dataset(), Dataset()
    ok.ReferencedSOPClassUID = bad.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ok.ReferencedSOPInstanceUID, bad.ReferencedSOPInstanceUID, bad.FailureReason = "1.2.1", "1.2.2", 0x0112
    info.ReferencedSOPSequence, info.FailedSOPSequence = [ok], [bad]
    assert read_report(info) == CommitmentReport("2.25.42", frozenset({"1.2.1"}), {"1.2.2": 0x0112})
    assert failure_reason(0x0112) == "0x0112 (No Such SOP Instance)"
    assert failure_reason(0xA7FF) == "0xA7FF"
    with pytest.raises(ValueError, match="Event Information has no Transaction UID"):
        read_report(Dataset())


def test_only_a_commitment_destination_from_its_own_address_is_a_commitment_peer() -> None:
    from node.config import parse_config
    from node.engine.commitment import commitment_peer

    cfg = parse_config({"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "confirm": "commitment"},
        {"name": "plain", "ae_title": "PLAIN", "host": "127.0.0.1", "port": 105},
        {"name": "named", "ae_title": "NAMED", "host": "localhost", "port": 106, "confirm": "commitment"},
    ]})
    assert commitment_peer(cfg, "PACS", "127.0.0.1") is cfg.destinations[0]
    assert commitment_peer(cfg, "PACS ", "127.0.0.1") is cfg.destinations[0]  # AE titles are space-padded
    assert commitment_peer(cfg, "PACS", "10.0.0.9") is None  # its title, not its address
    assert commitment_peer(cfg, "PLAIN", "127.0.0.1") is None  # it does not confirm by commitment
    assert commitment_peer(cfg, "NAMED", "127.0.0.1") is cfg.destinations[2]  # a host name is resolved


def test_the_two_export_tasks_of_a_job_close_it_whichever_records_last(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The SR's export task (started while the job still encodes) records its send in the same
    commit that may close the job. Here it read the job before the other task claimed it and
    commits after that task looked for unsent objects: one of the two must still close it (the
    node once left such a job "sending" for ever)."""
    import threading

    from node.cli import db_upgrade
    from node.config import parse_config
    from node.db.models import Job, JobState, Output, Send, SendState, utcnow
    from node.db.session import session_scope
    from node.engine import delivery
    from node.export import SendOutcome
    from node.jobs import transition
    from tests.unit.jobs_data import make_job

    cfg = parse_config({
        "storage": {"path": str(tmp_path / "spool")},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
    })
    db_upgrade(cfg)
    job_id = make_job(cfg, JobState.RUNNING)

    def add_output(kind: str) -> None:
        with session_scope(cfg.database.url) as s:
            out = Output(job_id=job_id, kind=kind, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                         sop_instance_uid=f"2.25.{len(kind)}", series_instance_uid="2.25.9", path=f"outputs/{kind}.dcm")
            s.add(out)
            s.flush()
            s.add(Send(output_id=out.id, destination="pacs", state=SendState.PENDING, attempts=0))

    monkeypatch.setattr(delivery, "send_files", lambda dest, paths, *a: [SendOutcome(p, 0, None, utcnow()) for p in paths])
    sr_recorded, other_done = threading.Event(), threading.Event()
    record = delivery._record

    def paused_record(s, d):  # type: ignore[no-untyped-def]
        failures = record(s, d)
        if threading.current_thread().name == "sr-export":
            sr_recorded.set()  # its session has read the job, not yet written
            assert other_done.wait(30)
        return failures

    monkeypatch.setattr(delivery, "_record", paused_record)
    add_output("sr")
    errors: list[BaseException] = []

    def sr_export() -> None:
        try:
            delivery.run_export(cfg, job_id)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    sr_task = threading.Thread(target=sr_export, name="sr-export")
    sr_task.start()
    assert sr_recorded.wait(30)
    add_output("seg")  # the worker's other objects, then the job is encoded
    with session_scope(cfg.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        transition(job, JobState.ENCODED)
    try:
        delivery.run_export(cfg, job_id)  # the others' task: claims the job, sends, finds the SR unsent
    except delivery.RetryableExportError:
        pass
    other_done.set()
    sr_task.join(30)
    assert not sr_task.is_alive() and not errors
    with session_scope(cfg.database.url) as s:
        assert [sd.state for sd in s.query(Send)] == [SendState.SENT, SendState.SENT]
        assert s.get(Job, job_id).state == JobState.DONE  # type: ignore[union-attr]


def test_an_export_task_claims_what_is_due_to_send_or_to_confirm_and_nothing_twice(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each send by its state: never sent, failed, or claimed by a worker that died (older than
    SEND_CLAIM_SECONDS) is sent; stored, or awaiting a commitment report past the destination's
    wait, is only confirmed; anything else is left. A second task then finds nothing to claim."""
    from datetime import timedelta

    from node.cli import db_upgrade
    from node.config import parse_config
    from node.db.models import JobState, Output, Send, SendState, utcnow
    from node.db.session import session_scope
    from node.engine import delivery
    from tests.unit.jobs_data import make_job

    cfg = parse_config({
        "storage": {"path": str(tmp_path / "spool")},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104,
                          "confirm": "commitment", "commitment_wait_seconds": 60},
                         {"name": "archive", "ae_title": "ARCH", "host": "127.0.0.1", "port": 105}],
    })
    db_upgrade(cfg)
    job_id = make_job(cfg, JobState.SENDING)
    now = utcnow()
    old_claim = now - timedelta(seconds=delivery.SEND_CLAIM_SECONDS + 1)
    sends = {  # name: (destination, state, last change)
        "pending": ("pacs", SendState.PENDING, now), "failed": ("archive", SendState.FAILED, now),
        "sending": ("pacs", SendState.SENDING, now), "sending-dead": ("archive", SendState.SENDING, old_claim),
        "stored": ("archive", SendState.STORED, now), "committing": ("pacs", SendState.COMMITTING, now),
        "committing-late": ("pacs", SendState.COMMITTING, now - timedelta(seconds=61)),
        "sent": ("pacs", SendState.SENT, now),
    }
    with session_scope(cfg.database.url) as s:
        for i, (name, (destination, state, at)) in enumerate(sends.items()):
            out = Output(job_id=job_id, kind="sr", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                         sop_instance_uid=f"2.25.{i + 1}", series_instance_uid="2.25.99", path=f"outputs/{name}.dcm")
            s.add(out)
            s.flush()
            s.add(Send(output_id=out.id, destination=destination, state=state, attempts=0, updated_at=at))

    claims = delivery._claim_sends(cfg, job_id)
    got = {c.path.stem: (name, c.confirm_only) for name, items in claims.by_destination.items() for c in items}
    assert got == {"pending": ("pacs", False), "failed": ("archive", False), "sending-dead": ("archive", False),
                   "stored": ("archive", True), "committing-late": ("pacs", True)}
    with session_scope(cfg.database.url) as s:
        states = {name: s.get_one(Send, i + 1).state for i, name in enumerate(sends)}
    assert {name for name, st in states.items() if st == SendState.SENDING} == {*got, "sending"}
    assert delivery._claim_sends(cfg, job_id).by_destination == {}
