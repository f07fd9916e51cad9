"""`python -m training train --recipe R --data D --out runs/X [--resume] [--set k=v]`.

One loop for the three tasks (segmentation, multilabel, binary). The pixels come from the
node's recipe functions (`pipelines.chest_xray.segmentation_input` / `classifier_input`, and
`postprocess_mask` + `lung_box` for lung crops), images from `pipelines.imaging.to_display`
via the loaders. A run folder holds:

    recipe.yaml      the resolved recipe          checkpoint.pt  last epoch (for --resume)
    model.pt         best weights (state dict)    run.json       what export needs
    report.json      metrics per split            roc.png, confusion.png, gradcam.png
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from monai.losses import DiceLoss
from monai.transforms import Compose, RandAffined, RandFlipd
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipelines.chest_xray import classifier_input, lung_box, postprocess_mask, segmentation_input
from pipelines.device import autocast, resolve_device
from training.checkpoint import restore_checkpoint, save_checkpoint
from training.datasets import LabelledSet, Record, load_dataset, load_image, load_mask
from training.gradcam import run_gradcam, target_layer
from training.metrics import (
    binary_metrics,
    calibration,
    choose_thresholds,
    confusion_matrix,
    dice,
    label_table,
    roc_curve,
)
from training.networks import build_network, load_pretrained
from training.plots import confusion_png, roc_png

__all__ = ["RunError", "LungCropper", "load_run_network", "read_run", "train"]

log = logging.getLogger(__name__)

Prepare = Callable[[Record], tuple[torch.Tensor, torch.Tensor]]


class RunError(RuntimeError):
    """A run folder cannot be (re)used: existing checkpoint without --resume, missing files."""


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch RNGs; deterministic cuDNN choices where CUDA is used."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def read_run(run: Path) -> dict[str, Any]:
    """A finished run's run.json; RunError when the folder holds no finished run."""
    try:
        meta: dict[str, Any] = json.loads((Path(run) / "run.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunError(f"{run} is not a finished run (run.json: {e})") from e
    return meta


def load_run_network(run: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A finished run's best network (CPU, eval mode) and its run.json."""
    meta = read_run(run)
    net = build_network(meta["network"])
    net.load_state_dict(torch.load(Path(run) / "model.pt", map_location="cpu", weights_only=True))
    return net.eval(), meta


class LungCropper:
    """Lung box of an image from a segmentation run, exactly as the node computes it."""

    def __init__(self, run: Path) -> None:
        self.run = Path(run).resolve()
        self.net, meta = load_run_network(self.run)
        if meta["task"] != "segmentation":
            raise RunError(f"{run} is a {meta['task']} run, not a segmentation run")
        self.size = int(meta["input_size"])
        self.post = meta["preprocessing"]

    @torch.inference_mode()
    def __call__(self, display: np.ndarray) -> tuple[int, int, int, int]:
        prob = torch.sigmoid(self.net(segmentation_input(display, self.size)[None]))[0, 0]
        mask = postprocess_mask(prob, float(self.post["mask_threshold"]), int(self.post["opening_radius"]))
        box = lung_box(mask, display.shape, float(self.post["crop_margin"]))
        return box or (0, display.shape[0], 0, display.shape[1])


class Prepared(Dataset):  # type: ignore[type-arg]
    """Records -> (x, y) tensors through `prepare`, cached in memory when asked, then augmented."""

    def __init__(self, records: Sequence[Record], prepare: Prepare, augment: Compose | None, cache: bool) -> None:
        self.records, self.prepare, self.augment = list(records), prepare, augment
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache is not None and i in self.cache:
            x, y = self.cache[i]
        else:
            x, y = self.prepare(self.records[i])
            if self.cache is not None:
                self.cache[i] = (x, y)
        if self.augment is None:
            return x, y
        keys = {"image": x, "mask": y} if y.ndim == 3 else {"image": x}
        out = self.augment(keys)
        x = torch.as_tensor(out["image"]).float()
        if y.ndim == 3:
            y = (torch.as_tensor(out["mask"]).float() >= 0.5).float()
        return x, y


def _augmenter(aug: dict[str, Any], size: int, segmentation: bool, seed: int) -> Compose | None:
    """Rotation, shift and zoom as in the seeds; left-right flip only when asked."""
    if not aug or float(aug.get("prob", 0)) <= 0:
        return None
    keys = ["image", "mask"] if segmentation else ["image"]
    t: list[Any] = [RandAffined(
        keys, prob=float(aug["prob"]), rotate_range=math.radians(float(aug["rotate_deg"])),
        translate_range=(float(aug["shift"]) * size,) * 2, scale_range=(float(aug["zoom"]),) * 2,
        mode=["bilinear", "nearest"][: len(keys)], padding_mode="border",
    )]  # fmt: skip
    if aug.get("flip_lr"):
        t.append(RandFlipd(keys, prob=0.5, spatial_axis=1))
    c = Compose(t)
    c.set_random_state(seed)
    return c


def _preparer(recipe: dict[str, Any], cropper: LungCropper | None, size: int) -> Prepare:
    """Record -> (network input at `size`, target), with the node's preprocessing."""
    if recipe["task"] == "segmentation":
        def prepare_seg(r: Record) -> tuple[torch.Tensor, torch.Tensor]:
            img = load_image(r.image)
            m = torch.from_numpy(load_mask(r.masks, img.shape).astype(np.float32))[None, None]
            y = (F.interpolate(m, size=(size, size), mode="area")[0] >= 0.5).float()
            return segmentation_input(img, size), y
        return prepare_seg

    def prepare_cls(r: Record) -> tuple[torch.Tensor, torch.Tensor]:
        img = load_image(r.image)
        box = cropper(img) if cropper else (0, img.shape[0], 0, img.shape[1])
        return classifier_input(img, box, size), torch.tensor(r.labels, dtype=torch.float32)
    return prepare_cls


def optimisation(
    recipe: dict[str, Any], params: Any, dev: torch.device, mode: Literal["min", "max"]
) -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
    """The recipe's optimiser, its scheduler (ReduceLROnPlateau on a score to `mode`: "min" for
    a loss, "max" for a metric; None without one) and the gradient scaler (active on CUDA)."""
    opt = _optimizer(recipe, params)
    sc = recipe["scheduler"] or {"name": "none"}
    sched = (
        torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode=mode, factor=float(sc["factor"]), patience=int(sc["patience"]))
        if sc["name"] == "plateau" else None
    )  # fmt: skip
    return opt, sched, torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")


def recipe_pretrained(recipe: dict[str, Any], module: torch.nn.Module) -> dict[str, Any] | None:
    """Load the recipe's local `pretrained` file into `module`; what was loaded, or None."""
    if not recipe["pretrained"]:
        log.info("no pretrained weights given: random initialisation (nothing is downloaded)")
        return None
    return {"path": str(recipe["pretrained"]), **load_pretrained(module, Path(recipe["pretrained"]))}


def _optimizer(recipe: dict[str, Any], params: Any) -> torch.optim.Optimizer:
    o = recipe["optimizer"]
    name, lr, wd = o["name"].lower(), float(o["lr"]), float(o.get("weight_decay", 0.0))
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=wd, momentum=float(o.get("momentum", 0.9)))
    raise ValueError(f"optimizer must be adam, rmsprop or sgd, not {name!r}")


def _predict(net: torch.nn.Module, data: Prepared, batch: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets) over a split, in order, without augmentation."""
    net.eval()
    outs, ys = [], []
    with torch.inference_mode():
        for x, y in DataLoader(data, batch_size=batch, shuffle=False):
            with autocast(dev):
                outs.append(net(x.to(dev)).float().cpu())
            ys.append(y)
    return torch.cat(outs), torch.cat(ys)


def _seg_scores(logits: torch.Tensor, y: torch.Tensor, post: dict[str, Any]) -> dict[str, float]:
    """Dice and pixel accuracy after the node's postprocessing (threshold, opening, 2 components)."""
    prob = torch.sigmoid(logits)[:, 0]
    pred = np.stack([postprocess_mask(p, float(post["mask_threshold"]), int(post["opening_radius"])) for p in prob])
    truth = y[:, 0].numpy() > 0.5
    return {"dice": dice(pred, truth), "pixel_accuracy": float((pred == truth).mean())}


def _class_weights(records: Sequence[Record], most: float) -> torch.Tensor:
    """pos_weight = negatives / positives per label (on the training split), clamped to [1, most]."""
    y = torch.tensor([r.labels for r in records], dtype=torch.float32)
    pos = y.sum(0)
    return ((len(y) - pos) / pos.clamp_min(1)).clamp(1.0, most)


def train(
    recipe: dict[str, Any], data: Path, out: Path, *, resume: bool = False,
    segmentation_run: Path | None = None, device: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    """Train a recipe into run folder `out`, evaluate the best epoch, write the reports."""
    t_start = time.perf_counter()
    dev = resolve_device(device)
    out = Path(out)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists() and not resume:
        raise RunError(f"{out} already holds a run: pass --resume to continue it or choose a new --out")
    if resume and not ckpt.exists():
        raise RunError(f"--resume: {ckpt} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    seed = int(recipe["seed"])
    seed_everything(seed)
    task, size = recipe["task"], int(recipe["image_size"])
    for w in recipe.get("warnings", []):
        log.warning("recipe: %s", w)

    ds = load_dataset(recipe["dataset"], data)
    splits = ds.split(**{k: recipe["split"][k] for k in ("val", "test", "seed")})
    if recipe["limit"]:
        splits = {k: v[: int(recipe["limit"])] for k, v in splits.items()}
    if not splits["train"] or not splits["val"]:
        raise RunError(f"split gives {len(splits['train'])} training and {len(splits['val'])} validation images")
    summary = ds.summary(splits)
    log.info("data: %s", json.dumps(summary["splits"]))
    if task == "detection":  # its own loop: box targets, RSNA score (training/detection.py)
        from training.detection import train_detection

        return train_detection(recipe, ds, splits, summary, out, dev=dev, resume=resume, started=t_start)

    cropper = None
    if task != "segmentation" and recipe["crop"] == "lung":
        if segmentation_run is None:
            raise RunError("crop: lung needs --segmentation-run (a finished lung segmentation run)")
        cropper = LungCropper(segmentation_run)
    if task == "segmentation" and not all(r.masks for s in splits.values() for r in s):
        raise RunError(f"a segmentation recipe needs a mask for every image; {ds.name} has images without one")
    # fully convolutional networks may train smaller than they run: validation, thresholds and
    # the bundle use the inference size
    infer_size = int(recipe["inference_size"] or size)
    prepare = _preparer(recipe, cropper, infer_size)
    cache = bool(recipe["cache"])
    train_set = Prepared(splits["train"], _preparer(recipe, cropper, size),
                         _augmenter(recipe["augment"], size, task == "segmentation", seed), cache)  # fmt: skip
    val_set = Prepared(splits["val"], prepare, None, cache)

    net = build_network(recipe["network"])
    if task != "segmentation":  # a wrong gradcam_layer fails now, not after training
        target_layer(net, recipe["network"], recipe.get("gradcam_layer"))
    pretrained = recipe_pretrained(recipe, net)
    net = net.to(dev)
    if task == "segmentation":
        loss_fn: torch.nn.Module = DiceLoss(sigmoid=True)
    else:
        pos_weight = _class_weights(splits["train"], float(recipe["pos_weight_max"])) if recipe["class_weighting"] else None
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=None if pos_weight is None else pos_weight.to(dev))
    opt, sched, scaler = optimisation(recipe, net.parameters(), dev, mode="min")  # on the validation loss

    def evaluate() -> tuple[float, float, dict[str, float]]:
        logits, y = _predict(net, val_set, int(recipe["batch_size"]), dev)
        val_loss = float(loss_fn(logits.to(dev), y.to(dev)))
        if task == "segmentation":
            s = _seg_scores(logits, y, recipe["postprocess"])
            return s["dice"], val_loss, s
        aucs = [binary_metrics(torch.sigmoid(logits[:, j]).numpy(), y[:, j].numpy(), 0.5)["roc_auc"]
                for j in range(y.shape[1])]  # fmt: skip
        valid = [a for a in aucs if a is not None]
        mean_auc = float(np.mean(valid)) if valid else None
        # without both classes in validation, AUC is undefined: rank epochs by loss instead
        return (mean_auc if mean_auc is not None else -val_loss), val_loss, {"mean_auc": mean_auc or float("nan")}

    state: dict[str, Any] = {"epoch": 0, "best": -math.inf, "history": []}
    if resume:
        state = restore_checkpoint(ckpt, net, opt, sched, scaler, dev)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))

    epochs, batch, max_steps = int(recipe["epochs"]), int(recipe["batch_size"]), recipe["max_steps"]
    images_seen, t_train = 0, 0.0
    for epoch in range(state["epoch"], epochs):
        net.train()
        # shuffle and augmentation depend on (seed, epoch) only: a resumed run sees the same batches
        if train_set.augment is not None:
            train_set.augment.set_random_state(seed * 1000 + epoch)
        loader = DataLoader(train_set, batch_size=batch, shuffle=True, drop_last=len(train_set) > batch,
                            num_workers=int(recipe["num_workers"]),
                            generator=torch.Generator().manual_seed(seed * 1000 + epoch))  # fmt: skip
        steps = len(loader) if not max_steps else min(len(loader), int(max_steps))
        bar = tqdm(loader, total=steps, desc=f"{task} epoch {epoch + 1}/{epochs}", unit="batch")
        t0, losses = time.perf_counter(), []
        for step, (x, y) in enumerate(bar):
            if step >= steps:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with autocast(dev):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
            images_seen += len(x)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", lr=f"{opt.param_groups[0]['lr']:.2g}")
        bar.close()
        t_train += time.perf_counter() - t0
        score, val_loss, details = evaluate()
        if sched is not None:
            sched.step(val_loss)
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "val_loss": val_loss, **details}
        state["history"].append(entry)
        log.info("epoch %d: %s", epoch + 1, json.dumps(entry))
        if score > state["best"]:
            state["best"] = score
            torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, out / "model.pt")
        state["epoch"] = epoch + 1
        save_checkpoint(ckpt, state, net, opt, sched, scaler, dev)

    net.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
    report = _final_report(recipe, ds, splits, prepare, net, dev, out)
    run = {
        "task": task, "recipe": recipe, "network": recipe["network"], "weights": "model.pt",
        "labels": list(ds.labels), "thresholds": report.get("thresholds"), "input_size": infer_size,
        "preprocessing": {**recipe["postprocess"], "crop": recipe["crop"]},
        "segmentation_run": str(cropper.run) if cropper else None,
        "pretrained": pretrained, "data": summary, "metrics": report["metrics"],
        "history": state["history"], "device": str(dev),
        "throughput_images_per_s": round(images_seen / t_train, 2) if t_train > 0 else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }  # fmt: skip
    (out / "run.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    return run


def _final_report(
    recipe: dict[str, Any], ds: LabelledSet, splits: dict[str, list[Record]], prepare: Prepare,
    net: torch.nn.Module, dev: torch.device, out: Path,
) -> dict[str, Any]:  # fmt: skip
    """Best weights on val (thresholds chosen there) and test; report.json and the PNGs."""
    batch = int(recipe["batch_size"])
    net = net.to(dev)
    evaluated = {s: _predict(net, Prepared(splits[s], prepare, None, False), batch, dev)
                 for s in ("val", "test") if splits[s]}  # fmt: skip
    final = "test" if "test" in evaluated else "val"
    report: dict[str, Any] = {"final_split": final}
    if recipe["task"] == "segmentation":
        report["metrics"] = {s: _seg_scores(lg, y, recipe["postprocess"]) for s, (lg, y) in evaluated.items()}
    else:
        probs = {s: (torch.sigmoid(lg).numpy(), y.numpy()) for s, (lg, y) in evaluated.items()}
        thresholds = choose_thresholds(*probs["val"], rule=recipe["threshold_rule"])
        p, y = probs[final]
        table = label_table(p, y, thresholds, ds.labels)
        aucs = [r["roc_auc"] for r in table if r["roc_auc"] is not None]
        report["thresholds"] = thresholds
        report["threshold_rule"] = f"{recipe['threshold_rule']} on validation"
        report["metrics"] = {
            final: {"mean_roc_auc": float(np.mean(aucs)) if aucs else None,
                    "per_label": table,
                    "calibration": {lab: calibration(p[:, j], y[:, j]) for j, lab in enumerate(ds.labels)}},
        }  # fmt: skip
        curves = {}
        for j, lab in enumerate(ds.labels):
            fpr, tpr, _ = roc_curve(p[:, j], y[:, j])
            curves[lab] = (fpr, tpr, table[j]["roc_auc"])
        roc_png(curves, out / "roc.png")
        if len(ds.labels) == 1:  # binary: the 2 x 2 matrix; multi-label: per-label counts are in the table
            cm = confusion_matrix(y[:, 0] > 0.5, p[:, 0] >= thresholds[0], 2)
            confusion_png(cm, [f"not {ds.labels[0]}", ds.labels[0]], out / "confusion.png")
            report["metrics"][final]["confusion_matrix"] = cm.tolist()
        report["gradcam"] = run_gradcam(net, recipe, splits[final], prepare, p, y, thresholds, ds.labels,
                                        out / "gradcam.png")  # fmt: skip
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
