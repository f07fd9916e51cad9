"""Export: send result files to a destination and confirm them there, with timeouts.

`send_files` uses one C-STORE association or one STOW-RS request per batch, as the destination's
protocol says; `confirm_held` asks the destination (C-FIND or QIDO-RS) whether it holds each
object, and `request_commitment` asks it to commit them (Storage Commitment Push Model: its
answer comes later, to the listener; node/engine/commitment.py), for destinations that must
confirm before a job is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import _config, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
    StudyRootQueryRetrieveInformationModelFind,
)
from pynetdicom.status import STATUS_PENDING, STATUS_SUCCESS, code_to_category

from node import metrics
from node.associations import POOL, usable
from node.config import Destination
from node.db.models import utcnow
from node.dimse import RequestorAE, succeeded, tune_connection
from node.engine.errors import Stage

log = logging.getLogger(__name__)

# A file path given to send_c_store is streamed from disk as it is, not decoded and encoded
# again (for an SR, that round trip cost more than the C-STORE itself): `_stored_form` gives a
# path only where the destination accepted the file's own transfer syntax.
_config.STORE_SEND_CHUNKED_DATASET = True


class DestinationUnavailable(ConnectionError):
    """The association could not be established (transient: retry later)."""


class CommitmentRefused(RuntimeError):
    """The destination answered a Storage Commitment request with a failure (or not at all)."""


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int | None  # the remote C-STORE status, None when no response came
    error: str | None
    at: datetime  # when the response came (or the attempt ended)

    @property
    def ok(self) -> bool:
        return succeeded(self.status)


@dataclass(frozen=True)
class ObjectRef:
    """The UIDs that locate one sent object at the destination."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str


#: Every C-STORE association proposes the SOP classes of all the result objects (so the one that
#: carried a job's SR can carry its other objects), and of any other file it sends, in these
#: transfer syntaxes (node/conformance.py states both).
RESULT_SOP_CLASSES = {"sr": Comprehensive3DSRStorage, "sc": SecondaryCaptureImageStorage,
                      "seg": SegmentationStorage, "gsps": GrayscaleSoftcopyPresentationStateStorage}
SCU_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


def send_files(dest: Destination, paths: Sequence[Path], calling_ae_title: str,
               keep_open_seconds: float = 0.0) -> list[SendOutcome]:
    """Send each file to dest (C-STORE or STOW-RS); raise DestinationUnavailable if it cannot be reached.

    C-STORE: the association is kept open `keep_open_seconds` after the last file for the next
    call to the same destination (node/associations.py); 0 releases it at once.
    """
    t0 = time.perf_counter()
    try:
        if dest.protocol == "stow":
            return _stow(dest, paths)
        return _c_store(dest, paths, calling_ae_title, keep_open_seconds)
    finally:
        metrics.stage_seconds(Stage.SEND, time.perf_counter() - t0)


def _ae(dest: Destination, calling_ae_title: str) -> RequestorAE:
    ae = RequestorAE(ae_title=calling_ae_title)
    ae.connection_timeout = dest.timeout
    ae.acse_timeout = dest.timeout
    ae.dimse_timeout = dest.timeout
    ae.network_timeout = dest.timeout
    return ae


def _associate(ae: RequestorAE, dest: Destination) -> Association:
    assert dest.host is not None and dest.port is not None and dest.ae_title is not None  # config checks
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)])
    if not assoc.is_established:
        raise DestinationUnavailable(
            f"association with {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}) failed: {refusal(assoc)}"
        )
    return assoc


def refusal(assoc: Association) -> str:
    """Why an association was not established, in the destination's own terms where it gave
    them: an admin must tell a PACS at its association limit (transient: the retries will get
    through) from one that does not know our AE title or takes none of our SOP classes (a
    setting to change on the PACS)."""
    answer = assoc.acceptor.primitive  # the A-ASSOCIATE response, where one came
    if assoc.is_rejected and answer is not None:
        return f"rejected ({answer.result_str}; {answer.source_str}: {answer.reason_str})"
    if answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
        # pynetdicom aborts an association on which no presentation context was accepted
        proposed = sorted({UID(str(cx.abstract_syntax)).name for cx in assoc.requestor.requested_contexts})
        return f"the destination accepted none of the proposed SOP classes and transfer syntaxes ({', '.join(proposed)})"
    return "aborted" if assoc.is_aborted else "no answer"


def _stored_form(assoc: Association, path: Path, meta: Dataset) -> Path | Dataset:
    """What to give send_c_store: the file itself when the destination accepted its SOP class in
    the file's transfer syntax, else the decoded dataset (pynetdicom converts it to one accepted)."""
    sop_class, syntax = UID(meta.MediaStorageSOPClassUID), UID(meta.TransferSyntaxUID)
    if any(c.abstract_syntax == sop_class and syntax in c.transfer_syntax for c in assoc.accepted_contexts):
        return path
    return pydicom.dcmread(path)


def _c_store(dest: Destination, paths: Sequence[Path], calling_ae_title: str,
             keep_open_seconds: float) -> list[SendOutcome]:
    metas = [read_file_meta_info(p) for p in paths]
    classes = tuple(sorted({str(m.MediaStorageSOPClassUID) for m in metas} | set(RESULT_SOP_CLASSES.values())))
    key = (dest.host, dest.port, dest.ae_title, dest.timeout, calling_ae_title, classes)

    def open_new() -> Association:
        ae = _ae(dest, calling_ae_title)
        for sop_class in classes:
            ae.add_requested_context(sop_class, SCU_SYNTAXES)
        return _associate(ae, dest)

    with POOL.lease(key, open_new, keep_open_seconds) as (assoc, reused):
        outcomes = _store_each(dest, assoc, paths, metas)
        lost = reused and outcomes[0].status is None and not usable(assoc)
    if lost:
        # The peer closed the kept association (a restart, its own idle timeout) before it
        # answered anything: the batch goes again on a new one. A C-STORE it did act on and
        # is sent twice carries the same SOP Instance UID and bytes.
        log.info("kept association to %s was lost before an answer (%s): sending on a new one",
                 dest.name, outcomes[0].error)
        with POOL.lease(key, open_new, keep_open_seconds, reuse=False) as (assoc, _):
            outcomes = _store_each(dest, assoc, paths, metas)
    return outcomes


def _store_each(dest: Destination, assoc: Association, paths: Sequence[Path], metas: Sequence[Dataset],
                ) -> list[SendOutcome]:
    """C-STORE each file on assoc, in order, until the association drops; one outcome per file."""
    outcomes = []
    for path, meta in zip(paths, metas, strict=True):
        try:
            rsp = assoc.send_c_store(_stored_form(assoc, path, meta))
        except (RuntimeError, ValueError, AttributeError) as e:
            outcomes.append(SendOutcome(path, None, f"not sent: {e}", utcnow()))
            continue
        status = int(rsp.Status) if "Status" in rsp else None
        err = None if status is not None else "no response (timeout or abort)"
        if status is not None and not succeeded(status):
            err = f"remote status 0x{status:04X}"
        outcomes.append(SendOutcome(path, status, err, utcnow()))
        metrics.send_result(dest.name, "ok" if err is None else "failed")
        if not usable(assoc):  # is_established alone lags an abort that just came in
            break
    # Files never attempted because the association dropped count as not sent.
    done = {o.path for o in outcomes}
    outcomes += [SendOutcome(p, None, "association lost before sending", utcnow()) for p in paths if p not in done]
    return outcomes


def _dicomweb(dest: Destination) -> DICOMwebClient:
    assert dest.url is not None  # config checks
    client = DICOMwebClient(dest.url, timeout=dest.timeout)
    # The export task retries with its own backoff; a retry inside the client would hide failures.
    client.set_http_retry_params(retry=False)
    return client


def _stow(dest: Destination, paths: Sequence[Path]) -> list[SendOutcome]:
    """STOW-RS all files in one multipart/related request; map the response to each file."""
    datasets = [pydicom.dcmread(p) for p in paths]
    try:
        response = _dicomweb(dest).store_instances(datasets)
    except (requests.ConnectionError, requests.Timeout) as e:
        raise DestinationUnavailable(f"STOW-RS to {dest.name} ({dest.url}) failed: {e}") from e
    except requests.HTTPError as e:
        code = e.response.status_code if e.response is not None else None
        body = _stow_body(e.response)
        if body is None:
            # Overloaded or down (5xx, 408, 429): try later; anything else is an answer for every file.
            if code is None or code >= 500 or code in (408, 429):
                raise DestinationUnavailable(f"STOW-RS to {dest.name} ({dest.url}) failed: HTTP {code}") from e
            return [SendOutcome(p, None, f"STOW-RS HTTP {code}: {e}", utcnow()) for p in paths]
        response = body
    return _stow_outcomes(paths, datasets, response)


def _stow_body(response: requests.Response | None) -> Dataset | None:
    """The Store Instances Response Module of an error response, if it carries one."""
    if response is None or "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError):
        return None


def _stow_outcomes(paths: Sequence[Path], datasets: Sequence[Dataset], response: Dataset) -> list[SendOutcome]:
    """Per-file outcome from ReferencedSOPSequence (stored) and FailedSOPSequence (not stored)."""
    at = utcnow()
    stored = {str(i.ReferencedSOPInstanceUID): int(i.get("WarningReason", 0))
              for i in response.get("ReferencedSOPSequence", [])}
    failed = {str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", 0xC000))
              for i in response.get("FailedSOPSequence", [])}
    outcomes = []
    for path, ds in zip(paths, datasets, strict=True):
        uid = str(ds.SOPInstanceUID)
        if uid in stored:
            outcomes.append(SendOutcome(path, stored[uid], None, at))
        elif uid in failed:
            outcomes.append(SendOutcome(path, failed[uid], f"remote failure reason 0x{failed[uid]:04X}", at))
        else:
            outcomes.append(SendOutcome(path, None, "not named in the STOW-RS response", at))
    return outcomes


def confirm_held(dest: Destination, refs: Sequence[ObjectRef], calling_ae_title: str) -> dict[str, str | None]:
    """Ask dest whether it holds each object: SOP Instance UID -> None (held) or why not.

    Uses C-FIND (Study Root, IMAGE level) or QIDO-RS as dest.confirm says; raises
    DestinationUnavailable when the destination cannot be asked at all.
    """
    if dest.confirm == "cfind":
        return _confirm_cfind(dest, refs, calling_ae_title)
    if dest.confirm == "qido":
        return _confirm_qido(dest, refs)
    raise ValueError(f"destination {dest.name} has no read-back configured (confirm: {dest.confirm})")


def _confirm_cfind(dest: Destination, refs: Sequence[ObjectRef], calling_ae_title: str) -> dict[str, str | None]:
    ae = _ae(dest, calling_ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = _associate(ae, dest)
    result: dict[str, str | None] = {}
    try:
        for ref in refs:
            query = Dataset()
            query.QueryRetrieveLevel = "IMAGE"
            query.StudyInstanceUID = ref.study_uid
            query.SeriesInstanceUID = ref.series_uid
            query.SOPInstanceUID = ref.sop_uid
            found, final = False, None
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                final = int(status.Status) if status is not None and "Status" in status else None
                if final is not None and code_to_category(final) == STATUS_PENDING and identifier is not None:
                    found = found or identifier.get("SOPInstanceUID") == ref.sop_uid
            if found:
                result[ref.sop_uid] = None
            elif final is not None and code_to_category(final) == STATUS_SUCCESS:
                result[ref.sop_uid] = "C-FIND found no such instance"
            else:
                result[ref.sop_uid] = "C-FIND " + (f"status 0x{final:04X}" if final is not None else "got no response")
            if not usable(assoc):
                break
    finally:
        if assoc.is_established:
            assoc.release()
    for ref in refs:
        result.setdefault(ref.sop_uid, "association lost before C-FIND")
    return result


def _confirm_qido(dest: Destination, refs: Sequence[ObjectRef]) -> dict[str, str | None]:
    client = _dicomweb(dest)
    result: dict[str, str | None] = {}
    for ref in refs:
        try:
            hits = client.search_for_instances(
                study_instance_uid=ref.study_uid, series_instance_uid=ref.series_uid,
                search_filters={"SOPInstanceUID": ref.sop_uid},
            )
        except (requests.ConnectionError, requests.Timeout) as e:
            raise DestinationUnavailable(f"QIDO-RS at {dest.name} ({dest.url}) failed: {e}") from e
        except requests.HTTPError as e:
            result[ref.sop_uid] = f"QIDO-RS {e}"
            continue
        uids = {Dataset.from_json(h).get("SOPInstanceUID") for h in hits}
        result[ref.sop_uid] = None if ref.sop_uid in uids else "QIDO-RS found no such instance"
    return result


def request_commitment(dest: Destination, refs: Sequence[ObjectRef], calling_ae_title: str,
                       transaction_uid: str) -> None:
    """Ask dest to commit to keeping refs (N-ACTION Request Storage Commitment, PS3.4 J.3.2).

    The answer is not this call's: dest reports later, with an N-EVENT-REPORT naming
    `transaction_uid`, on a new association to the listener. Raises DestinationUnavailable when
    dest cannot be reached, CommitmentRefused when it does not accept the request.
    """
    ae = _ae(dest, calling_ae_title)
    ae.add_requested_context(StorageCommitmentPushModel)
    request = Dataset()
    request.TransactionUID = transaction_uid
    request.ReferencedSOPSequence = []
    for ref in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = ref.sop_class_uid
        item.ReferencedSOPInstanceUID = ref.sop_uid
        request.ReferencedSOPSequence.append(item)
    assoc = _associate(ae, dest)
    try:
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance)
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(status.Status) if status is not None and "Status" in status else None
    if not succeeded(code):
        answer = f"status 0x{code:04X}" if code is not None else "no response"
        raise CommitmentRefused(f"{dest.name} did not accept the Storage Commitment request: {answer}")
