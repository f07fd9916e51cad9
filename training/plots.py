"""ROC and confusion-matrix PNGs drawn with Pillow (matplotlib is not a dependency)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["confusion_png", "roc_png"]

_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]  # fmt: skip


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
