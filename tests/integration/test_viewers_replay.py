"""A replay writes the same objects, byte for byte, under the same UIDs: the PACS receives
nothing new, and what a reader saw before is what they see after.

The worker builds, validates, stores and sends the objects of a real job (RG1, demo bundle, a
real Orthanc); `pacsnode replay` makes a new job; its objects must equal the first bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.config import Config
from node.db.models import Job, JobState
from node.db.session import session_scope
from node.engine import delivery, inference
from node.jobs import replay
from node.spool import resolve
from tests.integration.test_results_export import _config, _dimse
from tests.peers import Orthanc, have
from tests.unit.jobs_data import nudge_networks, queued_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "dciodvfy"), reason="needs Orthanc and dicom3tools"),
]

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop(wait=False)


def _objects(cfg: Config, job_id: int) -> tuple[JobState, dict[str, bytes]]:
    """The job's state and each output's SOP Instance UID -> the bytes stored in the spool."""
    with session_scope(cfg.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.state, {o.sop_instance_uid: resolve(cfg.storage.path, o.path).read_bytes() for o in job.outputs}


def test_a_replayed_job_writes_the_same_bytes_under_the_same_uids(
    demo_bundle: Path, pacs: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(inference, "enqueue_export", delivery.run_export)  # export in this process
    cfg = _config(tmp_path, demo_bundle, [_dimse("pacs", pacs)])
    first = queued_job(cfg, RG1)
    inference.run_inference(cfg, first, "test")
    state, before = _objects(cfg, first)
    assert state == JobState.DONE and len(before) == 4  # SR, SC, SEG, GSPS
    stored = {uid: pacs.get_bytes(f"/instances/{h['ID']}/file") for uid in before
              for h in pacs.lookup(uid) if h["Type"] == "Instance"}  # fmt: skip
    # What the PACS holds is what was written (element for element: the association may have
    # carried it in another of the transfer syntaxes we propose).
    assert stored.keys() == before.keys()
    for uid, data in stored.items():
        assert pydicom.dcmread(BytesIO(data)) == pydicom.dcmread(BytesIO(before[uid])), uid

    # Were the networks run again, with other threads or batch, their numbers could move ~1e-6;
    # here they would move 1% (the kept model outputs make that irrelevant: they do not run).
    nudge_networks(inference.pipeline_for(cfg, "chest_xray"), monkeypatch)
    second = replay(cfg, first, "test", "byte-identical replay")
    inference.run_inference(cfg, second, "test")
    state, after = _objects(cfg, second)
    assert state == JobState.DONE
    assert after.keys() == before.keys()  # same UIDs
    for uid in before:
        assert after[uid] == before[uid], f"{uid} differs after replay"
        assert "PredecessorDocumentsSequence" not in pydicom.dcmread(BytesIO(after[uid]))  # not its own predecessor
