"""Result objects through the worker to real Orthancs: which objects, DIMSE and STOW-RS, read-back.

`run_inference` and `run_export` run as plain function calls (no Celery); the export queue is
replaced by a list, or by calling `run_export` at once, as the SR's export task would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom import Dataset
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.associations import POOL
from node.cli import db_upgrade
from node.config import Config, Destination, parse_config
from node.db.models import (
    Job,
    JobState,
    Send,
    SendState,
)
from node.db.session import session_scope
from node.engine import delivery, inference
from node.engine.errors import RetryableExportError
from node.export import DestinationUnavailable, ObjectRef, confirm_held, send_files
from node.writers.validate import validate
from tests.peers import CXR_SAMPLES, DICOMWEB_PLUGIN, Orthanc, free_port, have, img2dcm
from tests.unit.jobs_data import queued_job

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "img2dcm", "dciodvfy", "dcmpschk"), reason="needs Orthanc, DCMTK, dicom3tools"),
    pytest.mark.skipif(not DICOMWEB_PLUGIN.exists(), reason="needs Orthanc's DICOMweb plugin (orthanc-dicomweb)"),
]

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
CXR = CXR_SAMPLES / "pneumonia" / "person1946_bacteria_4874.jpeg"


@pytest.fixture
def orthancs(tmp_path: Path) -> Iterator[Callable[..., Orthanc]]:
    """Start Orthancs for one test (fresh, so no earlier test's objects are there); stop them after."""
    started: list[Orthanc] = []

    def start(name: str, **options: Any) -> Orthanc:
        started.append(Orthanc(tmp_path / name, **options).start())
        return started[-1]

    yield start
    for server in started:
        server.stop(wait=False)


def _config(tmp: Path, bundle: Path, destinations: list[dict[str, Any]], **export: Any) -> Config:
    cfg = parse_config({
        "storage": {"path": str(tmp / "spool"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{tmp / 'db.sqlite'}"},
        "destinations": destinations,
        "export": {"calling_ae_title": "PACSNODE", **export},
        "pipelines": {"chest_xray": {"bundle": str(bundle), "device": "cpu"}},
    })
    db_upgrade(cfg)
    return cfg


def _dimse(name: str, pacs: Orthanc, **extra: Any) -> dict[str, Any]:
    return {"name": name, "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "timeout": 10, **extra}


def _sends(cfg: Config, job_id: int) -> dict[tuple[str, str], Send]:
    """(kind, destination) -> Send row, detached, for asserts."""
    with session_scope(cfg.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        rows = {(o.kind, sd.destination): sd for o in job.outputs for sd in o.sends}
        s.expunge_all()
        return rows


def _job(cfg: Config, job_id: int) -> dict[str, Any]:
    with session_scope(cfg.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return {"state": job.state, "error": job.error, "error_stage": job.error_stage, "timings": job.stage_seconds,
                "outputs": [(o.kind, o.sop_instance_uid, o.series_instance_uid) for o in job.outputs],
                "checks": {o.kind: o.checks for o in job.outputs},
                "study": job.study.study_instance_uid}


def _read_back(pacs: Orthanc, sop_uid: str) -> Dataset:
    [hit] = [h for h in pacs.lookup(sop_uid) if h["Type"] == "Instance"]
    return pydicom.dcmread(BytesIO(pacs.get_bytes(f"/instances/{hit['ID']}/file")))


@pytest.mark.parametrize("source", ["RG1_UNCR", "cxr-sample"])
def test_each_destination_gets_the_objects_it_wants_over_dimse_and_stow_confirmed(
    source: str, demo_bundle: Path, orthancs: Callable[..., Orthanc], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = RG1 if source == "RG1_UNCR" else img2dcm(CXR, tmp_path / "cxr.dcm", "ViewPosition=PA")
    pacs = orthancs("pacs", allow_find=True)
    web = orthancs("web", dicomweb=True)
    cfg = _config(tmp_path, demo_bundle, [
        _dimse("pacs", pacs, confirm="cfind"),
        {"name": "web", "protocol": "stow", "url": web.dicomweb_url, "timeout": 10, "objects": ["gsps", "sr"],
         "confirm": "qido"},
    ])
    # The export task runs as soon as it is queued: the SR is out before the others are built.
    monkeypatch.setattr(inference, "enqueue_export", delivery.run_export)
    job_id = queued_job(cfg, path)
    inference.run_inference(cfg, job_id, "test")

    job = _job(cfg, job_id)
    assert job["state"] == JobState.DONE, job["error"]
    assert [k for k, _, _ in job["outputs"]] == ["sr", "sc", "seg", "gsps"]
    # The job record says which checks of the gate each object passed.
    assert job["checks"] == {"sr": ["pydicom", "dciodvfy"], "sc": ["pydicom", "dciodvfy"],
                             "seg": ["pydicom", "dciodvfy"], "gsps": ["pydicom", "dciodvfy", "dcmpschk"]}
    sends = _sends(cfg, job_id)
    assert sorted(sends) == sorted([("sr", "pacs"), ("sc", "pacs"), ("seg", "pacs"), ("gsps", "pacs"),
                                    ("sr", "web"), ("gsps", "web")])
    for sd in sends.values():
        assert (sd.state, sd.remote_status, sd.attempts) == (SendState.SENT, 0, 1)
        assert sd.confirmed_at is not None and sd.sent_at is not None and sd.confirmed_at >= sd.sent_at
    for kind, sop_uid, series_uid in job["outputs"]:
        ds = _read_back(pacs, sop_uid)
        assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == (job["study"], series_uid)
        # What the PACS holds passes the gate again: dciodvfy, dcmpschk for the GSPS, re-read.
        assert validate(ds) == [], kind
        assert web.has_instance(sop_uid) == (kind in ("sr", "gsps")), kind
    for kind in ("sr", "sc", "seg", "gsps"):
        print(f"{source} {kind}: build {job['timings'][f'encode_{kind}']:.3f} s, "
              f"validate {job['timings'][f'validate_{kind}']:.3f} s")
    print(f"{source}: inference {job['timings']['inference']:.2f} s, send+confirm {job['timings']['send']:.3f} s")


def test_an_object_that_fails_the_gate_fails_the_job_and_never_reaches_orthanc(
    demo_bundle: Path, orthancs: Callable[..., Orthanc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import node.writers.seg as seg_writer

    build = seg_writer.build_segmentation

    def without_references(*args: Any, **kwargs: Any) -> Dataset:
        seg = build(*args, **kwargs)
        del seg.ReferencedSeriesSequence  # the SEG no longer says which image it segments
        return seg

    monkeypatch.setattr(seg_writer, "build_segmentation", without_references)
    monkeypatch.setattr(inference, "enqueue_export", delivery.run_export)
    pacs = orthancs("pacs")
    cfg = _config(tmp_path, demo_bundle, [_dimse("pacs", pacs)])
    job_id = queued_job(cfg, RG1)
    inference.run_inference(cfg, job_id, "test")

    job = _job(cfg, job_id)
    assert job["state"] == JobState.FAILED
    assert job["error_stage"] == "validate"
    assert job["error"].startswith("seg failed validation: dciodvfy: Error - Missing attribute Type 1C")
    assert "ReferencedSeriesSequence" in job["error"]
    # The SR had passed and went first; nothing of the failed batch was written or sent.
    assert [k for k, _, _ in job["outputs"]] == ["sr"]
    assert pacs.has_instance(job["outputs"][0][1])
    study = pacs.find_study(job["study"])
    assert study is not None
    series = pacs.get(f"/studies/{study}/series")
    assert [s["MainDicomTags"].get("Modality") for s in series] == ["SR"]


def test_the_gate_fails_closed_without_its_validator_and_a_weaker_gate_is_recorded(
    demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dciodvfy gone after start: nothing is stored for sending. A config that chose a weaker
    gate runs, and each object records the checks that did run."""
    monkeypatch.setattr(inference, "enqueue_export", lambda config, job_id: None)
    monkeypatch.setenv("PATH", str(tmp_path))  # no dciodvfy, no dcmpschk
    cfg = _config(tmp_path / "full", demo_bundle, [])
    job_id = queued_job(cfg, RG1)
    inference.run_inference(cfg, job_id, "test")
    job = _job(cfg, job_id)
    assert (job["state"], job["error_stage"], job["outputs"]) == (JobState.FAILED, "validate", [])
    assert job["error"] == ("sr failed validation: dciodvfy: not installed (Debian package dicom3tools); "
                            "the gate cannot check this object")

    weaker = parse_config({**cfg.model_dump(mode="json"), "storage": {"path": str(tmp_path / "weak" / "spool")},
                           "database": {"url": f"sqlite:///{tmp_path / 'weak.sqlite'}"},
                           "validation": {"tools": []}})
    db_upgrade(weaker)
    job_id = queued_job(weaker, RG1)
    inference.run_inference(weaker, job_id, "test")
    job = _job(weaker, job_id)
    assert job["state"] == JobState.ENCODED, job["error"]
    assert job["checks"] == {kind: ["pydicom"] for kind in ("sr", "sc", "seg", "gsps")}


def test_a_job_is_done_only_when_read_back_and_a_retry_only_asks_again(
    demo_bundle: Path, orthancs: Callable[..., Orthanc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    pacs = orthancs("pacs", allow_find=True)
    cfg = _config(tmp_path, demo_bundle, [_dimse("pacs", pacs, confirm="cfind", objects=["sr", "gsps"])])
    queued: list[int] = []
    monkeypatch.setattr(inference, "enqueue_export", lambda config, job_id: queued.append(job_id))
    job_id = queued_job(cfg, RG1)
    inference.run_inference(cfg, job_id, "test")
    assert [k for k, _, _ in _job(cfg, job_id)["outputs"]] == ["sr", "gsps"]  # only what someone wants

    # First read-back: the PACS has not indexed them yet (as a slow archive might answer).
    monkeypatch.setattr(delivery, "confirm_held", lambda dest, refs, ae: {r.sop_uid: "C-FIND found no such instance"
                                                                        for r in refs})
    with pytest.raises(RetryableExportError, match="not confirmed: C-FIND found no such instance"):
        delivery.run_export(cfg, job_id)
    assert _job(cfg, job_id)["state"] == JobState.SENDING
    assert {sd.state for sd in _sends(cfg, job_id).values()} == {SendState.STORED}

    monkeypatch.setattr(delivery, "confirm_held", confirm_held)
    delivery.run_export(cfg, job_id)
    assert _job(cfg, job_id)["state"] == JobState.DONE
    for sd in _sends(cfg, job_id).values():
        assert (sd.state, sd.attempts, sd.error) == (SendState.SENT, 1, None)  # sent once, confirmed later
        assert sd.confirmed_at is not None


def test_read_back_by_cfind_and_qido_tells_held_from_missing(orthancs: Callable[..., Orthanc], tmp_path: Path) -> None:
    pacs = orthancs("pacs", allow_find=True, dicomweb=True)
    cfg = parse_config({"destinations": [
        _dimse("dimse", pacs, confirm="cfind"),
        {"name": "web", "protocol": "stow", "url": pacs.dicomweb_url, "timeout": 10, "confirm": "qido"},
    ]})
    dimse, web = cfg.destinations
    [out] = send_files(web, [RG1], "PACSNODE")
    assert out.ok and out.status == 0
    ds = pydicom.dcmread(RG1, stop_before_pixels=True)
    held = ObjectRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), str(ds.SOPClassUID))
    missing = ObjectRef(held.study_uid, held.series_uid, "1.2.3.4.5.6.7.8.9", held.sop_class_uid)
    assert confirm_held(dimse, [held, missing], "PACSNODE") == {
        held.sop_uid: None, missing.sop_uid: "C-FIND found no such instance"}
    assert confirm_held(web, [held, missing], "PACSNODE") == {
        held.sop_uid: None, missing.sop_uid: "QIDO-RS found no such instance"}


def test_stow_to_nothing_is_unavailable_not_a_verdict() -> None:
    web = parse_config({"destinations": [{"name": "web", "protocol": "stow", "timeout": 2,
                                          "url": f"http://127.0.0.1:{free_port()}/dicom-web"}]}).destinations[0]
    with pytest.raises(DestinationUnavailable, match=r"STOW-RS to web \(http://127\.0\.0\.1:\d+/dicom-web\) failed"):
        send_files(web, [RG1], "PACSNODE")


def test_a_failed_export_keeps_its_reason_on_the_job(
    demo_bundle: Path, orthancs: Callable[..., Orthanc], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With the PACS really stopped, the first failed attempt leaves its error, stage and time on the job."""
    pacs = orthancs("pacs")
    cfg = _config(tmp_path, demo_bundle, [_dimse("pacs", pacs, objects=["sr"], timeout=3)])
    monkeypatch.setattr(inference, "enqueue_export", lambda config, job_id: None)
    job_id = queued_job(cfg, RG1)
    inference.run_inference(cfg, job_id, "test")
    with session_scope(cfg.database.url) as s:
        before = s.get(Job, job_id).updated_at  # type: ignore[union-attr]
    pacs.stop()

    with pytest.raises(RetryableExportError, match="pacs: association with pacs .* failed"):
        delivery.run_export(cfg, job_id)
    with session_scope(cfg.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.error is not None and job.error.startswith("pacs: association with pacs")
        assert job.error_stage == "send"
        assert job.updated_at > before  # the reconciler sees that export retries touch the row
        assert job.send_seconds > 0
    assert {sd.state for sd in _sends(cfg, job_id).values()} == {SendState.FAILED}


def test_a_kept_association_to_orthanc_survives_its_restart(orthancs: Callable[..., Orthanc], tmp_path: Path) -> None:
    """The export keeps its association to a PACS open between sends (export.keep_association_seconds);
    Orthanc restarting in between ends it, and the next send goes on a new one: nothing is lost
    or reported failed."""
    POOL.close_all()  # what earlier tests' exports kept open
    pacs = orthancs("pacs")
    dest = Destination(**_dimse("pacs", pacs))
    ds = pydicom.dcmread(RG1)
    files = []
    for name in ("before", "after"):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        files.append(tmp_path / f"{name}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    try:
        [out] = send_files(dest, [files[0]], "PACSNODE", keep_open_seconds=60)
        assert out.ok, out.error
        assert POOL.idle_count() == 1
        pacs.stop()
        pacs.start()
        [out] = send_files(dest, [files[1]], "PACSNODE", keep_open_seconds=60)
        assert out.ok, out.error
        assert POOL.idle_count() == 1  # the new association, kept in its turn
    finally:
        POOL.close_all()
    for path in files:
        assert pacs.has_instance(str(pydicom.dcmread(path).SOPInstanceUID))
