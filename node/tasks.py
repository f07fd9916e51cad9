"""Celery tasks: thin wrappers that take a job id and call node.worker.

Inference and export run on separate queues so that a PACS that is down never holds a GPU.
"""

from __future__ import annotations

import gc
import logging
import socket
from functools import cache

from celery import Task
from celery.signals import worker_ready

from node.config import Config
from node.queue import EXPORT_JOB, INFERENCE_QUEUE, RUN_JOB, app
from node.worker import (
    RetryableExportError,
    TransientError,
    fail_export,
    pipeline_for,
    run_export,
    run_inference,
)

log = logging.getLogger(__name__)


@cache
def _config(key: str) -> Config:
    return Config.model_validate_json(key)


def current_config() -> Config:
    return _config(app.conf.pacsnode_config)


@app.task(name=RUN_JOB, bind=True, acks_late=True, autoretry_for=(TransientError,), retry_backoff=True,
          retry_backoff_max=300, max_retries=5)
def run_job(self: Task, job_id: int) -> None:
    config = current_config()
    worker = f"{self.request.hostname or socket.gethostname()}"
    run_inference(config, job_id, worker)


@app.task(name=EXPORT_JOB, bind=True, acks_late=True, max_retries=None)
def export_job(self: Task, job_id: int) -> None:
    config = current_config()
    try:
        run_export(config, job_id)
    except RetryableExportError as e:
        ec = config.export
        if self.request.retries >= ec.max_retries:
            fail_export(config, job_id, f"gave up after {self.request.retries + 1} attempts: {e}")
            return
        delay = min(ec.backoff_seconds * 2**self.request.retries, ec.backoff_max_seconds)
        log.warning("job %d: send failed (%s); retry %d in %.1f s", job_id, e, self.request.retries + 1, delay)
        raise self.retry(countdown=delay, exc=e) from e


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

