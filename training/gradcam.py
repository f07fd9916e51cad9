"""Grad-CAM panels of training runs and of single images (`python -m training gradcam`).

The Grad-CAM itself, its default layer per architecture and why it runs on a copy of the
network are in pipelines/gradcam.py (the node uses the same code).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipelines.chest_xray import heatmap_label_index
from pipelines.gradcam import DEFAULT_LAYERS, gradcam, target_layer
from training.datasets import Record
from training.plots import gradcam_png

if TYPE_CHECKING:
    from training.train import Prepare

__all__ = ["DEFAULT_LAYERS", "explain_image", "gradcam", "pick_examples", "run_gradcam", "target_layer"]


def pick_examples(
    probs: np.ndarray, targets: np.ndarray, thresholds: Sequence[float], labels: Sequence[str], n: int = 4
) -> list[tuple[int, int]]:
    """(image, label) index pairs for a run's panel.

    One label: the highest-scoring positive and the highest-scoring negative. Several: the `n`
    images whose heatmap label (the node's rule: the top finding present, not "No Finding" when
    another is) is most probable, each with that label.
    """
    if len(labels) == 1:
        picks = []
        for positive in (True, False):
            idx = np.flatnonzero((targets[:, 0] > 0.5) == positive)
            if idx.size:
                picks.append((int(idx[np.argmax(probs[idx, 0])]), 0))
        return picks
    top = [heatmap_label_index(p, thresholds, labels) for p in probs]
    order = np.argsort([-probs[i, j] for i, j in enumerate(top)], kind="stable")[:n]
    return [(int(i), top[i]) for i in order]


def _title(label: str, prob: float, image: Path, truth: bool | None = None) -> str:
    known = "" if truth is None else f" (true: {'yes' if truth else 'no'})"
    return f"{label} p={prob:.2f}{known}\n{image.name}"


def run_gradcam(
    net: torch.nn.Module, recipe: dict[str, Any], records: Sequence[Record], prepare: Prepare,
    probs: np.ndarray, targets: np.ndarray, thresholds: Sequence[float], labels: Sequence[str], path: Path,
) -> dict[str, Any]:  # fmt: skip
    """Write a run's Grad-CAM panel (`pick_examples` of a split) to `path`; returns what was drawn."""
    layer = target_layer(net, recipe["network"], recipe.get("gradcam_layer"))
    picks = pick_examples(probs, targets, thresholds, labels)
    maps: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}  # (image, heatmap)
    for j in sorted({j for _, j in picks}):  # one backward per label
        idx = [i for i, jj in picks if jj == j]
        x = torch.stack([prepare(records[i])[0] for i in idx])
        for i, xi, m in zip(idx, x, gradcam(net, recipe["network"], x, j, layer), strict=True):
            maps[i, j] = (xi[0].numpy(), m.numpy())
    if picks:
        gradcam_png([(*maps[i, j], _title(labels[j], float(probs[i, j]), records[i].image, bool(targets[i, j] > 0.5)))
                     for i, j in picks], path)  # fmt: skip
    drawn = [{"image": str(records[i].image), "label": labels[j], "probability": round(float(probs[i, j]), 4),
              "truth": bool(targets[i, j] > 0.5)} for i, j in picks]  # fmt: skip
    return {"file": path.name if picks else None, "layer": layer, "images": drawn}


def explain_image(
    run: Path, image: Path, out: Path, label: str | None = None, layer: str | None = None
) -> dict[str, Any]:
    """Grad-CAM panel of one image for a finished classifier run, preprocessed as the run was.

    label: a run label (default: the node's heatmap label rule at the run's thresholds);
    layer: overrides the run's Grad-CAM layer. Returns the label, probability and layer used.
    """
    # training.train imports this module: import it when called
    from training.train import LungCropper, RunError, _preparer, load_run_network, read_run

    task = read_run(run)["task"]
    if task not in ("binary", "multilabel"):  # before building: a detector is no registry network
        raise RunError(f"{run} is a {task} run: Grad-CAM needs a classifier run")
    net, meta = load_run_network(run)
    recipe, labels = meta["recipe"], list(meta["labels"])
    if label is not None and label not in labels:
        raise ValueError(f"{run} has no label {label!r}; its labels: {', '.join(labels)}")
    cropper = LungCropper(Path(meta["segmentation_run"])) if recipe["crop"] == "lung" else None
    x, _ = _preparer(recipe, cropper, int(meta["input_size"]))(Record(Path(image), (0.0,) * len(labels)))
    with torch.inference_mode():
        probs = torch.sigmoid(net(x[None]))[0].numpy()
    j = labels.index(label) if label is not None else heatmap_label_index(probs, meta["thresholds"], labels)
    name = target_layer(net, meta["network"], layer or recipe.get("gradcam_layer"))
    heat = gradcam(net, meta["network"], x[None], j, name)[0]
    gradcam_png([(x[0].numpy(), heat.numpy(), _title(labels[j], float(probs[j]), Path(image)))], Path(out))
    return {"out": str(out), "image": str(image), "label": labels[j], "probability": round(float(probs[j]), 4),
            "layer": name}  # fmt: skip
