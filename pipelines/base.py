"""What every pipeline returns: findings, masks and heatmaps in source geometry. No DICOM writing here."""

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
    description: str = ""

    @property
    def disclaimer(self) -> str | None:
        return DEMO_DISCLAIMER if self.demo else None


@dataclass(frozen=True)
class Finding:
    """One classifier output: probability and the decision at the bundle's threshold."""

    label: str
    probability: float
    threshold: float

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold


@dataclass
class PipelineResult:
    """Result for one source image. Arrays have the source image's shape (Rows, Columns)."""

    findings: list[Finding]
    lung_mask: np.ndarray  # bool, (rows, cols)
    heatmap: np.ndarray  # float32 in [0, 1], (rows, cols), Grad-CAM of heatmap_label
    heatmap_label: str
    display: np.ndarray  # float32 in [0, 1], (rows, cols): the image as a viewer shows it
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    # lung-opacity detections (x, y, width, height, score) in source pixels, x along the columns;
    # empty when the bundle has no detector
    boxes: list[tuple[float, float, float, float, float]] = field(default_factory=list)

    def top(self, n: int = 3) -> list[Finding]:
        return sorted(self.findings, key=lambda f: f.probability, reverse=True)[:n]


class InputError(ValueError):
    """The image cannot be processed by this pipeline (permanent: do not retry)."""


class Pipeline(Protocol):
    """A loaded pipeline. Models are loaded once in the constructor, not per call."""

    id: str
    model: ModelInfo

    def run(self, datasets: Sequence[Dataset]) -> list[PipelineResult]:
        """Process a batch of single-frame images (pixel data not yet decoded)."""
        ...


def merge_settings(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of `base` with `over` applied (nested mappings merge, other values replace)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge_settings(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
