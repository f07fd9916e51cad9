"""Listener: storage through real DICOM associations (DCMTK storescu and pynetdicom peers)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from node.cli import db_upgrade
from node.config import Config, parse_config
from node.db.models import Event, Instance, Series, Study, StudyState
from node.db.session import session_scope
from node.handlers import IngestContext
from node.listener import start_listener
from tests.peers import free_port, have, storescu

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
RG1_J2K = Path(get_testdata_file("RG1_J2KR.dcm"))
CT = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    cfg = parse_config({
        "listener": {"host": "127.0.0.1", "port": free_port(), "allowed_callers": "any", "timeouts": {"acse": 5, "dimse": 5, "network": 5}},
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
    })
    db_upgrade(cfg)
    return cfg


@pytest.fixture
def listener(config: Config) -> Iterator[IngestContext]:
    ctx = IngestContext(config)
    server = start_listener(config, ctx)
    try:
        yield ctx
    finally:
        server.shutdown()


def _send(config: Config, ds: pydicom.Dataset, aet: str = "SCU") -> int:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", config.listener.port, ae_title=config.listener.ae_title)
    assert assoc.is_established
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status)
    finally:
        assoc.release()


def _count(config: Config, model: type) -> int:
    with session_scope(config.database.url) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


@pytest.mark.skipif(not have("storescu"), reason="DCMTK storescu not installed")
def test_storescu_stores_bytes_as_received_and_records_before_success(config: Config, listener: IngestContext) -> None:
    for files, extra in (((RG1, CT), ()), ((RG1_J2K,), ("-xv",))):
        out = storescu(config.listener.port, *files, extra=extra)
        assert out.returncode == 0, out.stderr
    with session_scope(config.database.url) as s:
        instances = s.scalars(select(Instance)).all()
        assert len(instances) == 3
        for inst in instances:
            path = config.storage.path / inst.path
            # The file is the dataset exactly as sent (no decode / re-encode), under a hashed name.
            sent = {p: pydicom.dcmread(p) for p in (RG1, RG1_J2K, CT)}
            src = next(p for p, d in sent.items() if d.SOPInstanceUID == inst.sop_instance_uid and
                       str(d.file_meta.TransferSyntaxUID) == inst.transfer_syntax_uid)
            assert pydicom.dcmread(path).PixelData == sent[src].PixelData
            assert inst.sop_instance_uid not in str(path)
        assert {st.state for st in s.scalars(select(Study))} == {StudyState.RECEIVING}
        assert {se.modality for se in s.scalars(select(Series))} == {"CR", "CT"}


def test_echo_and_duplicate_is_stored_once(config: Config, listener: IngestContext) -> None:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", config.listener.port, ae_title="PACSNODE")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0
    assoc.release()
    ds = pydicom.dcmread(RG1)
    assert _send(config, ds) == 0
    assert _send(config, ds) == 0
    assert _count(config, Instance) == 1
    files = list((config.storage.path / "instances").rglob("*.dcm"))
    assert len(files) == 1


def test_resend_with_other_content_keeps_both_versions(config: Config, listener: IngestContext) -> None:
    ds = pydicom.dcmread(RG1)
    assert _send(config, ds) == 0
    ds.SeriesDescription = "changed"
    assert _send(config, ds) == 0
    assert _count(config, Instance) == 1
    assert len(list((config.storage.path / "instances").rglob("*.dcm"))) == 2
    with session_scope(config.database.url) as s:
        assert s.scalar(select(Event).where(Event.kind == "instance_version")) is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [("StudyInstanceUID", "1.2." + "3" * 80), ("SeriesInstanceUID", ""), ("StudyInstanceUID", "1.2.abc")],
)
def test_bad_uids_are_refused_over_the_wire(config: Config, listener: IngestContext, tmp_path: Path,
                                            field: str, value: str) -> None:
    ds = pydicom.dcmread(RG1)
    setattr(ds, field, value)
    assert _send(config, ds) == 0xA900
    assert _count(config, Instance) == 0
    assert not (config.storage.path / "instances").exists()


def test_ingest_refuses_path_uid_directly(config: Config) -> None:
    from node.handlers import StoreRefused, ingest

    ds = pydicom.dcmread(RG1)
    ds.SOPInstanceUID = "../../etc/passwd"
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    with pytest.raises(StoreRefused, match="SOPInstanceUID is not a valid UID") as e:
        ingest(buf.getvalue(), IngestContext(config), "SCU")
    assert e.value.status == 0xA900
    assert not (config.storage.path / "instances").exists()


def test_the_nodes_other_writers_do_not_wait_for_an_instances_fsyncs(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """The instance's file and folder are durable before its rows take the writer queue
    (node.db.session.WriterQueueConnection), so the workers' and the export's writes wait
    only for the rows and their commit: no fsync of the instance runs while the queue is held."""
    import fcntl
    import os
    import threading

    from node import spool
    from node.handlers import ingest

    queue = config.storage.path.parent / "db.sqlite.writers"
    held_during: list[tuple[str, bool]] = []  # (what was fsync'd, whether the queue was held)

    probing = threading.Lock()  # two probes at once (the fsyncs run in parallel) would see each other's lock

    def held() -> bool:
        with probing:
            fd = os.open(queue, os.O_RDONLY | os.O_CREAT)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return False
            except BlockingIOError:
                return True
            finally:
                os.close(fd)  # and our probe's lock with it

    def probed(fsync: Callable[[Any], None]) -> Callable[[Any], None]:
        def run(arg: Any) -> None:
            what = os.readlink(f"/proc/self/fd/{arg}") if isinstance(arg, int) else str(arg)
            fsync(arg)
            # Before the fsync's future completes: whoever holds the queue now held it throughout.
            held_during.append((what, held()))
        return run

    monkeypatch.setattr(spool, "_fsync_close", probed(spool._fsync_close))
    monkeypatch.setattr(spool, "_fsync_path", probed(spool._fsync_path))
    ingest(RG1.read_bytes(), IngestContext(config), "SCU")
    assert _count(config, Instance) == 1
    # Only this test's spool: the fsync pool is shared with what earlier tests left running.
    ours = [(what, h) for what, h in held_during if what.startswith(str(config.storage.path))]
    assert len(ours) >= 2 and not any(h for _, h in ours), ours  # the file, its folder (and new parents)


def test_low_disk_watermark_answers_out_of_resources(tmp_path: Path) -> None:
    cfg = parse_config({
        "listener": {"host": "127.0.0.1", "port": free_port(), "allowed_callers": "any"},
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 10**9},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
    })
    db_upgrade(cfg)
    ctx = IngestContext(cfg)
    server = start_listener(cfg, ctx)
    try:
        assert _send(cfg, pydicom.dcmread(RG1)) == 0xA700
    finally:
        server.shutdown()
    assert _count(cfg, Instance) == 0
    assert not (cfg.storage.path / "instances").exists()


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("bad_sequence.dcm", "StudyInstanceUID is not a valid UID"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "no complete pixel data"),
    ],
)
def test_malformed_files_are_refused_with_a_precise_status(config: Config, name: str, match: str) -> None:
    from node.handlers import StoreRefused, ingest

    data = Path(get_testdata_file(name)).read_bytes()
    with pytest.raises(StoreRefused, match=match) as e:
        ingest(data, IngestContext(config), "SCU")
    assert e.value.status == 0xA900
    assert _count(config, Instance) == 0


@pytest.mark.skipif(not have("storescu"), reason="DCMTK storescu not installed")
@pytest.mark.parametrize(("flag", "syntax"), [("-xd", DeflatedExplicitVRLittleEndian), ("-xi", ImplicitVRLittleEndian)])
def test_other_transfer_syntaxes_from_storescu(config: Config, listener: IngestContext, flag: str, syntax: str) -> None:
    """storescu converts on the fly (deflated explicit VR, implicit VR); we keep what came."""
    out = storescu(config.listener.port, CT, extra=(flag,))
    assert out.returncode == 0, out.stderr
    with session_scope(config.database.url) as s:
        inst = s.scalars(select(Instance)).one()
        assert inst.transfer_syntax_uid == syntax
        stored = pydicom.dcmread(config.storage.path / inst.path)
    assert str(stored.file_meta.TransferSyntaxUID) == syntax
    assert stored.pixel_array.shape == (128, 128)


def test_listener_start_removes_staged_files_left_by_a_killed_process(config: Config,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """kill -9 while a data set arrives leaves its staged file in incoming/: the next start
    removes it (nothing in it was acknowledged) and says so; a recent one is left alone."""
    import os

    from node.spool import INCOMING

    incoming = config.storage.path / INCOMING
    incoming.mkdir(parents=True)
    orphan, recent = incoming / ".killed.part", incoming / ".recent.part"
    orphan.write_bytes(b"\0" * 1000)
    recent.write_bytes(b"\0" * 10)
    old = orphan.stat().st_mtime - 2 * 3600
    os.utime(orphan, (old, old))
    server = start_listener(config, IngestContext(config))
    server.shutdown()
    assert not orphan.exists() and recent.exists()
    assert "removed 1 staged file(s) not written to for 3600 s" in caplog.text
