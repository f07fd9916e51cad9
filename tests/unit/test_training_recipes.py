"""Every recipe end to end on tiny data; export -> the node's pipeline on RG1; resume; listing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import yaml
from pydicom.data import get_testdata_file

from pipelines.bundle import list_bundles, load_bundle
from pipelines.chest_xray import ChestXrayPipeline, classifier_input
from tests.unit import training_data
from training.__main__ import main
from training.gradcam import DEFAULT_LAYERS
from training.networks import VGG16, build_network, load_pretrained
from training.recipe import TASKS, RecipeError, load_recipe
from training.train import RunError, load_run_network

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
TINY = ["num_workers=0", "cache=true"]
TINY_SEG = [*TINY, "image_size=64", "batch_size=4", "split.val=0.25", "split.test=0.25",
            "network.args.channels=[4,8,16]", "network.args.strides=[2,2]", "network.args.num_res_units=1"]  # fmt: skip


def _train(recipe: str, data: Path, out: Path, sets: list[str], *extra: str) -> dict:
    args = ["train", "--recipe", str(RECIPES / recipe), "--data", str(data), "--out", str(out), "--device", "cpu"]
    for s in sets:
        args += ["--set", s]
    assert main([*args, *extra]) == 0
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("seg")
    data = training_data.lung_masks(tmp / "montgomery", n=12, size=96)
    _train("lung_segmentation.yaml", data, tmp / "run", [*TINY_SEG, "epochs=2"])
    return tmp / "run"


def test_segmentation_recipe_reports_dice(seg_run: Path) -> None:
    run = json.loads((seg_run / "run.json").read_text())
    assert run["task"] == "segmentation" and run["input_size"] == 64 and len(run["history"]) == 2
    for split in ("val", "test"):
        m = run["metrics"][split]
        assert 0 <= m["dice"] <= 1 and 0 <= m["pixel_accuracy"] <= 1
    assert run["data"]["splits"]["test"]["images"] == 3 and run["pretrained"] is None
    assert (seg_run / "model.pt").is_file() and (seg_run / "checkpoint.pt").is_file()


def test_resume_continues_and_refuses_to_overwrite(tmp_path: Path) -> None:
    data = training_data.lung_masks(tmp_path / "shenzhen", n=8, size=64, montgomery=False)
    sets = [*TINY_SEG, "image_size=32", "max_steps=1"]
    _train("lung_segmentation.yaml", data, tmp_path / "run", [*sets, "epochs=1"])
    with pytest.raises(RunError, match="already holds a run: pass --resume"):
        _train("lung_segmentation.yaml", data, tmp_path / "run", [*sets, "epochs=2"])
    run = _train("lung_segmentation.yaml", data, tmp_path / "run", [*sets, "epochs=2"], "--resume")
    assert [h["epoch"] for h in run["history"]] == [1, 2]
    # the same recipe and seed from scratch gives the same epoch-2 weights as the resumed run
    _train("lung_segmentation.yaml", data, tmp_path / "fresh", [*sets, "epochs=2"])
    a = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["net"]
    b = torch.load(tmp_path / "fresh" / "checkpoint.pt", weights_only=False)["net"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_multilabel_on_lung_crops_exports_a_bundle_the_node_runs(seg_run: Path, tmp_path: Path) -> None:
    data = training_data.nih(tmp_path / "nih", n=16, size=96)
    sets = [*TINY, "image_size=32", "epochs=1", "batch_size=4", "max_steps=2", "split.val=0.3", "split.test=0.2"]
    run = _train("chestxray14_densenet121.yaml", data, tmp_path / "cls", sets, "--segmentation-run", str(seg_run))
    assert run["segmentation_run"] == str(seg_run.resolve()) and len(run["thresholds"]) == 15
    report = json.loads((tmp_path / "cls" / "report.json").read_text())
    assert report["threshold_rule"] == "youden on validation" and len(report["metrics"]["test"]["per_label"]) == 15
    assert (tmp_path / "cls" / "roc.png").stat().st_size > 1000
    cam = report["gradcam"]  # up to 4 test images (there are 3), each with its heatmap label
    assert cam["layer"] == "class_layers.relu" and len(cam["images"]) == 3 and (tmp_path / "cls" / "gradcam.png").is_file()

    bundle = tmp_path / "models" / "chest_xray"
    assert main(["export", "--run", str(tmp_path / "cls"), "--out", str(bundle), "--version", "0.2.0"]) == 0
    loaded = load_bundle(bundle)
    assert loaded.model.version == "0.2.0" and not loaded.model.demo and len(loaded.labels) == 15
    assert loaded.thresholds == tuple(run["thresholds"]) and loaded.segmentation_size == 64
    meta = loaded.metadata
    assert meta.training_data["classifier"]["dataset"] == "nih-chestxray14"
    assert "dice" in meta.metrics["segmentation"]["test"]

    pipeline = ChestXrayPipeline(bundle, "cpu")
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    (result,) = pipeline.run([ds])
    assert result.regions["lungs"].shape == (ds.Rows, ds.Columns) and len(result.findings) == 15
    assert all(0 <= f.probability <= 1 for f in result.findings)

    listed = list_bundles([tmp_path / "models", tmp_path / "nowhere"])
    assert listed[0]["version"] == "0.2.0" and listed[0]["status"] == "ok" and listed[0]["labels"] == 15
    assert listed[1]["status"].startswith("no model bundle at")
    (bundle / "models" / "classifier.pt").write_bytes(b"corrupt")
    assert list_bundles([bundle])[0]["status"] == "models/classifier.pt sha256 does not match metadata"


def test_export_refuses_whole_image_runs(seg_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is a segmentation run"):
        main(["export", "--run", str(seg_run), "--out", str(tmp_path / "b"), "--version", "1"])


PNEUMONIA = {
    "pneumonia_small_cnn.yaml": ["image_size=48"],
    "pneumonia_densenet121.yaml": ["image_size=32"],
    "pneumonia_resnet50.yaml": ["image_size=32", "network.args.widen_factor=0.125"],
    "pneumonia_vgg16.yaml": ["image_size=32", "network.args.width=0.0625", "network.args.hidden=16",
                             "gradcam_layer=features.27"],  # a recipe's own layer reaches the node
}


@pytest.fixture(scope="module")
def kermany_real(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return training_data.kermany(tmp_path_factory.mktemp("kermany"))


@pytest.mark.parametrize(
    "recipe", [pytest.param(r, marks=pytest.mark.slow) if "densenet" in r else r for r in sorted(PNEUMONIA)]
)  # DenseNet121's first backward on this CPU takes ~10 s
def test_pneumonia_recipes_on_real_jpegs(recipe: str, kermany_real: Path, seg_run: Path, tmp_path: Path) -> None:
    sets = [*TINY, *PNEUMONIA[recipe], "epochs=1", "batch_size=2", "max_steps=2", "split.val=0.0"]
    run = _train(recipe, kermany_real, tmp_path / "run", sets)
    test = run["metrics"]["test"]
    row = test["per_label"][0]
    assert row["label"] == "Pneumonia" and row["n"] == 2 and row["positives"] == 1  # the 2 test JPEGs
    assert test["confusion_matrix"] is not None and np.sum(test["confusion_matrix"]) == 2
    assert (tmp_path / "run" / "confusion.png").is_file()
    cam = json.loads((tmp_path / "run" / "report.json").read_text())["gradcam"]
    layer = run["recipe"]["gradcam_layer"] or DEFAULT_LAYERS[run["network"]["architecture"]]
    assert cam["layer"] == layer and (tmp_path / "run" / "gradcam.png").is_file()
    assert [d["truth"] for d in cam["images"]] == [True, False]  # the top-scoring positive and negative
    assert run["recipe"]["augment"]["flip_lr"] is False  # no left-right flip by default
    # a whole-image classifier becomes a node bundle with a lung segmentation run beside it
    export = ["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--version", "1.0.0"]
    with pytest.raises(ValueError, match="classifies whole images: pass --segmentation-run"):
        main(export)
    assert main([*export, "--segmentation-run", str(seg_run)]) == 0
    meta = load_bundle(tmp_path / "b").metadata
    assert meta.preprocessing.crop == "none" and meta.labels == ["Pneumonia"] and not meta.demo
    assert meta.networks.classifier.architecture == run["network"]["architecture"]
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    pipeline = ChestXrayPipeline(tmp_path / "b", "cpu")
    assert pipeline.cam_layer == layer  # the node explains with the layer the run's panel used
    (result,) = pipeline.run([ds])
    assert [f.label for f in result.findings] == ["Pneumonia"]
    # the classifier saw the whole image: its probability is the run's own on the whole display
    net, _ = load_run_network(tmp_path / "run")
    with torch.inference_mode():
        x = classifier_input(result.display, (0, ds.Rows, 0, ds.Columns), run["input_size"])
        expected = float(torch.sigmoid(net(x[None]))[0, 0])
    assert result.findings[0].probability == pytest.approx(expected, abs=1e-4)
    # a heatmap when the finding is above its threshold, made with the run's Grad-CAM layer
    assert set(result.heatmaps) == ({"Pneumonia"} if result.findings[0].present else set())
    for heat in map(np.asarray, result.heatmaps.values()):
        assert heat.shape == (ds.Rows, ds.Columns) and 0 <= heat.min() <= heat.max() <= 1


def test_pretrained_local_file_rgb_to_gray(tmp_path: Path) -> None:
    # an 'ImageNet-style' VGG16 checkpoint: 3-channel first conv, 1000 outputs
    rgb = VGG16(in_channels=3, out_channels=1000, width=0.0625, hidden=16)
    torch.save(rgb.state_dict(), tmp_path / "vgg.pt")
    gray = VGG16(in_channels=1, out_channels=1, width=0.0625, hidden=16)
    counts = load_pretrained(gray, tmp_path / "vgg.pt")
    assert counts["skipped"] == 2  # the new output layer's weight and bias
    assert torch.allclose(gray.features[0].weight, rgb.features[0].weight.sum(1, keepdim=True))
    with pytest.raises(ValueError, match="no tensor matches"):
        load_pretrained(build_network({"architecture": "SmallCNN"}), tmp_path / "vgg.pt")


def test_recipe_overrides_and_errors(tmp_path: Path) -> None:
    r = load_recipe(RECIPES / "lung_segmentation.yaml", ["epochs=1", "network.args.channels=[4,8]"])
    assert r["epochs"] == 1 and r["network"]["args"]["channels"] == [4, 8] and r["optimizer"]["name"] == "adam"
    with pytest.raises(RecipeError, match="must look like key.sub=value"):
        load_recipe(RECIPES / "lung_segmentation.yaml", ["epochs"])
    (tmp_path / "bad.yaml").write_text("task: regression\n")
    with pytest.raises(RecipeError, match="task: Input should be 'segmentation', 'multilabel', 'binary' or 'detection'"):
        load_recipe(tmp_path / "bad.yaml")
    flip = load_recipe(RECIPES / "pneumonia_small_cnn.yaml", ["augment.flip_lr=true"])
    assert "heart laterality" in flip["warnings"][0]
    with pytest.raises(RecipeError, match="pos_weight_max: Input should be greater than or equal to 1"):
        load_recipe(RECIPES / "pneumonia_small_cnn.yaml", ["pos_weight_max=0.5"])


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["epoch=3"], "epoch: unknown key"),  # a typo is not silently ignored
        (["optimizer.lr=-1"], "optimizer.lr: Input should be greater than 0"),
        (["augment.prob=2"], "augment.prob: Input should be less than or equal to 1"),
        (["split.val=0.5", "split.test=0.5"], "val + test must leave images to train on"),
        (["network.architecture=RetinaNet"], "task 'segmentation' cannot train a RetinaNet"),
        (["dataset.format=dicom"], "dataset.format: Input should be 'kermany'"),
        (["scheduler.name=cosine"], "scheduler.name: Input should be 'plateau' or 'none'"),
    ],
)
def test_bad_recipes_fail_at_load_naming_the_key(sets: list[str], message: str) -> None:
    with pytest.raises(RecipeError, match=f"lung_segmentation.yaml: .*{re.escape(message)}"):
        load_recipe(RECIPES / "lung_segmentation.yaml", sets)


def test_every_shipped_recipe_validates_and_its_resolved_form_reloads(tmp_path: Path) -> None:
    for path in sorted(RECIPES.glob("*.yaml")):
        recipe = load_recipe(path, ["augment.flip_lr=true"])
        assert recipe["network"]["architecture"] and recipe["task"] in TASKS, path.name
        resolved = tmp_path / path.name  # what a run writes as recipe.yaml
        resolved.write_text(yaml.safe_dump(recipe, sort_keys=False))
        assert load_recipe(resolved) == recipe, path.name


def test_crop_lung_needs_a_segmentation_run(tmp_path: Path) -> None:
    data = training_data.nih(tmp_path / "nih", n=6, size=64, patients=3)
    with pytest.raises(RunError, match="crop: lung needs --segmentation-run"):
        _train("chestxray14_densenet121.yaml", data, tmp_path / "cls", [*TINY, "split.val=0.34", "split.test=0.0"])
    shutil.rmtree(tmp_path / "cls", ignore_errors=True)
