"""Delivery: what an export worker does with a job id.

Each output has a `Send` row per destination that wants it, so a retry skips what a destination
already holds. `run_export` claims the unsent rows, sends them (node/export.py does the
networking), confirms them where the destination asks for it (read back by C-FIND or QIDO-RS
now, or Storage Commitment: requested now, reported later to the listener, see
node/engine/commitment.py), records every outcome, and closes the job once every output
reached every destination.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningUpdate

from node import metrics
from node.config import Config, Destination
from node.db.models import ACTIVE_JOB_STATES, Job, JobState, Output, Send, SendState, utcnow
from node.db.session import session_scope
from node.engine.errors import RetryableExportError, Stage
from node.export import (
    CommitmentRefused,
    DestinationUnavailable,
    ObjectRef,
    SendOutcome,
    confirm_held,
    request_commitment,
    send_files,
)
from node.jobs import claim, finish_if_delivered, may_become, move_send
from node.spool import resolve

log = logging.getLogger(__name__)

SEND_CLAIM_SECONDS = 600  # a claim older than this belongs to an export worker that died


@dataclass(frozen=True)
class _Claim:
    """One Send this export task holds: the object's file and where it lives at the destination."""

    send_id: int
    path: Path
    ref: ObjectRef
    confirm_only: bool  # already stored there: only its read-back is due


@dataclass
class _Claims:
    """What `_claim_sends` found: the job's state (None: no such job) and its claimed sends."""

    job_state: JobState | None
    by_destination: dict[str, list[_Claim]] = field(default_factory=dict)


#: The send states each claim moves from: to send (never sent, failed, or a claim whose export
#: worker died), or only to confirm (stored; or a commitment report that did not come in time).
_TO_SEND = (SendState.PENDING, SendState.FAILED, SendState.SENDING)
_TO_CONFIRM = (SendState.STORED, SendState.COMMITTING)


def _claim_statement(states: tuple[SendState, ...], timed: SendState) -> ReturningUpdate[int]:
    """UPDATE ... RETURNING that claims the sends in :ids still in `states` (`timed` only once
    its updated_at is before :before), built once: this runs on the SR's path, inside the write lock."""
    return (update(Send)
            .where(Send.id.in_(bindparam("ids", expanding=True)), Send.state.in_(may_become(SendState.SENDING)),
                   or_(Send.state.in_([st for st in states if st != timed]),
                       and_(Send.state == timed, Send.updated_at < bindparam("before", type_=Send.updated_at.type))))
            .values(state=SendState.SENDING, updated_at=bindparam("now", type_=Send.updated_at.type))
            .returning(Send.id)
            .execution_options(synchronize_session=False))


_CLAIM_TO_SEND = _claim_statement(_TO_SEND, timed=SendState.SENDING)
_CLAIM_TO_CONFIRM = _claim_statement(_TO_CONFIRM, timed=SendState.COMMITTING)


def _claim_sends(config: Config, job_id: int) -> _Claims:
    """Mark the job's unsent (or unconfirmed) outputs as in flight for this task; return them by destination.

    The conditional UPDATEs make each claim atomic, so two export tasks for the same job (the
    SR's and the others') never send or confirm one object twice.
    """
    now = utcnow()
    stale = now - timedelta(seconds=SEND_CLAIM_SECONDS)
    waits = {d.name: now - timedelta(seconds=d.commitment_wait_seconds) for d in config.destinations}
    claimed: dict[str, list[_Claim]] = {}
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in (JobState.RUNNING, JobState.ENCODED, JobState.SENDING):
            return _Claims(job.state if job else None)
        # One query for every send of the job, and one UPDATE for all those to send: this runs on
        # the SR's path to the PACS, and loading outputs, study and sends one by one with two
        # UPDATEs per send took 5 of its 9 ms (#12). Read before the first change: on SQLite
        # that takes the database's one write lock, which every other process then waits for.
        study_uid = job.study.study_instance_uid
        sends = s.execute(select(Send.id, Send.state, Send.destination, Output.path, Output.series_instance_uid,
                                 Output.sop_instance_uid, Output.sop_class_uid)
                          .join(Output, Send.output_id == Output.id)
                          .where(Output.job_id == job_id).order_by(Output.id, Send.id)).all()
        if job.state == JobState.ENCODED and not claim(s, job, JobState.SENDING):
            s.refresh(job)  # the job's other export task moved it first (or it was cancelled)
            if job.state != JobState.SENDING:
                return _Claims(job.state)
        # As read: each UPDATE checks the state again, so what another task claimed meanwhile is not ours.
        ours: set[int] = set()
        to_send = [row.id for row in sends if row.state in _TO_SEND]
        if to_send:
            ours.update(s.scalars(_CLAIM_TO_SEND, {"ids": to_send, "before": stale, "now": now}))
        for destination in {row.destination for row in sends if row.state in _TO_CONFIRM}:
            to_confirm = [row.id for row in sends if row.state in _TO_CONFIRM and row.destination == destination]
            ours.update(s.scalars(_CLAIM_TO_CONFIRM, {"ids": to_confirm, "before": waits.get(destination, now),
                                                      "now": now}))
        for row in sends:
            if row.id in ours:
                ref = ObjectRef(study_uid, row.series_instance_uid, row.sop_instance_uid, row.sop_class_uid)
                claimed.setdefault(row.destination, []).append(
                    _Claim(row.id, resolve(config.storage.path, row.path), ref, confirm_only=row.state in _TO_CONFIRM))
        return _Claims(job.state, claimed)


@dataclass(frozen=True)
class _Failure:
    """Why one destination does not hold (or has not confirmed) some object yet."""

    stage: Stage  # send: not stored there; confirm: stored, not confirmed
    message: str


@dataclass
class _Delivered:
    """What one destination did with the claimed items: the network's part, not recorded yet."""

    dest: Destination
    items: list[_Claim]
    outcomes: dict[int, SendOutcome]  # by send id, for each item sent
    unavailable: str | None  # why nothing could be sent there
    stored: list[_Claim]  # held there now (sent, or stored by an earlier attempt)
    missing: dict[str, str | None]  # read back: SOP Instance UID -> why not found
    transaction: str | None  # the Storage Commitment transaction the stored ones wait under


def _deliver(config: Config, dest: Destination, items: list[_Claim]) -> _Delivered:
    """Send the claimed items, and read them back now where dest confirms by C-FIND or QIDO-RS."""
    to_send = [c for c in items if not c.confirm_only]
    outcomes: dict[int, SendOutcome] = {}
    unavailable: str | None = None
    if to_send:
        try:
            sent = send_files(dest, [c.path for c in to_send], config.export.calling_ae_title,
                              config.export.keep_association_seconds)
            outcomes = {c.send_id: o for c, o in zip(to_send, sent, strict=True)}
        except (DestinationUnavailable, OSError) as e:
            unavailable = f"{dest.name}: {e}"
    stored = [c for c in items if c.confirm_only or (c.send_id in outcomes and outcomes[c.send_id].ok)]
    # Storage Commitment: the sends wait under this transaction, recorded before it is requested
    # (the report may reach the listener before the request returns).
    transaction = generate_uid(prefix=None) if dest.confirm == "commitment" and stored else None
    missing: dict[str, str | None] = {}
    if dest.confirm in ("cfind", "qido") and stored:
        try:
            missing = confirm_held(dest, [c.ref for c in stored], config.export.calling_ae_title)
        except (DestinationUnavailable, OSError) as e:
            missing = {c.ref.sop_uid: f"read-back failed: {e}" for c in stored}
    return _Delivered(dest, items, outcomes, unavailable, stored, missing, transaction)


def _record(s: Session, d: _Delivered) -> list[_Failure]:
    """Record each claimed Send's outcome at d.dest in session s; return the failures."""
    failures = [_Failure(Stage.SEND, d.unavailable)] if d.unavailable else []
    # All read at once, before the first change is flushed (see _claim_sends)
    rows = {sd.id: sd for sd in s.scalars(select(Send).where(Send.id.in_([c.send_id for c in d.items])))}
    for c in d.items:
        sd = rows[c.send_id]
        if not c.confirm_only:
            sd.attempts += 1
            o = d.outcomes.get(c.send_id)
            if o is None:
                move_send(sd, SendState.FAILED, error=d.unavailable)
                continue
            sd.remote_status, sd.error = o.status, o.error
            if not o.ok:
                move_send(sd, SendState.FAILED)
                failures.append(_Failure(Stage.SEND, f"{d.dest.name}: {o.error}"))
                continue
            sd.sent_at = o.at
        if d.dest.confirm == "none":
            move_send(sd, SendState.SENT)
        elif d.transaction is not None:
            move_send(sd, SendState.COMMITTING, commitment_uid=d.transaction, error=None)
        elif d.missing.get(c.ref.sop_uid) is None:
            move_send(sd, SendState.SENT, confirmed_at=utcnow(), error=None)
        else:
            # Stored but not (yet) found: the next attempt only asks again, it does not resend.
            move_send(sd, SendState.STORED, error=f"not confirmed: {d.missing[c.ref.sop_uid]}")
            failures.append(_Failure(Stage.CONFIRM, f"{d.dest.name}: {sd.error}"))
    return failures


def _request_commitment(config: Config, dest: Destination, stored: list[_Claim], transaction: str) -> list[_Failure]:
    """Ask dest to commit the stored objects; if it cannot be asked, they wait as stored for the
    next attempt. The report comes to the listener (node/engine/commitment.py)."""
    try:
        request_commitment(dest, [c.ref for c in stored], config.export.calling_ae_title, transaction)
    except (DestinationUnavailable, CommitmentRefused, OSError) as e:
        with session_scope(config.database.url) as s:
            for c in stored:
                sd = s.get(Send, c.send_id)
                assert sd is not None
                if sd.state == SendState.COMMITTING and sd.commitment_uid == transaction:  # no report raced it
                    move_send(sd, SendState.STORED, error=f"storage commitment not requested: {e}")
        return [_Failure(Stage.CONFIRM, f"{dest.name}: storage commitment not requested: {e}")]
    log.info("storage commitment of %d objects requested from %s (transaction %s)", len(stored), dest.name, transaction)
    return []


def _awaiting_commitment(s: Session, job_id: int) -> list[_Failure]:
    """One failure per destination whose Storage Commitment report this job still awaits."""
    waiting = s.execute(
        select(Send.destination, func.count()).join(Output)
        .where(Output.job_id == job_id, Send.state == SendState.COMMITTING).group_by(Send.destination)
    ).all()
    return [_Failure(Stage.CONFIRM, f"{name}: awaiting its storage commitment report for {n} object(s)")
            for name, n in waiting]


def run_export(config: Config, job_id: int) -> None:
    """Send the job's unsent outputs to each destination; raise RetryableExportError if some failed.

    Runs for a job still encoding (its SR is out before the other objects are drawn) and once
    more when all outputs are written; the job is done when every output reached every
    destination that wants it, and was read back or committed where the destination confirms.
    """
    metrics.setup(config)
    claims = _claim_sends(config, job_id)
    state = claims.job_state
    if state is None or (not claims.by_destination and state == JobState.RUNNING):
        log.info("job %d: nothing to send (%s)", job_id, state.value if state else "gone")
        return
    t0 = time.perf_counter()
    failures: list[_Failure] = []
    dests = {d.name: d for d in config.destinations}
    last: _Delivered | None = None
    by_destination = list(claims.by_destination.items())
    for i, (name, items) in enumerate(by_destination):
        dest = dests.get(name)
        if dest is None:
            failures.append(_Failure(Stage.SEND, f"{name}: destination no longer configured"))
            with session_scope(config.database.url) as s:
                for c in items:
                    sd = s.get(Send, c.send_id)
                    assert sd is not None
                    move_send(sd, SendState.FAILED, error=failures[-1].message)
            continue
        delivered = _deliver(config, dest, items)
        if delivered.transaction is None and i == len(by_destination) - 1:
            last = delivered  # recorded below, with the job
            continue
        with session_scope(config.database.url) as s:
            failures += _record(s, delivered)
        if delivered.transaction is not None:  # recorded first: the report may come before the request returns
            failures += _request_commitment(config, dest, delivered.stored, delivered.transaction)
    elapsed = time.perf_counter() - t0
    # The last destination's outcome is recorded in the commit that closes the job: each commit
    # on SQLite holds the one write lock for its fsync, and the export made six of them a job.
    with session_scope(config.database.url) as s:
        if last is not None:
            failures += _record(s, last)
        s.execute(update(Job).where(Job.id == job_id).values(send_seconds=Job.send_seconds + elapsed))
        # Read after that UPDATE, which holds the job (SQLite: the write lock; PostgreSQL: its
        # row) until this commits: the job's other export task (the SR's, or the others') has
        # committed what it recorded, or waits for this. Read before it, both could see the
        # other's sends unsent, or the job not yet sending, and neither close the job.
        job = s.get(Job, job_id, populate_existing=True)
        assert job is not None
        error = None
        # Whoever records the last object closes the job (a commitment report may have done so
        # meanwhile); a job still encoding stays running. Until then, this task keeps retrying,
        # also while commitment reports are awaited: the retry asks again for those overdue.
        if not finish_if_delivered(s, job) and job.state in ACTIVE_JOB_STATES:
            failures += _awaiting_commitment(s, job_id)
        if failures and job.state in ACTIVE_JOB_STATES:
            # Recorded and committed here, raised after: a raise inside session_scope would roll
            # back the reason, the stage and the send time, and the operator would see nothing.
            # The earliest stage names the failure: an object not stored at all is worse than
            # one stored but not yet confirmed.
            stage = min((f.stage for f in failures), key=list(Stage).index)
            job.error, job.error_stage = "; ".join(f.message for f in failures)[:4000], stage.value
            job.updated_at = utcnow()
            error = job.error
    if error is not None:
        raise RetryableExportError(stage, error)
