"""The dashboard: server-rendered pages over the service layer, plus GET /metrics."""

from node.web.routes import router

__all__ = ["router"]
