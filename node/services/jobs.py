"""List, show, replay, cancel and re-send jobs (`pacsnode jobs|replay|cancel`, `/api/v1/jobs`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import selectinload

from node import jobs as machine
from node.config import Config
from node.db.models import Job, JobState, Output
from node.db.session import session_scope
from node.jobs import job_to_dict
from node.services.audit import stamp_address
from node.services.errors import Invalid, NotFound
from node.services.paging import Page, check_limit, decode_cursor, encode_cursor


def _state(value: str | None) -> JobState | None:
    if not value:
        return None
    try:
        return JobState(value)
    except ValueError as e:
        raise Invalid("state", f"one of {', '.join(s.value for s in JobState)}") from e


def list_jobs(config: Config, state: str | None = None, since: datetime | None = None, limit: int = 50,
              cursor: str | None = None) -> Page:
    """Jobs newest first, keyset-paged; `since` compares the last change (updated_at)."""
    check_limit(limit)
    below = decode_cursor(cursor)
    q = select(Job).options(selectinload(Job.study), selectinload(Job.outputs).selectinload(Output.sends))
    st = _state(state)
    if st is not None:
        q = q.where(Job.state == st)
    if since is not None:
        q = q.where(Job.updated_at >= since)
    if below is not None:
        q = q.where(Job.id < below)
    with session_scope(config.database.url) as s:
        rows = s.scalars(q.order_by(Job.id.desc()).limit(limit + 1)).all()
        items = [job_to_dict(j) for j in rows[:limit]]
    return Page(items, encode_cursor(items[-1]["id"]) if len(rows) > limit else None)


def get_job(config: Config, job_id: int) -> dict[str, Any]:
    with session_scope(config.database.url) as s:
        job = s.scalar(select(Job).where(Job.id == job_id).options(
            selectinload(Job.study), selectinload(Job.outputs).selectinload(Output.sends)))
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job_to_dict(job)


def replay_job(config: Config, job_id: int, actor: str, reason: str, address: str | None = None) -> int:
    """Queue a new job redoing job_id; return its id. JobBusy while job_id is active."""
    from node.queue import enqueue_job

    try:
        new_id = machine.replay(config, job_id, actor=actor, reason=reason)
    except LookupError as e:
        raise NotFound(str(e)) from e
    with session_scope(config.database.url) as s:
        priority = s.get_one(Job, new_id).priority
        stamp_address(s, "replay", new_id, actor, address)
    # The row is committed: if the broker is down now, the reconciler sends it later.
    enqueue_job(config, new_id, priority)
    return new_id


def failed_job_ids(config: Config, since: datetime | None = None) -> list[int]:
    with session_scope(config.database.url) as s:
        q = select(Job.id).where(Job.state == JobState.FAILED)
        if since is not None:
            q = q.where(Job.failed_at >= since)
        return list(s.scalars(q.order_by(Job.id)))


def replay_failed(config: Config, since: datetime | None, actor: str, reason: str,
                  address: str | None = None) -> list[dict[str, int]]:
    """Replay every failed job (failed since a time); [{replayed, job}] in id order."""
    return [{"replayed": j, "job": replay_job(config, j, actor, reason, address)} for j in failed_job_ids(config, since)]


def cancel_job(config: Config, job_id: int, actor: str, reason: str, address: str | None = None) -> None:
    """Cancel a job that has not finished (TransitionError otherwise); audited."""
    try:
        machine.cancel(config, job_id, actor=actor, reason=reason)
    except LookupError as e:
        raise NotFound(str(e)) from e
    with session_scope(config.database.url) as s:
        stamp_address(s, "cancel", job_id, actor, address)


def resend_job(config: Config, job_id: int, actor: str, reason: str, address: str | None = None) -> None:
    """Send the job's existing result objects again (no inference)."""
    from node.queue import enqueue_export

    try:
        machine.resend(config, job_id, actor=actor, reason=reason)
    except LookupError as e:
        raise NotFound(str(e)) from e
    with session_scope(config.database.url) as s:
        stamp_address(s, "resend", job_id, actor, address)
    enqueue_export(config, job_id)
