"""One result UID, one set of bytes, for ever.

Result UIDs derive from the study, the model and the sources (node/engine/inference.py), so a
replay writes the same objects under the same UIDs and the PACS receives nothing new. That
holds only while the writers write what they wrote before. After an upgrade of pacsnode,
pydicom or highdicom, a replay could send other bytes under UIDs the PACS already holds:
Orthanc keeps its first copy by default (the new result would be dropped without a word),
another PACS may overwrite. So before a kind of objects is stored, each object is compared
with what earlier outputs (other jobs', and this job's earlier attempt) hold under its UID;
where any differs, the kind's objects are built again under a revision of their UIDs, named
after the new bytes, so a re-run of the same code gets the same revision.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.tag import Tag
from sqlalchemy import select

from node.config import Config
from node.db.models import Event, Output
from node.db.session import session_scope
from node.spool import resolve, sha256_hex

log = logging.getLogger(__name__)

#: Predecessor Documents Sequence: the SRs an SR supersedes.
PREDECESSORS = Tag(0x0040, 0xA360)


@dataclass(frozen=True)
class Earlier:
    """An earlier output that holds one of a kind's UIDs with other bytes."""

    job_id: int
    kind: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Written:
    """What a job's earlier attempt wrote: read before this attempt replaces its rows and files."""

    earlier: Earlier
    sha256: str | None  # of its bytes; None: not recorded and its file can no longer be read


def written_by(config: Config, job_id: int) -> dict[str, Written]:
    """The outputs an earlier attempt of this job wrote (SOP Instance UID -> them); empty on a
    first attempt. An attempt that was interrupted after its SR left may have run older code."""
    with session_scope(config.database.url) as s:
        rows = s.scalars(select(Output).where(Output.job_id == job_id).order_by(Output.id)).all()
        return {o.sop_instance_uid: Written(_earlier(o), _digest(config, o)) for o in rows}


def differing(config: Config, job_id: int, own: Mapping[str, Written], digests: Mapping[str, str]) -> list[Earlier]:
    """Earlier outputs that hold one of the SOP Instance UIDs in `digests` (UID -> sha256 of the
    bytes this job would write) with other bytes, or that cannot show they hold the same (no
    digest recorded, and the file gone: an output of a version before 0012 whose study left the spool)."""
    found = [w.earlier for uid, w in own.items() if uid in digests and w.sha256 != digests[uid]]
    if not digests:
        return found
    with session_scope(config.database.url) as s:
        rows = s.scalars(select(Output).where(Output.sop_instance_uid.in_(list(digests)), Output.job_id != job_id)
                         .order_by(Output.id)).all()
        found += [_earlier(o) for o in rows if _digest(config, o) != digests[o.sop_instance_uid]]
    return found


def revision(data: Iterable[bytes]) -> str:
    """The UID part that names a revision of a kind's objects: a digest of their bytes, less
    the SRs they supersede (so the next replay under the same code, which supersedes this
    revision's SR rather than the first, names the same revision and writes the same bytes)."""
    digest = hashlib.sha256()
    for d in data:
        digest.update(hashlib.sha256(_without_predecessors(d)).digest())
    return f"revision={digest.hexdigest()[:32]}"


def record(config: Config, job_id: int, kind: str, clashed: Iterable[Earlier], revision_: str) -> None:
    """Say in the log and the audit log (kind "revision", actor "engine") why the job's objects
    of this kind take new UIDs: an admin who replays after an upgrade sees new objects reach the PACS."""
    jobs = sorted({e.job_id for e in clashed})
    detail = (f"{kind}: earlier outputs (jobs {jobs}) hold its UIDs with other bytes (the writers, or the model "
              f"outputs they draw, changed since): built again under new UIDs ({revision_})")
    log.warning("job %d: %s", job_id, detail)
    with session_scope(config.database.url) as s:
        s.add(Event(kind="revision", job_id=job_id, actor="engine", detail=detail))


def _without_predecessors(data: bytes) -> bytes:
    if PREDECESSORS not in dcmread(BytesIO(data), stop_before_pixels=True):  # it precedes the pixels
        return data
    ds = dcmread(BytesIO(data))
    del ds[PREDECESSORS]
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _earlier(o: Output) -> Earlier:
    return Earlier(o.job_id, o.kind, o.series_instance_uid, o.sop_instance_uid)


def _digest(config: Config, o: Output) -> str | None:
    """The output's recorded digest; for one written before digests were recorded, its file's."""
    if o.sha256 is not None:
        return o.sha256
    try:
        return sha256_hex(resolve(config.storage.path, o.path).read_bytes())
    except OSError:  # gone, or a path outside the spool (SpoolError): not shown to be the same
        return None
