"""The Celery tasks' retry policy, run eagerly in this process (no broker, no worker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.cli import db_upgrade
from node.config import Config, parse_config
from node.db.models import Instance, Job, JobState, Series, SeriesState
from node.db.session import session_scope
from node.engine.errors import RetryableExportError, Stage, TransientError
from node.queue import configure
from tests.unit.jobs_data import make_job


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = parse_config({
        "storage": {"path": str(tmp_path / "spool")},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "queue": {"max_retries": 3, "backoff_seconds": 0.01, "backoff_max_seconds": 0.05, "heartbeat_seconds": 0.01,
                  "lost_after_seconds": 1},
    })
    db_upgrade(cfg)
    configure(cfg)
    return cfg


def _state(config: Config, job_id: int) -> tuple[JobState, str | None, str | None, int]:
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.state, job.error_stage, job.error, job.attempt


def test_transient_errors_retry_with_backoff_then_fail_the_job(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    import node.tasks

    calls: list[int] = []

    def out_of_memory(cfg: Config, job_id: int, worker: str) -> bool:
        calls.append(job_id)
        raise TransientError(Stage.INFERENCE, "CUDA out of memory")

    monkeypatch.setattr(node.tasks, "run_inference", out_of_memory)
    job_id = make_job(config, JobState.QUEUED)
    node.tasks.run_job.apply(args=[job_id])
    assert calls == [job_id] * (config.queue.max_retries + 1)
    state, stage, error, _ = _state(config, job_id)
    assert (state, stage) == (JobState.FAILED, "inference")
    assert error is not None and "gave up after 4 attempts: CUDA out of memory" in error


def test_an_export_that_keeps_failing_is_retried_by_celery_then_fails_the_job_at_its_stage(
    config: Config, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import node.tasks

    cfg = parse_config({**config.model_dump(mode="json"), "export": {"max_retries": 2, "backoff_seconds": 0.01}})
    monkeypatch.setattr(node.tasks, "current_config", lambda: cfg)
    calls: list[int] = []

    def pacs_down(c: Config, job_id: int) -> None:
        calls.append(job_id)
        raise RetryableExportError(Stage.SEND, "pacs: association with pacs failed: no answer")

    monkeypatch.setattr(node.tasks, "run_export", pacs_down)
    job_id = make_job(config, JobState.SENDING)
    node.tasks.export_job.apply(args=[job_id])
    assert calls == [job_id] * 3  # export.max_retries, not queue.max_retries (3)
    state, stage, error, _ = _state(config, job_id)
    assert (state, stage) == (JobState.FAILED, "send")
    assert error == "gave up after 3 attempts: pacs: association with pacs failed: no answer"


def test_backoff_doubles_up_to_its_maximum_and_jitter_draws_below_it() -> None:
    from node.config import ExportConfig
    from node.tasks import backoff

    rs = ExportConfig(backoff_seconds=2, backoff_max_seconds=10)
    assert [backoff(rs, n, jitter=False) for n in range(5)] == [2, 4, 8, 10, 10]
    draws = [backoff(rs, 2) for _ in range(200)]
    assert all(0 <= d <= 8 for d in draws) and len(set(draws)) > 100  # spread, never above the delay


def test_an_undecodable_source_fails_at_once_without_retry(config: Config, tmp_path: Path) -> None:
    import node.tasks

    job_id = make_job(config, JobState.QUEUED)
    (config.storage.path / "in").mkdir(parents=True)
    (config.storage.path / "in" / "garbage.dcm").write_bytes(b"not DICOM at all")
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        series = Series(study_id=job.study_id, series_instance_uid="1.2.3.4", modality="CR", state=SeriesState.ROUTED)
        s.add(series)
        s.flush()
        inst = Instance(series_id=series.id, sop_instance_uid="1.2.3.4.5", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", path="in/garbage.dcm", size=16, sha256="0" * 64)
        s.add(inst)
        s.flush()
        job.instance_ids = [inst.id]
    node.tasks.run_job.apply(args=[job_id])
    state, stage, error, attempt = _state(config, job_id)
    assert (state, stage, attempt) == (JobState.FAILED, "read", 1)
    assert error is not None and "cannot read source instance" in error


def test_waiting_jobs_share_one_forward_pass_and_a_bad_image_fails_only_its_job(
    tmp_path: Path, demo_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three studies wait; the worker that takes the first runs all three in one batch. One of
    them is undecodable: the batch falls back to one pass per job and only that job fails."""
    from io import BytesIO

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from sqlalchemy import select

    from node.completion import CompletionService
    from node.engine import inference
    from node.handlers import AssociationTracker, IngestContext, ingest

    cfg = parse_config({
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "completion": {"quiet_seconds": 0},
        "queue": {"batch_size": 3},
        "pipelines": {"chest_xray": {"bundle": str(demo_bundle), "device": "cpu"}},
    })
    db_upgrade(cfg)
    configure(cfg)
    ctx = IngestContext(cfg)
    src = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    small = src.pixel_array[::4, ::4].copy()
    for i in range(3):
        ds = src.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = (generate_uid() for _ in range(3))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Rows, ds.Columns = small.shape
        ds.PixelData = small.tobytes() if i != 1 else small.tobytes()[: small.nbytes // 2] + b"\0" * 2
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ingest(buf.getvalue(), ctx, "SCU")
    job_ids = CompletionService(cfg, AssociationTracker()).tick()
    assert len(job_ids) == 3
    passes: list[int] = []
    real = inference.pipeline_for(cfg, "chest_xray").run

    def counting(datasets: list, saved: list | None = None) -> list:  # type: ignore[type-arg]
        passes.append(len(datasets))
        return real(datasets, saved=saved)

    monkeypatch.setattr(inference.pipeline_for(cfg, "chest_xray"), "run", counting)
    inference.run_inference(cfg, job_ids[0], "inference@test")
    assert passes[0] == 3  # one forward pass for the three waiting studies...
    assert sorted(passes[1:]) == [1, 1, 1]  # ...which failed on the bad image, then one pass each
    with session_scope(cfg.database.url) as s:
        states = {j.id: (j.state, j.error_stage) for j in s.scalars(select(Job))}
    assert states[job_ids[1]] == (JobState.FAILED, "decode")
    assert states[job_ids[0]] == states[job_ids[2]] == (JobState.ENCODED, None)


def test_a_job_cancelled_while_its_last_objects_are_written_stays_cancelled(
    config: Config, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The job becomes encoded in the commit that records its last objects; a cancel that came
    while their files were written is read there and wins (nothing of the attempt is recorded)."""
    from pydicom import Dataset

    import node.engine.inference as inference
    from node.db.models import Output
    from node.jobs import TransitionError, cancel

    job_id = make_job(config, JobState.RUNNING)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.SeriesInstanceUID = "1.2.840.10008.5.1.4.1.1.66.4", "2.25.1", "2.25.2"
    write = inference.write_atomic

    def write_and_cancel(root: Path, rel: str, data: bytes) -> Path:
        path = write(root, rel, data)
        cancel(config, job_id, "admin", "wrong patient")  # another process, meanwhile
        return path

    monkeypatch.setattr(inference, "write_atomic", write_and_cancel)
    with pytest.raises(TransitionError, match="cancelled -> encoded is not allowed"):
        inference._store_outputs(config, job_id, [inference.Built("seg", ds, (), b"DICM")], [], first=False,
                                 encoded=("demo", {}))
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.CANCELLED
        assert s.query(Output).count() == 0
