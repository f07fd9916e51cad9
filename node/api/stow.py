"""STOW-RS in (PS3.18 10.5): each part of a multipart/related request goes through the same
`node.handlers.ingest` as a C-STORE, with the same durability, refusals and completion."""

from __future__ import annotations

import logging
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydicom import Dataset
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from node import metrics
from node.api.auth import Principal, actor, client_address, config_of, operator
from node.db.models import Study, utcnow
from node.db.session import session_scope
from node.handlers import IngestContext, Peer, StoreRefused, audit, ingest

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])
PROCESSING_FAILURE = 0x0110  # PS3.18 Table I.2-1: no better reason is known for this part
_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.I)
_TYPE = re.compile(r'type="?([^";]+)"?', re.I)


class BadRequest(ValueError):
    pass


def split_multipart(content_type: str, body: bytes) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/related body: (lower-cased headers, payload bytes)."""
    m = _BOUNDARY.search(content_type)
    if not m:
        raise BadRequest("Content-Type has no boundary")
    delimiter = b"--" + m.group(1).strip().encode()
    chunks = body.split(b"\r\n" + delimiter)
    # The first chunk is the preamble (or the first part when the body starts with the delimiter).
    first = chunks[0]
    if first.startswith(delimiter):
        chunks[0] = first[len(delimiter):]
    else:
        chunks = chunks[1:]
    parts = []
    for chunk in chunks:
        if chunk.startswith(b"--"):  # the close delimiter
            break
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise BadRequest("a part has no header/body separator")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload))
    return parts


def _ctx(request: Request) -> IngestContext:
    ctx = getattr(request.app.state, "ingest", None)
    if ctx is None:
        ctx = request.app.state.ingest = IngestContext(config_of(request))
    return ctx


def _store_all(ctx: IngestContext, parts: list[tuple[dict[str, str], bytes]], who: str,
               address: str | None) -> tuple[list[tuple[str, str]], list[tuple[str | None, str | None, int, str]]]:
    stored: list[tuple[str, str]] = []  # (sop class, sop instance)
    failed: list[tuple[str | None, str | None, int, str]] = []
    studies: set[str] = set()
    peer = Peer(calling_ae=None, called_ae=None, address=address)
    for headers, data in parts:
        ctype = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if ctype != "application/dicom":
            failed.append((None, None, PROCESSING_FAILURE, f"part of type {ctype} is not application/dicom"))
            continue
        sop_class, sop_uid = _uids(data)
        t0 = time.perf_counter()
        try:
            study_uid, sop_uid_stored = ingest(data, ctx, None, peer)
        except StoreRefused as e:
            metrics.instance_refused(e.status)
            log.warning("STOW-RS part from %s refused with 0x%04X: %s", who, e.status, e)
            audit(ctx, "store_refused", who, f"0x{e.status:04X}: {e}")
            failed.append((sop_class, sop_uid, e.status, str(e)))
            continue
        metrics.instance_received(0x0000, time.perf_counter() - t0)
        studies.add(study_uid)
        stored.append((sop_class or "", sop_uid_stored))
    if studies:
        # The request is the association: its end starts each study's quiet timer.
        with session_scope(ctx.config.database.url) as s:
            for st in s.scalars(select(Study).where(Study.study_instance_uid.in_(studies))):
                st.released_at = utcnow()
    return stored, failed


def _uids(data: bytes) -> tuple[str | None, str | None]:
    """SOP Class/Instance UIDs of a part for the response, if it parses that far."""
    from io import BytesIO

    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, AttributeError, OSError):
        return None, None
    return (str(ds.SOPClassUID) if "SOPClassUID" in ds else None,
            str(ds.SOPInstanceUID) if "SOPInstanceUID" in ds else None)


def store_response(stored: list[tuple[str, str]], failed: list[tuple[str | None, str | None, int, str]]) -> Dataset:
    """The PS3.18 store instances response module."""
    ds = Dataset()
    ds.ReferencedSOPSequence = []
    for cls, uid in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = uid
        ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = []
        for fcls, fuid, reason, _ in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = fcls or ""
            item.ReferencedSOPInstanceUID = fuid or ""
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    return ds


@router.post("/studies", response_class=JSONResponse,
             responses={200: {"description": "all stored"}, 202: {"description": "some stored"},
                        409: {"description": "none stored"}})
async def stow(request: Request, who: Annotated[Principal, Depends(operator)]) -> Any:
    """Store instances (multipart/related; type="application/dicom")."""
    cfg = config_of(request)
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/related"):
        raise HTTPException(415, 'send multipart/related; type="application/dicom"')
    t = _TYPE.search(ctype)
    if t and t.group(1).strip().lower() != "application/dicom":
        raise HTTPException(415, f"type {t.group(1)} is not supported; use application/dicom")
    limit = cfg.storage.max_instance_mb * 2**20 * 16
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request larger than {limit // 2**20} MB; send fewer instances per request")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"request larger than {limit // 2**20} MB; send fewer instances per request")
    try:
        parts = split_multipart(ctype, bytes(body))
    except BadRequest as e:
        raise HTTPException(400, str(e)) from e
    if not parts:
        raise HTTPException(400, "the request has no parts")
    stored, failed = await run_in_threadpool(_store_all, _ctx(request), parts, actor(request, who),
                                             client_address(request))
    status = 200 if not failed else 202 if stored else 409
    return JSONResponse(store_response(stored, failed).to_json_dict(), status_code=status,
                        media_type="application/dicom+json")
