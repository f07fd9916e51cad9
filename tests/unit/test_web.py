"""Dashboard pages through the real app: login, roles, CSRF on every form, escaping, the study
page (findings, overlay preview, SR text, timeline, audit), jobs actions, users and tokens."""

from __future__ import annotations

import re
from io import BytesIO
from pathlib import Path

import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from node.db.models import Event, Job, JobState, Output, Study, StudyState
from node.db.session import session_scope
from tests.unit.api_data import PASSWORD, Api, make_api
from tests.unit.jobs_data import make_job
from tests.unit.web_data import probabilities, study_with_results

CT = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return make_api(tmp_path)


def login(api: Api, name: str) -> str:
    """Log in through the form as a browser does; return the session's CSRF token."""
    form = api.client.get("/login")
    token = re.search(r'name="login_token" value="([^"]+)"', form.text)
    assert token, "the login form has no token"
    r = api.client.post("/login", data={"name": name, "password": PASSWORD, "login_token": token.group(1)},
                        follow_redirects=False)
    assert r.status_code == 303, r.text
    m = re.search(r'name="csrf_token" value="([^"]+)"', api.client.get("/account").text)
    assert m, "no CSRF token in the page"
    return m.group(1)


def _events(api: Api, kind: str) -> list[Event]:
    with session_scope(api.config.database.url) as s:
        return list(s.scalars(select(Event).where(Event.kind == kind).order_by(Event.id)))


def test_pages_send_a_browser_to_login_and_scripts_get_401(api: Api) -> None:
    r = api.client.get("/studies?state=complete", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
    assert 'url=/login?next=%2Fstudies%3Fstate%3Dcomplete' in r.text
    assert api.client.get("/jobs").headers["content-type"] == "application/problem+json"
    assert api.client.get("/metrics").status_code == 401


def test_every_dashboard_route_refuses_anonymous_callers(api: Api) -> None:
    from fastapi.routing import APIRoute

    from node.web import admin, jobs, overview, session, studies

    open_paths = {"/login"}
    checked = 0
    for module in (admin, jobs, overview, session, studies):
        for route in module.router.routes:
            assert isinstance(route, APIRoute)
            if route.path in open_paths:
                continue
            url = re.sub(r"\{(\w+)\}", lambda m: {"job_id": "1", "output_id": "1", "token_id": "1"}.get(m.group(1), "x"),
                         route.path)
            for method in route.methods:
                r = api.client.request(method, url)
                assert r.status_code == 401, (method, url, r.status_code)
                checked += 1
    assert checked >= 25
    assert api.client.get("/static/htmx.min.js").status_code == 200  # the vendored script is public


def test_login_needs_the_forms_own_token_and_goes_back_only_to_this_site(api: Api) -> None:
    r = api.client.post("/login", data={"name": "viewer", "password": PASSWORD, "login_token": "forged"})
    assert r.status_code == 403 and "expired" in r.text
    token = re.search(r'name="login_token" value="([^"]+)"', api.client.get("/login").text).group(1)  # type: ignore[union-attr]
    r = api.client.post("/login", data={"name": "viewer", "password": "wrong password", "login_token": token})
    assert r.status_code == 401 and "Wrong name or password" in r.text
    token = re.search(r'name="login_token" value="([^"]+)"', api.client.get("/login").text).group(1)  # type: ignore[union-attr]
    r = api.client.post("/login", data={"name": "viewer", "password": PASSWORD, "login_token": token,
                                        "next": "//evil.example/x"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert [e.actor for e in _events(api, "login")] == ["web:viewer"]
    assert [e.actor for e in _events(api, "login_failed")] == ["viewer"]


def test_every_page_renders_for_its_roles_and_hides_what_a_role_may_not_do(api: Api) -> None:
    r = study_with_results(api.config)
    make_job(api.config, JobState.FAILED, error_stage="send", error="association rejected")
    login(api, "viewer")
    for path in ("/", "/fragments/overview", "/studies", "/studies?state=complete&since=1h", f"/studies/{r.study_uid}",
                 f"/jobs/{r.job_id}", "/jobs", "/jobs?state=failed", "/rules", "/destinations", "/models", "/account"):
        page = api.client.get(path)
        assert page.status_code == 200, (path, page.text[-500:])
        assert "<script>" not in page.text.replace('<script src="/static/htmx.min.js" defer></script>', ""), path
    assert "off: every file is kept" in api.client.get("/fragments/overview").text  # storage.retention_days unset
    jobs = api.client.get("/jobs").text
    assert "association rejected" in jobs and "Replay job" not in jobs  # a viewer sees no operator action
    assert api.client.get("/audit").status_code == 403 and api.client.get("/users").status_code == 403
    assert "Drop a DICOM file" not in api.client.get("/rules").text
    api.client.cookies.clear()
    login(api, "operator")
    assert "Replay job" in api.client.get("/jobs").text and "Drop a DICOM file" in api.client.get("/rules").text
    assert api.client.get("/users").status_code == 403
    api.client.cookies.clear()
    login(api, "admin")
    for path in ("/audit", "/audit?kind=login", "/users"):
        assert api.client.get(path).status_code == 200, path


def test_every_form_post_without_the_csrf_token_is_refused(api: Api) -> None:
    """Each state-changing dashboard route, found in the app's routes, refuses a post that has
    the session cookie but not the session's CSRF token; and a cross-site post is refused."""
    from fastapi.routing import APIRoute

    from node.web import admin, jobs, overview, session, studies

    job = make_job(api.config, JobState.FAILED)
    csrf = login(api, "admin")
    posts = [r.path for m in (admin, jobs, overview, session, studies) for r in m.router.routes
             if isinstance(r, APIRoute) and "POST" in r.methods and r.path != "/login"]
    assert len(posts) >= 10, posts
    for path in posts:
        url = (path.replace("{job_id}", str(job)).replace("{action}", "replay").replace("{name}", "viewer")
               .replace("{token_id}", "1"))
        r = api.client.post(url, data={"reason": "forged", "password": "x" * 12, "name": "x", "role": "viewer",
                                       "user": "viewer", "current": PASSWORD, "new": "y" * 12, "again": "y" * 12})
        assert r.status_code == 403, (url, r.status_code)
        assert "CSRF" in r.text, url
    with session_scope(api.config.database.url) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 1  # nothing was replayed
    r = api.client.post(f"/jobs/{job}/replay", data={"reason": "x", "csrf_token": csrf},
                        headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403 and "cross-origin" in r.text


def test_study_page_shows_findings_preview_sr_and_timeline_and_is_audited(api: Api) -> None:
    r = study_with_results(api.config)
    login(api, "viewer")
    page = api.client.get(f"/studies/{r.study_uid}").text
    assert "Doe^Jane" in page and "PID-1" in page and "ACC-1" in page  # shown to a logged-in user
    for label, p in probabilities().items():  # every finding with its probability
        assert re.search(rf"<td>{re.escape(label)}</td><td class=\"num\">{p:.3f}</td>", page), label
    assert page.count('class="present"') == sum(p >= 0.5 for p in probabilities().values())
    assert f'/results/{r.sc_output}/preview.png' in page
    events = re.findall(r"<td>(first instance received|study complete|job \d+ \w+|SR stored at pacs|SR confirmed in pacs)</td>", page)
    assert events[0] == "first instance received" and events[-1] == "SR confirmed in pacs", events
    assert events.index(f"job {r.job_id} queued") < events.index(f"job {r.job_id} done")
    # The preview is a PNG rendered from our overlay SC in the spool.
    png = api.client.get(f"/results/{r.sc_output}/preview.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    image = Image.open(BytesIO(png.content))
    assert image.mode == "RGB" and max(image.size) <= 1024
    # The SR as text: its content tree, with the probability of each finding.
    sr = api.client.get(f"/results/{r.sr_output}/sr").text
    assert "Imaging Measurement Report" in sr and "No abnormality detected: AI probability 0.89" in sr
    assert api.client.get(f"/results/{r.sr_output}/preview.png").status_code == 404  # an SR has no preview
    # One view: the page itself; its image, SR text and live refreshes within minutes add none.
    views = _events(api, "view_study")
    assert [(e.actor, e.detail) for e in views] == [("web:viewer", r.study_uid)]
    assert views[0].address == "testclient"
    api.client.get(f"/studies/{r.study_uid}")
    assert len(_events(api, "view_study")) == 2  # every page view is in the log
    # The findings were read from the SR once and kept on its output row.
    with session_scope(api.config.database.url) as s:
        kept = s.get_one(Output, r.sr_output).findings
    assert kept is not None and len(kept) == len(probabilities())


def test_patient_attributes_are_text_never_markup_and_never_in_the_log(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pacsnode.access")
    r = study_with_results(api.config, patient_name="<script>alert(1)</script>")
    with session_scope(api.config.database.url) as s:
        s.add(Study(study_instance_uid="1.2.3<img src=x onerror=alert(2)>", state=StudyState.RECEIVING))
    login(api, "admin")
    page = api.client.get(f"/studies/{r.study_uid}").text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>alert" not in page
    listing = api.client.get("/studies").text
    assert "&lt;img src=x onerror=alert(2)&gt;" in listing and "<img src=x" not in listing
    audit = api.client.get("/audit").text
    assert "alert(1)" not in audit and "Doe" not in audit
    assert api.client.get("/studies", params={"q": "PID-1"}).status_code == 200  # a search by Patient ID
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert "GET /studies 200" in logged and "GET /studies/{uid} 200" in logged  # the access log has templates
    assert "PID-1" not in logged and "alert(1)" not in logged and r.study_uid not in logged
    with session_scope(api.config.database.url) as s:
        assert all("alert(1)" not in (e.detail or "") for e in s.scalars(select(Event)))


def test_live_fragment_stops_polling_when_nothing_is_active(api: Api) -> None:
    done = study_with_results(api.config, tag="1")
    running = study_with_results(api.config, job_state=JobState.SENDING, tag="2")
    login(api, "viewer")
    assert api.client.get(f"/studies/{done.study_uid}/live").status_code == 286  # htmx: stop polling
    live = api.client.get(f"/studies/{running.study_uid}/live")
    assert live.status_code == 200 and "live" in live.text
    assert 'hx-trigger="every 3s"' in api.client.get(f"/studies/{running.study_uid}").text
    assert 'hx-trigger="every 3s"' not in api.client.get(f"/studies/{done.study_uid}").text


def test_jobs_page_lists_failed_first_and_replays_with_a_reason(api: Api) -> None:
    failed = make_job(api.config, JobState.FAILED, age_s=300, error_stage="send", error="PACS down")
    running = make_job(api.config, JobState.RUNNING)
    csrf = login(api, "operator")
    page = api.client.get("/jobs").text
    assert page.index("Failed jobs") < page.index("All jobs") and "PACS down" in page
    assert page.index(f'/jobs/{failed}"') < page.index(f'/jobs/{running}"')  # failed first despite being older
    r = api.client.post(f"/jobs/{failed}/replay", data={"reason": " ", "csrf_token": csrf})
    assert "give a reason" in r.text
    r = api.client.post(f"/jobs/{failed}/replay", data={"reason": "PACS is back", "csrf_token": csrf, "back": "/jobs"})
    assert r.status_code == 200 and re.search(rf"Job {failed} replayed as job \d+", r.text)
    ev = _events(api, "replay")[-1]
    assert (ev.actor, ev.address) == ("web:operator", "testclient") and "PACS is back" in (ev.detail or "")
    r = api.client.post(f"/jobs/{running}/replay", data={"reason": "again", "csrf_token": csrf})
    assert f"Job {running} not replayed" in r.text and "cancel it before replaying" in r.text
    r = api.client.post(f"/jobs/{running}/cancel", data={"reason": "wrong study", "csrf_token": csrf})
    assert f"Job {running} cancelled" in r.text
    r = api.client.post(f"/jobs/{failed}/resend", data={"reason": "x", "csrf_token": csrf})
    assert "no result objects" in r.text
    r = api.client.post(f"/jobs/{failed}/bogus", data={"reason": "x", "csrf_token": csrf})
    assert r.status_code == 404


def test_rule_tester_routes_a_dropped_file(api: Api) -> None:
    csrf = login(api, "operator")
    r = api.client.post("/rules", data={"csrf_token": csrf}, files={"file": ("ct.dcm", CT.read_bytes(), "application/dicom")})
    assert r.status_code == 200 and "ct.dcm" in r.text and "modality CT" in r.text and "skip" in r.text
    r = api.client.post("/rules", data={"csrf_token": csrf}, files={"file": ("x.dcm", b"garbage", "application/dicom")})
    assert r.status_code == 422 and "not a DICOM file" in r.text


def test_echo_of_a_destination_that_does_not_answer_says_so_and_is_audited(tmp_path: Path) -> None:
    from tests.peers import free_port

    api = make_api(tmp_path, destinations=[{"name": "nowhere", "ae_title": "NOBODY", "host": "127.0.0.1",
                                            "port": free_port(), "timeout": 2}])
    csrf = login(api, "operator")
    r = api.client.post("/destinations/nowhere/echo", data={"csrf_token": csrf})
    assert "Echo nowhere: did not answer" in r.text
    (ev,) = _events(api, "echo")
    assert ev.actor == "web:operator" and (ev.detail or "").startswith("nowhere: ") and ev.detail != "nowhere: ok"


def test_admin_manages_users_and_tokens_and_a_token_is_shown_once(api: Api) -> None:
    csrf = login(api, "admin")
    r = api.client.post("/users", data={"name": "alice", "role": "operator", "password": "a long passphrase",
                                        "csrf_token": csrf})
    assert "User alice added as operator" in r.text
    r = api.client.post("/users", data={"name": "bob", "role": "viewer", "password": "short", "csrf_token": csrf})
    assert "User not added: password: at least 12 characters" in r.text
    r = api.client.post("/tokens", data={"user": "alice", "expires_days": "30", "csrf_token": csrf})
    token = re.search(r'<code id="new-token">(pn_[^<]+)</code>', r.text)
    assert token, r.text[-800:]
    assert token.group(1) not in api.client.get("/users").text  # shown once
    assert api.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token.group(1)}"}).json()["name"] == "alice"
    token_id = re.findall(r"Revoke token (\d+)", r.text)[-1]
    api.client.post(f"/tokens/{token_id}/revoke", data={"csrf_token": csrf})
    assert api.client.get("/api/v1/auth/me", headers={"Authorization": f"Bearer {token.group(1)}"}).status_code == 401
    r = api.client.post("/users/admin/remove", data={"csrf_token": csrf})
    assert "last admin" in r.text
    r = api.client.post("/users/alice/remove", data={"csrf_token": csrf})
    assert "User alice removed" in r.text
    assert [e.kind for e in _events(api, "user_add") + _events(api, "token_create") + _events(api, "token_revoke")
            + _events(api, "user_remove") if e.actor == "web:admin"] == ["user_add", "token_create", "token_revoke",
                                                                        "user_remove"]


def test_changing_ones_password_needs_the_current_one_and_ends_other_sessions(api: Api) -> None:
    from fastapi.testclient import TestClient

    other = TestClient(api.client.app)
    token = re.search(r'name="login_token" value="([^"]+)"', other.get("/login").text).group(1)  # type: ignore[union-attr]
    other.post("/login", data={"name": "viewer", "password": PASSWORD, "login_token": token})
    csrf = login(api, "viewer")
    r = api.client.post("/account/password", data={"current": "wrong", "new": "n" * 12, "again": "n" * 12,
                                                   "csrf_token": csrf})
    assert "current password is wrong" in r.text
    r = api.client.post("/account/password", data={"current": PASSWORD, "new": "n" * 12, "again": "n" * 12,
                                                   "csrf_token": csrf})
    assert "Password changed" in r.text
    assert api.client.get("/account").status_code == 200  # this session goes on
    assert other.get("/account").status_code == 401  # the other one ended


def test_a_purged_study_page_keeps_its_findings_and_says_its_files_left_the_spool(api: Api) -> None:
    from datetime import timedelta

    from node.db.models import utcnow
    from node.services.retention import purge

    r = study_with_results(api.config)
    login(api, "viewer")
    # The engine keeps an SR's findings on its row when it writes it; this helper's SR gets them
    # on its first view, as an SR of an earlier version would.
    assert api.client.get(f"/studies/{r.study_uid}").status_code == 200
    assert purge(api.config, days=30, now=utcnow() + timedelta(days=31)).files == 3  # the image, SR and SC
    response = api.client.get(f"/studies/{r.study_uid}")
    assert response.status_code == 200
    page = response.text
    assert "files purged" in page and "Doe^Jane" not in page  # the patient header came from the image
    for label, p in probabilities().items():  # the findings stay: they are kept on the SR's row
        assert re.search(rf"<td>{re.escape(label)}</td><td class=\"num\">{p:.3f}</td>", page), label
    assert "/preview.png" not in page and "Structured report (SR) as text" not in page  # no broken links
