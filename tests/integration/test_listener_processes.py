"""`listener.processes: 2` as it runs: `pacsnode listener` with a further process, pynetdicom as
the sender, the database and /proc as the witnesses.

The first process serves one association and hands the next to the idle one; a study the
further process receives is not completed while its association is open (the first process
runs the completion pass from the further one's reports) and is completed once it is released;
a further process killed with SIGKILL takes only its own association with it, its studies'
quiet time starts, and it is started again; killing the first process ends the others.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import ssl
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pydicom
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]

from tests.peers import ProductionNode, free_port, have, make_pki, storescu, synthetic_cr, wait_for

pytestmark = pytest.mark.timeout(180)

QUIET = 1.0  # completion.quiet_seconds: a released study is complete this long after its last instance


def further_pids(parent: int) -> list[int]:
    """Live `pacsnode listener-process` children of `parent` (zombies excluded)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status, cmd = (d / "status").read_text(), (d / "cmdline").read_bytes()
        except OSError:
            continue
        if b"listener-process" in cmd and f"\nPPid:\t{parent}\n" in status and "\nState:\tZ" not in status:
            found.append(int(d.name))
    return found


def alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _start(tmp_path: Path, log_level: str = "INFO", **listener: object) -> ProductionNode:
    cfg = {
        "logging": {"level": log_level},
        "listener": {"ae_title": "PACSNODE", "host": "127.0.0.1", "port": free_port(), "allowed_callers": "any",
                     "processes": 2, **listener},
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 10},
        "database": {"url": f"sqlite:///{tmp_path / 'pacsnode.db'}"},
        "completion": {"quiet_seconds": QUIET, "open_quiet_seconds": 60, "poll_seconds": 0.1},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    n = ProductionNode(path)
    n.migrate()
    n.start_listener()
    return n


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ProductionNode]:
    n = _start(tmp_path)
    try:
        yield n
    finally:
        n.stop()


def _state(node: ProductionNode, study_uid: str) -> str | None:
    with sqlite3.connect(node.dir / "pacsnode.db", timeout=10) as db:
        row = db.execute("SELECT state FROM study WHERE study_instance_uid = ?", (study_uid,)).fetchone()
    return row[0] if row else None


def _associate(node: ProductionNode, tls: ssl.SSLContext | None = None) -> Association:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.acse_timeout = ae.dimse_timeout = 10
    ae.network_timeout = 60  # A stays idle while the others come and go
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE", tls_args=(tls, None) if tls else None)  # type: ignore[arg-type]  # no hostname: check_hostname is off
    assert assoc.is_established
    return assoc


def _store(assoc: Association, ds: pydicom.Dataset) -> int:
    """The C-STORE status, or -1 when the association is gone."""
    try:
        status = assoc.send_c_store(ds)
    except RuntimeError:  # pynetdicom: the association is no longer established
        return -1
    return int(status.Status) if "Status" in status else -1


def _closed(assoc: Association) -> bool | None:
    return not assoc.is_established or None


def _complete(node: ProductionNode, study_uid: str) -> bool | None:
    return _state(node, study_uid) != "RECEIVING" or None


def _another(ds: pydicom.Dataset) -> pydicom.Dataset:
    """One more instance of ds's study and series."""
    copy = ds.copy()
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return copy


def test_a_further_listener_process_serves_reports_and_is_restarted(node: ProductionNode, tmp_path: Path) -> None:
    assert node.listener is not None
    first = node.listener.pid
    child = wait_for(lambda: next(iter(further_pids(first)), None), 60, "the further listener process")
    s1, s2, s3, s4, s5 = (pydicom.dcmread(p) for p in synthetic_cr(tmp_path / "in", 5, size=64))

    # Two at once: the second goes to whichever process has fewer open connections, so they are
    # served by different processes (the first keeps one when both are idle).
    a = _associate(node)
    assert _store(a, s1) == 0
    b = _associate(node)
    assert _store(b, s2) == 0

    # One of them is open in the further process: the first process's completion pass must know
    # it, or its study would be complete after QUIET seconds.
    time.sleep(QUIET + 1.5)
    assert _state(node, s1.StudyInstanceUID) == "RECEIVING"
    assert _state(node, s2.StudyInstanceUID) == "RECEIVING"
    b.release()
    wait_for(partial(_complete, node, s2.StudyInstanceUID), 15, "S2 complete after its release")
    assert _state(node, s1.StudyInstanceUID) == "RECEIVING"  # A is still open

    c, d = _associate(node), _associate(node)  # with A: three open, spread over both processes
    assert _store(c, s3) == 0
    assert _store(d, s4) == 0
    os.kill(child, signal.SIGKILL)
    wait_for(lambda: not alive(child) or None, 10, "the further process to die")
    # Only the further process's associations are lost (nothing unacknowledged was kept); the
    # first process's go on.
    open_now = {"A": (a, s1), "C": (c, s3), "D": (d, s4)}
    lost = {name for name, (assoc, ds) in open_now.items() if _store(assoc, _another(ds)) != 0}
    assert lost and lost != set(open_now), lost
    for name in lost:
        assoc, ds = open_now[name]
        wait_for(partial(_closed, assoc), 10, f"{name} to be closed")
        # Its association ended with the process: its quiet time runs, and it completes.
        wait_for(partial(_complete, node, ds.StudyInstanceUID), 15, f"the study of {name} complete after the kill")
    for name in set(open_now) - lost:
        assert _state(node, open_now[name][1].StudyInstanceUID) == "RECEIVING"  # still open

    restarted = wait_for(lambda: [p for p in further_pids(first) if p != child] or None, 60,
                         "the further listener process started again")[0]
    # ...said in the log, the audit trail and the metrics.
    assert f"listener process 2 (pid {child}) ended with -9 while the listener runs" in node.log("listener")
    with sqlite3.connect(node.dir / "pacsnode.db", timeout=10) as db:
        (ended,) = db.execute("SELECT count(*) FROM event WHERE kind = 'listener_process_ended'").fetchone()
    assert ended == 1
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(node.dir / "var" / "metrics"))
    assert registry.get_sample_value("pacsnode_listener_process_restarts_total") == 1
    e = _associate(node)
    assert _store(e, s5) == 0
    e.release()
    for name in set(open_now) - lost:
        open_now[name][0].release()
    # The five studies' first instances and a second one over each association that survived;
    # nothing sent as the process was killed.
    assert _count(node) == 5 + len(set(open_now) - lost)

    # The first process killed: the further one reads the end of its socket and stops.
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(restarted) or None, 20, "the further process to stop with the first")


def _count(node: ProductionNode) -> int:
    with sqlite3.connect(node.dir / "pacsnode.db", timeout=10) as db:
        return int(db.execute("SELECT count(*) FROM instance").fetchone()[0])


@pytest.mark.skipif(not have("storescu", "openssl"), reason="DCMTK storescu or openssl not installed")
def test_a_handed_over_tls_connection_is_verified_by_the_further_process(tmp_path: Path) -> None:
    """The first process hands the connection over before the TLS handshake: the further one
    negotiates TLS and checks the client's certificate as the first would."""
    pki = make_pki(tmp_path / "pki")
    node = _start(tmp_path, log_level="DEBUG", tls={"certificate": str(pki["server_cert"]), "private_key": str(pki["server_key"]),
                                 "ca_certificates": str(pki["ca"]), "require_client_cert": True})
    try:
        assert node.listener is not None
        wait_for(lambda: further_pids(node.listener.pid) if node.listener else None, 60, "the further listener process")
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        client.check_hostname = False
        client.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
        (first,) = (pydicom.dcmread(p) for p in synthetic_cr(tmp_path / "in", 1, size=64))
        a = _associate(node, client)  # keeps the first process busy: what follows is handed over
        assert _store(a, first) == 0
        tls = ("+tls", str(pki["client_key"]), str(pki["client_cert"]), "-pw", "+cf", str(pki["ca"]))
        out = storescu(node.port, *synthetic_cr(tmp_path / "more", 2, size=64), extra=tls)
        assert out.returncode == 0, out.stderr
        assert _count(node) == 3
        assert "connection handed to listener process 2" in node.log("listener")
        # Without a certificate, or in plain TCP, the further process refuses it as the first does.
        refused = synthetic_cr(tmp_path / "refused", 1, size=64)
        assert storescu(node.port, *refused, extra=("+tla", "+cf", str(pki["ca"]))).returncode != 0
        assert storescu(node.port, *refused).returncode != 0
        assert _count(node) == 3
        a.release()
    finally:
        node.stop()
