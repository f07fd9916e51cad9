"""GET /metrics: every metric the issue names, summed across processes (prometheus_client
multiprocess mode), in base units, with no UID or patient data in any label."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from node.db.models import JobState
from tests.peers import REPO
from tests.unit.api_data import make_api
from tests.unit.jobs_data import make_job

UID = re.compile(r"\d+\.\d+\.\d+")


def _other_process(state_dir: Path) -> None:
    """What a listener and a worker record, from a process of their own that imported
    prometheus_client before node.metrics.setup() (a library may do that)."""
    script = textwrap.dedent(f"""
        import prometheus_client  # noqa: F401  (first, as a library might)
        from node import metrics
        from node.engine.errors import Stage
        from node.config import parse_config
        metrics.setup(parse_config({{"api": {{"state_dir": {str(state_dir)!r}}}}}))
        metrics.instance_received(0x0000, 0.02)
        metrics.instance_received(0x0000, 0.03)
        metrics.instance_refused(0xC210)
        metrics.association_refused("policy")
        metrics.study_completed("quiet")
        metrics.job_state("done")
        for stage in ("decode", "inference", "encode", "validate", "send"):
            metrics.stage_seconds(Stage(stage), 0.2)
        metrics.send_result("pacs", "ok")
        metrics.database_write_wait(0.004)
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO, timeout=120)


def test_metrics_of_all_processes_with_base_units_and_no_identifiers(tmp_path: Path) -> None:
    api = make_api(tmp_path)
    make_job(api.config, JobState.FAILED)
    make_job(api.config, JobState.RUNNING)
    _other_process(api.config.api.state_dir)
    _other_process(api.config.api.state_dir)  # a second process: its counts add up
    api.client.get("/api/v1/studies/1.2.826.0.1.3680043.9.9", headers=api.as_("viewer"))  # a UID in a path
    r = api.client.get("/metrics", headers=api.as_("viewer"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}

    def value(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("pacsnode_instances_received_total", status="0x0000") == 4
    assert value("pacsnode_instances_refused_total", status="0xC210") == 2
    assert value("pacsnode_associations_refused_total", reason="policy") == 2
    assert value("pacsnode_store_duration_seconds_count") == 4
    assert abs(value("pacsnode_store_duration_seconds_sum") - 0.1) < 1e-9
    assert value("pacsnode_studies_completed_total", rule="quiet") == 2
    assert value("pacsnode_job_transitions_total", state="done") == 2
    for stage in ("decode", "inference", "encode", "validate", "send"):
        assert value("pacsnode_stage_duration_seconds_count", stage=stage) == 2, stage
    assert value("pacsnode_sends_total", destination="pacs", status="ok") == 2
    # two from the other processes; this one's own writes (the jobs above) may add theirs
    assert value("pacsnode_database_write_wait_seconds_count") >= 2
    assert value("pacsnode_database_write_wait_seconds_sum") >= 0.008
    # Read at scrape time from the database, broker and disk:
    assert value("pacsnode_jobs", state="running") == 1 and value("pacsnode_jobs", state="queued") == 0
    assert value("pacsnode_studies", state="receiving") == 0
    assert value("pacsnode_queue_depth", queue="inference") == 0 and value("pacsnode_broker_up") == 1
    assert value("pacsnode_spool_free_bytes") > 0
    assert value("pacsnode_http_request_duration_seconds_count", method="GET", route="/api/v1/studies/{study_instance_uid}",
                 status="404") == 1
    for f in families.values():
        assert f.name.startswith("pacsnode_"), f.name
        assert not re.search(r"_(ms|milliseconds|kb|mb|minutes)$", f.name), f.name
        for s in f.samples:
            for k, v in s.labels.items():
                assert k == "le" or not UID.search(v), (s.name, k, v)


def test_heartbeat_age_is_per_queue(tmp_path: Path) -> None:
    from datetime import timedelta

    from node.db.models import WorkerBeat, utcnow
    from node.db.session import session_scope

    api = make_api(tmp_path)
    now = utcnow()
    with session_scope(api.config.database.url) as s:
        s.add_all([WorkerBeat(name="a@h", queues="inference", started_at=now, seen_at=now - timedelta(seconds=30)),
                   WorkerBeat(name="b@h", queues="inference", started_at=now, seen_at=now - timedelta(seconds=5)),
                   WorkerBeat(name="c@h", queues="export", started_at=now, seen_at=now - timedelta(seconds=90))])
    text = api.client.get("/metrics", headers=api.as_("viewer")).text
    ages = {s.labels["queue"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == "pacsnode_worker_heartbeat_age_seconds"}
    assert 4 < ages["inference"] < 20 and 89 < ages["export"] < 120
