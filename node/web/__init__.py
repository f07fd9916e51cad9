"""The dashboard: server-rendered pages (Jinja2 + htmx, no build chain, no external assets)
over node.services, one router per page family."""

from fastapi import APIRouter

from node.web import admin, jobs, overview, session, studies

router = APIRouter(include_in_schema=False)
for _module in (session, overview, studies, jobs, admin):
    router.include_router(_module.router)

__all__ = ["router"]
