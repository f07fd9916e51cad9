"""What a worker does with a job id: run the pipeline, encode results, send them.

The Celery tasks in node/tasks.py are thin wrappers around `run_inference` and `run_export`,
which are plain functions (tested as such). Models are loaded once per process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import TypeVar

import pydicom
from pydicom import Dataset
from sqlalchemy import and_, func, or_, select, update

from node.config import Config
from node.db.models import Instance, Job, JobState, Output, Send, SendState, utcnow
from node.db.session import session_scope
from node.export import DestinationUnavailable, SendOutcome, send_files
from node.jobs import TransitionError, transition
from node.queue import enqueue_export
from node.spool import output_relpath, resolve, write_atomic

T = TypeVar("T")

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


class PermanentError(Exception):
    """Retrying cannot help (undecodable image, invalid result object): fail the job now."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


class TransientError(Exception):
    """GPU out of memory and the like: the job goes back to queued and is retried."""


class RetryableExportError(Exception):
    """Some destination did not take everything yet; retry later with backoff."""


@dataclass
class JobInput:
    job_id: int
    study_uid: str
    pipeline: str
    paths: list[Path]
    content_keys: list[str]  # "<sop uid>:<sha256>" of each source: re-sent content gets new results
    predecessor_sr: tuple[str, str, str] | None  # (study, series, sop) of the SR this one replaces


@cache
def get_pipeline(name: str, bundle: str, device: str):  # type: ignore[no-untyped-def]
    """Load a pipeline once per process (per bundle and device)."""
    from pipelines.registry import load_pipeline

    return load_pipeline(name, Path(bundle), device)


def pipeline_for(config: Config, name: str):  # type: ignore[no-untyped-def]
    pc = config.pipelines[name]
    return get_pipeline(name, str(pc.bundle), pc.device)


def _start(config: Config, job_id: int, worker: str) -> JobInput | None:
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise PermanentError("queue", f"job {job_id} does not exist")
        if job.state not in (JobState.QUEUED, JobState.RUNNING):
            log.info("job %d is %s: nothing to do", job_id, job.state.value)
            return None
        if job.state == JobState.RUNNING:
            log.warning("job %d was running on %s, which stopped: running it again", job_id, job.worker)
            transition(job, JobState.QUEUED)
        transition(job, JobState.RUNNING, attempt=job.attempt + 1, worker=worker, error=None, error_stage=None)
        instances = s.scalars(select(Instance).where(Instance.id.in_(job.instance_ids)).order_by(Instance.id)).all()
        predecessor = None
        if job.supersedes is not None:
            sr = next((o for o in job.supersedes.outputs if o.kind == "sr"), None)
            if sr is not None:
                predecessor = (job.study.study_instance_uid, sr.series_instance_uid, sr.sop_instance_uid)
        return JobInput(job_id, job.study.study_instance_uid, job.pipeline,
                        [resolve(config.storage.path, i.path) for i in instances],
                        sorted(f"{i.sop_instance_uid}:{i.sha256}" for i in instances), predecessor)


def _fail(config: Config, job_id: int, stage: str, message: str) -> None:
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is not None and job.state not in (JobState.FAILED, JobState.CANCELLED, JobState.DONE):
            transition(job, JobState.FAILED, error=message[:4000], error_stage=stage)
    log.error("job %d failed at %s: %s", job_id, stage, message)


def run_inference(config: Config, job_id: int, worker: str) -> None:
    """Run the job's pipeline, write its result objects and queue their export as each is ready."""
    from node.writers.sc import build_overlay_sc
    from node.writers.sr import build_comprehensive_3d_sr
    from node.writers.uids import result_uid
    from node.writers.validate import validate
    from pipelines.base import InputError

    try:
        ji = _start(config, job_id, worker)
    except TransitionError as e:
        log.warning("%s", e)
        return
    if ji is None:
        return
    timings: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        try:
            sources: list[Dataset] = [pydicom.dcmread(p) for p in ji.paths]
        except (OSError, pydicom.errors.InvalidDicomError) as e:
            raise PermanentError("read", f"cannot read source instance: {e}") from e
        timings["read"] = time.perf_counter() - t0
        pipeline = pipeline_for(config, ji.pipeline)
        model = pipeline.model
        t0 = time.perf_counter()
        try:
            results = pipeline.run(sources)
        except InputError as e:
            raise PermanentError("decode", str(e)) from e
        timings["pipeline"] = time.perf_counter() - t0
        for k in ("decode", "segmentation", "classification", "heatmap"):
            timings[k] = sum(r.timings.get(k, 0.0) for r in results)

        # Same sources and model -> same UIDs, so a re-run never gives the PACS duplicates.
        key = (ji.study_uid, ji.pipeline, model.version, model.device_uid, *ji.content_keys)
        # The SR goes out first, while the overlays are still being drawn: it is what the
        # radiologist's worklist waits for. Each object is validated before it is written.
        sr = _timed(timings, "encode", lambda: build_comprehensive_3d_sr(
            sources, results, model,
            series_instance_uid=result_uid(*key, "sr-series"),
            sop_instance_uid=result_uid(*key, "sr", "1"),
            series_number=SR_SERIES_NUMBER, instance_number=1,
            supersedes=[ji.predecessor_sr] if ji.predecessor_sr else (),
        ))
        _timed(timings, "validate", lambda: _validate("sr", sr, validate))
        _store_outputs(config, ji.job_id, [("sr", sr)], first=True)
        enqueue_export(config, ji.job_id)
        sc_series = result_uid(*key, "sc-series")
        overlays = []
        for i, (src, res) in enumerate(zip(sources, results, strict=True), start=1):
            sc = _timed(timings, "encode", lambda src=src, res=res, i=i: build_overlay_sc(
                src, res, model, series_instance_uid=sc_series,
                sop_instance_uid=result_uid(*key, "sc", str(i)),
                series_number=SC_SERIES_NUMBER, instance_number=i,
            ))
            _timed(timings, "validate", lambda sc=sc: _validate("sc", sc, validate))
            overlays.append(("sc", sc))
        _store_outputs(config, ji.job_id, overlays, first=False)
        with session_scope(config.database.url) as s:
            job = s.get(Job, ji.job_id)
            assert job is not None
            transition(job, JobState.ENCODED, model_version=model.version, timings={**job.timings, **timings})
        enqueue_export(config, ji.job_id)
    except PermanentError as e:
        _fail(config, job_id, e.stage, str(e))
    except Exception as e:
        if "out of memory" in str(e).lower():
            _requeue(config, job_id, str(e))
            raise TransientError(str(e)) from e
        # A bug must not leave the job "running" forever: fail it with the reason, keep the trace in the log.
        log.exception("job %d: unexpected error", job_id)
        _fail(config, job_id, "internal", f"{type(e).__name__}: {e}")


def _requeue(config: Config, job_id: int, why: str) -> None:
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is not None and job.state == JobState.RUNNING:
            transition(job, JobState.QUEUED, error=f"will retry: {why}"[:4000])


def _timed(timings: dict[str, float], stage: str, fn: Callable[[], T]) -> T:
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def _validate(kind: str, ds: Dataset, validate: Callable[[Dataset], list[str]]) -> None:
    problems = validate(ds)
    if problems:
        raise PermanentError("validate", f"{kind} failed validation: " + "; ".join(problems[:10]))


def _store_outputs(config: Config, job_id: int, objects: list[tuple[str, Dataset]], first: bool) -> None:
    """Write objects under the spool and record them with a pending send per destination.

    `first` marks the first batch of an attempt: what an interrupted earlier attempt wrote
    is replaced (same deterministic UIDs, so nothing new reaches the PACS twice).
    """
    from io import BytesIO

    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        if first:
            for old in list(job.outputs):
                for sd in list(old.sends):
                    s.delete(sd)
                s.delete(old)
            s.flush()
        index = len(job.outputs)
        for kind, ds in objects:
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            rel = output_relpath(job.id, kind, index)
            index += 1
            write_atomic(config.storage.path, rel, buf.getvalue())
            out = Output(job_id=job.id, kind=kind, sop_class_uid=str(ds.SOPClassUID),
                         sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                         path=rel)
            s.add(out)
            s.flush()
            for dest in config.destinations:
                s.add(Send(output_id=out.id, destination=dest.name, state=SendState.PENDING, attempts=0))


SEND_CLAIM_SECONDS = 600  # a claim older than this belongs to an export worker that died


def _claim_sends(config: Config, job_id: int) -> tuple[JobState | None, dict[str, list[tuple[int, Path]]]]:
    """Mark the job's unsent outputs as in flight for this task; return them by destination.

    The conditional UPDATE makes the claim atomic, so two export tasks for the same job (the
    SR's and the overlays') never send one object twice.
    """
    now = utcnow()
    stale = now - timedelta(seconds=SEND_CLAIM_SECONDS)
    claimable = or_(Send.state.in_((SendState.PENDING, SendState.FAILED)),
                    and_(Send.state == SendState.SENDING, Send.updated_at < stale))
    claimed: dict[str, list[tuple[int, Path]]] = {}
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in (JobState.RUNNING, JobState.ENCODED, JobState.SENDING):
            return (job.state if job else None), {}
        if job.state == JobState.ENCODED:
            transition(job, JobState.SENDING)
        for out in job.outputs:
            for sd in out.sends:
                res = s.execute(update(Send).where(Send.id == sd.id, claimable)
                                .values(state=SendState.SENDING, updated_at=now)
                                .execution_options(synchronize_session=False))
                if res.rowcount == 1:  # type: ignore[attr-defined]
                    claimed.setdefault(sd.destination, []).append((sd.id, resolve(config.storage.path, out.path)))
        return job.state, claimed


def run_export(config: Config, job_id: int) -> None:
    """Send the job's unsent outputs to each destination; raise RetryableExportError if some failed.

    Runs for a job still encoding (its SR is out before its overlays are drawn) and once more
    when all outputs are written; the job is done when every output reached every destination.
    """
    state, claimed = _claim_sends(config, job_id)
    if state is None or (not claimed and state == JobState.RUNNING):
        log.info("job %d: nothing to send (%s)", job_id, state.value if state else "gone")
        return
    t0 = time.perf_counter()
    failures = []
    dests = {d.name: d for d in config.destinations}
    for name, items in claimed.items():
        dest = dests.get(name)
        outcomes: list[SendOutcome] | None = None
        if dest is None:
            failures.append(f"{name}: destination no longer configured")
        else:
            try:
                outcomes = send_files(dest, [p for _, p in items], config.export.calling_ae_title)
            except (DestinationUnavailable, OSError) as e:
                failures.append(f"{name}: {e}")
        with session_scope(config.database.url) as s:
            for i, (send_id, _) in enumerate(items):
                sd = s.get(Send, send_id)
                assert sd is not None
                sd.attempts += 1
                sd.updated_at = utcnow()
                if outcomes is None:
                    sd.state, sd.error = SendState.FAILED, failures[-1]
                    continue
                o = outcomes[i]
                sd.remote_status, sd.error = o.status, o.error
                sd.state = SendState.SENT if o.ok else SendState.FAILED
                if o.ok:
                    sd.sent_at = o.at
                else:
                    failures.append(f"{name}: {o.error}")
    elapsed = time.perf_counter() - t0
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.timings = {**job.timings, "send": round(job.timings.get("send", 0.0) + elapsed, 4)}
        if failures:
            job.error, job.error_stage = "; ".join(failures)[:4000], "send"
            job.updated_at = utcnow()
            raise RetryableExportError(job.error)
        unsent = s.scalar(select(func.count()).select_from(Send).join(Output)
                          .where(Output.job_id == job_id, Send.state != SendState.SENT))
        # Whoever sends the last object closes the job; a job still encoding stays running.
        if job.state == JobState.SENDING and not unsent:
            transition(job, JobState.DONE, error=None, error_stage=None)
            if job.supersedes is not None and job.supersedes.state == JobState.DONE:
                transition(job.supersedes, JobState.SUPERSEDED)


def fail_export(config: Config, job_id: int, message: str) -> None:
    _fail(config, job_id, "send", message)
