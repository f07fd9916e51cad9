"""Data set loaders on tiny copies of the download layouts (and the real cxr-samples JPEGs)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipelines.imaging import to_display
from tests.unit import training_data
from training.datasets import DatasetError, load_dataset, load_image, load_mask
from training.datasets.kermany import kermany_patient
from training.datasets.rsna import RSNA_CLASSES
from training.synthetic import LABELS, generate, write_dataset


def test_kermany_real_samples(tmp_path: Path) -> None:
    ds = load_dataset({"format": "kermany"}, training_data.kermany(tmp_path))
    assert ds.labels == ("Pneumonia",) and len(ds.records) == 8
    assert ds.class_counts() == {"Pneumonia": 4}
    splits = ds.split(val=0.0, test=0.0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [4, 2, 2]  # download's folders kept
    img = load_image(splits["train"][0].image)
    assert img.dtype == np.float32 and img.ndim == 2 and img.shape[0] > 900 and 0 <= img.min() < img.max() <= 1
    assert kermany_patient("person1946_bacteria_4874.jpeg") == "person1946"
    assert kermany_patient("NORMAL2-IM-1427-0001.jpeg") == "NORMAL2-IM-1427"
    assert kermany_patient("IM-0115-0001.jpeg") == "IM-0115"


def test_kermany_empty_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no images in"):
        load_dataset({"format": "kermany"}, tmp_path)


def test_rsna_boxes_classes_and_dicom_decoding(tmp_path: Path) -> None:
    root = training_data.rsna(tmp_path)
    ds = load_dataset({"format": "rsna"}, root)
    assert ds.labels == RSNA_CLASSES
    assert ds.class_counts() == {"Lung Opacity": 2, "No Lung Opacity / Not Normal": 2, "Normal": 2}
    first = ds.records[0]
    assert first.patient == "pid-0000" and first.boxes == ((10, 20, 30, 25), (55, 20, 25, 30))
    assert ds.records[2].boxes == ()
    # the node's decoder: MONOCHROME1 + window -> the display image we wrote
    img = load_image(first.image)
    np.testing.assert_array_equal(img, to_display(pydicom.dcmread(first.image)))
    np.testing.assert_allclose(img, generate(0, training_data.SEED, 96).image, atol=1 / 4000)


def test_rsna_class_box_disagreement(tmp_path: Path) -> None:
    root = training_data.rsna(tmp_path)
    text = (root / "stage_2_detailed_class_info.csv").read_text().replace("pid-0005,Normal", "pid-0005,Lung Opacity")
    (root / "stage_2_detailed_class_info.csv").write_text(text)
    with pytest.raises(DatasetError, match="pid-0005: class 'Lung Opacity' disagrees with 0 boxes"):
        load_dataset({"format": "rsna"}, root)


def test_nih_multilabel_split_by_patient(tmp_path: Path) -> None:
    root = training_data.nih(tmp_path, n=30, patients=10)
    ds = load_dataset({"format": "nih"}, root)
    assert ds.labels == LABELS and ds.multi_label
    y = np.array([r.labels for r in ds.records])
    assert y.shape == (30, 15) and np.array_equal(y[:, -1] == 1, y[:, :-1].sum(1) == 0)
    assert sum(ds.class_counts().values()) == int(y.sum())
    splits = ds.split(val=0.2, test=0.2, seed=3)
    patients = {s: {r.patient for r in rs} for s, rs in splits.items()}
    assert [len(patients[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert sum(len(v) for v in splits.values()) == 30
    assert ds.split(val=0.2, test=0.2, seed=3) == splits  # deterministic
    assert ds.split(val=0.2, test=0.2, seed=4) != splits
    summary = ds.summary(splits)
    assert summary["splits"]["test"]["patients"] == 2  # type: ignore[index]
    # the download's official test list wins over the fractions
    (root / "test_list.txt").write_text("00000000_000.png\n00000010_000.png\n")
    fixed = load_dataset({"format": "nih"}, root).split(val=0.2, test=0.2)
    assert sorted(r.image.name for r in fixed["test"]) == ["00000000_000.png", "00000010_000.png"]


def test_nih_unknown_label(tmp_path: Path) -> None:
    root = training_data.nih(tmp_path, n=3)
    table = root / "Data_Entry_2017.csv"
    table.write_text(table.read_text().replace("00000001_000.png,", "00000001_000.png,Covid|", 1))
    with pytest.raises(DatasetError, match=r"unknown labels \['Covid'\]"):
        load_dataset({"format": "nih"}, root)


@pytest.mark.parametrize("montgomery", [True, False])
def test_lung_masks_layouts(tmp_path: Path, montgomery: bool) -> None:
    root = training_data.lung_masks(tmp_path, n=4, montgomery=montgomery)
    ds = load_dataset({"format": "lung_masks"}, root)
    assert len(ds.records) == 4 and len(ds.records[0].masks) == (2 if montgomery else 1)
    assert ds.records[1].patient == ("MCUCXR_0001" if montgomery else "CHNCXR_0001")
    img = load_image(ds.records[1].image)
    mask = load_mask(ds.records[1].masks, img.shape)
    np.testing.assert_array_equal(mask, generate(1, training_data.SEED, 96).mask)


def test_generic_csv_and_dicom_folder(tmp_path: Path) -> None:
    for i in range(4):
        training_data.write_dicom(generate(i, 1, 64).image, tmp_path / "dcm" / f"sub{i % 2}" / f"{i}.dcm", f"P{i // 2}", f"1.2.3.{i}")
    with (tmp_path / "dcm" / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["sop_instance_uid", "Effusion", "Nodule"], ["1.2.3.0", 1, 0], ["1.2.3.3", 0, 1]])
    ds = load_dataset({"format": "dicom_folder"}, tmp_path / "dcm")
    assert ds.labels == ("Effusion", "Nodule") and [r.patient for r in ds.records] == ["P0", "P1"]
    assert ds.records[1].image.name == "3.dcm" and ds.class_counts() == {"Effusion": 1, "Nodule": 1}

    (tmp_path / "labels.csv").write_text("path,patient_id,Effusion\ndcm/sub0/0.dcm,A,1\ndcm/sub1/1.dcm,A,0\n")
    ds = load_dataset({"format": "csv"}, tmp_path)
    assert [r.labels for r in ds.records] == [(1.0,), (0.0,)] and ds.records[0].patient == "A"
    (tmp_path / "labels.csv").write_text("path,Effusion\ndcm/sub0/0.dcm,2\n")
    with pytest.raises(DatasetError, match="label values must be 0 or 1"):
        load_dataset({"format": "csv"}, tmp_path)


def test_synthetic_set_reads_back_as_generic_csv_with_masks(tmp_path: Path) -> None:
    write_dataset(tmp_path / "syn", n_train=3, n_val=2, seed=4, size=64)
    ds = load_dataset({"format": "csv"}, tmp_path / "syn")
    assert ds.name == "synthetic" and ds.labels == LABELS
    assert [r.split for r in ds.records] == ["train"] * 3 + ["val"] * 2
    assert ds.summary()["synthetic"] == "true"  # what `training export` turns into demo: true
    s = generate(4, seed=4, size=64)
    img = load_image(ds.records[4].image)
    np.testing.assert_allclose(img, s.image, atol=1 / 65535)  # 16-bit PNG keeps the pixels
    np.testing.assert_array_equal(load_mask(ds.records[4].masks, img.shape), s.mask)
    assert ds.records[4].labels == tuple(float(v) for v in s.labels)
    manifest = tmp_path / "syn" / "dataset.json"
    manifest.write_text('{"name": "x", "images": 3}')
    with pytest.raises(DatasetError, match=r"keys \['images'\] are computed from the data"):
        load_dataset({"format": "csv"}, tmp_path / "syn")
    manifest.unlink()
    (tmp_path / "syn" / "masks" / "000001.png").unlink()
    with pytest.raises(DatasetError, match="000001.png is listed in .*labels.csv but missing"):
        load_dataset({"format": "csv"}, tmp_path / "syn")


def test_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset format 'mimic'"):
        load_dataset({"format": "mimic"}, tmp_path)
