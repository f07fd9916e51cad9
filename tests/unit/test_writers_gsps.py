
import pytest
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage
from writers_data import MODEL, fake_result, identity, needs_dciodvfy, roundtrip

from node.writers.gsps import build_presentation_state
from node.writers.validate import ValidationFailed, check, validate


@pytest.fixture(scope="module")
def gsps(source):
    result = fake_result(source.Rows, source.Columns)
    return build_presentation_state(source, result, MODEL, **identity("gsps"))


def test_gsps_round_trips_and_references_source(source, gsps):
    back = roundtrip(gsps)
    assert back.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    series = back.ReferencedSeriesSequence[0]
    assert series.ReferencedImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    expected = "INVERSE" if source.PhotometricInterpretation == "MONOCHROME1" else "IDENTITY"
    assert back.PresentationLUTShape == expected
    annotations = back.GraphicAnnotationSequence
    outlines = [g for a in annotations for g in a.get("GraphicObjectSequence", [])]
    assert len(outlines) == 2 and all(g.GraphicType == "POLYLINE" for g in outlines)
    texts = [t.UnformattedTextValue for a in annotations for t in a.get("TextObjectSequence", [])]
    assert any(t.startswith("AI RESULT: No Finding 0.89") for t in texts)
    assert any(MODEL.name in t and MODEL.version in t and "DEMO" in t for t in texts)


@needs_dciodvfy
def test_gsps_has_no_dciodvfy_or_dcmpschk_errors(gsps):
    assert validate(gsps) == []


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



def _boxes(source):
    rows, cols = int(source.Rows), int(source.Columns)
    return [(0.2 * cols, 0.3 * rows, 0.15 * cols, 0.2 * rows, 0.87), (0.6 * cols, 0.4 * rows, 0.1 * cols, 0.25 * rows, 0.42)]


@pytest.fixture(scope="module")
def gsps_with_boxes(source):
    result = fake_result(source.Rows, source.Columns)
    result.boxes = _boxes(source)
    return build_presentation_state(source, result, MODEL, **identity("gsps"))


@needs_dciodvfy
def test_gsps_with_boxes_has_no_dciodvfy_or_dcmpschk_errors(gsps_with_boxes):
    assert validate(gsps_with_boxes) == []


def test_gsps_draws_each_box_with_its_score(source, gsps, gsps_with_boxes):
    back = roundtrip(gsps_with_boxes)
    (layer,) = [a for a in back.GraphicAnnotationSequence if a.GraphicLayer == "AI_LUNG_OPACITY"]
    assert "AI_LUNG_OPACITY" in [g.GraphicLayer for g in back.GraphicLayerSequence]
    for g, (x, y, w, h, _) in zip(layer.GraphicObjectSequence, _boxes(source), strict=True):
        assert g.GraphicType == "POLYLINE" and g.GraphicAnnotationUnits == "PIXEL" and g.NumberOfGraphicPoints == 5
        assert list(g.GraphicData) == pytest.approx([x, y, x + w, y, x + w, y + h, x, y + h, x, y], abs=1e-3)
    assert [t.UnformattedTextValue for t in layer.TextObjectSequence] == ["Opacity 0.87", "Opacity 0.42"]
    # without boxes there is no box layer
    assert all(a.GraphicLayer != "AI_LUNG_OPACITY" for a in roundtrip(gsps).GraphicAnnotationSequence)
