"""SQLite writers: how long a write transaction waits when several processes write, with SQLite's
busy handler alone and with the node's writer queue (node.db.session.WriterQueueConnection).

The embedded default's database is one SQLite file that the listener, the export worker and each
inference worker write (#12's scale target). Each of N processes runs M transactions like the
node's (a row inserted, one updated, committed with the node's WAL and synchronous=FULL), with
some work between them. Both ways run in the same run, alternated, on a database in `--dir`
(put it on the disk the spool uses). Prints each way's transactions per second and the
percentiles of a transaction's time (its wait for the lock, its statements and its commit).

    python bench/db_writers.py [--processes 4] [--transactions 200] [--work-ms 5] [--rounds 2] [--dir DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.db.session import WRITER_WAIT_SECONDS, WriterQueueConnection  # noqa: E402


def _connect(path: Path, queued: bool) -> sqlite3.Connection:
    factory = WriterQueueConnection if queued else sqlite3.Connection
    conn = sqlite3.connect(path, timeout=WRITER_WAIT_SECONDS, factory=factory)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn


def _writer(path: Path, queued: bool, transactions: int, work_s: float, start: float, out: mp.Queue) -> None:
    conn = _connect(path, queued)
    seconds = []
    while time.time() < start:  # every process starts together
        time.sleep(0.001)
    for i in range(transactions):
        t0 = time.perf_counter()
        cur = conn.cursor()
        cur.execute("INSERT INTO item (payload) VALUES (?)", (f"{i}" * 50,))
        cur.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
        conn.commit()
        seconds.append(time.perf_counter() - t0)
        end = time.perf_counter() + work_s  # the process's own work between its transactions
        while time.perf_counter() < end:
            pass
    conn.close()
    out.put(seconds)


def run(path: Path, queued: bool, processes: int, transactions: int, work_s: float) -> tuple[float, list[float]]:
    """Transactions per second over all processes, and every transaction's seconds."""
    for suffix in ("", "-wal", "-shm", ".writers"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = _connect(path, False)
    conn.executescript("CREATE TABLE item (id INTEGER PRIMARY KEY, payload TEXT);"
                       "CREATE TABLE counter (id INTEGER PRIMARY KEY, n INTEGER);"
                       "INSERT INTO counter VALUES (1, 0);")
    conn.close()
    ctx = mp.get_context("spawn")
    out: mp.Queue = ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_writer, args=(path, queued, transactions, work_s, start, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    seconds = [s for _ in procs for s in out.get(timeout=600)]
    for p in procs:
        p.join(timeout=60)
    elapsed = time.time() - start
    conn = _connect(path, False)
    n = conn.execute("SELECT n FROM counter").fetchone()[0]
    conn.close()
    if n != processes * transactions:
        raise RuntimeError(f"{n} transactions counted, {processes * transactions} made")
    return processes * transactions / elapsed, seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--transactions", type=int, default=200, help="per process")
    p.add_argument("--work-ms", type=float, default=5.0, help="each process's own work between its transactions")
    p.add_argument("--rounds", type=int, default=2, help="each way this many times, alternated")
    p.add_argument("--dir", type=Path, default=None, help="where the database is made (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.db"
        results: dict[str, list[tuple[float, list[float]]]] = {"busy handler": [], "writer queue": []}
        for r in range(args.rounds):
            for name in (("busy handler", "writer queue") if r % 2 == 0 else ("writer queue", "busy handler")):
                rate, seconds = run(path, name == "writer queue", args.processes, args.transactions,
                                    args.work_ms / 1000)
                results[name].append((rate, seconds))
                q = statistics.quantiles(seconds, n=100)
                print(f"{name:13s} round {r + 1}: {rate:6.0f} transactions/s; a transaction median "
                      f"{q[49] * 1000:6.2f} ms, p90 {q[89] * 1000:6.2f}, p99 {q[98] * 1000:6.2f}, "
                      f"max {max(seconds) * 1000:6.1f}", flush=True)
    rates = {k: statistics.median(r for r, _ in v) for k, v in results.items()}
    p99 = {k: statistics.median(statistics.quantiles(s, n=100)[98] for _, s in v) for k, v in results.items()}
    print(f"writer queue / busy handler: transactions/s {rates['writer queue'] / rates['busy handler']:.2f}, "
          f"p99 transaction time {p99['writer queue'] / p99['busy handler']:.2f} ({args.processes} processes, "
          f"{args.work_ms} ms of work between transactions, database in {args.dir or tempfile.gettempdir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
