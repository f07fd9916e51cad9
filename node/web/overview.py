"""The overview page: what the node is doing now, refreshed every few seconds by htmx."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from node.api.auth import Principal, Role, config_of, require_role
from node.services import overview
from node.web.render import page

router = APIRouter(include_in_schema=False)
Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]


@router.get("/", response_class=HTMLResponse)
async def overview_page(request: Request, who: Viewer) -> HTMLResponse:
    return page(request, "overview.html", who, **await run_in_threadpool(overview.overview, config_of(request)))


@router.get("/fragments/overview", response_class=HTMLResponse)
async def overview_fragment(request: Request, who: Viewer) -> HTMLResponse:
    return page(request, "_overview.html", who, **await run_in_threadpool(overview.overview, config_of(request)))
