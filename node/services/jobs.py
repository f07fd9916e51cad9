"""List, show, replay, cancel and re-send jobs (`pacsnode jobs|replay|cancel`, `/api/v1/jobs`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from types import SimpleNamespace
from typing import Any, cast

from sqlalchemy import Row, select
from sqlalchemy.orm import Session, selectinload

from node import jobs as machine
from node.config import Config
from node.db.models import Job, JobState, Output, Send, Study
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
    q = select(Job.__table__, Study.study_instance_uid).join(Study, Job.study_id == Study.id)
    st = _state(state)
    if st is not None:
        q = q.where(Job.state == st)
    if since is not None:
        q = q.where(Job.updated_at >= since)
    if below is not None:
        q = q.where(Job.id < below)
    with session_scope(config.database.url) as s:
        rows = s.execute(q.order_by(Job.id.desc()).limit(limit + 1)).all()
        items = _as_dicts(s, rows[:limit])
    return Page(items, encode_cursor(items[-1]["id"]) if len(rows) > limit else None)


def _as_dicts(s: Session, rows: Sequence[Row[Any]]) -> list[dict[str, Any]]:
    """Job rows (with their study's UID) as `job_to_dict` shapes them plus `replayed_as`, outputs,
    sends and replays read in three more queries. job_to_dict only reads attributes, so it is given namespaces of the rows'
    columns: a page of 50 jobs with 400 result rows costs a third of loading them as ORM objects."""
    ids = [r.id for r in rows]
    outputs: dict[int, list[SimpleNamespace]] = {i: [] for i in ids}
    by_output: dict[int, SimpleNamespace] = {}
    for o in s.execute(select(Output.id, Output.job_id, Output.kind, Output.sop_instance_uid, Output.checks,
                              Output.series_instance_uid).where(Output.job_id.in_(ids)).order_by(Output.id)):
        by_output[o.id] = SimpleNamespace(**o._mapping, sends=[])
        outputs[o.job_id].append(by_output[o.id])
    if by_output:
        for sd in s.execute(select(Send.output_id, Send.destination, Send.state, Send.attempts, Send.remote_status,
                                   Send.error, Send.sent_at).where(Send.output_id.in_(list(by_output))).order_by(Send.id)):
            by_output[sd.output_id].sends.append(sd)
    replays = _replays(s, ids)
    out = []
    for r in rows:
        job = SimpleNamespace(**{k: v for k, v in r._mapping.items() if k != "study_instance_uid"},
                              study=SimpleNamespace(study_instance_uid=r.study_instance_uid), outputs=outputs[r.id])
        job.stage_seconds = Job.stage_seconds.fget(job)  # type: ignore[attr-defined]
        out.append({**job_to_dict(cast(Job, job)), "replayed_as": replays.get(r.id, [])})
    return out


def get_job(config: Config, job_id: int) -> dict[str, Any]:
    """One job as `job_to_dict` shapes it, with `replayed_as`: the jobs that replayed it."""
    with session_scope(config.database.url) as s:
        job = s.scalar(select(Job).where(Job.id == job_id).options(
            selectinload(Job.study), selectinload(Job.outputs).selectinload(Output.sends)))
        if job is None:
            raise NotFound(f"no job {job_id}")
        return {**job_to_dict(job), "replayed_as": _replays(s, [job_id]).get(job_id, [])}


def _replays(s: Session, ids: list[int]) -> dict[int, list[int]]:
    """For each of these jobs, the ids of the jobs that replayed it (oldest first)."""
    out: dict[int, list[int]] = {}
    for new, old in s.execute(select(Job.id, Job.replay_of).where(Job.replay_of.in_(ids)).order_by(Job.id)).tuples():
        if old is not None:
            out.setdefault(old, []).append(new)
    return out


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
        # not those whose study's files left the spool (`pacsnode purge --include-failed`): nothing to redo them from
        q = select(Job.id).join(Study).where(Job.state == JobState.FAILED, Study.purged_at.is_(None))
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
