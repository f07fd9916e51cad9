"""What the node is doing now: counts per state, queue depths, throughput and turnaround over
the last hour, failing destinations, worker heartbeats, disk space (dashboard overview and the
scrape-time gauges of /metrics). Each figure is one indexed query; nothing reads the spool."""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select

from node.config import Config
from node.db.models import Job, JobState, Send, SendState, Study, StudyState, WorkerBeat, utcnow
from node.db.session import session_scope

WINDOW = timedelta(hours=1)


def counts(config: Config) -> dict[str, dict[str, int]]:
    """Studies and jobs per state (every state listed, zero included)."""
    with session_scope(config.database.url) as s:
        studies = dict(s.execute(select(Study.state, func.count()).group_by(Study.state)).tuples().all())
        jobs = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).tuples().all())
    return {"studies": {st.value: int(studies.get(st, 0)) for st in StudyState},
            "jobs": {st.value: int(jobs.get(st, 0)) for st in JobState}}


def queue_depths(config: Config) -> dict[str, int] | None:
    """Messages waiting per broker queue; None when the broker does not answer."""
    from node.queue import EXPORT_QUEUE, INFERENCE_QUEUE, waiting

    try:
        return {q: waiting(config, q) for q in (INFERENCE_QUEUE, EXPORT_QUEUE)}
    except Exception:  # kombu raises many types (OSError, OperationalError, ...): all mean "no answer"
        return None


def heartbeat_ages(config: Config) -> dict[str, float]:
    """Seconds since the freshest heartbeat of any worker serving each queue."""
    now = utcnow()
    ages: dict[str, float] = {}
    with session_scope(config.database.url) as s:
        for queues, seen in s.execute(select(WorkerBeat.queues, func.max(WorkerBeat.seen_at)).group_by(WorkerBeat.queues)):
            for q in queues.split(","):
                age = round((now - seen).total_seconds(), 1)
                ages[q] = min(age, ages.get(q, math.inf))
    return ages


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def last_hour(config: Config) -> dict[str, Any]:
    """Studies received and completed in the last hour, and the turnaround of the jobs done in
    it: from the study's last instance to its results done at every destination (first runs
    only: a replay hours later says nothing about the node's speed)."""
    since = utcnow() - WINDOW
    with session_scope(config.database.url) as s:
        received = s.scalar(select(func.count()).select_from(Study).where(Study.first_received_at >= since)) or 0
        completed = s.scalar(select(func.count()).select_from(Study).where(Study.completed_at >= since)) or 0
        rows = s.execute(select(Job.done_at, Study.last_received_at).join(Study, Job.study_id == Study.id)
                         .where(Job.done_at >= since, Job.replay_of.is_(None))).all()
    turnaround = [(done - last).total_seconds() for done, last in rows if done is not None]
    return {"received": int(received), "completed": int(completed), "jobs_done": len(turnaround),
            "turnaround_p50": percentile(turnaround, 50), "turnaround_p95": percentile(turnaround, 95)}


def failing_destinations(config: Config) -> list[dict[str, Any]]:
    """Destinations with sends that failed in the last hour or are being retried now, with the
    latest error."""
    since = utcnow() - WINDOW
    failing = or_(and_(Send.state == SendState.FAILED, Send.updated_at >= since),
                  and_(Send.state.in_((SendState.PENDING, SendState.SENDING)), Send.error.is_not(None)))
    with session_scope(config.database.url) as s:
        rows = s.execute(select(Send.destination, Send.state, Send.error, Send.updated_at).where(failing)
                         .order_by(Send.updated_at.desc()).limit(500)).all()
    out: dict[str, dict[str, Any]] = {}
    for dest, state, error, at in rows:
        d = out.setdefault(dest, {"destination": dest, "failed": 0, "retrying": 0, "last_error": error,
                                  "last_at": at.isoformat()})
        d["failed" if state == SendState.FAILED else "retrying"] += 1
    return list(out.values())


def disk(config: Config) -> dict[str, Any]:
    """The spool's file system: free and total bytes, and whether C-STORE still accepts."""
    usage = shutil.disk_usage(config.storage.path)
    minimum = config.storage.min_free_mb * 2**20
    return {"free_bytes": usage.free, "total_bytes": usage.total, "min_free_bytes": minimum,
            "ok": usage.free >= minimum}


def overview(config: Config) -> dict[str, Any]:
    """Everything the dashboard's overview shows, in one call."""
    from node.services.ops import workers

    return {"counts": counts(config), "queues": queue_depths(config), "last_hour": last_hour(config),
            "failing": failing_destinations(config), "workers": workers(config), "disk": disk(config)}
