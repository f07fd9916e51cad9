"""ROC, confusion-matrix and Grad-CAM PNGs drawn with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["confusion_png", "gradcam_png", "roc_png"]

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip
# heatmap colours, cold to hot ("jet"): dark blue, blue, cyan, yellow, red, dark red
_JET = np.array([(0, 0, 128), (0, 0, 255), (0, 255, 255), (255, 255, 0), (255, 0, 0), (128, 0, 0)], np.float32)


def roc_png(curves: dict[str, tuple[np.ndarray, np.ndarray, float | None]], path: Path, size: int = 480) -> Path:
    """ROC curves {label: (fpr, tpr, auc)} on one plot with a legend; returns path."""
    margin, legend_h = 40, 14 * len(curves) + 8
    img = Image.new("RGB", (size, size + legend_h), "white")
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = margin, 10, size - 10, size - margin
    d.rectangle((x0, y0, x1, y1), outline="black")
    d.line((x0, y1, x1, y0), fill=(180, 180, 180))  # chance
    for v in (0, 0.5, 1):
        d.text((x0 + v * (x1 - x0) - 6, y1 + 4), f"{v:g}", fill="black")
        d.text((6, y1 - v * (y1 - y0) - 6), f"{v:g}", fill="black")
    d.text(((x0 + x1) // 2 - 60, y1 + 20), "false positive rate", fill="black")
    for i, (label, (fpr, tpr, auc)) in enumerate(curves.items()):
        color = _COLORS[i % len(_COLORS)]
        pts = [(x0 + f * (x1 - x0), y1 - t * (y1 - y0)) for f, t in zip(fpr, tpr, strict=True)]
        if len(pts) > 1 and auc is not None:  # one class only: no curve to draw
            d.line(pts, fill=color, width=2)
        auc_text = "n/a" if auc is None else f"{auc:.3f}"
        d.text((x0, size + 2 + 14 * i), f"{label}  AUC {auc_text}", fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def confusion_png(cm: np.ndarray, labels: Sequence[str], path: Path, cell: int = 90) -> Path:
    """Confusion matrix (rows true, columns predicted) as a shaded grid with counts."""
    n = len(labels)
    left, top = 150, 40
    img = Image.new("RGB", (left + n * cell + 10, top + n * cell + 10), "white")
    d = ImageDraw.Draw(img)
    d.text((left, 4), "predicted ->   (rows: true)", fill="black")
    peak = max(int(cm.max()), 1)
    for i in range(n):
        d.text((4, top + i * cell + cell // 2 - 6), str(labels[i])[:22], fill="black")
        d.text((left + i * cell + 4, top - 16), str(labels[i])[:12], fill="black")
        for j in range(n):
            shade = int(255 - 200 * cm[i, j] / peak)
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell, top + (i + 1) * cell)
            d.rectangle(box, fill=(shade, shade, 255), outline="black")
            d.text((box[0] + cell // 2 - 8, box[1] + cell // 2 - 6), str(int(cm[i, j])), fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def gradcam_png(panels: Sequence[tuple[np.ndarray, np.ndarray, str]], path: Path, cell: int = 256) -> Path:
    """Panels side by side: each (H, W) image in [0, 1] with its (H, W) heatmap in [0, 1] overlaid
    in "jet" colours (the hotter, the more opaque), under its title (lines split by newlines)."""
    title_h = 32
    img = Image.new("RGB", (len(panels) * (cell + 8) + 8, cell + title_h + 8), "white")
    d = ImageDraw.Draw(img)
    stops = np.linspace(0, 1, len(_JET))
    for k, (image, heat, title) in enumerate(panels):
        gray = np.clip(np.asarray(image, np.float32), 0, 1)[..., None] * 255
        h = np.clip(np.nan_to_num(np.asarray(heat, np.float32)), 0, 1)
        color = np.stack([np.interp(h, stops, _JET[:, c]) for c in range(3)], axis=-1)
        alpha = 0.6 * h[..., None]  # cold regions show the radiograph
        rgb = (gray * (1 - alpha) + color * alpha).round().astype(np.uint8)
        x0 = 8 + k * (cell + 8)
        img.paste(Image.fromarray(rgb).resize((cell, cell), Image.Resampling.BILINEAR), (x0, title_h))
        for i, line in enumerate(title.splitlines()[:2]):
            d.text((x0, 2 + 14 * i), line[: cell // 6], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
