"""Deterministic inputs for the writer tests: real source images and a fake PipelineResult."""

from __future__ import annotations

import datetime
import shutil
import tempfile
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import DigitalXRayImageStorageForPresentation, JPEGBaseline8Bit

from node.writers.codes import FINDING_CODES
from node.writers.uids import result_uid
from pipelines.base import Box, Finding, Heatmap, ModelInfo, PipelineResult
from tests.peers import CXR_SAMPLES, img2dcm
from training.synthetic import LABELS as DEMO_LABELS

JPEG_SAMPLE = CXR_SAMPLES / "pneumonia" / "person1946_bacteria_4875.jpeg"

MODEL = ModelInfo(
    name="pacsnode chest_xray",
    version="0.1.0",
    manufacturer="pacsnode",
    device_uid="1.2.826.0.1.3680043.8.498.12345",
    demo=True,
    settings_sha256="0" * 64,
)
THRESHOLD = 0.5


def rg1() -> Dataset:
    """The real CR chest radiograph RG1_UNCR.dcm (MONOCHROME1, 1955 x 1841)."""
    return dcmread(get_testdata_file("RG1_UNCR.dcm"))


def dx_source() -> Dataset:
    """RG1's real pixels as a Digital X-Ray (For Presentation) image: projection geometry given
    by Imager Pixel Spacing only, as DX detectors write it (no Pixel Spacing)."""
    ds = rg1()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = result_uid("test", "dx", "sop")
    ds.SeriesInstanceUID = result_uid("test", "dx", "series")
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.168, 0.168]
    return ds


def jpeg_source() -> Dataset:
    """A real chest radiograph JPEG wrapped as a MONOCHROME2 Secondary Capture, re-read."""
    if not JPEG_SAMPLE.exists():
        pytest.skip(f"sample radiograph {JPEG_SAMPLE} not present")
    pixels = np.asarray(Image.open(JPEG_SAMPLE).convert("L"))
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=result_uid("test", "jpeg", "study"),
        series_instance_uid=result_uid("test", "jpeg", "series"),
        sop_instance_uid=result_uid("test", "jpeg", "sop"),
        series_number=1,
        instance_number=1,
        manufacturer="test",
        patient_id="TEST-JPEG",
        patient_name="Test^Jpeg",
        patient_birth_date="20000101",
        patient_sex="O",
        accession_number="A1",
        study_id="1",
        study_date="20240101",
        study_time="120000",
        referring_physician_name="Referring^Test",
        patient_orientation=("L", "F"),
    )
    buffer = BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    return dcmread(BytesIO(buffer.getvalue()))


def img2dcm_source() -> Dataset:
    """A real chest radiograph JPEG wrapped by DCMTK's img2dcm, as a site without a DICOM
    modality sends one: Secondary Capture, JPEG Baseline pixel data (not re-encoded), no
    spacing, no orientation, only the patient's name and ID given (DCMTK's presentation-state
    renderer refuses a GSPS whose Patient's Name is empty)."""
    if not JPEG_SAMPLE.exists():
        pytest.skip(f"sample radiograph {JPEG_SAMPLE} not present")
    if shutil.which("img2dcm") is None:
        pytest.skip("no img2dcm (DCMTK)")
    with tempfile.TemporaryDirectory() as folder:
        ds = dcmread(img2dcm(JPEG_SAMPLE, Path(folder) / "sc.dcm", "PatientName=Test^Img2dcm", "PatientID=TEST-IMG2DCM"))
    assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit, ds.file_meta.TransferSyntaxUID
    return ds


def probabilities() -> dict[str, float]:
    """Fixed probabilities for the demo model's 15 labels (in codes.py's order): 0.05, 0.11, ... 0.89."""
    labels = [label for label in FINDING_CODES if label in DEMO_LABELS]
    return {label: round(0.05 + 0.06 * i, 2) for i, label in enumerate(labels)}


#: The findings of ``fake_result`` that have a heatmap, and its centre (column, row) as fractions.
HEATMAPS = {"Consolidation": (0.65, 0.55), "Edema": (0.3, 0.4)}


def fake_result(rows: int, cols: int) -> PipelineResult:
    """Two ellipse lung fields (region "lungs"), a Gaussian heatmap for each finding of
    ``HEATMAPS`` (both above threshold), fixed findings, no boxes."""
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    lungs = np.zeros((rows, cols), dtype=bool)
    for centre in (0.3, 0.7):
        lungs |= ((xx - centre * cols) / (0.14 * cols)) ** 2 + (
            (yy - 0.5 * rows) / (0.3 * rows)
        ) ** 2 <= 1.0
    heatmaps = {
        label: Heatmap(np.exp(-(((xx - cx * cols) / (0.1 * cols)) ** 2 + ((yy - cy * rows) / (0.1 * rows)) ** 2)), (rows, cols))
        for label, (cx, cy) in HEATMAPS.items()
    }
    display = ((xx + yy) / (rows + cols)).astype(np.float32)
    findings = [Finding(label, p, THRESHOLD) for label, p in probabilities().items()]
    return PipelineResult(findings, display, regions={"lungs": lungs}, heatmaps=heatmaps)


def boxes(rows: int, cols: int) -> list[Box]:
    """Two hand-made lung-opacity detections inside an image of this size."""
    return [Box(0.2 * cols, 0.3 * rows, 0.35 * cols, 0.5 * rows, "Lung Opacity", 0.87),
            Box(0.6 * cols, 0.4 * rows, 0.7 * cols, 0.65 * rows, "Lung Opacity", 0.42)]


#: The content date/time the writer tests pass (a job's creation, in the worker).
WHEN = datetime.datetime(2025, 3, 4, 5, 6, 7, 890)


def identity(kind: str, job: str = "job-1") -> dict[str, object]:
    """Deterministic series/SOP UIDs, numbers and content date/time for one output object."""
    return {
        "series_instance_uid": result_uid(job, MODEL.version, kind, "series"),
        "sop_instance_uid": result_uid(job, MODEL.version, kind, "0"),
        "series_number": 900,
        "instance_number": 1,
        "content_datetime": WHEN,
    }


def roundtrip(ds: Dataset) -> Dataset:
    """Write to BytesIO, read back and decode the pixels (if any)."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    back = dcmread(BytesIO(buffer.getvalue()))
    if "PixelData" in back:
        back.pixel_array  # noqa: B018
    return back


#: The real source images the writer tests build from (one module-scoped fixture run per entry).
SOURCES = {"rg1": rg1, "dx": dx_source, "jpeg": jpeg_source, "img2dcm": img2dcm_source}
needs_dciodvfy = pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="no dciodvfy")
