"""Pediatric pneumonia (Kermany et al. 2018): <root>/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg."""

from __future__ import annotations

import re
from pathlib import Path

from training.datasets.common import SPLITS, DatasetError, LabelledSet, Record, count_log

__all__ = ["KERMANY_LABELS", "load_kermany", "kermany_patient"]

KERMANY_LABELS = ("Pneumonia",)  # one sigmoid output: NORMAL = 0, PNEUMONIA = 1
_CLASSES = {"NORMAL": 0.0, "PNEUMONIA": 1.0}
_EXTS = {".jpeg", ".jpg", ".png"}


def kermany_patient(name: str) -> str | None:
    """Patient ID from the download's file names.

    person1946_bacteria_4874.jpeg -> person1946; IM-0115-0001.jpeg -> IM-0115;
    NORMAL2-IM-1427-0001.jpeg -> NORMAL2-IM-1427. None when the name follows neither pattern.
    """
    m = re.match(r"(person\d+)_", name) or re.match(r"((?:NORMAL\d*-)?IM-\d+)-\d+", name)
    return m.group(1) if m else None


def load_kermany(root: Path) -> LabelledSet:
    """Every image under root/<split>/<class>/; the download's val and test folders are kept.

    Its val folder has only 16 images, so train/ images are left unassigned: `split(val=f)`
    moves a fraction f of the train patients to validation (test=0 is implied by test/).
    """
    root = Path(root)
    records = []
    for split in SPLITS:
        for cls, y in _CLASSES.items():
            folder = root / split / cls
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in _EXTS:
                    fixed = None if split == "train" else split
                    records.append(Record(p, (y,), kermany_patient(p.name), fixed))
    if not records:
        raise DatasetError(f"{root}: no images in {{train,val,test}}/{{NORMAL,PNEUMONIA}}/")
    ds = LabelledSet("kermany", KERMANY_LABELS, records, multi_label=False)
    count_log(ds)
    return ds
