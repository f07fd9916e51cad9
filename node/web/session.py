"""Log in, log out, change one's own password."""

from __future__ import annotations

import hmac
import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.concurrency import run_in_threadpool

from node.api.auth import (
    LoginFailed,
    Principal,
    RateLimited,
    Role,
    actor,
    client_address,
    config_of,
    csrf_protect,
    login,
    logout,
    require_role,
    secure_cookies,
)
from node.services import users
from node.services.errors import Invalid
from node.web.render import flash, page, safe_next

router = APIRouter(include_in_schema=False)
# The login form's own CSRF token (no session exists yet): a cookie and a form field that must
# match, so another site cannot log a browser in under its own account.
LOGIN_COOKIE = "pacsnode_login"
Viewer = Annotated[Principal, Depends(require_role(Role.VIEWER))]
Writer = Annotated[Principal, Depends(csrf_protect)]


def _login_form(request: Request, error: str | None, status: int, next_: str) -> HTMLResponse:
    token = secrets.token_urlsafe(24)
    response = page(request, "login.html", None, status=status, error=error, login_token=token, next=next_)
    response.set_cookie(LOGIN_COOKIE, token, max_age=3600, httponly=True, samesite="strict", path="/login",
                        secure=secure_cookies(request))
    return response


@router.get("/login", response_class=HTMLResponse)
async def login_form(request: Request, next: str | None = None) -> HTMLResponse:
    return _login_form(request, None, 200, safe_next(next))


@router.post("/login", response_class=HTMLResponse)
async def login_post(request: Request, name: Annotated[str, Form(max_length=64)],
                     password: Annotated[str, Form(max_length=1024)], login_token: Annotated[str, Form(max_length=64)] = "",
                     next: Annotated[str, Form(max_length=2000)] = "/") -> Response:
    target = safe_next(next)
    cookie = request.cookies.get(LOGIN_COOKIE, "")
    if not login_token or not cookie or not hmac.compare_digest(login_token, cookie):
        return _login_form(request, "The login form expired; please log in again.", 403, target)
    response = RedirectResponse(target, status_code=303)
    try:
        await login(request, response, name, password)
    except LoginFailed:
        return _login_form(request, "Wrong name or password.", 401, target)
    except RateLimited as e:
        return _login_form(request, f"Too many failed logins; try again in {e.retry_after} s.", 429, target)
    response.delete_cookie(LOGIN_COOKIE, path="/login", httponly=True, samesite="strict")
    return response


@router.post("/logout")
async def logout_post(request: Request, who: Writer) -> Response:
    response = RedirectResponse("/login", status_code=303)
    await logout(request, response, who)
    return response


@router.get("/account", response_class=HTMLResponse)
async def account(request: Request, who: Viewer) -> HTMLResponse:
    return page(request, "account.html", who)


@router.post("/account/password")
async def change_password(request: Request, who: Writer, current: Annotated[str, Form(max_length=1024)],
                          new: Annotated[str, Form(max_length=1024)], again: Annotated[str, Form(max_length=1024)]) -> Response:
    """Change one's own password (the current one first); one's other sessions end."""
    cfg = config_of(request)
    response = RedirectResponse("/account", status_code=303)
    if new != again:
        return flash(response, "The new passwords differ; nothing changed.")
    if not await run_in_threadpool(users.check_password, cfg, who.name, current):
        return flash(response, "The current password is wrong; nothing changed.")
    try:
        await run_in_threadpool(lambda: users.set_password(cfg, who.name, new, actor=actor(request, who),
                                                           address=client_address(request), keep_session=who.session_id))
    except Invalid as e:
        return flash(response, f"Not changed: {e}.")
    return flash(response, "Password changed; your other sessions have ended.")
