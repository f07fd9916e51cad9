"""The ASGI app: `create_app(config)`; routers per resource, health probes, /metrics, security
headers, the dashboard (node.web) and its static files."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from node import metrics
from node.api import (
    problems,
    routes_admin,
    routes_auth,
    routes_jobs,
    routes_ops,
    routes_studies,
    stow,
)
from node.api.auth import Principal, Role, require_role
from node.config import Config, load_config
from node.heap import freeze_startup_heap
from node.services.overview import readiness

log = logging.getLogger(__name__)
access = logging.getLogger("pacsnode.access")
API = "/api/v1"
# No inline script or style anywhere (htmx is configured by a <meta> tag), so 'self' is enough.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class SecurityHeaders(BaseHTTPMiddleware):
    """CSP and the usual headers on every response; cross-origin browser writes refused; the
    request's duration observed per route template."""

    def __init__(self, app: Any, tls: bool) -> None:
        super().__init__(app)
        self.tls = tls

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        t0 = time.perf_counter()
        if request.method in UNSAFE and not _same_origin(request):
            # A browser names the page a write comes from; another site's page never gets here
            # (the CSRF token would stop it too: this is the second lock).
            response: Response = problems.problem(403, "Forbidden", "cross-origin request refused")
        else:
            response = await call_next(request)
        h = response.headers
        h.setdefault("Content-Security-Policy", CSP)
        h["X-Content-Type-Options"] = "nosniff"
        h["X-Frame-Options"] = "DENY"
        h["Referrer-Policy"] = "same-origin"  # no-referrer would make browsers send "Origin: null"
        h["Cross-Origin-Opener-Policy"] = "same-origin"
        h["Cross-Origin-Resource-Policy"] = "same-origin"
        h["Permissions-Policy"] = "camera=(), microphone=(), geolocation=()"
        # Pages and API answers hold patient data: never cached. The vendored assets may be.
        h.setdefault("Cache-Control", "private, max-age=3600" if request.url.path.startswith("/static/") else "no-store")
        if self.tls:
            h["Strict-Transport-Security"] = "max-age=31536000"
        seconds = time.perf_counter() - t0
        route = route_template(request)
        metrics.http_request(request.method, route, response.status_code, seconds)
        # Our access log, instead of uvicorn's: the route template and no query string, since a
        # search (q=) may be a Patient ID and a path holds UIDs.
        access.info("%s %s %s %.1f ms from %s", request.method, route, response.status_code, seconds * 1000,
                    request.client.host if request.client else "-")
        return response


def route_template(request: Request) -> str:
    """The request's path with each path parameter put back as {name} (a metric label must not
    carry a UID); "unmatched" when no route took the request."""
    if request.scope.get("route") is None:
        return "unmatched"
    names = {str(v): k for k, v in (request.scope.get("path_params") or {}).items()}
    segments = request.url.path.split("/")
    if not set(names) <= set(segments):  # a value with a slash or an escape: say nothing of it
        return "unmatched"
    return "/".join(f"{{{names[s]}}}" if s in names else s for s in segments)


def _same_origin(request: Request) -> bool:
    """False when the browser says the request comes from another site (Sec-Fetch-Site, else
    Origin); scripts that send neither are judged by their credentials alone."""
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is not None:
        host = request.headers.get("host", "")
        return origin in (f"http://{host}", f"https://{host}")
    return True


def create_app(config: Config) -> FastAPI:
    """The whole HTTP service for one config. Nothing it needs across requests lives in process
    memory (sessions, tokens, rate limits are in the database), so any number may run."""
    from node import web

    metrics.setup(config)
    # No Swagger UI: it loads its script from a CDN (hospitals are offline, and the CSP says
    # 'self'). The OpenAPI document is served below, to an authenticated caller like the rest.
    app = FastAPI(title="pacsnode", version="1", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.config = config
    problems.install(app)
    app.add_middleware(SecurityHeaders, tls=config.api.tls is not None)

    api = APIRouter(prefix=API)
    for module in (routes_auth, routes_studies, routes_jobs, routes_ops, routes_admin):
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

    @app.get(f"{API}/openapi.json", include_in_schema=False)
    async def openapi(who: Principal = Depends(require_role(Role.VIEWER))) -> JSONResponse:  # noqa: B008
        """The OpenAPI document of /api/v1 (the contract scripts are written against)."""
        return JSONResponse(app.openapi())

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    async def metrics_endpoint(who: Principal = Depends(require_role(Role.VIEWER))) -> Response:  # noqa: B008
        """Prometheus metrics of every process of this node (a viewer's token or session)."""
        body, ctype = await run_in_threadpool(metrics.render, config)
        return Response(body, media_type=ctype)

    app.include_router(web.router)
    app.mount("/static", StaticFiles(directory=Path(web.__file__).parent / "static"), name="static")
    return app


def create_app_from_env() -> FastAPI:
    """The app for the config in PACSNODE_CONFIG (uvicorn's worker processes, `pacsnode api --workers`)."""
    app = create_app(load_config())
    freeze_startup_heap(busy=True)
    return app
