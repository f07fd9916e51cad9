"""Deterministic synthetic chest radiographs for demo weights (not a model of real disease).

Each sample is a display-domain image (float32 in [0, 1], higher = brighter, as `to_display`
returns), its lung mask and a multi-hot label vector over `LABELS`. Sample i of seed s is the
same on every machine: its generator is seeded with (seed, i).

Drawn: air outside an elliptical body, soft tissue, curved rib bands, a bright mediastinum and
heart, two dark lung fields with vessel markings, noise. Each label has its own pattern:
cardiomegaly = wider heart; effusion = white lung base with a meniscus; pneumothorax = dark rim
without markings and a pleural line; nodule = small bright spots; mass = one large bright
round; consolidation = dense homogeneous blob; pneumonia = patchy lower-zone opacity;
infiltration = faint scattered patches; edema = bilateral perihilar haze; atelectasis = smaller
lung, raised base and a dense band; emphysema = large dark lungs, few markings; fibrosis =
reticular lines; hernia = retrocardiac bubble with an air-fluid level; pleural thickening =
bright lateral pleural rim. "No Finding" when none is drawn.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["LABELS", "Sample", "generate", "generate_set", "write_dataset"]

LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
    "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia",
    "Pneumothorax", "No Finding",
)  # fmt: skip
PREVALENCE = 0.12  # per pathology, in images that are not forced normal
NORMAL_FRACTION = 0.3


@dataclass(frozen=True)
class Sample:
    image: np.ndarray  # float32 (size, size) in [0, 1]
    mask: np.ndarray  # bool (size, size), both lungs
    labels: np.ndarray  # float32 (len(LABELS),) multi-hot


def generate_set(n: int, seed: int, size: int = 256, start: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Samples start..start+n-1 stacked: images (n, size, size), masks (n, size, size), labels (n, 15)."""
    samples = [generate(start + i, seed, size) for i in range(n)]
    return (
        np.stack([s.image for s in samples]),
        np.stack([s.mask for s in samples]),
        np.stack([s.labels for s in samples]),
    )


def _noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: random cells x cells grid, cubic zoom to size."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return ndimage.zoom(grid, size / cells, order=1)[:size, :size] / 1.5


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def generate(index: int, seed: int, size: int = 256) -> Sample:
    """Sample `index` of the synthetic set `seed`."""
    rng = np.random.default_rng([seed, index])
    present = {lab: False for lab in LABELS}
    if rng.random() >= NORMAL_FRACTION:
        for lab in LABELS[:-1]:
            present[lab] = bool(rng.random() < PREVALENCE)
    lin = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    # small random pose: shift, scale, rotation
    ang = rng.uniform(-0.06, 0.06)
    scale = rng.uniform(0.9, 1.08)
    y0, x0 = rng.uniform(-0.05, 0.05, 2)
    gy, gx = np.meshgrid(lin, lin, indexing="ij")
    yy = ((gy - y0) * np.cos(ang) - (gx - x0) * np.sin(ang)) / scale
    xx = ((gy - y0) * np.sin(ang) + (gx - x0) * np.cos(ang)) / scale

    soft = rng.uniform(0.5, 0.65)
    img = np.full((size, size), rng.uniform(0.02, 0.12), np.float32)  # air
    body = _ellipse(yy, xx, 0.15, 0.0, 1.25, rng.uniform(0.82, 0.95))
    img[body] = soft
    # ribs: curved bands across the thorax
    phase = rng.uniform(0, 2 * np.pi)
    thorax = _ellipse(yy, xx, -0.05, 0.0, 0.75, 0.82)
    ribs = (np.sin((yy + 0.35 * xx**2) * rng.uniform(20, 26) + phase) > 0.55) & thorax & (np.abs(xx) > 0.08)
    # lungs
    emph = present["Emphysema"]
    ry = rng.uniform(0.42, 0.5) * (1.15 if emph else 1.0)
    lungs = []
    for side in (-1, 1):
        cx = side * rng.uniform(0.36, 0.42)
        cy = rng.uniform(-0.12, -0.04) + (0.04 if emph else 0.0)
        rx = rng.uniform(0.25, 0.3) * (1.1 if emph else 1.0)
        lung = _ellipse(yy, xx, cy, cx, ry * rng.uniform(0.95, 1.05), rx)
        lungs.append((lung, cy, cx, ry, rx))
    atel_side = int(rng.integers(2))
    if present["Atelectasis"]:  # volume loss: raised base
        lung, cy, cx, ry_, rx = lungs[atel_side]
        lung = lung & (yy < cy + ry_ * 0.55)
        lungs[atel_side] = (lung, cy, cx, ry_, rx)
    heart_rx = rng.uniform(0.24, 0.29) * (1.5 if present["Cardiomegaly"] else 1.0)
    heart = _ellipse(yy, xx, rng.uniform(0.2, 0.28), rng.uniform(0.06, 0.12), rng.uniform(0.2, 0.26), heart_rx)
    mediastinum = (np.abs(xx - 0.02) < rng.uniform(0.09, 0.13) - 0.03 * yy) & (yy > -0.9) & body
    mask = (lungs[0][0] | lungs[1][0]) & ~heart & ~mediastinum

    lung_val = rng.uniform(0.18, 0.3) - (0.08 if emph else 0.0)
    vessels = _noise(rng, size, 24) * (0.02 if emph else 0.06)
    gradient = np.clip(yy + 0.5, 0, 1.5) * 0.08  # bases brighter than apices
    img[mask] = (lung_val + vessels + gradient)[mask]
    img[mediastinum] = rng.uniform(0.72, 0.82)
    img[heart] = rng.uniform(0.72, 0.85)
    img[ribs] += rng.uniform(0.06, 0.12)

    def in_lung(k: int) -> np.ndarray:
        return lungs[k][0] & mask

    def blob(cy: float, cx: float, r: float, amount: float, sharp: float = 1.0) -> np.ndarray:
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r
        return (amount / (1 + np.exp(np.minimum((d - 1) * 8 * sharp, 50)))).astype(np.float32)

    def lung_point(k: int, low: float = -0.6, high: float = 0.6) -> tuple[float, float]:
        _, cy, cx, ry_, rx = lungs[k]
        return cy + rng.uniform(low, high) * ry_, cx + rng.uniform(-0.5, 0.5) * rx

    add = np.zeros_like(img)
    if present["Effusion"]:
        for k in ([0, 1] if rng.random() < 0.4 else [int(rng.integers(2))]):
            _, cy, cx, ry_, rx = lungs[k]
            level = cy + ry_ * rng.uniform(0.3, 0.55) - 0.25 * np.abs(xx - cx) * np.sign(xx * cx)
            add += np.where(in_lung(k) & (yy > level), 0.4, 0.0).astype(np.float32)
    if present["Consolidation"]:
        k = int(rng.integers(2))
        add += blob(*lung_point(k), rng.uniform(0.12, 0.18), 0.35, sharp=1.5) * in_lung(k)
    if present["Pneumonia"]:
        k = int(rng.integers(2))
        cy, cx = lung_point(k, 0.1, 0.6)
        patch = (_noise(rng, size, 40) > -0.1) * blob(cy, cx, rng.uniform(0.15, 0.22), 0.3, sharp=0.5)
        add += ndimage.gaussian_filter(patch, 1.5) * in_lung(k)
    if present["Infiltration"]:
        patches = np.clip(_noise(rng, size, 16) - 0.35, 0, None) * 0.35
        add += patches * mask
    if present["Edema"]:
        haze = sum(blob(rng.uniform(-0.05, 0.1), s * 0.22, 0.35, 0.25, sharp=0.3) for s in (-1, 1))
        add += haze * mask
    if present["Nodule"]:
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(2))
            add += blob(*lung_point(k), rng.uniform(0.025, 0.045), 0.35, sharp=2.0) * lungs[k][0]
    if present["Mass"]:
        k = int(rng.integers(2))
        add += blob(*lung_point(k, -0.4, 0.4), rng.uniform(0.09, 0.13), 0.4, sharp=2.0) * lungs[k][0]
    if present["Atelectasis"]:
        _, cy, cx, ry_, rx = lungs[atel_side]
        band = np.abs(yy - (cy + ry_ * rng.uniform(0.1, 0.35)) - 0.15 * (xx - cx)) < 0.025
        add += np.where(band & in_lung(atel_side), 0.3, 0.0).astype(np.float32)
    if present["Fibrosis"]:
        warp = _noise(rng, size, 12) * 0.6
        net = (np.abs(np.sin(xx * 45 + warp)) < 0.22) | (np.abs(np.sin(yy * 45 - warp)) < 0.22)
        zone = np.clip(yy + 0.1, 0, 1) + np.clip(np.abs(xx) - 0.3, 0, 1) * 2
        add += np.where(net & mask, 0.22, 0.0).astype(np.float32) * np.clip(zone * 1.5, 0, 1)
    if present["Pleural_Thickening"]:
        for k in ([0, 1] if rng.random() < 0.5 else [int(rng.integers(2))]):
            lung = in_lung(k)
            rim = lung & ~ndimage.binary_erosion(lung, iterations=max(2, size // 64))
            rim &= np.abs(xx) > np.abs(lungs[k][2])  # lateral side
            add += rim.astype(np.float32) * 0.35
    if present["Hernia"]:
        cy, cx, r = rng.uniform(0.25, 0.4), rng.uniform(-0.05, 0.1), rng.uniform(0.08, 0.11)
        bubble = _ellipse(yy, xx, cy, cx, r, r * 1.2)
        img[bubble & (yy < cy)] = rng.uniform(0.15, 0.25)
        img[bubble & (yy >= cy)] = rng.uniform(0.88, 0.95)
    img += ndimage.gaussian_filter(add, 0.8)
    if present["Pneumothorax"]:
        k = int(rng.integers(2))
        lung, cy, cx, ry_, rx = lungs[k]
        inner = _ellipse(yy, xx, cy + ry_ * 0.12, cx - np.sign(cx) * rx * 0.18, ry_ * 0.82, rx * 0.7)
        rim = in_lung(k) & ~inner
        img[rim] = rng.uniform(0.03, 0.1)
        edge = inner & ~ndimage.binary_erosion(inner, iterations=1) & lung
        img[edge] += 0.25

    img = ndimage.gaussian_filter(img, rng.uniform(0.6, 1.2))
    img += rng.normal(0, rng.uniform(0.01, 0.03), img.shape).astype(np.float32)
    gamma = rng.uniform(0.8, 1.25)
    img = np.clip(img, 0, 1) ** gamma
    labels = np.array([present[lab] for lab in LABELS], np.float32)
    labels[-1] = float(not labels[:-1].any())
    return Sample(image=img.astype(np.float32), mask=mask, labels=labels)


def write_dataset(out: Path, n_train: int, n_val: int, seed: int, size: int = 256) -> Path:
    """Write samples 0..n_train+n_val-1 as a generic-CSV data set the recipes read.

    Layout: images/NNNNNN.png (16-bit), masks/NNNNNN.png, labels.csv (path, mask, split, one
    column per label; the first n_train are `train`, the rest `val`) and dataset.json, whose
    `synthetic: true` makes `training export` mark any bundle trained on it as demo weights.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    with (out / "labels.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "mask", "split", *LABELS])
        for i in range(n_train + n_val):
            s = generate(i, seed, size)
            name = f"{i:06d}.png"
            Image.fromarray(np.round(s.image * 65535).astype(np.uint16)).save(out / "images" / name)
            Image.fromarray(s.mask.astype(np.uint8) * 255).save(out / "masks" / name)
            w.writerow([f"images/{name}", f"masks/{name}", "train" if i < n_train else "val",
                        *(int(v) for v in s.labels)])  # fmt: skip
    manifest = {
        "name": "synthetic", "synthetic": True, "generator": "training.synthetic", "seed": seed,
        "image_size": size,
        "train_images": n_train, "val_images": n_val,
        "source": "procedural chest-like radiographs, no patient data",
    }  # fmt: skip
    (out / "dataset.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return out
