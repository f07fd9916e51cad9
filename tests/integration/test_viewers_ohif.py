"""What a radiologist sees in OHIF 3.13.2: the node's SR and SEG over a real radiograph.

Real peers only: both radiographs go to Orthanc (the PACS) and to one `pacsnode run` with DCMTK's
storescu; the node sends its results to the same Orthanc; OHIF's released `dist/` (npm) is
served with Orthanc's DICOMweb on one origin (tests/ohif.py); one Debian Chromium, driven by
playwright, opens each study as a reader would: the SR series and "Yes" to track its
measurements, then the SEG series. The test checks what the page shows: no page error, the SR's
outlines and the SEG's lung fields drawn over the image where our objects put them (pixels of
the viewport's canvas at points mapped by OHIF's own image-to-screen transform: the plain
radiograph has nothing coloured; each outline's corners are drawn; sampled pixels well inside
the lung fields are tinted, those well outside are not), the findings listed by name in the
measurement panel, the segment's label in the segmentation panel.

Where the time goes (software WebGL): tracking the SR's measurements makes cornerstone compute
each region's statistics with one canvas transform per image pixel inside the region's bounds
(PlanarFreehandROI), minutes of main thread for RG1 (2k x 2k, with the demo model calling every
finding present) on 2 shared cores. The SEG is checked as OHIF shows it when its series is
opened (over the source image, its panel listing the segment), without "Yes" to load it into
the tracking viewport: on a loaded machine that "Yes" took longer than tracking the SR itself.

On a slow page OHIF 3.13.2 may show the SR's image without its outlines until the viewport
renders again (a race in its SR viewport, see `_redraw`): the test then resizes the window, as
a reader would, and still requires every outline where the SR puts it.
PACSNODE_OHIF_SLOWDOWN=8 (Chromium's CPU throttling) makes this page as slow as CI's.

Set PACSNODE_SCREENSHOTS=<folder> to keep the README's picture (docs/img/ohif-sr-seg-cxr-sample.png):
then the test also says "Yes" to load the SEG into the tracking viewport, beside the outlines.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from docs.render import save_png
from tests.browser import PAGE_TIMEOUT_S, chromium
from tests.ohif import OhifServer, ohif_dist
from tests.peers import CXR_SAMPLES, Node, Orthanc, have, img2dcm, node_config, storescu, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(900),  # the module's set-up (node, both jobs) is charged to its first test
    pytest.mark.skipif(not have("Orthanc", "storescu", "img2dcm"), reason="needs Orthanc and DCMTK"),
]

RG1 = Path(str(get_testdata_file("RG1_UNCR.dcm")))
CXR = CXR_SAMPLES / "pneumonia" / "person1946_bacteria_4874.jpeg"
SOURCES = ("rg1", "cxr-sample")
T = TypeVar("T")
#: Seconds for OHIF to load a study, an SR or a SEG (software-rendered WebGL on 2 shared cores).
LOAD_TIMEOUT_S = 300.0
#: Seconds for OHIF to draw the SR's outlines once its series is opened (1-10 s on CI when it does).
SR_FIRST_DRAW_S = 40.0
#: The browser window: small enough for software WebGL, large enough for OHIF's panels.
WINDOW: ViewportSize = {"width": 1100, "height": 720}


@dataclass
class Study:
    """One radiograph sent to the PACS and to the node, with the node's SR and SEG as the PACS holds them."""

    source: str
    uid: str
    sr: pydicom.Dataset
    seg: pydicom.Dataset


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True).start()
    yield server
    server.stop(wait=False)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc, demo_bundle: Path) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("node")
    cfg = node_config(work, demo_bundle, [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                                      "port": pacs.dicom_port, "timeout": 10}])  # fmt: skip
    n = Node(cfg).start(timeout=180)
    yield n
    n.stop(wait=False)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory, node: Node, pacs: Orthanc) -> dict[str, Study]:
    """Both radiographs sent at once (the node works on one while it receives the other), then
    each study's SR and SEG read back from the PACS."""
    folder = tmp_path_factory.mktemp("radiographs")
    uids = {}
    for source in SOURCES:
        path, extra = _radiograph(source, folder)
        uids[source] = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        for port, aec in ((pacs.dicom_port, pacs.aet), (node.port, "PACSNODE")):  # the PACS has the original
            out = storescu(port, path, aec=aec, extra=extra)
            assert out.returncode == 0, out.stderr
    return {source: Study(source, uid, **_results(node, pacs, uid)) for source, uid in uids.items()}


@pytest.fixture(scope="module")
def ohif(pacs: Orthanc) -> Iterator[OhifServer]:
    with OhifServer(ohif_dist(), pacs.dicomweb_url) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


def _radiograph(source: str, folder: Path) -> tuple[Path, tuple[str, ...]]:
    """The file to send and storescu's extra options."""
    if source == "cxr-sample":
        return img2dcm(CXR, folder / "cxr.dcm", "ViewPosition=PA", "PatientName=CXR^Sample"), ("-xy",)
    # RG1 stores Pixel Spacing 0\\0: OHIF then scales its world by zero and draws nothing at all
    # (the original image included). Sent as its modality should have written it: same pixels
    # and UIDs, no Pixel Spacing. The node's own handling of 0\\0 is tested in the unit tests.
    ds = pydicom.dcmread(RG1)
    del ds.PixelSpacing
    path = folder / "rg1.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ()


def _results(node: Node, pacs: Orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The SR and SEG of the study's done job, as Orthanc holds them."""
    def done(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
        jobs = [j for j in rows if j["study_instance_uid"] == study_uid]
        failed = [j for j in jobs if j["state"] == "failed"]
        assert not failed, f"job failed at {failed[0]['error_stage']}: {failed[0]['error']}"
        return next((j for j in jobs if j["state"] == "done"), None)

    job = node.wait_jobs(done, 300, f"the node's job on {study_uid}")
    objects: dict[str, pydicom.Dataset] = {}
    for output in job["outputs"]:
        if output["kind"] in ("sr", "seg"):
            [hit] = [h for h in pacs.lookup(output["sop_instance_uid"]) if h["Type"] == "Instance"]
            objects[output["kind"]] = pydicom.dcmread(BytesIO(pacs.get_bytes(f"/instances/{hit['ID']}/file")))
    assert set(objects) == {"sr", "seg"}
    return objects


def _outlines(sr: pydicom.Dataset) -> dict[str, np.ndarray]:
    """Label (DCM 121106 Comment) -> (n, 2) image points of every drawn group of the SR."""
    [measurements] = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    found: dict[str, np.ndarray] = {}
    for group in measurements.ContentSequence:
        items = {c.ConceptNameCodeSequence[0].CodeValue: c for c in group.ContentSequence}
        scoords = [c for c in group.ContentSequence if c.ValueType == "SCOORD"] + [
            s for c in group.ContentSequence if c.ValueType == "NUM" for s in c.get("ContentSequence", [])
            if s.ValueType == "SCOORD"]  # fmt: skip
        found.setdefault(items["121106"].TextValue, np.asarray(scoords[0].GraphicData, float).reshape(-1, 2))
    return found


#: The enabled viewport's canvas: its box on the page and cornerstone's image -> canvas transform.
_CANVAS_JS = """(points) => {
  const vp = window.cornerstone.getEnabledElements()[0].viewport;
  const imageId = vp.getCurrentImageId();
  const r = vp.getCanvas().getBoundingClientRect();
  return {box: {x: r.left, y: r.top, width: r.width, height: r.height},
          points: points.map(p => vp.worldToCanvas(window.cornerstone.utilities.imageToWorldCoords(imageId, p)))};
}"""


def _look(page: Page, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A picture of the viewport's canvas as the page shows it (with the SVG annotations and
    overlays on it; only the canvas: a whole-page picture costs more in software WebGL) and
    where the image (column, row) points fall on it, by OHIF's cornerstone transform. Both are
    taken together, as OHIF may still be laying out its panels."""
    placed = page.evaluate(_CANVAS_JS, points.tolist())
    png = page.screenshot(clip=placed["box"], animations="disabled", timeout=LOAD_TIMEOUT_S * 1000)
    pixels = np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=int)
    return pixels, np.asarray(placed["points"], float).reshape(-1, 2)


def _on(pixels: np.ndarray, points: np.ndarray, margin: int = 6) -> np.ndarray:
    """Which points fall on the picture, away from its edges."""
    h, w = pixels.shape[:2]
    x, y = points[:, 0], points[:, 1]
    return (x >= margin) & (x < w - margin) & (y >= margin) & (y < h - margin)


def _coloured(pixels: np.ndarray) -> np.ndarray:
    """Where a pixel is clearly not gray: the radiograph is gray, what is drawn over it is not."""
    return (pixels.max(axis=-1) - pixels.min(axis=-1)) > 60


def _near(mask: np.ndarray, points: np.ndarray, radius: int = 4) -> np.ndarray:
    """For each (x, y) point: is any pixel of ``mask`` within ``radius``?"""
    h, w = mask.shape
    return np.array([mask[max(0, int(y) - radius):min(h, int(y) + radius + 1),
                          max(0, int(x) - radius):min(w, int(x) + radius + 1)].any() for x, y in points])  # fmt: skip


def _stage(what: str) -> None:
    """Where the test is, in its output (a slow page is otherwise a silent wait)."""
    print(f"{time.strftime('%H:%M:%S')} {what}", flush=True)


def _wait_until(measure: Callable[[], T], good: Callable[[T], bool], what: str,
                timeout: float = LOAD_TIMEOUT_S) -> T:
    """Measure the page until the value is good (drawing is asynchronous and, in software WebGL
    on a loaded machine, slow); fail with the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = measure()
        if good(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}: {value}")
        time.sleep(1)


#: What the page holds when a drawing check fails: the failure says more than "not drawn".
_STATE_JS = """() => {
  const cs = window.cornerstone; const els = cs ? cs.getEnabledElements() : [];
  const tools = window.cornerstoneTools; const all = tools ? tools.annotation.state.getAllAnnotations() : [];
  const srs = window.services ? window.services.displaySetService.getActiveDisplaySets().filter(d => d.Modality === 'SR') : [];
  return {viewports: els.map(e => ({viewport: e.viewportId, type: e.viewport.type,
    image: e.viewport.getCurrentImageId ? String(e.viewport.getCurrentImageId()).slice(-60) : null,
    canvas: [e.viewport.getCanvas().width, e.viewport.getCanvas().height],
    actors: e.viewport.getActors ? e.viewport.getActors().length : null,
    drawn: e.viewport.element.querySelectorAll('svg *').length})),
    annotations: all.map(a => [a.metadata.toolName, String(a.metadata.referencedImageId || '').slice(-60)]),
    srs: srs.map(d => ({loaded: d.isLoaded, rehydratable: d.isRehydratable, measurements: (d.measurements || []).map(
      m => [m.loaded, String(m.imageId || '').slice(-60)])}))};
}"""


def _page_state(page: Page, console: list[str], errors: list[str]) -> str:
    """The viewports (their images, canvas sizes, drawn SVG elements), the annotations and SR
    measurements OHIF holds, and the page's and console's errors, for a failure message."""
    try:
        viewports = page.evaluate(_STATE_JS)
    except Exception as e:  # a hung or crashed page is itself the finding
        viewports = f"unreadable: {e}"
    return f"page {viewports}; page errors {errors[-10:]}; console errors {console[-10:]}"


def _wait_image(page: Page) -> None:
    """Until the viewport shows the radiograph (not black), with the guided tour dismissed."""
    def shown() -> bool:
        if page.get_by_text("Skip all").count():
            page.get_by_text("Skip all").click()
        return bool(page.evaluate(
            """() => { const e = window.cornerstone && window.cornerstone.getEnabledElements()[0];
              if (!e || !e.viewport.getCurrentImageId || !e.viewport.getCurrentImageId()) return false;
              const c = e.viewport.getCanvas(); const t = document.createElement('canvas');
              t.width = c.width; t.height = c.height; const x = t.getContext('2d'); x.drawImage(c, 0, 0);
              const d = x.getImageData(0, 0, t.width, t.height).data; let s = 0;
              for (let i = 0; i < d.length; i += 4 * 97) s += d[i]; return s / (d.length / (4 * 97)) > 20; }"""))  # fmt: skip

    wait_for(shown, LOAD_TIMEOUT_S, "OHIF to show the radiograph", interval=0.5)


def _check_seg(page: Page, seg: pydicom.Dataset) -> None:
    """Open the SEG as a reader does (double-click its series): OHIF shows it over the source
    image; every sampled lung-field pixel is tinted, every sampled pixel well outside is not."""
    page.get_by_text(str(seg.SeriesDescription), exact=True).dblclick()
    page.get_by_text("Do you want to open this Segmentation?").wait_for(timeout=LOAD_TIMEOUT_S * 1000)
    _wait_image(page)
    mask = seg.pixel_array.astype(bool)
    # pixels well inside and well outside the lung fields (2 % of the image away from their edge)
    step = max(1, round(0.02 * max(mask.shape)))
    rng = np.random.default_rng(0)

    def sample(where: np.ndarray) -> np.ndarray:
        r, c = np.nonzero(where)
        pick = rng.choice(len(r), 300, replace=len(r) < 300)
        return np.stack([c[pick] + 0.5, r[pick] + 0.5], axis=1)

    inside, outside = sample(~_grow(~mask, step)), sample(~_grow(mask, step))

    def tinted() -> tuple[float, float]:  # shares of the points inside, and outside, that are tinted
        pixels, placed = _look(page, np.concatenate([inside, outside]))
        shares = []
        for points in (placed[:len(inside)], placed[len(inside):]):
            xy = points[_on(pixels, points)].astype(int)
            assert len(xy) > 100, f"only {len(xy)} of the sampled points are on the viewport"
            shares.append(float(_coloured(pixels)[xy[:, 1], xy[:, 0]].mean()))
        return shares[0], shares[1]

    # the prompt box and the viewport's badges are coloured: a few sampled points may fall on them
    _wait_until(tinted, lambda share: share[0] > 0.85 and share[1] < 0.15, "OHIF to tint the SEG's lung fields (inside, outside)")
    _stage("SEG drawn")


def _grow(mask: np.ndarray, step: int) -> np.ndarray:
    """The mask dilated by a (2 step + 1)-pixel square: a running sum along each axis in turn."""
    grown = mask
    for axis in (0, 1):
        sums = np.cumsum(np.moveaxis(grown, axis, 0), axis=0, dtype=np.int32)
        sums = np.concatenate([np.zeros((step + 1, *sums.shape[1:]), np.int32), sums,
                               np.repeat(sums[-1:], step, axis=0)])  # fmt: skip
        grown = np.moveaxis(sums[2 * step + 1:] - sums[:-2 * step - 1] > 0, 0, axis)
    return grown


def _all_drawn(hits: dict[str, float]) -> bool:
    """Every outline drawn: nearly all its corners have a drawn pixel near."""
    return min(hits.values()) > 0.8


def _redraw(page: Page) -> None:
    """Make OHIF render the viewport again, as a reader's resize does (a narrower window, then
    back).

    Why: OHIF 3.13.2's SR viewport (OHIFCornerstoneSRMeasurementViewport) tells its display tool
    which measurements to draw (setTrackingUniqueIdentifiersForElement) in a React effect after
    the viewport is enabled, and does not ask for an annotation render then. Where the image is
    already cached and small (the cxr sample, not RG1) and the page is slow (software WebGL on
    CI's 2 shared cores, or PACSNODE_OHIF_SLOWDOWN=8 here) the image renders first, with nothing
    to draw, and no later render comes until the viewport changes. Seen twice in CI; here under
    an 8x slowdown in each of 3 runs, each time with every annotation and measurement loaded, 5
    SVG elements drawn instead of 55, and every outline drawn where the SR puts it after one
    annotation render or resize."""
    page.set_viewport_size({"width": WINDOW["width"] - 60, "height": WINDOW["height"]})
    page.wait_for_timeout(2000)  # the resize observer's render, before the size goes back
    page.set_viewport_size(WINDOW)


@pytest.mark.parametrize("source", SOURCES)
def test_ohif_draws_our_sr_and_seg_over_the_radiograph(
    source: str, studies: dict[str, Study], ohif: OhifServer, browser: Browser, tmp_path: Path
) -> None:
    study = studies[source]
    outlines = _outlines(study.sr)
    # e.g. "Pneumonia 0.97 (AI)": the findings above threshold whose Grad-CAM has a hot region
    findings = {label for label in outlines if not label.startswith("Lung fields")}
    assert findings, "the demo model finds nothing on this image: nothing for the panel to list"

    keep = os.environ.get("PACSNODE_SCREENSHOTS")
    context = browser.new_context(viewport=WINDOW, reduced_motion="reduce")
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
    if os.environ.get("PACSNODE_OHIF_SLOWDOWN"):  # a slower machine, e.g. 8 reproduces CI's (_redraw)
        slowdown = float(os.environ["PACSNODE_OHIF_SLOWDOWN"])
        context.new_cdp_session(page).send("Emulation.setCPUThrottlingRate", {"rate": slowdown})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    console: list[str] = []
    page.on("console", lambda m: console.append(m.text[:300]) if m.type == "error" else None)
    try:
        page.goto(ohif.viewer_url(study.uid))
        _wait_image(page)
        _stage("study shown")
        # the radiograph alone: gray, nothing coloured drawn over it
        plain = _coloured(_look(page, np.zeros((0, 2)))[0])
        assert plain.mean() < 0.02, f"{plain.mean():.1%} of the plain radiograph's viewport is coloured"

        every = np.concatenate([points[:-1] for points in outlines.values()])
        ends = np.cumsum([len(points) - 1 for points in outlines.values()])[:-1]

        def sr_drawn() -> dict[str, float]:  # per outline: share of its corners with a drawn pixel near
            pixels, placed = _look(page, every)
            drawn, hits = _coloured(pixels), {}
            for label, points in zip(outlines, np.split(placed, ends), strict=True):
                points = points[_on(pixels, points)]
                hits[label] = float(_near(drawn, points).mean()) if len(points) >= 3 else 0.0
            return hits

        # The SR: OHIF draws every outline of it on the image, then asks to track its measurements.
        page.get_by_text(str(study.sr.SeriesDescription), exact=True).dblclick()
        page.get_by_text("Do you want to continue tracking measurements").wait_for(timeout=LOAD_TIMEOUT_S * 1000)
        _wait_image(page)
        every_outline = "OHIF to draw every outline of the SR"
        try:
            _wait_until(sr_drawn, _all_drawn, every_outline, timeout=SR_FIRST_DRAW_S)
        except AssertionError as e:
            # OHIF 3.13.2's race (see _redraw): the image shown, the outlines not drawn until the
            # viewport renders again. A reader then resizes, pans or zooms; the test resizes.
            _stage(f"SR outlines not drawn, the window resized: {e}; {_page_state(page, console, errors)}")
            _redraw(page)
            try:
                _wait_until(sr_drawn, _all_drawn, f"{every_outline} once its viewport rendered again")
            except AssertionError as e:
                raise AssertionError(f"{e}; {_page_state(page, console, errors)}") from None
        _stage("SR drawn")
        # Tracking the SR's measurements computes each region's statistics: slow in software WebGL.
        page.locator("[data-cy=yes-hydrate-btn]").click(timeout=LOAD_TIMEOUT_S * 1000)
        _stage("SR measurements tracked")
        # The measurement panel lists each finding by its label, e.g. "Pneumonia 0.97 (AI)".
        page.locator("[data-cy=trackedMeasurements-btn]").click(timeout=LOAD_TIMEOUT_S * 1000)
        for label in findings:
            page.get_by_text(label, exact=True).first.wait_for(timeout=LOAD_TIMEOUT_S * 1000)
        _stage("findings listed")

        # The SEG, as OHIF shows it when its series is opened: over the source image.
        _check_seg(page, study.seg)
        # the segmentation panel: our segment by its label, with its colour and a visibility toggle. The SR's lung fields carry the same label: the
        # measurement panel must be the one not shown.
        def segment_listed() -> bool:
            return (page.locator("[data-cy^=segmentation-select]").filter(visible=True).count() > 0
                    and page.locator("[data-cy=trackedMeasurements-panel]").filter(visible=True).count() == 0
                    and page.get_by_text("Lung fields (AI)", exact=True).filter(visible=True).count() > 0)  # fmt: skip

        page.locator("[data-cy=panelSegmentation-btn]").click(timeout=LOAD_TIMEOUT_S * 1000)
        wait_for(segment_listed, LOAD_TIMEOUT_S, "the segment's label in the segmentation panel", interval=0.5)
        _stage("segment listed")
        if keep and source == "cxr-sample":  # the README's picture: the SEG loaded beside the outlines
            page.get_by_role("button", name="Yes").click(timeout=LOAD_TIMEOUT_S * 1000)
            _wait_until(sr_drawn, _all_drawn, "OHIF to draw the SR's outlines with the SEG")
            save_png(Image.open(BytesIO(page.screenshot(animations="disabled"))).convert("RGB"),
                     Path(keep) / f"ohif-sr-seg-{source}.png")  # fmt: skip
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"), timeout=LOAD_TIMEOUT_S * 1000)  # for the report
        raise
    finally:
        context.close()
    assert errors == [], errors
