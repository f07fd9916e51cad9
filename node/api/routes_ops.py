"""/api/v1/rules, /destinations, /spool/purge, /models, /overview, /workers, /audit"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile

from node.api.auth import Principal, Role, actor, client_address, config_of, operator, require_role
from node.api.schemas import AuditPage, EchoOut, PurgeIn, PurgeOut, RuleDecision
from node.services import audit, ops, overview, retention
from node.services.errors import Invalid

router = APIRouter(tags=["operations"])
Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]
Operator = Annotated[Principal, Depends(operator)]
Admin = Annotated[Principal, Depends(require_role(Role.ADMIN))]
MAX_RULE_FILE = 64 * 2**20


@router.post("/rules/test", response_model=RuleDecision)
async def rules_test(request: Request, who: Operator, file: Annotated[UploadFile, File()],
                     calling_ae: Annotated[str | None, Form(max_length=16)] = None,
                     address: Annotated[str | None, Form(max_length=64)] = None) -> Any:
    """Route one uploaded DICOM file as the first instance of its series: the decision and why."""
    data = await file.read(MAX_RULE_FILE + 1)
    if len(data) > MAX_RULE_FILE:
        raise Invalid("file", f"larger than {MAX_RULE_FILE // 2**20} MB")
    return ops.rules_test(config_of(request), data, calling_ae=calling_ae, address=address)


@router.get("/destinations")
def destinations(request: Request, who: Viewer) -> list[dict[str, Any]]:
    """Configured destinations: protocol, address, the objects each receives, read-back."""
    return ops.destinations(config_of(request))


@router.post("/destinations/{name}/echo", response_model=EchoOut)
def echo(request: Request, name: str, who: Operator) -> Any:
    """C-ECHO a DICOM destination (an HTTP probe for a STOW-RS one): its result and round trip."""
    cfg = config_of(request)
    out = ops.echo(cfg, name)
    audit.record(cfg, "echo", actor(request, who), f"{name}: {'ok' if out['ok'] else out['detail']}",
                 address=client_address(request))
    return out


@router.post("/spool/purge", response_model=PurgeOut)
def spool_purge(request: Request, body: PurgeIn, who: Admin) -> Any:
    """Remove settled studies' files from the spool now, as storage.retention_days does every
    hour (rows stay; each purged study audited, kind `purge`); `dry_run` removes nothing."""
    try:
        report = retention.purge(config_of(request), days=body.days, dry_run=body.dry_run,
                       include_failed=body.include_failed, actor=actor(request, who))
    except ValueError as e:  # no days given and storage.retention_days unset
        raise Invalid("days", str(e)) from e
    return report.as_dict()


@router.get("/models")
def models(request: Request, who: Viewer) -> list[dict[str, Any]]:
    """Model bundles the config names: name, version, demo weights or not, status."""
    return ops.models(config_of(request))


@router.get("/overview")
def overview_figures(request: Request, who: Viewer) -> dict[str, Any]:
    """What the dashboard's overview shows: studies and jobs per state, queue depths (null:
    broker not answering), the last hour's throughput and turnaround p50/p95 (seconds),
    failing destinations, workers with their last heartbeat, spool disk space."""
    return overview.overview(config_of(request))


@router.get("/workers")
def workers(request: Request, who: Viewer) -> list[dict[str, Any]]:
    """Workers and their last heartbeat."""
    return overview.workers(config_of(request))


@router.get("/audit", response_model=AuditPage)
def audit_log(request: Request, who: Admin, kind: Annotated[str | None, Query(max_length=32)] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              cursor: Annotated[str | None, Query(max_length=64)] = None) -> Any:
    """Who did what, when, from where; newest first."""
    page = audit.list_audit(config_of(request), limit=limit, cursor=cursor, kind=kind)
    return {"items": page.items, "next_cursor": page.next_cursor}
