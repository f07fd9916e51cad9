"""Production mode against real servers started here: PostgreSQL, redis-server, Orthanc.

`pacsnode listener`, `pacsnode worker -Q inference` and `pacsnode worker -Q export` run as
separate processes, as on a production host. Each test breaks something (a worker killed with
SIGKILL mid-job, the PACS down, Redis restarted empty) and then checks, in the database and in
Orthanc's REST API, that every study got its results to the PACS exactly once.

Timings are shrunk in the config (heartbeat 0.5 s, reconciler every 0.5 s) so that recovery
happens within seconds; the code paths are the production ones.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from node.db.models import Event, Job, JobState, Output, Study
from node.db.session import session_scope
from tests.peers import (
    Orthanc,
    Postgres,
    ProductionNode,
    Redis,
    have,
    have_postgres,
    node_config,
    storescu,
    synthetic_cr,
    wait_for,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not (have("Orthanc", "storescu", "redis-server") and have_postgres()),
                       reason="needs Orthanc, DCMTK, redis-server and PostgreSQL 15"),
]

QUEUE = {
    "reconcile_seconds": 0.5,
    "heartbeat_seconds": 0.5,
    "lost_after_seconds": 3,
    "requeue_queued_seconds": 4,
    "task_time_limit": 120,
    "backoff_seconds": 0.5,
    "backoff_max_seconds": 2,
}


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop(wait=False)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    server = Redis(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def prod(request: pytest.FixtureRequest, tmp_path: Path, pg: Postgres, redis: Redis, pacs: Orthanc,
         demo_bundle: Path) -> Iterator[ProductionNode]:
    """A migrated database and a config for production mode; processes are started by each test."""
    url = pg.create_database(request.node.name.lower().replace("[", "_").replace("]", "")[:60])
    cfg = node_config(
        tmp_path / "node", demo_bundle,
        [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "timeout": 5}],
        database={"url": url},
        queue={"broker_url": redis.url, **QUEUE},
        completion={"quiet_seconds": 0.3},
        export={"calling_ae_title": "PACSNODE", "max_retries": 12, "backoff_seconds": 0.5, "backoff_max_seconds": 2},
    )
    n = ProductionNode(cfg)
    n.migrate()
    yield n
    n.stop()
    for name in ("listener", *sorted(p.stem for p in n.dir.glob("*.log") if p.stem != "listener")):
        print(f"--- {name} ---\n{n.log(name)[-3000:]}")


def _url(n: ProductionNode) -> str:
    return str(n.config["database"]["url"])


def _jobs(n: ProductionNode, study_uids: list[str]) -> list[dict[str, Any]]:
    """The jobs of these studies, with their sends, straight from PostgreSQL."""
    with session_scope(_url(n)) as s:
        jobs = s.scalars(
            select(Job).join(Study).where(Study.study_instance_uid.in_(study_uids))
            .options(selectinload(Job.study), selectinload(Job.outputs).selectinload(Output.sends))
            .order_by(Job.id)
        ).all()
        return [{"id": j.id, "study": j.study.study_instance_uid, "state": j.state, "attempt": j.attempt,
                 "worker": j.worker, "error": j.error, "error_stage": j.error_stage,
                 "sends": [(o.kind, sd.state.value, sd.attempts) for o in j.outputs for sd in o.sends]}
                for j in jobs]


def _requeue_events(n: ProductionNode) -> dict[int, list[str]]:
    with session_scope(_url(n)) as s:
        out: dict[int, list[str]] = {}
        for ev in s.scalars(select(Event).where(Event.kind == "requeue")):
            out.setdefault(ev.job_id or 0, []).append(ev.detail or "")
        return out


def _all_done(n: ProductionNode, study_uids: list[str], timeout: float) -> list[dict[str, Any]]:
    def check() -> list[dict[str, Any]] | None:
        jobs = _jobs(n, study_uids)
        failed = [j for j in jobs if j["state"] == JobState.FAILED]
        assert not failed, f"job failed: {failed[0]}"
        done = [j for j in jobs if j["state"] == JobState.DONE]
        return jobs if len({j["study"] for j in done}) == len(study_uids) else None

    return wait_for(check, timeout, f"{len(study_uids)} studies to be done", interval=0.3)


def _sr_count(pacs: Orthanc, study_uid: str) -> int:
    """SR instances Orthanc holds for the study (our results; the sources are CR)."""
    return sum(len(se["Instances"]) for se in pacs.study_series(study_uid) if se["MainDicomTags"].get("Modality") == "SR")


def _assert_one_sr_each(pacs: Orthanc, study_uids: list[str]) -> None:
    assert {uid: _sr_count(pacs, uid) for uid in study_uids} == {uid: 1 for uid in study_uids}


def _start(n: ProductionNode, *inference_workers: str) -> None:
    """Listener, one export worker and the named inference workers (models loaded)."""
    n.start_listener()
    n.start_worker("export1", "export")
    for worker in inference_workers:
        n.start_worker(worker)


def _study_uids(paths: list[Path]) -> list[str]:
    return [str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in paths]


def _send(n: ProductionNode, files: list[Path]) -> None:
    out = storescu(n.port, *files, timeout=120)
    assert out.returncode == 0, out.stderr


def test_worker_killed_mid_job_is_taken_over_and_results_arrive_once(
    prod: ProductionNode, pacs: Orthanc, tmp_path: Path
) -> None:
    _start(prod)
    files = synthetic_cr(tmp_path / "in", 8)
    uids = _study_uids(files)
    _send(prod, files)
    # SIGKILL lands within milliseconds of seeing the job running in the database, but the job
    # may finish in between: then the next worker takes the next study and we try again.
    for attempt in range(1, 4):
        name = f"victim{attempt}"
        prod.start_worker(name)

        def running_on_victim() -> dict[str, Any] | None:
            return next((j for j in _jobs(prod, uids)
                         if j["state"] == JobState.RUNNING and (j["worker"] or "").startswith(f"{name}@")), None)  # noqa: B023

        victim = wait_for(running_on_victim, 90, f"a job running on {name}", interval=0.02)
        prod.kill_worker(name)
        if next(j for j in _jobs(prod, uids) if j["id"] == victim["id"])["state"] == JobState.RUNNING:
            break
    else:
        pytest.fail("three jobs finished before SIGKILL landed")

    prod.start_worker("inf2")
    jobs = _all_done(prod, uids, 180)
    taken_over = next(j for j in jobs if j["id"] == victim["id"])
    assert taken_over["attempt"] == 2 and taken_over["worker"].startswith("inf2@"), taken_over
    assert any(f"{name}@" in d for d in _requeue_events(prod)[victim["id"]])
    assert len(jobs) == len(uids)  # one job per study: nothing was duplicated
    _assert_one_sr_each(pacs, uids)


def test_pacs_down_then_up_gets_everything_once_with_retries(
    prod: ProductionNode, pacs: Orthanc, tmp_path: Path
) -> None:
    _start(prod, "inf1")
    pacs.stop()
    try:
        files = synthetic_cr(tmp_path / "in", 3)
        uids = _study_uids(files)
        _send(prod, files)

        def every_send_failed_twice() -> bool:
            jobs = _jobs(prod, uids)
            return len(jobs) == 3 and all(j["sends"] and all(a >= 2 for _, _, a in j["sends"]) for j in jobs)

        wait_for(every_send_failed_twice, 90, "the sends to fail twice while the PACS is down", interval=0.3)
    finally:
        pacs.start()  # same ports and storage: the PACS comes back
    jobs = _all_done(prod, uids, 90)
    for j in jobs:
        assert j["sends"] and all(state == "sent" and attempts > 1 for _, state, attempts in j["sends"]), j
        assert j["attempt"] == 1  # the GPU side ran once: only the export retried
    _assert_one_sr_each(pacs, uids)


@pytest.mark.parametrize("batch_size", [1, 4], ids=["one-job-per-pass", "batched"])
def test_redis_restarted_empty_loses_no_queued_job(
    prod: ProductionNode, redis: Redis, pacs: Orthanc, tmp_path: Path, batch_size: int
) -> None:
    """Redis restarts empty while three jobs wait in it: the reconciler re-sends what it lost.
    One job per pass: every lost job is re-sent. Batched (the default): the worker may take the
    other two into the first one's forward pass before their own messages come back; their
    re-sent messages are then ignored. Either way each study is done once, with one SR."""
    import yaml

    cfg = yaml.safe_load(prod.config_path.read_text())
    cfg["queue"]["batch_size"] = batch_size
    prod.config_path.write_text(yaml.safe_dump(cfg))
    prod.start_listener()  # no workers: the jobs wait in Redis
    files = synthetic_cr(tmp_path / "in", 3)
    uids = _study_uids(files)
    _send(prod, files)

    def queued_in_redis() -> bool:
        jobs = _jobs(prod, uids)
        return len(jobs) == 3 and all(j["state"] == JobState.QUEUED for j in jobs) and redis.queue_length("inference") >= 3

    wait_for(queued_in_redis, 30, "three jobs queued in the database and in Redis", interval=0.2)
    redis.kill()
    redis.start()  # same port, nothing in it
    assert redis.queue_length("inference") == 0
    prod.start_worker("export1", "export")
    prod.start_worker("inf1")
    jobs = _all_done(prod, uids, 120)
    events = _requeue_events(prod)
    requeued = [j["id"] for j in jobs if j["id"] in events]
    if batch_size == 1:
        assert len(requeued) == 3, f"the reconciler did not re-send every lost job: {events}"
    else:
        assert requeued, "nothing was re-sent: the jobs cannot have started"
    assert all(j["attempt"] == 1 for j in jobs), jobs  # none ran twice
    _assert_one_sr_each(pacs, uids)


def test_fifty_studies_from_four_senders_with_two_workers(
    prod: ProductionNode, pacs: Orthanc, tmp_path: Path
) -> None:
    _start(prod, "inf1", "inf2")
    files = synthetic_cr(tmp_path / "in", 50, size=256)
    uids = _study_uids(files)
    errors: list[str] = []

    def sender(chunk: list[Path]) -> None:
        out = storescu(prod.port, *chunk, timeout=120)
        if out.returncode != 0:
            errors.append(out.stderr)

    threads = [threading.Thread(target=sender, args=(files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert not errors, errors
    jobs = _all_done(prod, uids, 300)
    assert len(jobs) == 50
    assert {j["worker"].split("@")[0] for j in jobs} == {"inf1", "inf2"}  # both workers took a share
    _assert_one_sr_each(pacs, uids)


def test_a_stat_study_jumps_the_queue(prod: ProductionNode, redis: Redis, tmp_path: Path) -> None:
    """Routine studies wait in Redis; a STAT one (rule priority 9) sent after them runs first."""
    import yaml

    cfg = yaml.safe_load(prod.config_path.read_text())
    cfg["routing"] = {"rules": [
        {"name": "stat-ed", "match": {"CallingAE": "ED_CR"}, "priority": 9},
        {"name": "routine", "match": {}, "priority": 4},
    ]}
    cfg["queue"]["batch_size"] = 1  # one job per pass, so the order is visible
    prod.config_path.write_text(yaml.safe_dump(cfg))
    prod.start_listener()  # no workers yet: everything waits in Redis
    files = synthetic_cr(tmp_path / "in", 4)
    routine, stat = files[:3], files[3:]
    out = storescu(prod.port, *routine, aet="WARD", timeout=120)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: len(_jobs(prod, _study_uids(routine))) == 3, 30, "three routine jobs", interval=0.2)
    out = storescu(prod.port, *stat, aet="ED_CR", timeout=120)
    assert out.returncode == 0, out.stderr
    uids = _study_uids(files)
    wait_for(lambda: len(_jobs(prod, uids)) == 4 and redis.queue_length("inference") == 4, 30,
             "four jobs waiting in Redis", interval=0.2)
    prod.start_worker("export1", "export")
    prod.start_worker("inference1")
    _all_done(prod, uids, 120)
    with session_scope(_url(prod)) as s:
        order = [j.study.study_instance_uid for j in s.scalars(select(Job).options(selectinload(Job.study))
                                                             .order_by(Job.running_at))]
    assert order[0] == _study_uids(stat)[0], "the STAT study did not run first"
