"""Validation metrics and threshold choice."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    RSNA_IOU_THRESHOLDS,
    average_precision,
    binary_metrics,
    calibration,
    choose_threshold,
    choose_thresholds,
    confusion_matrix,
    dice,
    iou,
    label_table,
    roc_auc,
    roc_auc_per_label,
    roc_curve,
    rsna_image_score,
    rsna_score,
)


def test_dice() -> None:
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2], b[0, :2] = True, True  # identical
    a[1, :2], b[1, 1:3] = True, True  # half overlap
    assert dice(a, b) == (1.0 + 0.5) / 2


def test_roc_auc_and_thresholds() -> None:
    probs = np.array([[0.1, 0.5], [0.4, 0.5], [0.35, 0.5], [0.8, 0.5]], np.float32)
    labels = np.array([[0, 1], [0, 1], [1, 1], [1, 1]], np.float32)
    aucs = roc_auc_per_label(probs, labels)
    assert aucs[0] == 0.75 and aucs[1] is None  # second label has one class only
    thresholds = choose_thresholds(probs, labels)
    assert thresholds == [0.35, 0.5]


# fixed example: 4 negatives, 4 positives. Sorted by probability:
# 0.9 P, 0.8 N, 0.7 P, 0.65 P, 0.4 N, 0.35 N, 0.3 P, 0.1 N
Y8 = np.array([0, 0, 0, 0, 1, 1, 1, 1])
P8 = np.array([0.1, 0.4, 0.35, 0.8, 0.9, 0.65, 0.3, 0.7])


def test_auc_by_hand() -> None:
    # positive-negative pairs won: 0.9 -> 4, 0.7 -> 3, 0.65 -> 3, 0.3 -> 1: 11 of 16
    assert roc_auc(P8, Y8) == pytest.approx(11 / 16)
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5  # a tie is worth one half
    assert roc_auc(P8, np.ones(8)) is None
    # hard labels lose information: AUC from 0/1 predictions at 0.5 is 0.75, not 0.6875
    assert roc_auc((P8 >= 0.5).astype(float), Y8) == 0.75
    fpr, tpr, _ = roc_curve(P8, Y8)
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(11 / 16)
    assert list(fpr[:3]) == [0, 0, 0.25] and list(tpr[:3]) == [0, 0.25, 0.25]


def test_average_precision_by_hand() -> None:
    # precision at each positive in rank order: 1/1, 2/3, 3/4, 4/7
    assert average_precision(P8, Y8) == pytest.approx((1 + 2 / 3 + 3 / 4 + 4 / 7) / 4)


def test_binary_metrics_at_threshold() -> None:
    m = binary_metrics(P8, Y8, 0.5)  # predicted positive: 0.9, 0.8, 0.7, 0.65
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (3, 1, 1, 3)
    for key in ("accuracy", "precision", "recall", "sensitivity", "specificity", "f1"):
        assert m[key] == 0.75, key
    assert m["roc_auc"] == pytest.approx(0.6875)
    m = binary_metrics(P8, Y8, 0.3)  # TP 4, FP 3
    assert m["precision"] == pytest.approx(4 / 7) and m["f1"] == pytest.approx(8 / 11) and m["specificity"] == 0.25


def test_thresholds_youden_and_f1() -> None:
    # J: 0.65 -> 3/4 - 1/4 = 0.5 (best); F1: 0.65 -> 0.75 beats 0.3 -> 8/11
    assert choose_threshold(P8, Y8, "youden") == 0.65
    assert choose_threshold(P8, Y8, "f1") == 0.65
    assert choose_threshold(P8[:3], Y8[:3]) == 0.5  # one class only: the default
    with pytest.raises(ValueError, match="threshold rule must be"):
        choose_threshold(P8, Y8, "max")


def test_confusion_and_calibration() -> None:
    cm = confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 2, 0], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    cal = calibration(P8, Y8, bins=2)
    # [0, .5): 0.1 0.4 0.35 0.3 mean 0.2875, 1/4 positive; [.5, 1]: mean 0.7625, 3/4 positive
    assert [b["count"] for b in cal["bins"]] == [4, 4]
    assert cal["ece"] == pytest.approx(0.5 * 0.0375 + 0.5 * 0.0125)
    rows = label_table(np.stack([P8, P8], 1), np.stack([Y8, Y8], 1), [0.5, 0.3], ["a", "b"])
    assert rows[0]["label"] == "a" and rows[0]["f1"] == 0.75 and rows[1]["tp"] == 4


def test_rsna_score_by_hand() -> None:
    assert iou((0, 0, 10, 10), (0, 0, 10, 5)) == 0.5
    assert RSNA_IOU_THRESHOLDS == (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)
    # IoU 0.5 is a hit at t = 0.40 and 0.45 only (hit means IoU > t): 2 of 8 thresholds
    assert rsna_image_score([(0, 0, 10, 10 / 2)], [0.9], [(0, 0, 10, 10)]) == 0.25
    # perfect box + a false positive: TP 1, FP 1 at every threshold -> 1/2
    assert rsna_image_score([(0, 0, 10, 10), (50, 50, 5, 5)], [0.9, 0.8], [(0, 0, 10, 10)]) == 0.5
    # matching goes by score: for t < 0.5 the 0.9 box (IoU 0.5) takes the true box and the
    # exact 0.1 box is a FP; for t >= 0.5 the 0.9 box misses and the 0.1 box hits: TP 1, FP 1
    two = rsna_image_score([(0, 0, 10, 5), (0, 0, 10, 10)], [0.9, 0.1], [(0, 0, 10, 10)])
    assert two == 0.5
    # two true boxes, one found exactly, one missed: TP 1, FN 1 -> 1/2
    assert rsna_image_score([(0, 0, 10, 10)], [0.9], [(0, 0, 10, 10), (30, 30, 5, 5)]) == 0.5
    assert rsna_image_score([], [], []) is None and rsna_image_score([(0, 0, 1, 1)], [0.5], []) == 0.0
    assert rsna_score([([], []), ([(0, 0, 10, 10)], [1.0]), ([(0, 0, 1, 1)], [0.5])],
                      [[], [(0, 0, 10, 10)], []]) == 0.5  # fmt: skip
