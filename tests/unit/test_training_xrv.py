"""The torchxrayvision importer's parts that need no torchxrayvision: the restricted reader, the
name mapping, the model table, and pipelines/xrv.py's preprocessing. Parity with torchxrayvision
itself is tests/integration/test_xrv_import.py."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from monai.networks.nets import DenseNet121
from pydicom.data import get_testdata_file

from node.writers.codes import FINDING_CODES
from pipelines import xrv
from pipelines.base import InputError
from pipelines.imaging import to_display
from training.xrv import XRV_MODELS, XrvImportError, read_weights, to_registry


class _Payload:
    """What a hostile weight file would carry: a call to os.system when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True])
def test_the_reader_executes_nothing_from_a_file(legacy: bool, tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(XrvImportError, match=r"refers to (posix|os)\.system, which is not on the allow-list .*nothing was executed"):
        read_weights(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # an unrestricted load runs it: the payload is real
    assert marker.exists()


def test_the_reader_takes_state_dicts_and_refuses_other_content(tmp_path: Path) -> None:
    torch.save({"module.fc.weight": torch.ones(2, 3)}, tmp_path / "dp.pt")  # a DataParallel state dict
    assert list(read_weights(tmp_path / "dp.pt")) == ["fc.weight"]
    torch.save({"fc.weight": 3}, tmp_path / "int.pt")
    with pytest.raises(XrvImportError, match="entry 'fc.weight' is a int, not a tensor"):
        read_weights(tmp_path / "int.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(XrvImportError, match="holds a list, not a module or a state dict"):
        read_weights(tmp_path / "list.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a weight file")
    with pytest.raises(XrvImportError, match="junk.pt"):
        read_weights(tmp_path / "junk.pt")


def _xrv_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MONAI DenseNet121 names -> torchxrayvision's (the inverse of the importer's mapping)."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"(denselayer\d+)\.layers\.", r"\1.", k).replace("class_layers.out.", "classifier.")
        out[k] = v
    return out


def test_mapping_keeps_the_trained_outputs_and_the_forward() -> None:
    torch.manual_seed(0)
    full = DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).eval()
    model = XRV_MODELS["densenet121-res224-nih"]  # 14 trained outputs, 4 untrained
    net, spec = to_registry(_xrv_names(full.state_dict()), model)
    assert spec["architecture"] == "DenseNet121" and spec["args"]["out_channels"] == 14
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net(x), full(x)[:, model.kept()])
    with pytest.raises(XrvImportError, match="densenet121-res224-all has 18 outputs, the file's classifier.weight has 14"):
        to_registry(_xrv_names(DenseNet121(spatial_dims=2, in_channels=1, out_channels=14).state_dict()),
                    XRV_MODELS["densenet121-res224-all"])  # fmt: skip
    with pytest.raises(XrvImportError, match="do not fit resnet50-res512-all"):
        to_registry(_xrv_names(full.state_dict()), XRV_MODELS["resnet50-res512-all"])


def test_the_model_table_is_torchxrayvisions() -> None:
    assert len(XRV_MODELS) == 8
    for name, m in XRV_MODELS.items():
        assert len(m.labels) == len(m.op_threshs) == 18 and m.url.endswith("/" + m.file), name
        assert m.resolution == (512 if m.architecture == "ResNet50" else 224) and m.trained_on
        for i in m.kept():
            assert 0 < m.op_threshs[i] < 1 and m.labels[i] in FINDING_CODES, (name, i)  # every kept finding has a code
    assert len(XRV_MODELS["densenet121-res224-all"].kept()) == 18
    assert [XRV_MODELS["densenet121-res224-rsna"].labels[i] for i in XRV_MODELS["densenet121-res224-rsna"].kept()] == [
        "Pneumonia", "Lung Opacity"]  # fmt: skip


# ---- pipelines/xrv.py --------------------------------------------------------------------------


def test_normalize_and_center_crop_as_the_library_defines_them() -> None:
    img = np.array([[0, 255], [128, 64]], np.uint8)
    np.testing.assert_array_equal(xrv.normalize(img, 255), (2 * (img.astype(np.float32) / 255) - 1.0) * 1024)
    assert xrv.normalize(img, 255).dtype == np.float32 and xrv.normalize(img, 255).min() == -1024
    with pytest.raises(InputError, match=r"max image value \(255\) higher than expected bound \(254\)"):
        xrv.normalize(img, 254)
    assert xrv.center_box((100, 60)) == (20, 80, 0, 60)  # portrait: the middle rows
    assert xrv.center_box((60, 101)) == (0, 60, 20, 80)  # landscape: x // 2 - crop // 2
    assert xrv.center_box((7, 7)) == (0, 7, 0, 7)


def test_stored_pixels_invert_monochrome1_against_bits_stored() -> None:
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))  # MONOCHROME1, 15 bits stored
    stored = ds.pixel_array
    img = xrv.stored_pixels(ds)
    maxval = 2**15 - 1
    np.testing.assert_array_equal(img, xrv.normalize(maxval - stored, maxval))
    assert -1024 <= img.min() and img.max() <= 1024
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb.dcm"))
    with pytest.raises(InputError, match="torchxrayvision reads MONOCHROME1/2 only, not Photometric Interpretation 'RGB'"):
        xrv.stored_pixels(rgb)


def test_classifier_batch_keeps_order_sizes_and_boxes() -> None:
    """A batch of differently sized images: one (N, 1, s, s) tensor, in order, each with its own
    centre box, stored and display pixels both in torchxrayvision's range."""
    rg1 = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    small = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    small.PixelData = rg1.pixel_array[:600, :900].copy().tobytes()  # a landscape crop of the same image
    small.Rows, small.Columns = 600, 900
    images = [rg1, small, rg1]
    displays = [to_display(d) for d in images]
    for pixels in ("stored", "display"):
        x, boxes = xrv.classifier_batch(images, displays, 64, pixels)
        assert x.shape == (3, 1, 64, 64) and x.dtype == torch.float32
        assert boxes == [xrv.center_box((1955, 1841)), (0, 600, 150, 750), xrv.center_box((1955, 1841))]
        torch.testing.assert_close(x[0], x[2])
        assert not torch.equal(x[0], x[1]) and -1024 <= float(x.min()) and float(x.max()) <= 1024
    with pytest.raises(ValueError, match="pixels must be 'stored' or 'display', not 'raw'"):
        xrv.classifier_batch(images, displays, 64, "raw")
