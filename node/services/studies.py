"""List and show studies (`pacsnode studies`, `GET /api/v1/studies`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import selectinload

from node.config import Config
from node.db.models import Job, Output, Series, Study, StudyState
from node.db.session import session_scope
from node.identifiers import keyed_hash
from node.jobs import job_to_dict
from node.services.errors import Invalid, NotFound
from node.services.paging import Page, check_limit, decode_cursor, encode_cursor


def _ts(v: datetime | None) -> str | None:
    return v.isoformat() if v else None


def study_summary(st: Study) -> dict[str, Any]:
    """The list shape: one row per study (needs series and jobs loaded)."""
    skipped = "; ".join(f"{se.modality}: {se.skip_reason}" for se in st.series if se.skip_reason) or None
    return {
        "id": st.id,
        "study_instance_uid": st.study_instance_uid,
        "state": st.state.value,
        "instances": st.instance_count,
        "received_at": _ts(st.first_received_at),
        "last_received_at": _ts(st.last_received_at),
        "completed_at": _ts(st.completed_at),
        "completion_rule": st.completion_rule,
        "skip_reason": skipped,
        "jobs": [j.id for j in st.jobs],
        "calling_ae": st.calling_ae,
        "series": [series_summary(se) for se in st.series],
    }


def series_summary(se: Series) -> dict[str, Any]:
    """A series and its routing decision (needs instances loaded)."""
    return {
        "series_instance_uid": se.series_instance_uid,
        "modality": se.modality,
        "body_part": se.body_part,
        "view_position": se.view_position,
        "instances": len(se.instances),
        "state": se.state.value,
        "skip_reason": se.skip_reason,
        "routing": {
            "rule": se.routing_rule,
            "action": None if se.routed_at is None else ("skip" if se.skip_reason else "process"),
            "reason": se.skip_reason,
            "pipelines": se.pipelines,
            "priority": se.priority,
            "destinations": se.destinations,
            "objects": se.objects,
            "routed_at": _ts(se.routed_at),
        },
    }


def list_studies(config: Config, state: str | None = None, q: str | None = None, since: datetime | None = None,
                 limit: int = 50, cursor: str | None = None) -> Page:
    """Studies newest first (by arrival), keyset-paged.

    `q` is an exact Study Instance UID, Accession Number or Patient ID; the last two are compared
    as keyed hashes, so the query is a bound parameter and never text in the SQL.
    """
    check_limit(limit)
    below = decode_cursor(cursor)
    query = select(Study).options(selectinload(Study.series).selectinload(Series.instances), selectinload(Study.jobs))
    if state:
        try:
            query = query.where(Study.state == StudyState(state))
        except ValueError as e:
            raise Invalid("state", f"one of {', '.join(s.value for s in StudyState)}") from e
    if q:
        h = keyed_hash(config, q)
        query = query.where(or_(Study.study_instance_uid == q.strip(), Study.accession_hash == h,
                                Study.patient_id_hash == h))
    if since is not None:
        query = query.where(Study.first_received_at >= since)
    if below is not None:
        query = query.where(Study.id < below)
    with session_scope(config.database.url) as s:
        rows = s.scalars(query.order_by(Study.id.desc()).limit(limit + 1)).all()
        items = [study_summary(st) for st in rows[:limit]]
    return Page(items, encode_cursor(items[-1]["id"]) if len(rows) > limit else None)


def get_study(config: Config, study_instance_uid: str) -> dict[str, Any]:
    """One study: series with their routing decision, every job with outputs and sends."""
    with session_scope(config.database.url) as s:
        st = s.scalar(
            select(Study).where(Study.study_instance_uid == study_instance_uid).options(
                selectinload(Study.series).selectinload(Series.instances),
                selectinload(Study.jobs).selectinload(Job.outputs).selectinload(Output.sends),
            )
        )
        if st is None:
            raise NotFound(f"no study {study_instance_uid}")
        return {
            **study_summary(st),
            "released_at": _ts(st.released_at),
            "expected_instances": st.expected_instances,
            "job_details": [job_to_dict(j) for j in st.jobs],
        }
