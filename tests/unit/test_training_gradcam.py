"""Grad-CAM for the recipes' classifiers: every architecture, localisation, errors, the command."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipelines.chest_xray import classifier_input
from pipelines.gradcam import GradCamExplainer
from tests.unit import training_data
from training.__main__ import main
from training.datasets import load_image
from training.gradcam import DEFAULT_LAYERS, gradcam, pick_examples, target_layer
from training.networks import SmallCNN, build_network
from training.recipe import load_recipe
from training.synthetic import generate
from training.train import LungCropper, RunError, load_run_network

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # tiny networks gain nothing from a second thread, and with other jobs on a 2-core machine two
    # OpenMP threads per process made this file 15-20x slower (74 s against 4 s, load 4-6)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# recipe -> tiny args; two outputs, so the second can mirror the first (see below)
TINY = {
    "pneumonia_densenet121.yaml": {"out_channels": 2, "init_features": 8, "growth_rate": 4},
    "pneumonia_resnet50.yaml": {"num_classes": 2, "widen_factor": 0.125},
    "pneumonia_vgg16.yaml": {"out_channels": 2, "width": 0.0625, "hidden": 16},
    "pneumonia_small_cnn.yaml": {"out_channels": 2},
}


def _tiny(recipe: str) -> tuple[nn.Module, dict]:
    spec = load_recipe(RECIPES / recipe)["network"]
    spec = {**spec, "args": {**spec["args"], **TINY[recipe]}}
    torch.manual_seed(0)
    net = build_network(spec).eval()
    # random weights: the class score may fall with every feature map, and the map is then all
    # zero (correctly); output 1 = -output 0 rises wherever output 0 falls, so one of the two
    # maps of each image must show structure
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight[1], last.bias[1] = -last.weight[0], -last.bias[0]
    return net, spec


@pytest.mark.parametrize("recipe", sorted(TINY))
def test_heatmaps_for_every_recipe_architecture(recipe: str) -> None:
    net, spec = _tiny(recipe)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():  # as callers predict; Grad-CAM needs its own grad-enabled pass
        maps = torch.stack([gradcam(net, spec, x, c) for c in (0, 1)])
    assert maps.shape == (2, 2, 64, 64) and maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    spread = maps.amax(dim=(2, 3)) - maps.amin(dim=(2, 3))  # (class, image)
    assert (spread.amax(dim=0) == 1).all()  # every image has a non-constant, [0, 1]-scaled map
    # the caller's network is untouched: no hooks left, in-place flags kept, same weights
    assert all(not m._forward_hooks and not m._backward_hooks for m in net.modules())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    if spec["architecture"] in ("VGG16", "SmallCNN"):
        assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))


def test_default_layers_are_the_last_feature_maps() -> None:
    nets = {recipe: _tiny(recipe) for recipe in TINY}
    layers = {spec["architecture"]: target_layer(net, spec) for net, spec in nets.values()}
    assert layers == DEFAULT_LAYERS
    features = {spec["architecture"]: list(net.features) for net, spec in nets.values() if hasattr(net, "features")}
    # VGG16: the last ReLU in features; SmallCNN: the ReLU right after its last convolution
    vgg = features["VGG16"]
    assert max(i for i, m in enumerate(vgg) if isinstance(m, nn.ReLU)) == 29
    cnn = features["SmallCNN"]
    assert isinstance(cnn[19], nn.ReLU) and max(i for i, m in enumerate(cnn) if isinstance(m, nn.Conv2d)) == 18
    # DenseNet121: the ReLU before global pooling (the node's Grad-CAM); ResNet50: the last stage
    densenet = nets["pneumonia_densenet121.yaml"][0]
    assert [type(m) for m in densenet.class_layers][:2] == [nn.ReLU, nn.AdaptiveAvgPool2d]
    assert list(dict(nets["pneumonia_resnet50.yaml"][0].named_children()))[-3:] == ["layer4", "avgpool", "fc"]


def _blobs(n: int, size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Noise; label 1 = an 8 x 8 bright square at a random place (top-left corners returned)."""
    x = 0.3 + 0.05 * torch.randn(n, 1, size, size, generator=g)
    y = (torch.arange(n) % 2).float()
    corners = [tuple(torch.randint(0, size - 8, (2,), generator=g).tolist()) for _ in range(n)]
    for i, (r, c) in enumerate(corners):
        if y[i]:
            x[i, 0, r : r + 8, c : c + 8] = 1.0
    return x, y[:, None], corners  # type: ignore[return-value]


def test_gradcam_points_at_the_evidence() -> None:
    """SmallCNN trained to find a bright square: the map is hottest on the square, for its class."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net, size = SmallCNN(dropout=0.0), 48
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(10):
        x, y, _ = _blobs(16, size, g)
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(net(x), y).backward()
        opt.step()
    # batch-norm running statistics of the final weights (10 steps leave them far behind)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        for _ in range(4):
            net(_blobs(16, size, g)[0])
    net.eval()
    x, y, corners = _blobs(16, size, g)
    with torch.no_grad():
        assert ((net(x) > 0).float() == y).all()
    spec = {"architecture": "SmallCNN"}
    pos = [i for i in range(len(x)) if y[i]]
    # every square is hotter than its image on average: at the default layer (3 x 3 at 48 px)
    # and one block earlier (6 x 6); a flipped (1 - map) or transposed map fails this
    # (over 24 training seeds the smallest ratios were 1.3 and 2.2)
    for layer, ratio in ((None, 1.2), ("features.14", 1.5)):
        for m, i in zip(gradcam(net, spec, x[pos], 0, layer), pos, strict=True):
            r, c = corners[i]
            assert m[r : r + 8, c : c + 8].mean() > ratio * m.mean(), (layer, i)


def test_layer_errors_and_in_place_successors() -> None:
    net, spec = _tiny("pneumonia_vgg16.yaml")
    x = torch.rand(1, 1, 64, 64)
    with pytest.raises(ValueError, match=r"VGG16 has no layer 'features\.99' .*features\.29, features\.30, avgpool"):
        gradcam(net, spec, x, 0, layer="features.99")
    with pytest.raises(ValueError, match=r"'classifier\.6' gives \(1, 2\), not feature maps"):
        gradcam(net, spec, x, 0, layer="classifier.6")
    with pytest.raises(ValueError, match="no default Grad-CAM layer for UNet: set gradcam_layer"):
        target_layer(net, {"architecture": "UNet"})
    # a conv whose output the next (in-place) ReLU overwrites: fine, Grad-CAM runs with in-place off
    maps = torch.stack([gradcam(net, spec, x, c, layer="features.28") for c in (0, 1)])
    assert (maps.amax(dim=(1, 2, 3)) == 1).any()
    # an in-place tensor operation in forward (ResNet's out += residual after bn3) cannot be switched off
    resnet, rspec = _tiny("pneumonia_resnet50.yaml")
    with pytest.raises(ValueError, match=r"'layer4\.2\.bn3': its output is changed in place"):
        gradcam(resnet, rspec, x, 0, layer="layer4.2.bn3")
    with pytest.raises(ValueError, match=r"'layer4\.2\.act' runs 3 times per forward pass"):
        gradcam(resnet, rspec, x, 0, layer="layer4.2.act")


def test_explainer_keeps_no_network_copies() -> None:
    """MONAI's hook state holds an autograd graph that points back at the hooks and the network:
    unless cleared after each call, every Grad-CAM leaks a copy of the network (the node's
    worker ran out of memory this way)."""
    net, spec = _tiny("pneumonia_small_cnn.yaml")
    x = torch.rand(1, 1, 48, 48)

    def live() -> int:
        gc.collect()
        return sum(isinstance(o, SmallCNN) for o in gc.get_objects())

    before = live()
    explain = GradCamExplainer(net, spec)
    for _ in range(3):
        explain(x, 0)
    assert live() == before + 1  # the explainer's own copy, made once
    for _ in range(3):
        gradcam(net, spec, x, 0)
    assert live() == before + 1
    del explain
    assert live() == before


def test_pick_examples() -> None:
    # one label: the highest-scoring positive, then the highest-scoring negative
    p, y = np.array([[0.2], [0.9], [0.6], [0.7]]), np.array([[1], [1], [0], [0]])
    assert pick_examples(p, y, [0.5], ["Pneumonia"]) == [(1, 0), (3, 0)]
    assert pick_examples(p, np.zeros_like(y), [0.5], ["Pneumonia"]) == [(1, 0)]  # no positive
    # several: the most probable heatmap labels; "No Finding" only when nothing else is present
    p = np.array([[0.1, 0.2, 0.95], [0.6, 0.1, 0.9], [0.3, 0.8, 0.1], [0.2, 0.1, 0.3]])
    labels = ["A", "B", "No Finding"]
    assert pick_examples(p, np.zeros_like(p), [0.5] * 3, labels, n=3) == [(0, 2), (2, 1), (1, 0)]


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def lung_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(segmentation run, SmallCNN pneumonia run on its lung crops), both tiny."""
    tmp = tmp_path_factory.mktemp("gradcam")
    base = ["--device", "cpu", *_sets("num_workers=0")]
    # just enough training for a lung box smaller than the image (the check below needs one)
    seg = _sets("image_size=64", "epochs=2", "batch_size=4", "split.val=0.25", "split.test=0.25",
                "network.args.channels=[4,8,16]", "network.args.strides=[2,2]", "network.args.num_res_units=1")  # fmt: skip
    assert main(["train", "--recipe", str(RECIPES / "lung_segmentation.yaml"), "--out", str(tmp / "seg"),
                 "--data", str(training_data.lung_masks(tmp / "montgomery", n=12, size=96)), *base, *seg]) == 0  # fmt: skip
    cls = _sets("image_size=48", "epochs=1", "max_steps=2", "batch_size=2", "split.val=0.0", "crop=lung")
    assert main(["train", "--recipe", str(RECIPES / "pneumonia_small_cnn.yaml"), "--out", str(tmp / "cls"),
                 "--data", str(training_data.kermany(tmp / "kermany")), "--segmentation-run", str(tmp / "seg"),
                 *base, *cls]) == 0  # fmt: skip
    return tmp / "seg", tmp / "cls"


def test_classifier_run_writes_gradcam_panel(lung_run: tuple[Path, Path]) -> None:
    _, run = lung_run
    report = json.loads((run / "report.json").read_text())["gradcam"]
    assert report["layer"] == "features.19" and report["file"] == "gradcam.png"
    # the test split is the 2 test JPEGs: its positive and its negative, both for Pneumonia
    assert [(Path(d["image"]).parent.name, d["label"], d["truth"]) for d in report["images"]] == [
        ("PNEUMONIA", "Pneumonia", True), ("NORMAL", "Pneumonia", False)]  # fmt: skip
    with Image.open(run / "gradcam.png") as im:
        assert im.size == (2 * (256 + 8) + 8, 256 + 32 + 8)


def test_gradcam_command_preprocesses_like_the_run(
    lung_run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seg, run = lung_run
    image = training_data.SAMPLES / "pneumonia" / "person1946_bacteria_4874.jpeg"
    assert main(["gradcam", "--run", str(run), "--image", str(image), "--out", str(tmp_path / "cam.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["label"] == "Pneumonia" and out["layer"] == "features.19"
    with Image.open(tmp_path / "cam.png") as im:
        assert im.size == (256 + 16, 256 + 32 + 8) and im.mode == "RGB"
    # the probability of the lung crop the segmentation run gives, not of the whole image
    display = load_image(image)
    box, full = LungCropper(seg)(display), (0, display.shape[0], 0, display.shape[1])
    net, _ = load_run_network(run)
    with torch.inference_mode():
        cropped = torch.sigmoid(net(classifier_input(display, box, 48)[None]))[0, 0].item()
        whole = torch.sigmoid(net(classifier_input(display, full, 48)[None]))[0, 0].item()
    assert box != full and abs(whole - cropped) > 1e-4  # so the check below can fail
    assert out["probability"] == pytest.approx(cropped, abs=1e-4)

    # DICOM through the node decoder, an explicit label and layer
    dcm = tmp_path / "cxr.dcm"
    training_data.write_dicom(generate(0, 1, 96).image, dcm, "p1", "1.2.826.0.1.3680043.8.498.99")
    args = ["gradcam", "--run", str(run), "--image", str(dcm), "--label", "Pneumonia", "--layer", "features.14"]
    assert main([*args, "--out", str(tmp_path / "dcm.png")]) == 0
    assert json.loads(capsys.readouterr().out)["layer"] == "features.14" and (tmp_path / "dcm.png").is_file()

    with pytest.raises(ValueError, match="has no label 'Effusion'; its labels: Pneumonia"):
        main(["gradcam", "--run", str(run), "--image", str(image), "--label", "Effusion", "--out", str(tmp_path / "x.png")])
    with pytest.raises(RunError, match="is a segmentation run: Grad-CAM needs a classifier run"):
        main(["gradcam", "--run", str(seg), "--image", str(image), "--out", str(tmp_path / "x.png")])
