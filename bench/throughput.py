"""Throughput benchmark: studies per minute with 1 and 2 inference worker processes.

Production mode as deployed: PostgreSQL, redis-server and Orthanc started here, `pacsnode
listener`, one export worker and N `pacsnode worker -Q inference` processes. The same
synthetic chest CRs (RG1 downscaled, one study each) are sent by 4 concurrent storescu
senders in each round; a round lasts from the first send to the last job `done` in the
database (end to end: receive, complete, infer, encode, send to Orthanc). Workers are started
and their models loaded before the clock starts. Prints both rates and their ratio, and how
much of the inference side each worker was busy.

    python bench/throughput.py [--studies 20] [--size 512] [--bundle models/chest_xray]
                               [--threads split|half|default] [--rounds 1] [--embedded] [--device cpu|cuda]

--threads split (the default): one worker gets every core's torch thread, each of two workers half
of them (`pacsnode worker --threads`), as an operator sizing workers for a host would; `half`:
every worker half the cores in both rounds, so the second worker brings cores of its own (a
worker of a fixed size, added where the machine has the cores); `default` leaves torch's own
default (one thread per core in every worker: with two workers, twice as many threads as cores).
On a machine with fewer cores than workers the ratio says more about the CPU than the engine.

--rounds N: N pairs of rounds, in alternating order (1 then 2 workers, then 2 then 1, ...), each
pair's ratio printed and their median: a machine whose speed drifts during the run (the GPU
machine's did) biases one ratio, not the median.

--embedded: the embedded default instead (SQLite, the filesystem broker in the spool), the same
separate listener and worker processes, and Python peers in this process: pynetdicom senders and
a pynetdicom storage SCP that keeps nothing as the destination. For a machine with the cores but
without PostgreSQL, Redis, Orthanc or DCMTK (the GPU machine). The ratio compares the node with
itself, so the peers only need to keep up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
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
    free_port,
    node_config,
    storescu,
    synthetic_cr,
    wait_for,
)

SENDERS = 4


class ProductionPeers:
    """PostgreSQL and Orthanc for the whole run, a fresh Redis and database per round, storescu senders."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.pg = Postgres().start()
        self.pacs = Orthanc(work / "orthanc").start()
        self.redis: Redis | None = None

    def start_round(self, name: str) -> dict:
        """A fresh Redis and database for the round; their config."""
        self.redis = Redis(self.work / name / "redis").start()
        return {"database": {"url": self.pg.create_database(f"bench_{name}")},
                "queue": {"broker_url": self.redis.url}}

    def destination(self) -> dict:
        return {"name": "orthanc", "ae_title": self.pacs.aet, "host": "127.0.0.1", "port": self.pacs.dicom_port,
                "timeout": 30}

    def send(self, port: int, files: list[Path]) -> None:
        out = storescu(port, *files, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"storescu exited with {out.returncode}: {(out.stdout + out.stderr)[-2000:]}")

    def end_round(self) -> None:
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def stop(self) -> None:
        self.pacs.stop()
        self.pg.stop()


class EmbeddedPeers:
    """The embedded default's SQLite and filesystem broker (each round its own node folder);
    pynetdicom senders, and a pynetdicom storage SCP that keeps nothing."""

    def __init__(self) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        ae = AE(ae_title="PACS")
        # pynetdicom's default of 10 refused the node's exports at a burst (55 of 200 failed on
        # 16 cores, nineteenth session): the export worker's threads each keep an association open
        ae.maximum_associations = 64
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self.port = free_port()
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _: 0)])
        assert server is not None  # block=False returns the server
        self.server = server

    def start_round(self, name: str) -> dict:
        """node_config's own SQLite and embedded broker; the validation gate with the validators
        this machine has (a worker refuses to start without a configured one)."""
        from node.writers.validate import TOOLS

        tools = [t for t in TOOLS if shutil.which(t)]
        if missing := [t for t in TOOLS if t not in tools]:
            print(f"  validation gate without {', '.join(missing)}: not installed here", flush=True)
        return {"validation": {"tools": tools}}

    def destination(self) -> dict:
        return {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": self.port, "timeout": 30}

    def send(self, port: int, files: list[Path]) -> None:
        import pydicom
        from pynetdicom import AE

        datasets = [pydicom.dcmread(f) for f in files]
        ae = AE(ae_title="STORESCU")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        if not assoc.is_established:
            raise RuntimeError(f"the node refused or dropped the association (port {port})")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                if getattr(status, "Status", None) != 0x0000:
                    raise RuntimeError(f"C-STORE of {ds.SOPInstanceUID} answered {status}")
        finally:
            assoc.release()

    def end_round(self) -> None:
        pass

    def stop(self) -> None:
        self.server.shutdown()


def run_round(workers: int, files: list[Path], work: Path, peers: ProductionPeers | EmbeddedPeers, bundle: Path,
              device: str, threads: int | None) -> tuple[float, float]:
    """With `workers` inference processes: seconds from the first send until every study's job is
    done, and the inference side's seconds (first job running to last job encoded: the workers'
    own span, without the listener before it and the export after it)."""
    name = next(n for n in (f"{workers}w{i or ''}" for i in range(1000)) if not (work / n).exists())  # a fresh node each round
    cfg = node_config(
        work / name, bundle, [peers.destination()],
        completion={"quiet_seconds": 0.3},
        pipelines={"chest_xray": {"bundle": str(bundle), "device": device}},
        **peers.start_round(name),
    )
    node = ProductionNode(cfg)
    url = node.config["database"]["url"]
    try:
        node.migrate()
        node.start_listener()
        node.start_worker("export1", "export")
        for i in range(workers):
            node.start_worker(f"inf{i + 1}", "inference", 120.0, *(["--threads", str(threads)] if threads else []))
        errors: list[BaseException] = []

        def send(part: list[Path]) -> None:
            try:
                peers.send(node.port, part)
            except BaseException as e:  # noqa: BLE001 (reported after the join)
                errors.append(e)

        t0 = time.monotonic()
        senders = [threading.Thread(target=send, args=(files[i::SENDERS],)) for i in range(SENDERS)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(timeout=300)
        if errors:
            raise RuntimeError(f"a sender failed: {errors[0]}")

        def done() -> bool:
            with session_scope(url) as s:
                failed = s.execute(select(Job.error_stage, Job.error).where(Job.state == JobState.FAILED)).all()
                if failed:
                    # the round's folder goes with the run's temporary folder: say why here
                    reasons = "; ".join(f"{stage}: {error}" for stage, error in failed[:3])
                    raise RuntimeError(f"{len(failed)} job(s) failed ({reasons})")
                return s.scalar(select(func.count()).where(Job.state == JobState.DONE)) == len(files)

        wait_for(done, 1800, f"{len(files)} studies done with {workers} worker(s)", interval=0.2)
        elapsed = time.monotonic() - t0
        with session_scope(url) as s:
            timings = [j.stage_seconds for j in s.scalars(select(Job))]
            rows = s.execute(select(Job.worker, Job.queued_at, Job.running_at, Job.encoded_at)).all()
        spans = [(w or "?", q or r, r, e) for w, q, r, e in rows if r is not None and e is not None]
        if len(spans) < len(rows):
            raise RuntimeError(f"a job has no running or encoded time; see {node.dir}")
        first, last = min(r for _, _, r, _ in spans), max(e for _, _, _, e in spans)
        inference_side = (last - first).total_seconds()
        stages = {k: statistics.median(t.get(k, 0.0) for t in timings) for k in ("read", "inference", "encode", "send")}
        print(f"  median per job with {workers} worker(s): " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()),
              flush=True)
        # Where the round's time went: a worker busy the whole inference side is what limits it;
        # one that waited, waited for studies (the listener) or for the database.
        busy = {w: _busy_seconds([(r, e) for ww, _, r, e in spans if ww == w]) / inference_side
                for w in sorted({w for w, _, _, _ in spans})}
        last_queued = (max(q for _, q, _, _ in spans) - first).total_seconds()
        print("  workers busy (a job of theirs running or encoding) for "
              + ", ".join(f"{w} {b:.0%}" for w, b in busy.items())
              + f" of the inference side; the last study was queued {last_queued:.1f} s into it", flush=True)
        if url.startswith("sqlite"):
            print("  " + _database_waits(node.config_path), flush=True)
        return elapsed, inference_side
    finally:
        node.stop()
        peers.end_round()


def _database_waits(config_path: Path) -> str:
    """What every process of the round says in pacsnode_database_write_wait_seconds (its
    SQLite writes' waits for the other writers), summed over the processes."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    from node.config import load_config
    from node.metrics import metrics_dir

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir(load_config(config_path))))
    total = count = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "pacsnode_database_write_wait_seconds_sum":
                total += sample.value
            elif sample.name == "pacsnode_database_write_wait_seconds_count":
                count += sample.value
    mean = total / count * 1000 if count else 0.0
    return f"database writes waited {total:.1f} s in all for the other writers ({count:.0f} writes, mean {mean:.1f} ms)"


def _busy_seconds(intervals: list[tuple[datetime, datetime]]) -> float:
    """Seconds covered by the union of the intervals (a batch's jobs overlap)."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += (stop - start).total_seconds()
            end = stop
        elif stop > end:
            total += (stop - end).total_seconds()
            end = stop
    return total


def _threads(how: str, workers: int) -> int | None:
    """Torch threads for each of `workers` inference workers (None: torch's default)."""
    cores = os.cpu_count() or 1
    if how == "split":
        return max(1, cores // workers)
    if how == "half":
        return max(1, cores // 2)
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--size", type=int, default=512, help="rows and columns of each synthetic CR")
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "chest_xray")
    p.add_argument("--device", default="cpu", help="pipeline device for every worker: cpu, cuda, cuda:N")
    p.add_argument("--threads", choices=["split", "half", "default"], default="split",
                   help="torch threads per worker: the cores split among the workers, half the cores each, "
                        "or torch's default")
    p.add_argument("--rounds", type=int, default=1, help="pairs of rounds (1 and 2 workers), in alternating order")
    p.add_argument("--embedded", action="store_true",
                   help="SQLite, the embedded broker and Python peers instead of PostgreSQL, Redis, Orthanc, DCMTK")
    args = p.parse_args()
    if not (args.bundle / "configs" / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "training", "demo", "--out", str(args.bundle)], check=True, cwd=REPO)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = synthetic_cr(work / "studies", args.studies, size=args.size)
        peers = EmbeddedPeers() if args.embedded else ProductionPeers(work)
        try:
            rates: dict[int, list[float]] = {1: [], 2: []}
            inference_rates: dict[int, list[float]] = {1: [], 2: []}
            for r in range(args.rounds):
                for n in ((1, 2) if r % 2 == 0 else (2, 1)):
                    threads = _threads(args.threads, n)
                    seconds, inference_side = run_round(n, files, work, peers, args.bundle.resolve(), args.device,
                                                        threads)
                    rates[n].append(args.studies / seconds * 60)
                    inference_rates[n].append(args.studies / inference_side * 60)
                    print(f"{n} inference worker(s), torch threads each: {threads or 'default'}: {args.studies} "
                          f"studies in {seconds:.1f} s = {rates[n][-1]:.1f} studies/min (inference side "
                          f"{inference_side:.1f} s = {inference_rates[n][-1]:.1f} studies/min)", flush=True)
                if args.rounds > 1:
                    print(f"pair {r + 1}: ratio {rates[2][-1] / rates[1][-1]:.2f}, inference side "
                          f"{inference_rates[2][-1] / inference_rates[1][-1]:.2f}", flush=True)
        finally:
            peers.stop()
    ratio = statistics.median(b / a for a, b in zip(rates[1], rates[2], strict=True))
    inference_ratio = statistics.median(b / a for a, b in zip(inference_rates[1], inference_rates[2], strict=True))
    print(f"ratio 2 workers / 1 worker{' (median of the pairs)' if args.rounds > 1 else ''}: {ratio:.2f}, "
          f"inference side {inference_ratio:.2f} (CPU cores: {os.cpu_count()}, threads {args.threads}, "
          f"{args.size}x{args.size} CR, device {args.device}, {'embedded' if args.embedded else 'production'} mode)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
