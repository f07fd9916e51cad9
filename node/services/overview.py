"""What the node is doing now: counts per state, queue depths, throughput and turnaround over
the last hour, failing destinations, worker heartbeats, disk space and readiness (the
dashboard's overview, /api/v1/overview, /readyz and the scrape-time gauges of /metrics).
Every figure is an indexed query; all of them share one database session; nothing reads the
spool."""

from __future__ import annotations

import math
import shutil
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node import first_run
from node.config import Config
from node.db.models import (
    ACTIVE_JOB_STATES,
    Job,
    JobState,
    Send,
    SendState,
    Study,
    StudyState,
    WorkerBeat,
    utcnow,
)
from node.db.session import session_scope

WINDOW = timedelta(hours=1)
DAY = timedelta(days=1)
#: Studies and jobs still in progress: counted exactly. Finished ones are counted over the last
#: day: their all-time totals grow without bound, and counting them all would read every row
#: (the _total counters of /metrics give all-time rates).
ACTIVE_STUDY_STATES = (StudyState.RECEIVING,)


def _counts(s: Session) -> dict[str, dict[str, dict[str, int]]]:
    since = utcnow() - DAY
    jobs_now = dict(s.execute(select(Job.state, func.count()).where(Job.state.in_(ACTIVE_JOB_STATES))
                              .group_by(Job.state)).tuples().all())
    studies_now = dict(s.execute(select(Study.state, func.count()).where(Study.state.in_(ACTIVE_STUDY_STATES))
                                 .group_by(Study.state)).tuples().all())
    # The last day's rows are counted here, not by GROUP BY state: given one, SQLite walks the
    # whole (state, id) index in state order rather than the time index's day (240 ms, not 2,
    # at 100,000 jobs).
    jobs_day = Counter(s.scalars(select(Job.state).where(Job.updated_at >= since,
                                                         Job.state.not_in(ACTIVE_JOB_STATES))))
    studies_day = Counter(s.scalars(select(Study.state).where(Study.completed_at >= since,
                                                              Study.state.not_in(ACTIVE_STUDY_STATES))))
    return {"jobs": {"now": {st.value: int(jobs_now.get(st, 0)) for st in ACTIVE_JOB_STATES},
                     "last_day": {st.value: int(jobs_day.get(st, 0)) for st in JobState if st not in ACTIVE_JOB_STATES}},
            "studies": {"now": {st.value: int(studies_now.get(st, 0)) for st in ACTIVE_STUDY_STATES},
                        "last_day": {st.value: int(studies_day.get(st, 0)) for st in StudyState
                                     if st not in ACTIVE_STUDY_STATES}}}


def counts(config: Config) -> dict[str, dict[str, dict[str, int]]]:
    """Studies and jobs per state: those in progress now (exact), and those that finished in
    each state during the last day. Every count is an index range, never the whole table."""
    with session_scope(config.database.url) as s:
        return _counts(s)


def queue_depths(config: Config) -> dict[str, int] | None:
    """Messages waiting per broker queue; None when the broker does not answer."""
    from node.queue import EXPORT_QUEUE, INFERENCE_QUEUE, waiting

    try:
        return {q: waiting(config, q) for q in (INFERENCE_QUEUE, EXPORT_QUEUE)}
    except Exception:  # kombu raises many types (OSError, OperationalError, ...): all mean "no answer"
        return None


def _workers(s: Session, config: Config) -> list[dict[str, Any]]:
    now = utcnow()
    rows = []
    for w in s.scalars(select(WorkerBeat).order_by(WorkerBeat.name)):
        age = round((now - w.seen_at).total_seconds(), 1)
        rows.append({"name": w.name, "queues": w.queues, "started_at": w.started_at.isoformat(),
                     "seen_at": w.seen_at.isoformat(), "seconds_since": age,
                     "alive": age < config.queue.lost_after_seconds})
    return rows


def workers(config: Config) -> list[dict[str, Any]]:
    """Every worker that ever beat, with its last heartbeat; `alive` while it is fresher than
    queue.lost_after_seconds (after that its running jobs are taken over)."""
    with session_scope(config.database.url) as s:
        return _workers(s, config)


def heartbeat_ages(worker_rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Seconds since the freshest heartbeat of any worker serving each queue."""
    ages: dict[str, float] = {}
    for w in worker_rows:
        for q in w["queues"].split(","):
            ages[q] = min(w["seconds_since"], ages.get(q, math.inf))
    return ages


def percentile(values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile (p in 0..100) of values; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def _last_hour(s: Session) -> dict[str, Any]:
    since = utcnow() - WINDOW
    received = s.scalar(select(func.count()).select_from(Study).where(Study.first_received_at >= since)) or 0
    completed = s.scalar(select(func.count()).select_from(Study).where(Study.completed_at >= since)) or 0
    # Replays are left out here, not in SQL: "replay_of IS NULL" would lead SQLite to walk the
    # replay_of index (null for nearly every job) instead of the last hour of done_at.
    rows = s.execute(select(Job.done_at, Study.last_received_at, Job.replay_of).join(Study, Job.study_id == Study.id)
                     .where(Job.done_at >= since)).all()
    turnaround = [(done - last).total_seconds() for done, last, replay in rows if done is not None and replay is None]
    return {"received": int(received), "completed": int(completed), "jobs_done": len(turnaround),
            "turnaround_p50": percentile(turnaround, 50), "turnaround_p95": percentile(turnaround, 95)}


def _failing(s: Session) -> list[dict[str, Any]]:
    since = utcnow() - WINDOW
    failing = or_(and_(Send.state == SendState.FAILED, Send.updated_at >= since),
                  and_(Send.state.in_((SendState.PENDING, SendState.SENDING)), Send.error.is_not(None)))
    rows = s.execute(select(Send.destination, Send.state, Send.error, Send.updated_at).where(failing)
                     .order_by(Send.updated_at.desc()).limit(500)).all()
    out: dict[str, dict[str, Any]] = {}
    for dest, state, error, at in rows:
        d = out.setdefault(dest, {"destination": dest, "failed": 0, "retrying": 0, "last_error": error,
                                  "last_at": at.isoformat()})
        d["failed" if state == SendState.FAILED else "retrying"] += 1
    return list(out.values())


def disk(config: Config) -> dict[str, Any]:
    """The spool's file system: free and total bytes, whether C-STORE still accepts, and the
    retention that keeps it from filling (storage.retention_days; null: files are kept)."""
    minimum = config.storage.min_free_mb * 2**20
    limits = {"min_free_bytes": minimum, "retention_days": config.storage.retention_days}
    try:
        usage = shutil.disk_usage(config.storage.path)
    except OSError as e:
        return {"free_bytes": None, "total_bytes": None, **limits, "ok": False, "detail": str(e)}
    return {"free_bytes": usage.free, "total_bytes": usage.total, **limits, "ok": usage.free >= minimum}


def _readiness(config: Config, db_error: str | None, worker_rows: Sequence[dict[str, Any]],
               queues: dict[str, int] | None, space: dict[str, Any]) -> dict[str, Any]:
    checks: dict[str, dict[str, Any]] = {"database": {"ok": db_error is None, **({"detail": db_error} if db_error else {})}}
    if db_error:
        checks["worker"] = {"ok": False, "detail": "database unavailable"}
    else:
        freshest = min((w["seconds_since"] for w in worker_rows), default=None)
        checks["worker"] = {"ok": freshest is not None and freshest < config.queue.lost_after_seconds,
                            "detail": "no worker heartbeat yet" if freshest is None else f"last heartbeat {freshest:.0f} s ago"}
    checks["broker"] = {"ok": True, "waiting": queues} if queues is not None else {"ok": False, "detail": "not answering"}
    checks["spool"] = {"ok": space["ok"], "free_bytes": space["free_bytes"],
                       **({} if space["ok"] else {"detail": space.get("detail", "free space below storage.min_free_mb")})}
    checks["models"] = first_run.readiness_check(config)  # demo weights still being trained on a first run
    return {"ready": all(c["ok"] for c in checks.values()), "checks": checks}


def readiness(config: Config) -> dict[str, Any]:
    """/readyz: database, a worker heartbeat within queue.lost_after_seconds, the broker, spool
    free space, models (not while a first run's demo weights are being trained); `ready` only
    when all pass. Every check is bounded in time."""
    try:
        with session_scope(config.database.url) as s:
            s.execute(text("SELECT 1"))
            rows = _workers(s, config)
        error = None
    except SQLAlchemyError as e:
        rows, error = [], type(e).__name__
    return _readiness(config, error, rows, queue_depths(config), disk(config))


def overview(config: Config) -> dict[str, Any]:
    """Everything the dashboard's overview shows, from one database session."""
    with session_scope(config.database.url) as s:
        data: dict[str, Any] = {"counts": _counts(s), "last_hour": _last_hour(s), "failing": _failing(s),
                                "workers": _workers(s, config)}
    queues, space = queue_depths(config), disk(config)
    return {**data, "queues": queues, "disk": space, "ready": _readiness(config, None, data["workers"], queues, space)}
