"""Inference: what an inference worker does with a job id.

Claim the job (and, when the queue is deep, other waiting jobs of the same pipeline), read its
source instances, run the pipeline, build and validate the result objects, store them with a
pending send per destination, and queue their export (the SR first, while the others are
still being drawn). Models are loaded once per process. The Celery task in node/tasks.py is a
thin wrapper around `run_inference`, a plain function (tested as such).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pydicom
from pydicom import Dataset
from sqlalchemy import select

from node import metrics
from node.config import Config, Destination
from node.db.models import Instance, Job, JobState, Output, Send, SendState
from node.db.session import session_scope
from node.engine import model_outputs, revisions
from node.engine.errors import PermanentError, Stage, TransientError
from node.export import ObjectRef
from node.jobs import TransitionError, abandoned, claim, fail_job, requeue, transition
from node.queue import enqueue_export
from node.spool import output_relpath, resolve, sha256_hex, write_atomic
from pipelines.base import ModelInfo, ModelOutputs, Pipeline, PipelineResult

T = TypeVar("T")

if TYPE_CHECKING:  # for annotations only: the writers are imported where they are used
    from node.writers.validate import Judging

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobInput:
    """What a claimed job needs from the database, read once under its row lock."""

    job_id: int
    study_uid: str
    pipeline: str
    paths: list[Path]
    content_keys: list[str]  # "<sop uid>:<sha256>" of each source: re-sent content gets new results
    source_keys: list[str]  # the same, in the order of `paths`
    # The SRs of the jobs this one supersedes, nearest first, up to the first whose UID differs
    # from the nearest's: its SR replaces the nearest, or (a replay, which has the nearest's UID)
    # what that one replaced
    superseded_srs: tuple[ObjectRef, ...]
    destinations: list[str] | None  # from routing; None: every configured destination
    objects: list[str] | None  # from routing; None: what each destination wants
    calling_ae: str | None
    attempt: int  # 1 on a job's first run: only a later attempt can find its own earlier outputs


@dataclass(eq=False)  # compared by identity: `in` on a batch's lists must not compare data sets
class Work:
    """One job of a batch on its way through the worker."""

    job: JobInput
    sources: list[Dataset]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per Stage value
    results: list[PipelineResult] = field(default_factory=list)  # one per source


@dataclass(frozen=True)
class Built:
    """A result object that passed the validation gate, with the checks that ran on it."""

    kind: str
    dataset: Dataset
    checks: tuple[str, ...]
    data: bytes  # the file the gate judged: stored and sent as it is, never encoded again

    @property
    def uid(self) -> str:
        """Its SOP Instance UID."""
        return str(self.dataset.SOPInstanceUID)

    @cached_property
    def sha256(self) -> str:
        """Of its bytes: recorded with it, compared with earlier outputs under its UID (once: an SC is 11 MB)."""
        return sha256_hex(self.data)


@cache
def get_pipeline(name: str, bundle: str, device: str, version: str | None = None,
                 implementation: str | None = None) -> Pipeline:
    """Load a pipeline once per process (per id, bundle, device, pinned version and code)."""
    from pipelines.registry import load_pipeline

    return load_pipeline(name, Path(bundle), device, version, implementation)


def pipeline_for(config: Config, name: str) -> Pipeline:
    """The loaded pipeline `name` of the config (pipelines.<name>)."""
    pc = config.pipelines.get(name)
    if pc is None:
        raise PermanentError(Stage.INFERENCE, f"pipeline {name!r} is no longer configured")
    return get_pipeline(name, str(pc.bundle), pc.device, pc.version, pc.implementation)


def _start(config: Config, job_id: int, worker: str) -> JobInput | None:
    """Claim a queued job (or one whose worker died) for `worker`; None when there is nothing to do."""
    with session_scope(config.database.url) as s:
        # Row lock (PostgreSQL): two deliveries of one job (a re-sent message) must not both claim it.
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            log.error("job %d does not exist: message ignored", job_id)
            return None
        if job.state not in (JobState.QUEUED, JobState.RUNNING):
            log.info("job %d is %s: nothing to do", job_id, job.state.value)
            return None
        if job.state == JobState.RUNNING:
            if not abandoned(job, config):
                log.info("job %d is running on %s, which is alive: duplicate delivery ignored", job_id, job.worker)
                return None
            log.warning("job %d was running on %s, which stopped: running it again", job_id, job.worker)
            if not claim(s, job, JobState.QUEUED):
                log.info("job %d: another worker took it over first", job_id)
                return None
        # A claim, not a plain transition: another worker's batch (`_claim_more`) may have read
        # this job queued at the same moment; only one of the two may run it.
        if not claim(s, job, JobState.RUNNING, attempt=job.attempt + 1, worker=worker, error=None, error_stage=None):
            log.info("job %d: claimed by another worker first", job_id)
            return None
        instances = s.scalars(select(Instance).where(Instance.id.in_(job.instance_ids)).order_by(Instance.id)).all()
        keys = [f"{i.sop_instance_uid}:{i.sha256}" for i in instances]
        return JobInput(job_id, job.study.study_instance_uid, job.pipeline,
                        [resolve(config.storage.path, i.path) for i in instances], sorted(keys), keys,
                        _superseded_srs(job), job.destinations, job.objects, job.study.calling_ae, job.attempt)


def _superseded_srs(job: Job) -> tuple[ObjectRef, ...]:
    """JobInput.superseded_srs: down the job's chain of superseded jobs."""
    found: list[ObjectRef] = []
    seen = {job.id}
    older = job.supersedes
    while older is not None and older.id not in seen and len({r.sop_uid for r in found}) < 2:
        seen.add(older.id)
        sr = next((o for o in older.outputs if o.kind == "sr"), None)
        if sr is not None:
            found.append(ObjectRef(job.study.study_instance_uid, sr.series_instance_uid, sr.sop_instance_uid,
                                   sr.sop_class_uid))
        older = older.supersedes
    return tuple(found)


class _Failed(Exception):
    """Raised by `_guard` after it has failed a job, to skip the rest of that job's work."""


@contextmanager
def _guard(config: Config, job_ids: Sequence[int], stage: Stage) -> Iterator[None]:
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
                requeue(config, job_id, str(e))
            raise TransientError(stage, str(e)) from e
        log.exception("jobs %s: unexpected error at %s", list(job_ids), stage.value)
        for job_id in job_ids:
            fail_job(config, job_id, stage, f"unexpected {type(e).__name__}: {e}")
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
        except TransitionError:
            continue
        if ji is not None:
            taken.append(ji)
    return taken


def run_inference(config: Config, job_id: int, worker: str) -> None:
    """Run the job's pipeline (batched with other waiting jobs when the queue is deep), write
    each job's result objects and queue their export as each is ready."""
    metrics.setup(config)
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
    work = [w for w in (_read(config, ji) for ji in batch) if w is not None]
    if not work:
        return
    try:
        with _guard(config, [w.job.job_id for w in work], Stage.INFERENCE):
            pipeline = pipeline_for(config, first.pipeline)
    except _Failed:
        return
    for w in _infer(config, pipeline, work):
        try:
            with _guard(config, [w.job.job_id], Stage.ENCODE):
                _encode(config, w.job, w.sources, w.results, pipeline.model, w.timings)
        except _Failed:
            continue


def _read(config: Config, ji: JobInput) -> Work | None:
    """The job's source instances, read from the spool (None: the job failed at stage read)."""
    timings: dict[str, float] = {}
    try:
        with _guard(config, [ji.job_id], Stage.READ):
            try:
                sources: list[Dataset] = _timed(timings, Stage.READ, lambda: [pydicom.dcmread(p) for p in ji.paths])
            except (OSError, pydicom.errors.InvalidDicomError) as e:
                raise PermanentError(Stage.READ, f"cannot read source instance: {e}") from e
    except _Failed:
        return None
    return Work(ji, sources, timings)


def _infer(config: Config, pipeline: Pipeline, work: list[Work]) -> list[Work]:
    """Each job's results, from the model outputs kept for its sources when every source has
    some (a replay, a later attempt: the same bytes as before), else from one forward pass over
    the rest of the batch, whose outputs are then kept. Return the jobs that have their results."""
    from node.engine.cores import set_threads_for_next_pass

    keys = {w: [model_outputs.key(pipeline.id, pipeline.model, k) for k in w.job.source_keys] for w in work}
    try:
        with _guard(config, [w.job.job_id for w in work], Stage.INFERENCE):
            saved = model_outputs.load(config, (k for w in work for k in keys[w]))
    except _Failed:
        return []
    again = [w for w in work if all(k in saved for k in keys[w])]
    for w in again:
        log.info("job %d: drawn from the model outputs kept for its sources (the networks do not run again)",
                 w.job.job_id)
    fresh = [w for w in work if w not in again]
    if fresh:
        set_threads_for_next_pass()
    ran = _run_networks(config, pipeline, fresh)
    done: list[Work] = []
    if ran:
        computed = {w: {k: (source.split(":", 1)[0], r.outputs)
                        for k, source, r in zip(keys[w], w.job.source_keys, w.results, strict=True)}
                    for w in ran}  # fmt: skip
        try:  # one transaction for the batch
            with _guard(config, [w.job.job_id for w in ran], Stage.INFERENCE):
                t0 = time.perf_counter()
                kept = model_outputs.keep(config, pipeline.id, pipeline.model,
                                          {k: v for c in computed.values() for k, v in c.items()})
                for w in ran:  # the node's work, not the models'
                    _record(w.timings, "keep_outputs", (time.perf_counter() - t0) / len(ran))
        except _Failed:
            ran = []
        for w in ran:
            if all(model_outputs.same(kept[k], out) for k, (_, out) in computed[w].items()):
                done.append(w)
            else:  # another worker kept this content's outputs first: draw from those, as it did
                log.info("job %d: another run kept model outputs for these sources first: drawing from those",
                         w.job.job_id)
                saved.update(kept)
                again.append(w)
    for w in again:
        try:
            with _guard(config, [w.job.job_id], Stage.INFERENCE):
                w.results = _timed(w.timings, Stage.INFERENCE,
                                   lambda: _run_job(pipeline, w.sources, [saved[k] for k in keys[w]]))  # noqa: B023
        except _Failed:
            continue
        done.append(w)
    return [_pipeline_timings(w) for w in work if w in done]


def _run_job(pipeline: Pipeline, sources: list[Dataset], saved: list[ModelOutputs] | None = None) -> list[PipelineResult]:
    """pipeline.run on one job's sources; an undecodable image fails the job at stage decode."""
    from pipelines.base import InputError

    try:
        return pipeline.run(sources, saved=saved)
    except InputError as e:
        raise PermanentError(Stage.DECODE, str(e)) from e


def _run_networks(config: Config, pipeline: Pipeline, work: list[Work]) -> list[Work]:
    """Run the pipeline over the batch in one pass; if one image is undecodable, run each job
    apart so only its own job fails. Return the jobs that have their results."""
    from pipelines.base import InputError

    if len(work) > 1:
        try:
            with _guard(config, [w.job.job_id for w in work], Stage.INFERENCE):
                t0 = time.perf_counter()
                try:
                    results = pipeline.run([ds for w in work for ds in w.sources])
                except InputError:
                    # One undecodable image must not fail the other studies: run them apart below.
                    results = None
                if results is not None:
                    share = (time.perf_counter() - t0) / len(results)
                    start = 0
                    for w in work:
                        w.results = results[start:start + len(w.sources)]
                        start += len(w.sources)
                        _stage(w.timings, Stage.INFERENCE, share * len(w.sources))
        except _Failed:
            return []
        if results is not None:
            return work
    done = []
    for w in work:
        try:
            with _guard(config, [w.job.job_id], Stage.INFERENCE):
                w.results = _timed(w.timings, Stage.INFERENCE, lambda: _run_job(pipeline, w.sources))  # noqa: B023
        except _Failed:
            continue
        done.append(w)
    return done


def _pipeline_timings(w: Work) -> Work:
    """Add the pipeline's own per-image stage times, summed over the job's images, as
    `inference_<stage>` (as the pipeline names them)."""
    for r in w.results:
        for name, seconds in r.timings.items():
            key = f"{Stage.INFERENCE}_{name}"
            w.timings[key] = w.timings.get(key, 0.0) + seconds
    return w


def _encode(config: Config, ji: JobInput, sources: list[Dataset], results: list[PipelineResult],
            model: ModelInfo, timings: dict[str, float]) -> None:
    """Build, validate and store the job's result objects (SR first, queued for export at once)."""
    from node.writers.gsps import build_presentation_state
    from node.writers.sc import build_overlay_sc
    from node.writers.seg import build_segmentation, segmented_regions
    from node.writers.sr import build_comprehensive_3d_sr
    from node.writers.uids import result_uid

    try:
        dests = config.destinations_for(ji.destinations, ji.calling_ae)
    except ValueError as e:
        raise PermanentError(Stage.ROUTE, str(e)) from e
    # Only what some of the job's destinations wants (and the routing rules allow) is built.
    kinds = config.object_kinds(dests, ji.objects)
    numbers = config.pipelines[ji.pipeline].series_numbers()
    per_image: dict[str, Callable[..., Dataset]] = {
        "sc": build_overlay_sc, "seg": build_segmentation, "gsps": build_presentation_state,
    }
    # Same sources, model and series numbers -> same UIDs, so a re-run never gives the PACS
    # duplicates; and the same times (those of the job a replay redoes), so a replay writes the
    # same bytes. Anything else that shapes the bytes (a threshold, a series number) gives new
    # UIDs; and so does a change in the writers themselves (an upgrade), found by `_issue`.
    key = (ji.study_uid, ji.pipeline, *model.identity, *(f"{k}={n}" for k, n in numbers.items()), *ji.content_keys)
    when = _content_datetime(config, ji.job_id)
    # what an earlier attempt wrote, read before this attempt replaces it
    own = revisions.written_by(config, ji.job_id) if ji.attempt > 1 else {}

    def sr_objects(k: tuple[str, ...], clashed: list[revisions.Earlier]) -> list[Built]:
        sr_uid = result_uid(*k, "sr", "1")
        # A replay supersedes the job it redoes, whose SR has this SR's UID: it replaces what that
        # SR replaced, as that SR did (the same bytes); and a revision replaces the SRs it clashed with.
        p = next((r for r in ji.superseded_srs if r.sop_uid != sr_uid), None)
        superseded = [(p.study_uid, p.series_uid, p.sop_uid)] if p else []
        superseded += [(ji.study_uid, e.series_instance_uid, e.sop_instance_uid) for e in clashed]
        predecessors = list(dict.fromkeys(superseded))
        sr = _build(timings, "sr", lambda: build_comprehensive_3d_sr(
            sources, results, model,
            series_instance_uid=result_uid(*k, "sr-series"), sop_instance_uid=sr_uid,
            series_number=numbers["sr"], instance_number=1, content_datetime=when, supersedes=predecessors,
        ))
        return [gate.submit("sr", sr)]

    def image_objects(kind: str, k: tuple[str, ...], clashed: list[revisions.Earlier]) -> list[Built]:
        series_uid = result_uid(*k, f"{kind}-series")
        built = []
        for i, (src, res) in enumerate(zip(sources, results, strict=True), start=1):
            if kind == "seg" and not segmented_regions(res):
                # An empty SEG carries nothing; the SR and GSPS still say what was found.
                if not clashed:  # said once: a revision builds the kind again
                    log.warning("job %d: no region found in image %d: no SEG for it", ji.job_id, i)
                continue
            obj = _build(timings, kind, partial(
                per_image[kind], src, res, model, series_instance_uid=series_uid,
                sop_instance_uid=result_uid(*k, kind, str(i)),
                series_number=numbers[kind], instance_number=i, content_datetime=when,
            ))
            built.append(gate.submit(kind, obj))
        return built

    # The SR goes out first, while the other objects are still being drawn: it is what the
    # radiologist's worklist waits for. Each object passes the gate before it is written.
    first = True
    with _Gate(config, timings) as gate:
        if "sr" in kinds:
            sr = _issue(config, ji.job_id, "sr", key, own, sr_objects, timings, gate)
            gate.passed()
            _store_outputs(config, ji.job_id, sr, dests, first=True, findings=stated_findings(results))
            enqueue_export(config, ji.job_id)
            first = False
        others: list[Built] = []
        for kind in (k for k in kinds if k in per_image):
            others += _issue(config, ji.job_id, kind, key, own, partial(image_objects, kind), timings, gate)
        gate.passed()
    _store_outputs(config, ji.job_id, others, dests, first=first, encoded=(model.version, timings))
    enqueue_export(config, ji.job_id)


def _content_datetime(config: Config, job_id: int) -> datetime:
    """Content date/time of a job's objects: when the first job of its replay chain was created
    (local time, as DICOM dates and times without an offset are)."""
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        while job is not None and job.replay_of is not None:
            job = s.get(Job, job.replay_of)
        if job is None:
            raise PermanentError(Stage.ENCODE, f"job {job_id} or the job it replays no longer exists")
        created = job.created_at if job.created_at.tzinfo else job.created_at.replace(tzinfo=UTC)
        return created.astimezone().replace(tzinfo=None)


def _record(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds


def _stage(timings: dict[str, float], stage: Stage, seconds: float) -> None:
    """Add seconds spent at a stage to the job's timings and to the stage's metric."""
    _record(timings, stage, seconds)
    metrics.stage_seconds(stage, seconds)


def _timed(timings: dict[str, float], stage: Stage, fn: Callable[[], T], kind: str | None = None) -> T:
    """Run fn, its time counted at `stage` (and at `<stage>_<kind>` for one kind of object)."""
    t0 = time.perf_counter()
    try:
        return fn()
    finally:
        seconds = time.perf_counter() - t0
        _stage(timings, stage, seconds)
        if kind is not None:
            _record(timings, f"{stage}_{kind}", seconds)


def _build(timings: dict[str, float], kind: str, fn: Callable[[], Dataset]) -> Dataset:
    """Build one object, timed under encode and encode_<kind>; a refused input fails the job."""
    try:
        return _timed(timings, Stage.ENCODE, fn, kind)
    except ValueError as e:  # the writers' input checks (highdicom's included) raise ValueError
        raise PermanentError(Stage.ENCODE, f"{kind} cannot be built: {e}") from e


class _Gate:
    """The validation gate over one job's objects. Each object's external validators start as it
    is built and run while the worker draws the next: they are processes, so on a machine with
    cores to spare their time (a fifth of a job's on 2 cores, #12) no longer adds to the worker's.
    `passed()` waits for every verdict; the first error fails the job with its messages. At most
    `limit` objects are judged at once (a study of many images). Leaving the `with` early (an
    error) stops what was not waited for."""

    def __init__(self, config: Config, timings: dict[str, float], limit: int = 8) -> None:
        self.tools = config.validation.tools
        self.timings = timings
        self.limit = limit
        self._pending: deque[tuple[Built, Judging]] = deque()

    def __enter__(self) -> _Gate:
        return self

    def __exit__(self, *_: object) -> None:
        while self._pending:
            self._pending.popleft()[1].close()

    def submit(self, kind: str, ds: Dataset) -> Built:
        """Start judging ds; its bytes and checks at once, as they will leave if it passes."""
        from node.writers.validate import start

        while len(self._pending) >= self.limit:
            self._settle()
        judging = _timed(self.timings, Stage.VALIDATE, lambda: start(ds, self.tools), kind)
        built = Built(kind, ds, judging.checks, judging.data)
        self._pending.append((built, judging))
        if not judging.data:  # could not be written: nothing to wait for, and no bytes to compare
            self.passed()
        return built

    def passed(self) -> None:
        """Wait for every object submitted; PermanentError at the first that failed."""
        while self._pending:
            self._settle()

    def _settle(self) -> None:
        built, judging = self._pending.popleft()
        verdict = _timed(self.timings, Stage.VALIDATE, judging.verdict, built.kind)
        if verdict.errors:
            raise PermanentError(Stage.VALIDATE, f"{built.kind} failed validation: " + "; ".join(verdict.errors[:10]))


def _issue(config: Config, job_id: int, kind: str, key: tuple[str, ...], own: Mapping[str, revisions.Written],
           make: Callable[[tuple[str, ...], list[revisions.Earlier]], list[Built]],
           timings: dict[str, float], gate: _Gate) -> list[Built]:
    """A kind's objects under UIDs that name these bytes only: `key`'s, unless an earlier output
    holds one of them with other bytes (the writers changed since: an upgrade), then a revision
    of them, which supersedes the earlier SR. `make(key, clashed)` builds them and submits them
    to the gate."""
    built = make(key, [])
    t0 = time.perf_counter()
    clashed = revisions.differing(config, job_id, own, {b.uid: b.sha256 for b in built})
    _record(timings, f"uids_{kind}", time.perf_counter() - t0)
    if not clashed:
        return built
    gate.passed()  # a revision is recorded only of objects that passed the gate
    revision = revisions.revision(b.data for b in built)
    revisions.record(config, job_id, kind, clashed, revision)
    built = make((*key, revision), clashed)
    if revisions.differing(config, job_id, own, {b.uid: b.sha256 for b in built}):  # a digest collision, or a bug
        raise PermanentError(Stage.ENCODE, f"{kind}: earlier outputs hold its revised UIDs with other bytes too")
    return built


def stated_findings(results: Sequence[PipelineResult]) -> list[dict[str, Any]]:
    """Each classifier finding as the SR states it (what node.services.results.findings reads
    back from the file): kept on the SR's row, so no study page has to parse the SR."""
    from node.writers import codes

    return [{"label": f.label, "probability": round(float(f.probability), 6),
             "decision": (codes.PRESENT if f.present else codes.ABSENT).meaning, "threshold": f.threshold}
            for r in results for f in r.findings]


def _store_outputs(config: Config, job_id: int, objects: list[Built], destinations: Sequence[Destination],
                   first: bool, findings: list[dict[str, Any]] | None = None,
                   encoded: tuple[str, Mapping[str, float]] | None = None) -> None:
    """Write objects under the spool and record them with a pending send per destination
    (and, on the SR's row, the findings it states).

    `first` marks the first batch of an attempt: what an interrupted earlier attempt wrote
    is replaced (same deterministic UIDs, so nothing new reaches the PACS twice). `encoded`
    (the model's version and the job's timings) marks the last: the job becomes encoded in
    the same commit.
    """
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        # Every file is durable before the first statement that writes: on SQLite that statement
        # takes the database's one write lock, which the listener, the other workers and the
        # export then wait for. Written (and fsync'd) under it, the files made them wait up to
        # 200 ms at a time (#12).
        first_index = 0 if first else len(job.outputs)
        paths = [output_relpath(job.id, b.kind, i) for i, b in enumerate(objects, start=first_index)]
        for built, rel in zip(objects, paths, strict=True):
            write_atomic(config.storage.path, rel, built.data)
        if first:
            for old in list(job.outputs):
                for sd in list(old.sends):
                    s.delete(sd)
                s.delete(old)
            s.flush()
        for built, rel in zip(objects, paths, strict=True):
            ds = built.dataset
            out = Output(job_id=job.id, kind=built.kind, sop_class_uid=str(ds.SOPClassUID),
                         sop_instance_uid=built.uid, series_instance_uid=str(ds.SeriesInstanceUID),
                         path=rel, sha256=built.sha256, checks=list(built.checks),
                         findings=findings if built.kind == "sr" else None)
            s.add(out)
            s.flush()
            for dest in (d for d in destinations if built.kind in d.wants(config.export)):
                s.add(Send(output_id=out.id, destination=dest.name, state=SendState.PENDING, attempts=0))
        if encoded is not None:
            version, timings = encoded
            # Read again now that the rows above hold the write lock (SQLite) or with the row's
            # lock (PostgreSQL): a cancel while the files were written is not overwritten.
            s.flush()
            job = s.get(Job, job_id, with_for_update=True, populate_existing=True)
            assert job is not None
            transition(job, JobState.ENCODED, model_version=version, timings={**job.timings, **timings})
