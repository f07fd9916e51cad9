"""HTTP API and dashboard latency with 100,000 studies, on SQLite and on PostgreSQL.

Seeds a database with N studies (one series, one instance and one job each; done jobs have
four result objects with a send each, every 25th job failed at its send), plus one real study
whose SR and overlay SC our writers built from a cxr-sample radiograph; starts `pacsnode api`
as its own process (as in production) and times, over one kept-alive HTTP connection, the pages
an admin opens: the studies list (first page, a page deep in the list, an exact search), the
study page, the failed-jobs page, the overview and /metrics. Prints p50/p95 per request, p95
as a ratio to the 150 ms target, and the API process's CPU time per request; /healthz, measured
in the same run, is the floor the framework itself costs.

    python bench/api.py [--studies 100000] [--backend sqlite|postgresql|both] [--requests 60]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402
from sqlalchemy import insert, text  # noqa: E402

from node.cli import db_upgrade  # noqa: E402
from node.config import Config, load_config  # noqa: E402
from node.db.models import (  # noqa: E402
    Instance,
    Job,
    JobState,
    Output,
    Send,
    SendState,
    Series,
    SeriesState,
    Study,
    StudyState,
    WorkerBeat,
    utcnow,
)
from node.db.session import engine_for  # noqa: E402
from node.services import users  # noqa: E402
from tests.peers import Postgres, free_port, have_postgres, wait_port  # noqa: E402

TARGET_S = 0.150
BATCH = 5000
KINDS = ("sr", "sc", "seg", "gsps")


def _rows(n: int, start: int, total: int) -> dict[str, list[dict[str, Any]]]:
    """Rows for studies start+1 .. start+n (ids given, so the tables link without RETURNING)."""
    now = utcnow()
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in ("study", "series", "instance", "job", "output", "send")}
    for i in range(start, start + n):
        sid = i + 1
        t = now - timedelta(seconds=26 * (total - i))  # 100,000 studies span about a month
        failed = sid % 25 == 0
        out["study"].append({"id": sid, "study_instance_uid": f"1.2.826.0.1.3680043.10.1.{sid}", "state": StudyState.COMPLETE,
                             "calling_ae": "MODALITY", "instance_count": 1, "first_received_at": t,
                             "last_received_at": t, "released_at": t, "completed_at": t + timedelta(seconds=2),
                             "completion_rule": "quiet", "accession_hash": f"{sid:064x}", "patient_id_hash": f"{sid:064x}"})
        out["series"].append({"id": sid, "study_id": sid, "series_instance_uid": f"1.2.826.0.1.3680043.10.2.{sid}",
                              "modality": "CR", "body_part": "CHEST", "view_position": "PA", "state": SeriesState.ROUTED,
                              "routed_at": t, "routing_rule": "frontal-chest", "pipelines": ["chest_xray"], "priority": 4})
        out["instance"].append({"id": sid, "series_id": sid, "sop_instance_uid": f"1.2.826.0.1.3680043.10.3.{sid}",
                                "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1", "transfer_syntax_uid": "1.2.840.10008.1.2.1",
                                "path": f"instances/{sid % 256:02x}/{sid}.dcm", "size": 7_000_000, "sha256": "0" * 64,
                                "calling_ae": "MODALITY", "received_at": t})
        state = JobState.FAILED if failed else JobState.DONE
        end = t + timedelta(seconds=6)
        out["job"].append({"id": sid, "study_id": sid, "pipeline": "chest_xray", "model_version": "0.1.0", "state": state,
                           "attempt": 1, "worker": "inference@bench", "instance_ids": [sid],
                           "timings": {"read": 0.05, "pipeline": 0.3, "encode": 0.2, "validate": 0.05},
                           "send_seconds": 0.1, "priority": 4, "created_at": t, "queued_at": t, "running_at": t,
                           "encoded_at": t, "sending_at": t, "updated_at": end,
                           "failed_at": end if failed else None, "done_at": None if failed else end,
                           "error_stage": "send" if failed else None,
                           "error": "pacs: association rejected (no answer)" if failed else None})
        for k, kind in enumerate(KINDS):
            oid = sid * 4 + k
            out["output"].append({"id": oid, "job_id": sid, "kind": kind, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.7",
                                  "sop_instance_uid": f"1.2.826.0.1.3680043.10.4.{oid}",
                                  "series_instance_uid": f"1.2.826.0.1.3680043.10.5.{sid}.{k}",
                                  "path": f"outputs/{sid}/{kind}-{k}.dcm", "created_at": t})
            out["send"].append({"id": oid, "output_id": oid, "destination": "pacs", "attempts": 1,
                                "state": SendState.FAILED if failed else SendState.SENT, "updated_at": end,
                                "remote_status": None if failed else 0, "sent_at": None if failed else end,
                                "error": "association rejected" if failed else None})
    return out


def seed(config: Config, studies: int) -> float:
    """Insert the studies in batches; return the seconds it took."""
    engine = engine_for(config.database.url)
    tables = {"study": Study, "series": Series, "instance": Instance, "job": Job, "output": Output, "send": Send}
    t0 = time.perf_counter()
    for start in range(0, studies, BATCH):
        rows = _rows(min(BATCH, studies - start), start, studies)
        with engine.begin() as conn:
            for name, model in tables.items():
                conn.execute(insert(model), rows[name])
    with engine.begin() as conn:
        now = utcnow()
        conn.execute(insert(WorkerBeat), [{"name": f"{q}@bench", "queues": q, "started_at": now, "seen_at": now}
                                          for q in ("inference", "export")])
        if engine.dialect.name == "postgresql":
            for name in tables:  # explicit ids were given: later rows continue after them
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))"))
            conn.execute(text("ANALYZE"))  # what autovacuum does within a minute of a bulk load
    return time.perf_counter() - t0


@contextmanager
def api_process(config_path: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    log = open(config_path.parent / "api.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--config", str(config_path), "api"], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 60)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


class Client:
    """One kept-alive HTTP/1.1 connection, as a browser tab or a scraper holds."""

    def __init__(self, port: int, token: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "text/html"}

    def get(self, path: str) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        self.conn.request("GET", path, headers=self.headers)
        r = self.conn.getresponse()
        body = r.read()
        return r.status, body, time.perf_counter() - t0

    def time(self, path: str, n: int, warmup: int = 3) -> list[float]:
        for _ in range(warmup):
            status, body, _ = self.get(path)
            if status != 200:
                raise RuntimeError(f"GET {path} answered {status}: {body[:300]!r}")
        return [self.get(path)[2] for _ in range(n)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (/proc): the work a request costs, which
    a machine shared with other jobs does not inflate the way it inflates wall-clock latency."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def run_backend(backend: str, studies: int, requests: int, pg: Postgres | None) -> list[dict[str, Any]]:
    """Seed, serve and time one database backend in a temporary folder, removed afterwards."""
    work = Path(tempfile.mkdtemp(prefix=f"pacsnode-bench-api-{backend}-"))
    try:
        return _run_in(work, backend, studies, requests, pg)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_in(work: Path, backend: str, studies: int, requests: int, pg: Postgres | None) -> list[dict[str, Any]]:
    from tests.unit.web_data import study_with_results

    url = pg.create_database("bench") if pg else f"sqlite:///{work / 'pacsnode.db'}"
    port = free_port()
    cfg_path = work / "config.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "storage": {"path": str(work / "spool"), "min_free_mb": 10}, "database": {"url": url},
        "api": {"port": port, "state_dir": str(work / "var"), "identifier_key": "b" * 32},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 1}],
        "logging": {"level": "WARNING"}}))
    config = load_config(cfg_path)
    db_upgrade(config)
    seconds = seed(config, studies)
    real = study_with_results(config, tag="9")  # newest study: real files, real SR
    users.add_user(config, "bench", "admin", "bench password 1", actor="bench")
    _, token = users.create_token(config, "bench", actor="bench")
    print(f"{backend}: seeded {studies} studies (about {studies * 12 // 1000}k rows) in {seconds:.0f} s", flush=True)
    deep = f"1.2.826.0.1.3680043.10.1.{studies // 2}"
    results = []
    with api_process(cfg_path, port) as proc:
        c = Client(port, token)
        # The first view of a study parses its SR (findings are kept on the row afterwards).
        first = c.get(f"/studies/{real.study_uid}")[2]
        cursor = json.loads(c.get(f"/api/v1/studies?limit=500&cursor={_cursor(studies // 2)}")[1])["next_cursor"]
        pages = [("healthz (framework floor)", "/healthz"),
                 ("studies list, page 1", "/studies"),
                 ("studies list, page deep in the list", f"/studies?cursor={cursor}"),
                 ("studies search by exact UID", f"/studies?q={deep}"),
                 ("studies list, API JSON", "/api/v1/studies?limit=50"),
                 ("study page", f"/studies/{real.study_uid}"),
                 ("study page, API JSON", f"/api/v1/studies/{real.study_uid}"),
                 ("failed-jobs page", "/jobs?state=failed"),
                 ("jobs page (failed first, then all)", "/jobs"),
                 ("overview", "/"),
                 ("metrics", "/metrics")]
        for name, path in pages:
            cpu = cpu_seconds(proc.pid)
            times = c.time(path, requests)
            cpu = (cpu_seconds(proc.pid) - cpu) / (requests + 3)  # the warm-ups ran in the same span
            results.append({"backend": backend, "page": name, "p50": p(times, 50), "p95": p(times, 95), "cpu": cpu})
        results.append({"backend": backend, "page": "study page, first view (parses the SR)", "p50": first, "p95": first,
                        "cpu": None})
    return results


def _cursor(study_id: int) -> str:
    from node.services.paging import encode_cursor

    return encode_cursor(study_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=100_000)
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--requests", type=int, default=60, help="timed requests per page (after 3 warm-ups)")
    args = ap.parse_args(argv)
    results = []
    if args.backend in ("sqlite", "both"):
        results += run_backend("sqlite", args.studies, args.requests, None)
    if args.backend in ("postgresql", "both"):
        if not have_postgres():
            print("postgresql: not installed, skipped", file=sys.stderr)
        else:
            pg = Postgres().start()
            try:
                results += run_backend("postgresql", args.studies, args.requests, pg)
            finally:
                pg.stop()
    print(f"\n{'backend':<11} {'request':<42} {'p50 ms':>8} {'p95 ms':>8} {'p95/150ms':>10} {'API CPU ms':>11}")
    for r in results:
        cpu = "-" if r["cpu"] is None else f"{r['cpu'] * 1000:.1f}"
        print(f"{r['backend']:<11} {r['page']:<42} {r['p50'] * 1000:8.1f} {r['p95'] * 1000:8.1f} "
              f"{r['p95'] / TARGET_S:10.2f} {cpu:>11}")
    print(f"(load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; API CPU ms is the API "
          "process's CPU time per request, the database server's not included)")
    over = [r for r in results if r["p95"] > TARGET_S and "first view" not in r["page"]]
    print(f"\n{len(over)} request(s) over the 150 ms target at p95" + (": " + ", ".join(
        f"{r['backend']} {r['page']}" for r in over) if over else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
