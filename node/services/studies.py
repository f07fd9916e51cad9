"""List and show studies (`pacsnode studies`, `GET /api/v1/studies`, the dashboard's study pages)."""

from __future__ import annotations

import logging
from datetime import datetime
from types import SimpleNamespace
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, selectinload

from node.config import Config
from node.db.models import Instance, Job, JobState, Output, Series, Study, StudyState
from node.db.session import session_scope
from node.identifiers import keyed_hash
from node.jobs import job_to_dict
from node.services.errors import Invalid, NotFound
from node.services.paging import Page, check_limit, decode_cursor, encode_cursor
from node.spool import held

log = logging.getLogger(__name__)


def _ts(v: datetime | None) -> str | None:
    return v.isoformat() if v else None


def study_summary(st: Any, instances_per_series: dict[int, int]) -> dict[str, Any]:
    """The list shape of a study (an ORM Study or a row namespace with `series` and `jobs`)."""
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
        "purged_at": _ts(st.purged_at),  # its files left the spool (storage.retention_days); rows stay
        "skip_reason": skipped,
        "jobs": [j.id for j in st.jobs],
        "job_states": [j.state.value for j in st.jobs],
        "calling_ae": st.calling_ae,
        "series": [series_summary(se, instances_per_series.get(se.id, 0)) for se in st.series],
    }


def series_summary(se: Any, instances: int) -> dict[str, Any]:
    """A series and its routing decision."""
    return {
        "series_instance_uid": se.series_instance_uid,
        "modality": se.modality,
        "body_part": se.body_part,
        "view_position": se.view_position,
        "instances": instances,
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


def _instance_counts(s: Session, series_ids: list[int]) -> dict[int, int]:
    """Instances per series, counted in one grouped query."""
    if not series_ids:
        return {}
    rows = s.execute(select(Instance.series_id, func.count()).where(Instance.series_id.in_(series_ids))
                     .group_by(Instance.series_id))
    return {sid: int(n) for sid, n in rows}


_SERIES_COLUMNS = [c for c in Series.__table__.c if c.name != "routing_attributes"]


def list_studies(config: Config, state: str | None = None, q: str | None = None, since: datetime | None = None,
                 limit: int = 50, cursor: str | None = None) -> Page:
    """Studies newest first (by arrival), keyset-paged.

    `q` is an exact Study Instance UID, Accession Number or Patient ID; the last two are compared
    as keyed hashes, so the query is a bound parameter and never text in the SQL. Rows are read
    as plain rows (series and jobs in one query each), not ORM objects: a page stays cheap.
    """
    check_limit(limit)
    below = decode_cursor(cursor)
    query = select(Study.__table__)
    if state:
        try:
            query = query.where(Study.state == StudyState(state))
        except ValueError as e:
            raise Invalid("state", f"one of {', '.join(s.value for s in StudyState)}") from e
    if q and q.strip():
        h = keyed_hash(config, q)
        query = query.where(or_(Study.study_instance_uid == q.strip(), Study.accession_hash == h,
                                Study.patient_id_hash == h))
    if since is not None:
        query = query.where(Study.first_received_at >= since)
    if below is not None:
        query = query.where(Study.id < below)
    with session_scope(config.database.url) as s:
        rows = s.execute(query.order_by(Study.id.desc()).limit(limit + 1)).all()
        page = rows[:limit]
        ids = [r.id for r in page]
        studies = {r.id: SimpleNamespace(**r._mapping, series=[], jobs=[]) for r in page}
        for se in s.execute(select(*_SERIES_COLUMNS).where(Series.study_id.in_(ids)).order_by(Series.id)):
            studies[se.study_id].series.append(se)
        for j in s.execute(select(Job.id, Job.study_id, Job.state).where(Job.study_id.in_(ids)).order_by(Job.id)):
            studies[j.study_id].jobs.append(j)
        counts = _instance_counts(s, [se.id for st in studies.values() for se in st.series])
    items = [study_summary(studies[i], counts) for i in ids]
    return Page(items, encode_cursor(items[-1]["id"]) if len(rows) > limit else None)


def get_study(config: Config, study_instance_uid: str) -> dict[str, Any]:
    """One study: series with their routing decision, every job with outputs and sends, the
    timeline from its first instance to its results confirmed at the destinations, and the
    findings of its latest result."""
    with session_scope(config.database.url) as s:
        st = s.scalar(
            select(Study).where(Study.study_instance_uid == study_instance_uid).options(
                selectinload(Study.series),
                selectinload(Study.jobs).selectinload(Job.outputs).selectinload(Output.sends),
            )
        )
        if st is None:
            raise NotFound(f"no study {study_instance_uid}")
        latest = _latest_result(config, st)
        return {
            **study_summary(st, _instance_counts(s, [se.id for se in st.series])),
            "released_at": _ts(st.released_at),
            "expected_instances": st.expected_instances,
            "job_details": [job_to_dict(j) for j in st.jobs],
            "timeline": timeline(st),
            "latest_result": latest,
            "findings": latest["findings"] if latest else None,
        }


def _latest_result(config: Config, st: Study) -> dict[str, Any] | None:
    """The newest job with an SR: its findings (read from the SR file once, then kept on the
    output row), its SR and its overlay objects (ids for the dashboard's text and preview)."""
    from node.services.results import sr_findings

    job = next((j for j in reversed(st.jobs) if any(o.kind == "sr" for o in j.outputs)), None)
    if job is None:
        return None
    sr = next(o for o in job.outputs if o.kind == "sr")
    note = None
    if sr.findings is None:
        try:
            sr.findings = sr_findings(config, sr.path)  # committed with the session
        except (NotFound, ValueError) as e:
            note = str(e)
            log.warning("findings of output %d (job %d) not readable: %s", sr.id, job.id, e)
    return {"job": job.id, "state": job.state.value, "model_version": job.model_version,
            "sr": {"output_id": sr.id, "sop_instance_uid": sr.sop_instance_uid,
                   "in_spool": held(config.storage.path, sr.path)},
            # not those whose file left the spool (storage.retention_days): no broken image
            "overlays": [{"output_id": o.id, "sop_instance_uid": o.sop_instance_uid}
                         for o in job.outputs if o.kind == "sc" and held(config.storage.path, o.path)],
            "findings": sr.findings, "note": note}


def timeline(st: Study) -> list[dict[str, Any]]:
    """What happened to the study, oldest first: arrival, release, completion, routing, each
    job's states, each result sent and read back at its destination."""
    events: list[tuple[datetime, str, str | None, int | None]] = [
        (st.first_received_at, "first instance received", f"from {st.calling_ae}" if st.calling_ae else None, None)]
    if st.last_received_at and st.last_received_at != st.first_received_at:
        events.append((st.last_received_at, "last instance received", f"{st.instance_count} instances", None))
    if st.released_at:
        events.append((st.released_at, "sender released the association", None, None))
    if st.completed_at:
        events.append((st.completed_at, "study complete", f"rule {st.completion_rule}", None))
    for se in st.series:
        if se.routed_at:
            what = f"series {se.modality or '?'} skipped" if se.skip_reason else f"series {se.modality or '?'} routed"
            events.append((se.routed_at, what, se.skip_reason or (f"rule {se.routing_rule}" if se.routing_rule else None),
                           None))
    for j in st.jobs:
        for state in JobState:
            at = getattr(j, f"{state.value}_at")
            if at is None:
                continue
            detail = {JobState.QUEUED: f"{j.pipeline}" + (f", replay of job {j.replay_of}" if j.replay_of else ""),
                      JobState.RUNNING: j.worker, JobState.ENCODED: f"{len(j.outputs)} objects",
                      JobState.FAILED: f"{j.error_stage}: {j.error}" if j.error else j.error_stage,
                      JobState.CANCELLED: j.error}.get(state)
            events.append((at, f"job {j.id} {state.value}", detail, j.id))
        for o in j.outputs:
            for sd in o.sends:
                if sd.sent_at:
                    status = f"status 0x{sd.remote_status:04X}" if sd.remote_status is not None else "sent"
                    events.append((sd.sent_at, f"{o.kind.upper()} stored at {sd.destination}", status, j.id))
                if sd.confirmed_at:
                    events.append((sd.confirmed_at, f"{o.kind.upper()} confirmed in {sd.destination}", "read back", j.id))
    events.sort(key=lambda e: e[0])
    start = st.first_received_at
    return [{"at": at.isoformat(), "after_seconds": round((at - start).total_seconds(), 3), "event": what,
             "detail": detail, "job": job} for at, what, detail, job in events]


def first_instance_path(config: Config, study_instance_uid: str) -> str:
    """Spool path of the study's first received instance (for its patient attributes)."""
    with session_scope(config.database.url) as s:
        path = s.scalar(select(Instance.path).join(Series).join(Study)
                        .where(Study.study_instance_uid == study_instance_uid).order_by(Instance.id).limit(1))
    if path is None:
        raise NotFound(f"no instance of study {study_instance_uid}")
    return path


def output_of(config: Config, output_id: int) -> dict[str, Any]:
    """One result object's row: kind, spool path and the study it belongs to."""
    with session_scope(config.database.url) as s:
        row = s.execute(select(Output.kind, Output.path, Output.sop_instance_uid, Study.study_instance_uid)
                        .join(Job, Output.job_id == Job.id).join(Study, Job.study_id == Study.id)
                        .where(Output.id == output_id)).first()
    if row is None:
        raise NotFound(f"no result object {output_id}")
    return {"kind": row[0], "path": row[1], "sop_instance_uid": row[2], "study_instance_uid": row[3]}
