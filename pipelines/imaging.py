"""DICOM pixel data -> the image as a viewer shows it, float32 in [0, 1], higher = brighter.

`to_display` is the one decode path shared by the node and by training. It follows the
standard's grayscale pipeline (PS3.3 C.11, PS3.4 N.2.1.1): stored values -> Modality LUT
(rescale or LUT sequence) -> VOI LUT (sequence, else the first window, else a robust
percentile window) -> Presentation LUT (MONOCHROME1 inverted). Color images become luminance.

The common case (rescale and linear window) is computed in float32 with the standard's
formulas, because pydicom's float64 masks cost ~100 ms on a 2000 x 2000 radiograph;
LUT sequences go through pydicom.pixels (apply_modality_lut, apply_voi_lut).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from pipelines.base import InputError

__all__ = ["to_display"]

_PERCENTILES = (0.5, 99.5)  # window used when the image carries none
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")


def to_display(ds: Dataset) -> np.ndarray:
    """Decode a single-frame image to float32 (Rows, Columns) in [0, 1], higher = brighter.

    Raises InputError (the original exception chained) for multi-frame images, missing,
    truncated or undecodable pixel data and unsupported photometric interpretations.
    """
    if "PixelData" not in ds:
        raise InputError("dataset has no Pixel Data (7FE0,0010)")
    frames = ds.get("NumberOfFrames", 1)
    try:
        n_frames = int(frames) if frames not in (None, "") else 1
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid Number of Frames {frames!r}") from e
    if n_frames != 1:
        raise InputError(f"multi-frame images are not supported (Number of Frames = {n_frames})")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _MONOCHROME + _COLOR:
        raise InputError(f"unsupported Photometric Interpretation {photometric!r}")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not rows or not cols:
        raise InputError(f"missing or zero Rows/Columns ({rows!r} x {cols!r})")

    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        arr = ds.pixel_array
    except Exception as e:  # any decoder failure is a permanent input problem here
        raise InputError(
            f"cannot decode pixel data (transfer syntax {tsyntax}, {rows}x{cols}): {e}"
        ) from e
    if arr.shape[:2] != (rows, cols):
        raise InputError(f"decoded shape {arr.shape} does not match Rows x Columns {rows}x{cols}")

    if photometric in _COLOR:
        return _luminance(arr, ds, photometric)
    if arr.ndim != 2:
        raise InputError(f"expected one grayscale sample per pixel, decoded shape {arr.shape}")
    try:
        values = _modality(arr, ds)
        out = _voi(values, ds)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise InputError(f"invalid Modality/VOI LUT attributes: {e}") from e
    if photometric == "MONOCHROME1":
        np.subtract(1.0, out, out=out)
    return out


def _modality(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> modality values (float32)."""
    if "ModalityLUTSequence" in ds and ds.ModalityLUTSequence:
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
    slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _voi(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality values -> [0, 1] through the VOI LUT sequence, the first window or percentiles."""
    if "VOILUTSequence" in ds and ds.VOILUTSequence:
        item = ds.VOILUTSequence[0]
        bits = int(item.LUTDescriptor[2])
        # LUT inputs are integers (PS3.3 C.11.2.1.1): modality values are rounded
        lut_in = np.rint(values).astype(np.int64)
        out = np.asarray(apply_voi_lut(lut_in, ds, index=0, prefer_lut=True), dtype=np.float32)
        out *= np.float32(1.0 / (2**bits - 1))
        return np.clip(out, 0.0, 1.0, out=out)
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width is not None and width > 0:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        return _window(values, center, width, function)
    sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
    lo, hi = np.percentile(sample, _PERCENTILES)
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return _scale(values, float(lo), float(hi))


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT and SIGMOID windows, output range [0, 1]."""
    if function == "LINEAR":
        if width < 1:
            raise ValueError(f"Window Width {width} must be >= 1 for LINEAR")
        # y = ((x - (c - 0.5)) / (w - 1) + 0.5); width 1 is a step at the center
        lo = (center - 0.5) - (width - 1) / 2
        return _scale(values, lo, lo + max(width - 1, 1e-6))
    if function == "LINEAR_EXACT":
        return _scale(values, center - width / 2, center + width / 2)
    if function == "SIGMOID":
        out = values - np.float32(center)
        out *= np.float32(-4.0 / width)
        np.exp(out, out=out)
        out += 1.0
        return np.reciprocal(out, out=out)
    raise ValueError(f"unsupported VOI LUT Function {function!r}")


def _scale(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    out = values - np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def _first(value: object) -> float | None:
    """First value of a possibly multi-valued DS (several windows: take the first)."""
    if value is None or value == "":
        return None
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        if len(value) == 0:
            return None
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _luminance(arr: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    """Color image -> Rec. 601 luminance in [0, 1]."""
    if photometric == "PALETTE COLOR":
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise InputError(f"cannot apply the palette color LUT: {e}") from e
        full = 255.0 if arr.dtype == np.uint8 else 65535.0
    else:
        full = float(2 ** int(ds.get("BitsStored", 8)) - 1)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"expected 3 samples per pixel for {photometric}, decoded shape {arr.shape}")
    rgb = arr.astype(np.float32)
    out = rgb[..., 0] * np.float32(0.299) + rgb[..., 1] * np.float32(0.587) + rgb[..., 2] * np.float32(0.114)
    out *= np.float32(1.0 / full)
    return np.clip(out, 0.0, 1.0, out=out)
