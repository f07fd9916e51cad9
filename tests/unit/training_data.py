"""Tiny data sets in the layouts people download, written to a tmp folder for training tests.

Images are `training.synthetic` radiographs (with their lung masks); the RSNA and DICOM-folder
sets are DICOM files (12-bit MONOCHROME1 with a window, so decoding goes through to_display's
VOI and inversion); Kermany sets can be the real cxr-samples JPEGs.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

from tests.peers import CXR_SAMPLES
from training.synthetic import LABELS, generate

SAMPLES = CXR_SAMPLES
SEED = 11


def _png(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path)


def write_dicom(img: np.ndarray, path: Path, patient: str, uid: str) -> None:
    """Display image -> 12-bit MONOCHROME1 DICOM with a window covering the full range."""
    stored = ((1.0 - np.clip(img, 0, 1)) * 4095).round().astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.PatientID, ds.Modality = patient, "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def kermany(root: Path, real: bool = True, size: int = 96) -> Path:
    """train/val/test x NORMAL/PNEUMONIA. real: the 8 cxr-samples (2 per class in train, 1 in val, 1 in test)."""
    if real:
        for cls, folder in (("NORMAL", "normal"), ("PNEUMONIA", "pneumonia")):
            files = sorted((SAMPLES / folder).glob("*.jpeg"))
            for split, chunk in (("train", files[:2]), ("val", files[2:3]), ("test", files[3:])):
                for f in chunk:
                    (root / split / cls).mkdir(parents=True, exist_ok=True)
                    shutil.copy(f, root / split / cls / f.name)
        return root
    i = 0
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for cls in ("NORMAL", "PNEUMONIA"):
            for _ in range(n):
                _png(generate(i, SEED, size).image, root / split / cls / f"person{i}_bacteria_{i}.jpeg")
                i += 1
    return root


def lung_masks(root: Path, n: int = 12, size: int = 96, montgomery: bool = True) -> Path:
    """Montgomery layout (left/right mask folders) or Shenzhen (masks/NAME_mask.png)."""
    prefix = "MCUCXR" if montgomery else "CHNCXR"
    for i in range(n):
        s = generate(i, SEED, size)
        name = f"{prefix}_{i:04d}_{i % 2}"
        _png(s.image, root / "CXR_png" / f"{name}.png")
        if montgomery:
            half = size // 2
            left, right = s.mask.copy(), s.mask.copy()
            left[:, half:], right[:, :half] = False, False
            _png(left.astype(np.float32), root / "ManualMask/leftMask" / f"{name}.png")
            _png(right.astype(np.float32), root / "ManualMask/rightMask" / f"{name}.png")
        else:
            _png(s.mask.astype(np.float32), root / "masks" / f"{name}_mask.png")
    return root


def nih(root: Path, n: int = 16, size: int = 96, patients: int = 6) -> Path:
    """Data_Entry_2017.csv + images_001/images/*.png; several images per patient."""
    rows = []
    for i in range(n):
        s = generate(i, SEED, size)
        name = f"{i:08d}_000.png"
        _png(s.image, root / "images_001" / "images" / name)
        found = [lab for lab, v in zip(LABELS, s.labels, strict=True) if v]
        rows.append({"Image Index": name, "Finding Labels": "|".join(found),
                     "Follow-up #": "0", "Patient ID": str(i % patients), "Patient Age": "50"})  # fmt: skip
    with (root / "Data_Entry_2017.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def rsna(root: Path, size: int = 96, n: int = 6, opacity: float = 0.0) -> Path:
    """n patients cycling through 2 Lung Opacity (one with two boxes), 2 Not Normal, 2 Normal.

    Boxes are given for 96 px and scaled to `size`. opacity > 0 adds a bright ellipse filling
    each box (clipped to 1), so a detector has something to find; 0 leaves the radiograph as
    generated.
    """
    classes = ["Lung Opacity", "Lung Opacity", "No Lung Opacity / Not Normal",
               "No Lung Opacity / Not Normal", "Normal", "Normal"]  # fmt: skip
    boxes96 = {0: [(10, 20, 30, 25), (55, 20, 25, 30)], 1: [(15, 30, 20, 20)]}
    lab_rows, cls_rows = [], []
    yy, xx = np.mgrid[:size, :size] + 0.5
    for i in range(n):
        pid, c = f"pid-{i:04d}", classes[i % 6]
        boxes = [tuple(round(v * size / 96) for v in b) for b in boxes96.get(i % 6, [])]
        img = generate(i, SEED, size).image
        for x, y, w, h in boxes:
            inside = ((xx - x - w / 2) / (w / 2)) ** 2 + ((yy - y - h / 2) / (h / 2)) ** 2 <= 1
            img = np.where(inside, np.clip(img + opacity, 0, 1), img)
        write_dicom(img, root / "stage_2_train_images" / f"{pid}.dcm", pid, f"1.2.826.0.1.3680043.8.498.{i + 1}")
        for b in boxes or [None]:  # type: ignore[list-item]
            lab_rows.append([pid, *(b if b else ["", "", "", ""]), 1 if b else 0])
            cls_rows.append([pid, c])
    with (root / "stage_2_train_labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["patientId", "x", "y", "width", "height", "Target"], *lab_rows])
    with (root / "stage_2_detailed_class_info.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["patientId", "class"], *cls_rows])
    return root
