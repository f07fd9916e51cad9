"""The REST API over HTTP against `pacsnode run` with real peers: DCMTK storescu and curl send,
Orthanc receives. Covers first start, the study and job resources, metrics from the listener
and worker processes, STOW-RS, a PACS outage and bulk replay, and the security rules (401 for
every route without credentials, 403 for a viewer, 409 for an active job, injection-proof
filters, a revoked token refused at once, sessions shared by several API processes)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from node.db.models import utcnow
from tests.integration.node_api import (
    TIMEOUT,
    NodeApi,
    first_admin_password,
    node_for_module,
    orthanc_for_module,
)
from tests.peers import (
    REPO,
    Node,
    Orthanc,
    free_port,
    have,
    storescu,
    synthetic_cr,
    wait_for,
    wait_port,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "storescu", "curl"), reason="needs Orthanc, DCMTK and curl"),
]
PASSWORD = "integration passphrase"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    yield from orthanc_for_module(tmp_path_factory)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc, demo_bundle: Path) -> Iterator[Node]:
    yield from node_for_module(tmp_path_factory, pacs, demo_bundle, "orthanc")


@pytest.fixture(scope="module")
def api(node: Node) -> NodeApi:
    a = NodeApi(node)
    a.tokens["admin"] = node.cli("tokens", "create", "--user", "admin").strip()
    a.user("olga", "operator", PASSWORD)
    a.user("vic", "viewer", PASSWORD)
    return a


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Small chest CRs (RG1 downscaled), each its own study."""
    return synthetic_cr(tmp_path_factory.mktemp("cr"), 6, size=384)


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_first_start_makes_admin_with_a_private_password_file_and_logs_only_its_path(node: Node, api: NodeApi) -> None:
    path = node.config_path.parent / "var" / "admin-password.txt"
    password = first_admin_password(node)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    log = node.log()
    assert str(path) in log and password not in log
    r = httpx.post(f"{api.base}/api/v1/auth/login", json={"name": "admin", "password": password}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["role"] == "admin" and "pacsnode_session" in r.cookies


def test_a_stored_study_is_listed_shown_and_counted_by_every_process(api: NodeApi, node: Node, pacs: Orthanc,
                                                                    images: list[Path]) -> None:
    assert storescu(node.port, images[0]).returncode == 0
    uid = _uid(images[0])
    job = api.wait_job(uid, "done")
    page = api.get(f"/api/v1/studies?q={uid}").json()
    assert [s["study_instance_uid"] for s in page["items"]] == [uid]
    item = page["items"][0]
    assert item["state"] == "complete" and item["instances"] == 1 and item["jobs"] == [job["id"]]
    assert item["completion_rule"] and item["received_at"] and item["completed_at"] and item["skip_reason"] is None
    detail = api.study(uid)
    assert detail["series"][0]["routing"]["action"] == "process"
    assert detail["latest_result"]["job"] == job["id"] and len(detail["findings"]) >= 2
    assert all(0 <= f["probability"] <= 1 and f["decision"] in ("Present", "Absent") for f in detail["findings"])
    events = [e["event"] for e in detail["timeline"]]
    assert events[0] == "first instance received" and f"job {job['id']} done" in events
    assert any(e.endswith("stored at orthanc") for e in events)
    sent = {o["sop_instance_uid"]: o["sends"][0] for o in detail["job_details"][0]["outputs"]}
    assert {(s["destination"], s["state"], s["remote_status"]) for s in sent.values()} == {("orthanc", "sent", 0)}
    assert all(pacs.has_instance(sop) for sop in sent)
    full = api.get(f"/api/v1/jobs/{job['id']}").json()
    for state in ("queued", "running", "encoded", "sending", "done"):
        assert full[f"{state}_at"], state
    assert {"read", "inference", "encode", "validate", "send"} <= set(full["timings"])
    # /metrics sums what the listener, the workers and the API processes counted.
    text = api.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("pacsnode_instances_received_total", (("status", "0x0000"),))] >= 1  # listener
    assert samples[("pacsnode_stage_duration_seconds_count", (("stage", "inference"),))] >= 1  # inference worker
    assert samples[("pacsnode_sends_total", (("destination", "orthanc"), ("status", "ok")))] >= len(sent)  # export worker
    assert samples[("pacsnode_studies_completed_total", (("rule", item["completion_rule"]),))] >= 1
    assert samples[("pacsnode_job_transitions_total", (("state", "done"),))] >= 1  # export worker
    assert ("pacsnode_jobs", (("state", "running"),)) in samples  # read from the database at scrape time
    assert ("pacsnode_worker_heartbeat_age_seconds", (("queue", "inference"),)) in samples
    assert uid not in text


def test_stow_rs_with_curl_is_processed_like_a_c_store(api: NodeApi, pacs: Orthanc, images: list[Path],
                                                       tmp_path: Path) -> None:
    body = tmp_path / "body.mime"
    body.write_bytes(b"--XX\r\nContent-Type: application/dicom\r\n\r\n" + images[1].read_bytes() + b"\r\n--XX--\r\n")
    out = subprocess.run(["curl", "-sS", "--max-time", "60", "-o", str(tmp_path / "answer.json"), "-w", "%{http_code}",
                          "-H", f"Authorization: Bearer {api.tokens['olga']}",
                          "-H", 'Content-Type: multipart/related; type="application/dicom"; boundary=XX',
                          "--data-binary", f"@{body}", f"{api.base}/dicom-web/studies"],
                         capture_output=True, text=True, timeout=90)
    assert out.stdout == "200", out.stderr + (tmp_path / "answer.json").read_text()
    uid = _uid(images[1])
    job = api.wait_job(uid, "done")
    assert all(pacs.has_instance(o["sop_instance_uid"]) for o in job["outputs"])


def test_pacs_down_fails_the_job_and_a_bulk_replay_after_it_is_back_sends_each_object_once(
        api: NodeApi, node: Node, pacs: Orthanc, images: list[Path]) -> None:
    since = (utcnow() - timedelta(seconds=5)).isoformat()
    pacs.stop()
    try:
        assert storescu(node.port, images[2]).returncode == 0
        uid = _uid(images[2])
        failed = api.wait_job(uid, "failed", timeout=240)
        assert failed["error_stage"] == "send" and failed["error"]
    finally:
        pacs.start()
    r = api.post("/api/v1/jobs/replay", as_="olga", json={"state": "failed", "since": since, "reason": "PACS is back"})
    assert r.status_code == 200, r.text
    assert [x["replayed"] for x in r.json()] == [failed["id"]]
    job = api.wait_job(uid, "done", after=failed["id"])
    assert job["replay_of"] == failed["id"]
    for o in job["outputs"]:
        assert len([h for h in pacs.lookup(o["sop_instance_uid"]) if h["Type"] == "Instance"]) == 1
    audit = api.get("/api/v1/audit?kind=replay").json()["items"]
    assert audit[0]["actor"] == "api:olga" and "PACS is back" in audit[0]["detail"] and audit[0]["address"] == "127.0.0.1"


def test_replay_of_an_active_job_is_409_and_a_viewers_replay_is_403(api: NodeApi, node: Node, images: list[Path]) -> None:
    assert storescu(node.port, images[3]).returncode == 0
    done = api.wait_job(_uid(images[3]), "done")
    r = api.post(f"/api/v1/jobs/{done['id']}/replay", as_="vic", json={"reason": "curious"})
    assert r.status_code == 403 and r.headers["content-type"] == "application/problem+json"
    r = api.post(f"/api/v1/jobs/{done['id']}/replay", as_="olga", json={"reason": "new weights"})
    assert r.status_code == 201
    new = r.json()["job"]
    r = api.post(f"/api/v1/jobs/{new}/replay", as_="olga", json={"reason": "again"})
    assert r.status_code == 409 and "still active" in r.json()["title"]
    api.wait_job(_uid(images[3]), "done", after=done["id"])


def test_every_route_without_credentials_is_401_over_http(api: NodeApi) -> None:
    assert api.get("/api/v1/openapi.json", as_=None).status_code == 401
    paths = api.get("/api/v1/openapi.json").json()["paths"]
    open_paths = {"/healthz", "/readyz", "/api/v1/auth/login"}
    checked = 0
    for path, methods in paths.items():
        if path in open_paths:
            continue
        url = re.sub(r"\{(\w+)\}", lambda m: "1" if m.group(1) in ("job_id", "token_id") else "x", path)
        for method in methods:
            assert api.request(method.upper(), url).status_code == 401, (method, url)
            checked += 1
    for method, url in (("GET", "/"), ("GET", "/studies"), ("GET", "/jobs"), ("POST", "/jobs/1/replay"),
                        ("GET", "/users"), ("GET", "/audit"), ("GET", "/results/1/preview.png")):
        assert api.request(method, url, headers={"Accept": "text/html"}).status_code == 401, url
        checked += 1
    assert checked >= 30
    assert api.get("/healthz", as_=None).json() == {"status": "ok"}


def test_q_and_filters_are_not_injectable_and_a_search_is_not_logged(api: NodeApi, node: Node) -> None:
    total = len(api.get("/api/v1/studies?limit=500").json()["items"])
    assert api.get("/api/v1/studies", params={"q": "PATIENT-ID-8812"}).json()["items"] == []
    for q in ("' OR '1'='1", "1 OR 1=1; DROP TABLE study; --", "%", "*", "\\", "1.2%"):
        r = api.get("/api/v1/studies", params={"q": q})
        assert r.status_code == 200 and r.json()["items"] == [], q
    for params, field in (({"state": "complete' OR '1'='1"}, "state"), ({"limit": "-1"}, "limit"),
                          ({"cursor": "' OR 1=1"}, "cursor"), ({"since": "1; DROP TABLE job"}, "since")):
        r = api.get("/api/v1/studies", params=params)
        assert r.status_code == 422 and r.json()["errors"][0]["field"] == field, params
    r = api.get("/api/v1/jobs", params={"state": "failed' --"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "state"
    assert len(api.get("/api/v1/studies?limit=500").json()["items"]) == total  # nothing harmed
    assert "GET /api/v1/studies 200" in node.log() and "PATIENT-ID-8812" not in node.log()


def test_a_revoked_token_is_refused_at_once(api: NodeApi, node: Node) -> None:
    token = node.cli("tokens", "create", "--user", "vic").strip()
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{api.base}/api/v1/studies", headers=headers, timeout=TIMEOUT).status_code == 200
    token_id = max(t["id"] for t in api.get("/api/v1/tokens").json() if t["user"] == "vic")  # the newest
    node.cli("tokens", "revoke", str(token_id))  # another process, as an admin at the shell would
    assert httpx.get(f"{api.base}/api/v1/studies", headers=headers, timeout=TIMEOUT).status_code == 401


def test_a_second_api_process_shares_sessions_and_metrics(api: NodeApi, node: Node, tmp_path: Path) -> None:
    """`pacsnode api --workers 2` on another port, same config otherwise: a session made on the
    first API works on the second, a logout on the second ends it on the first, and both count
    into the same /metrics."""
    cfg = yaml.safe_load(node.config_path.read_text())
    port = free_port()
    cfg["api"]["port"] = port
    cfg["api"]["state_dir"] = str(node.config_path.parent / "var")
    second = tmp_path / "config.yaml"
    second.write_text(yaml.safe_dump(cfg))
    log = open(tmp_path / "api2.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "--config", str(second), "api", "--workers", "2"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_port(port, 60)
        other = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{other}/healthz", timeout=TIMEOUT).status_code == 200, 60, "the second API")
        r = httpx.post(f"{api.base}/api/v1/auth/login", json={"name": "olga", "password": PASSWORD}, timeout=TIMEOUT)
        cookies, csrf = r.cookies, r.json()["csrf_token"]
        for _ in range(4):  # whichever worker process answers
            assert httpx.get(f"{other}/api/v1/auth/me", cookies=cookies, timeout=TIMEOUT).json()["name"] == "olga"
        assert httpx.post(f"{other}/api/v1/auth/logout", cookies=cookies, headers={"X-CSRF-Token": csrf},
                          timeout=TIMEOUT).status_code == 204
        assert httpx.get(f"{api.base}/api/v1/auth/me", cookies=cookies, timeout=TIMEOUT).status_code == 401
        text = httpx.get(f"{api.base}/metrics", headers={"Authorization": f"Bearer {api.tokens['admin']}"},
                         timeout=TIMEOUT).text
        logouts = [s for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "pacsnode_http_request_duration_seconds_count" and s.labels["route"] == "/api/v1/auth/logout"]
        assert logouts and logouts[0].value >= 1  # counted by the second API, read through the first
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
        log.close()


def _held_by_pacs(pacs: Orthanc, study_uid: str) -> list[str]:
    """Every instance Orthanc holds in the study (its ids): here, our results."""
    return sorted(i for se in pacs.study_series(study_uid) for i in se["Instances"])


def test_retention_purges_a_done_study_from_the_spool_only_and_a_resend_then_replay_redoes_it_unchanged(
        api: NodeApi, node: Node, pacs: Orthanc, images: list[Path]) -> None:
    # Last in the module: the purge below takes every settled study's files, not only this one's.
    import json
    import time

    uid = _uid(images[4])
    assert storescu(node.port, images[4]).returncode == 0
    done = api.wait_job(uid, "done")
    held = _held_by_pacs(pacs, uid)
    assert len(held) == len(done["outputs"])
    time.sleep(2.5)  # past the cutoff of --days 0.00002 (1.7 s)
    report = json.loads(node.cli("purge", "--days", "0.00002", "--json"))
    assert uid in report["studies"] and report["files"] >= 1 + len(done["outputs"])
    study = api.study(uid)
    assert study["purged_at"] is not None
    assert _held_by_pacs(pacs, uid) == held  # nothing is ever deleted on the PACS
    audit = api.get("/api/v1/audit?kind=purge").json()["items"]
    assert any(uid in (e["detail"] or "") for e in audit)
    r = api.post(f"/api/v1/jobs/{done['id']}/replay", as_="olga", json={"reason": "after the purge"})
    assert r.status_code == 409 and r.headers["content-type"] == "application/problem+json"
    assert "no longer in the spool" in r.json()["detail"] and "retention_days" in r.json()["detail"]

    # Sent again: the file comes back (a duplicate starts nothing), and a replay redoes the study
    # into the same objects under the same UIDs: the PACS receives nothing new.
    assert storescu(node.port, images[4]).returncode == 0
    assert api.study(uid)["purged_at"] is None
    r = api.post(f"/api/v1/jobs/{done['id']}/replay", as_="olga", json={"reason": "sent again"})
    assert r.status_code == 201, r.text
    again = api.wait_job(uid, "done", after=done["id"])
    assert sorted(o["sop_instance_uid"] for o in again["outputs"]) == \
        sorted(o["sop_instance_uid"] for o in done["outputs"])
    assert _held_by_pacs(pacs, uid) == held
    assert not api.get("/api/v1/audit?kind=revision").json()["items"]
