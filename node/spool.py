"""The spool: received instances and our results on disk, written atomically.

File names are hashes of UIDs, never the UIDs themselves: UIDs come from the wire and are
untrusted, so no path is ever built from one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class SpoolError(OSError):
    """A path would leave the spool, or the spool cannot be written."""


def _h(value: str) -> str:
    return hashlib.sha256(value.encode("ascii", "replace")).hexdigest()


def instance_relpath(study_uid: str, sop_uid: str, sha256: str) -> str:
    """Relative path of a received instance; the content hash keeps re-sent versions apart."""
    s = _h(study_uid)
    return f"instances/{s[:2]}/{s[:24]}/{_h(sop_uid)[:32]}.{sha256[:12]}.dcm"


def output_relpath(job_id: int, kind: str, index: int) -> str:
    """Relative path of a result object written by a job."""
    if not kind.isalnum():
        raise SpoolError(f"output kind must be alphanumeric, not {kind!r}")
    return f"outputs/{job_id // 1000:04d}/{job_id}/{kind}-{index}.dcm"


def resolve(root: Path, relpath: str) -> Path:
    """Absolute path of relpath under root; refuse anything that would leave root."""
    base = root.resolve()
    p = (base / relpath).resolve()
    if base != p and base not in p.parents:
        raise SpoolError(f"path {relpath!r} leaves the spool")
    return p


def write_atomic(root: Path, relpath: str, data: bytes) -> Path:
    """Write data to root/relpath durably: temp file, fsync, rename, fsync of the folder."""
    target = resolve(root, relpath)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return target


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
