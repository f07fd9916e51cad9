"""FastAPI dependencies: who is asking (session cookie or bearer token), role checks, CSRF,
and the login/logout the JSON API and the web pages share."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Depends, HTTPException, Request, Response
from starlette.concurrency import run_in_threadpool

from node.config import Config
from node.services import users
from node.services.audit import record
from node.services.users import LoginFailed, Principal, RateLimited, Role

COOKIE = "pacsnode_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"

__all__ = ["COOKIE", "LoginFailed", "Principal", "RateLimited", "Role", "actor", "client_address", "csrf_protect",
           "current_user", "login", "logout", "require_role"]


def config_of(request: Request) -> Config:
    cfg: Config = request.app.state.config
    return cfg


def client_address(request: Request) -> str | None:
    """The caller's address for the audit log (the proxy's client when api.trusted_proxies)."""
    return request.client.host if request.client else None


def actor(request: Request, who: Principal) -> str:
    """Who acts, as the audit log names them: the channel and the user (api:alice, web:alice)."""
    return f"{'web' if not request.url.path.startswith(('/api/', '/dicom-web')) else 'api'}:{who.name}"


async def current_user(request: Request) -> Principal:
    """The caller, from `Authorization: Bearer` or the session cookie; 401 otherwise."""
    cfg = config_of(request)
    auth = request.headers.get("authorization", "")
    principal: Principal | None = None
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "use Authorization: Bearer TOKEN", headers={"WWW-Authenticate": "Bearer"})
        principal = await run_in_threadpool(users.principal_for_token, cfg, token.strip())
    elif cookie := request.cookies.get(COOKIE):
        principal = await run_in_threadpool(users.principal_for_session, cfg, cookie)
    if principal is None:
        raise HTTPException(401, "log in, or send an API token", headers={"WWW-Authenticate": "Bearer"})
    request.state.principal = principal
    return principal


def require_role(role: Role) -> Callable[..., Coroutine[Any, Any, Principal]]:
    """A dependency: the caller, if their role is at least `role`; 403 otherwise."""

    async def check(principal: Principal = Depends(current_user)) -> Principal:  # noqa: B008
        if not principal.can(role):
            raise HTTPException(403, f"needs role {role.value} (you are {principal.role.value})")
        return principal

    return check


async def csrf_protect(request: Request, principal: Principal = Depends(current_user)) -> Principal:  # noqa: B008
    """State-changing requests by session cookie must carry the session's CSRF token (header
    X-CSRF-Token, or form field csrf_token); bearer-token requests cannot be forged by a browser."""
    if principal.via == "token":
        return principal
    sent = request.headers.get(CSRF_HEADER)
    if sent is None and request.headers.get("content-type", "").startswith(
            ("application/x-www-form-urlencoded", "multipart/form-data")):
        form = await request.form()
        value = form.get(CSRF_FIELD)
        sent = value if isinstance(value, str) else None
    if not sent or not principal.csrf or not hmac.compare_digest(sent, principal.csrf):
        raise HTTPException(403, "missing or wrong CSRF token")
    return principal


def operator(principal: Principal = Depends(csrf_protect)) -> Principal:  # noqa: B008
    """Operator actions: role operator or more, and CSRF-checked."""
    if not principal.can(Role.OPERATOR):
        raise HTTPException(403, f"needs role operator (you are {principal.role.value})")
    return principal


def admin(principal: Principal = Depends(csrf_protect)) -> Principal:  # noqa: B008
    """Admin actions (users, tokens): role admin, and CSRF-checked."""
    if not principal.can(Role.ADMIN):
        raise HTTPException(403, f"needs role admin (you are {principal.role.value})")
    return principal


async def login(request: Request, response: Response, name: str, password: str) -> Principal:
    """Check the password (rate-limited) and set the session cookie; raises LoginFailed or RateLimited."""
    cfg = config_of(request)
    address = client_address(request)
    try:
        cookie, principal = await run_in_threadpool(users.login, cfg, name, password, address)
    except LoginFailed:
        await run_in_threadpool(record, cfg, "login_failed", name[:64], None, None, address)
        raise
    response.set_cookie(COOKIE, cookie, max_age=int(cfg.api.session_hours * 3600), httponly=True,
                        samesite="strict", secure=secure_cookies(request), path="/")
    await run_in_threadpool(record, cfg, "login", actor(request, principal), None, None, address)
    return principal


def secure_cookies(request: Request) -> bool:
    """Cookies carry Secure under TLS (ours, or a trusted proxy's)."""
    return config_of(request).api.tls is not None or request.url.scheme == "https"


async def logout(request: Request, response: Response, who: Principal) -> None:
    """End the caller's session and clear the cookie."""
    cfg = config_of(request)
    if who.session_id:
        await run_in_threadpool(users.logout, cfg, who.session_id)
        await run_in_threadpool(record, cfg, "logout", actor(request, who), None, None, client_address(request))
    response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=secure_cookies(request))
