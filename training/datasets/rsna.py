"""RSNA Pneumonia Detection Challenge (2018): two label CSVs and a folder of DICOM files.

    stage_2_train_labels.csv         patientId,x,y,width,height,Target (one row per box;
                                     x..height empty when Target is 0)
    stage_2_detailed_class_info.csv  patientId,class
    stage_2_train_images/<patientId>.dcm
"""

from __future__ import annotations

import csv
from pathlib import Path

from training.datasets.common import Box, DatasetError, LabelledSet, Record, count_log, one_hot

__all__ = ["RSNA_CLASSES", "load_rsna"]

RSNA_CLASSES = ("Lung Opacity", "No Lung Opacity / Not Normal", "Normal")


def _rows(path: Path, columns: set[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = columns - set(reader.fieldnames or ())
            if missing:
                raise DatasetError(f"{path}: missing columns {sorted(missing)}")
            return list(reader)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e


def load_rsna(root: Path, images: str = "stage_2_train_images") -> LabelledSet:
    """Three-class one-hot labels and the opacity boxes (x, y, w, h) of each patient's image."""
    root = Path(root)
    labels = _rows(root / "stage_2_train_labels.csv", {"patientId", "x", "y", "width", "height", "Target"})
    classes = _rows(root / "stage_2_detailed_class_info.csv", {"patientId", "class"})
    cls_of: dict[str, str] = {}
    for row in classes:
        pid, c = row["patientId"], row["class"].strip()
        if c not in RSNA_CLASSES:
            raise DatasetError(f"stage_2_detailed_class_info.csv: unknown class {c!r} for {pid}")
        if cls_of.setdefault(pid, c) != c:
            raise DatasetError(f"stage_2_detailed_class_info.csv: {pid} has classes {cls_of[pid]!r} and {c!r}")
    boxes: dict[str, list[Box]] = {}
    for row in labels:
        pid = row["patientId"]
        boxes.setdefault(pid, [])
        if row["Target"].strip() == "1":
            try:
                boxes[pid].append(tuple(float(row[k]) for k in ("x", "y", "width", "height")))  # type: ignore[arg-type]
            except ValueError as e:
                raise DatasetError(f"stage_2_train_labels.csv: bad box for {pid}: {e}") from e
    folder = root / images
    records = []
    for pid in sorted(boxes):
        if pid not in cls_of:
            raise DatasetError(f"{pid} is in stage_2_train_labels.csv but not in stage_2_detailed_class_info.csv")
        c = cls_of[pid]
        if (c == "Lung Opacity") != bool(boxes[pid]):
            raise DatasetError(f"{pid}: class {c!r} disagrees with {len(boxes[pid])} boxes")
        path = folder / f"{pid}.dcm"
        if not path.is_file():
            raise DatasetError(f"{path} is missing (listed in stage_2_train_labels.csv)")
        # one image per patient in this challenge: the patientId is the split unit
        records.append(Record(path, one_hot(RSNA_CLASSES.index(c), 3), pid, None, tuple(boxes[pid])))
    if not records:
        raise DatasetError(f"{root}: stage_2_train_labels.csv lists no images")
    ds = LabelledSet("rsna", RSNA_CLASSES, records, multi_label=False,
                     notes={"boxes": str(sum(len(r.boxes) for r in records))})  # fmt: skip
    count_log(ds)
    return ds
