"""Request and response bodies of /api/v1 (the OpenAPI document is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reason(_In):
    reason: str = Field(min_length=1, max_length=500, description="recorded in the audit log")


class ReplayFailed(_In):
    state: Literal["failed"] = "failed"
    since: datetime | None = Field(None, description="only jobs failed since this time (ISO 8601 with zone)")
    reason: str = Field(min_length=1, max_length=500)


class LoginIn(_In):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class Me(BaseModel):
    name: str
    role: str
    csrf_token: str | None = None


class Routing(BaseModel):
    rule: str | None
    action: str | None
    reason: str | None
    pipelines: list[str] | None
    priority: int | None
    destinations: list[str] | None
    objects: list[str] | None
    routed_at: str | None


class SeriesOut(BaseModel):
    series_instance_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None
    instances: int
    state: str
    skip_reason: str | None
    routing: Routing


class StudySummary(BaseModel):
    id: int
    study_instance_uid: str
    state: str
    instances: int
    received_at: str
    last_received_at: str
    completed_at: str | None
    completion_rule: str | None
    purged_at: str | None = Field(description="when storage.retention_days removed its files from the spool "
                                              "(its rows stay; replay and re-send need the study sent again)")
    skip_reason: str | None
    jobs: list[int] = Field(description="job ids, oldest first")
    job_states: list[str] = Field(description="the state of each job in `jobs`")
    calling_ae: str | None
    series: list[SeriesOut]


class StudyPage(BaseModel):
    items: list[StudySummary]
    next_cursor: str | None


class SendOut(BaseModel):
    destination: str
    state: str
    attempts: int
    remote_status: int | None
    error: str | None
    sent_at: str | None


class OutputOut(BaseModel):
    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    sends: list[SendOut]


class JobOut(BaseModel):
    model_config = ConfigDict(extra="allow")  # one <state>_at timestamp per job state

    id: int
    study_instance_uid: str
    pipeline: str
    model_version: str | None
    state: str
    attempt: int
    worker: str | None
    error: str | None
    error_stage: str | None
    replay_of: int | None
    supersedes: int | None
    priority: int
    destinations: list[str] | None
    objects: list[str] | None
    timings: dict[str, Any]
    created_at: str | None
    updated_at: str | None
    outputs: list[OutputOut]
    replayed_as: list[int] = Field(default_factory=list, description="jobs that replayed this one")


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class Finding(BaseModel):
    label: str
    probability: float | None
    decision: str | None = Field(description="Present / Absent at the threshold; null for a detected region")
    threshold: float | None


class ResultObject(BaseModel):
    output_id: int
    sop_instance_uid: str


class LatestResult(BaseModel):
    job: int
    state: str
    model_version: str | None
    sr: ResultObject
    overlays: list[ResultObject]
    findings: list[Finding] | None
    note: str | None = Field(description="why the findings could not be read, if they could not")


class TimelineEvent(BaseModel):
    at: str
    after_seconds: float = Field(description="since the study's first instance")
    event: str
    detail: str | None
    job: int | None


class StudyDetail(StudySummary):
    released_at: str | None
    expected_instances: int | None
    job_details: list[JobOut]
    timeline: list[TimelineEvent]
    latest_result: LatestResult | None
    findings: list[Finding] | None = Field(description="the findings of the latest result (its SR)")


class UserIn(_In):
    name: str = Field(min_length=1, max_length=64)
    role: Literal["viewer", "operator", "admin"]
    password: str = Field(min_length=12, max_length=1024)


class PasswordIn(_In):
    password: str = Field(min_length=12, max_length=1024)


class UserOut(BaseModel):
    id: int
    name: str
    role: str
    created_at: str
    tokens: int = Field(description="unrevoked API tokens")


class TokenIn(_In):
    user: str = Field(min_length=1, max_length=64)
    expires_days: float | None = Field(None, gt=0, le=3650, description="null: valid until revoked")


class TokenCreated(BaseModel):
    id: int
    user: str
    token: str = Field(description="shown once; only its hash is kept")


class TokenOut(BaseModel):
    id: int
    user: str
    created_at: str | None
    expires_at: str | None
    revoked_at: str | None
    last_used_at: str | None


class Replayed(BaseModel):
    replayed: int
    job: int


class Done(BaseModel):
    job: int
    state: str


class PurgeIn(_In):
    days: float | None = Field(None, gt=0, description="no activity for this many days (default: storage.retention_days)")
    dry_run: bool = Field(False, description="say what would be removed, remove nothing")
    include_failed: bool = Field(False, description="also studies with a failed job nobody replayed")


class PurgeOut(BaseModel):
    cutoff: str = Field(description="last activity before this time (UTC)")
    dry_run: bool
    studies: list[str] = Field(description="Study Instance UIDs purged (or, dry run, that would be)")
    files: int
    bytes: int


class EchoOut(BaseModel):
    destination: str
    ok: bool
    detail: str
    seconds: float


class AuditEntry(BaseModel):
    id: int
    at: str
    kind: str
    actor: str | None
    job_id: int | None
    detail: str | None
    address: str | None


class AuditPage(BaseModel):
    items: list[AuditEntry]
    next_cursor: str | None


class RuleDecision(BaseModel):
    mode: str
    rule: str | None
    action: str
    reason: str | None
    pipelines: list[str]
    priority: int
    destinations: list[str] | None
    trace: list[str]
