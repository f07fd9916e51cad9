"""Storage Commitment against a real Orthanc, a Storage Commitment SCP that knows the node.

The node's listener runs in this process (its N-EVENT-REPORT handler is what records Orthanc's
answer); inference and export run as plain function calls, as the Celery tasks would call them.
Orthanc lists the node's listener in its DicomModalities: that is where it sends its reports,
on a new association, after our N-ACTION.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import Comprehensive3DSRStorage
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from node.cli import db_upgrade
from node.config import Config, parse_config
from node.db.models import Job, JobState, Send, SendState
from node.db.session import session_scope
from node.engine import delivery, inference
from node.engine.errors import RetryableExportError
from node.handlers import IngestContext
from node.listener import start_listener
from tests.peers import Orthanc, free_port, have, wait_for
from tests.unit.jobs_data import queued_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "dciodvfy", "dcmpschk"), reason="needs Orthanc and dicom3tools"),
]

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))


class Site:
    """Orthanc as the PACS, the node's listener, and the node's config naming both."""

    def __init__(self, tmp: Path, bundle: Path, **export: Any) -> None:
        self.listener_port = free_port()
        self.pacs = Orthanc(tmp / "orthanc", modalities={"pacsnode": ("PACSNODE", "127.0.0.1", self.listener_port)})
        self.pacs.start()
        self.config: Config = parse_config({
            "listener": {"host": "127.0.0.1", "port": self.listener_port, "allowed_callers": [{"ae_title": "STORESCU"}],
                         "timeouts": {"acse": 5, "dimse": 5, "network": 5}},
            "storage": {"path": str(tmp / "spool"), "min_free_mb": 0},
            "database": {"url": f"sqlite:///{tmp / 'db.sqlite'}"},
            "destinations": [{"name": "pacs", "ae_title": self.pacs.aet, "host": "127.0.0.1",
                              "port": self.pacs.dicom_port, "timeout": 10, "objects": ["sr", "gsps"],
                              "confirm": "commitment", "commitment_wait_seconds": 60}],
            "export": {"calling_ae_title": "PACSNODE", **export},
            "pipelines": {"chest_xray": {"bundle": str(bundle), "device": "cpu"}},
        })
        db_upgrade(self.config)
        self.server = start_listener(self.config, IngestContext(self.config))

    def stop(self) -> None:
        self.server.shutdown()
        self.pacs.stop(wait=False)

    def job(self, job_id: int) -> tuple[JobState, str | None, str | None]:
        with session_scope(self.config.database.url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            return job.state, job.error_stage, job.error

    def sends(self, job_id: int) -> dict[str, Send]:
        with session_scope(self.config.database.url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            rows = {o.kind: sd for o in job.outputs for sd in o.sends}
            s.expunge_all()
            return rows

    def export(self, job_id: int) -> None:
        """One export attempt; it asks for commitment and reports that it awaits the answer."""
        try:
            delivery.run_export(self.config, job_id)
        except RetryableExportError as e:  # unless Orthanc's report came before the attempt ended
            assert "pacs: awaiting its storage commitment report" in str(e) or "refused" in str(e), e

    def settled(self, job_id: int, timeout: float = 30) -> dict[str, Send]:
        """The sends once Orthanc's report has reached the listener (none left committing)."""
        def check() -> dict[str, Send] | None:
            sends = self.sends(job_id)
            return sends if all(sd.state != SendState.COMMITTING for sd in sends.values()) else None

        return wait_for(check, timeout, f"Orthanc's storage commitment report for job {job_id}", interval=0.1)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Site]]:
    """Start a Site with the given bundle (and export settings); stop every one after the test."""
    monkeypatch.setattr(inference, "enqueue_export", lambda config, job_id: None)  # export runs when the test says
    started: list[Site] = []

    def start(bundle: Path, **export: Any) -> Site:
        started.append(Site(tmp_path / f"site{len(started)}", bundle, **export))
        return started[-1]

    yield start
    for s in started:
        s.stop()


def _encoded_job(site: Site) -> int:
    job_id = queued_job(site.config, RG1)
    inference.run_inference(site.config, job_id, "test")
    assert site.job(job_id)[0] == JobState.ENCODED
    return job_id


def test_a_job_is_done_only_when_orthanc_has_committed_every_object(site: Callable[..., Site], demo_bundle: Path) -> None:
    s = site(demo_bundle)
    job_id = _encoded_job(s)
    s.export(job_id)
    sends = s.settled(job_id)
    assert set(sends) == {"sr", "gsps"}
    for sd in sends.values():
        assert (sd.state, sd.attempts, sd.error) == (SendState.SENT, 1, None)
        assert sd.commitment_uid and sd.confirmed_at is not None and sd.confirmed_at >= sd.sent_at  # type: ignore[operator]
    assert len({sd.commitment_uid for sd in sends.values()}) == 1  # one request for the batch
    assert s.job(job_id) == (JobState.DONE, None, None)  # closed by the report, on the listener
    with session_scope(s.config.database.url) as db:
        job = db.get(Job, job_id)
        assert job is not None
        assert all(s.pacs.has_instance(o.sop_instance_uid) for o in job.outputs)


def _losing_pacs(s: Site, monkeypatch: pytest.MonkeyPatch, times: int) -> list[str]:
    """Orthanc deletes the SR right after storing it, before the commitment request: a PACS that
    lost an object it had acknowledged. Returns the SOP Instance UIDs it lost."""
    lost: list[str] = []
    real = delivery.request_commitment

    def lose_then_request(dest: Any, refs: Any, calling_ae: str, transaction: str) -> None:
        if len(lost) < times:
            sr = next(r for r in refs if r.sop_class_uid == Comprehensive3DSRStorage)
            [hit] = [h for h in s.pacs.lookup(sr.sop_uid) if h["Type"] == "Instance"]
            s.pacs.delete(f"/instances/{hit['ID']}")
            lost.append(sr.sop_uid)
        real(dest, refs, calling_ae, transaction)

    monkeypatch.setattr(delivery, "request_commitment", lose_then_request)
    return lost


def test_a_refused_object_is_stored_again_and_committed(
    site: Callable[..., Site], demo_bundle: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = site(demo_bundle)
    lost = _losing_pacs(s, monkeypatch, times=1)
    job_id = _encoded_job(s)
    s.export(job_id)
    sends = s.settled(job_id)
    assert sends["gsps"].state == SendState.SENT
    assert sends["sr"].state == SendState.FAILED
    assert sends["sr"].error == "storage commitment refused: 0x0112 (No Such SOP Instance)"
    assert s.job(job_id)[0] == JobState.SENDING  # not done: the SR is not committed
    s.export(job_id)  # the next attempt stores the SR again and asks again
    sends = s.settled(job_id)
    assert (sends["sr"].state, sends["sr"].attempts, sends["gsps"].attempts) == (SendState.SENT, 2, 1)
    assert s.job(job_id) == (JobState.DONE, None, None)
    assert s.pacs.has_instance(lost[0])


def test_an_object_refused_until_no_attempt_is_left_fails_the_job_naming_it(
    site: Callable[..., Site], demo_bundle: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = site(demo_bundle, max_retries=1)
    lost = _losing_pacs(s, monkeypatch, times=2)
    job_id = _encoded_job(s)
    s.export(job_id)
    s.settled(job_id)
    s.export(job_id)
    wait_for(lambda: s.job(job_id)[0] == JobState.FAILED, 30, "the job to fail at stage confirm")
    state, stage, error = s.job(job_id)
    assert (state, stage) == (JobState.FAILED, "confirm")
    assert error == (f"pacs refused to commit after 2 attempts: sr {lost[1]}: "
                     "storage commitment refused: 0x0112 (No Such SOP Instance)")
    assert lost[0] == lost[1]


def _report(transaction: str, committed: list[str]) -> Dataset:
    info = Dataset()
    info.TransactionUID = transaction
    info.ReferencedSOPSequence = []
    for uid in committed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CTImageStorage, uid
        info.ReferencedSOPSequence.append(item)
    return info


def _reporter(aet: str) -> AE:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(StorageCommitmentPushModel)
    ae.add_requested_context(CTImageStorage)
    return ae


def test_only_a_commitment_destination_may_report_and_it_may_do_nothing_else(
    site: Callable[..., Site], tmp_path: Path,
) -> None:
    s = site(tmp_path / "no-bundle")  # nothing is inferred here
    port, role = s.listener_port, build_role(StorageCommitmentPushModel, scp_role=True)
    # The destination, from its address: the commitment context only, never storage.
    assoc = _reporter("ORTHANC").associate("127.0.0.1", port, ae_title="PACSNODE", ext_neg=[role])
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {StorageCommitmentPushModel}
        status, _ = assoc.send_n_event_report(_report("2.25.1", ["1.2.3"]), 1, StorageCommitmentPushModel,
                                              StorageCommitmentPushModelInstance)
        assert status.Status == 0x0000  # an unknown transaction is acknowledged and changes nothing
    finally:
        assoc.release()
    # Its AE title from another address: refused before negotiation.
    assoc = _reporter("ORTHANC").associate("127.0.0.1", port, ae_title="PACSNODE", ext_neg=[role],
                                           bind_address=("127.0.0.2", 0))
    assert assoc.is_rejected
    # A sender that may store: storage only, no reports.
    assoc = _reporter("STORESCU").associate("127.0.0.1", port, ae_title="PACSNODE", ext_neg=[role])
    assert assoc.is_established
    try:
        assert {str(cx.abstract_syntax) for cx in assoc.accepted_contexts} == {CTImageStorage}
    finally:
        assoc.release()
