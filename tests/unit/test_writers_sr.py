import html
import re
import shutil
import subprocess

import pytest
from pydicom.uid import Comprehensive3DSRStorage
from writers_data import MODEL, fake_result, identity, needs_dciodvfy, probabilities, rg1, roundtrip

from node.writers.sr import build_comprehensive_3d_sr
from node.writers.validate import ValidationFailed, check, validate


def build(source, **kwargs):
    result = fake_result(source.Rows, source.Columns)
    return build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr"), **kwargs)


@pytest.fixture(scope="module")
def sr(source):
    return build(source)


def test_sr_round_trips_and_keeps_study(source, sr):
    back = roundtrip(sr)
    assert back.SOPClassUID == Comprehensive3DSRStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    assert back.PreliminaryFlag == "PRELIMINARY"
    assert "(DEMO)" in back.SeriesDescription and MODEL.version in back.SeriesDescription
    equipment = back.ContributingEquipmentSequence[-2]
    assert equipment.ManufacturerModelName == MODEL.name
    assert equipment.SoftwareVersions == MODEL.version


@needs_dciodvfy
def test_sr_has_no_dciodvfy_errors(sr):
    assert validate(sr) == []


def test_same_inputs_give_same_content_uids(source):
    first, second = build(source), build(source)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    uids = [
        item.UID
        for doc in (first, second)
        for item in _walk(doc.ContentSequence)
        if item.ValueType == "UIDREF"
    ]
    assert uids[: len(uids) // 2] == uids[len(uids) // 2 :]


def test_supersedes_references_predecessor(source):
    predecessor = (source.StudyInstanceUID, "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    back = roundtrip(build(source, supersedes=[predecessor]))
    study = back.PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == predecessor[0]
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == predecessor[1]
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == predecessor[2]


def test_mismatched_result_is_rejected_by_shape(source):
    wrong = fake_result(10, 10)
    with pytest.raises(ValueError, match=r"lung_mask has shape \(10, 10\)"):
        build_comprehensive_3d_sr([source], [wrong], MODEL, **identity("sr"))


@pytest.mark.skipif(shutil.which("dsr2html") is None, reason="no dsr2html (DCMTK)")
def test_dsr2html_names_every_finding_and_probability(sr, tmp_path):
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    rendered = subprocess.run(
        ["dsr2html", str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    text = re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", rendered)))
    groups = text.split("Measurement Group")
    for label, probability in probabilities().items():
        matching = [g for g in groups if f'Tracking Identifier = "{label}"' in g]
        assert len(matching) == 1, label
        assert f" {probability:g} " in matching[0], (label, probability)
    assert "AI RESULT" in text and MODEL.disclaimer.upper() in text


@needs_dciodvfy
def test_gate_catches_missing_reference():
    broken = build(rg1())
    evidence = broken.CurrentRequestedProcedureEvidenceSequence[0]
    del evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    with pytest.raises(ValidationFailed, match=r"Missing attribute Type 1 Required Element=<ReferencedSOPInstanceUID>"):
        check(broken)


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _boxes(source):
    """Two hand-made lung-opacity boxes (x, y, w, h, score) inside the source image."""
    rows, cols = int(source.Rows), int(source.Columns)
    return [(0.2 * cols, 0.3 * rows, 0.15 * cols, 0.2 * rows, 0.87), (0.6 * cols, 0.4 * rows, 0.1 * cols, 0.25 * rows, 0.42)]


def _opacity_groups(ds):
    report = ds.ContentSequence
    measurements = next(i for i in report if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    return [g for g in measurements.ContentSequence
            if any(getattr(c, "TextValue", "").startswith("Lung opacity") for c in g.ContentSequence)]  # fmt: skip


@pytest.fixture(scope="module")
def sr_with_boxes(source):
    result = fake_result(source.Rows, source.Columns)
    result.boxes = _boxes(source)
    return build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr"))


@needs_dciodvfy
def test_sr_with_boxes_has_no_dciodvfy_errors(sr_with_boxes):
    assert validate(sr_with_boxes) == []


def test_sr_boxes_are_closed_rectangles_with_their_scores(source, sr, sr_with_boxes):
    back = roundtrip(sr_with_boxes)
    groups = _opacity_groups(back)
    assert len(groups) == 2 and _opacity_groups(roundtrip(sr)) == []
    for group, (x, y, w, h, score) in zip(groups, _boxes(source), strict=True):
        items = {c.ConceptNameCodeSequence[0].CodeValue: c for c in group.ContentSequence}
        assert items["121071"].ConceptCodeSequence[0].CodeValue == "112001"  # finding: Opacity
        assert items["363698007"].ConceptCodeSequence[0].CodeValue == "39607008"  # finding site: lung
        assert "111001" in items  # algorithm name, as the other groups carry
        region = items["111030"]
        assert region.GraphicType == "POLYLINE"
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        expected = [x, y, x + w, y, x + w, y + h, x, y + h, x, y]
        assert list(region.GraphicData) == pytest.approx(expected, abs=1e-3)
        probability = [c for c in group.ContentSequence if c.ValueType == "NUM"]
        assert len(probability) == 1 and float(probability[0].MeasuredValueSequence[0].NumericValue) == pytest.approx(score)


def test_box_outside_the_image_is_rejected(source):
    result = fake_result(source.Rows, source.Columns)
    result.boxes = [(float(source.Columns) - 5, 0.0, 10.0, 10.0, 0.5)]
    with pytest.raises(ValueError, match="is not inside source"):
        build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr"))
