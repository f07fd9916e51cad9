"""The dashboard in headless Debian Chromium (playwright) against `pacsnode run`, storescu and
Orthanc: log in with the first admin's password, watch a real radiograph reach done on its
study page, replay from the jobs page a job that failed while Orthanc was down and see it done
once, find the replay in the audit log; a Patient Name that is a script renders as text; forms
without the CSRF token and a viewer's replay are refused.

Set PACSNODE_SCREENSHOTS=docs/img to also write the README's screenshots there."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
import pytest

from tests.browser import PAGE_TIMEOUT_S, chromium
from tests.integration.node_api import (
    NodeApi,
    first_admin_password,
    node_for_module,
    orthanc_for_module,
)
from tests.peers import (
    CXR_SAMPLES,
    Node,
    Orthanc,
    have,
    img2dcm,
    storescu,
    synthetic_cr,
    wait_for,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "storescu", "img2dcm"), reason="needs Orthanc and DCMTK"),
]
CXR = CXR_SAMPLES / "pneumonia" / "person1946_bacteria_4874.jpeg"
JOB_TIMEOUT_MS = 240_000
VIEWER_PASSWORD = "viewer passphrase"


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    yield from orthanc_for_module(tmp_path_factory)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc, demo_bundle: Path) -> Iterator[Node]:
    yield from node_for_module(tmp_path_factory, pacs, demo_bundle, "pacs")


@pytest.fixture(scope="module")
def api(node: Node) -> NodeApi:
    a = NodeApi(node)
    a.user("vera", "viewer", VIEWER_PASSWORD)
    return a


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def _login(browser: Browser, api: NodeApi, name: str, password: str) -> tuple[Page, list[str]]:
    """A new browser context logged in through the form; the list collects any dialog shown."""
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(api.base + "/")  # not logged in: the 401 page sends the browser to the form
    page.wait_for_url("**/login?next=*")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button:has-text('Log in')")
    page.wait_for_url(api.base + "/")
    return page, dialogs


@pytest.fixture(scope="module")
def admin(browser: Browser, api: NodeApi, node: Node) -> tuple[Page, list[str]]:
    return _login(browser, api, "admin", first_admin_password(node))


def _send(node: Node, path: Path, *extra: str) -> str:
    out = storescu(node.port, path, extra=extra)
    assert out.returncode == 0, out.stderr
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """A 1366x768 screenshot; copied to $PACSNODE_SCREENSHOTS when set (the README's images)."""
    path = tmp_path / name
    page.screenshot(path=str(path))
    target = os.environ.get("PACSNODE_SCREENSHOTS")
    if target:
        shutil.copyfile(path, Path(target) / name)
    return path


def test_log_in_and_watch_a_real_radiograph_reach_done(admin: tuple[Page, list[str]], api: NodeApi, node: Node,
                                                      tmp_path: Path) -> None:
    page, dialogs = admin
    assert page.locator("h1").text_content() == "Overview"
    dcm = img2dcm(CXR, tmp_path / "cxr.dcm", "ViewPosition=PA", "PatientName=Demo^Patient", "PatientID=DEMO-0001",
                  "AccessionNumber=ACC-0001", "StudyDescription=Chest PA")
    uid = _send(node, dcm, "-xy")
    page.goto(api.base + "/studies")
    page.click(f"a[href='/studies/{uid}']")
    assert page.locator("#patient-name").text_content() == "Demo^Patient"
    # The page refreshes its live part every 3 s until nothing is active: no reload here.
    page.wait_for_selector("#live .badge.s-done", timeout=JOB_TIMEOUT_MS)
    findings = page.locator(".findings table tr")
    assert findings.count() >= 3  # a header and one row per finding
    assert all(r.strip() for r in page.locator(".findings td:nth-child(2)").all_text_contents())
    preview = page.locator(".preview img")
    preview.wait_for()
    wait_for(lambda: preview.evaluate("img => img.complete && img.naturalWidth > 0"), 30, "the overlay preview")
    page.click("details.sr summary")
    page.wait_for_selector("pre.srtext")
    assert "Imaging Measurement Report" in (page.locator("pre.srtext").text_content() or "")
    timeline = page.locator("table.timeline").text_content() or ""
    assert "first instance received" in timeline and "stored at pacs" in timeline
    page.evaluate("window.scrollTo(0, 0)")
    shot = _screenshot(page, tmp_path, "dashboard-study.png")
    assert shot.stat().st_size > 50_000  # a rendered page with a radiograph, not a blank one
    page.goto(api.base + "/")
    _screenshot(page, tmp_path, "dashboard-overview.png")
    assert dialogs == []


def test_a_patient_name_that_is_a_script_renders_as_text(admin: tuple[Page, list[str]], api: NodeApi, node: Node,
                                                         tmp_path: Path) -> None:
    page, dialogs = admin
    dcm = img2dcm(CXR, tmp_path / "xss.dcm", "ViewPosition=PA", "PatientName=<script>alert(1)</script>",
                  "StudyDescription=<img src=x onerror=alert(2)>")
    uid = _send(node, dcm, "-xy")
    page.goto(f"{api.base}/studies/{uid}")
    assert page.locator("#patient-name").text_content() == "<script>alert(1)</script>"
    assert "<img src=x onerror=alert(2)>" in (page.locator("dl.patient").text_content() or "")
    assert page.locator("script").count() == 1  # htmx, from /static; nothing the study brought
    page.wait_for_timeout(1500)  # time for anything that would run to run
    assert dialogs == []


def _failed_row(page: Page, api: NodeApi, uid: str) -> str:
    """Wait (reloading the jobs page) until the study's job is in the failed list; its job id."""
    def check() -> str | None:
        page.goto(api.base + "/jobs")
        row = page.locator(f"#failed tr:has(a[href='/studies/{uid}'])")
        return row.locator("td").first.text_content() if row.count() else None

    return str(wait_for(check, JOB_TIMEOUT_MS / 1000, f"the job of {uid} in the failed list", interval=0.5))


def test_a_job_failed_while_orthanc_was_down_is_replayed_from_the_page_done_once_and_audited(
        admin: tuple[Page, list[str]], api: NodeApi, node: Node, pacs: Orthanc, tmp_path: Path) -> None:
    page, _ = admin
    (cr,) = synthetic_cr(tmp_path / "cr", 1, size=384)
    pacs.stop()
    try:
        uid = _send(node, cr)
        job = _failed_row(page, api, uid)
        row = page.locator(f"#failed tr:has(a[href='/studies/{uid}'])")
        assert row.locator("td").nth(6).text_content() == "send"  # the stage
        assert (row.locator("td.err").text_content() or "").strip()  # and the error
    finally:
        pacs.start()
    row.locator("details.act summary:has-text('Replay')").click()
    row.locator("input[name=reason]").first.fill("Orthanc is back")
    row.locator(f"button:has-text('Replay job {job}')").click()
    page.wait_for_selector(".flash")
    flash = page.locator(".flash").text_content() or ""
    assert flash.startswith(f"Job {job} replayed as job "), flash
    new = flash.rsplit(" ", 1)[1].rstrip(".")
    page.goto(f"{api.base}/studies/{uid}")
    page.wait_for_selector(f"#live tr:has(a[href='/jobs/{new}']) .badge.s-done", timeout=JOB_TIMEOUT_MS)
    study = page.request.get(f"{api.base}/api/v1/studies/{uid}").json()  # the page's own session
    outputs = next(j for j in study["job_details"] if str(j["id"]) == new)["outputs"]
    assert outputs
    for o in outputs:  # Orthanc holds each result object once
        assert len([h for h in pacs.lookup(o["sop_instance_uid"]) if h["Type"] == "Instance"]) == 1
    page.goto(api.base + "/audit?kind=replay")
    entry = page.locator("table.list tr").nth(1).locator("td").all_text_contents()
    assert entry[1:4] == ["replay", "web:admin", "127.0.0.1"] and entry[4] == new
    assert "Orthanc is back" in entry[5]


def test_forms_without_the_csrf_token_and_a_viewers_replay_are_refused(admin: tuple[Page, list[str]], browser: Browser,
                                                                      api: NodeApi) -> None:
    page, _ = admin
    page.goto(api.base + "/jobs")
    for body in ("reason=forged", "reason=forged&csrf_token=guess"):
        status = page.evaluate("""async body => (await fetch('/jobs/1/cancel', {method: 'POST', body,
            headers: {'Content-Type': 'application/x-www-form-urlencoded'}})).status""", body)
        assert status == 403, body
    viewer, _ = _login(browser, api, "vera", VIEWER_PASSWORD)
    viewer.goto(api.base + "/jobs")
    assert viewer.locator("details.act").count() == 0  # no Replay / Re-send / Cancel for a viewer
    csrf = viewer.locator("input[name=csrf_token]").first.get_attribute("value")
    status = viewer.evaluate("""async csrf => (await fetch('/jobs/1/replay', {method: 'POST',
        body: new URLSearchParams({reason: 'curious', csrf_token: csrf})})).status""", csrf)
    assert status == 403
    viewer.context.close()
