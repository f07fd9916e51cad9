"""Model bundle: export -> load round trip, and every integrity check."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from node.cli import main as pacsnode
from pipelines.base import DEMO_DISCLAIMER
from pipelines.bundle import (
    ARCHITECTURES,
    BundleError,
    build_network,
    device_uid_for,
    list_bundles,
    load_bundle,
    read_metadata,
)
from pipelines.chest_xray import ChestXrayPipeline
from tests.peers import node_config


@pytest.fixture
def bundle_copy(demo_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo_bundle, tmp_path / "chest_xray"))


def test_round_trip(demo_bundle: Path) -> None:
    b = load_bundle(demo_bundle)
    meta = b.metadata
    assert len(b.labels) == 15 and b.labels[-1] == "No Finding"
    assert len(b.thresholds) == 15 and all(0 < t < 1 for t in b.thresholds)
    assert b.model.demo is True and meta.demo is True
    assert DEMO_DISCLAIMER in b.model.description and b.model.disclaimer == DEMO_DISCLAIMER
    assert b.model.version == meta.version and b.model.name == meta.name
    assert b.model.device_uid.startswith("2.25.") and len(b.model.device_uid) <= 64
    shas = [meta.networks.segmentation.sha256, meta.networks.classifier.sha256]
    assert b.model.device_uid == device_uid_for(shas)
    for key in ("monai_version", "pytorch_version", "network_data_format", "intended_use", "metrics"):
        assert getattr(meta, key)
    assert 0 <= meta.metrics["segmentation"]["val"]["dice"] <= 1
    per_label = meta.metrics["classifier"]["val"]["per_label"]
    assert [row["label"] for row in per_label] == list(b.labels)
    x = torch.zeros(1, 1, b.classifier_size, b.classifier_size)
    assert b.classifier(x).shape == (1, 15)


def test_demo_bundle_comes_from_train_and_export(demo_bundle: Path) -> None:
    """`training demo` = synthetic data set -> two recipe runs -> `export` (the runs stay beside it)."""
    meta = read_metadata(demo_bundle)
    runs = demo_bundle.parent / ".chest_xray-training"
    cls_run = json.loads((runs / "cls" / "run.json").read_text())
    assert meta.training_data["classifier"]["run"] == str((runs / "cls").resolve())
    assert meta.training_data["classifier"]["synthetic"] == "true" and meta.demo is True
    assert meta.thresholds == dict(zip(cls_run["labels"], cls_run["thresholds"], strict=True))
    # trained at 64 px (--quick), validated, thresholded and bundled at its inference size
    assert cls_run["recipe"]["image_size"] == 64 and meta.input_size.classifier == 224
    assert meta.training_data["recipes"]["segmentation"]["network"]["architecture"] == "UNet"


def test_pinned_version(demo_bundle: Path) -> None:
    assert load_bundle(demo_bundle, "0.1.0").model.version == "0.1.0"
    with pytest.raises(BundleError, match=r"is version 0.1.0; the configuration asks for 1.0.0"):
        read_metadata(demo_bundle, "1.0.0")


def test_bundle_and_network_registry_name_the_same_architectures() -> None:
    from pipelines.networks import ARCHITECTURES as BUILDERS  # bundle.py keeps the names torch-free

    assert set(ARCHITECTURES) == set(BUILDERS)


def test_device_uid_changes_with_weights() -> None:
    assert device_uid_for(["a", "b"]) == device_uid_for(["a", "b"])
    assert device_uid_for(["a", "b"]) != device_uid_for(["a", "c"])


def test_sha_mismatch_detected(bundle_copy: Path) -> None:
    weights = bundle_copy / "models" / "classifier.pt"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"models/classifier.pt sha256 .* does not match"):
        load_bundle(bundle_copy)


def test_missing_weights(bundle_copy: Path) -> None:
    (bundle_copy / "models" / "segmentation.pt").unlink()
    with pytest.raises(BundleError, match="segmentation.pt is missing"):
        load_bundle(bundle_copy)


def test_missing_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no model bundle .*`python -m training demo"):
        load_bundle(tmp_path / "nowhere")


def _edit(bundle: Path, **changes: object) -> None:
    path = bundle / "configs" / "metadata.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_thresholds_must_match_labels(bundle_copy: Path) -> None:
    meta = read_metadata(bundle_copy)
    _edit(bundle_copy, thresholds={k: v for k, v in meta.thresholds.items() if k != "Hernia"})
    with pytest.raises(BundleError, match="one entry per label"):
        load_bundle(bundle_copy)


def test_device_uid_must_belong_to_weights(bundle_copy: Path) -> None:
    _edit(bundle_copy, device_uid="2.25.1")
    with pytest.raises(BundleError, match="device_uid does not match"):
        load_bundle(bundle_copy)


def _raw(bundle: Path) -> dict:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def test_unknown_architecture_refused(bundle_copy: Path) -> None:
    networks = _raw(bundle_copy)["networks"]
    networks["classifier"]["architecture"] = "os.system"
    _edit(bundle_copy, networks=networks)
    with pytest.raises(BundleError, match="networks.classifier.architecture: Input should be 'UNet', 'DenseNet121'"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="unknown architecture 'os.system'"):
        build_network({"architecture": "os.system"})  # the registry refuses it too (training's path)


def test_demo_bundle_needs_disclaimer(bundle_copy: Path) -> None:
    _edit(bundle_copy, description="a model")
    with pytest.raises(BundleError, match="disclaimer"):
        load_bundle(bundle_copy)


def test_a_bundle_listed_ok_builds_and_a_bad_one_is_named_before_loading(
    bundle_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The case issue 13 found: a bundle without preprocessing.mask_threshold was listed "ok"
    by `pacsnode models` and then raised KeyError when a worker built its pipeline."""
    cfg = node_config(tmp_path / "node", bundle_copy, [])
    assert pacsnode(["--config", str(cfg), "models", "list"]) == 0
    assert " ok " in capsys.readouterr().out
    preprocessing = _raw(bundle_copy)["preprocessing"]
    del preprocessing["mask_threshold"]
    _edit(bundle_copy, preprocessing=preprocessing)
    assert pacsnode(["--config", str(cfg), "models", "list"]) == 1
    out = capsys.readouterr().out
    assert "preprocessing.mask_threshold: Field required" in out and " ok " not in out
    (row,) = list_bundles([bundle_copy])
    assert row["status"] != "ok" and "preprocessing.mask_threshold: Field required" in row["status"]
    with pytest.raises(BundleError, match="preprocessing.mask_threshold: Field required"):
        ChestXrayPipeline(bundle_copy, "cpu")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"treshold": 0.5}, "treshold: unknown key"),
        ({"input_size": {"segmentation": 256}}, "input_size.classifier: Field required"),
        ({"labels": ["A", "A"], "thresholds": {"A": 0.5}}, "labels must be unique"),
        ({"demo": "yes"}, "demo: Input should be a valid boolean"),
        ({"device_uid": "1.2.3"}, "device_uid: String should match pattern"),
        ({"preprocessing": {"mask_threshold": 0.5, "opening_radius": 2, "crop_margin": 0.08, "crop": "center"}},
         "crop 'center' goes with scaling 'torchxrayvision'"),
        ({"preprocessing": {"mask_threshold": 0.5, "opening_radius": 2, "crop_margin": 0.08, "pixels": "stored"}},
         "pixels 'stored' is torchxrayvision's reader"),
    ],
)
def test_metadata_faults_name_the_key(bundle_copy: Path, change: dict, message: str) -> None:
    _edit(bundle_copy, **change)
    with pytest.raises(BundleError, match=re.escape(message)):
        read_metadata(bundle_copy)
    assert message in list_bundles([bundle_copy])[0]["status"]
