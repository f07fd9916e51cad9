"""Dashboard pages (Jinja2, autoescaped; htmx polls the overview) and the /metrics endpoint.
Every page reads through node.services; nothing here touches the spool or loads whole tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from fastapi import APIRouter, Depends, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from node import metrics
from node.api.auth import (
    LoginFailed,
    Principal,
    RateLimited,
    Role,
    config_of,
    login,
    logout,
    operator,
    require_role,
)
from node.services import jobs, ops, studies
from node.services.errors import JobBusy, NotFound

router = APIRouter(include_in_schema=False)
templates = Jinja2Templates(env=jinja2.Environment(  # autoescape every template, whatever its name
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True))
viewer = require_role(Role.VIEWER)


def _page(request: Request, name: str, user: Principal | None, **ctx: Any) -> HTMLResponse:
    return templates.TemplateResponse(request, name, {"user": user, **ctx})


@router.get("/metrics")
async def metrics_endpoint(request: Request, user: Principal = Depends(viewer)) -> Response:  # noqa: B008
    """Prometheus text format for all node processes (viewer role or an API token)."""
    body, ctype = await run_in_threadpool(metrics.render, config_of(request))
    return Response(body, media_type=ctype)


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request) -> HTMLResponse:
    return _page(request, "login.html", None, error=None)


@router.post("/login", response_class=HTMLResponse)
async def login_post(request: Request, name: str = Form(...), password: str = Form(...)) -> Response:  # noqa: B008
    response = RedirectResponse("/", status_code=303)
    try:
        await login(request, response, name, password)
    except LoginFailed as e:
        return _page(request, "login.html", None, error=str(e))
    except RateLimited as e:
        return _page(request, "login.html", None, error=f"too many attempts; retry in {e.retry_after} s")
    return response


@router.post("/logout")
async def logout_post(request: Request, user: Principal = Depends(viewer)) -> Response:  # noqa: B008
    response = RedirectResponse("/login", status_code=303)
    await logout(request, response)
    return response


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request, user: Principal = Depends(viewer)) -> HTMLResponse:  # noqa: B008
    return _page(request, "overview.html", user, **await run_in_threadpool(_overview, config_of(request)))


@router.get("/fragments/overview", response_class=HTMLResponse)
async def overview_fragment(request: Request, user: Principal = Depends(viewer)) -> HTMLResponse:  # noqa: B008
    return _page(request, "_overview_body.html", user, **await run_in_threadpool(_overview, config_of(request)))


def _overview(config: Any) -> dict[str, Any]:
    return {"ready": ops.readiness(config), "workers": ops.workers(config),
            "failed": jobs.list_jobs(config, state="failed", limit=10).items}


@router.get("/studies", response_class=HTMLResponse)
async def studies_page(request: Request, state: str | None = None, q: str | None = None, cursor: str | None = None,
                       user: Principal = Depends(viewer)) -> HTMLResponse:  # noqa: B008
    page = await run_in_threadpool(studies.list_studies, config_of(request), state or None, q or None, None, 50,
                                   cursor or None)
    return _page(request, "studies.html", user, page=page, state=state or "", q=q or "")


@router.get("/studies/{uid}", response_class=HTMLResponse)
async def study_page(request: Request, uid: str, user: Principal = Depends(viewer)) -> HTMLResponse:  # noqa: B008
    cfg = config_of(request)
    try:
        study = await run_in_threadpool(studies.get_study, cfg, uid)
    except NotFound as e:
        raise HTTPException(404, str(e)) from e
    from node.services.audit import record

    await run_in_threadpool(record, cfg, "study_viewed", user.name, uid, None,
                            request.client.host if request.client else None)
    return _page(request, "study.html", user, study=study)


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request, state: str | None = None, cursor: str | None = None,
                    user: Principal = Depends(viewer)) -> HTMLResponse:  # noqa: B008
    cfg = config_of(request)
    failed = await run_in_threadpool(jobs.list_jobs, cfg, "failed", None, 50, None) if not cursor else None
    page = await run_in_threadpool(jobs.list_jobs, cfg, state or None, None, 50, cursor or None)
    return _page(request, "jobs.html", user, failed=failed, page=page, state=state or "",
                 can_operate=user.can(Role.OPERATOR))


@router.post("/jobs/{job_id}/{action}")
async def job_action(request: Request, job_id: int, action: str, reason: str = Form(...),  # noqa: B008
                     user: Principal = Depends(operator)) -> Response:  # noqa: B008
    """Replay / Re-send / Cancel from the jobs page (operator, CSRF-checked, reason required)."""
    fn = {"replay": jobs.replay_job, "resend": jobs.resend_job, "cancel": jobs.cancel_job}.get(action)
    if fn is None:
        raise HTTPException(404, f"no action {action!r}")
    if not reason.strip():
        raise HTTPException(422, "reason: give a reason")
    try:
        await run_in_threadpool(fn, config_of(request), job_id, user.name, reason.strip())
    except NotFound as e:
        raise HTTPException(404, str(e)) from e
    except JobBusy as e:
        raise HTTPException(409, str(e)) from e
    return RedirectResponse("/jobs", status_code=303)
