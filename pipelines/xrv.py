"""torchxrayvision's classifier input, as the library defines it (torchxrayvision 1.5.x).

A bundle imported with `python -m training import-xrv` has `preprocessing.scaling:
torchxrayvision` and `crop: center`; its classifier sees exactly what torchxrayvision's own
pipeline gives its models:

    utils.read_xray_dcm (pixels: stored)   stored values, MONOCHROME1 inverted (2^BitsStored - 1 - v),
                                           no Modality or VOI LUT
    utils.normalize(img, maxval)           (2 * img / maxval - 1) * 1024, i.e. [-1024, 1024], float32
    datasets.XRayCenterCrop                the centred square of side min(Rows, Columns)
    datasets.XRayResizer(size)             skimage.transform.resize(mode="constant", preserve_range=True)
                                           (bilinear with skimage's anti-aliasing when shrinking)
    one channel                            (1, size, size)

`pixels: display` starts from the node's rendering instead (pipelines.imaging.to_display, in
[0, 1], scaled with maxval 1): torchxrayvision's models were trained on 8-bit PNG/JPEG
renderings, which a DICOM's stored values may not resemble. The functions are written as the
library's (same expressions, same order, same dtypes) so the parity test can compare them with
torchxrayvision's own on the same pixels. No torchvision or torchxrayvision import here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from pydicom import Dataset
from skimage.transform import resize

from pipelines.base import Crop, InputError

__all__ = ["XRV_RANGE", "center_box", "classifier_batch", "normalize", "resize_square", "stored_pixels"]

XRV_RANGE = 1024.0  # torchxrayvision's models take [-1024, 1024]


def normalize(img: np.ndarray, maxval: float) -> np.ndarray:
    """torchxrayvision.utils.normalize: [0, maxval] -> [-1024, 1024] as float32.

    Values above maxval are refused, as the library refuses them (they would leave the range).
    """
    if img.max() > maxval:
        raise InputError(f"max image value ({img.max()}) higher than expected bound ({maxval})")
    return (2 * (img.astype(np.float32) / maxval) - 1.0) * 1024


def stored_pixels(ds: Dataset) -> np.ndarray:
    """torchxrayvision.utils.read_xray_dcm with its defaults: stored values in [-1024, 1024].

    MONOCHROME1 is inverted against 2^BitsStored - 1; no Modality or VOI LUT is applied.
    Other photometric interpretations are refused, as the library refuses them.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise InputError(f"torchxrayvision reads MONOCHROME1/2 only, not Photometric Interpretation {photometric!r}")
    maxval = 2 ** int(ds.BitsStored) - 1
    try:
        data = ds.pixel_array  # decoded once: pydicom caches it (to_display decoded it already)
    except Exception as e:  # any decoder failure is a permanent input problem here
        raise InputError(f"cannot decode pixel data: {e}") from e
    if photometric == "MONOCHROME1":
        data = maxval - data
    return normalize(data, maxval)


def center_box(shape: tuple[int, int]) -> Crop:
    """torchxrayvision.datasets.XRayCenterCrop: the centred square of side min(H, W), as a box."""
    y, x = shape
    crop = min(y, x)
    x0, y0 = x // 2 - crop // 2, y // 2 - crop // 2
    return y0, y0 + crop, x0, x0 + crop


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """torchxrayvision.datasets.XRayResizer(size) (engine skimage): (1, H, W) -> (1, size, size) float32."""
    return resize(img, (1, size, size), mode="constant", preserve_range=True).astype(np.float32)


def classifier_batch(
    datasets: Sequence[Dataset], displays: Sequence[np.ndarray], size: int, pixels: str
) -> tuple[torch.Tensor, list[Crop]]:
    """(N, 1, size, size) classifier input and each image's crop box (for the heatmap).

    pixels: "stored" (torchxrayvision's DICOM reader) or "display" (the node's rendering).
    """
    if pixels not in ("stored", "display"):
        raise ValueError(f"pixels must be 'stored' or 'display', not {pixels!r}")
    out, boxes = [], []
    for ds, display in zip(datasets, displays, strict=True):
        img = stored_pixels(ds) if pixels == "stored" else normalize(display, 1.0)
        if img.shape != display.shape:
            raise InputError(f"decoded shape {img.shape} differs from the display image {display.shape}")
        box = center_box(img.shape)
        y0, y1, x0, x1 = box
        out.append(torch.from_numpy(resize_square(img[None, y0:y1, x0:x1], size)))
        boxes.append(box)
    return torch.stack(out), boxes
