"""Ingest benchmark: the same files, sent with DCMTK storescu in one association per run, to our
listener and to reference receivers measured in the same run.

Receivers (each run visits them in turn, so all see the same machine load):
- pacsnode: `pacsnode listener` as a subprocess on the normal path: each instance streamed into
  the spool, its file and folder fsync'd and its SQLite row committed before the success status.
- DCMTK storescp: writes each file into a folder (no fsync).
- Orthanc (durable): storage area on disk with SyncStorageArea (fsync of each stored file,
  Orthanc >= 1.7.4) and its SQLite index; it does not document an fsync of the folder.
- pynetdicom no-op, stock and with node/dimse.py's reactor: our listener's AE and a C-STORE
  handler that stores nothing, i.e. what pynetdicom itself costs per message.
- durable write floor: no DICOM, no receiver; the same bytes written to new files, each file and
  its folder fsync'd and a row committed to SQLite (WAL, synchronous=FULL) per instance. With
  the no-op it bounds what any durable receiver on pynetdicom can reach (printed as "bound").
- pynetdicom minimal durable: the least a receiver that meets the target's conditions can do on
  our reactor, in Python: each data set written to a new file, file and folder fsync'd, its UIDs
  read (pydicom, header only) and one row committed (sqlite3, the node's settings) before the
  success status. No check of the values, no routing record, no ORM: a same-run estimate of the
  best any pynetdicom receiver in Python reaches with the work the target asks for.

Workloads: `small`, N copies of a 128 x 128 CR (about 39 KB, new UIDs each) plus RG1_UNCR.dcm,
where per-message cost dominates; `cxr`, N copies of RG1_UNCR.dcm (a real 1955 x 1841 chest
radiograph, 7 MB), the node's actual input. Prints instances/second of every receiver with the
spread over runs, each ratio against its target (pacsnode/storescp >= 0.6 on cxr and 0.3 on
small; pacsnode/Orthanc >= 1.5 on both), and the listener's peak RSS (target < 300 MB).

    python bench/ingest.py [--workload small|cxr|both] [--copies 200] [--cxr-copies 30] [--runs 3] [--study-each]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests.peers import free_port, storescu, wait_for, wait_port  # noqa: E402

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
TARGETS = {("storescp", "cxr"): 0.6, ("storescp", "small"): 0.3, ("orthanc", "cxr"): 1.5, ("orthanc", "small"): 1.5}
LISTENER_RSS_TARGET_MB = 300


def make_files(folder: Path, copies: int, workload: str, study_each: bool = False) -> list[Path]:
    """`small`: copies of a 128 x 128 CR (39 KB) plus RG1; `cxr`: copies of RG1 itself (full-size
    chest radiographs, 7 MB). One study, new instance UIDs for every copy; with `study_each`, a
    new study and series for every copy too (a stream of chest radiographs, one per study)."""
    src = pydicom.dcmread(RG1)
    if workload == "small":
        small = src.pixel_array[::14, ::14][:128, :128].astype(np.uint16)
        src.Rows, src.Columns = small.shape
        src.PixelData = small.tobytes()
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(copies):
        if study_each:
            study, series = generate_uid(), generate_uid()
        src.StudyInstanceUID, src.SeriesInstanceUID = study, series
        src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        src.InstanceNumber = i + 1
        path = folder / f"{workload}{i:04d}.dcm"
        src.save_as(path, enforce_file_format=True)
        files.append(path)
    if workload == "small":
        files.append(RG1)
    return files


def timed_send(port: int, aec: str, files: list[Path], associations: int = 1) -> float:
    """Seconds to send the files with storescu: one association, or that many at once (one
    storescu each, the files dealt out in turn)."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(associations) as pool:
        outs = list(pool.map(lambda share: storescu(port, *share, aec=aec, timeout=600),
                             [files[i::associations] for i in range(associations)]))
    elapsed = time.perf_counter() - t0
    for out in outs:
        if out.returncode != 0:
            raise RuntimeError(f"storescu to {aec} exited with {out.returncode}: {(out.stdout + out.stderr)[-2000:]}")
    return elapsed


def _peak_rss_mb(pid: int) -> float:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmHWM"].split()[0]) / 1024


def _time_receiver(proc: subprocess.Popen[bytes], port: int, aec: str, files: list[Path], startup: float,
                   ready: Callable[[], object] | None = None, rss: list[float] | None = None,
                   associations: int = 1) -> float:
    """Wait for a started receiver, time sending the files to it, stop it."""
    try:
        wait_port(port, startup)
        if ready is not None:
            wait_for(ready, startup, f"{aec} to be ready")
        elapsed = timed_send(port, aec, files, associations)
        if rss is not None:  # the largest of the receiver's processes
            rss.append(max(_peak_rss_mb(pid) for pid in (proc.pid, *_children(proc.pid))))
        return elapsed
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def run_node(work: Path, files: list[Path], rss: list[float], associations: int = 1, processes: int = 1) -> float:
    port = free_port()
    cfg = work / "config.yaml"
    cfg.write_text(
        f"listener: {{ae_title: PACSNODE, host: 127.0.0.1, port: {port}, max_pdu: 0, allowed_callers: any, "
        f"processes: {processes}}}\n"
        f"storage: {{path: {work / 'spool'}, min_free_mb: 10}}\n"
        f"database: {{url: 'sqlite:///{work / 'pacsnode.db'}'}}\n"
        # No study completes during the run: this measures ingestion only.
        "completion: {quiet_seconds: 3600, max_wait_seconds: 7200}\n"
        "logging: {level: WARNING}\n"
    )
    cli = [sys.executable, "-m", "node.cli", "--config", str(cfg)]
    subprocess.run([*cli, "db", "upgrade"], check=True, cwd=REPO, capture_output=True, timeout=120)
    proc = subprocess.Popen([*cli, "listener"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(work / "listener.log", "wb"))  # noqa: SIM115
    try:
        if processes > 1:
            wait_for(lambda: _started_children(proc.pid, processes - 1), 60, "the further listener processes")
        return _time_receiver(proc, port, "PACSNODE", files, startup=60, rss=rss, associations=associations)
    except RuntimeError as e:
        raise RuntimeError(f"{e}\nlistener log:\n{(work / 'listener.log').read_text()[-3000:]}") from e


def _children(pid: int) -> dict[int, int]:
    """The processes `pid` started, with their CPU time so far (clock ticks)."""
    ticks = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            ticks[int(d.name)] = int(fields[11]) + int(fields[12])
    return ticks


def _started_children(pid: int, count: int) -> bool:
    """Whether `count` processes started by `pid` exist and have stopped using CPU (start-up over)."""
    before = _children(pid)
    time.sleep(0.5)
    return len(before) >= count and _children(pid) == before


def noop_scp(config_path: Path, reactor: str) -> None:
    """Serve C-STORE with our listener's AE and a handler that stores nothing, on pynetdicom's
    stock reactor or on node/dimse.py's (data sets kept in memory: no sink)."""
    import threading

    from pynetdicom import evt

    from node.config import load_config
    from node.dimse import serve, tune_connection
    from node.listener import build_ae

    config = load_config(config_path)
    ae = build_ae(config)
    ae.require_calling_aet = []
    handlers = [(evt.EVT_CONN_OPEN, tune_connection), (evt.EVT_C_STORE, lambda _: 0)]
    address = ("127.0.0.1", config.listener.port)
    if reactor == "stock":
        ae.start_server(address, block=True, evt_handlers=handlers)
    else:
        serve(ae, address, handlers, None)
        threading.Event().wait()


def _durable_db(path: Path, columns: str, same_thread: bool = True) -> sqlite3.Connection:
    """An SQLite database with the node's settings (WAL, synchronous=FULL) and a table `instance`."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=same_thread)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(f"CREATE TABLE instance (id INTEGER PRIMARY KEY, {columns})")
    return db


def _write_durably(folder: Path, dir_fd: int, name: str, data: bytes) -> None:
    """data into the new file folder/name, then that file's and its folder's fsync, one after the
    other (on threads, beside the parse and the INSERT, they were no faster here: five
    interleaved pairs, 200 small instances, 3.1-3.7 ms an instance serial, 3.4-3.8 overlapped)."""
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.fsync(dir_fd)


def minimal_scp(config_path: Path) -> None:
    """Serve C-STORE on node/dimse.py's reactor with the least durable work (module docstring)."""
    import threading
    from io import BytesIO

    from pynetdicom import evt
    from pynetdicom.dimse_primitives import C_STORE

    from node.config import load_config
    from node.dimse import file_meta_bytes, serve, tune_connection
    from node.listener import build_ae

    config = load_config(config_path)
    folder = config.storage.path
    folder.mkdir(parents=True)
    db = _durable_db(folder / "minimal.db", "sop TEXT UNIQUE, series TEXT, study TEXT, path TEXT", same_thread=False)
    dir_fd = os.open(folder, os.O_RDONLY)
    count = itertools.count()
    uids = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]

    def store(event: evt.Event) -> int:
        # As encoded_dataset() with its file meta, written the node's quicker way (node/dimse.py).
        req = cast(C_STORE, event.request)
        data = b"".join((b"\0" * 128, b"DICM", file_meta_bytes(req.AffectedSOPClassUID, req.AffectedSOPInstanceUID,
                                                                event.context.transfer_syntax),
                         cast(BytesIO, req.DataSet).getvalue()))
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=uids)
        name = f"{next(count)}.dcm"
        _write_durably(folder, dir_fd, name, data)
        db.execute("BEGIN")
        db.execute("INSERT INTO instance (sop, series, study, path) VALUES (?, ?, ?, ?)",
                   (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, name))
        db.execute("COMMIT")
        return 0

    ae = build_ae(config)
    ae.require_calling_aet = []
    serve(ae, ("127.0.0.1", config.listener.port), [(evt.EVT_CONN_OPEN, tune_connection), (evt.EVT_C_STORE, store)], None)
    threading.Event().wait()


def run_pynetdicom(work: Path, files: list[Path], kind: str) -> float:
    """Time one of the pynetdicom receivers of this module (kind: stock, dimse or minimal)."""
    port = free_port()
    cfg = work / "config.yaml"
    cfg.write_text(f"listener: {{ae_title: PACSNODE, host: 127.0.0.1, port: {port}, max_pdu: 0, allowed_callers: any}}\n"
                   f"storage: {{path: {work / 'spool'}}}\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, __file__, "--pynetdicom-scp", str(cfg), "--pynetdicom-kind", kind], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return _time_receiver(proc, port, "PACSNODE", files, startup=60)


def durable_floor(work: Path, files: list[Path]) -> float:
    """Seconds the durability the targets ask for costs alone, for all files: each file's bytes
    (already in memory) written to a new file, that file and its folder fsync'd, and one row
    committed to SQLite with the node's settings (WAL, synchronous=FULL), as bare syscalls and
    sqlite3 calls. No receiver can acknowledge durably faster than its DICOM layer plus this."""
    data = [f.read_bytes() for f in files]
    folder = work / "floor"
    folder.mkdir()
    db = _durable_db(work / "floor.db", "path TEXT UNIQUE, size INTEGER")
    dir_fd = os.open(folder, os.O_RDONLY)
    t0 = time.perf_counter()
    try:
        for i, payload in enumerate(data):
            _write_durably(folder, dir_fd, f"{i}.dcm", payload)
            db.execute("BEGIN")
            db.execute("INSERT INTO instance (path, size) VALUES (?, ?)", (f"{i}.dcm", len(payload)))
            db.execute("COMMIT")
        return time.perf_counter() - t0
    finally:
        os.close(dir_fd)
        db.close()


def run_storescp(work: Path, files: list[Path], associations: int = 1) -> float:
    """storescp; for several associations at once with --fork (a process each), as otherwise it
    serves them one after the other."""
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    fork = ["--fork"] if associations > 1 else []
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), "-pm", *fork, str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return _time_receiver(proc, port, "STORESCP", files, startup=30, associations=associations)


ORTHANC_DURABILITY = "SyncStorageArea: fsync of each stored file; SQLite index; folder not fsync'd"


def run_orthanc(work: Path, files: list[Path], associations: int = 1) -> float:
    import urllib.request

    dicom_port, http_port = free_port(), free_port()
    config = {"Name": "ingest-bench", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
              "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": True,
              "SyncStorageArea": True, "StorageCompression": False, "Plugins": []}
    (work / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")], stdout=subprocess.DEVNULL,
                            stderr=open(work / "orthanc.log", "wb"))  # noqa: SIM115

    def rest() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=2) as r:
            return r.status == 200

    return _time_receiver(proc, dicom_port, "ORTHANC", files, startup=60, ready=rest, associations=associations)


def _rate(n: int, times: list[float]) -> str:
    ips = [n / t for t in times]
    return (f"{statistics.median(ips):6.1f} instances/s  (runs {', '.join(f'{v:.1f}' for v in ips)}; "
            f"spread {min(ips):.1f}-{max(ips):.1f})")


def _interleaved(base: Path, workload: str, receivers: dict[str, Callable[[Path, list[Path]], float]],
                 files: list[Path], runs: int) -> dict[str, list[float]]:
    """Each receiver's seconds per run, the receivers taking turns within each run (all see the
    same machine load), each into a folder of its own."""
    times: dict[str, list[float]] = {name: [] for name in receivers}
    # What a receiver wrote is removed only once every run is over: ext4 makes each new file
    # skip the inodes freed in the last minute or more (`recently_deleted()`), which cost the next
    # receiver 1.2 ms of kernel CPU per file here (measured with perf) after a clean-up, 0.04 ms
    # without one; a receiver runs on a file system as it is in service, not just after a purge.
    for run in range(runs):
        for name, receive in receivers.items():
            work = base / f"{workload}-{name}{run}"
            work.mkdir()
            times[name].append(receive(work, files))
    for name, run in ((name, run) for name in receivers for run in range(runs)):
        shutil.rmtree(base / f"{workload}-{name}{run}", ignore_errors=True)
    return times


def compare(base: Path, workload: str, copies: int, runs: int, study_each: bool = False) -> dict[str, float]:
    """Time every receiver on one workload (interleaved runs); print rates and ratios."""
    (base / workload).mkdir()
    files = make_files(base / workload, copies, workload, study_each)
    rss: list[float] = []  # the listener's peak RSS per run
    receivers: dict[str, Callable[[Path, list[Path]], float]] = {
        "pacsnode": lambda w, f: run_node(w, f, rss),
        "storescp": run_storescp,
        "orthanc": run_orthanc,
        "noop-stock": lambda w, f: run_pynetdicom(w, f, "stock"),
        "noop-dimse": lambda w, f: run_pynetdicom(w, f, "dimse"),
        "floor": durable_floor,
        "minimal": lambda w, f: run_pynetdicom(w, f, "minimal"),
    }
    labels = {"pacsnode": "pacsnode listener (durable)", "storescp": "DCMTK storescp (no fsync)",
              "orthanc": "Orthanc (durable)", "noop-stock": "pynetdicom no-op, stock reactor",
              "noop-dimse": "pynetdicom no-op, node/dimse.py", "floor": "durable write floor (no DICOM)",
              "minimal": "pynetdicom minimal durable"}
    times = _interleaved(base, workload, receivers, files, runs)
    n, mb = len(files), sum(f.stat().st_size for f in files) / 2**20
    studies = "a study each" if study_each else "one study"
    print(f"[{workload}] {n} instances, {mb:.0f} MB, {studies}, one association per run, {runs} runs")
    for name, label in labels.items():
        print(f"  {label:34s} {_rate(n, times[name])}")
    rate = {name: statistics.median(n / t for t in ts) for name, ts in times.items()}
    ratios = {}
    for ref in ("storescp", "orthanc"):
        ratio = ratios[ref] = rate["pacsnode"] / rate[ref]
        per_run = [t_ref / t_ours for t_ours, t_ref in zip(times["pacsnode"], times[ref], strict=True)]
        target = TARGETS[(ref, workload)]
        print(f"  ratio pacsnode/{ref}: {ratio:.2f} (runs {min(per_run):.2f}-{max(per_run):.2f}; target >= {target}) "
              f"{'OK' if ratio >= target else 'BELOW TARGET'}")
    print(f"  pynetdicom itself (no-op/storescp): stock {rate['noop-stock'] / rate['storescp']:.2f}, "
          f"node/dimse.py {rate['noop-dimse'] / rate['storescp']:.2f}; pacsnode/no-op (dimse): "
          f"{rate['pacsnode'] / rate['noop-dimse']:.2f}")
    # A durable receiver on pynetdicom answers each instance no sooner than the no-op receiver
    # plus the durable write: the best ratio any code of ours on top of pynetdicom could reach.
    per_instance = {name: statistics.median(t / n for t in ts) for name, ts in times.items()}
    bound = per_instance["noop-dimse"] + per_instance["floor"]
    print(f"  bound: no-op {per_instance['noop-dimse'] * 1e3:.2f} ms + durable write {per_instance['floor'] * 1e3:.2f} ms "
          f"an instance: at best {1 / bound:.0f}/s = {per_instance['storescp'] / bound:.2f}x storescp "
          f"(ours: {per_instance['pacsnode'] * 1e3:.2f} ms an instance, "
          f"{(per_instance['pacsnode'] - bound) * 1e3:.2f} ms above the bound)")
    # What a receiver doing only the work the target asks for reaches on this machine, in Python.
    minimal_runs = [t_ref / t_min for t_min, t_ref in zip(times["minimal"], times["storescp"], strict=True)]
    print(f"  pynetdicom minimal durable receiver (file, folder, UIDs, row): "
          f"{rate['minimal'] / rate['storescp']:.2f}x storescp (runs {min(minimal_runs):.2f}-{max(minimal_runs):.2f}); "
          f"pacsnode/minimal {rate['pacsnode'] / rate['minimal']:.2f} "
          f"(ours {per_instance['pacsnode'] * 1e3:.2f} ms an instance, the minimal one {per_instance['minimal'] * 1e3:.2f})")
    peak = max(rss)
    print(f"  listener peak RSS {peak:.0f} MB (target < {LISTENER_RSS_TARGET_MB} MB) "
          f"{'OK' if peak < LISTENER_RSS_TARGET_MB else 'OVER TARGET'}")
    return ratios


def compare_parallel(base: Path, workload: str, copies: int, runs: int, associations: int, processes: int,
                     study_each: bool = False) -> float:
    """Several associations at once: our listener with one process and with `processes`, against
    storescp (--fork) and Orthanc. Prints rates and ratios; returns processes / one process."""
    (base / workload).mkdir()
    files = make_files(base / workload, copies, workload, study_each)
    rss: list[float] = []
    receivers: dict[str, Callable[[Path, list[Path]], float]] = {
        "pacsnode-1": lambda w, f: run_node(w, f, rss, associations, processes=1),
        f"pacsnode-{processes}": lambda w, f: run_node(w, f, rss, associations, processes=processes),
        "storescp": lambda w, f: run_storescp(w, f, associations),
        "orthanc": lambda w, f: run_orthanc(w, f, associations),
    }
    labels = {"pacsnode-1": "pacsnode, 1 listener process", f"pacsnode-{processes}": f"pacsnode, {processes} listener processes",
              "storescp": "DCMTK storescp --fork (no fsync)", "orthanc": "Orthanc (durable)"}
    times = _interleaved(base, workload, receivers, files, runs)
    n = len(files)
    print(f"[{workload}] {n} instances, {associations} associations at once (storescu each), {runs} runs")
    for name, label in labels.items():
        print(f"  {label:34s} {_rate(n, times[name])}")
    rate = {name: statistics.median(n / t for t in ts) for name, ts in times.items()}
    many = f"pacsnode-{processes}"
    scaling = rate[many] / rate["pacsnode-1"]
    per_run = [t1 / tp for t1, tp in zip(times["pacsnode-1"], times[many], strict=True)]
    print(f"  {processes} listener processes / 1: {scaling:.2f} (runs {min(per_run):.2f}-{max(per_run):.2f})")
    for ref in ("storescp", "orthanc"):
        print(f"  ratio pacsnode/{ref}: 1 process {rate['pacsnode-1'] / rate[ref]:.2f}, "
              f"{processes} processes {rate[many] / rate[ref]:.2f} (target >= {TARGETS[(ref, workload)]})")
    print(f"  listener peak RSS, largest process {max(rss):.0f} MB (target < {LISTENER_RSS_TARGET_MB} MB)")
    return scaling


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=200, help="small instances per run")
    ap.add_argument("--cxr-copies", type=int, default=30, help="full-size radiographs per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workload", choices=["small", "cxr", "both"], default="both")
    ap.add_argument("--study-each", action="store_true",
                    help="a new study for every instance (a stream of radiographs, one per study), not one study")
    ap.add_argument("--associations", type=int, default=1,
                    help="send over this many associations at once; above 1, ours with 1 and with "
                         "--listener-processes listener processes against storescp --fork and Orthanc")
    ap.add_argument("--listener-processes", type=int, default=os.cpu_count() or 2,
                    help="listener.processes for --associations (default: one per CPU)")
    ap.add_argument("--pynetdicom-scp", type=Path, help=argparse.SUPPRESS)  # internal: a pynetdicom receiver
    ap.add_argument("--pynetdicom-kind", choices=["stock", "dimse", "minimal"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pynetdicom_scp and args.pynetdicom_kind == "minimal":
        minimal_scp(args.pynetdicom_scp)
        return 0
    if args.pynetdicom_scp:
        noop_scp(args.pynetdicom_scp, args.pynetdicom_kind)
        return 0
    missing = [p for p in ("storescp", "storescu", "Orthanc") if not shutil.which(p)]
    if missing:
        print(f"not installed: {', '.join(missing)} (packages dcmtk, orthanc)", file=sys.stderr)
        return 2
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at start")
    print(f"Orthanc durability: {ORTHANC_DURABILITY}")
    with tempfile.TemporaryDirectory(prefix="pacsnode-ingest-") as tmp:
        if args.associations > 1:
            for workload in ("small", "cxr") if args.workload == "both" else (args.workload,):
                copies = args.copies if workload == "small" else args.cxr_copies
                compare_parallel(Path(tmp), workload, copies, args.runs, args.associations,
                                 args.listener_processes, args.study_each)
            return 0
        if args.workload in ("small", "both"):
            compare(Path(tmp), "small", args.copies, args.runs, args.study_each)
        if args.workload in ("cxr", "both"):
            compare(Path(tmp), "cxr", args.cxr_copies, args.runs, args.study_each)
    return 0


if __name__ == "__main__":
    sys.exit(main())
