"""Dashboard pages and /metrics through the real app: auth, CSRF on forms, escaping, metrics."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from node import metrics
from node.db.models import Study, StudyState
from node.db.session import session_scope
from tests.unit.api_data import PASSWORD, Api, make_api


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return make_api(tmp_path)


def _login(api: Api, name: str) -> str:
    r = api.client.post("/login", data={"name": name, "password": PASSWORD}, follow_redirects=False)
    assert r.status_code == 303, r.text
    page = api.client.get("/jobs")
    assert page.status_code == 200
    m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert m, "no csrf token in the page"
    return m.group(1)


def test_pages_need_login_and_render_after_it(api: Api) -> None:
    assert api.client.get("/", follow_redirects=False).status_code == 401
    assert api.client.get("/metrics").status_code == 401
    _login(api, "viewer")
    for path in ("/", "/studies", "/jobs", "/fragments/overview"):
        r = api.client.get(path)
        assert r.status_code == 200, path
        assert "<script>" not in r.text.replace('<script src="/static/htmx.min.js" defer></script>', "")
    assert "Replay" not in api.client.get("/jobs").text  # viewer sees no operator buttons


def test_job_form_without_csrf_is_refused(api: Api) -> None:
    csrf = _login(api, "operator")
    r = api.client.post("/jobs/999/replay", data={"reason": "test"})
    assert r.status_code == 403
    r = api.client.post("/jobs/999/replay", data={"reason": "test", "csrf_token": csrf})
    assert r.status_code == 404  # past CSRF, the job is unknown


def test_untrusted_text_is_escaped(api: Api) -> None:
    uid = "1.2.3<script>alert(1)</script>"
    with session_scope(api.config.database.url) as s:
        s.add(Study(study_instance_uid=uid, state=StudyState.RECEIVING))
    _login(api, "viewer")
    text = api.client.get("/studies").text
    assert "<script>alert(1)</script>" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text


def test_metrics_exposes_counters_and_live_gauges(api: Api) -> None:
    metrics.setup(api.config)
    metrics.instance_received(0, 0.02)
    metrics.study_completed("quiet")
    r = api.client.get("/metrics", headers=api.as_("viewer"))
    assert r.status_code == 200
    body = r.text
    assert 'pacsnode_instances_received_total{status="0x0000"}' in body
    assert 'pacsnode_studies_completed_total{rule="quiet"}' in body
    assert "pacsnode_spool_free_bytes" in body
    assert 'pacsnode_queue_depth{queue="inference"}' in body
    assert "1.2.3" not in body
