"""The DICOM listener: builds the pynetdicom AE from the config and serves C-ECHO / C-STORE."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable
from functools import cache, partial
from typing import Any

from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import
    StorageCommitmentPushModel,
    Verification,
)

from node import metrics
from node.config import Config, ListenerConfig
from node.dimse import CountingServer, serve, tune_connection
from node.engine.commitment import commitment_peer, handle_report
from node.handlers import IngestContext, audit, handle_closed, handle_echo, handle_store, stage
from node.services.retention import remove_orphaned_staging

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


# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4): rejected-permanent, by the service user.
CALLING_AE_NOT_RECOGNISED = 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


def admission(lc: ListenerConfig, calling_ae: str, called_ae: str, address: str) -> tuple[int, str] | None:
    """Why an association request must be refused, as (diagnostic, reason), or None to admit it.

    Deny by default: unless `allowed_callers` is "any", only a listed calling AE title may associate,
    and only from one of its addresses when it lists some. The called AE title must be ours.
    """
    if called_ae.strip() != lc.ae_title.strip():
        return CALLED_AE_NOT_RECOGNISED, f"called AE title {called_ae.strip()!r} is not ours"
    if lc.allowed_callers == "any":
        return None
    entries = [c for c in lc.allowed_callers if c.ae_title.strip() == calling_ae.strip()]
    if not entries:
        return CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling_ae.strip()!r} is not in listener.allowed_callers"
    try:
        source = ipaddress.ip_address(address)
    except ValueError:
        source = None
    for entry in entries:
        if not entry.hosts:
            return None
        if source is not None and any(source in ipaddress.ip_network(h, strict=False) for h in entry.hosts):
            return None
    return CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling_ae.strip()!r} may not connect from {address}"


def handle_requested(event: evt.Event, ctx: IngestContext) -> None:
    """EVT_REQUESTED: refuse strangers with an A-ASSOCIATE-RJ before any negotiation."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    assert rq is not None  # pynetdicom sets it before triggering EVT_REQUESTED
    calling, called, address = str(rq.calling_ae_title), str(rq.called_ae_title), assoc.requestor.address
    verdict = admission(ctx.config.listener, calling, called, address)
    reporter = called.strip() == ctx.config.listener.ae_title.strip() and \
        commitment_peer(ctx.config, calling, address) is not None
    if verdict is None or reporter:
        offer_contexts(assoc, storage=verdict is None, commitment_reports=reporter)
        return
    diagnostic, reason = verdict
    # Recorded before the peer hears of it, so a refusal is counted even if the socket dies.
    log.warning("association from %s at %s refused: %s", calling.strip(), address, reason)
    audit(ctx, "association_rejected", calling.strip(), f"{address}: {reason}")
    metrics.association_refused("policy")
    assoc.acse.send_reject(0x01, 0x01, diagnostic)
    assoc.kill()


def handle_rejected(event: evt.Event, ctx: IngestContext) -> None:
    """EVT_REJECTED: pynetdicom's own refusals (association limit) are logged and counted too."""
    assoc = event.assoc
    calling = str(assoc.requestor.primitive.calling_ae_title).strip() if assoc.requestor.primitive else "?"
    rj = assoc.acceptor.primitive
    detail = f"result 0x{rj.result:02X} source 0x{rj.result_source:02X} diagnostic 0x{rj.diagnostic:02X}" if rj else "?"
    log.warning("association from %s at %s refused: %s", calling, assoc.requestor.address, detail)
    audit(ctx, "association_rejected", calling, f"{assoc.requestor.address}: {detail}")
    metrics.association_refused("limit")


def server_ssl_context(lc: ListenerConfig) -> ssl.SSLContext | None:
    """The listener's TLS context (TLS 1.2+), verifying client certificates when a CA is given."""
    if lc.tls is None:
        return None
    tls = lc.tls
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(certfile=tls.certificate, keyfile=tls.private_key)
        if tls.ca_certificates is not None:
            ctx.load_verify_locations(cafile=tls.ca_certificates)
    except (OSError, ssl.SSLError) as e:
        raise ValueError(f"listener.tls: cannot load certificates: {e}") from e
    if tls.ca_certificates is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def build_ae(config: Config) -> AE:
    lc = config.listener
    ae = AE(ae_title=lc.ae_title)
    ae.maximum_associations = lc.max_associations
    ae.maximum_pdu_size = lc.max_pdu
    ae.acse_timeout = lc.timeouts.acse
    ae.dimse_timeout = lc.timeouts.dimse
    ae.network_timeout = lc.timeouts.network
    ae.require_called_aet = True
    if lc.allowed_callers == "any":
        log.warning("listener.allowed_callers is 'any': every calling AE title may store")
    else:
        # An empty list denies everyone; admission() says why to each refused caller.
        ae.require_calling_aet = [c.ae_title for c in lc.allowed_callers]
    syntaxes = accepted_transfer_syntaxes()
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
    accept_commitment_reports(ae, config)
    return ae


# ---- Storage Commitment reports (node/engine/commitment.py) ---------------------------------
# A destination with `confirm: commitment` answers our N-ACTION later, on an association of its
# own to the listener, as the SCP of Storage Commitment Push Model sending an N-EVENT-REPORT.


def accept_commitment_reports(ae: AE, config: Config) -> None:
    """Accept Storage Commitment Push Model with the requestor as SCP and us as SCU, and let
    the commitment destinations' AE titles associate (only for that: see offer_contexts)."""
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=True)
    reporters = [d.ae_title for d in config.destinations if d.confirm == "commitment" and d.ae_title]
    if ae.require_calling_aet and reporters:
        ae.require_calling_aet = [*ae.require_calling_aet, *reporters]


def offer_contexts(assoc: Association, storage: bool, commitment_reports: bool) -> None:
    """Narrow what one admitted association may negotiate: an allowed caller gets Verification
    and Storage, a commitment destination only Storage Commitment (to report, never to store)."""
    assoc.acceptor.supported_contexts = [
        cx for cx in assoc.acceptor.supported_contexts
        if (commitment_reports if cx.abstract_syntax == StorageCommitmentPushModel else storage)
    ]


def start_listener(config: Config, ctx: IngestContext, first: bool = True,
                   server_class: Callable[..., CountingServer] = CountingServer) -> CountingServer:
    """Start serving in background threads; the caller stops it with server.shutdown().

    `first`: the process that listens on the port, as against a further listener process
    (node/listener_processes.py, with `server_class` serving what the first hands over).
    """
    metrics.setup(config)
    config.storage.path.mkdir(parents=True, exist_ok=True)
    if first:  # a further process starts while the others' files are in flight
        remove_orphaned_staging(config)
    ae = build_ae(config)
    handlers: list[Any] = [
        (evt.EVT_CONN_OPEN, tune_connection),
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_REJECTED, handle_rejected, [ctx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [ctx]),
        (evt.EVT_N_EVENT_REPORT, handle_report, [config]),
        (evt.EVT_RELEASED, handle_closed, [ctx]),
        (evt.EVT_ABORTED, handle_closed, [ctx]),
        (evt.EVT_CONN_CLOSE, handle_closed, [ctx]),
    ]
    server = serve(ae, (config.listener.host, config.listener.port), handlers, server_ssl_context(config.listener),
                   sink_factory=partial(stage, ctx), server_class=server_class)
    if not first:
        return server
    log.info(
        "listening as %s on %s:%d%s (%d transfer syntaxes)",
        config.listener.ae_title, config.listener.host, config.listener.port,
        " with TLS" if config.listener.tls else "", len(accepted_transfer_syntaxes()),
    )
    return server
