"""The audit log: who did what, when, from where (Event rows)."""

from __future__ import annotations

from sqlalchemy import select

from node.config import Config
from node.db.models import Event
from node.db.session import session_scope
from node.services.paging import Page, check_limit, decode_cursor, encode_cursor


def record(config: Config, kind: str, actor: str | None, detail: str | None,
           job_id: int | None = None, address: str | None = None) -> None:
    """Add one audit entry (detail must never carry patient attributes)."""
    with session_scope(config.database.url) as s:
        s.add(Event(kind=kind[:32], actor=(actor or "")[:64] or None, detail=(detail or "")[:2000] or None,
                    job_id=job_id, address=(address or "")[:64] or None))


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
