"""C-STORE SCU: send result files to a destination, one association per batch, with timeouts."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from node.config import Destination
from node.db.models import utcnow
from node.listener import tune_connection

log = logging.getLogger(__name__)


class DestinationUnavailable(ConnectionError):
    """The association could not be established (transient: retry later)."""


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status: int | None  # the remote C-STORE status, None when no response came
    error: str | None
    at: datetime  # when the response came (or the attempt ended)

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0x0000 or self.status & 0xF000 == 0xB000)


def send_files(dest: Destination, paths: Sequence[Path], calling_ae_title: str) -> list[SendOutcome]:
    """C-STORE each file to dest; raise DestinationUnavailable if no association is possible."""
    datasets = [pydicom.dcmread(p) for p in paths]
    ae = AE(ae_title=calling_ae_title)
    ae.connection_timeout = dest.timeout
    ae.acse_timeout = dest.timeout
    ae.dimse_timeout = dest.timeout
    ae.network_timeout = dest.timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)])
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise DestinationUnavailable(f"association with {dest.name} ({dest.ae_title}@{dest.host}:{dest.port}) failed: {why}")
    outcomes = []
    try:
        for path, ds in zip(paths, datasets, strict=True):
            try:
                rsp = assoc.send_c_store(ds)
            except (RuntimeError, ValueError) as e:
                outcomes.append(SendOutcome(path, None, f"not sent: {e}", utcnow()))
                continue
            status = int(rsp.Status) if "Status" in rsp else None
            err = None if status is not None else "no response (timeout or abort)"
            if status is not None and not (status == 0 or status & 0xF000 == 0xB000):
                err = f"remote status 0x{status:04X}"
            outcomes.append(SendOutcome(path, status, err, utcnow()))
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    # Files never attempted because the association dropped count as not sent.
    done = {o.path for o in outcomes}
    outcomes += [SendOutcome(p, None, "association lost before sending", utcnow()) for p in paths if p not in done]
    return outcomes
