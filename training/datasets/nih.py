"""NIH ChestX-ray14 (Wang et al. 2017): Data_Entry_2017.csv + PNGs in images*/ folders.

Finding Labels is '|'-separated over 14 findings or 'No Finding'; the 15 outputs follow
`training.synthetic.LABELS` (the same names, the node's order). The download's
train_val_list.txt / test_list.txt (patient-disjoint) fix the test split when present.
"""

from __future__ import annotations

import csv
from pathlib import Path

from training.datasets.common import DatasetError, LabelledSet, Record, count_log
from training.synthetic import LABELS

__all__ = ["NIH_LABELS", "load_nih"]

NIH_LABELS = LABELS


def load_nih(root: Path, csv_name: str = "Data_Entry_2017.csv") -> LabelledSet:
    """Multi-hot labels over NIH_LABELS; the patient ID from the CSV is the split unit."""
    root = Path(root)
    table = root / csv_name
    if not table.is_file():
        raise DatasetError(f"{table} is missing")
    files = {p.name: p for p in root.rglob("*.png")}  # images_001/images/... or images/...
    test_list = root / "test_list.txt"
    test = set(test_list.read_text().split()) if test_list.is_file() else None
    records = []
    with table.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"Image Index", "Finding Labels", "Patient ID"}
        if not need <= set(reader.fieldnames or ()):
            raise DatasetError(f"{table}: missing columns {sorted(need - set(reader.fieldnames or ()))}")
        for row in reader:
            name = row["Image Index"].strip()
            findings = {s.strip() for s in row["Finding Labels"].split("|") if s.strip()}
            unknown = findings - set(NIH_LABELS)
            if unknown:
                raise DatasetError(f"{table}: {name} has unknown labels {sorted(unknown)}")
            if name not in files:
                raise DatasetError(f"{name} is listed in {csv_name} but not found under {root}")
            y = tuple(1.0 if lab in findings else 0.0 for lab in NIH_LABELS)
            split = None if test is None else ("test" if name in test else None)
            records.append(Record(files[name], y, row["Patient ID"].strip(), split))
    if not records:
        raise DatasetError(f"{table} lists no images")
    ds = LabelledSet("nih-chestxray14", NIH_LABELS, records, multi_label=True,
                     notes={"official_test_list": str(test is not None)})  # fmt: skip
    count_log(ds)
    return ds
