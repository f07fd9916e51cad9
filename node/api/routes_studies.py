"""/api/v1/studies"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from node.api.auth import Principal, Role, actor, client_address, config_of, require_role
from node.api.schemas import StudyDetail, StudyPage
from node.services import audit, studies

router = APIRouter(prefix="/studies", tags=["studies"])
Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]


@router.get("", response_model=StudyPage)
def list_studies(
    request: Request, who: Viewer,
    state: Annotated[str | None, Query(description="receiving, complete or skipped")] = None,
    q: Annotated[str | None, Query(max_length=128, description="exact Study Instance UID, Accession Number or Patient ID")] = None,
    since: Annotated[datetime | None, Query(description="received since (ISO 8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=64)] = None,
) -> Any:
    """Studies, newest first; follow `next_cursor` for the next page."""
    page = studies.list_studies(config_of(request), state=state, q=q, since=since, limit=limit, cursor=cursor)
    return {"items": page.items, "next_cursor": page.next_cursor}


@router.get("/{study_instance_uid}", response_model=StudyDetail)
def get_study(request: Request, study_instance_uid: str, who: Viewer) -> Any:
    """One study: series and routing, jobs, result objects and where each went, the timeline and
    the findings of the latest result. Every call is in the audit log (view_study)."""
    cfg = config_of(request)
    out = studies.get_study(cfg, study_instance_uid)
    audit.record_view(cfg, actor(request, who), study_instance_uid, client_address(request))
    return out
