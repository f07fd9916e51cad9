"""Errors the service functions raise; the API maps each to one HTTP status."""

from __future__ import annotations

from node.jobs import JobBusy, TransitionError


class NotFound(LookupError):
    """No such study, job, destination (404)."""


class Invalid(ValueError):
    """A bad argument (422); names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


__all__ = ["Invalid", "JobBusy", "NotFound", "TransitionError"]
