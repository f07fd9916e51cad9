"""/api/v1/rules, /destinations, /models, /audit, /workers"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile

from node.api.auth import Principal, Role, client_address, config_of, operator, require_role
from node.api.schemas import AuditPage, EchoOut, RuleDecision
from node.services import audit, ops

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
        from node.services.errors import Invalid

        raise Invalid("file", f"larger than {MAX_RULE_FILE // 2**20} MB")
    return ops.rules_test(config_of(request), data, calling_ae=calling_ae, address=address)


@router.get("/destinations")
def destinations(request: Request, who: Viewer) -> list[dict[str, Any]]:
    return ops.destinations(config_of(request))


@router.post("/destinations/{name}/echo", response_model=EchoOut)
def echo(request: Request, name: str, who: Operator) -> Any:
    cfg = config_of(request)
    out = ops.echo(cfg, name)
    audit.record(cfg, "echo", f"api:{who.name}", f"{name}: {'ok' if out['ok'] else out['detail']}",
                 address=client_address(request))
    return out


@router.get("/models")
def models(request: Request, who: Viewer) -> list[dict[str, Any]]:
    return ops.models(config_of(request))


@router.get("/workers")
def workers(request: Request, who: Viewer) -> list[dict[str, Any]]:
    return ops.workers(config_of(request))


@router.get("/audit", response_model=AuditPage)
def audit_log(request: Request, who: Admin, kind: Annotated[str | None, Query(max_length=32)] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 100,
              cursor: Annotated[str | None, Query(max_length=64)] = None) -> Any:
    page = audit.list_audit(config_of(request), limit=limit, cursor=cursor, kind=kind)
    return {"items": page.items, "next_cursor": page.next_cursor}
