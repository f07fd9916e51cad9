"""Validation metrics, threshold choice and the RSNA detection score (no scikit-learn).

Everything here works on probabilities (N,) or (N, L) and 0/1 targets: ROC-AUC and PR-AUC are
computed from the probabilities, never from hard labels. Hand-checked in
tests/unit/test_training_metrics.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "RSNA_IOU_THRESHOLDS",
    "average_precision",
    "binary_metrics",
    "calibration",
    "choose_threshold",
    "choose_thresholds",
    "confusion_matrix",
    "dice",
    "iou",
    "label_table",
    "roc_auc",
    "roc_auc_per_label",
    "roc_curve",
    "rsna_image_score",
    "rsna_score",
]

RSNA_IOU_THRESHOLDS = tuple(round(0.4 + 0.05 * i, 2) for i in range(8))  # 0.40 .. 0.75


def dice(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean Dice over a batch of (N, H, W) bool masks (1.0 when both are empty)."""
    scores = []
    for p, t in zip(pred, target, strict=True):
        denom = p.sum() + t.sum()
        scores.append(1.0 if denom == 0 else 2.0 * np.logical_and(p, t).sum() / denom)
    return float(np.mean(scores))


def _binary(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = np.asarray(probs, np.float64).ravel(), np.asarray(y).ravel() > 0.5
    if p.shape != t.shape:
        raise ValueError(f"{p.size} probabilities for {t.size} targets")
    return p, t


def roc_auc(probs: np.ndarray, y: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U).

    None when the targets hold one class only.
    """
    p, t = _binary(probs, y)
    pos, neg = p[t], p[~t]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum() if pos.size * neg.size <= 4e6 else None
    if greater is None:  # large sets: rank formula, average ranks for ties
        order = np.argsort(p, kind="mergesort")
        ranks = np.empty(p.size)
        sorted_p = p[order]
        _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
        avg = first + (counts + 1) / 2.0
        ranks[order] = np.repeat(avg, counts)
        return float((ranks[t].sum() - pos.size * (pos.size + 1) / 2) / (pos.size * neg.size))
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def roc_curve(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds): one point per distinct probability (descending), from (0, 0)."""
    p, t = _binary(probs, y)
    thresholds = np.unique(p)[::-1]
    pred = p[None, :] >= thresholds[:, None]
    tpr = pred[:, t].sum(1) / max(t.sum(), 1)
    fpr = pred[:, ~t].sum(1) / max((~t).sum(), 1)
    return np.r_[0.0, fpr], np.r_[0.0, tpr], np.r_[np.inf, thresholds]


def average_precision(probs: np.ndarray, y: np.ndarray) -> float | None:
    """PR-AUC as average precision: sum over thresholds of (R_n - R_(n-1)) * P_n."""
    p, t = _binary(probs, y)
    if not t.any():
        return None
    thresholds = np.unique(p)[::-1]
    pred = p[None, :] >= thresholds[:, None]
    tp = pred[:, t].sum(1)
    precision = tp / pred.sum(1)
    recall = tp / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def choose_threshold(probs: np.ndarray, y: np.ndarray, rule: str = "youden", default: float = 0.5) -> float:
    """The probability that maximises Youden's J (TPR - FPR) or F1 on validation data.

    `default` when the targets hold one class only; clipped to [0.01, 0.99].
    """
    p, t = _binary(probs, y)
    if t.all() or not t.any():
        return default
    candidates = np.unique(p)
    pred = p[None, :] >= candidates[:, None]
    tp, fp = pred[:, t].sum(1), pred[:, ~t].sum(1)
    if rule == "youden":
        score = tp / t.sum() - fp / (~t).sum()
    elif rule == "f1":
        score = 2 * tp / (2 * tp + fp + (t.sum() - tp))
    else:
        raise ValueError(f"threshold rule must be 'youden' or 'f1', not {rule!r}")
    return round(float(np.clip(candidates[int(np.argmax(score))], 0.01, 0.99)), 4)


def choose_thresholds(probs: np.ndarray, labels: np.ndarray, default: float = 0.5, rule: str = "youden") -> list[float]:
    """`choose_threshold` per column of (N, L)."""
    return [choose_threshold(probs[:, j], labels[:, j], rule, default) for j in range(labels.shape[1])]


def roc_auc_per_label(probs: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """ROC-AUC per column of (N, L), rounded to 4 places; None where a label has one class only."""
    out = []
    for j in range(labels.shape[1]):
        auc = roc_auc(probs[:, j], labels[:, j])
        out.append(None if auc is None else round(auc, 4))
    return out


def confusion_matrix(true: Sequence[int] | np.ndarray, pred: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """(n, n) counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n, n), np.int64)
    np.add.at(cm, (np.asarray(true, np.int64), np.asarray(pred, np.int64)), 1)
    return cm


def _ratio(a: float, b: float) -> float | None:
    return None if b == 0 else float(a / b)


def binary_metrics(probs: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts and rates at `threshold` (positive when probability >= threshold), plus AUCs."""
    p, t = _binary(probs, y)
    pred = p >= threshold
    tp, fp = int((pred & t).sum()), int((pred & ~t).sum())
    fn, tn = int((~pred & t).sum()), int((~pred & ~t).sum())
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    return {
        "n": int(t.size), "positives": int(t.sum()), "threshold": float(threshold),
        "tp": tp, "fp": fp, "fn": fn, "tn": tn,
        "accuracy": _ratio(tp + tn, t.size), "precision": precision, "recall": recall,
        "sensitivity": recall, "specificity": _ratio(tn, tn + fp), "f1": f1,
        "roc_auc": roc_auc(p, t), "pr_auc": average_precision(p, t),
    }  # fmt: skip


def calibration(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Expected calibration error over equal-width bins and the reliability diagram's bins.

    ECE = sum over bins of (count / N) * |mean probability - fraction positive|; the last bin
    includes 1.0.
    """
    p, t = _binary(probs, y)
    which = np.minimum((p * bins).astype(np.int64), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        n = int(sel.sum())
        row: dict[str, Any] = {"low": b / bins, "high": (b + 1) / bins, "count": n,
                               "mean_probability": None, "fraction_positive": None}  # fmt: skip
        if n:
            mp, fp = float(p[sel].mean()), float(t[sel].mean())
            row.update(mean_probability=mp, fraction_positive=fp)
            ece += n / p.size * abs(mp - fp)
        table.append(row)
    return {"ece": ece, "bins": table}


def label_table(probs: np.ndarray, labels: np.ndarray, thresholds: Sequence[float], names: Sequence[str]) -> list[dict[str, Any]]:
    """One row of `binary_metrics` + ECE per label of (N, L) probabilities."""
    return [
        {"label": name, **binary_metrics(probs[:, j], labels[:, j], thresholds[j]),
         "ece": calibration(probs[:, j], labels[:, j])["ece"]}
        for j, name in enumerate(names)
    ]  # fmt: skip


# ---- RSNA Pneumonia Detection score ---------------------------------------------------------


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    ax0, ay0, aw, ah = a
    bx0, by0, bw, bh = b
    iw = max(0.0, min(ax0 + aw, bx0 + bw) - max(ax0, bx0))
    ih = max(0.0, min(ay0 + ah, by0 + bh) - max(ay0, by0))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return 0.0 if union <= 0 else inter / union


def rsna_image_score(
    pred_boxes: Sequence[Sequence[float]], scores: Sequence[float], true_boxes: Sequence[Sequence[float]],
    thresholds: Sequence[float] = RSNA_IOU_THRESHOLDS,
) -> float | None:  # fmt: skip
    """One image's score: mean over IoU thresholds t of TP / (TP + FP + FN).

    Predictions are matched in descending score order, each to the unmatched true box of
    highest IoU, a hit when IoU > t. No true boxes and no predictions: None (the image does
    not count); no true boxes but predictions: 0.
    """
    if not true_boxes and not pred_boxes:
        return None
    if not true_boxes or not pred_boxes:
        return 0.0
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    ious = np.array([[iou(pred_boxes[i], g) for g in true_boxes] for i in order])
    precisions = []
    for t in thresholds:
        free = np.ones(len(true_boxes), bool)
        tp = 0
        for row in ious:
            cand = np.where(free, row, -1.0)
            j = int(np.argmax(cand))
            if cand[j] > t:
                free[j] = False
                tp += 1
        fp, fn = len(pred_boxes) - tp, len(true_boxes) - tp
        precisions.append(tp / (tp + fp + fn))
    return float(np.mean(precisions))


def rsna_score(
    predictions: Sequence[tuple[Sequence[Sequence[float]], Sequence[float]]],
    truths: Sequence[Sequence[Sequence[float]]],
) -> float | None:  # fmt: skip
    """Mean of `rsna_image_score` over the images that count (None if none count)."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions for {len(truths)} images")
    per = [rsna_image_score(b, s, g) for (b, s), g in zip(predictions, truths, strict=True)]
    kept = [v for v in per if v is not None]
    return float(np.mean(kept)) if kept else None
