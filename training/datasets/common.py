"""What every loader returns: records (image path, labels, patient, boxes, masks) and splits.

Images are decoded by `load_image`: DICOM through `pipelines.imaging.to_display` (the node's
own decoder, so training sees the pixels the node sees), other formats through Pillow.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from pipelines.imaging import to_display

__all__ = ["Box", "DatasetError", "LabelledSet", "Record", "is_dicom", "load_image", "load_mask"]

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]  # x, y, width, height in source pixels (RSNA convention)
SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A data set folder or label file does not have the expected layout or content."""


@dataclass(frozen=True)
class Record:
    """One image. `labels` is multi-hot (or one-hot) over the owning set's label names."""

    image: Path
    labels: tuple[float, ...]
    patient: str | None = None
    split: str | None = None  # a split fixed by the download (Kermany folders, NIH lists)
    boxes: tuple[Box, ...] = ()
    masks: tuple[Path, ...] = ()  # mask files whose union is the target (left + right lung)


@dataclass
class LabelledSet:
    """A loaded data set: label names, records and what they are for."""

    name: str
    labels: tuple[str, ...]
    records: list[Record]
    multi_label: bool
    notes: dict[str, str] = field(default_factory=dict)

    def class_counts(self, records: Sequence[Record] | None = None) -> dict[str, int]:
        """Images per label (multi-label: an image counts once for each of its labels)."""
        recs = self.records if records is None else records
        if not recs:
            return {lab: 0 for lab in self.labels}
        y = np.asarray([r.labels for r in recs], np.float32)
        return {lab: int(v) for lab, v in zip(self.labels, (y > 0.5).sum(0), strict=True)}

    def split(self, val: float = 0.1, test: float = 0.2, seed: int = 0) -> dict[str, list[Record]]:
        """Train/val/test by patient (all images of a patient land in one split).

        Records whose split the download fixes keep it. The others are divided by patient
        (the image itself where no patient ID exists) with a seeded permutation of the sorted
        IDs, so the same files and seed give the same split everywhere. No `test` share is
        taken when the download already fixes a test split.
        """
        if not 0 <= val < 1 or not 0 <= test < 1 or val + test >= 1:
            raise DatasetError(f"split fractions val={val}, test={test} must be in [0, 1) and sum below 1")
        out: dict[str, list[Record]] = {s: [] for s in SPLITS}
        free = []
        for r in self.records:
            if r.split is not None:
                if r.split not in out:
                    raise DatasetError(f"{r.image}: unknown split {r.split!r}")
                out[r.split].append(r)
            else:
                free.append(r)
        if out["test"]:
            test = 0.0
        patients = sorted({r.patient or str(r.image) for r in free})
        order = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
        n_test, n_val = round(len(order) * test), round(len(order) * val)
        where = {p: "test" for p in order[:n_test]}
        where |= {p: "val" for p in order[n_test : n_test + n_val]}
        for r in free:
            out[where.get(r.patient or str(r.image), "train")].append(r)
        return out

    def summary(self, splits: dict[str, list[Record]] | None = None) -> dict[str, object]:
        """Counts for logs, run reports and the bundle's training_data field."""
        out: dict[str, object] = {
            "dataset": self.name, "images": len(self.records),
            "patients": len({r.patient for r in self.records if r.patient}),
            "labels": list(self.labels), "class_counts": self.class_counts(), **self.notes,
        }  # fmt: skip
        if splits is not None:
            out["splits"] = {
                s: {"images": len(rs), "patients": len({r.patient or str(r.image) for r in rs}),
                    "class_counts": self.class_counts(rs)}
                for s, rs in splits.items()
            }  # fmt: skip
        return out


def is_dicom(path: Path) -> bool:
    """DICOM by extension or by the 'DICM' preamble marker (many archives drop the extension)."""
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with path.open("rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def load_image(path: Path) -> np.ndarray:
    """Any supported file -> float32 (H, W) in [0, 1], higher = brighter (as `to_display`)."""
    path = Path(path)
    if is_dicom(path):
        try:
            ds = pydicom.dcmread(path)
        except (OSError, pydicom.errors.InvalidDicomError) as e:
            raise DatasetError(f"cannot read DICOM {path}: {e}") from e
        return to_display(ds)
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit PNGs: scale by the full range
                return (np.asarray(im, np.float32) / 65535.0).clip(0, 1)
            return np.asarray(im.convert("L"), np.float32) / 255.0
    except OSError as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


def load_mask(paths: Sequence[Path], shape: tuple[int, int]) -> np.ndarray:
    """Union of mask files (nonzero = lung) as bool (H, W); each must match the image's shape."""
    out = np.zeros(shape, bool)
    for p in paths:
        try:
            with Image.open(p) as im:
                m = np.asarray(im.convert("L")) > 127
        except OSError as e:
            raise DatasetError(f"cannot read mask {p}: {e}") from e
        if m.shape != shape:
            raise DatasetError(f"mask {p} is {m.shape}, its image is {shape}")
        out |= m
    return out


def count_log(ds: LabelledSet) -> None:
    """Log the class counts once per load (no patient identifiers)."""
    log.info("%s: %d images, class counts %s", ds.name, len(ds.records), ds.class_counts())


def one_hot(index: int, n: int) -> tuple[float, ...]:
    return tuple(1.0 if i == index else 0.0 for i in range(n))


