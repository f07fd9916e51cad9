"""Rule tester, destinations (with C-ECHO), models, the audit log and users (with tokens)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from node.api.auth import (
    Principal,
    Role,
    actor,
    admin,
    client_address,
    config_of,
    operator,
    require_role,
)
from node.api.routes_ops import MAX_RULE_FILE
from node.services import audit, ops, users
from node.services.errors import Invalid, NotFound
from node.web.render import flash, page

router = APIRouter(include_in_schema=False)
Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]
Operator = Annotated[Principal, Depends(operator)]
AdminRead = Annotated[Principal, Depends(require_role(Role.ADMIN))]
Admin = Annotated[Principal, Depends(admin)]


@router.get("/rules", response_class=HTMLResponse)
async def rules_page(request: Request, who: Viewer) -> HTMLResponse:
    return page(request, "rules.html", who, routing=config_of(request).routing, decision=None, error=None,
                filename=None)


@router.post("/rules", response_class=HTMLResponse)
async def rules_test(request: Request, who: Operator, file: Annotated[UploadFile, File()],
                     calling_ae: Annotated[str, Form(max_length=16)] = "",
                     address: Annotated[str, Form(max_length=64)] = "") -> HTMLResponse:
    """Route a dropped DICOM file as the first instance of its series: the decision and why."""
    cfg = config_of(request)
    data = await file.read(MAX_RULE_FILE + 1)
    decision, error = None, None
    if len(data) > MAX_RULE_FILE:
        error = f"the file is larger than {MAX_RULE_FILE // 2**20} MB"
    else:
        try:
            decision = await run_in_threadpool(ops.rules_test, cfg, data, calling_ae or None, None, address or None)
        except Invalid as e:
            error = str(e)
    return page(request, "rules.html", who, routing=cfg.routing, decision=decision, error=error,
                filename=file.filename, status=200 if error is None else 422)


@router.get("/destinations", response_class=HTMLResponse)
async def destinations_page(request: Request, who: Viewer) -> HTMLResponse:
    return page(request, "destinations.html", who, destinations=ops.destinations(config_of(request)))


@router.post("/destinations/{name}/echo")
async def echo(request: Request, name: str, who: Operator) -> Response:
    cfg = config_of(request)
    out = await run_in_threadpool(ops.echo, cfg, name)
    result = "ok" if out["ok"] else out["detail"]
    await run_in_threadpool(audit.record, cfg, "echo", actor(request, who), f"{name}: {result}", None,
                            client_address(request))
    verdict = "answered" if out["ok"] else "did not answer"
    return flash(RedirectResponse("/destinations", status_code=303),
                 f"Echo {name}: {verdict} ({out['detail']}) in {out['seconds']:.3f} s.")


@router.get("/models", response_class=HTMLResponse)
async def models_page(request: Request, who: Viewer) -> HTMLResponse:
    return page(request, "models.html", who, models=await run_in_threadpool(ops.models, config_of(request)))


@router.get("/audit", response_class=HTMLResponse)
async def audit_page(request: Request, who: AdminRead, kind: str = "",
                     cursor: Annotated[str, Query(max_length=64)] = "") -> HTMLResponse:
    result = await run_in_threadpool(audit.list_audit, config_of(request), 100, cursor or None, kind or None)
    return page(request, "audit.html", who, page=result, kind=kind, kinds=audit.KINDS, cursor=cursor)


@router.get("/users", response_class=HTMLResponse)
async def users_page(request: Request, who: AdminRead) -> HTMLResponse:
    return _users(request, who, None)


def _users(request: Request, who: Principal, new_token: dict[str, object] | None) -> HTMLResponse:
    cfg = config_of(request)
    return page(request, "users.html", who, users=users.list_users(cfg), tokens=users.list_tokens(cfg),
                new_token=new_token, roles=[r.value for r in Role])


def _back(message: str) -> Response:
    return flash(RedirectResponse("/users", status_code=303), message)


@router.post("/users")
async def add_user(request: Request, who: Admin, name: Annotated[str, Form(max_length=64)],
                   role: Annotated[str, Form(max_length=16)], password: Annotated[str, Form(max_length=1024)]) -> Response:
    try:
        await run_in_threadpool(lambda: users.add_user(config_of(request), name, role, password,
                                                       actor=actor(request, who), address=client_address(request)))
    except Invalid as e:
        return _back(f"User not added: {e}.")
    return _back(f"User {name} added as {role}.")


@router.post("/users/{name}/remove")
async def remove_user(request: Request, name: str, who: Admin) -> Response:
    try:
        await run_in_threadpool(lambda: users.remove_user(config_of(request), name, actor=actor(request, who),
                                                          address=client_address(request)))
    except (Invalid, NotFound) as e:
        return _back(f"User not removed: {e}.")
    return _back(f"User {name} removed; their tokens and sessions no longer work.")


@router.post("/users/{name}/password")
async def set_password(request: Request, name: str, who: Admin,
                       password: Annotated[str, Form(max_length=1024)]) -> Response:
    try:
        await run_in_threadpool(lambda: users.set_password(
            config_of(request), name, password, actor=actor(request, who), address=client_address(request),
            keep_session=who.session_id if name == who.name else None))  # an admin's own page stays logged in
    except (Invalid, NotFound) as e:
        return _back(f"Password not changed: {e}.")
    return _back(f"Password of {name} changed; their browser sessions ended.")


@router.post("/tokens", response_class=HTMLResponse)
async def create_token(request: Request, who: Admin, user: Annotated[str, Form(max_length=64)],
                       expires_days: Annotated[str, Form(max_length=8)] = "") -> Response:
    """A new API token, shown once on the page this answers with (never again)."""
    try:
        days = float(expires_days) if expires_days.strip() else None
    except ValueError:
        return _back(f"Token not created: expires must be a number of days, not {expires_days!r}.")
    try:
        token_id, token = await run_in_threadpool(lambda: users.create_token(
            config_of(request), user, days, actor=actor(request, who), address=client_address(request)))
    except (Invalid, NotFound) as e:
        return _back(f"Token not created: {e}.")
    return await run_in_threadpool(_users, request, who, {"id": token_id, "user": user, "token": token})


@router.post("/tokens/{token_id}/revoke")
async def revoke_token(request: Request, token_id: int, who: Admin) -> Response:
    try:
        await run_in_threadpool(lambda: users.revoke_token(config_of(request), token_id, actor=actor(request, who),
                                                           address=client_address(request)))
    except NotFound as e:
        return _back(f"Token not revoked: {e}.")
    return _back(f"Token {token_id} revoked.")
