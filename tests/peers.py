"""Real peers for tests and benchmarks: Orthanc as the PACS, the node as a subprocess, DCMTK.

Every server binds a free port, is waited for with a deadline, and is stopped afterwards.
"""

from __future__ import annotations

import io
import json
import os
import random
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
#: Real chest radiographs (JPEG) in the shared folder beside the checkout.
CXR_SAMPLES = REPO.parent / "shared" / "data" / "cxr-samples"
T = TypeVar("T")


def _ephemeral_ports() -> range:
    """The ports the kernel gives outgoing connections (and bind to port 0) their local port from."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


#: Ports free_port() has handed out in this process: never handed out twice.
_given_ports: set[int] = set()
_port_picker = random.Random()


def free_port() -> int:
    """A loopback port that nothing holds now, for a server that a test starts next.

    Picked below the ephemeral range, because a port from bind(0) lies inside it: a client socket
    of any process can take it as its local port before the server binds it, and two calls can
    return the same port once the first is closed; either leaves a peer unable to bind (a CI run
    lost a module so: Orthanc exits with "port already in use"). Never the same port twice here.
    """
    ephemeral = _ephemeral_ports()
    low, high = 10000, ephemeral.start - 1
    if high - low < 1000:  # a kernel whose ephemeral range starts low: take ports above it instead
        low, high = ephemeral.stop, 65535
    for _ in range(1000):
        port = _port_picker.randint(low, high)
        if port in _given_ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # held by another process, or in TIME_WAIT
                continue
        _given_ports.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


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


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on the port (raises OSError if not)."""
    with socket.create_connection((host, port), timeout=1):
        return True


def wait_port(port: int, timeout: float = 30.0, host: str = "127.0.0.1") -> None:
    wait_for(lambda: port_open(port, host), timeout, f"port {port}")


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """A real Orthanc (Debian package) on free ports, with its REST API for checks.

    `allow_find` lets any AE C-FIND (for read-back); `dicomweb` loads the DICOMweb plugin
    (package orthanc-dicomweb) and serves STOW-RS/QIDO-RS under `dicomweb_url`; `modalities`
    (name -> (AE title, host, port)) are the peers it knows, e.g. where it sends Storage
    Commitment reports (Orthanc is a Storage Commitment SCP for the modalities it knows).
    """

    def __init__(self, workdir: Path, aet: str = "ORTHANC", *, allow_find: bool = False,
                 dicomweb: bool = False, modalities: dict[str, tuple[str, str, int]] | None = None) -> None:
        self.workdir = workdir
        self.aet = aet
        self.allow_find = allow_find
        self.dicomweb = dicomweb
        self.modalities = modalities or {}
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
            "DicomModalities": {name: list(m) for name, m in self.modalities.items()},
        }
        cfg_path = self.workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg))
        log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(["Orthanc", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT)
        _started(self, lambda: self.get("/system"), 30, "Orthanc REST API", self.workdir / "orthanc.log")
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

    def instance_bytes(self, sop_uid: str) -> bytes:
        """The stored file of the instance with this SOP Instance UID."""
        found = next(h["ID"] for h in self.lookup(sop_uid) if h["Type"] == "Instance")
        return self.get_bytes(f"/instances/{found}/file")

    def has_instance(self, sop_uid: str) -> bool:
        return any(h["Type"] == "Instance" for h in self.lookup(sop_uid))

    def stop(self, wait: bool = True) -> None:
        """SIGTERM; wait=False leaves its shutdown (2.5 s, most of it Orthanc's own pauses) to
        `reap()`: for a fixture's teardown, when nothing needs the port closed."""
        if self.proc is not None:
            _terminate(self.proc, 15, wait)

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def delete(self, path: str) -> None:
        """DELETE a resource through the REST API (e.g. /instances/ID: the PACS loses an object)."""
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method="DELETE")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return bytes(r.read())

    def find_study(self, study_uid: str) -> str | None:
        return next((h["ID"] for h in self.lookup(study_uid) if h["Type"] == "Study"), None)

    def study_series(self, study_uid: str) -> list[dict[str, Any]]:
        """Series of a study with their main tags and instance ids ([] if Orthanc lacks the study)."""
        sid = self.find_study(study_uid)
        if sid is None:
            return []
        return list(self.get(f"/studies/{sid}/series"))


@contextmanager
def orthanc(workdir: Path, **options: Any) -> Iterator[Orthanc]:
    """An Orthanc for a `with` block; told to stop at its end, its shutdown left to `reap()`."""
    server = Orthanc(workdir, **options).start()
    try:
        yield server
    finally:
        server.stop(wait=False)


def node_config(workdir: Path, bundle: Path, destinations: list[dict[str, Any]], **overrides: Any) -> Path:
    """Write a node config for tests: embedded mode, free port, everything under workdir."""
    port = free_port()
    cfg: dict[str, Any] = {
        "listener": {"ae_title": "PACSNODE", "host": "127.0.0.1", "port": port, "allowed_callers": "any"},
        "storage": {"path": str(workdir / "spool"), "min_free_mb": 10},
        "database": {"url": f"sqlite:///{workdir / 'pacsnode.db'}"},
        "completion": {"quiet_seconds": 0.5},
        "destinations": destinations,
        "export": {"calling_ae_title": "PACSNODE", "max_retries": 3, "backoff_seconds": 0.5},
        "pipelines": {"chest_xray": {"bundle": str(bundle), "device": "cpu"}},
        # `run` starts the HTTP API too: a free port, so that nodes of parallel tests do not collide.
        "api": {"port": free_port()},
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
        self.api_port = int(self.config.get("api", {}).get("port", 8040))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = config_path.parent / "node.log"
        self._config: Any = None

    def start(self, timeout: float = 120.0, *run_args: str) -> Node:
        """`pacsnode run [run_args]`; return once the listener's port accepts connections."""
        log = open(self.log_path, "ab")  # noqa: SIM115
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--config", str(self.config_path), "run", *run_args],
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True,
        )
        _started(self, lambda: port_open(self.port), timeout, f"the node's listener (port {self.port})", self.log_path)
        return self

    def stop(self, wait: bool = True) -> None:
        """SIGTERM to the node's process group; wait=False leaves its shutdown (3-4 s: each
        Celery worker's warm shutdown) to `reap()`, for a fixture's teardown."""
        if self.proc is not None:
            _stop_group(self.proc, wait=wait)

    def cli(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, cwd=REPO, check=True,
        )
        return out.stdout

    def jobs(self) -> list[dict[str, Any]]:
        """`pacsnode jobs --json`, run as an operator runs it."""
        return list(json.loads(self.cli("jobs", "--json")))

    def job_rows(self) -> list[dict[str, Any]]:
        """The jobs as `pacsnode jobs --json` lists them, read in this process with the command's
        own query (node.services.jobs.list_jobs, the command's default limit): milliseconds, where each run
        of the command costs a second of CPU, taken from the node it waits for on 2 cores."""
        from node.config import load_config
        from node.services.jobs import list_jobs

        if self._config is None:
            self._config = load_config(self.config_path)
        return list(list_jobs(self._config, limit=100).items)

    def wait_jobs(self, pick: Callable[[list[dict[str, Any]]], T | None], timeout: float, what: str) -> T:
        """Poll the jobs (`job_rows`) until pick() finds what it looks for (pick may assert, e.g.
        that nothing failed), then return what it finds in `pacsnode jobs --json`'s output."""
        wait_for(lambda: pick(self.job_rows()), timeout, what, interval=0.2)
        return wait_for(lambda: pick(self.jobs()), 60, f"{what} (in `pacsnode jobs --json`)", interval=0.5)

    def wait_done(self, study_uid: str, timeout: float, what: str) -> dict[str, Any]:
        """The study's finished job (its `pacsnode jobs --json` row); fails at once if one failed."""

        def done(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
            jobs = [j for j in rows if j["study_instance_uid"] == study_uid]
            assert not [j for j in jobs if j["state"] == "failed"], jobs
            return next((j for j in jobs if j["state"] == "done"), None)

        return self.wait_jobs(done, timeout, what)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def run_one_study(workdir: Path, bundle: Path, pacs: Orthanc, source: Path, version: str, timeout: float) -> dict[str, Any]:
    """`pacsnode run` with `bundle` (version pinned, on the CPU) sending to `pacs`: store
    `source`, wait until its study's job is done, stop the node. Returns the job's row."""
    cfg = node_config(workdir, bundle,
                      [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "timeout": 10}],
                      pipelines={"chest_xray": {"bundle": str(bundle), "device": "cpu", "version": version}})  # fmt: skip
    node = Node(cfg).start(timeout=120)
    try:
        assert storescu(node.port, source).returncode == 0
        import pydicom

        study_uid = str(pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID)
        return node.wait_done(study_uid, timeout, f"the job of {source.name}")
    finally:
        node.stop(wait=False)


def received_outputs(pacs: Orthanc, job: dict[str, Any], folder: Path) -> Iterator[tuple[str, Any]]:
    """Each result object of `job` as `pacs` stored it: (kind, dataset), after checking that it
    is in the job's study, names the job's model version and passes dciodvfy (file in folder)."""
    import pydicom

    for output in job["outputs"]:
        data = pacs.instance_bytes(output["sop_instance_uid"])
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.StudyInstanceUID == job["study_instance_uid"], output["kind"]
        assert ds.SoftwareVersions == job["model_version"], output["kind"]
        path = folder / f"{output['kind']}.dcm"
        path.write_bytes(data)
        assert not dciodvfy_errors(path), output["kind"]
        yield output["kind"], ds


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


def dciodvfy_errors(path: Path, timeout: float = 60) -> list[str]:
    """dciodvfy -new's Error lines for a file: empty when the object conforms."""
    out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=timeout)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


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


def synthetic_cr(out_dir: Path, count: int, size: int = 512, seed_name: str = "RG1_UNCR.dcm") -> list[Path]:
    """`count` small chest CRs, each its own study: RG1 downscaled to size x size with new UIDs.

    Load tests and benchmarks send many studies; 50 full RG1s (7 MB each) would measure disk and
    network rather than the job engine. The UIDs come from the output folder and index, so a
    re-run writes the same files.
    """
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from skimage.transform import resize

    seed = get_testdata_file(seed_name)
    if not isinstance(seed, str):
        raise FileNotFoundError(f"pydicom test file {seed_name} is not installed (pydicom-data)")
    src = pydicom.dcmread(seed)
    pixels = resize(src.pixel_array.astype(np.float32), (size, size), order=1, anti_aliasing=True,
                    preserve_range=True).astype(np.uint16)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = src.copy()
        ds.PixelData = pixels.tobytes()
        ds.Rows = ds.Columns = size
        study = generate_uid(entropy_srcs=[str(out_dir), str(i), "study"])
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study, "series"])
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[study, "sop"])
        ds.AccessionNumber = f"SYN{i:05d}"
        path = out_dir / f"cr{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` account when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


PG_BIN = Path("/usr/lib/postgresql/15/bin")


def have_postgres() -> bool:
    return (PG_BIN / "initdb").exists() and (os.geteuid() != 0 or have("runuser"))


class Postgres:
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth, fsync off)."""

    def __init__(self) -> None:
        import tempfile

        # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
        self.dir = Path(tempfile.mkdtemp(prefix="pacsnode-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Postgres:
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        subprocess.run(_as_postgres_user([str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres",
                                          "--auth=trust", "--no-sync", "-E", "UTF8"]),
                       check=True, capture_output=True, timeout=120)
        log = open(self.dir / "postgres.log", "wb")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            _as_postgres_user([str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port),
                               "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.dir}",
                               "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "max_connections=200"]),
            stdout=log, stderr=subprocess.STDOUT,
        )
        _started(self, self.ready, 60, "PostgreSQL", self.dir / "postgres.log")
        return self

    def ready(self) -> bool:
        import psycopg2

        try:
            self._connect("postgres").close()
        except psycopg2.OperationalError:  # "the database system is starting up"
            return False
        return True

    def _connect(self, dbname: str):  # type: ignore[no-untyped-def]
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=5)

    def create_database(self, name: str) -> str:
        """Create database `name`; return its SQLAlchemy URL."""
        conn = self._connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, 30)
        shutil.rmtree(self.dir, ignore_errors=True)



class Redis:
    """redis-server on a free loopback port without persistence: a restart loses every message."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 (closed with the process)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            stdout=log, stderr=subprocess.STDOUT,
        )
        _started(self, self.ping, 30, "redis-server", self.workdir / "redis.log")
        return self

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2).ping())
        except redis.RedisError:  # not listening yet (redis-py's errors are not OSErrors)
            return False

    def queue_length(self, queue: str) -> int:
        """Messages in a kombu queue: one Redis list per priority step ("queue", "queue<sep>N")."""
        import redis

        r = redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)
        keys = [k for k in r.scan_iter(match=f"{queue}*") if r.type(k) == b"list"]
        return sum(int(r.llen(k)) for k in keys)

    def kill(self) -> None:
        """SIGKILL: the data in memory is gone, as after a crash without persistence."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None:
            _terminate(self.proc, 15)



class ProductionNode:
    """Production mode as separate processes: `pacsnode listener` and any number of workers.

    Production's config names a PostgreSQL database and a Redis broker; the embedded default's
    SQLite and spool broker serve separate processes on one host too. Each process has its own
    log and its own session, so a test can kill -9 one worker and leave the rest running.
    """

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path
        self.config = yaml.safe_load(config_path.read_text())
        self.port = int(self.config["listener"]["port"])
        self.dir = config_path.parent
        self.listener: subprocess.Popen[bytes] | None = None
        self.workers: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"}
        return subprocess.Popen([sys.executable, "-m", "node.cli", "--config", str(self.config_path), *args],
                                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)

    def migrate(self) -> None:
        self.cli("db", "upgrade", timeout=120)

    def start_listener(self, timeout: float = 60.0) -> None:
        self.listener = self._spawn("listener", "listener")
        _answering(self.listener, lambda: port_open(self.port), timeout, f"the listener (port {self.port})",
                   self.dir / "listener.log")

    def start_worker(self, name: str, queue: str = "inference", ready_timeout: float = 120.0, *extra: str) -> None:
        """Start `pacsnode worker -Q queue -n name@%h [extra...]`; an inference worker is waited for
        until its model is loaded."""
        log_path = self.dir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        self.workers[name] = self._spawn(name, "worker", "-Q", queue, "-n", f"{name}@%h", *extra)
        if queue == "inference":
            def loaded() -> bool:
                proc = self.workers[name]
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {name} exited with {proc.returncode}: {self.log(name)[-3000:]}")
                return "pipeline chest_xray loaded" in log_path.read_text(errors="replace")[offset:]

            wait_for(loaded, ready_timeout, f"worker {name} to load its model", interval=0.2)

    def kill_worker(self, name: str) -> None:
        """kill -9 one worker process (no cleanup, no acknowledgement, no message restored)."""
        proc = self.workers.pop(name)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_worker(self, name: str) -> None:
        _stop_group(self.workers.pop(name))

    def stop(self, wait: bool = True) -> None:
        """SIGTERM to every process at once (each shuts down in parallel with the others), then
        wait for them all; wait=False leaves that to `reap()`."""
        procs = [p for p in (*self.workers.values(), self.listener) if p is not None and p.poll() is None]
        self.workers, self.listener = {}, None
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            if wait:
                _wait_or_kill(proc, 30, group=True)
            else:
                _stopping.append((proc, True))

    def cli(self, *args: str, timeout: float = 60) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "node.cli", "--config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout, cwd=REPO,
        )
        if out.returncode != 0:
            raise RuntimeError(f"pacsnode {' '.join(args)} exited {out.returncode}: {out.stderr[-3000:]}")
        return out.stdout

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


class PeerExited(RuntimeError):
    """A server a test started exited before it answered."""


def _answering(proc: subprocess.Popen[bytes], check: Callable[[], object], timeout: float, what: str,
               log: Path) -> None:
    """Wait until a started server answers `check`. One that exits first fails the wait at once,
    with the end of its log (not 30 s later with only "connection refused"); one that is still
    silent at the deadline fails with its log too."""

    def tail() -> str:
        return f"the end of {log}:\n" + (log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)")

    def answered() -> object:
        if proc.poll() is not None:
            raise PeerExited(f"{what} exited with code {proc.returncode} before it answered; {tail()}")
        return check()

    try:
        wait_for(answered, timeout, what)
    except TimeoutError as e:
        raise TimeoutError(f"{e}; {tail()}") from None


def _started(server: Orthanc | Postgres | Redis | Node, check: Callable[[], object], timeout: float, what: str,
             log: Path) -> None:
    """`_answering` for a server's own process; stop it if it does not answer, so a failed start
    leaves nothing running."""
    assert server.proc is not None, "start the process first"
    try:
        _answering(server.proc, check, timeout, what, log)
    except BaseException:
        server.stop()
        raise


#: Processes told to stop that nobody waited for (stop(wait=False)): `reap()` waits for them.
_stopping: list[tuple[subprocess.Popen[bytes], bool]] = []


def reap(timeout: float = 30) -> None:
    """Wait for every process told to stop without waiting (SIGKILL after `timeout`): the test
    session's last teardown calls it, so no peer outlives the session."""
    while _stopping:
        proc, group = _stopping.pop()
        _wait_or_kill(proc, timeout, group)


def _wait_or_kill(proc: subprocess.Popen[bytes], timeout: float, group: bool) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        if group:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            proc.kill()
        proc.wait(timeout=10)


def _terminate(proc: subprocess.Popen[bytes], timeout: float, wait: bool = True) -> None:
    """SIGTERM a server, SIGKILL it if it is still there after timeout (wait=False: `reap()`
    waits, and kills it then if need be)."""
    if proc.poll() is None:
        proc.terminate()
        if wait:
            _wait_or_kill(proc, timeout, group=False)
        else:
            _stopping.append((proc, False))


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 30, wait: bool = True) -> None:
    """SIGTERM a process group started with start_new_session, SIGKILL it after timeout
    (wait=False: `reap()` waits, and kills it then if need be)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        if wait:
            _wait_or_kill(proc, timeout, group=True)
        else:
            _stopping.append((proc, True))
