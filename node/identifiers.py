"""Keyed hashes of patient identifiers: exact search by Accession Number or Patient ID while
the database keeps neither in clear (HMAC-SHA256; without the key a hash reveals nothing)."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from functools import cache
from pathlib import Path

from node.config import Config

KEY_FILE = "identifier.key"


def _private_write(path: Path, text: str) -> None:
    """Create path readable by its owner only (0600); never overwrite an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


@cache
def _file_key(state_dir: Path) -> bytes:
    path = state_dir / KEY_FILE
    if not path.exists():
        try:
            _private_write(path, secrets.token_hex(32) + "\n")
        except FileExistsError:  # another process made it first: use theirs
            pass
    return path.read_text().strip().encode()


def identifier_key(config: Config) -> bytes:
    """api.identifier_key, else the node's own key file under api.state_dir (made on first use)."""
    if config.api.identifier_key:
        return config.api.identifier_key.encode()
    return _file_key(config.api.state_dir)


def keyed_hash(config: Config, value: str | None) -> str | None:
    """HMAC-SHA256 hex of a stripped identifier; None for an empty one."""
    text = (value or "").strip()
    if not text:
        return None
    return hmac.new(identifier_key(config), text.encode(), hashlib.sha256).hexdigest()
