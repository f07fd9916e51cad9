"""Chest radiograph pipeline: lung segmentation -> lung crop -> classifier -> Grad-CAM.

    to_display -> resize (area) + histogram equalisation -> UNet -> threshold, opening,
    two largest components -> lung box (+margin; whole image if empty) -> crop at source
    resolution -> resize + equalisation -> classifier -> sigmoid -> findings at the bundle's
    thresholds; a Grad-CAM for each finding above its threshold (not "No Finding"); the lung
    mask (region "lungs") and the heatmaps mapped back to (Rows, Columns) (kept coarse:
    `pipelines.base.Heatmap`).
    With a detector in the bundle: whole image -> resize + equalisation -> RetinaNet -> boxes
    ("Lung Opacity") with score >= the bundle's score threshold, in source pixels.

The classifier is whatever the bundle holds (pipelines/networks.py): the 15-label DenseNet121
of the demo and ChestX-ray14 recipes, or a pneumonia model (DenseNet121, ResNet50, VGG16, the
seeds' small CNN). Bundles whose `preprocessing.crop` is "none" classify the whole image, as
the pneumonia recipes train; the lungs are still segmented for the SEG and the outlines.
Bundles imported from torchxrayvision (`preprocessing.scaling: torchxrayvision`) classify
torchxrayvision's own input instead: its centre crop at its scaling (pipelines/xrv.py).

The preprocessing functions here (`segmentation_input`, `lung_box`, `classifier_input`) are the
recipe: training imports them, so training and inference see the same pixels.

Grad-CAM without a backward pass for DenseNet121: MONAI's DenseNet121 ends with relu -> global
average pool -> linear, so d logit_c / d A_k(i, j) = w_ck / HW everywhere, and Grad-CAM for
class c is exactly ReLU(sum_k (w_ck / HW) A_k) over the post-ReLU feature maps A. One forward
pass of `features` gives both the logits and every finding's CAM. Other architectures get
MONAI's GradCAM (pipelines/gradcam.py), one backward pass per finding above threshold.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import equalize_hist, get_largest_connected_component_mask
from pydicom import Dataset
from scipy import ndimage
from skimage.morphology import disk

from pipelines import xrv
from pipelines.base import (
    Box,
    Crop,
    Finding,
    Heatmap,
    InputError,
    ModelInfo,
    ModelOutputs,
    PipelineResult,
)
from pipelines.bundle import Bundle, load_bundle
from pipelines.detector import from_detector
from pipelines.device import autocast, resolve_device
from pipelines.gradcam import DEFAULT_LAYERS, GradCamExplainer
from pipelines.imaging import to_display

__all__ = [
    "DETECTION_LABEL",
    "LUNGS",
    "NO_FINDING",
    "ChestXrayPipeline",
    "FeatureHead",
    "cam_from_features",
    "classifier_input",
    "heatmap_label_index",
    "localised_findings",
    "lung_box",
    "postprocess_mask",
    "segmentation_input",
]

log = logging.getLogger(__name__)

NO_FINDING = "No Finding"
LUNGS = "lungs"  # the region the segmentation network outlines
DETECTION_LABEL = "Lung Opacity"  # what the bundle's detector finds (RSNA's one class)
HIST_BINS = 256
# Names of a result's `outputs` (pipelines.base.ModelOutputs): what `run(saved=...)` reads back.
MASK = "lung_mask"  # (S, S) bool, after thresholding and opening
CROP = "crop"  # (4,) int: the window the classifier saw, y0 y1 x0 x1
PROBABILITIES = "probabilities"  # (labels,) float32
CAM = "cam:"  # + label: (h, w) float32 CAM in [0, 1], one per localised finding
BOXES = "boxes"  # (k, 5) float64: x0 y0 x1 y1 score, with a detector only


# ---- the recipe (shared with training) -------------------------------------------------------


def segmentation_input(display: np.ndarray, size: int) -> torch.Tensor:
    """(H, W) display image -> (1, size, size) float32: area resize, histogram equalisation."""
    img = torch.from_numpy(np.ascontiguousarray(display, dtype=np.float32))[None]
    return _equalise(_resize(img, size, "area"))


def classifier_input(display: np.ndarray, box: Crop, size: int) -> torch.Tensor:
    """Crop (H, W) display to box -> (1, size, size): resize (area down, bilinear up), equalise."""
    y0, y1, x0, x1 = box
    crop = torch.from_numpy(np.ascontiguousarray(display[y0:y1, x0:x1], dtype=np.float32))[None]
    down = crop.shape[1] >= size and crop.shape[2] >= size
    return _equalise(_resize(crop, size, "area" if down else "bilinear"))


# MONAI's Resize and HistogramNormalize compute exactly these (tests compare them); called
# directly, the pipeline skips their MetaTensor bookkeeping, which it never reads.
def _resize(img: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """(1, H, W) -> (1, size, size) as monai.transforms.Resize((size, size), mode) gives it."""
    return F.interpolate(img[None], size=(size, size), mode=mode)[0]


def _equalise(img: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation to [0, 1] as monai.transforms.HistogramNormalize gives it."""
    return torch.from_numpy(equalize_hist(img.numpy(), num_bins=HIST_BINS, min=0, max=1).astype(np.float32))


def postprocess_mask(prob: torch.Tensor, threshold: float, opening_radius: int) -> np.ndarray:
    """(S, S) lung probability -> bool mask: threshold, opening, keep the two largest components."""
    mask = (prob >= threshold).cpu().numpy()
    if opening_radius > 0:
        mask = ndimage.binary_opening(mask, structure=disk(opening_radius))
    # MONAI's KeepLargestConnectedComponent calls this on the foreground, then zeroes what it did
    # not keep: the same mask, without the transform's tensor round trips
    return np.asarray(get_largest_connected_component_mask(mask, connectivity=None, num_components=2), dtype=bool)


def lung_box(mask: np.ndarray, shape: tuple[int, int], margin: float) -> Crop | None:
    """Bounding box of a (S, S) mask, grown by margin x its size, in (H, W) source pixels.

    None when the mask is empty (the caller uses the whole image).
    """
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    s_h, s_w = mask.shape
    h, w = shape
    fy0, fy1 = rows[0] / s_h, (rows[-1] + 1) / s_h
    fx0, fx1 = cols[0] / s_w, (cols[-1] + 1) / s_w
    my, mx = margin * (fy1 - fy0), margin * (fx1 - fx0)
    y0, y1 = max(0, int((fy0 - my) * h)), min(h, int(np.ceil((fy1 + my) * h)))
    x0, x1 = max(0, int((fx0 - mx) * w)), min(w, int(np.ceil((fx1 + mx) * w)))
    if y1 - y0 < 8 or x1 - x0 < 8:
        return None
    return y0, y1, x0, x1


def localised_findings(probs: np.ndarray, thresholds: Sequence[float], labels: Sequence[str]) -> list[int]:
    """Indices of the findings that get a heatmap: every one at or above its threshold, except
    "No Finding" (it has no place in the image), most probable first."""
    present = [
        i for i, (p, t, lab) in enumerate(zip(probs, thresholds, labels, strict=True))
        if p >= t and lab != NO_FINDING
    ]  # fmt: skip
    return sorted(present, key=lambda i: -float(probs[i]))


def heatmap_label_index(probs: np.ndarray, thresholds: Sequence[float], labels: Sequence[str]) -> int:
    """The one finding to explain when only one is drawn (training's Grad-CAM panel): the most
    probable localised finding, else the top finding."""
    present = localised_findings(probs, thresholds, labels)
    return present[0] if present else int(np.argmax(probs))


class FeatureHead(torch.nn.Module):
    """DenseNet121 -> (logits, post-ReLU feature maps A), for the backward-free Grad-CAM."""

    def __init__(self, densenet: torch.nn.Module) -> None:
        super().__init__()
        self.features = cast(torch.nn.Module, densenet.features)
        self.out = cast(torch.nn.Linear, densenet.class_layers.out)  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = F.relu(self.features(x))
        return self.out(a.mean(dim=(2, 3))), a


def cam_from_features(features: torch.Tensor, weight: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (unnormalised) of class classes[n] for each item: (N, K, h, w) -> (N, h, w)."""
    w = weight[classes].to(features.dtype) / (features.shape[2] * features.shape[3])  # (N, K)
    return F.relu(torch.einsum("nk,nkhw->nhw", w, features))


def _minmax(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(x))


# ---- the pipeline ---------------------------------------------------------------------------


def frozen_for_cpu(net: torch.nn.Module, shape: tuple[int, ...]) -> torch.jit.ScriptModule:
    """A channels_last CPU network as the pipeline runs it: TorchScript trace + freeze (batch
    norms folded into the convolutions before them), its optimisation passes already run once.
    bench/inference.py and bench/openmp_wait.py time this very function."""
    example = torch.zeros(shape).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # shape checks in norm layers become constants: expected for fixed-size inputs
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        frozen = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
        frozen(example)  # first call runs the optimisation passes
    return frozen


class ChestXrayPipeline:
    """Loaded once per process; `run` takes a batch of single-frame chest radiographs."""

    id = "chest_xray"

    def __init__(self, bundle: Path | str, device: str = "auto", version: str | None = None) -> None:
        self.device = resolve_device(device)
        self.bundle: Bundle = load_bundle(bundle, version)
        self.model: ModelInfo = self.bundle.model
        pre = self.bundle.preprocessing
        self.mask_threshold = pre.mask_threshold
        self.opening_radius = pre.opening_radius
        self.crop_margin = pre.crop_margin
        self.crop_to_lungs = pre.crop == "lung"
        self.labels = self.bundle.labels
        self.thresholds = self.bundle.thresholds
        s, c = self.bundle.segmentation_size, self.bundle.classifier_size
        self._cls_spec: dict[str, Any] = self.bundle.metadata.networks.classifier.model_dump()
        self._seg = self._optimise(self.bundle.segmentation, (1, 1, s, s))
        layer = self._cls_spec["gradcam_layer"]
        if self._cls_spec["architecture"] == "DenseNet121" and layer in (None, DEFAULT_LAYERS["DenseNet121"]):
            head = FeatureHead(self.bundle.classifier)
            self._cam_weight: torch.Tensor | None = head.out.weight.detach().to(self.device, torch.float32)
            self._cls = self._optimise(head, (1, 1, c, c))
            self.cam_layer = DEFAULT_LAYERS["DenseNet121"]  # what the backward-free CAM equals
        else:  # logits from the optimised copy; Grad-CAM needs the eager network's backward pass
            self._cam_weight = None
            net = self.bundle.classifier.eval().to(self.device)
            self._explain = GradCamExplainer(net, self._cls_spec, layer)
            self._cls = self._optimise(net, (1, 1, c, c))
            self.cam_layer = self._explain.layer
        self._det: torch.nn.Module | None = None
        if self.bundle.detector is not None:  # eager: MONAI's detector post-processing is not traceable
            self._det = self.bundle.detector.eval().to(self.device)
        self._warm_up(s, c)
        log.info("loaded %s %s (device %s, uid %s, Grad-CAM at %s)", self.model.name, self.model.version,
                 self.device, self.model.device_uid, self.cam_layer)  # fmt: skip

    def _optimise(self, net: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
        """CPU: TorchScript trace + freeze, channels_last. CUDA: eager, channels_last (autocast)."""
        net = net.eval().to(self.device)
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        if self.device.type != "cpu":
            return net
        return frozen_for_cpu(net, shape)

    def _warm_up(self, seg_size: int, cls_size: int, runs: int = 3) -> None:
        """Run each network a few times: TorchScript's profiling executor specialises the graph
        on the first calls (the first study would otherwise pay ~100 ms extra)."""
        with torch.inference_mode():
            for _ in range(runs):
                self._forward(self._seg, torch.zeros(1, 1, seg_size, seg_size))
                self._forward(self._cls, torch.zeros(1, 1, cls_size, cls_size))
            if self._det is not None:
                self._detect([np.zeros((cls_size, cls_size), np.float32)])

    def _forward(self, net: torch.nn.Module, x: torch.Tensor) -> Any:
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with autocast(self.device):
            return net(x)

    def run(self, datasets: Sequence[Dataset], saved: Sequence[ModelOutputs] | None = None) -> list[PipelineResult]:
        """Process a batch (see `Pipeline.run`: `saved` skips the networks). Batched stages'
        timings are the batch time divided by its size."""
        if not datasets:
            return []
        if saved is not None and len(saved) != len(datasets):
            raise ValueError(f"{len(saved)} saved outputs for {len(datasets)} images")
        t_start = time.perf_counter()
        n = len(datasets)
        displays, t_decode = [], []
        for i, ds in enumerate(datasets):
            t0 = time.perf_counter()
            try:
                displays.append(to_display(ds))
            except InputError as e:
                uid = ds.get("SOPInstanceUID", "?")
                raise InputError(f"image {i} (SOP Instance UID {uid}): {e}") from e
            t_decode.append(time.perf_counter() - t0)

        stages = dict.fromkeys(("segmentation", "classification", "heatmap"), 0.0)
        if self._det is not None:
            stages["detection"] = 0.0
        with torch.inference_mode():
            outputs = list(saved) if saved is not None else self._networks(datasets, displays, stages)
            results = [self._result(d, o, stages) for d, o in zip(displays, outputs, strict=True)]
        share = (time.perf_counter() - t_start - sum(t_decode)) / n
        for r, t in zip(results, t_decode, strict=True):
            r.timings = {"decode": t, **{k: v / n for k, v in stages.items()}, "total": t + share}
        return results

    def _networks(self, datasets: Sequence[Dataset], displays: Sequence[np.ndarray],
                  stages: dict[str, float]) -> list[ModelOutputs]:
        """Run the networks over the batch: each image's outputs at their own resolution (the
        lung mask, the crop the classifier saw, the probabilities, each localised finding's CAM,
        the boxes). `stages` gets each stage's batch time added."""
        t0 = time.perf_counter()
        s = self.bundle.segmentation_size
        logits = self._forward(self._seg, torch.stack([segmentation_input(d, s) for d in displays]))
        probs = torch.sigmoid(logits.float())[:, 0].cpu()
        masks, crops = [], []
        for d, p in zip(displays, probs, strict=True):
            m = postprocess_mask(p, self.mask_threshold, self.opening_radius)
            crop = lung_box(m, d.shape, self.crop_margin) if self.crop_to_lungs else (0, d.shape[0], 0, d.shape[1])
            if crop is None:
                log.warning("empty lung mask: classifying the whole image")
                crop = (0, d.shape[0], 0, d.shape[1])
            masks.append(m)
            crops.append(crop)
        stages["segmentation"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        cls_in, crops = self._classifier_batch(datasets, displays, crops)
        out = self._forward(self._cls, cls_in)
        cls_logits, feats = out if self._cam_weight is not None else (out, None)
        cls_probs = torch.sigmoid(cls_logits.float()).cpu().numpy()
        stages["classification"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        # (image, finding) pairs: one heatmap per finding above threshold
        pairs = [(i, j) for i, p in enumerate(cls_probs)
                 for j in localised_findings(p, self.thresholds, self.labels)]  # fmt: skip
        outputs: list[ModelOutputs] = [
            {MASK: m.astype(bool), CROP: np.asarray(c, np.int64), PROBABILITIES: p.astype(np.float32)}
            for m, c, p in zip(masks, crops, cls_probs, strict=True)
        ]
        if pairs:
            items = torch.tensor([i for i, _ in pairs], device=self.device)
            classes = torch.tensor([j for _, j in pairs], device=self.device)
            if self._cam_weight is not None and feats is not None:
                cams = _minmax(cam_from_features(feats.float()[items], self._cam_weight, classes)).cpu()
            else:  # one backward pass per finding
                cams = torch.stack([self._explain(cls_in[i][None], j)[0] for i, j in pairs])
            for (i, j), cam in zip(pairs, cams, strict=True):
                outputs[i][CAM + self.labels[j]] = cam.float().numpy()
        stages["heatmap"] += time.perf_counter() - t0

        if self._det is not None:
            t0 = time.perf_counter()
            for o, found in zip(outputs, self._detect(displays), strict=True):
                o[BOXES] = np.array([[b.x0, b.y0, b.x1, b.y1, b.score] for b in found], np.float64).reshape(-1, 5)
            stages["detection"] += time.perf_counter() - t0
        return outputs

    def _result(self, display: np.ndarray, outputs: ModelOutputs, stages: dict[str, float]) -> PipelineResult:
        """One image's result from its network outputs, in source geometry. Resizing and
        thresholds only: the same outputs give the same result whatever the threads or batch."""
        t0 = time.perf_counter()
        lungs = self._to_source(outputs[MASK], display.shape)
        t1 = time.perf_counter()
        crop = cast(Crop, tuple(int(v) for v in outputs[CROP]))
        # in the outputs' order, which packing keeps: the overlay lists the heatmaps in this order
        heatmaps = {name[len(CAM):]: Heatmap(cam, display.shape, crop)
                    for name, cam in outputs.items() if name.startswith(CAM)}  # fmt: skip
        stages["segmentation"] += t1 - t0
        stages["heatmap"] += time.perf_counter() - t1
        probs = outputs[PROBABILITIES]
        if len(probs) != len(self.labels):
            raise ValueError(f"{len(probs)} saved probabilities for the bundle's {len(self.labels)} labels")
        return PipelineResult(
            findings=[Finding(label=lab, probability=float(p), threshold=t)
                      for lab, p, t in zip(self.labels, probs, self.thresholds, strict=True)],
            display=display,
            regions={LUNGS: lungs},
            heatmaps=heatmaps,
            boxes=[Box(float(x0), float(y0), float(x1), float(y1), DETECTION_LABEL, float(score))
                   for x0, y0, x1, y1, score in outputs.get(BOXES, ())],
            outputs=outputs,
        )

    def _classifier_batch(
        self, datasets: Sequence[Dataset], displays: Sequence[np.ndarray], crops: list[Crop]
    ) -> tuple[torch.Tensor, list[Crop]]:
        """The classifier input as the bundle's `preprocessing.scaling` defines it, and the box
        each image was cropped to (where its heatmap goes): pacsnode's recipe on the lung (or
        whole-image) crops, or torchxrayvision's centre crop (pipelines/xrv.py)."""
        c, pre = self.bundle.classifier_size, self.bundle.preprocessing
        if pre.scaling == "torchxrayvision":
            return xrv.classifier_batch(datasets, displays, c, pre.pixels)
        return torch.stack([classifier_input(d, b, c) for d, b in zip(displays, crops, strict=True)]), crops

    def _detect(self, displays: Sequence[np.ndarray]) -> list[list[Box]]:
        """Lung-opacity boxes per image in source pixels, score >= threshold, best first.

        The detector sees the whole display image as training/detection.py's BoxSet gives it.
        """
        det, size = cast(torch.nn.Module, self._det), cast(int, self.bundle.detector_size)
        threshold = cast(float, self.bundle.detector_threshold)
        x = torch.stack([classifier_input(d, (0, d.shape[0], 0, d.shape[1]), size) for d in displays])
        with autocast(self.device):
            outputs = det(x.to(self.device))
        out = []
        for d, o in zip(displays, outputs, strict=True):
            h, w = d.shape
            scores = o[det.pred_score_key].float().cpu().numpy()
            keep = scores >= threshold
            xywh = from_detector(o[det.target_box_key].float().cpu().numpy()[keep], (h, w), size)
            found = []
            for (bx, by, bw, bh), score in zip(xywh, scores[keep], strict=True):
                x0, y0 = min(max(float(bx), 0.0), w), min(max(float(by), 0.0), h)  # clipped to the image
                x1, y1 = min(max(float(bx + bw), 0.0), w), min(max(float(by + bh), 0.0), h)
                if x1 > x0 and y1 > y0:
                    found.append(Box(x0, y0, x1, y1, DETECTION_LABEL, float(score)))
            out.append(sorted(found, key=lambda b: -b.score))
        return out

    @staticmethod
    def _to_source(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(S, S) bool mask -> (H, W) bool, bilinear upsampling thresholded at 0.5."""
        m = torch.from_numpy(mask.astype(np.float32))[None, None]
        return (F.interpolate(m, size=shape, mode="bilinear", align_corners=False)[0, 0] >= 0.5).numpy()
