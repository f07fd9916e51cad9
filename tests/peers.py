"""Real peers for tests and benchmarks: Orthanc as the PACS, the node as a subprocess, DCMTK.

Every server binds a free port, is waited for with a deadline, and is stopped afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll check() until it returns something truthy, with a monotonic deadline."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError) as e:
            last_error = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})")


def wait_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    def check() -> bool:
        with socket.create_connection((host, port), timeout=1):
            return True

    wait_for(check, timeout, f"port {port}")


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """A real Orthanc (Debian package) on free ports, with its REST API for checks.

    `allow_find` lets any AE C-FIND (for read-back); `dicomweb` loads the DICOMweb plugin
    (package orthanc-dicomweb) and serves STOW-RS/QIDO-RS under `dicomweb_url`.
    """

    def __init__(self, workdir: Path, aet: str = "ORTHANC", *, allow_find: bool = False,
                 dicomweb: bool = False) -> None:
        self.workdir = workdir
        self.aet = aet
        self.allow_find = allow_find
        self.dicomweb = dicomweb
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "pacsnode-test-pacs",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowFind": self.allow_find,
            "Plugins": [str(DICOMWEB_PLUGIN)] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg))
        log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(["Orthanc", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.get("/system"), 30, "Orthanc REST API")
        if self.dicomweb and "dicom-web" not in self.get("/plugins"):
            self.stop()
            raise RuntimeError(f"Orthanc did not load {DICOMWEB_PLUGIN}; see {self.workdir / 'orthanc.log'}")
        return self

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc's /tools/lookup: the resources (Type, ID) that a DICOM UID names."""
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/tools/lookup", data=uid.encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return list(json.loads(r.read()))

    def has_instance(self, sop_uid: str) -> bool:
        return any(h["Type"] == "Instance" for h in self.lookup(sop_uid))

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return bytes(r.read())

    def find_study(self, study_uid: str) -> str | None:
        hits = [h for h in self.lookup(study_uid) if h["Type"] == "Study"]
        return hits[0]["ID"] if hits else None

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """Series of a study with their main tags and instance ids ([] if Orthanc lacks the study)."""
        sid = self.find_study(study_uid)
        if sid is None:
            return []
        return list(self.get(f"/studies/{sid}/series"))


@contextmanager
def orthanc(workdir: Path, **options: Any) -> Iterator[Orthanc]:
    server = Orthanc(workdir, **options).start()
    try:
        yield server
    finally:
        server.stop()


def node_config(workdir: Path, bundle: Path, destinations: list[dict[str, Any]], **overrides: Any) -> Path:
    """Write a node config for tests: embedded mode, free port, everything under workdir."""
    port = free_port()
    cfg: dict[str, Any] = {
        "listener": {"ae_title": "PACSNODE", "host": "127.0.0.1", "port": port},
        "storage": {"path": str(workdir / "spool"), "min_free_mb": 10},
        "database": {"url": f"sqlite:///{workdir / 'pacsnode.db'}"},
        "completion": {"quiet_seconds": 0.5},
        "destinations": destinations,
        "export": {"calling_ae_title": "PACSNODE", "max_retries": 3, "backoff_seconds": 0.5},
        "pipelines": {"chest_xray": {"bundle": str(bundle), "device": "cpu"}},
    }
    for key, value in overrides.items():
        cfg.setdefault(key, {})
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = workdir / "config.yaml"
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


class Node:
    """`pacsnode run` as a subprocess, as an operator would start it."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = yaml.safe_load(config_path.read_text())
        self.port = int(self.config["listener"]["port"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.parent / "node.log"

    def start(self, timeout: float = 120.0) -> Node:
        log = open(self.log_path, "ab")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--config", str(self.config_path), "run"],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
        )
        wait_port(self.port, timeout)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def cli(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, cwd=REPO, check=True,
        )
        return out.stdout

    def jobs(self) -> list[dict[str, Any]]:
        return list(json.loads(self.cli("jobs", "--json")))

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def node(config_path: Path) -> Iterator[Node]:
    n = Node(config_path).start()
    try:
        yield n
    finally:
        n.stop()


def storescu(port: int, *files: Path, aec: str = "PACSNODE", aet: str = "STORESCU", timeout: float = 60,
             extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu as the modality (TCP_NODELAY set, as DCMTK reads it from the environment).

    storescu proposes uncompressed syntaxes only unless told: pass e.g. extra=("-xv",) for
    JPEG 2000 lossless files so they travel as they are.
    """
    cmd = ["storescu", "-aec", aec, "-aet", aet, "-to", "30", "-ta", "30", "-td", "30", *extra,
           "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TCP_NODELAY": "1"})


def img2dcm(jpeg: Path, out: Path, *keys: str) -> Path:
    """Wrap a JPEG as a DICOM secondary capture with DCMTK's img2dcm (no recompression)."""
    cmd = ["img2dcm", "-k", "BodyPartExamined=CHEST", *[a for k in keys for a in ("-k", k)], str(jpeg), str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    return out


def have(*programs: str) -> bool:
    return all(shutil.which(p) for p in programs)


def make_pki(folder: Path) -> dict[str, Path]:
    """A throw-away CA plus a server (127.0.0.1) and a client certificate, made with openssl.

    Returns the paths: ca, server_cert, server_key, client_cert, client_key. Keys are unencrypted.
    """
    folder.mkdir(parents=True, exist_ok=True)

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60, cwd=folder)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=pacsnode test CA",
        "-keyout", "ca.key", "-out", "ca.crt", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        (folder / f"{name}.ext").write_text(ext + "\n")
        ssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=pacsnode test {name}",
            "-keyout", f"{name}.key", "-out", f"{name}.csr")
        ssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.crt", "-extfile", f"{name}.ext")
    return {"ca": folder / "ca.crt", "server_cert": folder / "server.crt", "server_key": folder / "server.key",
            "client_cert": folder / "client.crt", "client_key": folder / "client.key"}
