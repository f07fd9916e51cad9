"""Memory benchmark: RSS of the listener and of each worker after a study has been processed.

Starts Orthanc and `pacsnode run`, sends RG1 once (so the inference worker has its models loaded
and has run them), then reads VmRSS / VmHWM of every process of the node from /proc and prints
each as a ratio of its target (listener 300 MB, CPU inference worker 1.5 GB).

    python bench/memory.py [--bundle models/chest_xray]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom.data import get_testdata_file  # noqa: E402

from tests.peers import Node, Orthanc, node_config, storescu, wait_for  # noqa: E402

TARGETS_MB = {"listener": 300, "inference worker": 1536, "export worker": 300}


def rss_mb(pid: int) -> tuple[float, float]:
    """(current RSS, peak RSS) of a process in MB, from /proc."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, timeout=10)
    return [int(p) for p in out.stdout.split()]


def cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "chest_xray")
    args = p.parse_args()
    if not (args.bundle / "configs" / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "training", "demo", "--out", str(args.bundle)], check=True, cwd=REPO)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pacs = Orthanc(work / "orthanc").start()
        try:
            cfg = node_config(work / "node", args.bundle.resolve(),
                              [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}])
            node = Node(cfg).start(timeout=300)
            try:
                assert storescu(node.port, Path(get_testdata_file("RG1_UNCR.dcm"))).returncode == 0
                wait_for(lambda: [j for j in node.jobs() if j["state"] == "done"], 120, "the job", interval=0.3)
                assert node.proc is not None
                rows = [("listener", node.proc.pid)]
                for child in children(node.proc.pid):
                    kind = "inference worker" if "inference" in cmdline(child) else "export worker"
                    rows.append((kind, child))
                for kind, pid in rows:
                    now, peak = rss_mb(pid)
                    target = TARGETS_MB[kind]
                    print(f"{kind:17s} pid {pid:6d}  RSS {now:7.1f} MB  peak {peak:7.1f} MB  "
                          f"target {target} MB  ratio {peak / target:.2f}")
            finally:
                node.stop()
        finally:
            pacs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
