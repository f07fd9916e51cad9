"""RFC 9457 problem+json errors for every error the API returns, without stack traces; a
browser asking for a dashboard page gets the same error as an HTML page instead."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from node.services.errors import Invalid, JobBusy, NotFound, TransitionError

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"
#: Paths whose errors are always problem+json, whatever the client accepts.
MACHINE_PATHS = ("/api/", "/dicom-web", "/metrics", "/healthz", "/readyz")


def problem(status: int, title: str, detail: str | None = None, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, **({"detail": detail} if detail else {}), **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def _wants_html(request: Request) -> bool:
    return (not request.url.path.startswith(MACHINE_PATHS)
            and "text/html" in request.headers.get("accept", ""))


def _respond(request: Request, status: int, title: str, detail: str | None, headers: dict[str, str] | None = None,
             **extra: Any) -> Response:
    if _wants_html(request):
        from node.web.render import error_page

        return error_page(request, status, title, detail, headers)
    return problem(status, title, detail, headers, **extra)


def install(app: FastAPI) -> None:
    """Map every error to problem+json (or, for a browser's page request, an HTML page)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path", "form")) or "body",
                   "in": str(e["loc"][0]) if e["loc"] else "body", "message": e["msg"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "message": "invalid"}
        return _respond(request, 422, "Invalid request", f"{first['field']}: {first['message']}", errors=errors)

    @app.exception_handler(Invalid)
    async def _invalid(request: Request, exc: Invalid) -> Response:
        return _respond(request, 422, "Invalid request", str(exc),
                        errors=[{"field": exc.field, "message": exc.message}])

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> Response:
        return _respond(request, 404, "Not found", str(exc))

    @app.exception_handler(JobBusy)
    async def _busy(request: Request, exc: JobBusy) -> Response:
        return _respond(request, 409, "Job is still active", str(exc))

    @app.exception_handler(TransitionError)
    async def _transition(request: Request, exc: TransitionError) -> Response:
        return _respond(request, 409, "Not allowed in the job's state", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return _respond(request, exc.status_code, _TITLES.get(exc.status_code, "Error"),
                        exc.detail if isinstance(exc.detail, str) else None, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _respond(request, 500, "Internal error", "the error is in the node's log")


_TITLES = {400: "Bad request", 401: "Not authenticated", 403: "Forbidden", 404: "Not found",
           405: "Method not allowed", 409: "Conflict", 413: "Too large", 415: "Unsupported media type",
           429: "Too many requests"}

__all__ = ["HTTPException", "PROBLEM", "install", "problem"]
