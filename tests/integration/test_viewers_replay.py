"""A replay writes the same objects, byte for byte, under the same UIDs: the PACS receives
nothing new, and what a reader saw before is what they see after.

The worker builds, validates, stores and sends the objects of a real job (RG1, demo bundle, a
real Orthanc); `pacsnode replay` makes a new job; its objects must equal the first bytes. And
after an upgrade changed a writer, the replay's object goes out under a new UID, never under
the old one (which Orthanc would keep as it was).
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
from node.writers import sr as writers_sr
from tests.integration.test_results_export import _config, _dimse
from tests.peers import Orthanc, have
from tests.unit.jobs_data import nudge_networks, queued_job, upgrade_writer

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


def test_after_an_upgrade_a_replay_sends_a_new_sr_that_supersedes_and_leaves_the_first_as_it_was(
    demo_bundle: Path, pacs: Orthanc, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Orthanc, like many PACS, keeps its first copy of a SOP Instance UID it receives again: had
    # the upgraded SR gone out under the first one's UID, the new result would never show.
    monkeypatch.setattr(inference, "enqueue_export", delivery.run_export)
    cfg = _config(tmp_path, demo_bundle, [_dimse("pacs", pacs, objects=["sr"])])
    first = queued_job(cfg, RG1)
    inference.run_inference(cfg, first, "test")
    state, before = _objects(cfg, first)
    assert state == JobState.DONE
    [(old_uid, old)] = before.items()
    upgrade_writer(monkeypatch, writers_sr, "build_comprehensive_3d_sr")
    second = replay(cfg, first, "test", "after an upgrade")
    inference.run_inference(cfg, second, "test")
    state, after = _objects(cfg, second)
    assert state == JobState.DONE
    [(new_uid, new)] = after.items()
    assert new_uid != old_uid
    sr = pydicom.dcmread(BytesIO(pacs.instance_bytes(new_uid)))
    assert sr == pydicom.dcmread(BytesIO(new)) and sr.SeriesDescription.endswith("(upgraded)")
    [item] = sr.PredecessorDocumentsSequence
    assert item.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old_uid
    assert pydicom.dcmread(BytesIO(pacs.instance_bytes(old_uid))) == pydicom.dcmread(BytesIO(old))  # untouched
