"""Lung-opacity detection (RSNA): MONAI's RetinaNet detector, scored with the RSNA metric.

    display image -> `classifier_input` (whole image: resize + equalise, as the classifiers)
    -> ResNet + FPN -> RetinaNet heads -> ATSS matching, hard-negative sampling (training)
    or box selection + NMS (inference) -> boxes in source pixels -> `metrics.rsna_score`

`train.train()` hands detection recipes to `train_detection` after loading and splitting the
data; the run folder has the same files as the other tasks (no ROC/confusion PNGs).

The network, its settings (`DETECTION_DEFAULTS`) and the box conversions live in
`pipelines/detector.py`, where the node builds the same detector from a bundle.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import yaml
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipelines.base import merge_settings
from pipelines.chest_xray import classifier_input
from pipelines.detector import (
    DETECTION_DEFAULTS,
    ResNetFPN,
    build_detector,
    from_detector,
    to_detector,
)
from pipelines.device import autocast
from training.checkpoint import restore_checkpoint, save_checkpoint
from training.datasets import LabelledSet, Record, load_image
from training.metrics import RSNA_IOU_THRESHOLDS, rsna_image_score

__all__ = [
    "DETECTION_DEFAULTS",
    "THRESHOLD_GRID",
    "BoxSet",
    "ResNetFPN",
    "build_detector",
    "choose_score_threshold",
    "from_detector",
    "load_detection_run",
    "predict",
    "score_split",
    "to_detector",
    "train_detection",
]

log = logging.getLogger(__name__)

# (boxes (N, 4) as RSNA x, y, w, h in source pixels, scores (N,)) for one image
Prediction = tuple[np.ndarray, np.ndarray]

# candidate detection-score thresholds; the one maximising the validation RSNA score is kept
THRESHOLD_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def load_detection_run(run: Path) -> tuple[RetinaNetDetector, dict[str, Any]]:
    """A finished detection run's best detector (CPU, eval mode) and its run.json."""
    from training.train import read_run  # train imports this module lazily: no import cycle

    meta = read_run(run)
    det = build_detector(meta["network"], meta["detection"])
    det.network.load_state_dict(torch.load(Path(run) / "model.pt", map_location="cpu", weights_only=True))
    return det.eval(), meta


# ---- boxes and data --------------------------------------------------------------------------


class BoxSet(Dataset):  # type: ignore[type-arg]
    """Records -> (image (1, S, S), detector boxes (N, 4) float32, source (H, W)), cached when asked."""

    def __init__(self, records: Sequence[Record], size: int, cache: bool) -> None:
        self.records, self.size = list(records), size
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        r = self.records[i]
        img = load_image(r.image)
        shape = (int(img.shape[0]), int(img.shape[1]))
        item = (
            classifier_input(img, (0, shape[0], 0, shape[1]), self.size),
            torch.from_numpy(to_detector(r.boxes, shape, self.size)).float(),
            shape,
        )
        if self.cache is not None:
            self.cache[i] = item
        return item


def _collate(batch: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int]]]) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, int]]]:
    # boxes differ in number per image: a list, not a stacked tensor
    return torch.stack([b[0] for b in batch]), [b[1] for b in batch], [b[2] for b in batch]


# ---- evaluation ------------------------------------------------------------------------------


def predict(detector: nn.Module, data: BoxSet, batch: int, dev: torch.device) -> list[Prediction]:
    """Detections for a split, in order, mapped back to source pixels (RSNA x, y, w, h)."""
    detector.eval()
    out: list[Prediction] = []
    with torch.inference_mode():
        for x, _, shapes in DataLoader(data, batch_size=batch, shuffle=False, collate_fn=_collate):
            with autocast(dev):
                dets = detector(x.to(dev))
            for d, shape in zip(dets, shapes, strict=True):
                boxes = d[detector.target_box_key].float().cpu().numpy()
                scores = d[detector.pred_score_key].float().cpu().numpy()
                out.append((from_detector(boxes, shape, data.size), scores))
    return out


def score_split(
    preds: Sequence[Prediction], truths: Sequence[Sequence[Sequence[float]]], threshold: float
) -> tuple[float | None, list[float | None]]:  # fmt: skip
    """(RSNA score, per-image scores) keeping detections with score >= threshold.

    Per image as `metrics.rsna_image_score` (None: no boxes and no detections, not counted);
    the split's score is the mean over the images that count, None if none does.
    """
    if len(preds) != len(truths):
        raise ValueError(f"{len(preds)} predictions for {len(truths)} images")
    per = []
    for (boxes, scores), truth in zip(preds, truths, strict=True):
        keep = scores >= threshold
        per.append(rsna_image_score(boxes[keep].tolist(), scores[keep].tolist(), [list(b) for b in truth]))
    kept = [v for v in per if v is not None]
    return (float(np.mean(kept)) if kept else None), per


def _rank(score: float | None) -> float:
    # no image counts only when nothing was there and nothing was found: as good as it gets
    return 1.0 if score is None else score


def choose_score_threshold(
    preds: Sequence[Prediction], truths: Sequence[Sequence[Sequence[float]]], grid: Sequence[float] = THRESHOLD_GRID
) -> tuple[float, float | None]:  # fmt: skip
    """(threshold, RSNA score there): the grid value with the best score; ties keep the higher one."""
    scored = [(float(t), score_split(preds, truths, t)[0]) for t in grid]
    return max(scored, key=lambda ts: (_rank(ts[1]), ts[0]))


def _split_report(records: Sequence[Record], preds: Sequence[Prediction], threshold: float) -> dict[str, Any]:
    """RSNA score and its breakdown for one split at the chosen threshold, plus per-image rows."""
    score, per = score_split(preds, [r.boxes for r in records], threshold)
    rows: list[dict[str, Any]] = []
    for r, (_, scores), s in zip(records, preds, per, strict=True):
        keep = scores >= threshold
        rows.append({"image": r.image.name, "true_boxes": len(r.boxes), "predicted_boxes": int(keep.sum()),
                     "score": s})  # fmt: skip
    pos = [float(s) for r, s in zip(records, per, strict=True) if r.boxes and s is not None]
    neg = [row for row in rows if not row["true_boxes"]]
    summary = {
        "rsna_score": score, "images": len(rows), "images_counted": sum(s is not None for s in per),
        "with_opacity": len(pos), "mean_score_with_opacity": float(np.mean(pos)) if pos else None,
        "without_opacity": len(neg), "false_positive_images": sum(row["predicted_boxes"] > 0 for row in neg),
    }  # fmt: skip
    return {"summary": summary, "per_image": rows}


# ---- training --------------------------------------------------------------------------------


def train_detection(
    recipe: dict[str, Any], ds: LabelledSet, splits: dict[str, list[Record]], summary: dict[str, Any], out: Path,
    *, dev: torch.device, resume: bool, started: float,
) -> dict[str, Any]:  # fmt: skip
    """The detection loop behind `train.train()` (run folder checked, data loaded and split).

    Model selection and the detection-score threshold both maximise the validation RSNA score.
    """
    from training.train import (  # train imports this module lazily
        RunError,
        optimisation,
        recipe_pretrained,
    )

    recipe = {**recipe, "detection": merge_settings(DETECTION_DEFAULTS, recipe.get("detection") or {})}
    if recipe["crop"] != "none":
        raise RunError("detection runs on whole images: crop must be 'none'")
    if recipe["augment"] and float(recipe["augment"].get("prob", 0)) > 0:
        raise RunError("augmentation is not implemented for detection (it must move the boxes): set augment.prob: 0")
    if not any(r.boxes for r in splits["train"]):
        raise RunError(f"{ds.name}: no boxes in the training split; detection needs box labels (format: rsna)")
    seed, size, batch = int(recipe["seed"]), int(recipe["image_size"]), int(recipe["batch_size"])
    ckpt = out / "checkpoint.pt"

    detector = build_detector(recipe["network"], recipe["detection"])
    pretrained = recipe_pretrained(recipe, cast(ResNetFPN, detector.network.feature_extractor).body)
    detector = detector.to(dev)
    net = detector.network  # holds every trainable parameter
    cache = bool(recipe["cache"])
    train_set, val_set = BoxSet(splits["train"], size, cache), BoxSet(splits["val"], size, cache)
    opt, sched, scaler = optimisation(recipe, net.parameters(), dev, mode="max")  # on the validation RSNA score

    state: dict[str, Any] = {"epoch": 0, "best": -math.inf, "history": []}
    if resume:
        state = restore_checkpoint(ckpt, net, opt, sched, scaler, dev)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    epochs, max_steps = int(recipe["epochs"]), recipe["max_steps"]
    images_seen, t_train = 0, 0.0
    for epoch in range(state["epoch"], epochs):
        detector.train()
        loader = DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=len(train_set) > batch,
                            num_workers=int(recipe["num_workers"]), collate_fn=_collate,
                            generator=torch.Generator().manual_seed(seed * 1000 + epoch))  # fmt: skip
        steps = len(loader) if not max_steps else min(len(loader), int(max_steps))
        bar = tqdm(loader, total=steps, desc=f"detection epoch {epoch + 1}/{epochs}", unit="batch")
        t0, losses = time.perf_counter(), []
        parts: dict[str, list[float]] = {detector.cls_key: [], detector.box_reg_key: []}
        for step, (x, boxes, _) in enumerate(bar):
            if step >= steps:
                break
            targets = [{detector.target_box_key: b.to(dev), detector.target_label_key: torch.zeros(len(b), dtype=torch.long, device=dev)}
                       for b in boxes]  # fmt: skip
            opt.zero_grad(set_to_none=True)
            with autocast(dev):
                loss_parts = detector(x.to(dev, non_blocking=True), targets)
            loss = sum(v.float() for v in loss_parts.values())
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            for k, v in loss_parts.items():
                parts[k].append(float(v.detach()))
            images_seen += len(x)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", cls=f"{np.mean(parts[detector.cls_key]):.3f}",
                            box=f"{np.mean(parts[detector.box_reg_key]):.3f}", lr=f"{opt.param_groups[0]['lr']:.2g}")  # fmt: skip
        bar.close()
        t_train += time.perf_counter() - t0
        threshold, score = choose_score_threshold(predict(detector, val_set, batch, dev), [r.boxes for r in splits["val"]])
        if sched is not None:
            sched.step(_rank(score))
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                 "cls_loss": float(np.mean(parts[detector.cls_key])), "box_loss": float(np.mean(parts[detector.box_reg_key])),
                 "val_rsna_score": score, "val_score_threshold": threshold}  # fmt: skip
        state["history"].append(entry)
        log.info("epoch %d: %s", epoch + 1, json.dumps(entry))
        if _rank(score) > state["best"]:
            state["best"] = _rank(score)
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, out / "model.pt")
        state["epoch"] = epoch + 1
        save_checkpoint(ckpt, state, net, opt, sched, scaler, dev)

    net.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
    preds = {s: predict(detector, BoxSet(splits[s], size, False), batch, dev) for s in ("val", "test") if splits[s]}
    threshold, _ = choose_score_threshold(preds["val"], [r.boxes for r in splits["val"]])
    per_split = {s: _split_report(splits[s], p, threshold) for s, p in preds.items()}
    report = {
        "final_split": "test" if "test" in preds else "val", "score_threshold": threshold,
        "threshold_rule": "maximises the RSNA score on validation", "iou_thresholds": list(RSNA_IOU_THRESHOLDS),
        "metrics": {s: r["summary"] for s, r in per_split.items()},
        "per_image": {s: r["per_image"] for s, r in per_split.items()},
    }  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    run = {
        "task": "detection", "recipe": recipe, "network": recipe["network"], "detection": recipe["detection"],
        "weights": "model.pt", "labels": [ds.labels[0]], "score_threshold": threshold, "input_size": size,
        "preprocessing": {"crop": "none", "input": "pipelines.chest_xray.classifier_input on the whole image"},
        "box_convention": "detector: (row0, col0, row1, col1) at input_size; reported: RSNA (x, y, w, h) in source pixels",
        "pretrained": pretrained, "data": summary, "metrics": report["metrics"],
        "history": state["history"], "device": str(dev),
        "throughput_images_per_s": round(images_seen / t_train, 2) if t_train > 0 else None,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    return run
