"""Security at the edge: deny by default, called AE title, DICOM TLS, no patient identity in logs.

Every check goes through a real association (pynetdicom SCU or DCMTK storescu) on loopback.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from node.cli import db_upgrade
from node.completion import CompletionService
from node.config import Config, ConfigError, parse_config
from node.db.models import Event, Instance
from node.db.session import session_scope
from node.listener import admission
from tests.peers import free_port, have, make_pki, storescu, wait_for

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))


def _config(tmp_path: Path, **listener: Any) -> Config:
    cfg = parse_config({
        "listener": {"host": "127.0.0.1", "port": free_port(), "timeouts": {"acse": 5, "dimse": 5, "network": 5},
                     "allowed_callers": "any", **listener},
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "completion": {"quiet_seconds": 0},
    })
    db_upgrade(cfg)
    return cfg


def _associate(cfg: Config, aet: str, aec: str = "PACSNODE") -> Any:
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", cfg.listener.port, ae_title=aec)


def _rejections(cfg: Config) -> list[Event]:
    with session_scope(cfg.database.url) as s:
        return list(s.scalars(select(Event).where(Event.kind == "association_rejected")))


CALLERS = [{"ae_title": "MODALITY", "hosts": ["127.0.0.1"]}, {"ae_title": "ROUTER"},
           {"ae_title": "FARAWAY", "hosts": ["10.0.0.0/8"]}]


@pytest.mark.parametrize(
    ("calling", "called", "address", "diagnostic"),
    [
        ("MODALITY", "PACSNODE", "127.0.0.1", None),
        ("ROUTER", "PACSNODE", "192.168.1.9", None),  # no hosts listed: any address
        ("FARAWAY", "PACSNODE", "10.2.3.4", None),  # inside the network
        ("FARAWAY", "PACSNODE", "127.0.0.1", 0x03),
        ("MODALITY", "PACSNODE", "127.0.0.2", 0x03),
        ("STRANGER", "PACSNODE", "127.0.0.1", 0x03),
        ("MODALITY", "OTHERNODE", "127.0.0.1", 0x07),
    ],
)
def test_admission(tmp_path: Path, calling: str, called: str, address: str, diagnostic: int | None) -> None:
    lc = parse_config({"listener": {"allowed_callers": CALLERS}}).listener
    verdict = admission(lc, calling.ljust(16), called.ljust(16), address)
    assert (verdict[0] if verdict else None) == diagnostic


def test_bad_caller_hosts_fail_at_start() -> None:
    with pytest.raises(ConfigError, match=r"allowed_callers\.0\.hosts: .*'pacs\.example' is not an IP address"):
        parse_config({"listener": {"allowed_callers": [{"ae_title": "A", "hosts": ["pacs.example"]}]}})


def test_strangers_get_an_associate_rj_and_are_counted(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path, allowed_callers=CALLERS)
    serve(cfg)
    ok = _associate(cfg, "MODALITY")
    assert ok.is_established
    ok.release()
    for aet, aec, diagnostic in (("STRANGER", "PACSNODE", 0x03), ("FARAWAY", "PACSNODE", 0x03),
                                 ("MODALITY", "NOTUS", 0x07)):
        assoc = _associate(cfg, aet, aec)
        assert assoc.is_rejected, aet
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, diagnostic)
    events = _rejections(cfg)
    assert [e.actor for e in events] == ["STRANGER", "FARAWAY", "MODALITY"]
    assert "may not connect from 127.0.0.1" in (events[1].detail or "")
    assert "called AE title 'NOTUS' is not ours" in (events[2].detail or "")


@pytest.mark.skipif(not have("storescu"), reason="DCMTK storescu not installed")
def test_storescu_stranger_is_rejected_and_stores_nothing(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path, allowed_callers=CALLERS)
    serve(cfg)
    out = storescu(cfg.listener.port, RG1, aet="STRANGER")
    assert out.returncode != 0
    assert "Association Rejected" in out.stderr
    assert storescu(cfg.listener.port, RG1, aet="MODALITY").returncode == 0
    with session_scope(cfg.database.url) as s:
        assert len(s.scalars(select(Instance)).all()) == 1
    assert len(_rejections(cfg)) == 1


def test_association_limit_is_an_rj_and_counted(tmp_path: Path, serve: Any) -> None:
    cfg = _config(tmp_path, max_associations=1)
    serve(cfg)
    first = _associate(cfg, "ONE")
    assert first.is_established
    try:
        second = _associate(cfg, "TWO")
        assert second.is_rejected
        rj = second.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # local limit exceeded
    finally:
        first.release()
    # The slot is the listener's association thread, which ends shortly after the release's reply
    # has gone out (pynetdicom counts live threads); until then a new caller is refused as TWO was.
    wait_for(lambda: not any(isinstance(t, Association) and t.is_acceptor and t.acceptor.port == cfg.listener.port
                             for t in threading.enumerate()), 10, "the first association's thread to end")
    third = _associate(cfg, "THREE")  # the slot is free again
    assert third.is_established
    third.release()
    # pynetdicom records its own refusals after the A-ASSOCIATE-RJ has gone out: wait for the row.
    assert [e.actor for e in wait_for(lambda: _rejections(cfg), 5, "the rejection event")] == ["TWO"]


@pytest.mark.skipif(not have("storescu", "openssl"), reason="DCMTK storescu or openssl not installed")
def test_tls_storescu_with_client_certificate(tmp_path: Path, serve: Any) -> None:
    pki = make_pki(tmp_path / "pki")
    cfg = _config(tmp_path, tls={"certificate": str(pki["server_cert"]), "private_key": str(pki["server_key"]),
                                 "ca_certificates": str(pki["ca"]), "require_client_cert": True})
    serve(cfg)
    port = cfg.listener.port
    tls = ("+tls", str(pki["client_key"]), str(pki["client_cert"]), "-pw", "+cf", str(pki["ca"]))
    out = storescu(port, RG1, extra=tls)
    assert out.returncode == 0, out.stderr
    with session_scope(cfg.database.url) as s:
        assert len(s.scalars(select(Instance)).all()) == 1
    # No certificate (anonymous TLS) and plain TCP are both refused before any DICOM is spoken.
    assert storescu(port, RG1, extra=("+tla", "+cf", str(pki["ca"]))).returncode != 0
    assert storescu(port, RG1).returncode != 0
    # A client that does not trust our CA refuses us too (it verifies the server).
    other = make_pki(tmp_path / "other")
    assert storescu(port, RG1, extra=("+tls", str(pki["client_key"]), str(pki["client_cert"]), "-pw",
                                      "+cf", str(other["ca"]))).returncode != 0
    with session_scope(cfg.database.url) as s:
        assert len(s.scalars(select(Instance)).all()) == 1


def test_tls_files_that_do_not_load_fail_at_start(tmp_path: Path) -> None:
    from node.listener import server_ssl_context

    (tmp_path / "empty.pem").write_text("")
    lc = parse_config({"listener": {"tls": {"certificate": str(tmp_path / "empty.pem"),
                                            "private_key": str(tmp_path / "empty.pem")}}}).listener
    with pytest.raises(ValueError, match="listener.tls: cannot load certificates"):
        server_ssl_context(lc)
    with pytest.raises(ConfigError, match="require_client_cert needs ca_certificates"):
        parse_config({"listener": {"tls": {"certificate": "c", "private_key": "k", "require_client_cert": True}}})


def test_no_patient_identity_in_logs_at_info(tmp_path: Path, serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path)
    ctx = serve(cfg)
    ds = pydicom.dcmread(RG1)
    ds.PatientName = "Secretname^Johanna"
    ds.PatientID = "PID-7734-SECRET"
    ds.PatientBirthDate = "19230417"
    sent = tmp_path / "phi.dcm"
    ds.save_as(sent)
    caplog.set_level(logging.INFO)
    assert storescu(cfg.listener.port, sent, aet="MODALITY").returncode == 0
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesDescription = "changed"
    ds.save_as(sent)
    assert storescu(cfg.listener.port, sent, aet="MODALITY").returncode == 0
    ds.StudyInstanceUID = "1.2.abc"  # refused: the refusal is logged too
    ds.save_as(sent)
    storescu(cfg.listener.port, sent, aet="MODALITY")
    service = CompletionService(cfg, ctx.tracker)
    service.tick()  # quiet time 0: the study completes now
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert "complete by rule" in text  # the capture did see the node's INFO lines
    for secret in ("Secretname", "Johanna", "PID-7734", "19230417"):
        assert secret not in text


def test_null_allowed_callers_is_refused_with_the_key_named() -> None:
    with pytest.raises(ConfigError, match=r"listener\.allowed_callers: .*null is not allowed.*'any'"):
        parse_config({"listener": {"allowed_callers": None}})


def test_no_allowed_callers_denies_everyone() -> None:
    lc = parse_config({}).listener
    verdict = admission(lc, "MODALITY".ljust(16), "PACSNODE".ljust(16), "127.0.0.1")
    assert verdict is not None and verdict[0] == 0x03


def test_any_admits_every_caller_and_says_so_at_start(caplog: pytest.LogCaptureFixture) -> None:
    from node.listener import build_ae

    cfg = parse_config({"listener": {"allowed_callers": "any"}})
    assert admission(cfg.listener, "WHOEVER".ljust(16), "PACSNODE".ljust(16), "10.1.2.3") is None
    with caplog.at_level(logging.WARNING, logger="node.listener"):
        build_ae(cfg)
    assert "allowed_callers is 'any'" in caplog.text
