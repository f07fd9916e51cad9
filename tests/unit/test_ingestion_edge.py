"""Ingestion at the edge through real associations: contexts we cannot handle, a database that
goes away, oversized instances, concurrent senders, a study split over two associations."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage, CTImageStorage, Verification
from sqlalchemy import func, select

from node.cli import db_upgrade
from node.completion import CompletionService
from node.config import Config, parse_config
from node.db.models import Instance, Job, Study
from node.db.session import session_scope
from node.handlers import IngestContext
from node.listener import start_listener
from tests.peers import free_port, have, storescu

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
CT = Path(get_testdata_file("CT_small.dcm"))


def _config(tmp_path: Path, **over: Any) -> Config:
    raw: dict[str, Any] = {
        "listener": {"host": "127.0.0.1", "port": free_port(), "allowed_callers": "any", "timeouts": {"acse": 5, "dimse": 5, "network": 5}},
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "completion": {"quiet_seconds": 0},
    }
    for key, value in over.items():
        raw[key] = {**raw.get(key, {}), **value}
    cfg = parse_config(raw)
    db_upgrade(cfg)
    return cfg


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return _config(tmp_path)


@pytest.fixture
def ctx(cfg: Config) -> Iterator[IngestContext]:
    ctx = IngestContext(cfg)
    server = start_listener(cfg, ctx)
    try:
        yield ctx
    finally:
        server.shutdown()


def _scu() -> AE:
    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    return ae


def _copy(src: Path, out: Path, study: str | None = None, series: str | None = None) -> pydicom.Dataset:
    """src with new SOP (and given or new study/series) UIDs, written to out."""
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out)
    return ds


def _count(cfg: Config, model: type) -> int:
    with session_scope(cfg.database.url) as s:
        return int(s.scalar(select(func.count()).select_from(model)) or 0)


def _spool_files(cfg: Config) -> list[Path]:
    return [p for p in (cfg.storage.path / "instances").rglob("*") if p.is_file()] if (
        cfg.storage.path / "instances").exists() else []


def test_unsupported_transfer_syntax_is_rejected_in_the_association(cfg: Config, ctx: IngestContext) -> None:
    ae = _scu()
    ae.add_requested_context(ComputedRadiographyImageStorage, [MPEG2MPML])
    ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        rejected = [(cx.transfer_syntax[0], cx.result) for cx in assoc.rejected_contexts]
        accepted = [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts]
    finally:
        assoc.release()
    assert rejected == [(MPEG2MPML, 0x04)]  # transfer syntaxes not supported (provider rejection)
    assert ExplicitVRLittleEndian in accepted


def test_database_gone_mid_store_answers_a700_and_leaves_no_file(cfg: Config, ctx: IngestContext, tmp_path: Path) -> None:
    ae = _scu()
    ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    first = _copy(RG1, tmp_path / "a.dcm")
    second = _copy(RG1, tmp_path / "b.dcm")
    assoc = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(first).Status) == 0
        # The study table disappears under the listener: the file is written, then the row fails.
        with sqlite3.connect(tmp_path / "db.sqlite", timeout=10) as db:
            db.execute("ALTER TABLE study RENAME TO study_gone")
        assert int(assoc.send_c_store(second).Status) == 0xA700
    finally:
        assoc.release()
    with sqlite3.connect(tmp_path / "db.sqlite", timeout=10) as db:
        db.execute("ALTER TABLE study_gone RENAME TO study")
    assert _count(cfg, Instance) == 1
    files = _spool_files(cfg)
    assert len(files) == 1 and files[0].suffix == ".dcm"  # no second file, no temp file


def test_instance_over_the_size_limit_answers_a700(tmp_path: Path) -> None:
    cfg = _config(tmp_path, storage={"max_instance_mb": 1})
    server = start_listener(cfg, IngestContext(cfg))
    try:
        ae = _scu()
        ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
        assert assoc.is_established
        try:
            assert int(assoc.send_c_store(pydicom.dcmread(RG1)).Status) == 0xA700  # RG1 is ~7 MB
            assert int(assoc.send_c_store(pydicom.dcmread(CT)).Status) == 0  # the association survives
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert _count(cfg, Instance) == 1


@pytest.mark.skipif(not have("storescu"), reason="DCMTK storescu not installed")
def test_concurrent_storescu_senders(cfg: Config, ctx: IngestContext, tmp_path: Path) -> None:
    senders = []
    for n in range(4):
        study = generate_uid()
        files = [tmp_path / f"s{n}-{i}.dcm" for i in range(5)]
        for f in files:
            _copy(CT, f, study=study)
        senders.append(files)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda fs: storescu(cfg.listener.port, *fs, aet="MOD"), senders))
    assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
    assert _count(cfg, Instance) == 20
    assert _count(cfg, Study) == 4


def test_study_over_two_associations_completes_once_with_both_series(cfg: Config, ctx: IngestContext,
                                                                      tmp_path: Path) -> None:
    study, series_a, series_b = generate_uid(), generate_uid(), generate_uid()
    a = [_copy(RG1, tmp_path / f"a{i}.dcm", study, series_a) for i in range(2)]
    b = [_copy(RG1, tmp_path / f"b{i}.dcm", study, series_b) for i in range(2)]
    service = CompletionService(cfg, ctx.tracker)

    def associate() -> Any:
        ae = _scu()
        ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
        assert assoc.is_established
        return assoc

    one, two = associate(), associate()
    try:
        assert int(two.send_c_store(b[0]).Status) == 0
        assert [int(one.send_c_store(ds).Status) for ds in a] == [0, 0]
        one.release()
        assert service.tick() == []  # the other association still delivers this study
        assert int(two.send_c_store(b[1]).Status) == 0
    finally:
        two.release()
    job_ids = service.tick()
    assert len(job_ids) == 1
    assert service.tick() == []
    with session_scope(cfg.database.url) as s:
        job = s.get_one(Job, job_ids[0])
        assert len(job.instance_ids) == 4
        assert {se.series_instance_uid for se in job.study.series} == {series_a, series_b}
        assert job.study.completion_rule == "quiet"


def test_a_study_completes_when_quiet_although_its_association_stays_open(tmp_path: Path) -> None:
    """A router may hold one association for hours: its study completes once nothing arrived
    for completion.open_quiet_seconds, with the association still established."""
    cfg = _config(tmp_path, completion={"open_quiet_seconds": 0.5})
    ctx = IngestContext(cfg)
    server = start_listener(cfg, ctx)
    service = CompletionService(cfg, ctx.tracker)
    ae = _scu()
    ae.add_requested_context(ComputedRadiographyImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
    try:
        assert assoc.is_established
        assert int(assoc.send_c_store(_copy(RG1, tmp_path / "a.dcm")).Status) == 0
        assert service.tick() == []  # it has only just arrived
        time.sleep(0.6)
        assert len(service.tick()) == 1
        assert assoc.is_established
    finally:
        assoc.release()
        server.shutdown()
    with session_scope(cfg.database.url) as s:
        assert s.scalars(select(Study.completion_rule)).one() == "open_quiet"


@pytest.mark.slow
@pytest.mark.integration
@pytest.mark.skipif(not have("Orthanc", "storescu"), reason="Orthanc or DCMTK not installed")
def test_source_pacs_count_completes_the_study_before_the_quiet_time(tmp_path: Path) -> None:
    from tests.peers import orthanc

    study = generate_uid()
    files = [tmp_path / f"i{i}.dcm" for i in range(3)]
    for f in files:
        _copy(CT, f, study=study, series=None)
    with orthanc(tmp_path / "orthanc", allow_find=True) as pacs:  # the node asks it for study sizes
        assert storescu(pacs.dicom_port, *files, aec=pacs.aet).returncode == 0
        cfg = _config(tmp_path, completion={
            "quiet_seconds": 300, "query_source": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}})
        ctx = IngestContext(cfg)
        server = start_listener(cfg, ctx)
        try:
            service = CompletionService(cfg, ctx.tracker)
            assert storescu(cfg.listener.port, *files[:2]).returncode == 0
            assert service.tick() == []  # 2 of 3: neither count nor quiet time
            assert storescu(cfg.listener.port, files[2]).returncode == 0
            service.tick()
        finally:
            server.shutdown()
    with session_scope(cfg.database.url) as s:
        st = s.scalar(select(Study).where(Study.study_instance_uid == study))
        assert st is not None
        assert (st.expected_instances, st.completion_rule) == (3, "count")


def test_pixel_data_cut_short_is_refused_without_reading_it(cfg: Config) -> None:
    """The header parse defers the 7 MB pixel value: a length that runs past the end is 0xA900."""
    from node.handlers import StoreRefused, ingest

    data = RG1.read_bytes()[:-1000]
    with pytest.raises(StoreRefused, match="no complete pixel data") as e:
        ingest(data, IngestContext(cfg), "SCU")
    assert e.value.status == 0xA900
    assert _count(cfg, Instance) == 0
    assert _spool_files(cfg) == []
    assert list((cfg.storage.path / "incoming").iterdir()) == []


@pytest.mark.parametrize(("keyword", "tag"), [("TextValue", "0040,A160"),
                                            # one of those the handler reads after parsing
                                            ("PatientID", "0010,0020")])
def test_a_long_text_value_cut_short_is_refused(cfg: Config, keyword: str, tag: str) -> None:
    """A value long enough to be deferred (not bulk data) whose length runs past the end: pydicom
    would read it short without a warning, so the check is ours; the whole value is kept."""
    from node.handlers import StoreRefused, ingest, parse

    ds = pydicom.dcmread(CT)
    del ds.PixelData, ds.Rows, ds.Columns
    # Deferred while parsing (over 64 KB); implicit VR, as an explicit LO's length cannot say so much
    setattr(ds, keyword, "a" * 100_000)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    data = _encoded(ds)
    whole, _ = parse(data)
    assert len(whole[keyword].value) == 100_000
    with pytest.raises(StoreRefused, match=rf"cut short: the value of \({tag}\)") as e:
        ingest(data[:-50_000], IngestContext(cfg), "SCU")
    assert e.value.status == 0xA900
    assert _count(cfg, Instance) == 0
    assert _spool_files(cfg) == []


def test_parse_refuses_what_reading_each_element_would(cfg: Config) -> None:
    """parse() checks each value with pydicom's conversion hooks instead of storing a
    DataElement: values of the wrong length, a DS that is no number and a private tag of unknown VR behave as
    `ds[tag]` does (refused where it raises, kept where it only warns)."""
    from pydicom.dataelem import RawDataElement
    from pydicom.errors import BytesLengthException

    from node.handlers import StoreRefused, parse

    def with_raw(tag: int, vr: str | None, value: bytes, implicit: bool = False) -> bytes:
        ds = pydicom.dcmread(CT)
        ds[tag] = RawDataElement(pydicom.tag.Tag(tag), vr, len(value), value, 0, implicit, True)
        if implicit:
            ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        return _encoded(ds)

    refused = []
    for tag, vr, value in ((0x00280002, "US", b"\x01\x00\x02"),  # Samples per Pixel
                           (0x00181050, "DS", b"1.0\\x"),  # Spatial Resolution: a DS that is no number
                           (0x00189306, "FD", b"\x00" * 5)):  # Single Collimation Width
        encoded = with_raw(tag, vr, value)
        try:
            pydicom.dcmread(BytesIO(encoded))[tag]  # what parse() stands for
        except (BytesLengthException, ValueError):
            refused.append(vr)
            with pytest.raises(StoreRefused, match="does not parse") as e:
                parse(encoded)
            assert e.value.status == 0xC210
        else:
            assert parse(encoded)[0][tag].value == pydicom.dcmread(BytesIO(encoded))[tag].value
    assert refused == ["US", "FD"]  # both kinds of case were met (pydicom only warns for the DS)
    private = with_raw(0x00771010, None, b"vendor\x00\x01", implicit=True)  # no creator: VR unknown
    kept, _ = parse(private)
    assert (kept[0x00771010].VR, kept[0x00771010].value) == ("UN", b"vendor\x00\x01")


def test_the_values_parse_leaves_unconverted_cannot_fail_to_convert() -> None:
    """parse() does not convert the VRs whose conversion cannot fail (node/handlers.py
    `_unconverted`, `_NUMBER_SIZES`), taking pydicom 3.0's code for it. Here the installed pydicom
    converts random values of each (escape sequences, delimiters, any byte, odd lengths, several
    character sets) without an exception, while the same values do make the VRs parse converts
    fail: so a pydicom that can fail on a skipped VR fails this test."""
    import random
    import warnings

    from pydicom import config
    from pydicom.charset import convert_encodings
    from pydicom.dataelem import RawDataElement
    from pydicom.hooks import hooks

    from node.handlers import _NUMBER_SIZES, _unconverted, _unconverted_now

    skipped = _unconverted_now()
    assert {"UI", "CS", "DA", "TM", "LO", "SH", "DS", "OB"} <= skipped  # pydicom's defaults, the node's
    assert not skipped & {"PN", "IS", "SQ"}
    assert _unconverted(False, False, config.WARN, True) == frozenset()  # another value callback converts all
    assert not _unconverted(True, True, config.RAISE, True) & {"DA", "LO", "DS"}
    assert "DS" not in _unconverted(True, False, config.WARN, False)  # Decimal or numpy
    charsets = [["iso8859"], *(convert_encodings(terms) for terms in (
        ["ISO_IR 100"], ["ISO_IR 192"], ["GB18030"], ["ISO 2022 IR 87"], ["ISO 2022 IR 6", "ISO 2022 IR 87", "ISO 2022 IR 159"]))]
    pieces = [b"\\", b"\x1b", b"\x1b$B", b"\x1b(B", b"=", b"^", b"\x00", b" ", b"1e400", b"-", b".", b"9" * 400]
    rng = random.Random(12)
    failed: set[str] = set()

    def convert(vr: str, value: bytes) -> None:
        raw = RawDataElement(pydicom.tag.Tag(0x00091010), vr, len(value), value, 0, rng.random() < 0.5, True)
        hooks.raw_element_value(raw, {"VR": vr}, encoding=rng.choice(charsets))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for vr in sorted(skipped | set(_NUMBER_SIZES) | {"PN", "IS"}):
            for _ in range(1500):
                value = b"".join(rng.choice(pieces) if rng.random() < 0.3 else bytes([rng.randrange(256)])
                                 for _ in range(rng.choice((1, 2, 3, 5, 8, 17, 64))))
                if vr in _NUMBER_SIZES and rng.random() < 0.5:
                    value = value[:len(value) - len(value) % _NUMBER_SIZES[vr]]
                try:
                    convert(vr, value)
                except Exception:
                    failed.add(vr)
                    if vr in skipped or (vr in _NUMBER_SIZES and len(value) % _NUMBER_SIZES[vr] == 0):
                        raise
    # The values reach the failures there are: a number of the wrong length, an IS too large, a malformed PN
    assert {"US", "FD", "IS", "PN"} <= failed


def _encoded(ds: pydicom.Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_the_same_instance_from_two_senders_at_once_is_stored_once(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both look for the instance before either commits: the second's rows collide with the
    first's, it looks again, finds the same content and answers success; the file stays."""
    import threading

    import node.handlers
    from node.handlers import ingest

    both_inside = threading.Barrier(2, timeout=10)
    real_record = node.handlers._record

    def record_together(*args: Any, **kwargs: Any) -> Any:
        if threading.current_thread().name.startswith("sender"):
            both_inside.wait()  # each has placed its file and found no row
        return real_record(*args, **kwargs)

    monkeypatch.setattr(node.handlers, "_record", record_together)
    data = RG1.read_bytes()
    ctx = IngestContext(cfg)
    results: list[object] = []

    def send() -> None:
        try:
            results.append(ingest(data, ctx, "SCU"))
        except Exception as e:  # noqa: BLE001 (asserted below)
            results.append(e)

    threads = [threading.Thread(target=send, name=f"sender{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    ds = pydicom.dcmread(RG1, stop_before_pixels=True)
    assert results == [(ds.StudyInstanceUID, ds.SOPInstanceUID)] * 2
    assert _count(cfg, Instance) == 1
    files = _spool_files(cfg)
    assert len(files) == 1 and files[0].read_bytes() == data


def test_study_row_follows_each_instance(ctx: IngestContext, cfg: Config) -> None:
    """The one UPDATE per instance: counts new instances only, sets an expected count and identifier
    hashes when an instance carries them and leaves them when a later one does not."""
    from io import BytesIO

    from node.handlers import ingest
    from node.identifiers import keyed_hash

    study = generate_uid()

    def encoded(sop: str, **elements: Any) -> bytes:
        ds = pydicom.dcmread(RG1)
        ds.StudyInstanceUID, ds.SOPInstanceUID = study, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        for keyword in ("AccessionNumber", "PatientID", "NumberOfStudyRelatedInstances"):
            if keyword in ds:
                del ds[keyword]
        for keyword, value in elements.items():
            setattr(ds, keyword, value)
        out = BytesIO()
        ds.save_as(out, enforce_file_format=True)
        return out.getvalue()

    def row() -> Study:
        with session_scope(cfg.database.url) as s:
            st = s.scalar(select(Study).where(Study.study_instance_uid == study))
            assert st is not None
            return st

    first = generate_uid()
    ingest(encoded(first), ctx, "SENDER")
    assert (row().instance_count, row().expected_instances, row().accession_hash) == (1, None, None)
    ingest(encoded(generate_uid(), AccessionNumber="ACC1", PatientID="P1", NumberOfStudyRelatedInstances=4),
           ctx, "SENDER")
    st = row()
    assert (st.instance_count, st.expected_instances) == (2, 4)
    assert (st.accession_hash, st.patient_id_hash) == (keyed_hash(cfg, "ACC1"), keyed_hash(cfg, "P1"))
    ingest(encoded(generate_uid()), ctx, "SENDER")  # carries none of them: they stay
    ingest(encoded(first, InstanceNumber=99), ctx, "SENDER")  # same instance, new content: not counted
    st = row()
    assert (st.instance_count, st.expected_instances) == (3, 4)
    assert (st.accession_hash, st.patient_id_hash) == (keyed_hash(cfg, "ACC1"), keyed_hash(cfg, "P1"))
