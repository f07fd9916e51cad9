"""Deny by default, roles, tokens, sessions, CSRF, login rate limit, first admin, headers."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from sqlalchemy import select

from node.db.models import ApiToken, Event, JobState, WebSession
from node.db.session import session_scope
from node.services import users
from tests.unit.api_data import PASSWORD, Api, make_api
from tests.unit.jobs_data import make_job


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return make_api(tmp_path)


def _concrete(path: str) -> str:
    return (path.replace("{study_instance_uid}", "1.2.3").replace("{job_id}", "1").replace("{name}", "pacs")
            .replace("{token_id}", "1"))


def test_every_route_but_health_refuses_anonymous_callers(api: Api) -> None:
    open_paths = {"/healthz", "/readyz", "/api/v1/auth/login"}  # and the login form (test_web)
    checked = 0
    assert api.client.get("/api/v1/openapi.json").status_code == 401
    assert api.client.get("/api/v1/docs").status_code == 404  # no Swagger UI: it would load a CDN script
    for path, methods in api.client.get("/api/v1/openapi.json", headers=api.as_("viewer")).json()["paths"].items():
        if path in open_paths:
            continue
        for method in methods:
            r = api.client.request(method.upper(), _concrete(path))
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["content-type"] == "application/problem+json"
            checked += 1
    assert checked >= 25
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_a_bad_or_garbled_bearer_token_is_refused(api: Api) -> None:
    for header in ("Bearer nope", "Basic YWRtaW46eA==", "Bearer "):
        assert api.client.get("/api/v1/studies", headers={"Authorization": header}).status_code == 401


def test_viewer_reads_but_may_not_replay_cancel_or_read_audit(api: Api) -> None:
    job = make_job(api.config, JobState.FAILED)
    assert api.client.get("/api/v1/jobs", headers=api.as_("viewer")).status_code == 200
    for path in (f"/api/v1/jobs/{job}/replay", f"/api/v1/jobs/{job}/cancel", f"/api/v1/jobs/{job}/resend"):
        r = api.client.post(path, json={"reason": "x"}, headers=api.as_("viewer"))
        assert r.status_code == 403, path
        assert "needs role operator" in r.json()["detail"]
    assert api.client.get("/api/v1/audit", headers=api.as_("viewer")).status_code == 403
    assert api.client.get("/api/v1/audit", headers=api.as_("operator")).status_code == 403
    assert api.client.get("/api/v1/audit", headers=api.as_("admin")).status_code == 200


def test_a_revoked_or_expired_token_is_refused_at_once(api: Api) -> None:
    headers = api.as_("operator")
    assert api.client.get("/api/v1/studies", headers=headers).status_code == 200
    with session_scope(api.config.database.url) as s:
        token_id = s.scalars(select(ApiToken.id).order_by(ApiToken.id)).all()[1]
        assert s.scalar(select(ApiToken.token_hash).where(ApiToken.id == token_id)) != api.tokens["operator"]
    users.revoke_token(api.config, token_id, actor="test")
    assert api.client.get("/api/v1/studies", headers=headers).status_code == 401
    _, short = users.create_token(api.config, "viewer", expires_days=1e-9, actor="test")
    assert api.client.get("/api/v1/studies", headers={"Authorization": f"Bearer {short}"}).status_code == 401


def test_session_login_csrf_and_logout(api: Api) -> None:
    c = api.client
    r = c.post("/api/v1/auth/login", json={"name": "operator", "password": PASSWORD})
    assert r.status_code == 200
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
    csrf = r.json()["csrf_token"]
    job = make_job(api.config, JobState.QUEUED)
    assert c.get("/api/v1/auth/me").json()["name"] == "operator"
    # A state change by cookie without the CSRF token (a forged cross-site form) is refused.
    r = c.post(f"/api/v1/jobs/{job}/cancel", json={"reason": "x"})
    assert r.status_code == 403 and "CSRF" in r.json()["detail"]
    assert c.post(f"/api/v1/jobs/{job}/cancel", json={"reason": "x"}, headers={"X-CSRF-Token": "wrong"}).status_code == 403
    r = c.post(f"/api/v1/jobs/{job}/cancel", json={"reason": "wrong study"}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200, r.text
    with session_scope(api.config.database.url) as s:
        ev = s.scalar(select(Event).where(Event.kind == "cancel"))
        assert ev is not None and ev.actor == "api:operator" and ev.detail == "wrong study"
        assert s.scalar(select(Event.actor).where(Event.kind == "login")) == "api:operator"
        assert ev.address == "testclient"  # from where
    assert c.post("/api/v1/auth/logout", headers={"X-CSRF-Token": csrf}).status_code == 204
    with session_scope(api.config.database.url) as s:
        assert s.scalars(select(WebSession)).all() == []
    assert c.get("/api/v1/auth/me").status_code == 401


def test_sessions_live_in_the_database_so_a_second_process_accepts_them(api: Api, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from node.api.app import create_app

    r = api.client.post("/api/v1/auth/login", json={"name": "viewer", "password": PASSWORD})
    other = TestClient(create_app(api.config))  # a second app: nothing shared but the database
    other.cookies.set("pacsnode_session", r.cookies["pacsnode_session"])
    assert other.get("/api/v1/auth/me").json()["role"] == "viewer"


def test_login_is_rate_limited_in_the_database(tmp_path: Path) -> None:
    api = make_api(tmp_path, login_attempts=3)
    for _ in range(3):
        assert api.client.post("/api/v1/auth/login", json={"name": "admin", "password": "wrong password!"}).status_code == 401
    r = api.client.post("/api/v1/auth/login", json={"name": "admin", "password": PASSWORD})
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    with session_scope(api.config.database.url) as s:
        assert len(s.scalars(select(Event).where(Event.kind == "login_failed")).all()) == 3
        # Passwords are never in the log.
        assert all("wrong password" not in (e.detail or "") for e in s.scalars(select(Event)))


def test_first_start_creates_admin_with_a_private_password_file(tmp_path: Path) -> None:
    from node.cli import db_upgrade
    from node.config import parse_config

    cfg = parse_config({"database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
                        "api": {"state_dir": str(tmp_path / "var")}})
    db_upgrade(cfg)
    path = users.ensure_first_admin(cfg)
    assert path == tmp_path / "var" / "admin-password.txt"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    password = path.read_text().split("password: ")[1].strip()
    assert users.login(cfg, "admin", password, None)[1].role == "admin"
    assert users.ensure_first_admin(cfg) is None  # users exist: nothing made, file untouched
    assert password in path.read_text()


def test_passwords_are_argon2_and_short_ones_refused(api: Api) -> None:
    from node.db.models import User

    with session_scope(api.config.database.url) as s:
        assert s.scalar(select(User.password_hash).where(User.name == "viewer")).startswith("$argon2id$")
    with pytest.raises(users.Invalid, match="password"):
        users.add_user(api.config, "bob", "viewer", "short", actor="test")


def test_security_headers_and_no_stack_traces(api: Api) -> None:
    r = api.client.get("/healthz")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    r = api.client.get("/api/v1/openapi.json", headers=api.as_("viewer"))
    assert r.status_code == 200 and "/api/v1/studies" in r.json()["paths"]
