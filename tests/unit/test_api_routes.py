"""/api/v1 studies and jobs: filters, keyset paging, injection-proof q, problem+json, 404, 409."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from node.db.models import Event, Job, JobState, Output, Send, SendState, Study
from node.db.session import session_scope
from node.handlers import IngestContext, ingest
from node.spool import write_atomic
from tests.unit.api_data import Api, make_api
from tests.unit.jobs_data import make_job

CT = Path(get_testdata_file("CT_small.dcm"))  # PatientID 1CT1


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return make_api(tmp_path)


def test_study_list_filters_pages_and_finds_by_patient_id_hash(api: Api) -> None:
    ids = [make_job(api.config, JobState.DONE, age_s=100 - i) for i in range(5)]
    study_uid, _ = ingest(CT.read_bytes(), IngestContext(api.config), "MODALITY")
    h = api.as_("viewer")
    page = api.client.get("/api/v1/studies?limit=2", headers=h).json()
    assert page["items"][0]["study_instance_uid"] == study_uid  # newest first
    seen = [it["id"] for it in page["items"]]
    while page["next_cursor"]:
        page = api.client.get(f"/api/v1/studies?limit=2&cursor={page['next_cursor']}", headers=h).json()
        seen += [it["id"] for it in page["items"]]
    assert len(seen) == 6 and seen == sorted(seen, reverse=True)
    assert [s["state"] for s in api.client.get("/api/v1/studies?state=receiving", headers=h).json()["items"]] == ["receiving"]
    found = api.client.get("/api/v1/studies", params={"q": "1CT1"}, headers=h).json()["items"]
    assert [s["study_instance_uid"] for s in found] == [study_uid]
    with session_scope(api.config.database.url) as s:
        st = s.scalar(select(Study).where(Study.study_instance_uid == study_uid))
        assert st is not None and st.patient_id_hash and "1CT1" not in st.patient_id_hash
    assert api.client.get("/api/v1/studies", params={"q": study_uid}, headers=h).json()["items"][0]["state"] == "receiving"
    for evil in ("' OR 1=1 --", "%", "1CT", "\" OR \"\"=\""):
        assert api.client.get("/api/v1/studies", params={"q": evil}, headers=h).json()["items"] == [], evil
    with session_scope(api.config.database.url) as s:
        assert s.get(Job, ids[0]) is not None  # nothing was harmed


def test_bad_fields_are_problem_json_naming_the_field(api: Api) -> None:
    h = api.as_("viewer")
    for url, field in (("/api/v1/studies?state=bogus", "state"), ("/api/v1/studies?limit=0", "limit"),
                       ("/api/v1/studies?since=yesterday", "since"), ("/api/v1/studies?cursor=abc", "cursor"),
                       ("/api/v1/jobs?state=nope", "state"), ("/api/v1/jobs/x", "job_id")):
        r = api.client.get(url, headers=h)
        assert r.status_code == 422, url
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["errors"][0]["field"] == field, (url, r.json())
        assert "Traceback" not in r.text
    r = api.client.post("/api/v1/jobs/1/replay", json={}, headers=api.as_("operator"))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "reason"


def test_unknown_ids_are_404(api: Api) -> None:
    h = api.as_("operator")
    assert api.client.get("/api/v1/studies/1.2.3.4", headers=h).status_code == 404
    assert api.client.get("/api/v1/jobs/999", headers=h).status_code == 404
    assert api.client.post("/api/v1/jobs/999/replay", json={"reason": "x"}, headers=h).status_code == 404
    assert api.client.post("/api/v1/destinations/none/echo", headers=h).status_code == 404


def test_replay_cancel_resend_and_409_for_active_jobs(api: Api) -> None:
    h = api.as_("operator")
    running = make_job(api.config, JobState.RUNNING)
    r = api.client.post(f"/api/v1/jobs/{running}/replay", json={"reason": "again"}, headers=h)
    assert r.status_code == 409 and "cancel it before replaying" in r.json()["detail"]
    failed = make_job(api.config, JobState.FAILED, failed_at=None)
    r = api.client.post(f"/api/v1/jobs/{failed}/replay", json={"reason": "PACS back"}, headers=h)
    assert r.status_code == 201
    new = r.json()["job"]
    job = api.client.get(f"/api/v1/jobs/{new}", headers=h).json()
    assert job["state"] == "queued" and job["replay_of"] == failed
    assert api.client.post(f"/api/v1/jobs/{new}/cancel", json={"reason": "dup"}, headers=h).status_code == 200
    assert api.client.post(f"/api/v1/jobs/{new}/cancel", json={"reason": "dup"}, headers=h).status_code == 409
    # Re-send: a done job with results goes back to sending, its sends pending again.
    done = make_job(api.config, JobState.DONE)
    with session_scope(api.config.database.url) as s:
        out = Output(job_id=done, kind="sr", sop_class_uid="1.2", sop_instance_uid="1.2.3", series_instance_uid="1.2.4",
                     path="x.dcm")
        s.add(out)
        s.flush()
        s.add(Send(output_id=out.id, destination="pacs", state=SendState.SENT, attempts=1))
    r = api.client.post(f"/api/v1/jobs/{done}/resend", json={"reason": "PACS lost it"}, headers=h)
    assert r.status_code == 409 and "1 of its 1 result objects are no longer in the spool" in r.json()["detail"]
    write_atomic(api.config.storage.path, "x.dcm", b"DICM")
    assert api.client.post(f"/api/v1/jobs/{done}/resend", json={"reason": "PACS lost it"}, headers=h).status_code == 200
    with session_scope(api.config.database.url) as s:
        assert s.get_one(Job, done).state == JobState.SENDING
        assert s.scalar(select(Send.state)) == SendState.PENDING
        assert s.scalar(select(Event.detail).where(Event.kind == "resend")) == "PACS lost it"
    no_results = make_job(api.config, JobState.FAILED)
    assert api.client.post(f"/api/v1/jobs/{no_results}/resend", json={"reason": "x"}, headers=h).status_code == 409


def test_bulk_replay_of_failed_jobs_since(api: Api) -> None:
    from node.db.models import utcnow

    old = make_job(api.config, JobState.FAILED, age_s=7200, failed_at=utcnow().replace(year=2020))
    recent = make_job(api.config, JobState.FAILED, failed_at=utcnow())
    since = utcnow().replace(year=2021).isoformat()
    r = api.client.post("/api/v1/jobs/replay", json={"state": "failed", "since": since, "reason": "fixed"},
                        headers=api.as_("operator"))
    assert r.status_code == 200 and [x["replayed"] for x in r.json()] == [recent]
    assert old not in [x["replayed"] for x in r.json()]


def test_study_detail_shows_series_routing_and_is_audited(api: Api) -> None:
    study_uid, _ = ingest(CT.read_bytes(), IngestContext(api.config), "MODALITY")
    r = api.client.get(f"/api/v1/studies/{study_uid}", headers=api.as_("viewer"))
    assert r.status_code == 200
    body = r.json()
    assert body["series"][0]["modality"] == "CT" and body["instances"] == 1
    assert "1CT1" not in r.text  # no patient identifier in the API
    with session_scope(api.config.database.url) as s:
        ev = s.scalar(select(Event).where(Event.kind == "view_study"))
        assert ev is not None and ev.actor == "api:viewer" and ev.detail == study_uid and ev.address == "testclient"


def test_rules_test_explains_the_decision(api: Api) -> None:
    r = api.client.post("/api/v1/rules/test", files={"file": ("ct.dcm", CT.read_bytes(), "application/dicom")},
                        headers=api.as_("operator"))
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "skip" and "CT" in r.json()["reason"]
    r = api.client.post("/api/v1/rules/test", files={"file": ("x.dcm", b"not dicom", "application/dicom")},
                        headers=api.as_("operator"))
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "file"


def test_readyz_names_the_missing_worker(api: Api) -> None:
    r = api.client.get("/readyz")
    assert r.status_code == 503 and "worker" in r.json()["reason"]
    assert r.json()["checks"]["database"]["ok"] is True


def test_study_detail_has_timeline_latest_result_and_findings(api: Api) -> None:
    from tests.unit.web_data import probabilities, study_with_results

    r = study_with_results(api.config)
    body = api.client.get(f"/api/v1/studies/{r.study_uid}", headers=api.as_("viewer")).json()
    latest = body["latest_result"]
    assert (latest["job"], latest["state"], latest["sr"]["output_id"]) == (r.job_id, "done", r.sr_output)
    assert [o["output_id"] for o in latest["overlays"]] == [r.sc_output]
    assert {f["label"]: f["probability"] for f in body["findings"]} == probabilities()
    assert {f["decision"] for f in body["findings"]} == {"Present", "Absent"} and {f["threshold"] for f in body["findings"]} == {0.5}
    events = [e["event"] for e in body["timeline"]]
    assert events[0] == "first instance received" and events[-1] == "SC confirmed in pacs"
    assert [e["after_seconds"] for e in body["timeline"]] == sorted(e["after_seconds"] for e in body["timeline"])
    sends = [sd for o in body["job_details"][0]["outputs"] for sd in o["sends"]]
    assert [(sd["destination"], sd["state"], sd["remote_status"]) for sd in sends] == [("pacs", "sent", 0)] * 2
    assert "Doe" not in str(body) and "PID-1" not in str(body)  # the JSON API carries no patient attribute


def test_overview_figures(api: Api) -> None:
    from datetime import timedelta

    from node.db.models import utcnow

    now = utcnow()
    with session_scope(api.config.database.url) as s:
        for i, seconds in enumerate((10, 20, 30, 40)):  # four first runs done in the last hour
            st = Study(study_instance_uid=f"1.2.9.{i}", state="complete", first_received_at=now - timedelta(minutes=5),
                       last_received_at=now - timedelta(minutes=5), completed_at=now - timedelta(minutes=4))
            s.add(st)
            s.flush()
            s.add(Job(study_id=st.id, pipeline="chest_xray", state=JobState.DONE, instance_ids=[], timings={},
                      done_at=now - timedelta(minutes=5) + timedelta(seconds=seconds), updated_at=now))
        job = Job(study_id=st.id, pipeline="chest_xray", state=JobState.SENDING, instance_ids=[], timings={})
        s.add(job)
        s.flush()
        out = Output(job_id=job.id, kind="sr", sop_class_uid="1.2", sop_instance_uid="1.2.3", series_instance_uid="1.2.4",
                     path="x.dcm")
        s.add(out)
        s.flush()
        s.add(Send(output_id=out.id, destination="pacs", state=SendState.PENDING, attempts=2, error="association rejected"))
    body = api.client.get("/api/v1/overview", headers=api.as_("viewer")).json()
    assert body["counts"]["jobs"]["last_day"]["done"] == 4 and body["counts"]["jobs"]["now"]["sending"] == 1
    assert body["counts"]["studies"]["last_day"]["complete"] == 4 and body["counts"]["studies"]["now"] == {"receiving": 0}
    hour = body["last_hour"]
    assert (hour["received"], hour["completed"], hour["jobs_done"]) == (4, 4, 4)
    assert (hour["turnaround_p50"], hour["turnaround_p95"]) == (20, 40)
    assert body["failing"] == [{"destination": "pacs", "failed": 0, "retrying": 1, "last_error": "association rejected",
                                "last_at": body["failing"][0]["last_at"]}]
    assert body["queues"] == {"inference": 0, "export": 0} and body["disk"]["free_bytes"] > 0
    assert body["disk"]["retention_days"] is None  # storage.retention_days: off unless set


def test_users_and_tokens_over_the_api_are_for_admins_and_audited(api: Api) -> None:
    h = api.as_("admin")
    assert api.client.get("/api/v1/users", headers=api.as_("operator")).status_code == 403
    r = api.client.post("/api/v1/users", json={"name": "alice", "role": "operator", "password": "a long passphrase"},
                        headers=h)
    assert r.status_code == 201 and r.json()["role"] == "operator"
    r = api.client.post("/api/v1/users", json={"name": "bob", "role": "boss", "password": "a long passphrase"},
                        headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "role"
    r = api.client.post("/api/v1/tokens", json={"user": "alice", "expires_days": 7}, headers=h)
    assert r.status_code == 201
    token, token_id = r.json()["token"], r.json()["id"]
    alice = {"Authorization": f"Bearer {token}"}
    assert api.client.get("/api/v1/auth/me", headers=alice).json()["name"] == "alice"
    assert all("token" not in t for t in api.client.get("/api/v1/tokens", headers=h).json())  # never shown again
    assert api.client.delete(f"/api/v1/tokens/{token_id}", headers=h).status_code == 204
    assert api.client.get("/api/v1/auth/me", headers=alice).status_code == 401  # refused at once
    assert api.client.put("/api/v1/users/alice/password", json={"password": "another passphrase"}, headers=h).status_code == 204
    r = api.client.delete("/api/v1/users/admin", headers=h)
    assert r.status_code == 422 and "last admin" in r.json()["detail"]
    assert api.client.delete("/api/v1/users/alice", headers=h).status_code == 204
    assert api.client.delete("/api/v1/users/alice", headers=h).status_code == 404
    with session_scope(api.config.database.url) as s:
        kinds = [(e.kind, e.actor) for e in s.scalars(select(Event).where(Event.actor == "api:admin").order_by(Event.id))]
    assert kinds == [("user_add", "api:admin"), ("token_create", "api:admin"), ("token_revoke", "api:admin"),
                     ("user_password", "api:admin"), ("user_remove", "api:admin")]


def test_a_replayed_job_says_which_job_replayed_it(api: Api) -> None:
    failed = make_job(api.config, JobState.FAILED)
    h = api.as_("operator")
    new = api.client.post(f"/api/v1/jobs/{failed}/replay", json={"reason": "PACS back"}, headers=h).json()["job"]
    assert api.client.get(f"/api/v1/jobs/{failed}", headers=h).json()["replayed_as"] == [new]
    listed = {j["id"]: j for j in api.client.get("/api/v1/jobs", headers=h).json()["items"]}
    assert listed[failed]["replayed_as"] == [new] and listed[new]["replayed_as"] == []


def test_a_purge_over_the_api_is_for_admins_names_a_missing_days_and_is_audited(api: Api) -> None:
    h = api.as_("admin")
    done = make_job(api.config, JobState.DONE, age_s=3 * 86400)
    with session_scope(api.config.database.url) as s:
        uid = s.get_one(Job, done).study.study_instance_uid
    assert api.client.post("/api/v1/spool/purge", json={"days": 1}, headers=api.as_("operator")).status_code == 403
    r = api.client.post("/api/v1/spool/purge", json={"dry_run": True}, headers=h)  # storage.retention_days unset
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "days"
    r = api.client.post("/api/v1/spool/purge", json={"days": 0}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "days"
    r = api.client.post("/api/v1/spool/purge", json={"days": 1, "dry_run": True}, headers=h)
    assert r.status_code == 200 and r.json()["studies"] == [uid] and r.json()["dry_run"] is True
    assert api.client.get(f"/api/v1/studies/{uid}", headers=h).json()["purged_at"] is None
    r = api.client.post("/api/v1/spool/purge", json={"days": 1}, headers=h)
    assert r.status_code == 200 and r.json()["studies"] == [uid]
    assert api.client.get(f"/api/v1/studies/{uid}", headers=h).json()["purged_at"] is not None
    audit = api.client.get("/api/v1/audit?kind=purge", headers=h).json()["items"]
    assert [(e["actor"], uid in e["detail"]) for e in audit] == [("api:admin", True)]


def test_echo_of_a_destination_that_rejects_us_gives_its_reason(tmp_path: Path) -> None:
    """A PACS that does not know our calling AE title rejects the association with that reason:
    the echo says it, so an admin knows what to change on the PACS."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from tests.peers import free_port

    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(Verification)
    pacs.require_calling_aet = ["SOMEONE_ELSE"]
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False)
    try:
        api = make_api(tmp_path, destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                                                "port": port, "timeout": 5}])
        body = api.client.post("/api/v1/destinations/pacs/echo", headers=api.as_("operator")).json()
    finally:
        server.shutdown()
    assert body["ok"] is False
    assert body["detail"] == "association rejected (Rejected Permanent; Service User: Calling AE title not recognised)"
