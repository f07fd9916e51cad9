"""What every pipeline returns: findings, named regions, heatmaps per finding and boxes, in source
geometry. No DICOM writing here."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydicom import Dataset

DEMO_DISCLAIMER = "demo model trained on synthetic data: not for clinical use"


@dataclass(frozen=True)
class ModelInfo:
    """Identity of the algorithm, read from the model bundle (never hard-coded)."""

    name: str  # e.g. "pacsnode chest_xray"
    version: str  # bundle version, e.g. "0.1.0"
    manufacturer: str
    device_uid: str  # DICOM UID that changes whenever the model is retrained
    demo: bool  # True while demo weights trained on synthetic data are in use
    # sha256 of the bundle's metadata (labels, thresholds, preprocessing, sizes): what shapes the
    # results besides the weights, and may be edited in place without a new version
    settings_sha256: str
    description: str = ""

    @property
    def disclaimer(self) -> str | None:
        return DEMO_DISCLAIMER if self.demo else None

    @property
    def identity(self) -> tuple[str, str, str]:
        """What makes this model's results what they are: version, weights and settings. Result
        UIDs and kept network outputs are keyed by it, so a threshold edited in the bundle gives
        new objects (a replay's SR then supersedes the old one), never other bytes under old UIDs."""
        return self.version, self.device_uid, self.settings_sha256


@dataclass(frozen=True)
class Finding:
    """One classifier output: probability and the decision at the bundle's threshold."""

    label: str
    probability: float
    threshold: float

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


Crop = tuple[int, int, int, int]  # a crop window: y0, y1, x0, x1 (half-open), in source pixels

#: What a pipeline's networks computed for one image, at the networks' own resolution (a
#: 256 px mask, a 7 x 7 CAM, the probabilities): named arrays, small enough to keep with the job.
#: Networks may give slightly different numbers with another thread count or batch size; what
#: follows them (resizing, thresholds, drawing) does not. So a pipeline given these again
#: (`run(..., saved=...)`) returns the same result, bit for bit, without running its networks.
ModelOutputs = dict[str, np.ndarray]


@dataclass(frozen=True)
class Box:
    """One detection: an axis-aligned rectangle in source pixels, its label and score.

    Corners are pixel edges, DICOM's sub-pixel convention (the top left corner of the top left
    pixel is (0, 0)): x along the columns, y along the rows, x0 < x1 <= Columns, y0 < y1 <= Rows.
    This is the only box convention of a result; detectors convert to it.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    label: str  # what was detected, e.g. "Lung Opacity" (coded by the writers)
    score: float  # in [0, 1]

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0


def linear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of linear resizing from n_in to n_out samples, half-pixel centres
    (PyTorch's and OpenCV's "bilinear", align_corners=False, no antialiasing): row o mixes the
    two inputs either side of o's centre, edges clamped."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    w = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    w[rows, i0] = 1.0 - frac
    w[rows, i1] += frac  # at the last input i1 == i0: the two taps add up to 1 there
    return w


class Heatmap:
    """A finding's heatmap over the source image, (Rows, Columns) float32 in [0, 1]: a coarse map
    (a Grad-CAM is 7 x 7) resized bilinearly into a window of the image, zero outside it.

    Kept coarse because the whole array is large (16 MB per finding of a 2000 px radiograph, a
    dozen findings per image) and no writer needs it whole: they read it on a grid (`at`).
    `np.asarray(heatmap)` gives the whole array.
    """

    dtype = np.dtype(np.float32)

    def __init__(self, grid: np.ndarray, shape: tuple[int, int], window: Sequence[int] | None = None) -> None:
        """grid: (h, w) values in [0, 1]; shape: the source's (Rows, Columns); window: (y0, y1,
        x0, x1) that the grid covers, in source pixels (None: the whole image)."""
        grid = np.asarray(grid, np.float32)
        rows, cols = (int(v) for v in shape)
        y0, y1, x0, x1 = (int(v) for v in window) if window is not None else (0, rows, 0, cols)
        if grid.ndim != 2 or 0 in grid.shape:
            raise ValueError(f"a heatmap grid is a non-empty 2-D array, not shape {grid.shape}")
        if not (0 <= y0 < y1 <= rows and 0 <= x0 < x1 <= cols):
            raise ValueError(f"window {(y0, y1, x0, x1)} is not inside an image of shape {(rows, cols)}")
        self.grid = grid
        self.shape = (rows, cols)
        self.window = (y0, y1, x0, x1)

    def at(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The heatmap's values at the given source rows and columns: float32 (len(rows),
        len(cols)), equal to np.asarray(self)[np.ix_(rows, cols)] without making the whole array."""
        y0, y1, x0, x1 = self.window
        h, w = self.grid.shape
        rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
        if (y1 - y0, x1 - x0) == (h, w):  # the grid is the window at full resolution: no resizing
            inside_r, inside_c = (rows >= y0) & (rows < y1), (cols >= x0) & (cols < x1)
            out = np.zeros((rows.size, cols.size), np.float32)
            out[np.ix_(inside_r, inside_c)] = self.grid[np.ix_(rows[inside_r] - y0, cols[inside_c] - x0)]
            return out
        # separable: value = Wy @ grid @ Wx.T, with zero weights for rows and columns outside the
        # window; the small product in float64, the large one (a value per pixel asked for) in
        # float32. einsum, not matmul: with matmul here the SR's queue-and-send stage measured
        # 38-47 ms against 28-29 (OpenBLAS's threads, woken by a product this size, spin on after
        # it; with one OpenBLAS thread the overlay's timing jitter went away).
        wy, wx = self._weights(rows, y0, y1, h), self._weights(cols, x0, x1, w)
        small = np.einsum("rh,hw->rw", wy, self.grid.astype(np.float64)).astype(np.float32)
        out = np.einsum("rw,wc->rc", small, np.ascontiguousarray(wx.T, np.float32))  # c innermost: vectorised
        return np.clip(out, 0.0, 1.0, out=out)

    @staticmethod
    def _weights(index: np.ndarray, lo: int, hi: int, n_in: int) -> np.ndarray:
        inside = (index >= lo) & (index < hi)
        w = np.zeros((index.size, n_in), np.float64)
        w[inside] = linear_weights(n_in, hi - lo)[index[inside] - lo]
        return w

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        full = self.at(np.arange(self.shape[0]), np.arange(self.shape[1]))
        return full if dtype is None else full.astype(dtype)

    def __repr__(self) -> str:
        return f"Heatmap(grid {self.grid.shape}, window {self.window}, shape {self.shape})"


@dataclass
class PipelineResult:
    """What every pipeline returns for one source image. No DICOM here: the writers code it.

    Every array has the source image's shape (Rows, Columns):
    - `regions`: named masks (bool), e.g. {"lungs": mask}; the writers turn names into codes
      (node/writers/codes.py), so a new region needs a code there.
    - `heatmaps`: per finding label, a `Heatmap` (float32 in [0, 1], the finding's Grad-CAM, kept
      coarse); a pipeline gives one for each finding it localises (chest_xray: every finding
      above its threshold).
    - `boxes`: detections, empty when the pipeline has no detector.
    - `outputs`: what the networks computed for this image (see `ModelOutputs`).
    """

    findings: list[Finding]
    display: np.ndarray  # float32 in [0, 1], (rows, cols): the image as a viewer shows it
    regions: dict[str, np.ndarray] = field(default_factory=dict)
    heatmaps: dict[str, Heatmap] = field(default_factory=dict)
    boxes: list[Box] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    outputs: ModelOutputs = field(default_factory=dict)

    def top(self, n: int = 3) -> list[Finding]:
        return sorted(self.findings, key=lambda f: f.probability, reverse=True)[:n]

    def finding(self, label: str) -> Finding:
        """The finding with this label (KeyError naming the labels when there is none)."""
        for f in self.findings:
            if f.label == label:
                return f
        raise KeyError(f"no finding {label!r}; findings: {[f.label for f in self.findings]}")


class InputError(ValueError):
    """The image cannot be processed by this pipeline (permanent: do not retry)."""


class Pipeline(Protocol):
    """A loaded pipeline. Models are loaded once in the constructor, not per call."""

    id: str
    model: ModelInfo

    def run(self, datasets: Sequence[Dataset], saved: Sequence[ModelOutputs] | None = None) -> list[PipelineResult]:
        """Process a batch of single-frame images (pixel data not yet decoded).

        `saved`: each image's `outputs` from an earlier run of this model; the networks are not
        run and the results equal that run's."""
        ...


def merge_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `over` applied (nested mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge_settings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
