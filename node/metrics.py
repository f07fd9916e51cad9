"""Prometheus metrics, shared by the listener, worker and API processes (prometheus_client
multiprocess mode: each process writes its own file under `<api.state_dir>/metrics`, and
`render` sums them). Every process calls `setup(config)` when it starts; a process that never
does (a one-off CLI command, a unit test) counts in memory only, and nothing reads that.

Names have the `pacsnode_` prefix and base units (`_seconds`, `_bytes`; counters end in
`_total`). Labels carry no UIDs or patient data: only DICOM statuses, completion rule names,
stage names, destination names, queue names, job states and route templates.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from node.config import Config
from node.engine.errors import Stage

log = logging.getLogger(__name__)
PREFIX = "pacsnode"
_STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 10)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)
_metrics: dict[str, Any] | None = None
_dir: Path | None = None
_lock = threading.Lock()


def metrics_dir(config: Config) -> Path:
    """Where every process of this node writes its metric files."""
    return (Path(config.api.state_dir) / "metrics").resolve()


def reset(config: Config) -> None:
    """Remove the metric files of earlier runs. Only `pacsnode run` calls this, before it
    starts its children: a process still running would keep writing to a deleted file."""
    d = metrics_dir(config)
    if d.is_dir():
        for f in d.glob("*.db"):
            f.unlink()


def setup(config: Config) -> None:
    """Make this process write its metrics to the node's shared directory (idempotent).

    prometheus_client picks its value class (in memory or per-process file) when it is first
    imported, from PROMETHEUS_MULTIPROC_DIR; a library may have imported it before this runs,
    so the class is chosen again here and the metric objects are made afresh against it.
    """
    global _metrics, _dir
    d = metrics_dir(config)
    if _dir == d:
        return
    d.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(d)
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()
    _metrics = None
    _dir = d


def _m() -> dict[str, Any]:
    """The metric objects, created on first use. registry=None: in multiprocess mode the
    collector reads the files, and setup() may re-create them without a duplicate name.

    Under a lock: the listener's association threads touch metrics at the same moment, and two
    creations racing would each count half the events."""
    global _metrics
    if _metrics is not None:
        return _metrics
    with _lock:
        if _metrics is not None:
            return _metrics
        from prometheus_client import Counter, Histogram

        _metrics = {
            "received": Counter(f"{PREFIX}_instances_received", "Instances stored (C-STORE or STOW-RS), by status",
                                ["status"], registry=None),
            "refused": Counter(f"{PREFIX}_instances_refused", "Instances refused, by DICOM status", ["status"],
                               registry=None),
            "assoc_refused": Counter(f"{PREFIX}_associations_refused", "Associations rejected, by reason",
                                     ["reason"], registry=None),
            "store": Histogram(f"{PREFIX}_store_duration_seconds", "Time to store one instance (file and row)",
                               registry=None),
            "completed": Counter(f"{PREFIX}_studies_completed", "Studies declared complete, by completion rule",
                                 ["rule"], registry=None),
            "jobs": Counter(f"{PREFIX}_job_transitions", "Jobs entering a state", ["state"], registry=None),
            "stage": Histogram(f"{PREFIX}_stage_duration_seconds", "Time per job stage", ["stage"],
                               buckets=_STAGE_BUCKETS, registry=None),
            "sends": Counter(f"{PREFIX}_sends", "Result sends, by destination and outcome",
                             ["destination", "status"], registry=None),
            "purged": Counter(f"{PREFIX}_spool_purged", "What spool retention removed: studies, files, bytes",
                              ["what"], registry=None),
            "http": Histogram(f"{PREFIX}_http_request_duration_seconds", "HTTP requests, by route template",
                              ["method", "route", "status"], buckets=_HTTP_BUCKETS, registry=None),
            "listener_restarts": Counter(f"{PREFIX}_listener_process_restarts",
                                         "Further listener processes that ended unexpectedly and were started again",
                                         registry=None),
            "db_wait": Histogram(f"{PREFIX}_database_write_wait_seconds",
                                 "Time a write transaction waited for the SQLite database's other writers",
                                 buckets=_WAIT_BUCKETS, registry=None),
        }
    return _metrics


def instance_received(status: int, seconds: float) -> None:
    """One instance stored (status 0x0000 or a warning) after `seconds`."""
    _m()["received"].labels(status=f"0x{status:04X}").inc()
    _m()["store"].observe(seconds)


def instance_refused(status: int) -> None:
    _m()["refused"].labels(status=f"0x{status:04X}").inc()


def association_refused(reason: str) -> None:
    _m()["assoc_refused"].labels(reason=reason).inc()


def spool_purged(studies: int, files: int, size: int) -> None:
    """One study's files removed from the spool by retention."""
    for what, n in (("studies", studies), ("files", files), ("bytes", size)):
        _m()["purged"].labels(what=what).inc(n)


def study_completed(rule: str | None) -> None:
    _m()["completed"].labels(rule=rule or "unknown").inc()


def job_state(state: str) -> None:
    _m()["jobs"].labels(state=str(state)).inc()


def stage_seconds(stage: Stage, seconds: float) -> None:
    """Time spent at one stage of a job's work (node.engine.errors.Stage)."""
    _m()["stage"].labels(stage=str(stage)).observe(seconds)


def send_result(destination: str, status: str) -> None:
    _m()["sends"].labels(destination=destination, status=status).inc()


def http_request(method: str, route: str, status: int, seconds: float) -> None:
    """One HTTP request; `route` is the route's template (/studies/{uid}), never the path."""
    _m()["http"].labels(method=method, route=route, status=str(status)).observe(seconds)


def listener_process_restarted() -> None:
    _m()["listener_restarts"].inc()


def database_write_wait(seconds: float) -> None:
    """One SQLite write transaction began after waiting `seconds` for the node's other writers
    (node.db.session.WriterQueueConnection): where these grow, the database is what the node
    waits for, and PostgreSQL is the way out."""
    _m()["db_wait"].observe(seconds)


class _StateCollector:
    """Gauges read at scrape time from the database, broker and disk, so every API process
    reports the same truth: jobs and studies in progress by state, queue depth, heartbeat age
    per queue, spool free bytes, broker reachability."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from node.services.overview import counts, heartbeat_ages, queue_depths, workers

        cfg = self.config
        c = counts(cfg)
        # In-progress states only: finished ones grow without bound (their _total counters give rates).
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs now queued, running, encoded or sending", labels=["state"])
        for state, n in c["jobs"]["now"].items():
            jobs.add_metric([state], n)
        yield jobs
        studies = GaugeMetricFamily(f"{PREFIX}_studies", "Studies now receiving", labels=["state"])
        for state, n in c["studies"]["now"].items():
            studies.add_metric([state], n)
        yield studies
        beat = GaugeMetricFamily(f"{PREFIX}_worker_heartbeat_age_seconds",
                                 "Seconds since the freshest heartbeat of a worker serving each queue", labels=["queue"])
        for queue, age in heartbeat_ages(workers(cfg)).items():
            beat.add_metric([queue], age)
        yield beat
        depths = queue_depths(cfg)
        yield GaugeMetricFamily(f"{PREFIX}_broker_up", "1 when the broker answered this scrape",
                                value=0 if depths is None else 1)
        if depths is not None:
            depth = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Messages waiting per broker queue", labels=["queue"])
            for queue, n in depths.items():
                depth.add_metric([queue], n)
            yield depth
        yield GaugeMetricFamily(f"{PREFIX}_spool_free_bytes", "Free bytes on the spool's file system",
                                value=shutil.disk_usage(cfg.storage.path).free)


def render(config: Config) -> tuple[bytes, str]:
    """The Prometheus text exposition for all processes of this node, plus the live gauges."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    setup(config)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir(config)))
    registry.register(_StateCollector(config))  # type: ignore[arg-type]
    return generate_latest(registry), CONTENT_TYPE_LATEST
