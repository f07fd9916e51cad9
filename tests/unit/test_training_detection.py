"""The RSNA RetinaNet recipe end to end on tiny DICOMs; box conversions; the eval path scores 1.0
for perfect detections; resume equals an uninterrupted run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.unit import training_data
from training.__main__ import main
from training.datasets import load_dataset
from training.detection import (
    BoxSet,
    build_detector,
    choose_score_threshold,
    from_detector,
    load_detection_run,
    predict,
    score_split,
    to_detector,
)
from training.train import RunError

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "rsna_retinanet.yaml"
# 96 px DICOMs trained at 64 px: split seed 0 puts 2 opacity images in val and 1 in test
TINY = [
    "num_workers=0", "cache=true", "image_size=64", "batch_size=4", "split.val=0.25", "split.test=0.25",
    "max_steps=2", "network.args.backbone=resnet10", "network.args.widen_factor=0.125",
    "network.args.returned_layers=[1,2]", "network.args.fpn_channels=16", "network.args.anchor_shapes=[[12,12],[16,12]]",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny networks gain nothing from intra-op threads; on a busy shared CPU they cost 10x
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def rsna_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return training_data.rsna(tmp_path_factory.mktemp("rsna"), size=96, n=18, opacity=0.5)


def _train(data: Path, out: Path, sets: list[str], *extra: str) -> dict:
    args = ["train", "--recipe", str(RECIPE), "--data", str(data), "--out", str(out), "--device", "cpu"]
    for s in [*TINY, *sets]:
        args += ["--set", s]
    assert main([*args, *extra]) == 0
    return json.loads((out / "run.json").read_text())


def test_box_conversion_round_trips() -> None:
    boxes = [(264.0, 152.0, 213.0, 379.0), (562.0, 152.0, 256.0, 453.0), (0.0, 0.0, 1024.0, 1024.0)]
    det = to_detector(boxes, (1024, 1024), 512)  # the recipe's case: exact in floating point
    np.testing.assert_array_equal(det[0], [76.0, 132.0, 265.5, 238.5])  # (row0, col0, row1, col1)
    np.testing.assert_array_equal(from_detector(det, (1024, 1024), 512), boxes)
    # non-square source, non-power-of-two scale: equal to rounding error
    odd = [(10.0, 20.0, 30.0, 25.0), (55.5, 20.25, 25.0, 30.0)]
    back = from_detector(to_detector(odd, (96, 120), 64), (96, 120), 64)
    np.testing.assert_allclose(back, odd, rtol=0, atol=1e-9)
    assert to_detector([], (96, 96), 64).shape == (0, 4)


class _Oracle(torch.nn.Module):
    """Stands in for the detector: returns given detection dicts batch by batch, in order."""

    target_box_key, pred_score_key = "boxes", "labels_scores"

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = outputs

    def forward(self, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out, self.outputs = self.outputs[: len(x)], self.outputs[len(x) :]
        return out


def test_perfect_detections_score_one_through_the_eval_path(rsna_data: Path) -> None:
    records = load_dataset({"format": "rsna"}, rsna_data).records
    data = BoxSet(records, 64, cache=False)
    # the true boxes as the detector would emit them (training pixels), one false low-score box each
    outputs = []
    for r in records:
        true = to_detector(r.boxes, (96, 96), 64)
        boxes = np.concatenate([true, [[1.0, 1.0, 5.0, 5.0]]])
        scores = [0.9] * len(true) + [0.1]
        outputs.append({"boxes": torch.tensor(boxes, dtype=torch.float16), "labels_scores": torch.tensor(scores)})
    preds = predict(_Oracle(outputs), data, 4, torch.device("cpu"))
    truths = [r.boxes for r in records]
    threshold, score = choose_score_threshold(preds, truths)
    assert score == 1.0 and 0.1 < threshold <= 0.9  # the false box is cut, the true ones kept
    total, per = score_split(preds, truths, threshold)
    assert total == 1.0 and [p is None for p in per] == [not r.boxes for r in records]
    low, per_low = score_split(preds, truths, 0.05)  # keeping the false box: every image scores < 1
    assert low is not None and low < 1 and all(p == 0.0 for p, r in zip(per_low, records, strict=True) if not r.boxes)
    with pytest.raises(ValueError, match="2 predictions for 3 images"):
        score_split(preds[:2], truths[:3], 0.5)


def test_recipe_end_to_end_and_resume(rsna_data: Path, tmp_path: Path) -> None:
    run = _train(rsna_data, tmp_path / "run", ["epochs=1"])
    with pytest.raises(RunError, match="already holds a run: pass --resume"):
        _train(rsna_data, tmp_path / "run", ["epochs=2"])
    run = _train(rsna_data, tmp_path / "run", ["epochs=2"], "--resume")
    assert run["task"] == "detection" and run["labels"] == ["Lung Opacity"] and run["input_size"] == 64
    assert [h["epoch"] for h in run["history"]] == [1, 2] and run["throughput_images_per_s"] > 0
    assert 0.05 <= run["score_threshold"] <= 0.95 and run["pretrained"] is None
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["final_split"] == "test" and report["score_threshold"] == run["score_threshold"]
    for split, n, positives in (("val", 4, 2), ("test", 4, 1)):
        m = report["metrics"][split]
        assert 0 <= m["rsna_score"] <= 1 and m["images"] == n and m["with_opacity"] == positives
        assert len(report["per_image"][split]) == n and run["metrics"][split] == m
    # the same seed from scratch gives the resumed run's epoch-2 weights
    _train(rsna_data, tmp_path / "fresh", ["epochs=2"])
    a = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["net"]
    b = torch.load(tmp_path / "fresh" / "checkpoint.pt", weights_only=False)["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    detector, meta = load_detection_run(tmp_path / "run")
    assert meta["detection"]["box_selector"]["detections_per_img"] == 8
    with torch.inference_mode():
        (out,) = detector(torch.rand(1, 1, 64, 64))
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) <= 8
    with pytest.raises(RunError, match="is a detection run: Grad-CAM needs a classifier run"):
        main(["gradcam", "--run", str(tmp_path / "run"), "--image", str(rsna_data), "--out", str(tmp_path / "c.png")])
    with pytest.raises(ValueError, match="is a detection run: pass it as --detection-run beside a classifier --run"):
        main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "bundle"), "--version", "1.0.0"])
    assert not (tmp_path / "bundle").exists()


def test_detection_refuses_what_it_cannot_do(rsna_data: Path, tmp_path: Path) -> None:
    with pytest.raises(RunError, match="augmentation is not implemented for detection"):
        _train(rsna_data, tmp_path / "a", ["augment.prob=0.5"])
    with pytest.raises(RunError, match="no boxes in the training split"):
        _train(training_data.nih(tmp_path / "nih", n=6, size=64, patients=3), tmp_path / "b", ["dataset.format=nih"])
    with pytest.raises(ValueError, match="unknown RetinaNet backbone 'resnet7'"):
        build_detector({"architecture": "RetinaNet", "args": {"backbone": "resnet7"}})
    with pytest.raises(ValueError, match="needs architecture: RetinaNet"):
        build_detector({"architecture": "UNet"})


def test_detector_finds_the_synthetic_opacities(tmp_path: Path) -> None:
    # 48 images, 40 epochs of a small ResNet10 at 64 px (~5 s): the boxes must come back where the
    # blobs are, which also pins the (row, column) box convention against the image axes
    data = training_data.rsna(tmp_path / "rsna", size=96, n=48, opacity=0.5)
    sets = ["max_steps=null", "batch_size=8", "split.val=0.2", "split.test=0.2", "epochs=40", "optimizer.lr=1e-3",
            "scheduler.name=none", "network.args.widen_factor=0.25", "network.args.fpn_channels=32"]  # fmt: skip
    run = _train(data, tmp_path / "run", sets)
    assert max(h["val_rsna_score"] for h in run["history"]) == 1.0
    assert run["metrics"]["test"]["rsna_score"] >= 0.6 and run["metrics"]["test"]["mean_score_with_opacity"] >= 0.9
