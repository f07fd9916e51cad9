"""Jobs: failed ones first with their error and stage, a page per job, and the operator's
Replay / Re-send / Cancel, each with a reason that goes to the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from node.api.auth import Principal, Role, actor, client_address, config_of, operator, require_role
from node.db.models import JobState
from node.services import jobs
from node.services.errors import Invalid, NotFound, TransitionError
from node.web.render import flash, page, safe_next

router = APIRouter(include_in_schema=False)
Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]
Operator = Annotated[Principal, Depends(operator)]
ACTIONS = {"replay": "replayed", "resend": "re-sent", "cancel": "cancelled"}
FAILED_FIRST = 20  # the newest failed jobs above the full list; /jobs?state=failed has them all


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, who: Viewer, state: str = "",
                    cursor: Annotated[str, Query(max_length=64)] = "") -> HTMLResponse:
    """Failed jobs first (the first page without a filter), then every job, newest first."""
    cfg = config_of(request)
    failed = None
    if not state and not cursor:
        failed = await run_in_threadpool(jobs.list_jobs, cfg, JobState.FAILED.value, None, FAILED_FIRST, None)
    result = await run_in_threadpool(jobs.list_jobs, cfg, state or None, None, 50, cursor or None)
    return page(request, "jobs.html", who, failed=failed, page=result, state=state, cursor=cursor,
                states=[s.value for s in JobState])


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: int, who: Viewer) -> HTMLResponse:
    job = await run_in_threadpool(jobs.get_job, config_of(request), job_id)
    return page(request, "job.html", who, job=job, states=[s.value for s in JobState])


@router.post("/jobs/{job_id}/{action}")
async def job_action(request: Request, job_id: int, action: str, who: Operator,
                     reason: Annotated[str, Form(max_length=500)] = "",
                     back: Annotated[str, Form(max_length=2000)] = "/jobs") -> Response:
    """Replay, re-send or cancel a job with a reason; back to the page the form was on."""
    fn = {"replay": jobs.replay_job, "resend": jobs.resend_job, "cancel": jobs.cancel_job}.get(action)
    if fn is None:
        raise NotFound(f"no job action {action!r}")
    response = RedirectResponse(safe_next(back), status_code=303)
    if not reason.strip():
        return flash(response, f"Job {job_id} not {ACTIONS[action]}: give a reason.")
    try:
        new = await run_in_threadpool(fn, config_of(request), job_id, actor(request, who), reason.strip(),
                                      client_address(request))
    except (NotFound, TransitionError, Invalid) as e:
        return flash(response, f"Job {job_id} not {ACTIONS[action]}: {e}")
    return flash(response, f"Job {job_id} replayed as job {new}." if action == "replay" else
                 f"Job {job_id} {ACTIONS[action]}.")
