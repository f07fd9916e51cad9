"""Tables: the record of truth for studies, instances, jobs and what was sent where.

Every state change has a timestamp column. Patient-identifying attributes are not stored.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from node.config import DEFAULT_PRIORITY
from node.engine.errors import Stage


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC timestamps on every backend (SQLite drops the zone on read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given; use node.db.models.utcnow()")
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _ts(nullable: bool = True) -> Mapped[datetime | None]:
    return mapped_column(UTCDateTime(), nullable=nullable)


class StudyState(enum.StrEnum):
    RECEIVING = "receiving"  # instances still arriving or association open
    COMPLETE = "complete"  # completion rule fired; routed, jobs created
    SKIPPED = "skipped"  # nothing in it for any pipeline


class SeriesState(enum.StrEnum):
    PENDING = "pending"
    ROUTED = "routed"
    SKIPPED = "skipped"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    ENCODED = "encoded"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"


ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.ENCODED, JobState.SENDING)


class SendState(enum.StrEnum):
    PENDING = "pending"
    SENDING = "sending"  # claimed by an export task (updated_at is the claim time)
    STORED = "stored"  # the destination accepted it; its read-back (confirm) is still to come
    COMMITTING = "committing"  # accepted; Storage Commitment requested, the destination's report awaited
    SENT = "sent"  # accepted, and read back or committed where the destination confirms
    FAILED = "failed"


class Study(Base):
    __tablename__ = "study"
    # (state, id): a state's studies newest first, read from the index alone (keyset pages);
    # (completed_at, state): the overview counts the last day's finished studies from the index.
    __table_args__ = (Index("ix_study_state_id", "state", "id"), Index("ix_study_completed_at_state", "completed_at", "state"))

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    state: Mapped[StudyState] = mapped_column(Enum(StudyState, native_enum=False, length=16))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    # Number of Study Related Instances, when the sender tells us: completes the study at once.
    expected_instances: Mapped[int | None] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Indexed: the dashboard counts the last hour's arrivals and filters the list by time.
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    released_at: Mapped[datetime | None] = _ts()
    completed_at: Mapped[datetime | None] = _ts()
    completion_rule: Mapped[str | None] = mapped_column(String(32))
    # HMAC-SHA256 (key api.identifier_key) of Accession Number and Patient ID: exact search
    # without keeping the identifiers in clear.
    accession_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    patient_id_hash: Mapped[str | None] = mapped_column(String(64), index=True)
    # When storage.retention_days removed its files (instances, results) from the spool; the
    # rows stay (node/services/retention.py).
    purged_at: Mapped[datetime | None] = _ts()

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.id")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[SeriesState] = mapped_column(Enum(SeriesState, native_enum=False, length=16))
    skip_reason: Mapped[str | None] = mapped_column(Text)
    routed_at: Mapped[datetime | None] = _ts()
    # The first instance's routing-relevant attributes (keywords the rules use) and where it came
    # from (CallingAE, CalledAE, SourceAddress): routing is a pure function of this record.
    routing_attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Which routing rule(s) decided, and what they decided (pipelines null: none, series skipped).
    routing_rule: Mapped[str | None] = mapped_column(String(255))
    pipelines: Mapped[list[str] | None] = mapped_column(JSON)
    priority: Mapped[int | None] = mapped_column(Integer)
    destinations: Mapped[list[str] | None] = mapped_column(JSON)
    objects: Mapped[list[str] | None] = mapped_column(JSON)  # result kinds the routing rules ask for

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", order_by="Instance.id")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))  # relative to storage.path
    size: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "job"
    # (state, id) serves every lookup by state and gives the failed-jobs page its newest-first
    # keyset order without a sort (PostgreSQL; SQLite's index on state alone carries the rowid).
    # (updated_at, state): `since` filters, and the overview's count of the last day's jobs.
    __table_args__ = (Index("ix_job_state_id", "state", "id"), Index("ix_job_updated_at_state", "updated_at", "state"))

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[JobState] = mapped_column(Enum(JobState, native_enum=False, length=16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    worker: Mapped[str | None] = mapped_column(String(255))
    error: Mapped[str | None] = mapped_column(Text)
    error_stage: Mapped[str | None] = mapped_column(String(32))
    # Which instances the job processes (ids), fixed at creation so a replay is reproducible.
    instance_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # Export time, added with one atomic UPDATE by each export pass: export tasks run while the
    # inference worker is still writing `timings`, so a read-modify-write of the JSON would race.
    send_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    # Indexed: a failed job's page and list say which job replayed it.
    replay_of: Mapped[int | None] = mapped_column(ForeignKey("job.id"), index=True)
    # 0-9 from the routing rule, 9 most urgent; passed to the queue so STAT studies go first.
    priority: Mapped[int] = mapped_column(Integer, default=DEFAULT_PRIORITY, server_default=str(DEFAULT_PRIORITY))
    # Destination names (or "sender") from the routing rule; null means every configured one.
    destinations: Mapped[list[str] | None] = mapped_column(JSON)
    objects: Mapped[list[str] | None] = mapped_column(JSON)  # result kinds the routing rules ask for
    # The earlier job of the same study and pipeline whose results this one replaces.
    supersedes_id: Mapped[int | None] = mapped_column(ForeignKey("job.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    queued_at: Mapped[datetime | None] = _ts()
    running_at: Mapped[datetime | None] = _ts()
    encoded_at: Mapped[datetime | None] = _ts()
    sending_at: Mapped[datetime | None] = _ts()
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), index=True)  # the last hour's turnaround
    failed_at: Mapped[datetime | None] = _ts()
    cancelled_at: Mapped[datetime | None] = _ts()
    superseded_at: Mapped[datetime | None] = _ts()
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @property
    def stage_seconds(self) -> dict[str, Any]:
        """Seconds per stage: what the inference worker recorded, plus the export time."""
        if not self.send_seconds:
            return dict(self.timings)
        return {**self.timings, Stage.SEND.value: round(self.send_seconds, 4)}

    study: Mapped[Study] = relationship(back_populates="jobs")
    supersedes: Mapped[Job | None] = relationship(remote_side="Job.id", foreign_keys=[supersedes_id])
    outputs: Mapped[list[Output]] = relationship(back_populates="job", order_by="Output.id")


class Output(Base):
    """One DICOM object a job produced (SR, overlay SC, ...), stored under the spool."""

    __tablename__ = "output"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    # indexed: before objects are stored, what earlier jobs wrote under their UIDs is looked up
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(255))
    # Of its bytes (null: written before 0012): a later job compares with it, file or no file.
    sha256: Mapped[str | None] = mapped_column(String(64))
    # The validation gate's checks that ran on it and passed (pydicom, dciodvfy, dcmpschk):
    # fewer than all only where validation.tools chose a weaker gate.
    checks: Mapped[list[str] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # An SR's findings [{label, probability, decision, threshold}]: recorded when the SR is
    # written, or (SRs of earlier versions) read back from its file the first time a study page
    # shows them; parsing an SR takes longer than a page may.
    findings: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)

    job: Mapped[Job] = relationship(back_populates="outputs")
    sends: Mapped[list[Send]] = relationship(back_populates="output", order_by="Send.id")


class ModelOutput(Base):
    """What a pipeline's networks computed for one source image (pipelines.base.ModelOutputs
    as an .npz, a few KB), kept so that a replay or a later attempt of the same model on the
    same content draws the same objects (node/engine/model_outputs.py)."""

    __tablename__ = "model_output"

    id: Mapped[int] = mapped_column(primary_key=True)
    # sha256 of the pipeline id, model identity (version, weights, settings), and the source's SOP Instance UID and sha256
    key: Mapped[str] = mapped_column(String(64), unique=True)
    pipeline: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    data: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Send(Base):
    """Per-destination send status of one output, so a retry skips what is already there."""

    __tablename__ = "send"
    # (state, updated_at): the dashboard's failing destinations are the recent failed sends.
    __table_args__ = (UniqueConstraint("output_id", "destination"),
                      Index("ix_send_state_updated_at", "state", "updated_at"))

    id: Mapped[int] = mapped_column(primary_key=True)
    output_id: Mapped[int] = mapped_column(ForeignKey("output.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[SendState] = mapped_column(Enum(SendState, native_enum=False, length=16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    remote_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = _ts()
    # When a read-back (C-FIND or QIDO-RS) found the object at the destination, or its
    # Storage Commitment report said it is committed.
    confirmed_at: Mapped[datetime | None] = _ts()
    # Transaction UID of the latest Storage Commitment request that names this object.
    commitment_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    output: Mapped[Output] = relationship(back_populates="sends")


class Event(Base):
    """Audit trail: rejections, replays, cancellations, logins, study views (who, when, why, from where)."""

    __tablename__ = "event"
    # The audit log filtered by kind, newest first; a study view is looked up by (kind, at).
    __table_args__ = (Index("ix_event_kind_at", "kind", "at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("job.id"))
    actor: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)
    address: Mapped[str | None] = mapped_column(String(64))  # client address of an API/web action


class User(Base):
    """A person who may use the API and dashboard; role viewer < operator < admin."""

    __tablename__ = "user"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiToken(Base):
    """A bearer token; only its SHA-256 is kept (the token is shown once)."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = _ts()
    revoked_at: Mapped[datetime | None] = _ts()
    last_used_at: Mapped[datetime | None] = _ts()


class WebSession(Base):
    """A logged-in browser session, kept in the database so any API process can check it."""

    __tablename__ = "web_session"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # SHA-256 of the cookie value
    user_id: Mapped[int] = mapped_column(ForeignKey("user.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    address: Mapped[str | None] = mapped_column(String(64))


class LoginAttempt(Base):
    """Failed logins, for the rate limit (in the database: several API processes share it)."""

    __tablename__ = "login_attempt"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    address: Mapped[str | None] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class WorkerBeat(Base):
    """Each Celery worker's last sign of life (readiness and the dashboard's worker list)."""

    __tablename__ = "worker_beat"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    queues: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
