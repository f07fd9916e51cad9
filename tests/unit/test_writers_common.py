import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage.measure import approximate_polygon, find_contours
from writers_data import fake_result

from node.writers._common import HOT_LEVEL, mask_outlines, simplify


def _blobs(seed: int, size: int = 256, sigma: float = 6.0) -> np.ndarray:
    """Irregular blobs with holes, spurs and one-pixel necks: smoothed noise, thresholded."""
    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.standard_normal((size, size)), sigma) > 0.02


def _contours() -> list[np.ndarray]:
    result = fake_result(512, 480)
    masks = [result.regions["lungs"][::2, ::2], *(np.asarray(h)[::2, ::2] >= HOT_LEVEL for h in result.heatmaps.values())]
    masks += [_blobs(seed, size=160) for seed in range(4)] + [_blobs(seed, size=128, sigma=1.5) for seed in range(2)]
    return [c for m in masks for c in find_contours(np.pad(m, 1).astype(np.uint8), 0.5)]


def _distance_to_polyline(points: np.ndarray, polyline: np.ndarray) -> np.ndarray:
    """Each point's distance to the nearest segment of ``polyline``."""
    a, b = polyline[:-1][None], polyline[1:][None]
    p = points[:, None]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
    return np.linalg.norm(p - (a + t[..., None] * ab), axis=-1).min(axis=1)


@pytest.mark.parametrize("tolerance", [0.5, 1.5, 4.0])
def test_simplify_is_douglas_peucker_as_skimage_has_it(tolerance):
    """Every point of the contour stays within the tolerance, the kept points are the contour's
    own in order with both ends, and they are skimage's approximate_polygon's but where two
    points are equally far from a chord (common on a pixel grid: the two round the distances
    differently, and either may be kept). On these contours up to 16% differ by such a choice, and
    the totals kept differ by under 0.2%."""
    contours = _contours()
    assert len(contours) > 50 and max(len(c) for c in contours) > 500
    same, kept = 0, [0, 0]
    for contour in contours:
        ours, theirs = simplify(contour, tolerance), approximate_polygon(contour, tolerance)
        assert _distance_to_polyline(contour, ours).max() <= tolerance + 1e-9
        np.testing.assert_array_equal(ours[[0, -1]], contour[[0, -1]])
        at = 0  # each kept point is the contour's, after the one kept before it
        for point in ours[1:]:
            at += 1 + int(np.flatnonzero((contour[at + 1:] == point).all(axis=1))[0])
        same += np.array_equal(ours, theirs)
        kept[0] += len(ours)
        kept[1] += len(theirs)
    assert same >= 0.8 * len(contours)
    assert abs(kept[0] - kept[1]) <= 0.01 * kept[1]


def test_simplify_drops_the_inner_points_of_straight_runs():
    square = np.array([(0, 0), (0, 1), (0, 2), (0, 3), (1, 3), (2, 3), (3, 3), (3, 0), (0, 0)], dtype=float)
    np.testing.assert_array_equal(simplify(square, 0.1), square[[0, 3, 6, 7, 8]])


def test_mask_outlines_are_closed_and_inside_the_image():
    mask = _blobs(1, size=700)
    outlines = mask_outlines(mask)
    assert len(outlines) > 3
    for outline in outlines:
        assert outline.dtype == np.float32 and np.array_equal(outline[0], outline[-1])
        assert outline.min() >= 0.5 and outline[:, 0].max() <= 699.5 and outline[:, 1].max() <= 699.5
