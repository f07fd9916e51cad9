"""What a radiologist sees in OHIF 3.13.2: the node's SR and SEG over a real radiograph.

Real peers only: the radiograph goes to Orthanc (the PACS) and to `pacsnode run` with DCMTK's
storescu; the node sends its results to the same Orthanc; OHIF's released `dist/` (npm) is
served with Orthanc's DICOMweb on one origin (tests/ohif.py); Debian's Chromium, driven by
playwright, opens the study as a reader would: the SR series, "Yes" to load its measurements,
then the SEG series. The test checks what the page shows: no page error, the findings listed by
name in the measurement panel, the SR's outlines and the SEG's lung fields drawn over the image
where our objects put them (screen pixels before and after, at points mapped by OHIF's own
image-to-screen transform), the segment's label in the segmentation panel.

Set PACSNODE_SCREENSHOTS=<folder> to keep the pictures (docs/img/ohif-sr-seg-*.png come from here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from docs.render import save_png
from tests.browser import PAGE_TIMEOUT_S, chromium
from tests.ohif import OhifServer, ohif_dist
from tests.peers import CXR_SAMPLES, Node, Orthanc, have, img2dcm, node_config, storescu, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "storescu", "img2dcm"), reason="needs Orthanc and DCMTK"),
]

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
CXR = CXR_SAMPLES / "pneumonia" / "person1946_bacteria_4874.jpeg"
T = TypeVar("T")
#: Seconds for OHIF to load a study, an SR or a SEG (software-rendered WebGL on 2 shared cores).
LOAD_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc, demo_bundle: Path) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("node")
    cfg = node_config(work, demo_bundle, [{"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1",
                                      "port": pacs.dicom_port, "timeout": 10}])  # fmt: skip
    n = Node(cfg).start(timeout=180)
    yield n
    n.stop()


@pytest.fixture(scope="module")
def ohif(pacs: Orthanc) -> Iterator[OhifServer]:
    with OhifServer(ohif_dist(), pacs.dicomweb_url) as server:
        yield server


def _radiograph(source: str, folder: Path) -> tuple[Path, tuple[str, ...]]:
    """The file to send and storescu's extra options."""
    if source == "cxr-sample":
        return img2dcm(CXR, folder / "cxr.dcm", "ViewPosition=PA", "PatientName=CXR^Sample"), ("-xy",)
    # RG1 stores Pixel Spacing 0\0: OHIF then scales its world by zero and draws nothing at all
    # (the original image included). Sent as its modality should have written it: same pixels
    # and UIDs, no Pixel Spacing. The node's own handling of 0\0 is tested in the unit tests.
    ds = pydicom.dcmread(RG1)
    del ds.PixelSpacing
    path = folder / "rg1.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ()


def _results(node: Node, pacs: Orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The SR and SEG of the study's done job, as Orthanc holds them."""
    def done() -> dict[str, Any] | None:
        jobs = [j for j in node.jobs() if j["study_instance_uid"] == study_uid]
        failed = [j for j in jobs if j["state"] == "failed"]
        assert not failed, f"job failed at {failed[0]['error_stage']}: {failed[0]['error']}"
        return next((j for j in jobs if j["state"] == "done"), None)

    job = wait_for(done, 300, f"the node's job on {study_uid}", interval=1.0)
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


def _to_screen(page: Any, points: np.ndarray) -> np.ndarray:
    """Image (column, row) points -> page pixels, by OHIF's cornerstone transform of the viewport."""
    return np.asarray(page.evaluate(
        """(points) => {
          const vp = window.cornerstone.getEnabledElements()[0].viewport;
          const imageId = vp.getCurrentImageId();
          const rect = vp.getCanvas().getBoundingClientRect();
          return points.map(p => {
            const c = vp.worldToCanvas(window.cornerstone.utilities.imageToWorldCoords(imageId, p));
            return [rect.left + c[0], rect.top + c[1]];
          });
        }""", points.tolist()))  # fmt: skip


def _shot(page: Any) -> np.ndarray:
    png = page.screenshot(timeout=LOAD_TIMEOUT_S * 1000)  # software WebGL: a busy page is slow to paint
    return np.asarray(Image.open(BytesIO(png)).convert("RGB"), dtype=int)


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


def _wait_until(measure: Callable[[], T], good: Callable[[T], bool], what: str) -> T:
    """Measure the page until the value is good (drawing is asynchronous and, in software WebGL
    on a loaded machine, slow); fail with the last value after LOAD_TIMEOUT_S."""
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        value = measure()
        if good(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {LOAD_TIMEOUT_S:.0f} s waiting for {what}: {value}")
        time.sleep(2)


def _wait_image(page: Any) -> None:
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

    wait_for(shown, LOAD_TIMEOUT_S, "OHIF to show the radiograph", interval=1.0)


@pytest.mark.parametrize("source", ["rg1", "cxr-sample"])
def test_ohif_draws_our_sr_and_seg_over_the_radiograph(
    source: str, node: Node, pacs: Orthanc, ohif: OhifServer, tmp_path: Path
) -> None:
    path, extra = _radiograph(source, tmp_path)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    for port, aec in ((pacs.dicom_port, pacs.aet), (node.port, "PACSNODE")):  # the PACS has the original
        out = storescu(port, path, aec=aec, extra=extra)
        assert out.returncode == 0, out.stderr
    objects = _results(node, pacs, study_uid)
    outlines = _outlines(objects["sr"])
    # e.g. "Pneumonia 0.97 (AI)": the findings above threshold whose Grad-CAM has a hot region
    findings = {label for label in outlines if not label.startswith("Lung fields")}
    assert findings, "the demo model finds nothing on this image: nothing for the panel to list"

    keep = os.environ.get("PACSNODE_SCREENSHOTS")
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(ohif.viewer_url(study_uid))
            _wait_image(page)
            _stage('study shown')
            before = _shot(page)

            # The SR: OHIF draws every outline of it on the image, then asks to track its measurements.
            page.get_by_text(str(objects["sr"].SeriesDescription), exact=True).dblclick()
            page.get_by_text("Do you want to continue tracking measurements").wait_for(timeout=LOAD_TIMEOUT_S * 1000)
            screens = {label: _to_screen(page, points[:-1]) for label, points in outlines.items()}

            def sr_drawn() -> dict[str, float]:
                drawn = _coloured(_shot(page)) & ~_coloured(before)
                return {label: float(_near(drawn, points).mean()) for label, points in screens.items()}

            _wait_until(sr_drawn, lambda hits: min(hits.values()) > 0.8, "OHIF to draw every outline of the SR")
            _stage('SR drawn')
            # Loading the SR's measurements computes each region's statistics: slow in software WebGL.
            page.locator("[data-cy=yes-hydrate-btn]").click(timeout=LOAD_TIMEOUT_S * 1000)
            _stage('SR measurements loading')

            # The measurement panel lists each finding by its label, e.g. "Pneumonia 0.97 (AI)".
            page.locator("[data-cy=trackedMeasurements-btn]").click(timeout=LOAD_TIMEOUT_S * 1000)
            for label in findings:
                page.get_by_text(label, exact=True).first.wait_for(timeout=LOAD_TIMEOUT_S * 1000)
                _stage('findings listed')

            # The SEG: the lung fields, tinted in the segment's colour over the image.
            page.get_by_text(str(objects["seg"].SeriesDescription), exact=True).dblclick()
            page.get_by_text("Do you want to open this Segmentation?").wait_for(timeout=LOAD_TIMEOUT_S * 1000)
            mask = objects["seg"].pixel_array.astype(bool)
            rows, cols = np.nonzero(mask)
            pick = np.random.default_rng(0).choice(len(rows), 200, replace=False)
            inside = _to_screen(page, np.stack([cols[pick] + 0.5, rows[pick] + 0.5], axis=1))
            ys, xs = inside[:, 1].astype(int), inside[:, 0].astype(int)

            def seg_tinted() -> float:  # share of the 200 lung pixels tinted now and gray before
                return float((_coloured(_shot(page))[ys, xs] & ~_coloured(before)[ys, xs]).mean())

            _wait_until(seg_tinted, lambda share: share > 0.9, "OHIF to tint the SEG's lung fields")
            _stage('SEG drawn')
            page.get_by_role("button", name="Yes").click(timeout=LOAD_TIMEOUT_S * 1000)
            # the segmentation panel: our segment by its label (with its colour and a visibility toggle)
            page.locator("[data-cy=panelSegmentation-btn]").click(timeout=LOAD_TIMEOUT_S * 1000)
            page.get_by_text("Lung fields (AI)").first.wait_for(timeout=LOAD_TIMEOUT_S * 1000)
            _stage('segment listed')
            if keep:  # the README's picture: findings listed and outlined, lung fields tinted
                page.locator("[data-cy=trackedMeasurements-btn]").click(timeout=LOAD_TIMEOUT_S * 1000)
                time.sleep(2)
                picture = Image.fromarray(_shot(page).astype(np.uint8))
                save_png(picture, Path(keep) / f"ohif-sr-seg-{source}.png")
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"), timeout=LOAD_TIMEOUT_S * 1000)  # for the report
            raise
        assert errors == [], errors
