"""torchxrayvision's published models in the node: parity with torchxrayvision itself, and one
study end to end (storescu -> `pacsnode run` -> Orthanc) with an imported 18-pathology model.

torchxrayvision needs torchvision, which does not import beside the node's torch 2.13 CPU
build, so its side runs in its own environment (.venv-xrv from tests/xrv_requirements.txt;
`./dev test` creates it): tests/xrv_reference.py builds its networks with `weights=None`, saves
them in the formats torchxrayvision publishes and records its preprocessing and outputs on two
real radiographs. Here, in the node's environment, `python -m training import-xrv` turns those
files into bundles, and the node's preprocessing and networks must give the same numbers.
Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from node.writers.codes import FINDING_CODES
from pipelines import xrv
from pipelines.base import DEMO_DISCLAIMER
from pipelines.bundle import load_bundle
from pipelines.chest_xray import ChestXrayPipeline
from pipelines.imaging import to_display
from tests.peers import (
    CXR_SAMPLES,
    REPO,
    Orthanc,
    have,
    received_outputs,
    run_one_study,
)
from tests.unit import training_data
from training.__main__ import main
from training.xrv import XRV_MODELS

XRV_PYTHON = Path(os.environ.get("PACSNODE_XRV_PYTHON", REPO / ".venv-xrv" / "bin" / "python"))
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not XRV_PYTHON.exists(), reason=f"no torchxrayvision environment at {XRV_PYTHON} "
                       "(./dev test creates .venv-xrv from tests/xrv_requirements.txt)"),
]  # fmt: skip

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))  # CR, MONOCHROME1, 15 bits stored
CXR = CXR_SAMPLES / "pneumonia" / "person1946_bacteria_4874.jpeg"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
# torchxrayvision's 18 pathologies, in its output order
PATHOLOGIES = list(XRV_MODELS["densenet121-res224-all"].labels)


@dataclass(frozen=True)
class Reference:
    folder: Path
    arrays: dict[str, np.ndarray]
    index: dict
    dicoms: list[Path]


def _monochrome2(jpeg: Path, out: Path) -> Path:
    """A real radiograph as an uncompressed 8-bit MONOCHROME2 DICOM (both sides decode it alike)."""
    pixels = np.asarray(Image.open(jpeg).convert("L"))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    uid = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, uid
    ds.PatientID, ds.Modality = "XRV-PARITY", "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    folder = tmp_path_factory.mktemp("xrv")
    dicoms = [RG1, _monochrome2(CXR, folder / "cxr.dcm")]
    cmd = [str(XRV_PYTHON), str(REPO / "tests" / "xrv_reference.py"), str(folder / "ref")]
    for d in dicoms:
        cmd += ["--dicom", str(d)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    arrays = dict(np.load(folder / "ref" / "reference.npz"))
    index = json.loads((folder / "ref" / "reference.json").read_text())
    assert index["torchxrayvision"] == "1.5.7" and not index["torch"].startswith("2.13")  # really the other side
    return Reference(folder / "ref", arrays, index, dicoms)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny lung segmentation run (the bundle's SEG and outlines; torchxrayvision has no UNet)."""
    tmp = tmp_path_factory.mktemp("seg")
    args = ["train", "--recipe", str(REPO / "training" / "recipes" / "lung_segmentation.yaml"),
            "--data", str(training_data.lung_masks(tmp / "masks", n=12, size=96)), "--out", str(tmp / "run"),
            "--device", "cpu"]  # fmt: skip
    for s in ("num_workers=0", "epochs=1", "batch_size=2", "image_size=64", "split.val=0.25", "split.test=0.25",
              "network.args.channels=[4,8,16]", "network.args.strides=[2,2]", "network.args.num_res_units=1"):
        args += ["--set", s]
    assert main(args) == 0
    return tmp / "run"


def _import(reference: Reference, name: str, seg_run: Path, out: Path, *extra: str) -> Path:
    file = reference.folder / reference.index["models"][name]["file"]
    assert main(["import-xrv", "--weights", str(file), "--model", name, "--out", str(out), "--version", "1.0.0",
                 "--segmentation-run", str(seg_run), *extra]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def bundles(reference: Reference, seg_run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bundles")
    return {name: _import(reference, name, seg_run, tmp / name) for name in reference.index["models"]}


def test_preprocessing_is_torchxrayvisions(reference: Reference) -> None:
    """read_xray_dcm -> normalize -> XRayCenterCrop -> XRayResizer, on a 15-bit MONOCHROME1 CR and
    an 8-bit MONOCHROME2 image: the node's classifier input is the library's."""
    for i, path in enumerate(reference.dicoms):
        ds = pydicom.dcmread(path)
        for size in (224, 512):
            ours, boxes = xrv.classifier_batch([ds], [to_display(ds)], size, "stored")
            theirs = reference.arrays[f"image{i}_{size}"]
            assert ours.shape == (1, *theirs.shape)
            assert np.abs(ours[0].numpy() - theirs).max() <= 1e-3, (path.name, size)  # of a 2048 range
        rows, cols = int(ds.Rows), int(ds.Columns)
        side = min(rows, cols)
        y0, y1, x0, x1 = boxes[0]
        assert (y1 - y0, x1 - x0) == (side, side) and abs((y0 + y1) - rows) <= 1 and abs((x0 + x1) - cols) <= 1


@pytest.mark.parametrize("name", ["densenet121-res224-all", "densenet121-res224-nih", "resnet50-res512-all"])
def test_imported_networks_match_torchxrayvisions_forward(name: str, reference: Reference, bundles: dict[str, Path]) -> None:
    bundle = load_bundle(bundles[name])
    model = XRV_MODELS[name]
    keep = model.kept()
    size = model.resolution
    x = torch.from_numpy(np.stack([reference.arrays[f"image{i}_{size}"] for i in range(len(reference.dicoms))]))
    with torch.inference_mode():
        logits = bundle.classifier(x).numpy()
    probs = torch.sigmoid(torch.from_numpy(logits)).numpy()  # float32, as the pipeline computes them
    theirs = reference.arrays
    # float32 rounding: oneDNN picks its convolution kernels by memory layout and threads, and in a
    # full-suite run ResNet50 at 512 px differed by 1.4e-3 in one logit (2.2e-4 in probability)
    # where a run of this module alone matched to the bit. A wrong weight mapping is off by > 0.1.
    assert np.abs(logits - theirs[f"{name}_logits"][:, keep]).max() < 5e-3  # logits span about [-4, 4]
    assert np.abs(probs - theirs[f"{name}_probs"][:, keep]).max() < 1e-3
    # the bundle's thresholds are op_threshs: present exactly when torchxrayvision's op_norm >= 0.5
    present = probs >= np.array(bundle.thresholds)
    assert (present == (theirs[f"{name}_op_norm"][:, keep] >= 0.5)).all()
    assert (present.any(axis=0) & ~present.all(axis=0)).all()  # both outcomes, for every output
    assert list(bundle.labels) == [model.labels[i] for i in keep]


@pytest.mark.parametrize("name", ["densenet121-res224-all", "resnet50-res512-all"])
def test_the_node_pipeline_gives_torchxrayvisions_probabilities(name: str, reference: Reference,
                                                                 bundles: dict[str, Path]) -> None:  # fmt: skip
    """From the DICOM file through the node's decode, preprocessing and optimised network."""
    pipeline = ChestXrayPipeline(bundles[name], "cpu")
    keep = XRV_MODELS[name].kept()
    for i, path in enumerate(reference.dicoms):
        (result,) = pipeline.run([pydicom.dcmread(path)])
        ours = np.array([f.probability for f in result.findings])
        assert np.abs(ours - reference.arrays[f"{name}_probs"][i, keep]).max() < 1e-3, path.name  # as above
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        shapes = {m.shape for m in (*result.regions.values(), *result.heatmaps.values())}
        assert result.regions and shapes == {(ds.Rows, ds.Columns)}


def test_imported_bundle_says_where_it_came_from(reference: Reference, bundles: dict[str, Path]) -> None:
    meta = load_bundle(bundles["densenet121-res224-all"]).metadata
    file = reference.folder / reference.index["models"]["densenet121-res224-all"]["file"]
    assert meta.source is not None and meta.source.third_party and not meta.demo
    assert meta.source.library == "torchxrayvision" and meta.source.model == "densenet121-res224-all"
    assert meta.source.weights_file == file.name and meta.source.dropped_outputs == []
    assert "PadChest" in meta.source.trained_on and "CheXpert" in meta.description and "Third-party" in meta.description
    assert meta.labels == PATHOLOGIES and meta.thresholds["Lung Opacity"] == pytest.approx(0.20204692)
    assert meta.preprocessing.scaling == "torchxrayvision" and meta.preprocessing.crop == "center"
    assert meta.input_size.classifier == 224 and meta.networks.classifier.architecture == "DenseNet121"
    # untrained outputs are dropped, with the reason on record
    nih = load_bundle(bundles["densenet121-res224-nih"]).metadata
    assert len(nih.labels) == 14 and nih.source is not None
    assert nih.source.dropped_outputs == ["14:(unnamed)", "15:(unnamed)", "16:(unnamed)", "17:(unnamed)"]
    r50 = load_bundle(bundles["resnet50-res512-all"]).metadata
    assert r50.source is not None and r50.source.dropped_outputs == ["14:Lung Lesion", "17:Enlarged Cardiomediastinum"]


def test_a_wrong_checksum_or_model_is_refused(reference: Reference, seg_run: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    file = reference.folder / reference.index["models"]["densenet121-res224-all"]["file"]
    args = ["import-xrv", "--weights", str(file), "--out", str(tmp_path / "b"), "--version", "1",
            "--segmentation-run", str(seg_run)]  # fmt: skip
    assert main([*args, "--model", "densenet121-res224-all", "--sha256", "0" * 64]) == 2
    assert f"is not the expected {'0' * 64}" in capsys.readouterr().err
    assert main([*args, "--model", "resnet50-res512-all"]) == 2  # a DenseNet file named as the ResNet50
    assert "do not fit resnet50-res512-all" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop(wait=False)


@pytest.mark.skipif(not have("Orthanc", "storescu", "dciodvfy"), reason="needs Orthanc, DCMTK, dicom3tools")
def test_an_imported_torchxrayvision_model_runs_end_to_end(bundles: dict[str, Path], pacs: Orthanc,
                                                           tmp_path: Path) -> None:  # fmt: skip
    job = run_one_study(tmp_path / "node", bundles["densenet121-res224-all"], pacs, RG1, "1.0.0", timeout=240)
    assert job["model_version"] == "1.0.0" and "sr" in [o["kind"] for o in job["outputs"]]
    for kind, ds in received_outputs(pacs, job, tmp_path):  # in Orthanc, in the study, dciodvfy clean
        assert ds.Manufacturer == "torchxrayvision, third-party", kind
        if kind == "sr":
            assert ds.SOPClassUID == SR_CLASS
            text = json.dumps(ds.to_json_dict())
            assert "torchxrayvision densenet121-res224-all" in text  # the algorithm's name
            for label in PATHOLOGIES:  # all 18 findings, each by its code
                code = FINDING_CODES[label]
                assert f'"{code.value}"' in text and code.meaning in text, label
            assert DEMO_DISCLAIMER.upper() not in text.upper()  # third-party weights, not demo weights
