"""Prometheus metrics, shared by the listener, worker and API processes (prometheus_client
multiprocess mode). `setup(config)` must run in each process before the first metric is touched;
it points PROMETHEUS_MULTIPROC_DIR at `<state_dir>/metrics`. Labels carry no UIDs or patient data:
only statuses, rule names, stage names, destination names and states."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from node.config import Config
from node.engine.errors import Stage

PREFIX = "pacsnode"
_config: Config | None = None


def metrics_dir(config: Config) -> Path:
    """Where every process of this node writes its metric files."""
    return Path(config.api.state_dir) / "metrics"


def setup(config: Config) -> None:
    """Point this process at the shared multiprocess directory (idempotent). prometheus_client
    reads the variable when a metric is first created, so this runs before any observation."""
    global _config
    _config = config
    d = metrics_dir(config).resolve()
    d.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", str(d))


def _m() -> Any:
    """The metric objects, created on first use (after setup() has set the directory).

    Under a lock: the listener's association threads touch metrics at the same moment, and
    two registrations of one name raise DuplicateTimeseries (a refused C-STORE)."""
    global _metrics
    if _metrics is not None:
        return _metrics
    with _lock:
        if _metrics is not None:
            return _metrics
        from prometheus_client import Counter, Histogram

        _metrics = {
            "received": Counter(f"{PREFIX}_instances_received", "Instances stored", ["status"]),
            "refused": Counter(f"{PREFIX}_instances_refused", "Instances refused, by DICOM status", ["status"]),
            "assoc_refused": Counter(f"{PREFIX}_associations_refused", "Associations rejected", ["reason"]),
            "store": Histogram(f"{PREFIX}_store_duration_seconds", "C-STORE/STOW handling time per instance"),
            "completed": Counter(f"{PREFIX}_studies_completed", "Studies declared complete", ["rule"]),
            "jobs": Counter(f"{PREFIX}_job_transitions", "Jobs entering a state", ["state"]),
            "stage": Histogram(f"{PREFIX}_stage_duration_seconds", "Time per pipeline stage", ["stage"],
                               buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
            "sends": Counter(f"{PREFIX}_sends", "Result sends", ["destination", "status"]),
        }
    return _metrics


_metrics: dict[str, Any] | None = None
_lock = threading.Lock()


def instance_received(status: int, seconds: float) -> None:
    """One instance stored (status 0x0000 or a warning) after `seconds`."""
    _m()["received"].labels(status=f"0x{status:04X}").inc()
    _m()["store"].observe(seconds)


def instance_refused(status: int) -> None:
    _m()["refused"].labels(status=f"0x{status:04X}").inc()


def association_refused(reason: str) -> None:
    _m()["assoc_refused"].labels(reason=reason).inc()


def study_completed(rule: str | None) -> None:
    _m()["completed"].labels(rule=rule or "unknown").inc()


def job_state(state: str) -> None:
    _m()["jobs"].labels(state=str(state)).inc()


def stage_seconds(stage: Stage, seconds: float) -> None:
    """Time spent at one stage of a job's work (node.engine.errors.Stage)."""
    _m()["stage"].labels(stage=stage.value).observe(seconds)


def send_result(destination: str, status: str) -> None:
    _m()["sends"].labels(destination=destination, status=status).inc()


class _StateCollector:
    """Gauges read at scrape time from the database, broker and disk (so every API process
    reports the same truth): jobs by state, queue depth, heartbeat age, spool free bytes."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        from sqlalchemy import func, select

        from node.db.models import Job, WorkerBeat, utcnow
        from node.db.session import session_scope

        cfg = self.config
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs currently in each state", labels=["state"])
        with session_scope(cfg.database.url) as s:
            for state, n in s.execute(select(Job.state, func.count()).group_by(Job.state)):
                jobs.add_metric([str(state.value if hasattr(state, "value") else state)], n)
            seen = s.scalar(select(func.max(WorkerBeat.seen_at)))
        yield jobs
        if seen is not None:
            yield GaugeMetricFamily(f"{PREFIX}_worker_heartbeat_age_seconds", "Seconds since the last worker heartbeat",
                                    value=(utcnow() - seen).total_seconds())
        from node.queue import EXPORT_QUEUE, INFERENCE_QUEUE, waiting

        depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Messages waiting per broker queue", labels=["queue"])
        for q in (INFERENCE_QUEUE, EXPORT_QUEUE):
            depth.add_metric([q], waiting(cfg, q))
        yield depth
        yield GaugeMetricFamily(f"{PREFIX}_spool_free_bytes", "Free bytes on the spool's file system",
                                value=shutil.disk_usage(cfg.storage.path).free)


def render(config: Config) -> tuple[bytes, str]:
    """The Prometheus text exposition for all processes of this node, plus the live gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    setup(config)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
    registry.register(_StateCollector(config))
    return generate_latest(registry), CONTENT_TYPE_LATEST
