"""Celery tasks: thin wrappers that take a job id and call the job engine (node/engine/).

Inference and export run on separate queues so that a PACS that is down never holds a GPU.
Transient errors are retried by Celery itself (`autoretry_for`), with the config's limits;
expected failures (an undecodable image, an invalid result) fail the job at once inside the
engine and are never retried.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any, Protocol

from celery import Task
from celery.signals import worker_ready
from sqlalchemy.exc import SQLAlchemyError

from node.config import Config
from node.engine.delivery import run_export
from node.engine.errors import JobError, RetryableExportError, TransientError
from node.engine.inference import pipeline_for, run_inference
from node.engine.malloc import keep_freed_blocks
from node.heap import freeze_startup_heap
from node.jobs import fail_job, heartbeat
from node.queue import EXPORT_JOB, INFERENCE_QUEUE, RUN_JOB, app

log = logging.getLogger(__name__)


@cache
def _config(key: str) -> Config:
    return Config.model_validate_json(key)


def current_config() -> Config:
    return _config(app.conf.pacsnode_config)


@contextmanager
def beating(config: Config, job_id: int, worker: str) -> Iterator[None]:
    """Keep marking the job alive while the task runs, so the reconciler never takes it over.

    The beat stops at the task time limit: the solo pool that inference workers use cannot
    enforce Celery's time limits, so a task hung past it is treated like a dead worker.
    """
    stop = threading.Event()
    qc = config.queue

    def beat() -> None:
        deadline = time.monotonic() + qc.task_time_limit
        while not stop.wait(qc.heartbeat_seconds) and time.monotonic() < deadline:
            try:
                heartbeat(config, job_id, worker)
            except SQLAlchemyError as e:  # a database blip: the next beat tries again
                log.warning("job %d: heartbeat failed: %s", job_id, e)

    thread = threading.Thread(target=beat, name=f"heartbeat-{job_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


class RetrySettings(Protocol):
    """The three keys each of `queue` and `export` in config.yaml gives its task."""

    max_retries: int
    backoff_seconds: float
    backoff_max_seconds: float


class JobTask(Task):  # type: ignore[misc]  # Celery's Task is untyped
    """Base of the node's tasks. Celery retries what a task's `autoretry_for` names, as it
    would with `retry_backoff`, but with the config's policy, read when a retry is due (the
    config is per process, the task classes are not): at most `max_retries`, after an
    exponential delay with full jitter. When retries run out, the job fails at the stage of
    the last error, with its message."""

    retry_jitter = True
    #: Which section of the config holds this task's retry settings.
    retry_settings: Callable[[Config], RetrySettings]

    def retry(self, *args: Any, countdown: float | None = None, max_retries: int | None = None,
              **kwargs: Any) -> Any:
        rs = self.retry_settings(current_config())
        limit = rs.max_retries if max_retries is None else max_retries
        if countdown is None:
            countdown = backoff(rs, self.request.retries, jitter=self.retry_jitter)
        if self.request.retries < limit:
            job = self.request.args[0] if self.request.args else "?"
            log.warning("%s for job %s: retry %d of %d in %.1f s", self.name, job, self.request.retries + 1,
                        limit, countdown)
        return super().retry(*args, countdown=countdown, max_retries=limit, **kwargs)

    def on_failure(self, exc: Exception, task_id: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                   einfo: Any) -> None:
        """Retries ran out (or the error is not retried): the job fails with the reason."""
        if isinstance(exc, JobError):
            job_id = int(args[0])
            fail_job(current_config(), job_id, exc.stage, f"gave up after {self.request.retries + 1} attempts: {exc}")


def backoff(rs: RetrySettings, retries: int, jitter: bool = True) -> float:
    """Seconds before retry number `retries + 1`: backoff_seconds doubling per retry up to
    backoff_max_seconds; with jitter, a uniform draw below that (AWS's "full jitter", as
    Celery's own retry_jitter), so retries of many jobs after one outage do not arrive together."""
    delay = min(rs.backoff_seconds * 2**retries, rs.backoff_max_seconds)
    return random.uniform(0, delay) if jitter else delay


@app.task(name=RUN_JOB, bind=True, base=JobTask, acks_late=True, autoretry_for=(TransientError,),
          retry_settings=staticmethod(lambda config: config.queue))
def run_job(self: JobTask, job_id: int) -> None:
    """Inference for one job; GPU out of memory retries with backoff, then fails the job."""
    config = current_config()
    worker = f"{self.request.hostname or socket.gethostname()}"
    with beating(config, job_id, worker):
        run_inference(config, job_id, worker)


@app.task(name=EXPORT_JOB, bind=True, base=JobTask, acks_late=True, autoretry_for=(RetryableExportError,),
          retry_settings=staticmethod(lambda config: config.export))
def export_job(self: JobTask, job_id: int) -> None:
    """Send one job's results; a destination that is down (or has not confirmed) retries with backoff."""
    run_export(current_config(), job_id)


@worker_ready.connect
def _beat_worker(sender: object = None, **_: object) -> None:
    """Record this worker alive every heartbeat period (readiness, dashboard), in a daemon thread."""
    from node.db.models import WorkerBeat, utcnow
    from node.db.session import session_scope

    config = current_config()
    name = str(getattr(sender, "hostname", None) or "worker")[:255]
    queues = ",".join(sorted(q.name for q in app.amqp.queues.consume_from.values())) if app.amqp.queues.consume_from else ""

    def beat() -> None:
        while True:
            try:
                with session_scope(config.database.url) as s:
                    row = s.get(WorkerBeat, name)
                    if row is None:
                        s.add(WorkerBeat(name=name, queues=queues[:255], started_at=utcnow(), seen_at=utcnow()))
                    else:
                        row.seen_at, row.queues = utcnow(), queues[:255]
            except SQLAlchemyError as e:  # the next beat tries again; a dead database shows in /readyz
                log.warning("worker heartbeat failed: %s", e)
            time.sleep(config.queue.heartbeat_seconds)

    threading.Thread(target=beat, name="worker-beat", daemon=True).start()


@worker_ready.connect
def _warm(**_: object) -> None:
    """Before the first task: an inference worker loads every enabled pipeline and the writers
    and runs each pipeline once on a synthetic radiograph (node/engine/warmup.py), so that its
    first study costs what the next ones do; every worker then freezes what it loaded (below).

    Inference workers run the solo pool (one model copy per process; scale with processes), so
    the process that is ready is the one that runs the tasks.
    """
    queues = {q.name for q in app.amqp.queues.consume_from.values()} if app.amqp.queues.consume_from else set()
    inference = not queues or INFERENCE_QUEUE in queues
    if inference:
        from node.engine.warmup import warm_up
        from node.writers import preload

        config = current_config()
        keep_freed_blocks()  # before the warm-up: the blocks it frees are kept for the first study
        preload()
        for name, pc in config.pipelines.items():
            if pc.enabled:
                built = warm_up(pipeline_for(config, name))
                log.info("pipeline %s loaded from %s; warmed up on a synthetic radiograph (%s)", name, pc.bundle,
                         ", ".join(built) or "nothing built")
    # Full collections would otherwise walk every tensor and module object loaded above on
    # each study (200-400 ms spikes while building an SR, before freezing); an inference
    # worker's SR builds are what BUSY_THRESHOLDS was measured on.
    freeze_startup_heap(busy=inference)

