"""Chest X-ray pipeline on real images, fast Grad-CAM equivalence, devices and registry."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from pipelines.base import InputError, PipelineResult
from pipelines.bundle import load_bundle
from pipelines.chest_xray import (
    LUNGS,
    NO_FINDING,
    ChestXrayPipeline,
    FeatureHead,
    cam_from_features,
    classifier_input,
    heatmap_label_index,
    localised_findings,
    lung_box,
    postprocess_mask,
    segmentation_input,
)
from pipelines.device import DeviceError, resolve_device
from pipelines.imaging import to_display
from pipelines.registry import UnknownPipelineError, load_pipeline
from tests.peers import CXR_SAMPLES

SAMPLES = CXR_SAMPLES
JPEG = SAMPLES / "pneumonia" / "person1946_bacteria_4874.jpeg"
STAGES = {"decode", "segmentation", "classification", "heatmap", "total"}


def jpeg_dataset(path: Path) -> Dataset:
    """A real 8-bit JPEG radiograph wrapped as an uncompressed MONOCHROME2 image."""
    pixels = np.asarray(Image.open(path).convert("L"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.fixture(scope="module")
def pipeline(demo_bundle: Path) -> ChestXrayPipeline:
    return ChestXrayPipeline(demo_bundle, "cpu")


@pytest.fixture(scope="module")
def rg1() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def _check(result: PipelineResult, shape: tuple[int, int], pipeline: ChestXrayPipeline) -> None:
    labels = pipeline.labels
    assert [f.label for f in result.findings] == list(labels) and len(labels) == 15
    assert all(0.0 <= f.probability <= 1.0 for f in result.findings)
    assert set(result.regions) == {LUNGS}
    lungs = result.regions[LUNGS]
    assert lungs.dtype == bool and lungs.shape == shape and lungs.any()
    # a heatmap for exactly the findings at or above their threshold, "No Finding" aside
    assert set(result.heatmaps) == {f.label for f in result.findings if f.present and f.label != NO_FINDING}
    for heat in result.heatmaps.values():  # all zero where no feature raises the finding's score
        assert heat.dtype == np.float32 and heat.shape == shape
        full = np.asarray(heat)
        assert full.dtype == np.float32 and full.shape == shape
        assert 0.0 <= full.min() and full.max() <= 1.0
    assert result.display.shape == shape
    assert result.boxes == []  # the demo bundle has no detector
    assert set(result.timings) == STAGES and all(v >= 0 for v in result.timings.values())


def _all_present(bundle: Path, tmp_path: Path, **classifier: object) -> Path:
    """A copy of ``bundle`` whose thresholds are 0 (every finding is present, so every finding
    gets a heatmap), with ``classifier`` set in its classifier spec (thresholds are not hashed)."""
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    meta_file = copy / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta["thresholds"] = dict.fromkeys(meta["thresholds"], 0.0)
    meta["networks"]["classifier"].update(classifier)
    meta_file.write_text(json.dumps(meta))
    return copy


def test_rg1(pipeline: ChestXrayPipeline, rg1: Dataset) -> None:
    (result,) = pipeline.run([rg1])
    _check(result, (1955, 1841), pipeline)
    assert pipeline.model.demo and pipeline.id == "chest_xray"


def test_real_jpeg_and_batch(pipeline: ChestXrayPipeline, rg1: Dataset) -> None:
    ds = jpeg_dataset(JPEG)
    results = pipeline.run([ds, rg1])
    assert len(results) == 2
    _check(results[0], (ds.Rows, ds.Columns), pipeline)
    _check(results[1], (1955, 1841), pipeline)
    # batching does not change results
    (alone,) = pipeline.run([ds])
    np.testing.assert_allclose(
        [f.probability for f in alone.findings], [f.probability for f in results[0].findings], atol=1e-4
    )


def test_bad_image_in_batch_names_it(pipeline: ChestXrayPipeline, rg1: Dataset) -> None:
    bad = jpeg_dataset(JPEG)
    bad.PixelData = bad.PixelData[:100]
    with pytest.raises(InputError, match=r"image 1 \(SOP Instance UID .*cannot decode"):
        pipeline.run([rg1, bad])


def test_one_heatmap_per_finding_above_threshold_zero_outside_the_crop(demo_bundle: Path, rg1: Dataset,
                                                                         tmp_path: Path) -> None:
    pipeline = ChestXrayPipeline(_all_present(demo_bundle, tmp_path), "cpu")
    (result,) = pipeline.run([rg1])
    _check(result, (1955, 1841), pipeline)
    assert len(result.heatmaps) == 14  # every label but "No Finding"
    rows, cols = np.nonzero(result.regions[LUNGS])
    h, w = rg1.Rows, rg1.Columns
    full = [np.asarray(heat) for heat in result.heatmaps.values()]
    for heat in (heat for heat in full if heat.max() > 0):
        ys, xs = np.nonzero(heat)
        # the crop box is the lung mask's box plus the margin, so heat stays near the lungs
        assert ys.min() >= rows.min() - 0.2 * h and ys.max() <= rows.max() + 0.2 * h
        assert xs.min() >= cols.min() - 0.2 * w and xs.max() <= cols.max() + 0.2 * w
    # each finding's own CAM: the classes' weights differ, so the maps do (those not all zero)
    maps = [heat for heat in full if heat.max() > 0]
    assert len(maps) >= 7 and len({m.tobytes() for m in maps}) == len(maps)


def test_other_layers_take_one_backward_pass_per_finding(demo_bundle: Path, rg1: Dataset, tmp_path: Path) -> None:
    # a Grad-CAM layer other than the backward-free one: MONAI's GradCAM for each present finding
    bundle = _all_present(demo_bundle, tmp_path, gradcam_layer="features.transition3")
    pipeline = ChestXrayPipeline(bundle, "cpu")
    assert pipeline.cam_layer == "features.transition3"
    calls: list[int] = []
    explain = pipeline._explain.__call__
    pipeline._explain = lambda x, j: calls.append(j) or explain(x, j)  # type: ignore[method-assign]
    (result,) = pipeline.run([rg1])
    _check(result, (1955, 1841), pipeline)
    assert sorted(calls) == sorted(pipeline.labels.index(label) for label in result.heatmaps)


def _same(a: PipelineResult, b: PipelineResult) -> bool:
    """Bit for bit the same findings, regions, heatmaps and boxes."""
    return (a.findings == b.findings and a.boxes == b.boxes and a.regions.keys() == b.regions.keys()
            and a.heatmaps.keys() == b.heatmaps.keys()
            and all(np.array_equal(a.regions[k], b.regions[k]) for k in a.regions)
            and all(np.array_equal(a.heatmaps[k], b.heatmaps[k]) for k in a.heatmaps))


def test_saved_outputs_give_the_same_result_without_the_networks(demo_bundle: Path, rg1: Dataset,
                                                                  tmp_path: Path) -> None:
    # A replay must draw the same objects even where the networks' numbers would move a little
    # (another thread count or batch); so a result carries its networks' outputs, small, and
    # they alone give the result back.
    pipeline = ChestXrayPipeline(_all_present(demo_bundle, tmp_path), "cpu")
    jpeg = jpeg_dataset(JPEG)
    torch.set_num_threads(1)
    try:
        first = pipeline.run([jpeg, rg1])
    finally:
        torch.set_num_threads(2)
    outputs = [r.outputs for r in first]
    assert outputs[1]["lung_mask"].shape == (pipeline.bundle.segmentation_size,) * 2
    assert outputs[1]["probabilities"].shape == (15,) and outputs[1]["crop"].shape == (4,)
    assert {k for k in outputs[1] if k.startswith("cam:")} == {f"cam:{h}" for h in first[1].heatmaps}
    assert sum(a.nbytes for a in outputs[1].values()) < 100_000  # kept per image in the database

    def no_network(*args: object) -> None:
        raise AssertionError("a network ran")

    pipeline._forward = no_network  # type: ignore[method-assign, assignment]
    again = pipeline.run([rg1], saved=[outputs[1]])  # alone, with 2 threads: still the same
    assert _same(again[0], first[1])
    _check(again[0], (1955, 1841), pipeline)
    with pytest.raises(ValueError, match="1 saved outputs for 2 images"):
        pipeline.run([jpeg, rg1], saved=outputs[:1])


def test_the_recipe_computes_what_monais_transforms_give(rg1: Dataset) -> None:
    """The recipe calls MONAI's functions, not its transforms (no MetaTensor bookkeeping): its
    tensors equal Resize + HistogramNormalize's and KeepLargestConnectedComponent's, so models
    trained before see the same inputs."""
    from monai.transforms import HistogramNormalize, KeepLargestConnectedComponent, Resize
    from scipy import ndimage
    from skimage.morphology import disk

    def monai_input(img: np.ndarray, size: int, mode: str) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
        return torch.as_tensor(HistogramNormalize(num_bins=256, min=0, max=1)(Resize((size, size), mode=mode)(t)))

    displays = [to_display(rg1), to_display(jpeg_dataset(JPEG))]
    for d in displays:
        assert torch.equal(segmentation_input(d, 256), monai_input(d, 256, "area"))
        h, w = d.shape
        assert min(h, w) >= 300
        for box, mode in [((0, h, 0, w), "area"), ((3, h - 7, w - 290, w - 5), "area"),
                          ((10, 150, 20, 260), "bilinear")]:  # fewer rows than the input: upsampled
            y0, y1, x0, x1 = box
            assert torch.equal(classifier_input(d, box, 224), monai_input(d[y0:y1, x0:x1], 224, mode)), box

    rng = np.random.default_rng(7)
    for _ in range(60):
        noise = ndimage.gaussian_filter(rng.random((128, 128)), sigma=float(rng.uniform(0.7, 4)))
        prob = torch.from_numpy(((noise - noise.min()) / np.ptp(noise)).astype(np.float32))
        for radius in (0, 2):
            opened = (prob >= 0.5).numpy()
            if radius:
                opened = ndimage.binary_opening(opened, structure=disk(radius))
            kept = KeepLargestConnectedComponent(applied_labels=[1], num_components=2)(
                torch.from_numpy(opened.astype(np.uint8))[None])
            assert np.array_equal(postprocess_mask(prob, 0.5, radius), np.asarray(kept)[0].astype(bool))


def test_localised_findings_rule() -> None:
    labels = ("A", "B", NO_FINDING, "C")
    thresholds = (0.5, 0.5, 0.5, 0.9)
    assert localised_findings(np.array([0.6, 0.7, 0.9, 0.8]), thresholds, labels) == [1, 0]  # B, A; not C, not No Finding
    assert localised_findings(np.array([0.2, 0.4, 0.9, 0.3]), thresholds, labels) == []


def test_fast_cam_equals_monai_gradcam(demo_bundle: Path, rg1: Dataset) -> None:
    net = load_bundle(demo_bundle).classifier.eval()  # trained weights: non-degenerate CAMs
    img = to_display(rg1)
    x = classifier_input(img, (0, img.shape[0], 0, img.shape[1]), 224)[None]
    head = FeatureHead(net).eval()
    with torch.no_grad():
        logits, feats = head(x)
        np.testing.assert_allclose(logits.numpy(), net(x).numpy(), atol=1e-4)
    for c in logits[0].argsort(descending=True)[:3].tolist():
        cam = cam_from_features(feats, net.class_layers.out.weight, torch.tensor([c]))
        assert cam.max() > cam.min()
        ours = F.interpolate(cam[:, None], size=(224, 224), mode="bilinear", align_corners=False)
        # MONAI's default postprocessing maps (min, max) to (1, 0); compare unflipped min-max
        gradcam = GradCAM(nn_module=net, target_layers="class_layers.relu", postprocessing=lambda t: t)
        theirs = gradcam(x.clone(), class_idx=c)
        assert theirs.shape == (1, 1, 224, 224)
        np.testing.assert_allclose(_minmax(ours), _minmax(theirs), atol=1e-4)


def _minmax(t: torch.Tensor) -> np.ndarray:
    a = t.detach().numpy().astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def test_heatmap_label_rule() -> None:
    labels = ("A", "B", NO_FINDING)
    thresholds = (0.5, 0.5, 0.5)
    assert heatmap_label_index(np.array([0.6, 0.7, 0.9]), thresholds, labels) == 1  # B, not No Finding
    assert heatmap_label_index(np.array([0.2, 0.4, 0.9]), thresholds, labels) == 2  # only No Finding
    assert heatmap_label_index(np.array([0.2, 0.4, 0.3]), thresholds, labels) == 1  # none: top


def test_lung_box_margin_and_empty() -> None:
    mask = np.zeros((100, 100), bool)
    assert lung_box(mask, (1000, 2000), 0.1) is None
    mask[20:60, 30:70] = True
    assert lung_box(mask, (1000, 2000), 0.0) == (200, 600, 600, 1400)
    assert lung_box(mask, (1000, 2000), 0.1) == (160, 640, 520, 1480)


def test_devices() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(DeviceError, match="device must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="'cuda' was requested but CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(DeviceError, match="'cuda:1' was requested"):
            resolve_device("cuda:1")


def test_registry(demo_bundle: Path) -> None:
    with pytest.raises(UnknownPipelineError, match="unknown pipeline id 'ct_head'; known: \\['chest_xray'\\]"):
        load_pipeline("ct_head", demo_bundle, "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            load_pipeline("chest_xray", demo_bundle, "cuda")
