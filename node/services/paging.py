"""Keyset pagination: an opaque cursor holding the last id seen (newest first, by id)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from node.services.errors import Invalid

MAX_LIMIT = 500


@dataclass
class Page:
    items: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"id:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int | None:
    """The id to continue below; Invalid("cursor") for anything we did not hand out."""
    if not cursor:
        return None
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "id" or not value.isdigit():
            raise ValueError(text)
        return int(value)
    except ValueError as e:
        raise Invalid("cursor", "not a cursor this server handed out") from e


def check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise Invalid("limit", f"must be between 1 and {MAX_LIMIT}")
    return limit
