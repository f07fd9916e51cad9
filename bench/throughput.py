"""Throughput benchmark: studies per minute with 1 and 2 inference worker processes.

Production mode as deployed: PostgreSQL, redis-server and Orthanc started here, `pacsnode
listener`, one export worker and N `pacsnode worker -Q inference` processes. The same
synthetic chest CRs (RG1 downscaled, one study each) are sent by 4 concurrent storescu
senders in each round; a round lasts from the first send to the last job `done` in the
database (end to end: receive, complete, infer, encode, send to Orthanc). Workers are started
and their models loaded before the clock starts. Prints both rates and their ratio.

    python bench/throughput.py [--studies 20] [--size 512] [--bundle models/chest_xray] [--threads split|default]

--threads split (the default): one worker gets every core's torch thread, each of two workers half
of them (`pacsnode worker --threads`), as an operator sizing workers for a host would; `default`
leaves torch's own default (one thread per core in every worker: with two workers, twice as many
threads as cores). On a machine with fewer cores than workers the ratio says more about the CPU
than the engine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from node.db.models import Job, JobState  # noqa: E402
from node.db.session import session_scope  # noqa: E402
from tests.peers import (  # noqa: E402
    Orthanc,
    Postgres,
    ProductionNode,
    Redis,
    node_config,
    storescu,
    synthetic_cr,
    wait_for,
)


def run_round(workers: int, files: list[Path], work: Path, pg: Postgres, pacs: Orthanc, bundle: Path,
              device: str, threads: int | None) -> float:
    """Seconds from the first send until every study's job is done, with `workers` inference processes."""
    redis = Redis(work / "redis").start()
    url = pg.create_database(f"bench_{workers}w")
    cfg = node_config(
        work / "node", bundle,
        [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "timeout": 30}],
        database={"url": url}, queue={"broker_url": redis.url}, completion={"quiet_seconds": 0.3},
        pipelines={"chest_xray": {"bundle": str(bundle), "device": device}},
    )
    node = ProductionNode(cfg)
    try:
        node.migrate()
        node.start_listener()
        node.start_worker("export1", "export")
        for i in range(workers):
            node.start_worker(f"inf{i + 1}", "inference", 120.0, *(["--threads", str(threads)] if threads else []))
        t0 = time.monotonic()
        threads = [threading.Thread(target=storescu, args=(node.port, *files[i::4]), kwargs={"timeout": 300})
                   for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)

        def done() -> bool:
            with session_scope(url) as s:
                failed = s.scalar(select(func.count()).where(Job.state == JobState.FAILED))
                if failed:
                    raise RuntimeError(f"{failed} job(s) failed; see {node.dir}")
                return s.scalar(select(func.count()).where(Job.state == JobState.DONE)) == len(files)

        wait_for(done, 1800, f"{len(files)} studies done with {workers} worker(s)", interval=0.2)
        elapsed = time.monotonic() - t0
        with session_scope(url) as s:
            timings = [j.stage_seconds for j in s.scalars(select(Job))]
        stages = {k: statistics.median(t.get(k, 0.0) for t in timings) for k in ("read", "inference", "encode", "send")}
        print(f"  median per job with {workers} worker(s): " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()),
              flush=True)
        return elapsed
    finally:
        node.stop()
        redis.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--size", type=int, default=512, help="rows and columns of each synthetic CR")
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "chest_xray")
    p.add_argument("--device", default="cpu", help="pipeline device for every worker: cpu, cuda, cuda:N")
    p.add_argument("--threads", choices=["split", "default"], default="split",
                   help="torch threads per worker: the cores split among the workers, or torch's default")
    args = p.parse_args()
    if not (args.bundle / "configs" / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "training", "demo", "--out", str(args.bundle)], check=True, cwd=REPO)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = synthetic_cr(work / "studies", args.studies, size=args.size)
        pg = Postgres().start()
        pacs = Orthanc(work / "orthanc").start()
        try:
            rates = {}
            for n in (1, 2):
                threads = max(1, (os.cpu_count() or 1) // n) if args.threads == "split" else None
                seconds = run_round(n, files, work / f"round{n}", pg, pacs, args.bundle.resolve(), args.device, threads)
                rates[n] = args.studies / seconds * 60
                print(f"{n} inference worker(s), torch threads each: {threads or 'default'}: {args.studies} studies "
                      f"in {seconds:.1f} s = {rates[n]:.1f} studies/min", flush=True)
        finally:
            pacs.stop()
            pg.stop()
    print(f"ratio 2 workers / 1 worker: {rates[2] / rates[1]:.2f} (CPU cores: {os.cpu_count()}, "
          f"{args.size}x{args.size} CR, device {args.device})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
