"""The ASGI app: `create_app(config)`; routers per resource, health probes, security headers."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from node.api import problems, routes_auth, routes_jobs, routes_ops, routes_studies, stow
from node.config import Config
from node.services.ops import readiness

log = logging.getLogger(__name__)
API = "/api/v1"
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


class SecurityHeaders(BaseHTTPMiddleware):
    def __init__(self, app: Any, tls: bool) -> None:
        super().__init__(app)
        self.tls = tls

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        h = response.headers
        h.setdefault("Content-Security-Policy", CSP)
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "no-referrer"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        if request.url.path.startswith((API, "/dicom-web")):
            h.setdefault("Cache-Control", "no-store")
        if self.tls:
            h["Strict-Transport-Security"] = "max-age=31536000"
        return response


def create_app(config: Config) -> FastAPI:
    """The whole HTTP service for one config. Nothing it needs across requests lives in process
    memory (sessions, tokens, rate limits are in the database), so any number may run."""
    app = FastAPI(title="pacsnode", version="1", openapi_url=f"{API}/openapi.json", docs_url=f"{API}/docs",
                  redoc_url=None)
    app.state.config = config
    problems.install(app)
    app.add_middleware(SecurityHeaders, tls=config.api.tls is not None)

    api = APIRouter(prefix=API)
    for module in (routes_auth, routes_studies, routes_jobs, routes_ops):
        api.include_router(module.router)
    app.include_router(api)
    app.include_router(stow.router)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive (no authentication)."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz() -> JSONResponse:
        """Database, broker, spool free space and a recent worker heartbeat; 503 with the reason."""
        out = await run_in_threadpool(readiness, config)
        if not out["ready"]:
            out["reason"] = "; ".join(f"{k}: {v.get('detail', 'failed')}" for k, v in out["checks"].items() if not v["ok"])
        return JSONResponse(out, status_code=200 if out["ready"] else 503)

    _include_web(app)
    return app


def _include_web(app: FastAPI) -> None:
    """The dashboard (node.web), when it is installed: its router and its /static files."""
    try:
        web = importlib.import_module("node.web")
    except ImportError as e:
        if e.name not in ("node.web",):
            raise
        return
    router = getattr(web, "router", None)
    if router is not None:
        app.include_router(router)
    static = Path(web.__file__ or "").parent / "static"
    if static.is_dir():
        from fastapi.staticfiles import StaticFiles

        app.mount("/static", StaticFiles(directory=static), name="static")
