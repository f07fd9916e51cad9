"""Celery tasks: thin wrappers that take a job id and call the job engine (node/engine/).

Inference and export run on separate queues so that a PACS that is down never holds a GPU.
"""

from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

from celery import Task
from celery.signals import worker_ready
from sqlalchemy.exc import SQLAlchemyError

from node.config import Config
from node.engine.delivery import run_export
from node.engine.errors import RetryableExportError, TransientError
from node.engine.inference import pipeline_for, run_inference
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


@app.task(name=RUN_JOB, bind=True, acks_late=True, max_retries=None)
def run_job(self: Task, job_id: int) -> None:
    """Inference for one job; transient errors retry with exponential backoff, then fail the job."""
    config = current_config()
    worker = f"{self.request.hostname or socket.gethostname()}"
    try:
        with beating(config, job_id, worker):
            run_inference(config, job_id, worker)
    except TransientError as e:
        qc = config.queue
        if self.request.retries >= qc.max_retries:
            fail_job(config, job_id, e.stage, f"gave up after {self.request.retries + 1} attempts: {e}")
            return
        delay = min(qc.backoff_seconds * 2**self.request.retries, qc.backoff_max_seconds)
        log.warning("job %d: %s; retry %d in %.1f s", job_id, e, self.request.retries + 1, delay)
        raise self.retry(countdown=delay, exc=e) from e


@app.task(name=EXPORT_JOB, bind=True, acks_late=True, max_retries=None)
def export_job(self: Task, job_id: int) -> None:
    config = current_config()
    try:
        run_export(config, job_id)
    except RetryableExportError as e:
        ec = config.export
        if self.request.retries >= ec.max_retries:
            fail_job(config, job_id, e.stage, f"gave up after {self.request.retries + 1} attempts: {e}")
            return
        delay = min(ec.backoff_seconds * 2**self.request.retries, ec.backoff_max_seconds)
        log.warning("job %d: send failed (%s); retry %d in %.1f s", job_id, e, self.request.retries + 1, delay)
        raise self.retry(countdown=delay, exc=e) from e


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
    """Load every enabled pipeline once, before the first task, if this worker does inference.

    Inference workers run the solo pool (one model copy per process; scale with processes), so
    the process that is ready is the one that runs the tasks.
    """
    queues = {q.name for q in app.amqp.queues.consume_from.values()} if app.amqp.queues.consume_from else set()
    if queues and INFERENCE_QUEUE not in queues:
        return
    config = current_config()
    for name, pc in config.pipelines.items():
        if pc.enabled:
            pipeline_for(config, name)
            log.info("pipeline %s loaded from %s", name, pc.bundle)
    # Full collections would otherwise walk every tensor and module object loaded above on
    # each study: measured 200-400 ms spikes while building an SR, gone after freezing.
    gc.freeze()

