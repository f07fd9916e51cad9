"""C-ECHO / C-STORE handlers: save, record, answer with a status. Never run a pipeline here.

An instance is acknowledged only once its file is fsync'd and its row committed. Each failure
maps to its own DICOM status and a log line that names UIDs, never patient attributes.
"""

from __future__ import annotations

import logging
import shutil
import struct
import threading
import time
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import UID
from pynetdicom import evt
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from node import metrics
from node.config import Config
from node.db.models import Event, Instance, Series, SeriesState, Study, StudyState, utcnow
from node.db.session import session_scope
from node.identifiers import keyed_hash
from node.routing import routing_record, rule_keys
from node.spool import SpoolError, instance_relpath, sha256_hex, write_atomic

log = logging.getLogger(__name__)

# C-STORE statuses (PS3.4 B.2.3 and pynetdicom's conventions)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900  # "Data Set does not match SOP Class": missing/invalid UIDs
CANNOT_UNDERSTAND = 0xC210  # dataset does not parse
PROCESSING_FAILURE = 0x0110


class StoreRefused(Exception):
    """An instance we do not keep; carries the status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class AssociationTracker:
    """Which studies each open association has delivered (in memory, listener process only)."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _by_assoc: dict[int, set[str]] = field(default_factory=lambda: defaultdict(set))

    def add(self, assoc_id: int, study_uid: str) -> None:
        with self._lock:
            self._by_assoc[assoc_id].add(study_uid)

    def close(self, assoc_id: int) -> set[str]:
        """Forget an association; return the studies no other open association is delivering."""
        with self._lock:
            studies = self._by_assoc.pop(assoc_id, set())
            still_open = set().union(*self._by_assoc.values()) if self._by_assoc else set()
        return studies - still_open

    def open_studies(self) -> set[str]:
        with self._lock:
            return set().union(*self._by_assoc.values()) if self._by_assoc else set()


@dataclass(frozen=True)
class Peer:
    """Who sent an instance: the association's AE titles and the source address."""

    calling_ae: str | None
    called_ae: str | None = None
    address: str | None = None


@dataclass
class IngestContext:
    config: Config
    tracker: AssociationTracker = field(default_factory=AssociationTracker)
    routing_keys: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.spool.mkdir(parents=True, exist_ok=True)
        # The keywords the routing rules look at, recorded with each new series.
        self.routing_keys = frozenset(rule_keys(self.config.routing))

    @property
    def spool(self) -> Path:
        return self.config.storage.path


def _valid_uid(value: object, name: str) -> str:
    uid = str(value or "")
    if not uid:
        raise StoreRefused(DATASET_MISMATCH, f"{name} is missing")
    if not UID(uid).is_valid:
        raise StoreRefused(DATASET_MISMATCH, f"{name} is not a valid UID ({len(uid)} characters)")
    return uid


def _text(ds: pydicom.Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip().upper()[:limit] or None


# What pydicom raises on hostile bytes (found by bench/fuzz_ingest.py): OSError "No tag to read"
# in sequences, zlib.error in deflated data sets, BytesLengthException for odd-length values,
# struct.error / IndexError / OverflowError / RecursionError on lengths and nesting that lie.
_UNPARSABLE = (InvalidDicomError, BytesLengthException, ValueError, EOFError, KeyError, TypeError,
               AttributeError, IndexError, OverflowError, RecursionError, NotImplementedError, OSError,
               struct.error, zlib.error)


def parse(data: bytes) -> tuple[pydicom.Dataset, list[warnings.WarningMessage]]:
    """Parse an encoded instance completely (every element converted, pixel bytes not decoded).

    pydicom converts element values lazily, so an unparsable value would otherwise surface later,
    in whatever code first reads it; here every one is read once, inside the guard.
    Raises StoreRefused(0xC210) naming what does not parse; returns the warnings pydicom gave.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(BytesIO(data))
            for _ in ds.file_meta.iterall():
                pass
            for _ in ds.iterall():
                pass
    except _UNPARSABLE as e:
        raise StoreRefused(CANNOT_UNDERSTAND, f"dataset does not parse: {type(e).__name__}: {e}"[:500]) from e
    return ds, list(caught)


def ingest(data: bytes, ctx: IngestContext, calling_ae: str | None, peer: Peer | None = None) -> tuple[str, str]:
    """Store one encoded instance (with file meta); return (study_uid, sop_uid).

    Raises StoreRefused with the status to answer when the instance is not kept.
    """
    cfg = ctx.config.storage
    if len(data) > cfg.max_instance_mb * 1024 * 1024:
        raise StoreRefused(OUT_OF_RESOURCES, f"instance of {len(data)} bytes exceeds storage.max_instance_mb")
    try:
        free = shutil.disk_usage(ctx.spool).free
    except OSError as e:
        raise StoreRefused(OUT_OF_RESOURCES, f"spool is not usable: {e}") from e
    if free - len(data) < cfg.min_free_mb * 1024 * 1024:
        raise StoreRefused(OUT_OF_RESOURCES, f"free space {free // 2**20} MB is below storage.min_free_mb")
    ds, caught = parse(data)
    truncated = [str(w.message) for w in caught if "End of file reached" in str(w.message)]
    if truncated or ("Rows" in ds and not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))):
        raise StoreRefused(DATASET_MISMATCH, "image has no complete pixel data (truncated?)")
    study_uid = _valid_uid(ds.get("StudyInstanceUID"), "StudyInstanceUID")
    series_uid = _valid_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID")
    sop_uid = _valid_uid(ds.get("SOPInstanceUID"), "SOPInstanceUID")
    sop_class = _valid_uid(ds.get("SOPClassUID"), "SOPClassUID")
    digest = sha256_hex(data)
    relpath = instance_relpath(study_uid, sop_uid, digest)
    try:
        with session_scope(ctx.config.database.url) as s:
            existing = s.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))
            if existing is not None and existing.sha256 == digest:
                log.info("duplicate instance %s ignored (same content)", sop_uid)
                return study_uid, sop_uid
            path = write_atomic(ctx.spool, relpath, data)
            try:
                _record(s, ds, study_uid, series_uid, sop_uid, sop_class, relpath, digest, len(data), calling_ae, existing,
                        routing_record(ds, ctx.routing_keys, calling_ae, peer.called_ae if peer else None,
                                       peer.address if peer else None), ctx.config)
                s.flush()
            except BaseException:
                path.unlink(missing_ok=True)
                raise
    except (SQLAlchemyError, OSError, SpoolError) as e:
        raise StoreRefused(OUT_OF_RESOURCES, f"instance {sop_uid} not stored: {e}") from e
    return study_uid, sop_uid


def _record(
    s, ds, study_uid, series_uid, sop_uid, sop_class, relpath, digest, size, calling_ae, existing, routing, config
) -> None:  # type: ignore[no-untyped-def]
    now = utcnow()
    study = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        study = Study(study_instance_uid=study_uid, state=StudyState.RECEIVING, calling_ae=calling_ae,
                      first_received_at=now, instance_count=0)
        s.add(study)
        s.flush()
    elif study.state != StudyState.RECEIVING:
        log.info("late instance %s for study %s: it will be processed again", sop_uid, study_uid)
        study.state = StudyState.RECEIVING
    expected = ds.get("NumberOfStudyRelatedInstances")
    if isinstance(expected, int) and expected > 0:
        study.expected_instances = expected
    study.last_received_at = now
    study.released_at = None
    # Keyed hashes only (never the identifiers): `GET /studies?q=` finds the study by exact value.
    study.accession_hash = keyed_hash(config, str(ds.get("AccessionNumber", ""))) or study.accession_hash
    study.patient_id_hash = keyed_hash(config, str(ds.get("PatientID", ""))) or study.patient_id_hash
    series = s.scalar(select(Series).where(Series.series_instance_uid == series_uid))
    if series is None:
        series = Series(study_id=study.id, series_instance_uid=series_uid, state=SeriesState.PENDING,
                        modality=_text(ds, "Modality", 16), body_part=_text(ds, "BodyPartExamined", 64),
                        view_position=_text(ds, "ViewPosition", 16), routing_attributes=routing)
        s.add(series)
        s.flush()
    elif series.study_id != study.id:
        raise StoreRefused(DATASET_MISMATCH, f"series {series_uid} already belongs to another study")
    if existing is not None:
        # Same SOP Instance UID, different bytes: keep both files, point to the newest, say so.
        log.warning("instance %s re-sent with different content; keeping both versions", sop_uid)
        s.add(Event(kind="instance_version", actor=calling_ae,
                    detail=f"{sop_uid}: previous file {existing.path} kept, new file {relpath}"))
        existing.path, existing.sha256, existing.size = relpath, digest, size
        existing.received_at = now
        return
    study.instance_count += 1
    tsyntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    s.add(Instance(series_id=series.id, sop_instance_uid=sop_uid, sop_class_uid=sop_class,
                   transfer_syntax_uid=tsyntax, path=relpath, size=size, sha256=digest,
                   calling_ae=calling_ae, received_at=now))


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_store(event: evt.Event, ctx: IngestContext) -> int:
    """EVT_C_STORE: store the encoded bytes as received (no pixel decoding) and answer."""
    assoc = event.assoc
    calling = assoc.requestor.ae_title.strip() if assoc.requestor.ae_title else None
    peer = Peer(calling, assoc.acceptor.ae_title.strip() or None, assoc.requestor.address)
    t0 = time.perf_counter()
    try:
        data = event.encoded_dataset(include_meta=True)
        study_uid, sop_uid = ingest(data, ctx, calling, peer)
    except StoreRefused as e:
        metrics.instance_refused(e.status)
        log.warning("C-STORE from %s refused with 0x%04X: %s", calling, e.status, e)
        audit(ctx, "store_refused", calling, f"0x{e.status:04X}: {e}")
        return e.status
    except Exception as e:  # the association must survive anything one instance does
        log.exception("C-STORE from %s failed", calling)
        audit(ctx, "store_failed", calling, str(e))
        metrics.instance_refused(OUT_OF_RESOURCES)
        return OUT_OF_RESOURCES
    metrics.instance_received(SUCCESS, time.perf_counter() - t0)
    ctx.tracker.add(id(assoc), study_uid)
    log.debug("stored %s of study %s", sop_uid, study_uid)
    return SUCCESS


def audit(ctx: IngestContext, kind: str, actor: str | None, detail: str) -> None:
    """Record an Event row (rejections, refusals); a database failure is logged, never raised."""
    try:
        with session_scope(ctx.config.database.url) as s:
            s.add(Event(kind=kind, actor=actor, detail=detail[:2000]))
    except SQLAlchemyError:
        log.exception("could not record %s event", kind)


def handle_closed(event: evt.Event, ctx: IngestContext) -> None:
    """EVT_RELEASED / EVT_ABORTED / EVT_CONN_CLOSE: start the quiet timer of delivered studies."""
    studies = ctx.tracker.close(id(event.assoc))
    if not studies:
        return
    now = utcnow()
    try:
        with session_scope(ctx.config.database.url) as s:
            for study in s.scalars(select(Study).where(Study.study_instance_uid.in_(studies))):
                study.released_at = now
    except SQLAlchemyError:
        # The completion timer still fires from last_received_at; nothing is lost.
        log.exception("could not record release of %d studies", len(studies))

