"""The audit log: who did what, when, from where (Event rows)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from node.config import Config
from node.db.models import Event, utcnow
from node.db.session import session_scope
from node.services.paging import Page, check_limit, decode_cursor, encode_cursor

VIEW_STUDY = "view_study"
#: The kinds of entry the node writes (the audit page's filter): people's actions, then the node's.
KINDS = ("login", "login_failed", "logout", VIEW_STUDY, "replay", "replay_failed", "cancel", "resend", "echo",
         "user_add", "user_remove", "user_password", "token_create", "token_revoke", "association_rejected",
         "store_refused", "store_failed", "instance_version", "requeue", "revision",
         "purge", "listener_process_ended")


def record(config: Config, kind: str, actor: str | None, detail: str | None,
           job_id: int | None = None, address: str | None = None) -> None:
    """Add one audit entry (detail must never carry patient attributes)."""
    with session_scope(config.database.url) as s:
        s.add(Event(kind=kind[:32], actor=(actor or "")[:64] or None, detail=(detail or "")[:2000] or None,
                    job_id=job_id, address=(address or "")[:64] or None))


def record_view(config: Config, actor: str, study_instance_uid: str, address: str | None,
                unless_within: timedelta | None = None) -> None:
    """Audit a view of a study. `unless_within`: skip it when the same actor viewed the same
    study that recently (the study page's live refreshes and its images are part of one view)."""
    if unless_within is not None:
        with session_scope(config.database.url) as s:
            seen = s.scalar(select(Event.id).where(Event.kind == VIEW_STUDY, Event.at >= utcnow() - unless_within,
                                                   Event.actor == actor[:64], Event.detail == study_instance_uid)
                            .limit(1))
        if seen is not None:
            return
    record(config, VIEW_STUDY, actor, study_instance_uid, address=address)


def stamp_address(s: Session, kind: str, job_id: int, actor: str, address: str | None) -> None:
    """Add the caller's address to the audit entry the job state machine just wrote for an
    action (it records who and why, but knows nothing of HTTP)."""
    if not address:
        return
    newest = select(Event.id).where(Event.kind == kind, Event.job_id == job_id, Event.actor == actor[:64]) \
        .order_by(Event.id.desc()).limit(1).scalar_subquery()
    s.execute(update(Event).where(Event.id == newest).values(address=address[:64]))


def list_audit(config: Config, limit: int = 100, cursor: str | None = None, kind: str | None = None) -> Page:
    """Audit entries, newest first."""
    check_limit(limit)
    below = decode_cursor(cursor)
    q = select(Event)
    if kind:
        q = q.where(Event.kind == kind)
    if below is not None:
        q = q.where(Event.id < below)
    with session_scope(config.database.url) as s:
        rows = s.scalars(q.order_by(Event.id.desc()).limit(limit + 1)).all()
        items = [{"id": e.id, "at": e.at.isoformat(), "kind": e.kind, "actor": e.actor, "job_id": e.job_id,
                  "detail": e.detail, "address": e.address} for e in rows[:limit]]
    return Page(items, encode_cursor(rows[limit - 1].id) if len(rows) > limit else None)

