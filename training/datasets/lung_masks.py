"""Lung masks: Montgomery (left + right mask folders) and Shenzhen (one *_mask file) layouts.

    Montgomery:  CXR_png/MCUCXR_0001_0.png  ManualMask/leftMask/MCUCXR_0001_0.png
                                            ManualMask/rightMask/MCUCXR_0001_0.png
    Shenzhen:    CXR_png/CHNCXR_0001_0.png  masks/CHNCXR_0001_0_mask.png
    Generic:     <images>/NAME.ext          <masks>/NAME[_mask].ext (pass images=, masks=)
"""

from __future__ import annotations

import re
from pathlib import Path

from training.datasets.common import DatasetError, LabelledSet, Record, count_log

__all__ = ["LUNG_LABELS", "load_lung_masks"]

LUNG_LABELS = ("Lung",)
_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm"}


def _find(folder: Path, stem: str) -> Path | None:
    for suffix in ("", "_mask"):
        for p in folder.glob(f"{stem}{suffix}.*"):
            if p.suffix.lower() in _EXTS:
                return p
    return None


def load_lung_masks(root: Path, images: str | None = None, masks: tuple[str, ...] | None = None) -> LabelledSet:
    """Image + mask(s) pairs; the layout is detected unless images/masks are given.

    Images without a mask are skipped and counted (Shenzhen ships masks for a subset).
    The patient is the file name up to the view suffix (MCUCXR_0001_0 -> MCUCXR_0001).
    """
    root = Path(root)
    if images is None:
        images = "CXR_png" if (root / "CXR_png").is_dir() else "images"
    if masks is None:
        if (root / "ManualMask").is_dir():
            masks = ("ManualMask/leftMask", "ManualMask/rightMask")
        else:
            masks = ("masks",) if (root / "masks").is_dir() else ("mask",)
    img_dir = root / images
    mask_dirs = [root / m for m in masks]
    for d in (img_dir, *mask_dirs):
        if not d.is_dir():
            raise DatasetError(f"lung mask set {root}: folder {d} is missing")
    records, skipped = [], 0
    for p in sorted(img_dir.iterdir()):
        if p.suffix.lower() not in _EXTS:
            continue
        found = [_find(d, p.stem) for d in mask_dirs]
        if any(f is None for f in found):
            skipped += 1
            continue
        m = re.match(r"(.+?)_\d+$", p.stem)
        records.append(Record(p, (1.0,), m.group(1) if m else p.stem, None, (), tuple(found)))  # type: ignore[arg-type]
    if not records:
        raise DatasetError(f"lung mask set {root}: no image in {img_dir} has a mask in {masks}")
    ds = LabelledSet("lung-masks", LUNG_LABELS, records, multi_label=False,
                     notes={"images_without_mask": str(skipped), "mask_folders": ", ".join(masks)})  # fmt: skip
    count_log(ds)
    return ds
