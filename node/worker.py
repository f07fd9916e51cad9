"""What a worker does with a job id: run the pipeline, encode results, send them.

The Celery tasks in node/tasks.py are thin wrappers around `run_inference` and `run_export`,
which are plain functions (tested as such). Models are loaded once per process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cache, partial
from pathlib import Path
from typing import TypeVar

import pydicom
from pydicom import Dataset
from sqlalchemy import and_, func, or_, select, update

from node import metrics
from node.config import Config, Destination
from node.db.models import Instance, Job, JobState, Output, Send, SendState, utcnow
from node.db.session import session_scope
from node.export import DestinationUnavailable, ObjectRef, SendOutcome, confirm_held, send_files
from node.jobs import TransitionError, abandoned, transition
from node.queue import enqueue_export
from node.spool import output_relpath, resolve, write_atomic
from pipelines.base import ModelInfo, PipelineResult

T = TypeVar("T")

log = logging.getLogger(__name__)

SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
SEG_SERIES_NUMBER = 9903
GSPS_SERIES_NUMBER = 9904


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
    destinations: list[str] | None  # from routing; None: every configured destination
    objects: list[str] | None  # from routing; None: what each destination wants
    calling_ae: str | None


@cache
def get_pipeline(name: str, bundle: str, device: str, version: str | None = None):  # type: ignore[no-untyped-def]
    """Load a pipeline once per process (per bundle, device and pinned version)."""
    from pipelines.registry import load_pipeline

    return load_pipeline(name, Path(bundle), device, version)


def pipeline_for(config: Config, name: str):  # type: ignore[no-untyped-def]
    pc = config.pipelines[name]
    return get_pipeline(name, str(pc.bundle), pc.device, pc.version)


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
                        sorted(f"{i.sop_instance_uid}:{i.sha256}" for i in instances), predecessor,
                        job.destinations, job.objects, job.study.calling_ae)


def fail_job(config: Config, job_id: int, stage: str, message: str) -> None:
    """Fail a job at `stage` with the reason, unless it already ended."""
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is not None and job.state not in (JobState.FAILED, JobState.CANCELLED, JobState.DONE):
            transition(job, JobState.FAILED, error=message[:4000], error_stage=stage)
    log.error("job %d failed at %s: %s", job_id, stage, message)


class _Failed(Exception):
    """Raised by `_guard` after it has failed a job, to skip the rest of that job's work."""


@contextmanager
def _guard(config: Config, job_ids: Sequence[int]) -> Iterator[None]:
    """Map what goes wrong in a stage to the jobs it concerns: a permanent error or a bug fails
    them with the reason (never left "running"), GPU out of memory puts them back to queued."""
    try:
        yield
    except PermanentError as e:
        for job_id in job_ids:
            fail_job(config, job_id, e.stage, str(e))
        raise _Failed from e
    except Exception as e:
        if "out of memory" in str(e).lower():
            for job_id in job_ids:
                _requeue(config, job_id, str(e))
            raise TransientError(str(e)) from e
        log.exception("jobs %s: unexpected error", list(job_ids))
        for job_id in job_ids:
            fail_job(config, job_id, "internal", f"{type(e).__name__}: {e}")
        raise _Failed from e


def _claim_more(config: Config, worker: str, first: JobInput) -> list[JobInput]:
    """Other waiting jobs of the same pipeline, most urgent first, taken into this worker's batch.

    Only when the queue is deep: one forward pass over several studies costs less per image
    (DenseNet121 on CPU: 26 ms at batch 1, 17 ms at batch 8). Their own queue messages arrive
    later and are ignored, since the jobs are no longer queued.
    """
    limit = config.queue.batch_size - 1
    if limit <= 0:
        return []
    with session_scope(config.database.url) as s:
        ids = s.scalars(
            select(Job.id)
            .where(Job.state == JobState.QUEUED, Job.pipeline == first.pipeline, Job.id != first.job_id)
            .order_by(Job.priority.desc(), Job.id)
            .limit(limit)
        ).all()
    taken = []
    for job_id in ids:
        try:
            ji = _start(config, job_id, worker)  # re-checks under a row lock: another worker may win
        except (TransitionError, PermanentError):
            continue
        if ji is not None:
            taken.append(ji)
    return taken


def run_inference(config: Config, job_id: int, worker: str) -> None:
    metrics.setup(config)
    """Run the job's pipeline (batched with other waiting jobs when the queue is deep), write
    each job's result objects and queue their export as each is ready."""
    from pipelines.base import InputError

    try:
        first = _start(config, job_id, worker)
    except TransitionError as e:
        log.warning("%s", e)
        return
    if first is None:
        return
    batch = [first, *_claim_more(config, worker, first)]
    if len(batch) > 1:
        log.info("job %d: %d waiting jobs in one forward pass", job_id, len(batch))
    prepared: list[tuple[JobInput, list[Dataset], dict[str, float]]] = []
    for ji in batch:
        timings: dict[str, float] = {}
        try:
            with _guard(config, [ji.job_id]):
                t0 = time.perf_counter()
                try:
                    sources: list[Dataset] = [pydicom.dcmread(p) for p in ji.paths]
                except (OSError, pydicom.errors.InvalidDicomError) as e:
                    raise PermanentError("read", f"cannot read source instance: {e}") from e
                timings["read"] = time.perf_counter() - t0
                metrics.stage_seconds("decode", timings["read"])
                prepared.append((ji, sources, timings))
        except _Failed:
            continue
    if not prepared:
        return
    try:
        with _guard(config, [ji.job_id for ji, _, _ in prepared]):
            pipeline = pipeline_for(config, first.pipeline)
    except _Failed:
        return
    groups: list[tuple[JobInput, list[Dataset], dict[str, float], list[PipelineResult]]] = []
    batch_failed = len(prepared) == 1  # a single job goes straight to the per-job path below
    if not batch_failed:
        try:
            with _guard(config, [ji.job_id for ji, _, _ in prepared]):
                t0 = time.perf_counter()
                try:
                    results = pipeline.run([ds for _, sources, _ in prepared for ds in sources])
                except InputError:
                    # One undecodable image must not fail the other studies: run them apart.
                    batch_failed = True
                else:
                    share = (time.perf_counter() - t0) / len(results)
                    start = 0
                    for ji, sources, timings in prepared:
                        groups.append((ji, sources, timings, results[start:start + len(sources)]))
                        start += len(sources)
                        timings["pipeline"] = share * len(sources)
        except _Failed:
            return
    if batch_failed:
        for ji, sources, timings in prepared:
            try:
                with _guard(config, [ji.job_id]):
                    t0 = time.perf_counter()
                    try:
                        mine = pipeline.run(sources)
                    except InputError as e:
                        raise PermanentError("decode", str(e)) from e
                    timings["pipeline"] = time.perf_counter() - t0
                    metrics.stage_seconds("inference", timings["pipeline"])
                    groups.append((ji, sources, timings, mine))
            except _Failed:
                continue
    for ji, sources, timings, mine in groups:
        stages = ("decode", "segmentation", "classification", "heatmap", "detection")
        for k in (k for k in stages if any(k in r.timings for r in mine)):  # detection: only with a detector
            timings[k] = sum(r.timings.get(k, 0.0) for r in mine)
        try:
            with _guard(config, [ji.job_id]):
                _encode(config, ji, sources, mine, pipeline.model, timings)
        except _Failed:
            continue


def _encode(config: Config, ji: JobInput, sources: list[Dataset], results: list[PipelineResult],
            model: ModelInfo, timings: dict[str, float]) -> None:
    """Build, validate and store the job's result objects (SR first, queued for export at once)."""
    from node.writers.gsps import build_presentation_state
    from node.writers.sc import build_overlay_sc
    from node.writers.seg import build_segmentation
    from node.writers.sr import build_comprehensive_3d_sr
    from node.writers.uids import result_uid
    from node.writers.validate import validate

    try:
        dests = config.destinations_for(ji.destinations, ji.calling_ae)
    except ValueError as e:
        raise PermanentError("route", str(e)) from e
    # Only what some of the job's destinations wants (and the routing rules allow) is built.
    kinds = config.object_kinds(dests, ji.objects)
    per_image: dict[str, tuple[Callable[..., Dataset], int]] = {
        "sc": (build_overlay_sc, SC_SERIES_NUMBER), "seg": (build_segmentation, SEG_SERIES_NUMBER),
        "gsps": (build_presentation_state, GSPS_SERIES_NUMBER),
    }
    # Same sources and model -> same UIDs, so a re-run never gives the PACS duplicates; and the
    # same times (those of the job a replay redoes), so a replay writes the same bytes.
    key = (ji.study_uid, ji.pipeline, model.version, model.device_uid, *ji.content_keys)
    when = _content_datetime(config, ji.job_id)
    sr_uid = result_uid(*key, "sr", "1")
    # The SR goes out first, while the other objects are still being drawn: it is what the
    # radiologist's worklist waits for. Each object is validated before it is written.
    first = True
    if "sr" in kinds:
        sr = _build(timings, "sr", lambda: build_comprehensive_3d_sr(
            sources, results, model,
            series_instance_uid=result_uid(*key, "sr-series"),
            sop_instance_uid=sr_uid,
            series_number=SR_SERIES_NUMBER, instance_number=1, content_datetime=when,
            # a replay supersedes the job it redoes, whose SR has this SR's UID: not a predecessor
            supersedes=[ji.predecessor_sr] if ji.predecessor_sr and ji.predecessor_sr[2] != sr_uid else (),
        ))
        _validate(timings, "sr", sr, validate)
        _store_outputs(config, ji.job_id, [("sr", sr)], dests, first=True)
        enqueue_export(config, ji.job_id)
        first = False
    others: list[tuple[str, Dataset]] = []
    for kind in (k for k in kinds if k in per_image):
        builder, series_number = per_image[kind]
        series_uid = result_uid(*key, f"{kind}-series")
        for i, (src, res) in enumerate(zip(sources, results, strict=True), start=1):
            if kind == "seg" and not any(mask.any() for mask in res.regions.values()):
                # An empty SEG carries nothing; the SR and GSPS still say what was found.
                log.warning("job %d: no region found in image %d: no SEG for it", ji.job_id, i)
                continue
            obj = _build(timings, kind, partial(
                builder, src, res, model, series_instance_uid=series_uid,
                sop_instance_uid=result_uid(*key, kind, str(i)),
                series_number=series_number, instance_number=i, content_datetime=when,
            ))
            _validate(timings, kind, obj, validate)
            others.append((kind, obj))
    _store_outputs(config, ji.job_id, others, dests, first=first)
    with session_scope(config.database.url) as s:
        job = s.get(Job, ji.job_id)
        assert job is not None
        transition(job, JobState.ENCODED, model_version=model.version, timings={**job.timings, **timings})
    enqueue_export(config, ji.job_id)


def _content_datetime(config: Config, job_id: int) -> datetime:
    """Content date/time of a job's objects: when the first job of its replay chain was created
    (local time, as DICOM dates and times without an offset are)."""
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        while job is not None and job.replay_of is not None:
            job = s.get(Job, job.replay_of)
        if job is None:
            raise PermanentError("encode", f"job {job_id} or the job it replays no longer exists")
        created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=UTC)
        return created.astimezone().replace(tzinfo=None)


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
        metrics.stage_seconds(stage, time.perf_counter() - t0)


def _build(timings: dict[str, float], kind: str, fn: Callable[[], Dataset]) -> Dataset:
    """Build one object, timed under encode and encode_<kind>; a refused input fails the job."""
    t0 = time.perf_counter()
    try:
        return _timed(timings, "encode", fn)
    except ValueError as e:  # the writers' input checks (highdicom's included) raise ValueError
        raise PermanentError("encode", f"{kind} cannot be built: {e}") from e
    finally:
        timings[f"encode_{kind}"] = timings.get(f"encode_{kind}", 0.0) + time.perf_counter() - t0


def _validate(timings: dict[str, float], kind: str, ds: Dataset, validate: Callable[[Dataset], list[str]]) -> None:
    """Run the validation gate on one object (timed); any error fails the job with its message."""
    t0 = time.perf_counter()
    problems = _timed(timings, "validate", lambda: validate(ds))
    timings[f"validate_{kind}"] = timings.get(f"validate_{kind}", 0.0) + time.perf_counter() - t0
    if problems:
        raise PermanentError("validate", f"{kind} failed validation: " + "; ".join(problems[:10]))


def _store_outputs(config: Config, job_id: int, objects: list[tuple[str, Dataset]],
                   destinations: Sequence[Destination], first: bool) -> None:
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
            for dest in (d for d in destinations if kind in d.wants(config.export)):
                s.add(Send(output_id=out.id, destination=dest.name, state=SendState.PENDING, attempts=0))


SEND_CLAIM_SECONDS = 600  # a claim older than this belongs to an export worker that died


@dataclass(frozen=True)
class _Claim:
    send_id: int
    path: Path
    ref: ObjectRef
    confirm_only: bool  # already stored there: only its read-back is due


def _claim_sends(config: Config, job_id: int) -> tuple[JobState | None, dict[str, list[_Claim]]]:
    """Mark the job's unsent (or unconfirmed) outputs as in flight for this task; return them by destination.

    The conditional UPDATEs make each claim atomic, so two export tasks for the same job (the
    SR's and the others') never send or confirm one object twice.
    """
    now = utcnow()
    stale = now - timedelta(seconds=SEND_CLAIM_SECONDS)
    claimable = or_(Send.state.in_((SendState.PENDING, SendState.FAILED)),
                    and_(Send.state == SendState.SENDING, Send.updated_at < stale))
    claimed: dict[str, list[_Claim]] = {}
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in (JobState.RUNNING, JobState.ENCODED, JobState.SENDING):
            return (job.state if job else None), {}
        if job.state == JobState.ENCODED:
            transition(job, JobState.SENDING)
        for out in job.outputs:
            ref = ObjectRef(job.study.study_instance_uid, out.series_instance_uid, out.sop_instance_uid)
            for sd in out.sends:
                for condition, confirm_only in ((Send.state == SendState.STORED, True), (claimable, False)):
                    res = s.execute(update(Send).where(Send.id == sd.id, condition)
                                    .values(state=SendState.SENDING, updated_at=now)
                                    .execution_options(synchronize_session=False))
                    if res.rowcount == 1:  # type: ignore[attr-defined]
                        path = resolve(config.storage.path, out.path)
                        claimed.setdefault(sd.destination, []).append(_Claim(sd.id, path, ref, confirm_only))
                        break
        return job.state, claimed


def _export_to(config: Config, dest: Destination, items: list[_Claim]) -> list[str]:
    """Send (and read back, where dest confirms) the claimed items; record each Send; return failures."""
    failures: list[str] = []
    to_send = [c for c in items if not c.confirm_only]
    outcomes: dict[int, SendOutcome] = {}
    unavailable: str | None = None
    if to_send:
        try:
            sent = send_files(dest, [c.path for c in to_send], config.export.calling_ae_title)
            outcomes = {c.send_id: o for c, o in zip(to_send, sent, strict=True)}
        except (DestinationUnavailable, OSError) as e:
            unavailable = f"{dest.name}: {e}"
            failures.append(unavailable)
    stored = [c for c in items if c.confirm_only or (c.send_id in outcomes and outcomes[c.send_id].ok)]
    missing: dict[str, str | None] = {}
    if dest.confirm != "none" and stored:
        try:
            missing = confirm_held(dest, [c.ref for c in stored], config.export.calling_ae_title)
        except (DestinationUnavailable, OSError) as e:
            missing = {c.ref.sop_uid: f"read-back failed: {e}" for c in stored}
    with session_scope(config.database.url) as s:
        for c in items:
            sd = s.get(Send, c.send_id)
            assert sd is not None
            sd.updated_at = utcnow()
            if not c.confirm_only:
                sd.attempts += 1
                o = outcomes.get(c.send_id)
                if o is None:
                    sd.state, sd.error = SendState.FAILED, unavailable
                    continue
                sd.remote_status, sd.error = o.status, o.error
                if not o.ok:
                    sd.state = SendState.FAILED
                    failures.append(f"{dest.name}: {o.error}")
                    continue
                sd.sent_at = o.at
            if dest.confirm == "none":
                sd.state = SendState.SENT
            elif missing.get(c.ref.sop_uid) is None:
                sd.state, sd.confirmed_at, sd.error = SendState.SENT, utcnow(), None
            else:
                # Stored but not (yet) found: the next attempt only asks again, it does not resend.
                sd.state, sd.error = SendState.STORED, f"not confirmed: {missing[c.ref.sop_uid]}"
                failures.append(f"{dest.name}: {sd.error}")
    return failures


def run_export(config: Config, job_id: int) -> None:
    """Send the job's unsent outputs to each destination; raise RetryableExportError if some failed.

    Runs for a job still encoding (its SR is out before the other objects are drawn) and once
    more when all outputs are written; the job is done when every output reached every
    destination that wants it, and was read back where the destination confirms.
    """
    metrics.setup(config)
    state, claimed = _claim_sends(config, job_id)
    if state is None or (not claimed and state == JobState.RUNNING):
        log.info("job %d: nothing to send (%s)", job_id, state.value if state else "gone")
        return
    t0 = time.perf_counter()
    failures = []
    dests = {d.name: d for d in config.destinations}
    for name, items in claimed.items():
        dest = dests.get(name)
        if dest is not None:
            failures += _export_to(config, dest, items)
            continue
        failures.append(f"{name}: destination no longer configured")
        with session_scope(config.database.url) as s:
            for c in items:
                sd = s.get(Send, c.send_id)
                assert sd is not None
                sd.state, sd.error, sd.updated_at = SendState.FAILED, failures[-1], utcnow()
    elapsed = time.perf_counter() - t0
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.execute(update(Job).where(Job.id == job_id).values(send_seconds=Job.send_seconds + elapsed))
        if failures:
            # Recorded and committed here, raised after: a raise inside session_scope would roll
            # back the reason, the stage and the send time, and the operator would see nothing.
            job.error, job.error_stage = "; ".join(failures)[:4000], "send"
            job.updated_at = utcnow()
            error = job.error
        else:
            error = None
            unsent = s.scalar(select(func.count()).select_from(Send).join(Output)
                              .where(Output.job_id == job_id, Send.state != SendState.SENT))
            # Whoever sends the last object closes the job; a job still encoding stays running.
            if job.state == JobState.SENDING and not unsent:
                transition(job, JobState.DONE, error=None, error_stage=None)
                if job.supersedes is not None and job.supersedes.state == JobState.DONE:
                    transition(job.supersedes, JobState.SUPERSEDED)
    if error is not None:
        raise RetryableExportError(error)
