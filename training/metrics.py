"""Validation metrics and threshold choice (no scikit-learn: MONAI's ROC-AUC)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_roc_auc

__all__ = ["choose_thresholds", "dice", "roc_auc_per_label"]


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean Dice over a batch of (N, H, W) bool masks (1.0 when both are empty)."""
    scores = []
    for p, t in zip(pred, target, strict=True):
        denom = p.sum() + t.sum()
        scores.append(1.0 if denom == 0 else 2.0 * np.logical_and(p, t).sum() / denom)
    return float(np.mean(scores))


def roc_auc_per_label(probs: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """ROC-AUC per column of (N, L); None where a label has only one class in the split."""
    out: list[float | None] = []
    for j in range(labels.shape[1]):
        y = labels[:, j]
        if y.min() == y.max():
            out.append(None)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc = float(np.asarray(compute_roc_auc(torch.from_numpy(probs[:, j]), torch.from_numpy(y))))
        out.append(None if math.isnan(auc) else round(auc, 4))
    return out


def choose_thresholds(probs: np.ndarray, labels: np.ndarray, default: float = 0.5) -> list[float]:
    """Per label, the probability that maximises Youden's J (TPR - FPR) on validation data.

    Labels without both classes in the split keep `default`.
    """
    out = []
    for j in range(labels.shape[1]):
        p, y = probs[:, j], labels[:, j] > 0.5
        if y.all() or not y.any():
            out.append(default)
            continue
        candidates = np.unique(p)
        tpr = (p[None, :] >= candidates[:, None])[:, y].mean(axis=1)
        fpr = (p[None, :] >= candidates[:, None])[:, ~y].mean(axis=1)
        best = candidates[int(np.argmax(tpr - fpr))]
        out.append(round(float(np.clip(best, 0.01, 0.99)), 4))
    return out
