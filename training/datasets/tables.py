"""Label tables: a generic CSV (path, label columns) and a DICOM folder with a labels CSV.

Generic CSV: a `path` column (relative to the CSV's folder), optional `patient_id`, `split`
and `mask` (a lung mask file, for segmentation recipes), and one 0/1 column per label (the
label names are the column names). An optional `dataset.json` beside the CSV names the set and
adds notes to its summary (`training.synthetic.write_dataset` marks its sets `synthetic`).
DICOM folder: every DICOM under the folder is indexed by SOP Instance UID and by relative path;
the CSV names each image by `sop_instance_uid` or `path`, label columns as above; the patient
comes from the CSV's `patient_id` or else the file's Patient ID.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom

from training.datasets.common import SPLITS, DatasetError, LabelledSet, Record, count_log, is_dicom

__all__ = ["load_csv", "load_dicom_folder"]

_META = {"path", "patient_id", "split", "sop_instance_uid", "mask"}


def _read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """(label columns, rows); label values must be 0 or 1."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or ())
            rows = list(reader)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    labels = [c for c in columns if c not in _META]
    if not labels:
        raise DatasetError(f"{path}: no label columns besides {sorted(_META & set(columns))}")
    for i, row in enumerate(rows, start=2):
        bad = {c: row[c] for c in labels if row[c].strip() not in ("0", "1", "0.0", "1.0")}
        if bad:
            raise DatasetError(f"{path} line {i}: label values must be 0 or 1, got {bad}")
        if row.get("split") and row["split"] not in SPLITS:
            raise DatasetError(f"{path} line {i}: split must be one of {SPLITS}, got {row['split']!r}")
    return labels, rows


def _record(row: dict[str, str], labels: list[str], image: Path, patient: str | None,
            masks: tuple[Path, ...] = ()) -> Record:  # fmt: skip
    y = tuple(float(row[c]) for c in labels)
    return Record(image, y, row.get("patient_id") or patient, row.get("split") or None, masks=masks)


def _manifest(folder: Path) -> tuple[str | None, dict[str, str]]:
    """(name, notes) from an optional dataset.json."""
    path = folder / "dataset.json"
    if not path.is_file():
        return None, {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: top level must be an object")
    reserved = {"dataset", "images", "patients", "labels", "class_counts", "splits"} & set(meta)
    if reserved:  # notes join the summary beside these: they must not overwrite the real counts
        raise DatasetError(f"{path}: keys {sorted(reserved)} are computed from the data, not set here")
    name = meta.pop("name", None)
    return (str(name) if name else None), {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}


def load_csv(table: Path, root: Path | None = None, multi_label: bool = True) -> LabelledSet:
    """Generic CSV; image paths relative to `root` (default: the CSV's folder)."""
    table = Path(table)
    root = table.parent if root is None else Path(root)
    labels, rows = _read_table(table)
    records = []
    for row in rows:
        if not row.get("path"):
            raise DatasetError(f"{table}: every row needs a path")
        files = [root / row["path"], *([root / row["mask"]] if row.get("mask") else [])]
        for p in files:
            if not p.is_file():
                raise DatasetError(f"{p} is listed in {table} but missing")
        records.append(_record(row, labels, files[0], None, tuple(files[1:])))
    name, notes = _manifest(table.parent)
    ds = LabelledSet(name or table.stem, tuple(labels), records, multi_label=multi_label, notes=notes)
    count_log(ds)
    return ds


def load_dicom_folder(root: Path, table: Path, multi_label: bool = True) -> LabelledSet:
    """DICOM files under `root` labelled by `table` (by SOP Instance UID or relative path)."""
    root, table = Path(root), Path(table)
    labels, rows = _read_table(table)
    by_uid: dict[str, tuple[Path, str | None]] = {}
    by_path: dict[str, tuple[Path, str | None]] = {}
    for p in sorted(q for q in root.rglob("*") if q.is_file() and is_dicom(q)):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        entry = (p, str(ds.get("PatientID", "")) or None)
        by_uid[str(ds.get("SOPInstanceUID", ""))] = entry
        by_path[p.relative_to(root).as_posix()] = entry
    records = []
    for i, row in enumerate(rows, start=2):
        key = row.get("sop_instance_uid") or row.get("path")
        found = by_uid.get(key or "") if row.get("sop_instance_uid") else by_path.get(key or "")
        if found is None:
            raise DatasetError(f"{table} line {i}: no DICOM file under {root} for {key!r}")
        records.append(_record(row, labels, found[0], found[1]))
    ds_ = LabelledSet(table.stem, tuple(labels), records, multi_label=multi_label)
    count_log(ds_)
    return ds_
