"""The optional lung-opacity detector: export --detection-run -> bundle -> the node's boxes on RG1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file

from pipelines.bundle import BundleError, device_uid_for, list_bundles, load_bundle, read_metadata
from pipelines.chest_xray import DETECTION_LABEL, ChestXrayPipeline, classifier_input
from pipelines.imaging import to_display
from tests.unit import training_data
from training.__main__ import main
from training.detection import from_detector, load_detection_run

RECIPE = Path(__file__).resolve().parents[2] / "training" / "recipes" / "rsna_retinanet.yaml"
TINY_DETECTION = [
    "num_workers=0", "cache=true", "image_size=64", "batch_size=4", "split.val=0.25", "split.test=0.25",
    "max_steps=2", "epochs=1", "network.args.backbone=resnet10", "network.args.widen_factor=0.125",
    "network.args.returned_layers=[1,2]", "network.args.fpn_channels=16", "network.args.anchor_shapes=[[12,12],[16,12]]",
]  # fmt: skip


@pytest.fixture(scope="module")
def det_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("det")
    data = training_data.rsna(tmp / "rsna", size=96, n=12, opacity=0.5)
    args = ["train", "--recipe", str(RECIPE), "--data", str(data), "--out", str(tmp / "run"), "--device", "cpu"]
    for s in TINY_DETECTION:
        args += ["--set", s]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(n)
    return tmp / "run"


@pytest.fixture(scope="module")
def det_bundle(demo_bundle: Path, det_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo classifier + segmentation runs with the tiny detection run, as `export` bundles them."""
    cls_run = demo_bundle.parent / ".chest_xray-training" / "cls"
    out = tmp_path_factory.mktemp("bundles") / "chest_xray"
    assert main(["export", "--run", str(cls_run), "--detection-run", str(det_run), "--out", str(out), "--version", "0.3.0"]) == 0
    return out


def test_bundle_with_detector_round_trips(det_bundle: Path, det_run: Path, demo_bundle: Path) -> None:
    b = load_bundle(det_bundle)
    meta, run = b.metadata, json.loads((det_run / "run.json").read_text())
    spec = meta.networks.detector
    assert spec is not None and spec.architecture == "RetinaNet" and spec.weights == "models/detector.pt"
    assert spec.args == run["network"]["args"] and spec.detection == run["detection"]
    assert b.detector is not None and b.detector_size == spec.input_size == 64
    assert b.detector_threshold == spec.score_threshold == run["score_threshold"]
    # the detector's hash joins the device_uid: a new detector gives new result UIDs
    shas = [meta.networks.segmentation.sha256, meta.networks.classifier.sha256, spec.sha256]
    assert b.model.device_uid == device_uid_for(shas) != load_bundle(demo_bundle).model.device_uid
    assert meta.metrics["detector"] == run["metrics"]
    assert meta.training_data["detector"]["run"] == str(det_run.resolve())
    assert meta.training_data["detector"]["dataset"] == run["data"]["dataset"]
    # the same weights as the run's
    det, _ = load_detection_run(det_run)
    ours = b.detector.network.state_dict()  # type: ignore[union-attr]
    assert all(torch.equal(v, ours[k]) for k, v in det.network.state_dict().items())
    assert list_bundles([det_bundle])[0]["status"] == "ok"


def test_bundle_without_detector_is_unchanged(demo_bundle: Path) -> None:
    b = load_bundle(demo_bundle)
    assert b.metadata.networks.detector is None and not (demo_bundle / "models" / "detector.pt").exists()
    assert b.detector is None and b.detector_size is None and b.detector_threshold is None
    shas = [b.metadata.networks.segmentation.sha256, b.metadata.networks.classifier.sha256]
    assert b.model.device_uid == device_uid_for(shas)


def test_detector_weights_are_checked(det_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(det_bundle, tmp_path / "chest_xray"))
    weights = copy / "models" / "detector.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"models/detector.pt sha256 .* does not match"):
        load_bundle(copy)
    assert list_bundles([copy])[0]["status"] == "models/detector.pt sha256 does not match metadata"
    weights.unlink()
    with pytest.raises(BundleError, match="weight file models/detector.pt is missing"):
        load_bundle(copy)


def test_detector_metadata_is_checked(det_bundle: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(det_bundle, tmp_path / "chest_xray"))
    meta_file = copy / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["networks"]["detector"]["score_threshold"] = 1.5
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match=r"networks.detector.score_threshold: Input should be less than or equal to 1"):
        read_metadata(copy)
    meta["networks"]["detector"]["architecture"] = "UNet"
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(BundleError, match="networks.detector.architecture: Input should be 'RetinaNet'"):
        read_metadata(copy)


def test_export_refuses_a_classifier_run_as_detection_run(demo_bundle: Path, tmp_path: Path) -> None:
    cls_run = demo_bundle.parent / ".chest_xray-training" / "cls"
    with pytest.raises(ValueError, match="is not a detection run: --detection-run takes a RetinaNet run"):
        main(["export", "--run", str(cls_run), "--detection-run", str(cls_run), "--out", str(tmp_path / "b"), "--version", "1"])
    assert not (tmp_path / "b").exists()


def test_pipeline_returns_boxes_in_source_pixels(det_bundle: Path, det_run: Path, tmp_path: Path) -> None:
    # the tiny detector's scores are all below its chosen threshold: lower the (unhashed)
    # thresholds in the metadata so every candidate box comes back
    copy = Path(shutil.copytree(det_bundle, tmp_path / "chest_xray"))
    meta_file = copy / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["networks"]["detector"]["score_threshold"] = 0.0
    meta["networks"]["detector"]["detection"]["box_selector"]["score_thresh"] = 0.0
    meta_file.write_text(json.dumps(meta))

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    pipeline = ChestXrayPipeline(copy, "cpu")
    (result,) = pipeline.run([ds])
    (again,) = pipeline.run([ds], saved=[result.outputs])  # what a replay draws: the same boxes
    assert again.boxes == result.boxes and result.outputs["boxes"].shape == (len(result.boxes), 5)
    rows, cols = int(ds.Rows), int(ds.Columns)
    assert result.boxes and "detection" in result.timings
    for box in result.boxes:
        assert 0 <= box.x0 < box.x1 <= cols and 0 <= box.y0 < box.y1 <= rows and 0 <= box.score <= 1
        assert box.label == DETECTION_LABEL
    assert [b.score for b in result.boxes] == sorted((b.score for b in result.boxes), reverse=True)

    # the same boxes as the training code's path: BoxSet's input, from_detector back to source
    det, _ = load_detection_run(det_run)
    det.set_box_selector_parameters(**meta["networks"]["detector"]["detection"]["box_selector"])
    display = to_display(ds)
    with torch.inference_mode():
        (out,) = det(classifier_input(display, (0, rows, 0, cols), 64)[None])
    order = np.argsort(-out["labels_scores"].numpy(), kind="stable")
    expected = from_detector(out["boxes"].numpy()[order], (rows, cols), 64)
    got = np.array([(b.x0, b.y0, b.width, b.height) for b in result.boxes])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-2)


def test_pipeline_without_detector_has_no_boxes(demo_bundle: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    (result,) = ChestXrayPipeline(demo_bundle, "cpu").run([ds])
    assert result.boxes == [] and "detection" not in result.timings
