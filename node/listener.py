"""The DICOM listener: builds the pynetdicom AE from the config and serves C-ECHO / C-STORE."""

from __future__ import annotations

import logging
import socket
from functools import cache

from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from node.config import Config
from node.handlers import IngestContext, handle_closed, handle_echo, handle_store

log = logging.getLogger(__name__)

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian]


@cache
def accepted_transfer_syntaxes() -> list[UID]:
    """Uncompressed syntaxes plus every compressed one pydicom can decode with what is installed."""
    from pydicom import uid

    compressed = [UID(ts) for ts in uid.AllTransferSyntaxes if UID(ts).is_compressed]
    decodable = []
    for ts in compressed:
        try:
            if get_decoder(ts).is_available:
                decodable.append(ts)
        except NotImplementedError:  # no decoder class for this syntax at all
            continue
    return [*UNCOMPRESSED, *decodable]


def set_nodelay(event: evt.Event) -> None:
    """Small DIMSE messages otherwise wait for delayed ACKs (40-90 ms each)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def build_ae(config: Config) -> AE:
    lc = config.listener
    ae = AE(ae_title=lc.ae_title)
    ae.maximum_associations = lc.max_associations
    ae.maximum_pdu_size = lc.max_pdu
    ae.acse_timeout = lc.timeouts.acse
    ae.dimse_timeout = lc.timeouts.dimse
    ae.network_timeout = lc.timeouts.network
    ae.require_called_aet = True
    if lc.allowed_callers is not None:
        ae.require_calling_aet = [c.ae_title for c in lc.allowed_callers]
    syntaxes = accepted_transfer_syntaxes()
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes)
    return ae


def start_listener(config: Config, ctx: IngestContext) -> ThreadedAssociationServer:
    """Start serving in background threads; the caller stops it with server.shutdown()."""
    config.storage.path.mkdir(parents=True, exist_ok=True)
    ae = build_ae(config)
    handlers = [
        (evt.EVT_CONN_OPEN, set_nodelay),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_RELEASED, handle_closed, [ctx]),
        (evt.EVT_ABORTED, handle_closed, [ctx]),
        (evt.EVT_CONN_CLOSE, handle_closed, [ctx]),
    ]
    server = ae.start_server((config.listener.host, config.listener.port), block=False, evt_handlers=handlers)
    log.info(
        "listening as %s on %s:%d (%d transfer syntaxes)",
        config.listener.ae_title, config.listener.host, config.listener.port, len(accepted_transfer_syntaxes()),
    )
    return server
