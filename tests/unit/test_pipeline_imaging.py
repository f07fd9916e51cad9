"""to_display: real CR images (pydicom-data), compressed and not, and broken input."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from pipelines.base import InputError
from pipelines.imaging import to_display


def _read(name: str) -> Dataset:
    return pydicom.dcmread(get_testdata_file(name))


@pytest.fixture(scope="module")
def rg1() -> Dataset:
    return _read("RG1_UNCR.dcm")


def _regions(img: np.ndarray) -> tuple[float, float]:
    """Mean of both lung fields and of the mediastinum in RG1 (PA chest, 1955 x 1841)."""
    h, w = img.shape
    lungs = np.concatenate([
        img[h // 3 : h // 2, w // 5 : w // 3].ravel(), img[h // 3 : h // 2, 2 * w // 3 : 4 * w // 5].ravel()
    ])  # fmt: skip
    mediastinum = img[h // 3 : 2 * h // 3, w // 2 - 60 : w // 2 + 60]
    return float(lungs.mean()), float(mediastinum.mean())


def test_rg1_monochrome1_window_and_inversion(rg1: Dataset) -> None:
    assert rg1.PhotometricInterpretation == "MONOCHROME1" and rg1.BitsStored == 15
    img = to_display(rg1)
    assert img.dtype == np.float32 and img.shape == (1955, 1841)
    assert 0.0 <= img.min() and img.max() <= 1.0
    lungs, mediastinum = _regions(img)
    assert lungs < mediastinum - 0.15, (lungs, mediastinum)  # lungs dark, mediastinum bright


def test_rg1_window_matches_standard_formula(rg1: Dataset) -> None:
    # window 15000/30000 LINEAR (PS3.3 C.11.2.1.2.1), then MONOCHROME1 inversion
    stored = rg1.pixel_array.astype(np.float64)
    c, w = 15000 - 0.5, 30000 - 1
    expected = 1 - np.clip((stored - c) / w + 0.5, 0, 1)
    np.testing.assert_allclose(to_display(rg1), expected, atol=1e-5)


def test_j2k_and_uncompressed_agree(rg1: Dataset) -> None:
    j2k = _read("RG1_J2KR.dcm")
    assert j2k.file_meta.TransferSyntaxUID != rg1.file_meta.TransferSyntaxUID
    a, b = to_display(rg1), to_display(j2k)
    assert np.abs(a - b).mean() < 1e-3 and np.abs(a - b).max() < 0.05


def test_truncated_jpeg2000_raises_input_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _read("emri_small_jpeg_2k_lossless_too_short.dcm")
    with pytest.raises(InputError, match="Pixel Data|decode"):
        to_display(ds)


def test_truncated_uncompressed_raises_chained_input_error(rg1: Dataset) -> None:
    ds = copy.deepcopy(rg1)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(InputError, match="cannot decode pixel data") as info:
        to_display(ds)
    assert info.value.__cause__ is not None


def test_multiframe_raises(rg1: Dataset) -> None:
    ds = copy.deepcopy(rg1)
    ds.NumberOfFrames = 2
    with pytest.raises(InputError, match="multi-frame"):
        to_display(ds)


def test_missing_pixel_data_raises(rg1: Dataset) -> None:
    ds = copy.deepcopy(rg1)
    del ds.PixelData
    with pytest.raises(InputError, match="no Pixel Data"):
        to_display(ds)


def _image(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attrs: object) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    return ds


RAMP16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)  # 0..65520


def test_no_window_uses_percentiles() -> None:
    img = to_display(_image(RAMP16))
    assert img[0, 0] == 0.0 and img[-1, -1] == 1.0
    assert np.all(np.diff(img.ravel()) >= 0)  # monotone, brighter = higher


def test_rescale_then_first_of_several_windows() -> None:
    ds = _image(RAMP16, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=[31000, 0], WindowWidth=[2000, 10])
    img = to_display(ds)
    values = RAMP16.astype(np.float64) * 2 - 1000
    expected = np.clip((values - 30999.5) / 1999 + 0.5, 0, 1)
    np.testing.assert_allclose(img, expected, atol=1e-5)


def test_voi_lut_sequence() -> None:
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.LUTData = list(range(255, -1, -1))  # inverting LUT over stored values 0..255
    ds = _image(np.arange(256, dtype=np.uint8).reshape(16, 16), VOILUTSequence=[lut])
    img = to_display(ds)
    np.testing.assert_allclose(img.ravel(), np.arange(255, -1, -1) / 255, atol=1e-6)


def test_rgb_becomes_luminance() -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 1] = 255  # pure green
    img = to_display(_image(rgb, "RGB"))
    np.testing.assert_allclose(img, 0.587, atol=1e-3)
