"""Loaders for the chest X-ray data sets as they are downloaded (see docs/training.md).

`load_dataset(spec)` dispatches on `spec["format"]`; each loader returns a `LabelledSet`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.datasets.common import DatasetError, LabelledSet, Record, load_image, load_mask
from training.datasets.kermany import load_kermany
from training.datasets.lung_masks import load_lung_masks
from training.datasets.nih import load_nih
from training.datasets.rsna import load_rsna
from training.datasets.tables import load_csv, load_dicom_folder

__all__ = [
    "FORMATS", "DatasetError", "LabelledSet", "Record", "load_dataset", "load_image", "load_mask",
]  # fmt: skip

FORMATS = ("kermany", "rsna", "nih", "lung_masks", "csv", "dicom_folder")


def load_dataset(spec: dict[str, Any], data: Path) -> LabelledSet:
    """Load the set a recipe's `dataset` section describes, rooted at `data`.

    spec: {"format": one of FORMATS, plus the loader's options: "csv" (csv, dicom_folder),
    "images"/"masks" (lung_masks)}.
    """
    fmt = spec.get("format")
    data = Path(data)
    if not data.is_dir():
        raise DatasetError(f"data folder {data} does not exist")
    if fmt == "kermany":
        return load_kermany(data)
    if fmt == "rsna":
        return load_rsna(data)
    if fmt == "nih":
        return load_nih(data)
    if fmt == "lung_masks":
        masks = spec.get("masks")
        return load_lung_masks(data, spec.get("images"), tuple(masks) if masks else None)
    if fmt == "csv":
        return load_csv(data / spec.get("csv", "labels.csv"), data, bool(spec.get("multi_label", True)))
    if fmt == "dicom_folder":
        return load_dicom_folder(data, data / spec.get("csv", "labels.csv"), bool(spec.get("multi_label", True)))
    raise DatasetError(f"unknown dataset format {fmt!r}; known: {FORMATS}")
