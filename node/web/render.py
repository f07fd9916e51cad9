"""Templates (Jinja2, every one autoescaped), display filters, flash messages and the HTML
error page. Pages only call node.services and render what it returns."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from node.api.auth import Principal, Role

FLASH = "pacsnode_flash"

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                          autoescape=True, undefined=jinja2.StrictUndefined)


def _ts(value: str | None) -> str:
    """An ISO timestamp as `2026-12-02 10:01:02` (UTC, as stored)."""
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value).strftime("%Y-%m-%d %H:%M:%S")
    except ValueError:
        return value


def _seconds(value: float | None) -> str:
    """A duration for people: 0.42 s, 12.3 s, 4 min 10 s, 2 h 5 min."""
    if value is None:
        return "-"
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    if value < 3600:
        return f"{int(value // 60)} min {int(value % 60)} s"
    return f"{int(value // 3600)} h {int(value % 3600 // 60)} min"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    size = float(value)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{value} B"


def _probability(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _match(match: dict[str, Any]) -> str:
    """A routing rule's match conditions, as the YAML flow style the config file uses."""
    if not match:
        return "{} (every series)"
    conditions = {k: c.model_dump(by_alias=True, exclude_none=True) for k, c in match.items()}
    return json.dumps(conditions, separators=(", ", ": "))


_env.filters.update(ts=_ts, seconds=_seconds, bytes=_bytes, probability=_probability, match=_match)
templates = Jinja2Templates(env=_env)


def page(request: Request, name: str, user: Principal | None, status: int = 200, **ctx: Any) -> HTMLResponse:
    """Render a page (or fragment) with the user, their roles and any flash message."""
    flash = unquote(request.cookies.get(FLASH, ""))[:500] or None
    response = templates.TemplateResponse(request, name, {
        "user": user, "is_operator": bool(user and user.can(Role.OPERATOR)),
        "is_admin": bool(user and user.can(Role.ADMIN)), "flash": flash, "path": request.url.path, **ctx,
    }, status_code=status)
    if flash and not name.startswith("_"):  # shown once, on the next full page
        response.delete_cookie(FLASH, path="/", httponly=True, samesite="strict")
    return response


def flash(response: Response, message: str) -> Response:
    """Carry a one-line message to the page the browser is sent to next (a cookie: any API
    process may render that page)."""
    response.set_cookie(FLASH, quote(message[:500]), max_age=60, httponly=True, samesite="strict", path="/")
    return response


def error_page(request: Request, status: int, title: str, detail: str | None,
               headers: dict[str, str] | None = None) -> HTMLResponse:
    """An error as a page; 401 sends the browser on to the login form."""
    login = None
    if status == 401:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        login = "/login?next=" + quote(target, safe="")
    response = templates.TemplateResponse(request, "error.html", {
        "user": None, "is_operator": False, "is_admin": False, "flash": None, "path": request.url.path,
        "status": status, "title": title, "detail": detail, "login": login}, status_code=status)
    for k, v in (headers or {}).items():
        if k.lower() != "www-authenticate":
            response.headers[k] = v
    return response


def safe_next(target: str | None) -> str:
    """A post-login destination on this site only (never //host or a scheme: no open redirect)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    return target
