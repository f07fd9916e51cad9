"""Validation metrics and threshold choice."""

from __future__ import annotations

import numpy as np

from training.metrics import choose_thresholds, dice, roc_auc_per_label


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
