"""Ingest benchmark: the same files, sent with DCMTK storescu, to our listener and to DCMTK storescp.

Our side is `pacsnode listener` as a subprocess on the normal path (fsync'd file + committed
SQLite row before each success status); storescp writes to a temporary folder (no fsync).
Two workloads, each sent in one association per run: `small`, N copies of a 256 x 256 CR
(128 KB, new UIDs each) plus RG1_UNCR.dcm, where per-message overhead dominates; `cxr`, N copies
of RG1_UNCR.dcm (a real 7 MB chest radiograph), the node's actual input. Prints instances/second
of both receivers and our ratio (target >= 0.6) per workload. A third receiver, pynetdicom with
our listener's AE settings and a C-STORE handler that does nothing, shows the ceiling any
pynetdicom-based handler can reach.

    python bench/ingest.py [--workload small|cxr|both] [--copies 200] [--cxr-copies 30] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from tests.peers import free_port, storescu, wait_port  # noqa: E402

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))


def make_files(folder: Path, copies: int, workload: str) -> list[Path]:
    """`small`: copies of a 256 x 256 CR (128 KB) plus RG1; `cxr`: copies of RG1 itself (full-size
    chest radiographs, 7 MB). One study, new instance UIDs for every copy."""
    src = pydicom.dcmread(RG1)
    if workload == "small":
        small = src.pixel_array[::8, ::8][:256, :256].astype(np.uint16)
        src.Rows, src.Columns = small.shape
        src.PixelData = small.tobytes()
    study, series = generate_uid(), generate_uid()
    files = []
    for i in range(copies):
        src.StudyInstanceUID, src.SeriesInstanceUID = study, series
        src.SOPInstanceUID = src.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        src.InstanceNumber = i + 1
        path = folder / f"{workload}{i:04d}.dcm"
        src.save_as(path, enforce_file_format=True)
        files.append(path)
    if workload == "small":
        files.append(RG1)
    return files


def timed_send(port: int, aec: str, files: list[Path]) -> float:
    t0 = time.perf_counter()
    out = storescu(port, *files, aec=aec, timeout=600)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {out.stderr[-2000:]}")
    return elapsed


def run_node(work: Path, files: list[Path]) -> float:
    port = free_port()
    cfg = work / "config.yaml"
    cfg.write_text(
        f"listener: {{ae_title: PACSNODE, host: 127.0.0.1, port: {port}, max_pdu: 0, allowed_callers: any}}\n"
        f"storage: {{path: {work / 'spool'}, min_free_mb: 10}}\n"
        f"database: {{url: 'sqlite:///{work / 'pacsnode.db'}'}}\n"
        # No study completes during the run: this measures ingestion only.
        "completion: {quiet_seconds: 3600, max_wait_seconds: 7200}\n"
        "logging: {level: WARNING}\n"
    )
    cli = [sys.executable, "-m", "node.cli", "--config", str(cfg)]
    subprocess.run([*cli, "db", "upgrade"], check=True, cwd=REPO, capture_output=True, timeout=120)
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen([*cli, "listener"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(work / "listener.log", "wb"))  # noqa: SIM115
    return _time_receiver(proc, port, "PACSNODE", files, startup=60)


def _time_receiver(proc: subprocess.Popen[bytes], port: int, aec: str, files: list[Path], startup: float) -> float:
    """Wait for a started receiver, time sending the files to it, stop it."""
    try:
        wait_port(port, startup)
        return timed_send(port, aec, files)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def noop_scp(config_path: Path) -> None:
    """Serve C-STORE with our listener's AE (contexts, PDU size, TCP_NODELAY) and do nothing."""
    from pynetdicom import evt

    from node.config import load_config
    from node.listener import build_ae, tune_connection

    config = load_config(config_path)
    ae = build_ae(config)
    ae.require_calling_aet = []
    ae.start_server(("127.0.0.1", config.listener.port), block=True,
                    evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection), (evt.EVT_C_STORE, lambda _: 0)])  # fmt: skip


def run_noop(work: Path, files: list[Path]) -> float:
    port = free_port()
    cfg = work / "config.yaml"
    cfg.write_text(f"listener: {{ae_title: PACSNODE, host: 127.0.0.1, port: {port}, max_pdu: 0, allowed_callers: any}}\n"
                   f"storage: {{path: {work / 'spool'}}}\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, __file__, "--noop-scp", str(cfg)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    return _time_receiver(proc, port, "PACSNODE", files, startup=60)


def run_storescp(work: Path, files: list[Path]) -> float:
    port = free_port()
    out = work / "storescp"
    out.mkdir()
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), "-pm", str(port)],
                            env={**os.environ, "TCP_NODELAY": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    return _time_receiver(proc, port, "STORESCP", files, startup=30)


def compare(base: Path, workload: str, copies: int, runs: int) -> float:
    """Time both receivers on one workload (alternating runs); print and return our ratio."""
    (base / workload).mkdir()
    files = make_files(base / workload, copies, workload)
    ours, theirs, noop = [], [], []
    for run in range(runs):  # alternate, so all see the same machine load
        for name in ("node", "scp", "noop"):
            (base / f"{workload}-{name}{run}").mkdir()
        ours.append(run_node(base / f"{workload}-node{run}", files))
        theirs.append(run_storescp(base / f"{workload}-scp{run}", files))
        noop.append(run_noop(base / f"{workload}-noop{run}", files))
    n, mb = len(files), sum(f.stat().st_size for f in files) / 2**20
    ips_ours, ips_theirs = n / statistics.median(ours), n / statistics.median(theirs)
    print(f"[{workload}] {n} instances, {mb:.0f} MB, {runs} runs, median wall time per run")
    print(f"  pacsnode listener: {statistics.median(ours):.2f} s  {ips_ours:.1f} instances/s  (runs: "
          + ", ".join(f"{t:.2f}" for t in ours) + ")")
    print(f"  DCMTK storescp:    {statistics.median(theirs):.2f} s  {ips_theirs:.1f} instances/s  (runs: "
          + ", ".join(f"{t:.2f}" for t in theirs) + ")")
    ips_noop = n / statistics.median(noop)
    print(f"  pynetdicom no-op:  {statistics.median(noop):.2f} s  {ips_noop:.1f} instances/s  (runs: "
          + ", ".join(f"{t:.2f}" for t in noop) + ")")
    ratio = ips_ours / ips_theirs
    print(f"  ratio pacsnode/storescp: {ratio:.2f} (target >= 0.6) {'OK' if ratio >= 0.6 else 'BELOW TARGET'}")
    print(f"  ceiling for any pynetdicom handler (no-op/storescp): {ips_noop / ips_theirs:.2f}; "
          f"pacsnode/no-op: {ips_ours / ips_noop:.2f}")
    return ratio


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=200, help="small instances per run")
    ap.add_argument("--cxr-copies", type=int, default=30, help="full-size radiographs per run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workload", choices=["small", "cxr", "both"], default="both")
    ap.add_argument("--noop-scp", type=Path, help=argparse.SUPPRESS)  # internal: the no-op receiver
    args = ap.parse_args()
    if args.noop_scp:
        noop_scp(args.noop_scp)
        return 0
    if not shutil.which("storescp"):
        print("DCMTK storescp is not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pacsnode-ingest-") as tmp:
        if args.workload in ("small", "both"):
            compare(Path(tmp), "small", args.copies, args.runs)
        if args.workload in ("cxr", "both"):
            compare(Path(tmp), "cxr", args.cxr_copies, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
