"""What a worker does with a job id: run the pipeline, encode results, send them.

The Celery tasks in node/tasks.py are thin wrappers around `run_inference` and `run_export`,
which are plain functions (tested as such). Models are loaded once per process.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pydicom
from pydicom import Dataset
from sqlalchemy import select

from node.config import Config
from node.db.models import Instance, Job, JobState, Output, Send, SendState, utcnow
from node.db.session import session_scope
from node.export import DestinationUnavailable, send_files
from node.jobs import TransitionError, abandoned, transition
from node.spool import output_relpath, resolve, write_atomic

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
        # Row lock: two deliveries of one job (a re-sent message) must not both claim it.
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise PermanentError("queue", f"job {job_id} does not exist")
        if job.state not in (JobState.QUEUED, JobState.RUNNING):
            log.info("job %d is %s: nothing to do", job_id, job.state.value)
            return None
        if job.state == JobState.RUNNING:
            if not abandoned(job, config):
                log.info("job %d is running on %s, which is alive: duplicate delivery ignored", job_id, job.worker)
                return None
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


def run_inference(config: Config, job_id: int, worker: str) -> bool:
    """Run the job's pipeline and write its result objects; return True when export should follow."""
    from node.writers.sc import build_overlay_sc
    from node.writers.sr import build_comprehensive_3d_sr
    from node.writers.uids import result_uid
    from node.writers.validate import validate
    from pipelines.base import InputError

    try:
        ji = _start(config, job_id, worker)
    except TransitionError as e:
        log.warning("%s", e)
        return False
    if ji is None:
        return False
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

        t0 = time.perf_counter()
        # Same sources and model -> same UIDs, so a re-run never gives the PACS duplicates.
        key = (ji.study_uid, ji.pipeline, model.version, model.device_uid, *ji.content_keys)
        sr = build_comprehensive_3d_sr(
            sources, results, model,
            series_instance_uid=result_uid(*key, "sr-series"),
            sop_instance_uid=result_uid(*key, "sr", "1"),
            series_number=SR_SERIES_NUMBER, instance_number=1,
            supersedes=[ji.predecessor_sr] if ji.predecessor_sr else (),
        )
        objects: list[tuple[str, Dataset]] = [("sr", sr)]
        sc_series = result_uid(*key, "sc-series")
        for i, (src, res) in enumerate(zip(sources, results, strict=True), start=1):
            objects.append(("sc", build_overlay_sc(
                src, res, model, series_instance_uid=sc_series,
                sop_instance_uid=result_uid(*key, "sc", str(i)),
                series_number=SC_SERIES_NUMBER, instance_number=i,
            )))
        timings["encode"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for kind, ds in objects:
            problems = validate(ds)
            if problems:
                raise PermanentError("validate", f"{kind} failed validation: " + "; ".join(problems[:10]))
        timings["validate"] = time.perf_counter() - t0
        _store_outputs(config, ji, objects, model.version, timings)
    except PermanentError as e:
        _fail(config, job_id, e.stage, str(e))
        return False
    except Exception as e:
        if "out of memory" in str(e).lower():
            _requeue(config, job_id, str(e))
            raise TransientError(str(e)) from e
        # A bug must not leave the job "running" forever: fail it with the reason, keep the trace in the log.
        log.exception("job %d: unexpected error", job_id)
        _fail(config, job_id, "internal", f"{type(e).__name__}: {e}")
        return False
    return True


def _requeue(config: Config, job_id: int, why: str) -> None:
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is not None and job.state == JobState.RUNNING:
            transition(job, JobState.QUEUED, error=f"will retry: {why}"[:4000])


def _store_outputs(config: Config, ji: JobInput, objects: list[tuple[str, Dataset]], version: str,
                   timings: dict[str, float]) -> None:
    from io import BytesIO

    written = []
    for index, (kind, ds) in enumerate(objects):
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        rel = output_relpath(ji.job_id, kind, index)
        write_atomic(config.storage.path, rel, buf.getvalue())
        written.append((kind, ds, rel))
    with session_scope(config.database.url) as s:
        job = s.get(Job, ji.job_id)
        assert job is not None
        for old in list(job.outputs):  # a re-run replaces what an interrupted attempt wrote
            for sd in list(old.sends):
                s.delete(sd)
            s.delete(old)
        s.flush()
        for kind, ds, rel in written:
            out = Output(job_id=job.id, kind=kind, sop_class_uid=str(ds.SOPClassUID),
                         sop_instance_uid=str(ds.SOPInstanceUID), series_instance_uid=str(ds.SeriesInstanceUID),
                         path=rel)
            s.add(out)
            s.flush()
            for dest in config.destinations:
                s.add(Send(output_id=out.id, destination=dest.name, state=SendState.PENDING, attempts=0))
        transition(job, JobState.ENCODED, model_version=version, timings={**job.timings, **timings})


def run_export(config: Config, job_id: int) -> None:
    """Send every pending output of the job to each destination; raise RetryableExportError if some failed."""
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in (JobState.ENCODED, JobState.SENDING):
            log.info("job %d is %s: nothing to send", job_id, job.state.value if job else "gone")
            return
        if job.state == JobState.ENCODED:
            transition(job, JobState.SENDING)
        pending: dict[str, list[tuple[int, Path]]] = {}
        for out in job.outputs:
            for sd in out.sends:
                if sd.state != SendState.SENT:
                    pending.setdefault(sd.destination, []).append((sd.id, resolve(config.storage.path, out.path)))
    t0 = time.perf_counter()
    failures = []
    dests = {d.name: d for d in config.destinations}
    for name, items in pending.items():
        dest = dests.get(name)
        if dest is None:
            failures.append(f"{name}: destination no longer configured")
            continue
        try:
            outcomes = send_files(dest, [p for _, p in items], config.export.calling_ae_title)
        except (DestinationUnavailable, OSError) as e:
            outcomes = None
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
                    sd.sent_at = utcnow()
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
        transition(job, JobState.DONE, error=None, error_stage=None)
        if job.supersedes is not None and job.supersedes.state == JobState.DONE:
            transition(job.supersedes, JobState.SUPERSEDED)


def fail_export(config: Config, job_id: int, message: str) -> None:
    """Fail a job whose results could not be sent within the retry schedule."""
    _fail(config, job_id, "send", message)


def fail_job(config: Config, job_id: int, stage: str, message: str) -> None:
    """Fail a job at `stage` (e.g. transient errors that outlasted the retry schedule)."""
    _fail(config, job_id, stage, message)
