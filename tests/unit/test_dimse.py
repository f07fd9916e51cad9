"""node/dimse.py keeps pynetdicom's protocol behaviour while replacing its polling reactor.

Each test runs real associations on loopback (pynetdicom and DCMTK peers) against the listener
as `start_listener` builds it (WakingAssociation, ReceiveSocket, StreamingDIMSE), and where it
matters compares the result with stock pynetdicom serving the same AE.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage, Verification
from sqlalchemy import func, select

from node.cli import db_upgrade
from node.config import Config, parse_config
from node.db.models import Event, Instance
from node.db.session import session_scope
from node.dimse import (
    PYNETDICOM_VERSION,
    QuickResponseDIMSE,
    StreamingDIMSE,
    WakingAssociation,
    _WakingCheckpoint,
    file_meta_bytes,
    received_dataset,
    require_pynetdicom,
    store_response_command,
    succeeded,
)
from node.handlers import IngestContext, stage
from node.listener import build_ae, start_listener
from node.spool import INCOMING
from tests.peers import free_port, have, storescu, wait_for

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
RG1_J2K = Path(get_testdata_file("RG1_J2KR.dcm"))
CT = Path(get_testdata_file("CT_small.dcm"))


def _config(tmp_path: Path, storage: dict[str, Any] | None = None, **listener: Any) -> Config:
    cfg = parse_config({
        "listener": {"host": "127.0.0.1", "port": free_port(), "allowed_callers": "any",
                     "timeouts": {"acse": 5, "dimse": 5, "network": 5}, **listener},
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1, **(storage or {})},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
    })
    db_upgrade(cfg)
    return cfg


class StockReceiver:
    """Stock pynetdicom (AE.start_server, its own reactor) with the listener's AE, keeping what
    `event.encoded_dataset()` gives for each C-STORE: the reference for our stored bytes."""

    def __init__(self, cfg: Config) -> None:
        self.received: list[bytes] = []
        self.ae = build_ae(cfg)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        self.received.append(event.encoded_dataset(include_meta=True))
        return 0

    def stop(self) -> None:
        assert self.server is not None
        self.server.shutdown()


def _scu(max_pdu: int = 16382, *contexts: tuple[str, list[str]]) -> AE:
    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.maximum_pdu_size = max_pdu
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


def _stored_bytes(cfg: Config, sop_uid: str) -> bytes:
    with session_scope(cfg.database.url) as s:
        path = s.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_uid))
    assert path is not None, f"no row for {sop_uid}"
    return (cfg.storage.path / path).read_bytes()


def _incoming(cfg: Config) -> list[Path]:
    folder = cfg.storage.path / INCOMING
    return sorted(folder.iterdir()) if folder.exists() else []


def _count(cfg: Config) -> int:
    with session_scope(cfg.database.url) as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def test_the_pinned_pynetdicom_is_installed_and_another_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    require_pynetdicom()
    assert pynetdicom.__version__ == PYNETDICOM_VERSION
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert f'"pynetdicom=={PYNETDICOM_VERSION}"' in pyproject
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(RuntimeError, match=r"pynetdicom 3\.1\.0 is installed but node/dimse\.py .* 3\.0\.4"):
        require_pynetdicom()


@pytest.mark.parametrize(("status", "stored"), [
    (0x0000, True), (0xB000, True), (0xB007, True), (0x0107, True), (0x0001, True),
    (0xA700, False), (0xA900, False), (0xC210, False), (0x0110, False), (0xFF00, False), (None, False),
])
def test_succeeded_follows_pynetdicom_status_categories(status: int | None, stored: bool) -> None:
    assert succeeded(status) is stored


def test_negotiation_matches_stock_pynetdicom(tmp_path: Path, serve: Any) -> None:
    """Same accepted and rejected contexts, same results, same maximum PDU as stock pynetdicom."""
    cfg = _config(tmp_path, max_pdu=32768)
    serve(cfg)
    stock = StockReceiver(cfg)
    contexts = [(ComputedRadiographyImageStorage, [JPEG2000Lossless, ExplicitVRLittleEndian]),
                (CTImageStorage, [MPEG2MPML]),  # not decodable here: refused
                ("1.2.3.4.5.6", [ExplicitVRLittleEndian]),  # unknown abstract syntax: refused
                (Verification, [ImplicitVRLittleEndian])]
    try:
        outcomes = []
        for port in (cfg.listener.port, stock.port):
            assoc = _scu(16382, *contexts).associate("127.0.0.1", port, ae_title="PACSNODE")
            assert assoc.is_established
            outcomes.append((
                [(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts],
                sorted((cx.abstract_syntax, cx.result) for cx in assoc.rejected_contexts),
                assoc.acceptor.maximum_length,
            ))
            assoc.release()
            assert assoc.is_released
    finally:
        stock.stop()
    assert outcomes[0] == outcomes[1]
    accepted, rejected, max_pdu = outcomes[0]
    assert (ComputedRadiographyImageStorage, ExplicitVRLittleEndian) in accepted  # our order decides
    assert [r for _, r in rejected] == [0x03, 0x04]  # abstract syntax / transfer syntaxes not supported
    assert max_pdu == 32768


SYNTAX_FILES = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
                                                "image_dfl.dcm", "rtplan.dcm", "RG1_J2KR.dcm")]


@pytest.mark.parametrize(("listener_pdu", "scu_pdu"), [(4096, 4096), (16384, 0), (262144, 16382), (0, 0)])
def test_stored_bytes_equal_stock_encoded_dataset_at_any_pdu_size(tmp_path: Path, serve: Any, listener_pdu: int,
                                                                   scu_pdu: int) -> None:
    """PDU fragmentation from 4 KB to unlimited, in every uncompressed transfer syntax and JPEG
    2000: the streamed file is, byte for byte, what stock pynetdicom's `encoded_dataset()`
    returns for the same C-STOREs (at 4 KB the command set itself spans PDUs)."""
    cfg = _config(tmp_path, max_pdu=listener_pdu)
    serve(cfg)
    stock = StockReceiver(cfg)
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in SYNTAX_FILES]
    assert len({str(h.file_meta.TransferSyntaxUID) for h in headers}) == 5
    try:
        for port in (cfg.listener.port, stock.port):
            ae = _scu(scu_pdu, *[(str(h.SOPClassUID), [str(h.file_meta.TransferSyntaxUID)]) for h in headers])
            assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
            assert assoc.is_established
            for f in SYNTAX_FILES:  # sent from the file as it is, in its own transfer syntax
                assert int(assoc.send_c_store(Path(f)).Status) == 0, f
            assoc.release()
    finally:
        stock.stop()
    assert len(stock.received) == len(SYNTAX_FILES)
    # The MR files are one instance in three syntaxes: each version is kept as its own file.
    stored = sorted(p.read_bytes() for p in (cfg.storage.path / "instances").rglob("*.dcm"))
    assert stored == sorted(stock.received)
    assert _incoming(cfg) == []


@pytest.mark.skipif(not have("storescu"), reason="DCMTK storescu not installed")
@pytest.mark.parametrize("send_pdu", ["4096", "131072"])
def test_storescu_fragments_at_its_pdu_size(tmp_path: Path, serve: Any, send_pdu: str) -> None:
    cfg = _config(tmp_path, max_pdu=0)
    serve(cfg)
    out = storescu(cfg.listener.port, RG1, CT, extra=("--max-send-pdu", send_pdu))
    assert out.returncode == 0, out.stderr
    for path in (RG1, CT):
        ds = pydicom.dcmread(path)
        stored = pydicom.dcmread(BytesIO(_stored_bytes(cfg, ds.SOPInstanceUID)))
        assert stored.PixelData == ds.PixelData
    assert _incoming(cfg) == []


@pytest.mark.skipif(not have("echoscu"), reason="DCMTK echoscu not installed")
def test_c_echo_from_pynetdicom_and_dcmtk(tmp_path: Path, serve: Any) -> None:
    import subprocess

    cfg = _config(tmp_path)
    serve(cfg)
    assoc = _scu(16382, (Verification, [ImplicitVRLittleEndian])).associate("127.0.0.1", cfg.listener.port,
                                                                          ae_title="PACSNODE")
    assert assoc.is_established
    assert [int(assoc.send_c_echo().Status) for _ in range(3)] == [0, 0, 0]
    assoc.release()
    assert assoc.is_released
    out = subprocess.run(["echoscu", "-aec", "PACSNODE", "-to", "10", "-ta", "10", "-td", "10", "127.0.0.1",
                          str(cfg.listener.port)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr


def test_many_messages_on_one_association_are_all_answered_in_order(tmp_path: Path, serve: Any) -> None:
    """The association thread wakes for each whole message and for nothing else."""
    cfg = _config(tmp_path)
    serve(cfg)
    ae = _scu(16382, (CTImageStorage, [ExplicitVRLittleEndian]), (Verification, [ImplicitVRLittleEndian]))
    assoc = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
    ds = pydicom.dcmread(CT)
    statuses = []
    for i in range(40):
        ds.SOPInstanceUID = generate_uid()
        statuses.append(int(assoc.send_c_store(ds).Status))
        if i % 10 == 0:
            statuses.append(int(assoc.send_c_echo().Status))
    assoc.release()
    assert statuses == [0] * 44
    assert _count(cfg) == 40


def _associate_raw(cfg: Config) -> tuple[Any, socket.socket]:
    ae = _scu(16382, (CTImageStorage, [ExplicitVRLittleEndian]))
    assoc = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
    assert assoc.is_established
    return assoc, assoc.dul.socket.socket  # type: ignore[union-attr]


def _store_pdus(ds: pydicom.Dataset, max_pdu: int) -> list[P_DATA]:
    """The P-DATA primitives pynetdicom would send for a C-STORE of ds on context 1."""
    rq = C_STORE()
    rq.MessageID = 1
    rq.AffectedSOPClassUID = ds.SOPClassUID
    rq.AffectedSOPInstanceUID = ds.SOPInstanceUID
    rq.Priority = 2
    rq.DataSet = BytesIO(encode(ds, False, True))
    msg = C_STORE_RQ()
    msg.primitive_to_message(rq)
    return list(msg.encode_msg(1, max_pdu))


def test_abort_in_the_middle_of_a_data_set_leaves_nothing(tmp_path: Path, serve: Any) -> None:
    """A-ABORT after part of a data set: the staged file is discarded, no row, listener answers."""
    cfg = _config(tmp_path)
    serve(cfg)
    ds = pydicom.dcmread(RG1)
    pdus = _store_pdus(ds, 16384)
    assoc, _ = _associate_raw(cfg)
    for primitive in pdus[:len(pdus) // 2]:
        assoc.dul.send_pdu(primitive)
    wait_for(lambda: _incoming(cfg), 10, "the data set to start streaming into the spool")
    assoc.abort()
    wait_for(lambda: _incoming(cfg) == [], 10, "the staged file to be discarded")
    assert _count(cfg) == 0
    echo = _scu(16382, (Verification, [ImplicitVRLittleEndian])).associate("127.0.0.1", cfg.listener.port,
                                                                         ae_title="PACSNODE")
    assert int(echo.send_c_echo().Status) == 0
    echo.release()


def test_connection_dropped_mid_pdu_leaves_nothing(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path)
    serve(cfg)
    pdus = _store_pdus(pydicom.dcmread(RG1), 16384)
    assoc, sock = _associate_raw(cfg)
    for primitive in pdus[:5]:
        assoc.dul.send_pdu(primitive)
    wait_for(lambda: _incoming(cfg), 10, "the data set to start streaming into the spool")
    sock.sendall(b"\x04\x00" + struct.pack(">I", 100_000) + b"\x00" * 10)  # a P-DATA-TF cut short
    sock.shutdown(socket.SHUT_RDWR)
    wait_for(lambda: _incoming(cfg) == [], 10, "the staged file to be discarded")
    assert _count(cfg) == 0


def test_a_pdu_length_from_the_peer_is_not_allocated_up_front(tmp_path: Path, serve: Any) -> None:
    """A P-DATA-TF header claiming 4 GB, then nothing: no MemoryError, the listener goes on."""
    cfg = _config(tmp_path, timeouts={"acse": 5, "dimse": 5, "network": 2})
    serve(cfg)
    _, sock = _associate_raw(cfg)
    sock.sendall(b"\x04\x00\xff\xff\xff\xff" + b"\x00" * 1000)
    sock.settimeout(10)
    sock.shutdown(socket.SHUT_WR)
    echo = _scu(16382, (Verification, [ImplicitVRLittleEndian])).associate("127.0.0.1", cfg.listener.port,
                                                                         ae_title="PACSNODE")
    assert echo.is_established
    assert int(echo.send_c_echo().Status) == 0
    echo.release()


def test_idle_association_is_aborted_after_the_network_timeout(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path, timeouts={"acse": 5, "dimse": 5, "network": 1})
    serve(cfg)
    assoc = _scu(16382, (Verification, [ImplicitVRLittleEndian])).associate("127.0.0.1", cfg.listener.port,
                                                                          ae_title="PACSNODE")
    assert assoc.is_established
    wait_for(lambda: assoc.is_aborted, 10, "the listener's network timeout to abort the association")


def test_connection_without_associate_rq_is_closed_after_the_acse_timeout(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path, timeouts={"acse": 1, "dimse": 5, "network": 5})
    serve(cfg)
    with socket.create_connection(("127.0.0.1", cfg.listener.port), timeout=10) as sock:
        assert sock.recv(100) == b""  # closed by the listener, before our 10 s timeout


def test_release_is_answered_and_recorded(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path)
    ctx = serve(cfg)
    assoc, _ = _associate_raw(cfg)
    ds = pydicom.dcmread(CT)
    assert int(assoc.send_c_store(ds).Status) == 0
    assert ctx.tracker.open_studies() == {ds.StudyInstanceUID}
    assoc.release()
    assert assoc.is_released
    wait_for(lambda: ctx.tracker.open_studies() == set(), 10, "EVT_RELEASED to close the study's association")


def test_command_and_data_set_start_in_one_p_data(tmp_path: Path) -> None:
    """A peer may put the last command fragment and the first data set fragment in one PDU:
    the data set bytes that arrived with the command go into the sink first."""
    cfg = _config(tmp_path)
    ctx = IngestContext(cfg)
    ae = build_ae(cfg)
    assoc = WakingAssociation(ae, "acceptor")
    dimse = StreamingDIMSE(assoc, lambda: stage(ctx))
    assoc.dimse = dimse
    ds = pydicom.dcmread(CT)
    cx = next(c for c in ae.supported_contexts if c.abstract_syntax == CTImageStorage)
    cx.context_id = 1
    cx.transfer_syntax = [ExplicitVRLittleEndian]
    assoc._accepted_cx = {1: cx}
    pdus = _store_pdus(ds, 4096)
    merged = P_DATA()
    merged.presentation_data_value_list = [[c, v] for c, v in (*pdus[0].presentation_data_value_list,
                                                               *pdus[1].presentation_data_value_list)]
    for primitive in [merged, *pdus[2:]]:
        dimse.receive_primitive(primitive)
    _, request = dimse.msg_queue.get(timeout=1)
    sink = received_dataset(evt.Event(assoc, evt.EVT_C_STORE, {"request": request}))
    assert sink is not None
    assert sink.path is not None  # type: ignore[attr-defined]
    stored = pydicom.dcmread(sink.path)  # type: ignore[attr-defined]
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    sink.discard()
    assert _incoming(cfg) == []


def test_oversized_data_set_is_refused_while_it_arrives(tmp_path: Path, serve: Any) -> None:
    """storage.max_instance_mb is enforced as the data set streams in: 0xA700, nothing kept."""
    cfg = _config(tmp_path, storage={"max_instance_mb": 1})
    ctx = serve(cfg)
    assoc, _ = _associate_raw(cfg)
    ds = pydicom.dcmread(RG1)  # 7 MB
    ds.SOPClassUID = CTImageStorage  # the context we proposed
    assert int(assoc.send_c_store(ds).Status) == 0xA700
    assoc.release()
    assert _count(cfg) == 0
    assert _incoming(cfg) == []
    with session_scope(cfg.database.url) as s:
        detail = s.scalar(select(Event.detail).where(Event.kind == "store_refused"))
    assert detail is not None and "storage.max_instance_mb" in detail
    assert ctx.tracker.open_studies() == set()


def test_associations_in_parallel_each_get_their_own_reactor(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path)
    serve(cfg)
    errors: list[BaseException] = []

    def send(n: int) -> None:
        try:
            assoc, _ = _associate_raw(cfg)
            ds = pydicom.dcmread(CT)
            for _ in range(5):
                ds.SOPInstanceUID = generate_uid()
                assert int(assoc.send_c_store(ds).Status) == 0
            assoc.release()
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    assert _count(cfg) == 20


@pytest.mark.parametrize(("level", "logged"), [(logging.WARNING, False), (logging.INFO, True)])
def test_pynetdicom_standard_logging_only_when_its_logger_would_show_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, level: int, logged: bool
) -> None:
    from pynetdicom._handlers import standard_dimse_recv_handler

    cfg = _config(tmp_path)
    caplog.set_level(level, logger="pynetdicom")
    ctx = IngestContext(cfg)
    server = start_listener(cfg, ctx)
    try:
        assoc, _ = _associate_raw(cfg)
        acceptor = wait_for(lambda: server.active_associations, 10, "the acceptor association")[0]
        bound = [h for h, _ in acceptor.get_handlers(evt.EVT_DIMSE_RECV)]
        assert int(assoc.send_c_store(pydicom.dcmread(CT)).Status) == 0
        assoc.release()
    finally:
        server.shutdown()
    assert (standard_dimse_recv_handler in bound) is logged
    assert ("Received Store Request" in caplog.text) is logged


@pytest.mark.skipif(not have("storescu"), reason="DCMTK storescu not installed")
def test_associations_work_on_descriptors_above_1024(tmp_path: Path, serve: Any) -> None:
    """A busy process has many descriptors open; select() refuses those above 1,024 (stock
    pynetdicom then closes the association), poll() does not. The peer is DCMTK, in its own
    process, so that only the listener's descriptors are high."""
    import os
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"the descriptor limit ({hard}) is below 2048")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    cfg = _config(tmp_path)
    serve(cfg)
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        assert filler[-1] > 1024  # the next accepted connection gets a descriptor above these
        out = storescu(cfg.listener.port, CT, RG1)
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert out.returncode == 0, out.stderr
    assert _count(cfg) == 2


def test_a_checkpoint_set_and_cleared_before_the_association_thread_runs_keeps_it_paused() -> None:
    # The user's send_*() ends (set), and its next one begins (clear) before the association
    # thread got to run. threading.Event.wait would let that thread go on, and it would take the
    # peer's response to the new request off the queue: the user's C-FIND then found nothing
    # (seen once in the full suite: "Received unexpected C-FIND service message").
    checkpoint = _WakingCheckpoint(threading.Event())
    checkpoint.clear()
    assoc = type("Assoc", (), {"_is_paused": False})()
    thread = threading.Thread(target=checkpoint.pass_, args=(assoc,), daemon=True)
    thread.start()
    wait_for(lambda: assoc._is_paused, 5, "the thread to pause")
    with checkpoint._lock:  # the association thread cannot run between these two
        checkpoint.set()
        checkpoint.clear()
    thread.join(0.2)
    assert thread.is_alive() and assoc._is_paused  # still paused: the user's request is its own
    checkpoint.set()
    thread.join(5)
    assert not thread.is_alive() and not assoc._is_paused


def test_a_resting_association_thread_counts_as_paused_until_it_passes_the_checkpoint() -> None:
    # Waiting for its DUL, the thread is marked paused, so the user's send_*() goes at once; when
    # the peer's answer wakes it, it stops at the checkpoint the user cleared, not at the queue.
    checkpoint = _WakingCheckpoint(threading.Event())
    assoc = type("Assoc", (), {"_is_paused": False})()
    checkpoint.rest(assoc)
    assert assoc._is_paused
    checkpoint.clear()  # the user's request: sent at once, the thread being paused
    thread = threading.Thread(target=checkpoint.pass_, args=(assoc,), daemon=True)
    thread.start()  # the answer woke it
    thread.join(0.2)
    assert thread.is_alive() and assoc._is_paused
    checkpoint.set()  # the user has its answer
    thread.join(5)
    assert not thread.is_alive() and not assoc._is_paused


_ODD_UID, _EVEN_UID = "1.2.3.4.5", "1.2.3.4.56"
_LONGEST_UID = "1." + "2" * 62


def _response(status: int, msg_id: int, sop_class: str, sop_instance: str, comment: str | None = None) -> C_STORE:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = msg_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment  # type: ignore[assignment]
    return rsp


def _sent(dimse_class: type[DIMSEServiceProvider], rsp: C_STORE, max_pdu: int, bound: Any = None) -> list[list[Any]]:
    """The PDVs a DIMSE provider of dimse_class hands its DUL for rsp on context 1."""
    assoc = WakingAssociation(build_ae(parse_config({"listener": {"allowed_callers": "any"}})), "acceptor")
    assoc.requestor.maximum_length = max_pdu
    if bound is not None:
        assoc.bind(evt.EVT_DIMSE_SENT, bound)
    sent: list[list[Any]] = []
    assoc.dul.send_pdu = lambda pdata: sent.extend([list(v) for v in pdata.presentation_data_value_list])  # type: ignore[method-assign,assignment]
    dimse_class(assoc).send_msg(rsp, 1)
    return sent


@pytest.mark.parametrize("status", [0x0000, 0xB000, 0xA700, 0xA900, 0xC210])
@pytest.mark.parametrize(("msg_id", "sop_class", "sop_instance"), [
    (1, CTImageStorage, _ODD_UID), (65535, ComputedRadiographyImageStorage, _EVEN_UID), (7, _EVEN_UID, _LONGEST_UID)])
@pytest.mark.parametrize("max_pdu", [0, 4096, 16382])
def test_quick_store_response_is_pynetdicoms_byte_for_byte(status: int, msg_id: int, sop_class: str,
                                                           sop_instance: str, max_pdu: int) -> None:
    """The C-STORE response the listener sends without pynetdicom's Dataset is the P-DATA that
    pynetdicom's own send_msg produces, for every status the handler answers with."""
    rsp = _response(status, msg_id, sop_class, sop_instance)
    assert store_response_command(rsp) is not None  # the quick path is the one taken
    assert _sent(QuickResponseDIMSE, rsp, max_pdu) == _sent(DIMSEServiceProvider, rsp, max_pdu)


def test_quick_store_response_leaves_the_rest_to_pynetdicom() -> None:
    """An error comment, a PDU too small for one fragment, or a subscriber to EVT_DIMSE_SENT
    (it is handed pynetdicom's message object): pynetdicom's own send_msg."""
    commented = _response(0xA700, 3, CTImageStorage, _ODD_UID, comment="out of space")
    assert store_response_command(commented) is None
    unencodable = _response(0, 3, CTImageStorage, _ODD_UID)
    unencodable._status = 0x10000  # past what a US holds: pynetdicom's encoder says what is wrong
    assert store_response_command(unencodable) is None
    assert _sent(QuickResponseDIMSE, commented, 0) == _sent(DIMSEServiceProvider, commented, 0)
    plain = _response(0, 3, CTImageStorage, _ODD_UID)
    tiny = _sent(QuickResponseDIMSE, plain, 64)  # fragments of 58 bytes
    assert len(tiny) > 1 and tiny == _sent(DIMSEServiceProvider, plain, 64)
    seen: list[Any] = []
    assert _sent(QuickResponseDIMSE, plain, 0, bound=lambda event: seen.append(event.message)) == \
        _sent(DIMSEServiceProvider, plain, 0)
    assert [type(m).__name__ for m in seen] == ["C_STORE_RSP"]


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax"), [
    (CTImageStorage, _ODD_UID, ExplicitVRLittleEndian), (ComputedRadiographyImageStorage, _EVEN_UID, ImplicitVRLittleEndian),
    (CTImageStorage, _LONGEST_UID, JPEG2000Lossless), (CTImageStorage, "1.2.3.\u00e9", ExplicitVRLittleEndian)])
def test_file_meta_bytes_are_pynetdicoms(sop_class: str, sop_instance: str, syntax: str) -> None:
    """The file meta written before a streamed data set is what encode_file_meta(create_file_meta())
    writes (the last case, not plain ASCII, is pynetdicom's own)."""
    stock = encode_file_meta(create_file_meta(sop_class_uid=pydicom.uid.UID(sop_class),
                                              sop_instance_uid=pydicom.uid.UID(sop_instance),
                                              transfer_syntax=pydicom.uid.UID(syntax)))
    assert file_meta_bytes(sop_class, sop_instance, syntax) == stock
