"""RFC 9457 problem+json errors: every error the API returns, without stack traces."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from node.services.errors import Invalid, JobBusy, NotFound, TransitionError

log = logging.getLogger(__name__)
PROBLEM = "application/problem+json"


def problem(status: int, title: str, detail: str | None = None, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, **({"detail": detail} if detail else {}), **extra}
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


def install(app: FastAPI) -> None:
    """Map every error to problem+json."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"field": ".".join(str(p) for p in e["loc"] if p not in ("body", "query", "path")) or "body",
                   "in": str(e["loc"][0]) if e["loc"] else "body", "message": e["msg"]} for e in exc.errors()]
        first = errors[0] if errors else {"field": "body", "message": "invalid"}
        return problem(422, "Invalid request", f"{first['field']}: {first['message']}", errors=errors)

    @app.exception_handler(Invalid)
    async def _invalid(request: Request, exc: Invalid) -> JSONResponse:
        return problem(422, "Invalid request", str(exc), errors=[{"field": exc.field, "message": exc.message}])

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, exc: NotFound) -> JSONResponse:
        return problem(404, "Not found", str(exc))

    @app.exception_handler(JobBusy)
    async def _busy(request: Request, exc: JobBusy) -> JSONResponse:
        return problem(409, "Job is still active", str(exc))

    @app.exception_handler(TransitionError)
    async def _transition(request: Request, exc: TransitionError) -> JSONResponse:
        return problem(409, "Not allowed in the job's state", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(exc.status_code, _TITLES.get(exc.status_code, "Error"),
                       exc.detail if isinstance(exc.detail, str) else None, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem(500, "Internal error", "the error is in the node's log")


_TITLES = {401: "Not authenticated", 403: "Forbidden", 404: "Not found", 405: "Method not allowed",
           409: "Conflict", 413: "Too large", 415: "Unsupported media type", 429: "Too many requests"}

__all__ = ["HTTPException", "PROBLEM", "install", "problem"]
