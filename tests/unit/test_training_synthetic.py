"""Synthetic radiographs: deterministic, sane ranges, label patterns visible."""

from __future__ import annotations

import numpy as np

from training.synthetic import LABELS, generate, generate_set


def test_deterministic_and_well_formed() -> None:
    a, b = generate(3, seed=1, size=128), generate(3, seed=1, size=128)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, generate(4, seed=1, size=128).image)
    assert a.image.dtype == np.float32 and a.image.shape == (128, 128)
    assert 0 <= a.image.min() and a.image.max() <= 1
    assert a.mask.dtype == bool and 0.1 < a.mask.mean() < 0.5
    assert len(LABELS) == 15 and a.labels.shape == (15,)


def test_no_finding_iff_no_pathology() -> None:
    _, _, labels = generate_set(60, seed=2, size=64)
    assert np.array_equal(labels[:, -1] == 1, labels[:, :-1].sum(1) == 0)
    assert 0.2 < labels[:, -1].mean() < 0.8


def test_lungs_darker_than_mediastinum() -> None:
    normal = [s for s in (generate(i, seed=5) for i in range(10)) if s.labels[-1]]
    assert normal
    for s in normal:
        centre = s.image[60:200, 120:136]
        assert s.image[s.mask].mean() < centre.mean() - 0.1


def _heart_width(img: np.ndarray) -> int:
    row = img[180] > 0.65  # bright run around the heart, below the lungs' middle
    mid = img.shape[1] // 2
    left, right = mid, mid
    while left > 0 and row[left - 1]:
        left -= 1
    while right < len(row) - 1 and row[right + 1]:
        right += 1
    return right - left


def test_cardiomegaly_widens_heart() -> None:
    # same seed with and without the label: the heart is wider with it
    idx = next(i for i in range(200) if generate(i, seed=7, size=64).labels[LABELS.index("Cardiomegaly")])
    with_label = generate(idx, seed=7)
    widths = [_heart_width(generate(i, seed=7).image) for i in range(idx + 1, idx + 9)]
    assert _heart_width(with_label.image) > np.median(widths)
