"""What radiologists and admins see: the SR rendered by DCMTK, the GSPS checked by DCMTK, PNGs.

Objects are built from the real pipeline's output on RG1 (demo bundle), as the worker builds them.
"""

from __future__ import annotations

import datetime
import html
import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from docs.render import MAX_BYTES, render_files
from node.writers import codes
from node.writers.gsps import build_presentation_state
from node.writers.sc import build_overlay_sc
from node.writers.sr import build_comprehensive_3d_sr
from node.writers.uids import result_uid
from pipelines.base import PipelineResult
from pipelines.registry import load_pipeline
from tests.peers import have

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,  # the demo bundle is trained once per session
    pytest.mark.skipif(not have("dsr2html", "dcmpschk", "dcmp2pgm"), reason="needs DCMTK"),
]

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))


@pytest.fixture(scope="module")
def objects(demo_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineResult, dict[str, Path]]:
    """The pipeline's result on RG1 and the SR, SC and GSPS built from it, written to files."""
    source = pydicom.dcmread(RG1)
    pipeline = load_pipeline("chest_xray", demo_bundle, "cpu")
    [result] = pipeline.run([source])
    folder = tmp_path_factory.mktemp("objects")
    paths = {}
    for kind in ("sr", "sc", "gsps"):
        ids = {"series_instance_uid": result_uid("see", kind, "series"), "sop_instance_uid": result_uid("see", kind),
               "series_number": 1, "instance_number": 1, "content_datetime": datetime.datetime(2025, 1, 2, 3, 4, 5)}
        if kind == "sr":
            ds = build_comprehensive_3d_sr([source], [result], pipeline.model, **ids)
        elif kind == "sc":
            ds = build_overlay_sc(source, result, pipeline.model, **ids)
        else:
            ds = build_presentation_state(source, result, pipeline.model, **ids)
        paths[kind] = folder / f"{kind}.dcm"
        ds.save_as(paths[kind], enforce_file_format=True)
    return result, paths


def _text(html_doc: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", html_doc)))


def test_dsr2html_names_each_finding_with_its_probability_and_decision(
    objects: tuple[PipelineResult, dict[str, Path]],
) -> None:
    result, paths = objects
    out = subprocess.run(["dsr2html", str(paths["sr"])], capture_output=True, text=True, timeout=60, check=True)
    text = _text(out.stdout)
    assert "Imaging Measurement Report" in text
    groups = text.split("Measurement Group")[1:]  # the drawn regions and their numbers
    number = r"(\d(?:\.\d+)?(?:e[-+]?\d+)?)"  # small values are DS exponents (2.8e-05)
    for finding in result.findings:
        if finding.label in result.heatmaps:  # drawn: a group with its probability and decision
            # its label, the group's Comment: "Edema 0.59 (AI)"
            [group] = [g for g in groups if re.search(rf" {re.escape(finding.label)} {number} \(AI\)", g)]
            m = re.search(rf" {number} 1 1 (Present|Absent) ", group)  # "<value> 1" (UCUM unity)
            assert m, f"no probability and decision for {finding.label} in: {group[:1200]}"
            value, decision = m.groups()
        else:  # a qualitative evaluation read as one sentence: "Absent Pneumonia: AI probability ..."
            meaning = re.escape(codes.finding_code(finding.label).meaning)
            m = re.search(rf" (Present|Absent) {meaning}: AI probability {number} \(threshold ", text)
            assert m, f"no sentence for {finding.label}"
            decision, value = m.groups()
        assert float(value) == pytest.approx(finding.probability, abs=1e-5), finding.label
        assert decision == ("Present" if finding.present else "Absent"), finding.label


def test_dcmpschk_passes_the_gsps(objects: tuple[PipelineResult, dict[str, Path]]) -> None:
    out = subprocess.run(["dcmpschk", str(objects[1]["gsps"])], capture_output=True, text=True, timeout=60)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "Test passed" in log and "Test failed" not in log, log


def test_render_writes_small_pngs_with_the_gsps_outline_drawn(
    objects: tuple[PipelineResult, dict[str, Path]], tmp_path: Path,
) -> None:
    _, paths = objects
    sc_png, gsps_png = render_files(RG1, paths["gsps"], paths["sc"], tmp_path, "rg1")
    assert (sc_png.name, gsps_png.name) == ("rg1-sc.png", "rg1-gsps.png")
    for png in (sc_png, gsps_png):
        assert 0 < png.stat().st_size <= MAX_BYTES
    pixels = np.asarray(Image.open(gsps_png).convert("RGB"), dtype=int)
    # The outline layer's recommended colour is cyan; the image itself is gray.
    cyan = (pixels[..., 0] < 80) & (pixels[..., 1] > 180) & (pixels[..., 2] > 180)
    assert cyan.sum() > 100
