import copy
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image
from pydicom.pixels import unpack_bits
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage
from writers_data import MODEL, boxes, fake_result, identity, needs_dciodvfy, roundtrip

from node.writers._common import outlines
from node.writers.gsps import LAYERS, SHUTTER_GROUP, TEXT_LAYER, build_presentation_state
from node.writers.validate import ValidationFailed, check, validate


@pytest.fixture(scope="module")
def result(source):
    result = fake_result(source.Rows, source.Columns)
    result.boxes = boxes(source.Rows, source.Columns)
    return result


@pytest.fixture(scope="module")
def gsps(source, result):
    return build_presentation_state(source, result, MODEL, **identity("gsps"))


def _annotations(ds, layer):
    return [a for a in ds.GraphicAnnotationSequence if a.GraphicLayer == layer]


def test_gsps_round_trips_and_references_source(source, gsps):
    back = roundtrip(gsps)
    assert back.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    series = back.ReferencedSeriesSequence[0]
    assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    expected = "INVERSE" if source.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    assert back.PresentationLUTShape == expected
    texts = [t.UnformattedTextValue for a in _annotations(back, TEXT_LAYER) for t in a.TextObjectSequence]
    assert any(t.startswith("AI RESULT: No Finding 0.89 (+)") for t in texts)
    assert any(MODEL.name in t and MODEL.version in t and "DEMO" in t for t in texts)


def test_each_kind_of_outline_is_a_layer_of_closed_polylines(source, result, gsps):
    back = roundtrip(gsps)
    assert [g.GraphicLayer for g in back.GraphicLayerSequence] == [*LAYERS.values(), TEXT_LAYER]
    drawn = outlines(result)
    for kind, layer in LAYERS.items():
        [annotation] = _annotations(back, layer)
        objects = annotation.GraphicObjectSequence
        mine = [o for o in drawn if o.kind == kind]
        assert len(objects) == len(mine) > 0
        for g, o in zip(objects, mine, strict=True):
            assert g.GraphicType == "POLYLINE" and g.GraphicAnnotationUnits == "PIXEL"
            np.testing.assert_allclose(np.asarray(g.GraphicData).reshape(-1, 2), o.points, atol=1e-3)
    [box_layer] = _annotations(back, LAYERS["box"])
    first = boxes(source.Rows, source.Columns)[0]
    assert list(box_layer.GraphicObjectSequence[0].GraphicData) == pytest.approx(
        [first.x0, first.y0, first.x1, first.y0, first.x1, first.y1, first.x0, first.y1, first.x0, first.y0], abs=1e-3)


def test_without_boxes_there_is_no_detection_layer(source):
    result = fake_result(source.Rows, source.Columns)
    back = roundtrip(build_presentation_state(source, result, MODEL, **identity("gsps")))
    assert LAYERS["box"] not in [g.GraphicLayer for g in back.GraphicLayerSequence]


def _shutter(ds, rows, cols) -> np.ndarray:
    """The bitmap display shutter as a (rows, cols) bool image."""
    g = SHUTTER_GROUP << 16
    h, w = ds[g | 0x0010].value, ds[g | 0x0011].value
    r0, c0 = (v - 1 for v in ds[g | 0x0050].value)
    plane = unpack_bits(ds[g | 0x3000].value)[: h * w].reshape(h, w).astype(bool)
    full = np.zeros((rows, cols), bool)
    full[r0:r0 + h, c0:c0 + w] = plane
    return full


def test_bitmap_shutter_holds_every_outline_and_its_label(source, result, gsps):
    back = roundtrip(gsps)
    assert (back.ShutterShape, back.ShutterOverlayGroup) == ("BITMAP", SHUTTER_GROUP)
    rows, cols = int(source.Rows), int(source.Columns)
    bitmap = _shutter(back, rows, cols)
    for o in outlines(result):
        corners = np.clip(np.round(o.points[:-1] - 0.5).astype(int), 0, [cols - 1, rows - 1])
        near = [bitmap[max(0, r - 2):r + 3, max(0, c - 2):c + 3].any() for c, r in corners]
        assert all(near), (o.key, "outline not in the shutter")
    # a label above each finding outline: set pixels in the band above it, left of its middle
    for o in (o for o in outlines(result) if o.kind == "finding"):
        left, top = int(o.points[:, 0].min()), int(o.points[:, 1].min())
        band = bitmap[max(0, top - rows // 20):max(1, top - 2), left:left + cols // 10]
        assert band.sum() > 20, (o.text, "no label above")


@needs_dciodvfy
def test_gsps_has_no_dciodvfy_or_dcmpschk_errors(gsps):
    assert validate(gsps) == []


@pytest.mark.skipif(shutil.which("dcmp2pgm") is None, reason="no dcmp2pgm (DCMTK)")
def test_dcmp2pgm_draws_outlines_and_labels_and_leaves_the_rest_of_the_image(source, gsps, tmp_path):
    """DCMTK's presentation-state renderer against the same image rendered without the GSPS:
    every shutter pixel is white, every other pixel unchanged."""
    image, ps = tmp_path / "image.dcm", tmp_path / "gsps.dcm"
    shown = copy.deepcopy(source)
    if shown.file_meta.TransferSyntaxUID.is_compressed:
        shown.decompress()  # dcmp2pgm registers no JPEG decoder; same image, same UIDs
    shown.save_as(image, enforce_file_format=True)
    gsps.save_as(ps, enforce_file_format=True)

    def render(*args: str) -> np.ndarray:
        out = tmp_path / f"out{len(args)}.pgm"
        subprocess.run(["dcmp2pgm", *args, str(image), str(out)], check=True, capture_output=True, timeout=120)
        return np.asarray(Image.open(out), dtype=np.uint8)

    plain, drawn = render(), render("-p", str(ps))
    bitmap = _shutter(roundtrip(gsps), int(source.Rows), int(source.Columns))
    assert drawn.shape == plain.shape == bitmap.shape
    assert (drawn[bitmap] == 255).all()
    np.testing.assert_array_equal(drawn[~bitmap], plain[~bitmap])
    assert (plain[bitmap] != 255).mean() > 0.3  # the drawing is visible: most of it was not white


@needs_dciodvfy
def test_gate_catches_missing_referenced_image(gsps):
    broken = roundtrip(gsps)
    del broken.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPClassUID
    with pytest.raises(ValidationFailed, match="ReferencedSOPClassUID"):
        check(broken)


@needs_dciodvfy
def test_gate_takes_dcmpschk_verdict_not_only_its_error_lines(gsps):
    # dcmpschk reports a failed semantic check as "W:" lines and exits 0.
    broken = roundtrip(gsps)
    broken.PresentationLUTShape = "BOGUS"
    assert "dcmpschk: unknown presentationLUTShape keyword: BOGUS" in validate(broken)


@needs_dciodvfy
def test_gate_tolerates_an_empty_patient_name_that_only_dcmtk_refuses(gsps, caplog):
    anonymous = roundtrip(gsps)
    anonymous.PatientName = ""  # Type 2: empty is conformant
    with caplog.at_level("WARNING", logger="node.writers.validate"):
        assert validate(anonymous) == []
    assert "patientName absent or empty" in caplog.text
