"""bench/gpu.py on the CPU (`--dry-run`): every section runs and reports, so the first GPU
machine finds a script that works; the CUDA numbers themselves stay unverified here."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.peers import REPO

_spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "bench" / "gpu.py")
assert _spec is not None and _spec.loader is not None
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)  # bench/ is scripts, not a package

RECIPES = sorted(p.stem for p in (REPO / "training" / "recipes").glob("*.yaml"))


def test_batches_are_assembled_in_turn() -> None:
    images = gpu.radiographs()[:2]
    batch = gpu.assemble(images, 5)
    assert [id(d) for d in batch] == [id(images[i % 2]) for i in range(5)]
    with pytest.raises(ValueError, match="a batch needs n >= 1"):
        gpu.assemble(images, 0)
    assert str(images[0].filename) == str(get_testdata_file("RG1_UNCR.dcm"))


def test_without_a_gpu_the_real_run_refuses_and_points_to_the_dry_run(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
    assert out.returncode == 2 and "CUDA is not available" in out.stderr and "--dry-run" in out.stderr
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_dry_run_exercises_every_section(demo_bundle: Path, tmp_path: Path) -> None:
    report_file = tmp_path / "gpu.json"
    out = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run", "--bundle", str(demo_bundle),
                          "--work", str(tmp_path / "work"), "--out", str(report_file)],
                         capture_output=True, text=True, timeout=1800, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = json.loads(report_file.read_text())
    assert report["dry_run"] is True and report["cuda_verified"] is False and report["device"]["device"] == "cpu"
    sections = report["sections"]
    assert set(sections) == {"parity", "throughput", "training", "retinanet"}
    assert not [name for name, s in sections.items() if "error" in s or "skipped" in s]
    (parity,) = sections["parity"]["bundles"].values()
    assert parity["images"] == 2 and parity["findings"] == 15
    assert parity["max_probability_difference"] == 0.0 and parity["decisions_that_differ"] == 0  # CPU vs CPU
    batches = sections["throughput"]["batches"]
    assert set(batches) == {"1", "2"}
    assert all(b["pipeline_images_per_s"] > 0 and b["bare_forward_images_per_s"] > 0 for b in batches.values())
    training = sections["training"]["recipes"]
    assert set(training) == set(RECIPES)  # one epoch of every recipe
    assert all(r["finite"] and r["amp"] is False and r["steps"] == 1 for r in training.values())
    det = sections["retinanet"]
    assert det["losses"] and all(math.isfinite(v) for v in det["losses"].values()) and len(det["boxes_per_image"]) == 2
