"""Studies: search and paging, the study page (timeline, findings, overlay preview, SR text,
jobs, result objects, routing), and its live refresh. Every view of a study is audited; the
patient attributes on it are read from the first instance for the page and never logged."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from node.api.auth import Principal, Role, actor, client_address, config_of, require_role
from node.config import Config
from node.db.models import ACTIVE_JOB_STATES, StudyState, utcnow
from node.services import audit, results, studies
from node.services.errors import NotFound
from node.web.render import page

router = APIRouter(include_in_schema=False)
Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]
#: A study page's live refreshes and images within this time are part of the view already audited.
SAME_VIEW = timedelta(minutes=10)
SINCE = {"1h": timedelta(hours=1), "24h": timedelta(days=1), "7d": timedelta(days=7)}
#: htmx stops polling when a fragment answers with this status (nothing more will change).
STOP_POLLING = 286
_ACTIVE = {s.value for s in ACTIVE_JOB_STATES}


@router.get("/studies", response_class=HTMLResponse)
async def studies_page(request: Request, who: Viewer, state: str = "",
                       q: Annotated[str, Query(max_length=128)] = "", since: str = "",
                       cursor: Annotated[str, Query(max_length=64)] = "") -> HTMLResponse:
    """Newest first; search by exact Study Instance UID, Accession Number or Patient ID."""
    when = utcnow() - SINCE[since] if since in SINCE else None
    result = await run_in_threadpool(studies.list_studies, config_of(request), state or None, q or None, when, 50,
                                     cursor or None)
    template = "_studies_rows.html" if request.headers.get("hx-request") else "studies.html"
    return page(request, template, who, page=result, state=state, q=q, since=since, cursor=cursor,
                states=[s.value for s in StudyState], since_choices=list(SINCE))


def _study_view(config: Config, uid: str) -> dict[str, Any]:
    study = studies.get_study(config, uid)
    live = study["state"] == StudyState.RECEIVING.value or any(j["state"] in _ACTIVE for j in study["job_details"])
    return {"study": study, "live": live}


@router.get("/studies/{uid}", response_class=HTMLResponse)
async def study_page(request: Request, uid: str, who: Viewer) -> HTMLResponse:
    cfg = config_of(request)
    view = await run_in_threadpool(_study_view, cfg, uid)
    try:
        patient: dict[str, str] | None = await run_in_threadpool(
            results.patient_attributes, cfg, await run_in_threadpool(studies.first_instance_path, cfg, uid))
    except NotFound:
        patient = None  # the study has no instance file left: the page still shows what the node did
    await run_in_threadpool(audit.record_view, cfg, actor(request, who), uid, client_address(request))
    return page(request, "study.html", who, patient=patient, **view)


@router.get("/studies/{uid}/live", response_class=HTMLResponse)
async def study_live(request: Request, uid: str, who: Viewer) -> HTMLResponse:
    """The study page's changing part; answers 286 (htmx: stop polling) once nothing is active."""
    cfg = config_of(request)
    view = await run_in_threadpool(_study_view, cfg, uid)
    await run_in_threadpool(audit.record_view, cfg, actor(request, who), uid, client_address(request), SAME_VIEW)
    return page(request, "_study_live.html", who, status=200 if view["live"] else STOP_POLLING, **view)


async def _output(request: Request, who: Principal, output_id: int, kind: str) -> dict[str, Any]:
    """A result object's row, the view of its study audited (once per SAME_VIEW)."""
    cfg = config_of(request)
    out = await run_in_threadpool(studies.output_of, cfg, output_id)
    if out["kind"] != kind:
        raise NotFound(f"result object {output_id} is a {out['kind']}, not a {kind}")
    await run_in_threadpool(audit.record_view, cfg, actor(request, who), out["study_instance_uid"],
                            client_address(request), SAME_VIEW)
    return out


@router.get("/results/{output_id}/preview.png")
async def preview(request: Request, output_id: int, who: Viewer) -> Response:
    """A PNG of one of our overlay secondary captures, rendered from its file in the spool."""
    out = await _output(request, who, output_id, "sc")
    png = await run_in_threadpool(results.preview_png, config_of(request), out["path"])
    # The object never changes (its UIDs are keyed on its content): the browser may keep it.
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/results/{output_id}/sr", response_class=HTMLResponse)
async def sr_text(request: Request, output_id: int, who: Viewer) -> HTMLResponse:
    """One of our SRs as readable text (its content tree), for the study page."""
    out = await _output(request, who, output_id, "sr")
    text = await run_in_threadpool(results.sr_text, config_of(request), out["path"])
    return page(request, "_sr.html", who, sr=text, output=out)
