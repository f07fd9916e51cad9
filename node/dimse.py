"""DICOM networking helpers: how the node drives pynetdicom's network layer.

The one module that knows pynetdicom's internals, so the one to change when pynetdicom changes:

- `tune_connection`: EVT_CONN_OPEN handler for any association (TCP_NODELAY).
- `RequestorAE`: the AE for associations the node requests (export, read-back, commitment): they
  run the same event-driven reactor as the listener's (below; an idle one sleeps, so export can
  keep one open between sends, node/associations.py), and the socket acknowledges what arrives
  at once (`QuickAckSocket`).
- `succeeded`: whether a DIMSE response status means the request was done (C-STORE kept, N-ACTION accepted).
- `serve`: the listener's association server, through pynetdicom's extension point
  (`AE.make_server(..., request_handler=...)`). Each accepted connection gets:
  - `WakingDUL` / `WakingAssociation`: an event-driven reactor. Stock pynetdicom 3.0 polls: its
    DUL thread sleeps `_run_loop_delay` (1 ms) when a loop found nothing to do, and the
    association thread sleeps 1 ms per loop, so each C-STORE waits for sleeps on both threads
    (or burns a core polling with a shorter delay). Here the DUL waits in poll() on its socket
    and a wake-up socket that every outgoing primitive signals, and the association thread
    waits on an Event the DUL sets when a whole DIMSE message, a release or an abort is there.
  - `ReceiveSocket`: a PDU is read in as few recv() calls as the kernel allows (pynetdicom reads
    4 KB per call: 1,800 calls for a 7 MB data set), and assembled once; readiness is asked of
    poll(), as select() fails on descriptors above 1,024.
  - `StreamingDIMSE`: each C-STORE data set is written to a sink (the spool) as its fragments
    arrive, through pynetdicom's own chunked-receive hook, instead of being collected in memory;
    the handler finds it with `received_dataset(event)`.
  - `QuickResponseDIMSE` (StreamingDIMSE's base): a plain C-STORE response, and the file meta
    that heads a streamed data set, are written as the bytes pynetdicom would produce, without
    building a pydicom Dataset for each (`store_response_command`, `file_meta_bytes`).
  `CountingServer` / `HandedConnectionServer`: with `listener.processes` above 1 the first
  process accepts and hands connections to the others (node/listener_processes.py).
  The state machine, PDU, DIMSE and service class code are pynetdicom's, unchanged.

The overridden methods follow pynetdicom's own control flow line by line; they are written
against `PYNETDICOM_VERSION` (pinned in pyproject.toml), and `require_pynetdicom()` refuses any
other release. tests/unit/test_dimse.py shows the protocol behaviour is still pynetdicom's:
negotiation, PDU fragmentation from 4 KB to unlimited, release, abort, ARTIM and network
timeouts, C-ECHO, stored bytes identical to stock pynetdicom's `encoded_dataset()`, and
responses identical to those pynetdicom encodes;
tests/unit/test_export_associations.py the requestor side against stock pynetdicom (echo,
release, DIMSE timeout, peer abort, CPU while idle).
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import struct
import threading
from collections.abc import Callable
from copy import deepcopy
from datetime import datetime
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import pynetdicom
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer
from pynetdicom.transport import RequestHandler as _StockRequestHandler

if TYPE_CHECKING:  # pragma: no cover
    from pynetdicom.ae import ApplicationEntity

log = logging.getLogger(__name__)

#: The pynetdicom release whose internals the classes below were written against.
PYNETDICOM_VERSION = "3.0.4"

#: Longest wait of an idle reactor before it looks at its timers again (ARTIM, network idle).
#: Timers run in seconds, so this bounds how late a timeout fires, not any exchange's latency.
IDLE_WAIT_SECONDS = 0.05

#: Most bytes asked of the kernel per recv() call.
RECV_CHUNK = 1 << 20

#: DUL poll interval for an association on pynetdicom's own reactor, i.e. one requested through a
#: plain pynetdicom AE (the benches' senders; the node's own go through RequestorAE, which
#: polls nothing). pynetdicom's default of 1 ms costs a sleep per PDU exchanged.
REQUESTOR_POLL_SECONDS = 0.0001


def require_pynetdicom() -> None:
    """Refuse to run the listener on a pynetdicom other than the one this module was written for."""
    if pynetdicom.__version__ != PYNETDICOM_VERSION:
        raise RuntimeError(
            f"pynetdicom {pynetdicom.__version__} is installed but node/dimse.py overrides internals of "
            f"{PYNETDICOM_VERSION}: install pynetdicom=={PYNETDICOM_VERSION} (pyproject.toml pins it)"
        )


def succeeded(status: int | None) -> bool:
    """Whether a DIMSE response status means the request was done: success, or a warning such as a
    C-STORE coercion (0xB000, 0xB006, 0xB007; PS3.4 B.2.3). None (no response) did not."""
    return status is not None and code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


def tune_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN: TCP_NODELAY (small DIMSE messages otherwise wait 40-90 ms for delayed ACKs);
    on pynetdicom's own DUL (a plain pynetdicom AE's requests) a shorter poll interval too."""
    assoc = event.assoc
    sock = getattr(assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not isinstance(assoc.dul, WakingDUL):
        assoc.dul._run_loop_delay = REQUESTOR_POLL_SECONDS


class ReceiveSocket(AssociationSocket):
    """AssociationSocket whose recv() takes whatever has arrived, up to RECV_CHUNK per call.

    pynetdicom reads 4 KB per call; a 7 MB data set in 128 KB PDUs took 1,800 calls. Memory
    grows only as data arrives: a PDU length comes from the peer and is not trusted.
    """

    @property
    def ready(self) -> bool:
        """pynetdicom 3.0.4's AssociationSocket.ready with poll() for select(), which fails on a
        descriptor above 1,024 (a busy process) and so closed the association."""
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            readable = bool(poller.poll(0))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        # An SSLSocket may hold decrypted data that poll() cannot see.
        return readable or (isinstance(sock, ssl.SSLSocket) and bool(sock.pending()))

    def recv(self, nr_bytes: int) -> bytes:  # type: ignore[override]  # bytes where pynetdicom has bytearray
        """Read `nr_bytes` from the socket (blocking); fewer only if the peer closes the connection."""
        sock = cast(socket.socket, self.socket)
        chunks = []
        remaining = nr_bytes
        while remaining > 0:
            chunk = sock.recv(min(remaining, RECV_CHUNK))
            if not chunk:  # connection closed: return what came, as pynetdicom does
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class QuickAckSocket(ReceiveSocket):
    """ReceiveSocket that acknowledges received data at once (TCP_QUICKACK before each read).

    A peer that leaves Nagle's algorithm on (DCMTK's default, so storescp and Orthanc) writes a
    response in two segments and holds the second until the first is acknowledged; Linux delays
    that ACK by 40 ms when it has nothing to send back. Each C-STORE then took 50 ms instead of 8
    (a 19 KB SR to storescp). QUICKACK is not sticky: the kernel may leave quick-ACK mode after
    some segments, so it is set again before every read; setting it also sends an ACK that is
    pending now.
    """

    def recv(self, nr_bytes: int) -> bytes:  # type: ignore[override]  # as ReceiveSocket
        sock = self.socket
        if sock is not None and hasattr(socket, "TCP_QUICKACK"):  # Linux only
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:  # closing: pynetdicom's own recv reports it
                pass
        return super().recv(nr_bytes)


class RequestorAE(AE):
    """pynetdicom's AE whose requested associations run the event-driven reactor
    (`WakingAssociation`) on a `QuickAckSocket`."""

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        # AE.associate builds a plain Association and has no hook for its class; this is the
        # first call it makes with it, before any of its threads start.
        assoc.__class__ = WakingAssociation
        cast(WakingAssociation, assoc).install_reactor()
        sock = QuickAckSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


class DatasetSink(Protocol):
    """Where a C-STORE data set is written as its fragments arrive (node.spool.StagedFile)."""

    def write(self, data: bytes) -> None:
        """Append bytes; must not raise (keep the failure and report it to the handler)."""

    def finish(self) -> None:
        """The whole data set has arrived (called before the handler runs)."""

    def discard(self) -> None:
        """Drop what was written unless the handler kept it; called once the request is done."""


class _ChunkedFile:
    """The file object pynetdicom's chunked C-STORE receive writes to (`_data_set_file`),
    forwarding to a DatasetSink. After the handler pynetdicom closes it (we discard what the
    handler did not keep) and unlinks `name`, which by then no longer exists (it ignores that)."""

    def __init__(self, sink: DatasetSink, name: str) -> None:
        self.sink = sink
        self.name = name
        self.file = self  # pynetdicom flushes `_data_set_file.file` after each fragment

    def write(self, data: bytes) -> None:
        self.sink.write(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.sink.discard()


def received_dataset(event: evt.Event) -> DatasetSink | None:
    """EVT_C_STORE: the sink the data set was streamed into, or None if it is in memory
    (`event.encoded_dataset()`); the sink holds the preamble and file meta pynetdicom would add."""
    chunked = getattr(event.request, "_dataset_file", None)
    return chunked.sink if isinstance(chunked, _ChunkedFile) else None


# Two small structures each C-STORE costs pynetdicom a pydicom Dataset for, written here as the
# bytes pynetdicom would produce (tests/unit/test_dimse.py compares them byte for byte): the
# response's command set (0.5 ms a response: pynetdicom builds a Dataset and writes it twice, once
# for its group length) and the file meta that heads a streamed data set (0.2 ms). Anything but
# the plain case (non-ASCII or over-long values, optional response fields) takes pynetdicom's way.
_UID_MAX = 64


def _uid_value(uid: object) -> bytes | None:
    """A UI value as DICOM encodes it (even length, NUL-padded); None if not plain ASCII of at most 64."""
    if not isinstance(uid, str) or not uid.isascii() or len(uid) > _UID_MAX:
        return None
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _implicit(tag: int, value: bytes) -> bytes:
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def store_response_command(primitive: C_STORE) -> bytes | None:
    """The C-STORE-RSP command set (implicit VR little endian) pynetdicom would encode for
    `primitive`; None unless it is a response with just the fields the listener's has (message
    ID, SOP class and instance, status)."""
    msg_id, status = primitive.MessageIDBeingRespondedTo, primitive.Status
    sop_class, sop_instance = _uid_value(primitive.AffectedSOPClassUID), _uid_value(primitive.AffectedSOPInstanceUID)
    if (not isinstance(msg_id, int) or not isinstance(status, int) or not 0 <= msg_id <= 0xFFFF
            or not 0 <= status <= 0xFFFF or sop_class is None or sop_instance is None
            or primitive.OffendingElement is not None or primitive.ErrorComment is not None):
        return None
    body = b"".join((
        _implicit(0x00000002, sop_class),
        _implicit(0x00000100, struct.pack("<H", 0x8001)),  # Command Field: C-STORE-RSP
        _implicit(0x00000120, struct.pack("<H", msg_id)),
        _implicit(0x00000800, struct.pack("<H", 0x0101)),  # Command Data Set Type: none
        _implicit(0x00000900, struct.pack("<H", status)),
        _implicit(0x00001000, sop_instance),
    ))
    return _implicit(0x00000000, struct.pack("<I", len(body))) + body


def _explicit(tag: int, vr: bytes, value: bytes) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr
    if vr == b"OB":
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def file_meta_bytes(sop_class_uid: object, sop_instance_uid: object, transfer_syntax: object) -> bytes:
    """The file meta information pynetdicom's `encode_file_meta(create_file_meta(...))` writes
    (what `Event.encoded_dataset()` puts before a data set), for plain ASCII UIDs; pynetdicom's
    own for anything else."""
    values = [_uid_value(v) for v in (sop_class_uid, sop_instance_uid, transfer_syntax)]
    implementation = _uid_value(pynetdicom.PYNETDICOM_IMPLEMENTATION_UID)
    version = pynetdicom.PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if any(v is None for v in values) or implementation is None:
        meta = create_file_meta(sop_class_uid=cast(Any, sop_class_uid), sop_instance_uid=cast(Any, sop_instance_uid),
                                transfer_syntax=cast(Any, transfer_syntax))
        return encode_file_meta(meta)
    sop_class, sop_instance, syntax = cast(list[bytes], values)
    body = b"".join((
        _explicit(0x00020001, b"OB", b"\x00\x01"),
        _explicit(0x00020002, b"UI", sop_class),
        _explicit(0x00020003, b"UI", sop_instance),
        _explicit(0x00020010, b"UI", syntax),
        _explicit(0x00020012, b"UI", implementation),
        _explicit(0x00020013, b"SH", version + b" " if len(version) % 2 else version),
    ))
    return _explicit(0x00020000, b"UL", struct.pack("<I", len(body))) + body


class QuickResponseDIMSE(DIMSEServiceProvider):
    """DIMSE provider that sends a plain C-STORE response from `store_response_command`'s bytes;
    every other message, or any response while something listens to EVT_DIMSE_SENT (which is
    given pynetdicom's message object), goes through pynetdicom's `send_msg`."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        command = store_response_command(primitive) if isinstance(primitive, C_STORE) else None
        max_pdu = self.maximum_pdu_size
        if command is None or self.assoc.get_handlers(evt.EVT_DIMSE_SENT) or (max_pdu and len(command) + 6 > max_pdu):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        # One PDV: message control header 0x03 = command information, last fragment (PS3.8 E.2).
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)


class StreamingDIMSE(QuickResponseDIMSE):
    """DIMSE provider that streams each C-STORE data set into a sink as its fragments arrive.

    pynetdicom's own chunked mode (`_config.STORE_RECV_CHUNKED_DATASET`) is process-wide and
    writes to the system temp folder; this uses the same hook (`_data_set_file`) per association,
    with a sink of ours. The sink starts with what `Event.encoded_dataset()` would put first
    (preamble, DICM, file meta from the command set and the context), so the bytes are the same.
    """

    def __init__(self, assoc: Association, sink_factory: Callable[[], DatasetSink]) -> None:
        super().__init__(assoc)
        self._sink_factory = sink_factory

    def receive_primitive(self, primitive: Any) -> None:
        receiving = self.message
        chunked = receiving._data_set_file if receiving is not None else None
        super().receive_primitive(primitive)
        if isinstance(chunked, _ChunkedFile) and self.message is not receiving:
            chunked.sink.finish()  # the message is complete and queued for the handler
        # Once a C-STORE-RQ's command set is in, its data set goes to a sink (together with any
        # data set bytes that came in the same P-DATA as the end of the command).
        msg = self.message
        if isinstance(msg, C_STORE_RQ) and msg._data_set_file is None:
            self._attach(msg)

    def _attach(self, msg: C_STORE_RQ) -> None:
        try:
            cs = msg.command_set
            context = self.assoc._accepted_cx[cast(int, msg.context_id)]
            meta = file_meta_bytes(cs.AffectedSOPClassUID, cs.AffectedSOPInstanceUID, context.transfer_syntax[0])
            head = b"".join((b"\x00" * 128, b"DICM", meta))
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            # A command set pydicom cannot use: leave the data set in memory and let the
            # handler refuse it (encoded_dataset() raises the same error there).
            log.debug("C-STORE data set kept in memory: %s: %s", type(e).__name__, e)
            return
        try:
            sink = self._sink_factory()
        except OSError as e:
            log.error("cannot stage a C-STORE data set, keeping it in memory: %s", e)
            return
        sink.write(head)
        early = cast(BytesIO, msg.data_set).getvalue()
        if early:
            sink.write(early)
        msg.data_set = BytesIO()
        chunked = _ChunkedFile(sink, str(getattr(sink, "path", "")))
        msg._data_set_file = chunked  # type: ignore[assignment]
        msg._data_set_path = Path(chunked.name)

    def discard_pending(self) -> None:
        """Discard the sinks of data sets no handler will see (association ended)."""
        if self.message is not None and isinstance(self.message._data_set_file, _ChunkedFile):
            self.message._data_set_file.close()
        while True:
            try:
                _, primitive = self.msg_queue.get(block=False)
            except queue.Empty:
                return
            chunked = getattr(primitive, "_dataset_file", None) if isinstance(primitive, C_STORE) else None
            if isinstance(chunked, _ChunkedFile):
                chunked.close()


class WakingDUL(DULServiceProvider):
    """DUL service provider that sleeps in poll() until its socket or its user has work.

    pynetdicom's reactor sleeps `_run_loop_delay` whenever a loop found nothing to do, so a PDU
    that arrives, or a response the association thread queues, waits for the sleep to end.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        # Written to by send_pdu() and kill_dul() so that poll() returns at once. Socket
        # objects (not raw fds) so that a late wake-up after close raises instead of writing
        # into whatever file reused the descriptor.
        self._wake_recv, self._wake_send = socket.socketpair()
        self._wake_recv.setblocking(False)
        self._wake_send.setblocking(False)
        self._wake_lock = threading.Lock()
        #: Set when the association thread has something to act on, and when the reactor stops:
        #: the association thread waits on it instead of sleeping 1 ms per loop.
        self.user_event = threading.Event()

    def wake(self) -> None:
        """Make the reactor look at its queues now."""
        with self._wake_lock:
            if self._wake_send.fileno() == -1:
                return
            try:
                self._wake_send.send(b"\0")
            except BlockingIOError:  # the buffer holds unread wake-ups already: enough
                pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self.wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self.wake()

    def stop_dul(self) -> bool:
        # pynetdicom's stop_dul() sets the kill flag, then waits for the thread: wake it first.
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self.wake()
        return super().stop_dul()

    def _wait(self, timeout: float) -> None:
        """Block until the socket is readable, a wake-up arrives or `timeout` passes."""
        # poll(), not select(): a process with more than 1,024 descriptors is no reason to spin.
        poller = select.poll()
        poller.register(self._wake_recv, select.POLLIN)
        assoc_sock = self.socket
        sock = assoc_sock.socket if assoc_sock is not None and assoc_sock._is_connected else None
        if sock is not None and sock.fileno() != -1:
            poller.register(sock, select.POLLIN)
        try:
            events = poller.poll(timeout * 1000)
        except OSError:  # interrupted: the reactor looks again
            return
        if any(fd == self._wake_recv.fileno() for fd, _ in events):
            try:
                while self._wake_recv.recv(4096):
                    pass
            except BlockingIOError:
                pass

    def _read_pdu_data(self) -> None:
        """pynetdicom 3.0.4's _read_pdu_data, with the PDU assembled once as bytes (pynetdicom
        concatenates into a bytearray and copies it to bytes again before decoding)."""
        sock = cast(ReceiveSocket, self.socket)
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            log.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")  # transport connection closed
            return
        try:
            pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        except struct.error:
            self.event_queue.put("Evt17")
            return
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            log.error("Unknown PDU type received '0x%02X'", pdu_type)
            self.event_queue.put("Evt19")  # unrecognised or invalid PDU
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            log.error("Connection closed before the entire PDU was received: %s", exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            log.error("The received PDU is shorter than expected (%d of %d bytes received)",
                      6 + len(body), 6 + pdu_length)
            self.event_queue.put("Evt17")
            return
        try:
            pdu, event = self._decode_pdu(header + body)  # type: ignore[arg-type]  # bytes(): no copy of bytes
            self.event_queue.put(event)
        except Exception as exc:  # as pynetdicom: any decoding failure is an invalid PDU
            log.error("Unable to decode the received PDU data: %s: %s", type(exc).__name__, exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    def _abort_now(self) -> None:
        """Send an A-ABORT (service provider) and stop both reactors, bypassing the state machine."""
        abort_pdu = A_ABORT_RQ()
        abort_pdu.source = 0x02
        abort_pdu.reason_diagnostic = 0x00
        cast(AssociationSocket, self.socket).send(abort_pdu.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's DUL reactor with poll() in place of time.sleep(_run_loop_delay)."""
        try:
            self._reactor()
        finally:
            self.user_event.set()
            with self._wake_lock:
                self._wake_send.close()
                self._wake_recv.close()

    def _reactor(self) -> None:
        self._idle_timer.start()
        self.socket = cast(AssociationSocket, self.socket)
        idle = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                self._wait(IDLE_WAIT_SECONDS)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():  # a primitive from the local user
                    pass
                elif self._is_transport_event():  # a PDU from the peer
                    self._idle_timer.restart()
            except Exception:  # as pynetdicom: abort outside the state machine
                log.exception("Exception in the DUL reactor, aborting association")
                self._abort_now()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            if event == "Evt17" and self.state_machine.current_state == "Sta2":
                # Closed before any A-ASSOCIATE-RQ (a port probe): pynetdicom's acceptor waits
                # its ACSE timeout for one all the same; the connection is over now.
                cast(WakingAssociation, self.assoc).connection_closed()
            try:
                self.state_machine.do_action(event)
            except Exception as exc:
                # pynetdicom lets this end the thread (found by bench/fuzz_ingest.py: a command
                # set without Command Field raises AttributeError in DIMSE decoding), leaving the
                # peer without an answer. Here it is an invalid PDU (Evt19: A-ABORT, PS3.8 9.2),
                # or, if handling that fails too, an A-ABORT outside the state machine.
                log.warning("invalid data from the peer (%s in %s: %s: %s), aborting the association",
                            event, self.state_machine.current_state, type(exc).__name__, exc,
                            exc_info=log.isEnabledFor(logging.DEBUG))
                if event == "Evt19":
                    self._abort_now()
                    return
                self.event_queue.put("Evt19")
            # Wake the association thread only when it has something to act on (a whole DIMSE
            # message, a release or abort): not for every fragment of a large data set.
            if (self.to_user_queue.queue or self.assoc.dimse.msg_queue.queue) and not self.user_event.is_set():
                self.user_event.set()
            idle = False


class _WakingCheckpoint(threading.Event):
    """An association's reactor checkpoint. The user's send_*() and release() clear it, then
    wait (sleeping 0.1 ms per look) until the association thread has paused at it: clearing it
    also wakes that thread from its wait for the DUL, or the user would wait up to
    IDLE_WAIT_SECONDS for it.

    The association thread passes it with `pass_(assoc)`, which leaves the thread paused when a
    set() is followed by a clear() before the thread runs: the user's next send_*() right after
    its last one ended. threading.Event.wait returns in that case (it was set once), while the
    user, seeing `_is_paused` still true, has already sent its request; the thread then took the
    peer's response off the queue as an unexpected message ("Received unexpected C-FIND service
    message") and the user's C-FIND found nothing. pynetdicom 3.0.4's own reactor has the race.
    """

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake
        self._lock = threading.Condition()
        self._open = True

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._lock:
            self._open = True
            self._lock.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._open = False
        self._wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            return self._lock.wait_for(lambda: self._open, timeout)

    def rest(self, assoc: Association) -> None:
        """Mark `assoc`'s thread paused while it waits for its DUL: the user's send_*() need not
        wait for it to wake, since it passes `pass_` before it touches a message again."""
        with self._lock:
            assoc._is_paused = True

    def pass_(self, assoc: Association) -> None:
        """Pause `assoc`'s thread here until the checkpoint is set, and mark it running again
        under the lock that clear() takes: a clear() is then either before (still paused) or
        after (the user waits for the next pause)."""
        with self._lock:
            assoc._is_paused = True
            self._lock.wait_for(lambda: self._open)
            assoc._is_paused = False


class WakingAssociation(Association):
    """Association whose reactor waits for its DUL instead of sleeping 1 ms per loop: the
    listener's acceptors, and (through RequestorAE) the node's requestors. An idle requestor on
    pynetdicom's reactor took 22% of a core here (its DUL polling every 0.1 ms, its association
    thread waking every 1 ms); on this one it wakes IDLE_WAIT_SECONDS apart."""

    dul: WakingDUL

    def __init__(self, ae: ApplicationEntity, mode: str) -> None:
        super().__init__(ae, mode)
        self.install_reactor()

    def install_reactor(self) -> None:
        """Replace the DUL and the reactor checkpoint pynetdicom built (before any thread runs)."""
        self.dul = WakingDUL(self)
        # pynetdicom's setters copy these into the DUL's ARTIM and idle timers: again, for ours.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        self._reactor_checkpoint: _WakingCheckpoint = _WakingCheckpoint(self.dul.user_event)

    def run_reactor(self) -> None:
        """The association's thread: pynetdicom's, then the acceptor's server is told it ended."""
        try:
            super().run_reactor()
        finally:
            self.connection_closed()

    def connection_closed(self) -> None:
        """Tell the acceptor's server that this connection is over (it counts open ones)."""
        server, request = getattr(self, "_server", None), getattr(self, "_request", None)
        if isinstance(server, CountingServer) and request is not None:
            server.connection_closed(request)

    def kill(self) -> None:
        super().kill()
        self.dul.user_event.set()
        if isinstance(self.dimse, StreamingDIMSE):
            self.dimse.discard_pending()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor reactor, waiting on the DUL's event between loops."""
        self._is_paused = False
        idle = True
        while not self._kill:
            if idle:
                self._reactor_checkpoint.rest(self)
                self.dul.user_event.wait(IDLE_WAIT_SECONDS)
                # Cleared before looking, so an action after this point wakes the next wait.
                self.dul.user_event.clear()
            # Paused while the user sends DIMSE or ACSE messages itself (see Association.release).
            self._reactor_checkpoint.pass_(self)

            context_id, msg = self.dimse.get_msg(block=False)
            # More messages may be queued behind this one: look again before waiting.
            idle = msg is None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                log.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log.info("Association Aborted%s", " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
                self.dul.receive_pdu(wait=False)  # so that EVT_ACSE_RECV fires for subscribers
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


class HandedOff(OSError):
    """Raised by `get_request` for a connection handed to another listener process: socketserver
    skips a connection whose accept raised an OSError."""


class CountingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, counting its open connections. `hand_off(socket, open)`,
    when set, may give an accepted connection to another listener process, knowing this one
    has `open` connections (node/listener_processes.py): it takes the socket before any TLS
    handshake and returns True, and this process forgets it.
    `on_connection_end` is called after each connection this server served has closed."""

    def __init__(self, *args: Any, hand_off: Callable[[socket.socket, int], bool] | None = None,
                 on_connection_end: Callable[[], object] | None = None, **kwargs: Any) -> None:
        self.hand_off = hand_off
        self.on_connection_end = on_connection_end
        self._open: set[Any] = set()  # the sockets of this process's connections not yet closed
        self._open_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    @property
    def connections(self) -> int:
        """This process's connections open now."""
        return len(self._open)

    def get_request(self) -> tuple[socket.socket, Any]:
        """pynetdicom 3.0.4's get_request (accept, then TLS), asking `hand_off` in between."""
        client, address = self._next_connection()
        if self.hand_off is not None and self.hand_off(client, self.connections):
            client.close()  # the other process has its own descriptor
            raise HandedOff(f"connection from {address} handed to another listener process")
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True)
        with self._open_lock:
            self._open.add(client)
        return client, address

    def _next_connection(self) -> tuple[socket.socket, Any]:
        return cast(socket.socket, self.socket).accept()

    def shutdown_request(self, request: Any) -> None:
        super().shutdown_request(request)
        self.connection_closed(request)

    def connection_closed(self, request: Any) -> None:
        """A connection is over (called once or more: by pynetdicom, by the association's
        thread as it ends, by its DUL when the peer closed the connection before associating)."""
        with self._open_lock:
            if request not in self._open:
                return
            self._open.remove(request)
        if self.on_connection_end is not None:
            self.on_connection_end()


class HandedConnectionServer(CountingServer):
    """The server of a further listener process: it listens on nothing; its socket is its end
    of a Unix socket pair with the first process, which sends it accepted connections
    (SCM_RIGHTS), one byte each. End of file there means the first process has ended:
    `ended` is set and the caller stops this server."""

    def __init__(self, *args: Any, channel: socket.socket, **kwargs: Any) -> None:
        self.channel = channel
        self.ended = threading.Event()
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        cast(socket.socket, self.socket).close()  # the unbound TCP socket TCPServer made: never used
        self.socket = self.channel

    def server_activate(self) -> None:
        pass

    def _next_connection(self) -> tuple[socket.socket, Any]:
        data, fds, _flags, _addr = socket.recv_fds(self.channel, 1, 1)
        if not data:
            self.ended.set()
            raise HandedOff("the first listener process has ended")
        if not fds:
            raise HandedOff("a message without a connection")
        client = socket.socket(fileno=fds[0])
        client.setblocking(True)
        return client, client.getpeername()


def serve(
    ae: ApplicationEntity, address: tuple[str, int], evt_handlers: list[Any], ssl_context: ssl.SSLContext | None,
    sink_factory: Callable[[], DatasetSink] | None = None, server_class: Callable[..., CountingServer] = CountingServer,
) -> CountingServer:
    """Start `ae` as an association acceptor in background threads, with RequestHandler.

    What `AE.start_server(block=False)` does, through pynetdicom's documented extension point
    (`make_server` passes `request_handler` to the server class). With `sink_factory`, each
    C-STORE data set is streamed into a new sink as it arrives (see `received_dataset`).
    `server_class`: CountingServer, or a partial of it or of HandedConnectionServer with their
    keyword arguments. Stop the server with server.shutdown().
    """
    require_pynetdicom()
    server = cast(CountingServer, ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=cast(type, server_class),  # a class or a partial of one
                            request_handler=partial(RequestHandler, sink_factory=sink_factory)))
    thread = threading.Thread(target=server.serve_forever, name=f"AcceptorServer@{datetime.now():%Y%m%d%H%M%S}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # as start_server does: server.shutdown() removes it
    return server


class RequestHandler(_StockRequestHandler):
    """The listener's request handler: each accepted connection gets a WakingAssociation
    (with a StreamingDIMSE when given a sink factory)."""

    def __init__(self, request: Any, client_address: Any, server: Any,
                 sink_factory: Callable[[], DatasetSink] | None = None) -> None:
        self._sink_factory = sink_factory  # before super(): socketserver handles the request in __init__
        super().__init__(request, client_address, server)

    def _create_association(self) -> Association:
        """pynetdicom 3.0.4's RequestHandler._create_association with our association and socket."""
        assoc = WakingAssociation(self.ae, MODE_ACCEPTOR)
        assoc.dimse = (QuickResponseDIMSE(assoc) if self._sink_factory is None
                       else StreamingDIMSE(assoc, self._sink_factory))
        assoc._server = self.server
        assoc._request = self.request  # type: ignore[attr-defined]  # what CountingServer counts
        # "AcceptorThread" in the name is how AssociationServer.active_associations finds it.
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(ReceiveSocket(assoc, client_socket=self.request))

        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = self.server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(self.server.contexts)
        assoc.requestor.address_info = self.remote

        # pynetdicom's standard handlers only log (INFO and DEBUG), but build their lines for
        # every PDU and message (one copies each data set to see whether it is empty). The node
        # keeps the pynetdicom logger at WARNING: then they are left out.
        quiet = not logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
        for event, bound in self.server._handlers.items():
            if event.is_intervention and bound:
                assoc.bind(event, *bound)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in cast(list[tuple[Any, Any]], bound):
                    if not (quiet and handler in _STANDARD_LOGGING.values()):
                        assoc.bind(event, handler, args)
        if quiet:
            for event, handler in _STANDARD_LOGGING.items():
                assoc.unbind(event, handler)
        return assoc


_STANDARD_LOGGING = {evt.EVT_DIMSE_RECV: standard_dimse_recv_handler, evt.EVT_DIMSE_SENT: standard_dimse_sent_handler,
                     evt.EVT_PDU_RECV: standard_pdu_recv_handler, evt.EVT_PDU_SENT: standard_pdu_sent_handler}
