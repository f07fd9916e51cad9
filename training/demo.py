"""Demo recipe: train the lung UNet and the 15-label DenseNet121 on synthetic images, export.

The pixels the networks see come from the pipeline's own recipe functions
(`segmentation_input`, `lung_box`, `classifier_input`), so training and inference agree.
The classifier trains at a reduced size (CPU budget) and is validated, and its thresholds are
chosen, at the bundle's inference size: DenseNet121 is fully convolutional.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.nets import DenseNet121, UNet
from tqdm import tqdm

from pipelines.base import DEMO_DISCLAIMER
from pipelines.chest_xray import (
    FeatureHead,
    classifier_input,
    lung_box,
    postprocess_mask,
    segmentation_input,
)
from training.export import export_bundle
from training.metrics import choose_thresholds, dice, roc_auc_per_label
from training.synthetic import LABELS, generate_set
from training.train import seed_everything

__all__ = ["FULL", "QUICK", "DemoConfig", "train_demo"]

log = logging.getLogger(__name__)

VERSION = "0.1.0"
PREPROCESSING: dict[str, Any] = {"mask_threshold": 0.5, "opening_radius": 2, "crop_margin": 0.08}


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 20240601
    segmentation_size: int = 256  # inference size = training size
    classifier_size: int = 224  # inference and validation size
    classifier_train_size: int = 128
    n_train: int = 800
    n_val: int = 240
    seg_train: int = 320  # the first seg_train training images train the UNet
    seg_epochs: int = 3
    cls_epochs: int = 2
    batch_size: int = 16
    unet_channels: tuple[int, ...] = (8, 16, 32, 64)
    lr: float = 1e-3


FULL = DemoConfig()
QUICK = DemoConfig(
    n_train=160, n_val=64, seg_train=96, seg_epochs=3, cls_epochs=1, classifier_train_size=64,
    segmentation_size=128, lr=2e-3,
)  # fmt: skip


def _batches(n: int, size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + size] for i in range(0, n, size)]


def train_segmentation(cfg: DemoConfig, images: np.ndarray, masks: np.ndarray) -> tuple[UNet, dict[str, Any]]:
    s = cfg.segmentation_size
    spec = {
        "architecture": "UNet",
        "args": {
            "spatial_dims": 2, "in_channels": 1, "out_channels": 1,
            "channels": list(cfg.unet_channels), "strides": [2] * (len(cfg.unet_channels) - 1),
            "num_res_units": 1,
        },
    }  # fmt: skip
    net = UNet(**spec["args"])  # type: ignore[arg-type]
    x = torch.stack([segmentation_input(im, s) for im in images])
    y = torch.from_numpy(masks[:, None].astype(np.float32))
    if y.shape[-1] != s:
        y = (F.interpolate(y, size=(s, s), mode="bilinear", align_corners=False) >= 0.5).float()
    loss_fn = DiceLoss(sigmoid=True)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    rng = np.random.default_rng(cfg.seed)
    net.train()
    for epoch in range(cfg.seg_epochs):
        bar = tqdm(_batches(len(x), cfg.batch_size, rng), desc=f"unet {epoch + 1}/{cfg.seg_epochs}", leave=False)
        for idx in bar:
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            bar.set_postfix(dice_loss=f"{loss.item():.3f}")
    return net.eval(), spec


def train_classifier(
    cfg: DemoConfig, images: np.ndarray, masks: np.ndarray, labels: np.ndarray,
    val: tuple[np.ndarray, np.ndarray, np.ndarray],
) -> tuple[DenseNet121, dict[str, Any]]:  # fmt: skip
    spec = {"architecture": "DenseNet121", "args": {"spatial_dims": 2, "in_channels": 1, "out_channels": len(LABELS)}}
    net = DenseNet121(**spec["args"])  # type: ignore[arg-type]
    t = cfg.classifier_train_size
    x = _crops(images, masks, t)
    y = torch.from_numpy(labels)
    vx, vy = _crops(val[0], val[1], t), torch.from_numpy(val[2])
    pos = y.sum(0)
    pos_weight = ((len(y) - pos) / pos.clamp_min(1)).clamp(1.0, 10.0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=0)
    rng = np.random.default_rng(cfg.seed + 1)
    for epoch in range(cfg.cls_epochs):
        net.train()
        bar = tqdm(_batches(len(x), cfg.batch_size, rng), desc=f"densenet {epoch + 1}/{cfg.cls_epochs}", leave=False)
        for idx in bar:
            opt.zero_grad()
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            opt.step()
            bar.set_postfix(bce=f"{loss.item():.3f}")
        net.eval()
        with torch.inference_mode():
            val_loss = float(loss_fn(_predict(net, vx, cfg.batch_size, logits=True), vy))
        sched.step(val_loss)
        log.info("densenet epoch %d: val loss %.4f", epoch + 1, val_loss)
    return net.eval(), spec


def _crops(images: np.ndarray, masks: np.ndarray, size: int) -> torch.Tensor:
    boxes = [lung_box(m, im.shape, PREPROCESSING["crop_margin"]) for im, m in zip(images, masks, strict=True)]
    return torch.stack([
        classifier_input(im, b or (0, im.shape[0], 0, im.shape[1]), size)
        for im, b in zip(images, boxes, strict=True)
    ])  # fmt: skip


def _predict(net: torch.nn.Module, x: torch.Tensor, batch: int, logits: bool = False) -> torch.Tensor:
    out = torch.cat([net(x[i : i + batch]) for i in range(0, len(x), batch)])
    return out if logits else torch.sigmoid(out)


def train_demo(out: Path, cfg: DemoConfig = FULL) -> dict[str, Any]:
    """Generate data, train both networks, choose thresholds on validation, export the bundle."""
    t0 = time.perf_counter()
    seed_everything(cfg.seed)
    size = 256
    tr_img, tr_mask, tr_lab = generate_set(cfg.n_train, cfg.seed, size)
    va_img, va_mask, va_lab = generate_set(cfg.n_val, cfg.seed, size, start=cfg.n_train)
    log.info("generated %d + %d synthetic images in %.1fs", cfg.n_train, cfg.n_val, time.perf_counter() - t0)

    seg, seg_spec = train_segmentation(cfg, tr_img[: cfg.seg_train], tr_mask[: cfg.seg_train])
    with torch.inference_mode():
        s = cfg.segmentation_size
        vx = torch.stack([segmentation_input(im, s) for im in va_img])
        prob = _predict(seg, vx, cfg.batch_size)[:, 0]
        pred = np.stack([postprocess_mask(p, PREPROCESSING["mask_threshold"], PREPROCESSING["opening_radius"]) for p in prob])
    target = F.interpolate(torch.from_numpy(va_mask[:, None].astype(np.float32)), size=(s, s), mode="bilinear")
    val_dice = dice(pred, (target[:, 0] >= 0.5).numpy())
    log.info("unet val dice %.4f", val_dice)

    cls, cls_spec = train_classifier(cfg, tr_img, tr_mask, tr_lab, (va_img, va_mask, va_lab))
    with torch.inference_mode():
        # validate where the pipeline runs: predicted lung boxes, inference size
        boxes = [lung_box(m, im.shape, PREPROCESSING["crop_margin"]) for im, m in zip(va_img, pred, strict=True)]
        vc = torch.stack([
            classifier_input(im, b or (0, size, 0, size), cfg.classifier_size)
            for im, b in zip(va_img, boxes, strict=True)
        ])  # fmt: skip
        head = FeatureHead(cls).eval()
        probs = torch.cat([torch.sigmoid(head(vc[i : i + 8])[0]) for i in range(0, len(vc), 8)]).numpy()
    aucs = roc_auc_per_label(probs, va_lab)
    thresholds = choose_thresholds(probs, va_lab)
    valid = [a for a in aucs if a is not None]
    metrics = {
        "split": f"synthetic validation, {cfg.n_val} images (seed {cfg.seed}, indices {cfg.n_train}..)",
        "val_dice": round(val_dice, 4),
        "val_roc_auc": dict(zip(LABELS, aucs, strict=True)),
        "val_roc_auc_mean": round(float(np.mean(valid)), 4) if valid else None,
        "threshold_rule": "max Youden J on validation at the inference size",
    }
    train_s = time.perf_counter() - t0
    export_bundle(
        out,
        networks={"segmentation": (seg, seg_spec), "classifier": (cls, cls_spec)},
        labels=list(LABELS),
        thresholds=thresholds,
        input_size={"segmentation": cfg.segmentation_size, "classifier": cfg.classifier_size},
        preprocessing=PREPROCESSING,
        metrics=metrics,
        training_data={
            "source": "training.synthetic (procedural chest-like radiographs, no patient data)",
            "train_images": cfg.n_train, "segmentation_train_images": cfg.seg_train,
            "val_images": cfg.n_val, "seed": cfg.seed, "image_size": size,
            "classifier_train_size": cfg.classifier_train_size,
            "label_prevalence_train": dict(zip(LABELS, [round(float(v), 4) for v in tr_lab.mean(0)], strict=True)),
            "recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
            "train_seconds": round(train_s, 1),
        },  # fmt: skip
        version=VERSION,
        changelog={VERSION: "demo weights trained on synthetic images"},
        demo=True,
        description=f"Lung segmentation (UNet) and 15-label chest finding classifier (DenseNet121): {DEMO_DISCLAIMER}",
    )
    return metrics | {"seconds": round(time.perf_counter() - t0, 1)}
