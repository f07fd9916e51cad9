"""pipelines.base.Heatmap: a coarse map resized into a window of the image, read whole or on a grid."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.base import Heatmap

CASES = [  # (source shape, window y0 y1 x0 x1, grid shape)
    ((1955, 1841), (150, 1800, 120, 1700), (7, 7)),  # a Grad-CAM on RG1's lung crop
    ((600, 900), (0, 600, 0, 900), (7, 7)),
    ((300, 200), (10, 290, 5, 100), (16, 9)),
    ((50, 40), (0, 50, 0, 40), (100, 80)),  # a grid finer than the window: shrunk
    ((64, 64), (3, 20, 4, 60), (17, 56)),
]


def _torch_bilinear(
    grid: np.ndarray, window: tuple[int, int, int, int], shape: tuple[int, int]
) -> np.ndarray:
    """What the pipeline did before Heatmap: F.interpolate into the window, zeros outside."""
    y0, y1, x0, x1 = window
    out = np.zeros(shape, np.float32)
    up = F.interpolate(torch.from_numpy(grid)[None, None], size=(y1 - y0, x1 - x0), mode="bilinear",
                       align_corners=False)  # fmt: skip
    out[y0:y1, x0:x1] = up[0, 0].clamp(0, 1).numpy()
    return out


@pytest.mark.parametrize(("shape", "window", "grid_shape"), CASES)
def test_whole_array_is_torch_bilinear_resize_into_the_window(shape, window, grid_shape) -> None:
    grid = np.random.default_rng(sum(shape)).random(grid_shape).astype(np.float32)
    heat = Heatmap(grid, shape, window)
    full = np.asarray(heat)
    assert full.dtype == np.float32 and full.shape == shape == heat.shape
    np.testing.assert_allclose(full, _torch_bilinear(grid, window, shape), atol=2e-6, rtol=0)
    y0, y1, x0, x1 = window
    outside = np.ones(shape, bool)
    outside[y0:y1, x0:x1] = False
    assert not full[outside].any()


@pytest.mark.parametrize(("shape", "window", "grid_shape"), CASES)
def test_reading_on_a_grid_equals_indexing_the_whole_array(shape, window, grid_shape) -> None:
    rng = np.random.default_rng(len(grid_shape) + shape[0])
    heat = Heatmap(rng.random(grid_shape), shape, window)
    full = np.asarray(heat)
    for rows, cols in [(np.arange(0, shape[0], 8), np.arange(0, shape[1], 8)),
                       (rng.integers(0, shape[0], 37), rng.integers(0, shape[1], 23))]:  # fmt: skip
        got = heat.at(rows, cols)
        assert got.dtype == np.float32 and got.shape == (rows.size, cols.size)
        np.testing.assert_allclose(got, full[np.ix_(rows, cols)], atol=1e-6, rtol=0)


def test_a_full_resolution_grid_is_read_as_it_is() -> None:
    grid = np.random.default_rng(1).random((30, 20)).astype(np.float32)
    heat = Heatmap(grid, (50, 40), (10, 40, 5, 25))
    full = np.asarray(heat)
    assert np.array_equal(full[10:40, 5:25], grid) and full.sum() == pytest.approx(
        grid.sum(), rel=1e-6
    )
    assert np.array_equal(np.asarray(Heatmap(grid, (30, 20))), grid)  # no window: the whole image


@pytest.mark.parametrize(("grid", "window"), [
    (np.zeros((7, 7)), (0, 0, 0, 10)),  # empty window
    (np.zeros((7, 7)), (0, 11, 0, 10)),  # past the last row
    (np.zeros((7, 7)), (-1, 5, 0, 10)),
    (np.zeros((0, 7)), None),
    (np.zeros(7), None),
])  # fmt: skip
def test_a_grid_or_window_that_does_not_fit_is_refused(grid: np.ndarray, window) -> None:
    with pytest.raises(ValueError, match="grid|window"):
        Heatmap(grid, (10, 10), window)
