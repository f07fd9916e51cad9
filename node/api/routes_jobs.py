"""/api/v1/jobs"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from node.api.auth import Principal, Role, actor, client_address, config_of, operator, require_role
from node.api.schemas import Done, JobOut, JobPage, Reason, Replayed, ReplayFailed
from node.services import audit, jobs

router = APIRouter(prefix="/jobs", tags=["jobs"])
Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]
Operator = Annotated[Principal, Depends(operator)]


@router.get("", response_model=JobPage)
def list_jobs(
    request: Request, who: Viewer,
    state: Annotated[str | None, Query(description="a job state, e.g. failed")] = None,
    since: Annotated[datetime | None, Query(description="changed since (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Any:
    page = jobs.list_jobs(config_of(request), state=state, since=since, limit=limit, cursor=cursor)
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.post("/replay", response_model=list[Replayed])
def replay_failed(request: Request, body: ReplayFailed, who: Operator) -> Any:
    """Replay every failed job (failed since `since`)."""
    cfg = config_of(request)
    out = jobs.replay_failed(cfg, body.since, actor(request, who), body.reason, client_address(request))
    audit.record(cfg, "replay_failed", actor(request, who), f"{len(out)} jobs since {body.since}: {body.reason}",
                 address=client_address(request))
    return out


@router.get("/{job_id}", response_model=JobOut)
def get_job(request: Request, job_id: int, who: Viewer) -> Any:
    """One job: every state's timestamp, stage timings, error and its stage, sends per destination."""
    return jobs.get_job(config_of(request), job_id)


@router.post("/{job_id}/replay", response_model=Replayed, status_code=201)
def replay(request: Request, job_id: int, body: Reason, who: Operator) -> Any:
    """Queue a new job redoing this one; 409 while it is still active."""
    new = jobs.replay_job(config_of(request), job_id, actor(request, who), body.reason, client_address(request))
    return {"replayed": job_id, "job": new}


@router.post("/{job_id}/cancel", response_model=Done)
def cancel(request: Request, job_id: int, body: Reason, who: Operator) -> Any:
    """Cancel a job that has not finished; 409 otherwise."""
    jobs.cancel_job(config_of(request), job_id, actor(request, who), body.reason, client_address(request))
    return {"job": job_id, "state": "cancelled"}


@router.post("/{job_id}/resend", response_model=Done)
def resend(request: Request, job_id: int, body: Reason, who: Operator) -> Any:
    """Send the existing result objects again (no inference)."""
    jobs.resend_job(config_of(request), job_id, actor(request, who), body.reason, client_address(request))
    return {"job": job_id, "state": "sending"}
