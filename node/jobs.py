"""The job state machine: the database is the record of truth, Celery only carries work.

queued -> running -> encoded -> sending -> done, or failed / cancelled / superseded.
Every transition sets the state's own timestamp and `updated_at`. Each output's send to each
destination has its own, smaller machine (`SEND_ALLOWED`, `move_send`).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from node import metrics
from node.config import DEFAULT_PRIORITY, Config
from node.db.models import (
    ACTIVE_JOB_STATES,
    Event,
    Instance,
    Job,
    JobState,
    Output,
    Send,
    SendState,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from node.db.session import session_scope
from node.engine.errors import Stage
from node.routing import SeriesAttributes, merge_choices, route
from node.spool import held

log = logging.getLogger(__name__)

ALLOWED: dict[JobState, set[JobState]] = {
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.ENCODED, JobState.FAILED, JobState.QUEUED, JobState.CANCELLED},
    JobState.ENCODED: {JobState.SENDING, JobState.FAILED, JobState.CANCELLED, JobState.QUEUED},
    JobState.SENDING: {JobState.DONE, JobState.FAILED, JobState.SENDING, JobState.CANCELLED, JobState.QUEUED},
    # sending again: a re-send of the results already built (no inference)
    JobState.DONE: {JobState.SUPERSEDED, JobState.SENDING},
    JobState.FAILED: {JobState.SENDING},
    JobState.CANCELLED: set(),
    JobState.SUPERSEDED: set(),
}


#: One output's send to one destination. Every state may go back to pending: a re-send of a
#: finished job's results (`resend`). Sending -> sending: a claim whose export worker died is taken over.
SEND_ALLOWED: dict[SendState, set[SendState]] = {
    SendState.PENDING: {SendState.SENDING, SendState.PENDING},
    SendState.SENDING: {SendState.SENT, SendState.STORED, SendState.COMMITTING, SendState.FAILED, SendState.SENDING,
                        SendState.PENDING},
    # stored, its confirmation still due: claimed again only to ask for it
    SendState.STORED: {SendState.SENDING, SendState.PENDING},
    # the commitment report decides (committed: sent; refused: failed, stored again later); the
    # request did not reach the destination: stored; no report in time: claimed to ask again
    SendState.COMMITTING: {SendState.SENT, SendState.FAILED, SendState.STORED, SendState.SENDING, SendState.PENDING},
    SendState.SENT: {SendState.PENDING},
    SendState.FAILED: {SendState.SENDING, SendState.PENDING},
}


class TransitionError(RuntimeError):
    """A state change the state machine does not allow (e.g. a duplicate delivery)."""


class JobBusy(TransitionError):
    """The job is still active (queued, running, sending): it cannot be replayed or re-sent now."""


def transition(job: Job, new: JobState, **fields: Any) -> None:
    """Move job to state new, stamping `<new>_at`; refuse moves the machine does not allow."""
    if new not in ALLOWED[job.state]:
        raise TransitionError(f"job {job.id}: {job.state.value} -> {new.value} is not allowed")
    now = utcnow()
    job.state = new
    metrics.job_state(new.value)
    setattr(job, f"{new.value}_at", now)
    job.updated_at = now
    for k, v in fields.items():
        setattr(job, k, v)


def claim(s: Session, job: Job, new: JobState, **fields: Any) -> bool:
    """`transition`, as one UPDATE that applies only while the row still has the state and
    attempt `job` was read with; False where another process moved it first.

    For a change that two processes may race to make (two workers claiming one job): SQLite has
    no row locks (FOR UPDATE is dropped) and pysqlite reads outside a transaction, so both would
    read "queued" and both write "running". PostgreSQL also holds the FOR UPDATE lock; this is
    the same rule there.
    """
    if new not in ALLOWED[job.state]:
        raise TransitionError(f"job {job.id}: {job.state.value} -> {new.value} is not allowed")
    now = utcnow()
    values = {"state": new, f"{new.value}_at": now, "updated_at": now, **fields}
    res = s.execute(update(Job).where(Job.id == job.id, Job.state == job.state, Job.attempt == job.attempt)
                    .values(**values).execution_options(synchronize_session=False))
    if res.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult
        return False
    for k, v in values.items():  # the loaded object as written, not dirty: no second UPDATE at flush
        set_committed_value(job, k, v)
    metrics.job_state(new.value)
    return True


def move_send(send: Send, new: SendState, **fields: Any) -> None:
    """Move a send to state new, stamping `updated_at`; refuse moves its machine does not allow."""
    if new not in SEND_ALLOWED[send.state]:
        raise TransitionError(f"send {send.id} to {send.destination}: {send.state.value} -> {new.value} is not allowed")
    send.state = new
    send.updated_at = utcnow()
    for k, v in fields.items():
        setattr(send, k, v)


def may_become(new: SendState) -> tuple[SendState, ...]:
    """The send states the machine lets move to `new` (for conditional UPDATEs that claim rows)."""
    return tuple(st for st, targets in SEND_ALLOWED.items() if new in targets)


def finish_if_delivered(s: Session, job: Job) -> bool:
    """Close a sending job once every output reached every destination that wants it (and was
    confirmed there where the destination asks); its predecessor is then superseded. Whoever
    records the last send closes the job: the export task, or a Storage Commitment report."""
    unsent = s.scalar(select(func.count()).select_from(Send).join(Output)
                      .where(Output.job_id == job.id, Send.state != SendState.SENT))
    if job.state != JobState.SENDING or unsent:
        return False
    transition(job, JobState.DONE, error=None, error_stage=None)
    if job.supersedes is not None and job.supersedes.state == JobState.DONE:
        transition(job.supersedes, JobState.SUPERSEDED)
    return True


def fail_job(config: Config, job_id: int, stage: Stage, message: str) -> None:
    """Fail a job at `stage` with the reason, unless it already ended."""
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is not None and job.state not in (JobState.FAILED, JobState.CANCELLED, JobState.DONE):
            transition(job, JobState.FAILED, error=message[:4000], error_stage=stage.value)
    log.error("job %d failed at %s: %s", job_id, stage.value, message)


def requeue(config: Config, job_id: int, why: str) -> None:
    """Put a running job back to queued (its task retries it), keeping why on the job."""
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is not None and job.state == JobState.RUNNING:
            transition(job, JobState.QUEUED, error=f"will retry: {why}"[:4000])


def enabled_pipelines(config: Config) -> tuple[str, ...]:
    return tuple(name for name, p in config.pipelines.items() if p.enabled)


def series_attributes(series: Series, first: Instance) -> SeriesAttributes:
    """What routing sees of a series: its stored record, or (rows from before 0002) its columns."""
    if series.routing_attributes is not None:
        return SeriesAttributes.from_record(series.routing_attributes)
    return SeriesAttributes(first.sop_class_uid, series.modality, series.body_part, series.view_position)


def create_jobs_for_study(s: Session, config: Config, study: Study) -> list[Job]:
    """Route the study's pending series and create one queued job per pipeline that has images.

    A job's priority is the highest of its series' rules; its destinations the union of theirs
    (null, meaning every configured destination, as soon as one rule names none).
    """
    pipelines = enabled_pipelines(config)
    now = utcnow()
    for series in s.scalars(select(Series).where(Series.study_id == study.id, Series.state == SeriesState.PENDING)):
        first = s.scalar(select(Instance).where(Instance.series_id == series.id).order_by(Instance.id).limit(1))
        if first is None:
            continue
        decision = route(series_attributes(series, first), config.routing, pipelines)
        series.state = SeriesState.SKIPPED if decision.skipped else SeriesState.ROUTED
        series.skip_reason = decision.reason if decision.skipped else None
        series.routing_rule = decision.rule
        series.pipelines = list(decision.pipelines) or None
        series.priority = decision.priority
        series.destinations = None if decision.destinations is None else list(decision.destinations)
        series.objects = None if decision.objects is None else list(decision.objects)
        series.routed_at = now
        if decision.skipped:
            log.info("series %s skipped by rule %s: %s", series.series_instance_uid, decision.rule, decision.reason)
    routed = s.scalars(
        select(Series).where(Series.study_id == study.id, Series.state == SeriesState.ROUTED).order_by(Series.id)
    ).all()
    jobs = []
    for name in pipelines:
        # Rows routed before 0002 have no pipelines recorded: they went to every pipeline.
        mine = [se for se in routed if se.pipelines is None or name in se.pipelines]
        if not mine:
            continue
        instance_ids = s.scalars(
            select(Instance.id).where(Instance.series_id.in_([se.id for se in mine])).order_by(Instance.id)
        ).all()
        destinations = merge_choices(se.destinations for se in mine)
        objects = merge_choices(se.objects for se in mine)
        previous = s.scalar(
            select(Job).where(Job.study_id == study.id, Job.pipeline == name).order_by(Job.id.desc()).limit(1)
        )
        job = Job(study_id=study.id, pipeline=name, state=JobState.QUEUED, attempt=0, instance_ids=list(instance_ids),
                  timings={}, created_at=now, queued_at=now, updated_at=now,
                  priority=max(se.priority if se.priority is not None else DEFAULT_PRIORITY for se in mine),
                  destinations=destinations, objects=objects,
                  supersedes_id=previous.id if previous is not None else None)
        s.add(job)
        jobs.append(job)
    s.flush()
    return jobs


def replay(config: Config, job_id: int, actor: str, reason: str) -> int:
    """Create a new queued job that redoes job_id (same study, pipeline and images); return its id."""
    with session_scope(config.database.url) as s:
        old = s.get(Job, job_id)
        if old is None:
            raise LookupError(f"no job {job_id}")
        if old.state in ACTIVE_JOB_STATES:
            raise JobBusy(f"job {job_id} is {old.state.value}; cancel it before replaying")
        paths = s.scalars(select(Instance.path).where(Instance.id.in_(old.instance_ids)))
        _require_files(config, old, "source instances", list(paths), "send the study again, then replay")
        now = utcnow()
        new = Job(study_id=old.study_id, pipeline=old.pipeline, state=JobState.QUEUED, attempt=0,
                  instance_ids=list(old.instance_ids), timings={}, created_at=now, queued_at=now,
                  updated_at=now, replay_of=old.id, priority=old.priority, destinations=old.destinations,
                  objects=old.objects,
                  supersedes_id=old.id if old.state == JobState.DONE else old.supersedes_id)
        s.add(new)
        s.flush()
        s.add(Event(kind="replay", job_id=new.id, actor=actor, detail=f"replay of job {job_id}: {reason}"))
        return new.id


def cancel(config: Config, job_id: int, actor: str, reason: str) -> None:
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        transition(job, JobState.CANCELLED, error=f"cancelled by {actor}: {reason}")
        s.add(Event(kind="cancel", job_id=job_id, actor=actor, detail=reason))


def resend(config: Config, job_id: int, actor: str, reason: str) -> None:
    """Send a finished job's existing result objects to its destinations again (no inference)."""
    with session_scope(config.database.url) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise LookupError(f"no job {job_id}")
        if job.state in ACTIVE_JOB_STATES:
            raise JobBusy(f"job {job_id} is {job.state.value}; wait for it to finish before re-sending")
        sends = s.scalars(select(Send).join(Output).where(Output.job_id == job_id)).all()
        if not sends:
            raise TransitionError(f"job {job_id} has no result objects to send; replay it instead")
        _require_files(config, job, "result objects", sorted({sd.output.path for sd in sends}), "replay it instead")
        transition(job, JobState.SENDING, error=None, error_stage=None)
        for sd in sends:
            move_send(sd, SendState.PENDING, attempts=0, error=None)
        s.add(Event(kind="resend", job_id=job_id, actor=actor, detail=reason))


def _require_files(config: Config, job: Job, what: str, relpaths: list[str], instead: str) -> None:
    """TransitionError naming how many of the job's files are gone from the spool (and why,
    where storage.retention_days removed them)."""
    missing = sum(not held(config.storage.path, rel) for rel in relpaths)
    if missing:
        purged = job.study.purged_at
        why = f": its study's files left the spool on {purged:%Y-%m-%d %H:%M} UTC (storage.retention_days)" if purged else ""
        raise TransitionError(f"job {job.id}: {missing} of its {len(relpaths)} {what} are no longer in the spool{why}; {instead}")


def heartbeat(config: Config, job_id: int, worker: str) -> bool:
    """Mark running jobs alive (their `updated_at`): job_id if `worker` still holds it, and any
    other job the same worker took into its batch. Return whether the worker still holds job_id."""
    with session_scope(config.database.url) as s:
        s.execute(
            update(Job)
            .where(Job.state == JobState.RUNNING, Job.worker == worker)
            .values(updated_at=utcnow())
        )
        return s.scalar(select(Job.id).where(Job.id == job_id, Job.state == JobState.RUNNING,
                                             Job.worker == worker)) is not None


def abandoned(job: Job, config: Config, now: datetime | None = None) -> bool:
    """Whether a running job's worker has stopped beating (died, was killed, lost the database)."""
    now = now or utcnow()
    return job.state == JobState.RUNNING and (now - job.updated_at).total_seconds() >= config.queue.lost_after_seconds


def reconcile(config: Config, stale_after: float | None = None) -> list[int]:
    """Find jobs whose worker died or whose message was lost and send their work again.

    Each active state has its own staleness, because "nothing happened for a while" means
    different things in each:

    - running: the worker updates `updated_at` every `queue.heartbeat_seconds` while the task
      runs (node.tasks), so a job whose mark is older than `queue.lost_after_seconds` has lost
      its worker (kill -9, power cut). This never steals from a live long-running task, however
      long it takes, and does not wait for Redis's visibility timeout (an hour) to notice.
    - queued: nothing touches a queued job until a worker takes it, so one unchanged for
      `queue.requeue_queued_seconds` while the broker's inference queue is *empty* had its
      message lost (a Redis restart without persistence). While messages still wait, the queue
      is moving and a lost job is re-sent once the backlog drains: a deep queue is not flooded
      with duplicates. A duplicate that does happen (a worker took the last message but has
      not claimed its job yet) is harmless: a worker claims a job under a row lock and ignores
      a delivery for a job that is no longer queued, or is running with a live heartbeat.
      `updated_at` is bumped, so each job is re-sent at most once per period.
    - encoded/sending: export retries touch the row on every attempt, so the task hard limit
      plus the longest backoff plus a minute means the export message is gone.

    `stale_after` overrides all three (`pacsnode run` passes 0: its previous workers are gone).
    """
    from node.queue import INFERENCE_QUEUE, enqueue_export, enqueue_job, waiting

    q = config.queue
    # Asked before the transaction: an unreachable broker stops this pass before it changes rows.
    backlog = 0 if stale_after is not None else waiting(config, INFERENCE_QUEUE)
    now = utcnow()

    def older_than(seconds: float) -> datetime:
        return now - timedelta(seconds=seconds if stale_after is None else stale_after)

    export_stale = q.task_time_limit + config.export.backoff_max_seconds + 60
    conditions = [
        (Job.state == JobState.RUNNING) & (Job.updated_at <= older_than(q.lost_after_seconds)),
        Job.state.in_((JobState.ENCODED, JobState.SENDING)) & (Job.updated_at <= older_than(export_stale)),
    ]
    if backlog == 0:
        conditions.append((Job.state == JobState.QUEUED) & (Job.updated_at <= older_than(q.requeue_queued_seconds)))
    stuck = or_(*conditions)
    requeued: list[tuple[int, JobState, int]] = []
    with session_scope(config.database.url) as s:
        # Row locks: two listeners reconciling at once must not both re-send (PostgreSQL). SKIP
        # LOCKED leaves rows a worker is claiming right now; SQLite has neither, so the running
        # job's move is a claim.
        for job in s.scalars(select(Job).where(stuck).with_for_update(skip_locked=True)).all():
            detail = f"{job.state.value} since {job.updated_at.isoformat()} (worker {job.worker})"
            if job.state == JobState.RUNNING and not claim(s, job, JobState.QUEUED, worker=None):
                continue  # a worker took it over since the SELECT (SQLite: no SKIP LOCKED)
            log.warning("job %d unchanged in %s: sending it again", job.id, detail)
            s.add(Event(kind="requeue", job_id=job.id, actor="reconciler", detail=detail))
            job.updated_at = now
            requeued.append((job.id, job.state, job.priority))
    for job_id, state, priority in requeued:
        if state == JobState.QUEUED:
            enqueue_job(config, job_id, priority)
        else:
            enqueue_export(config, job_id)
    return [j for j, _, _ in requeued]


def job_to_dict(job: Job) -> dict[str, Any]:
    """The JSON shape scripts rely on (`pacsnode jobs --json`)."""
    def ts(v: datetime | None) -> str | None:
        return v.isoformat() if v else None

    return {
        "id": job.id,
        "study_instance_uid": job.study.study_instance_uid,
        "pipeline": job.pipeline,
        "model_version": job.model_version,
        "state": job.state.value,
        "attempt": job.attempt,
        "worker": job.worker,
        "error": job.error,
        "error_stage": job.error_stage,
        "replay_of": job.replay_of,
        "supersedes": job.supersedes_id,
        "priority": job.priority,
        "destinations": job.destinations,
        "objects": job.objects,
        "timings": job.stage_seconds,
        "created_at": ts(job.created_at),
        "updated_at": ts(job.updated_at),
        **{f"{st.value}_at": ts(getattr(job, f"{st.value}_at")) for st in JobState},
        "outputs": [
            {
                "kind": o.kind,
                "sop_instance_uid": o.sop_instance_uid,
                "checks": o.checks,
                "series_instance_uid": o.series_instance_uid,
                "sends": [
                    {"destination": sd.destination, "state": sd.state.value, "attempts": sd.attempts,
                     "remote_status": sd.remote_status, "error": sd.error, "sent_at": ts(sd.sent_at)}
                    for sd in o.sends
                ],
            }
            for o in job.outputs
        ],
    }
