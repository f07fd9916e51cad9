import html
import re
import shutil
import subprocess
from io import BytesIO

import pytest
from highdicom.sr import Comprehensive3DSR
from pydicom.uid import Comprehensive3DSRStorage
from writers_data import (
    HEATMAPS,
    MODEL,
    boxes,
    fake_result,
    identity,
    jpeg_source,
    needs_dciodvfy,
    probabilities,
    rg1,
    roundtrip,
)

from node.writers import codes
from node.writers.sr import FREEHAND_TRACKING_ID, RECTANGLE_TRACKING_ID, build_comprehensive_3d_sr
from node.writers.validate import ValidationFailed, check, validate

IMAGING_MEASUREMENTS, MEASUREMENT_GROUP, TRACKING_UID, TRACKING_ID = "126010", "125007", "112040", "112039"
IMAGE_REGION, FINDING, COMMENT = "111030", "121071", "121106"


def build(source, with_boxes=False, **kwargs):
    result = fake_result(source.Rows, source.Columns)
    if with_boxes:
        result.boxes = boxes(source.Rows, source.Columns)
    return build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr"), **kwargs)


@pytest.fixture(scope="module")
def sr(source):
    return build(source, with_boxes=True)


def _name(item):
    return item.ConceptNameCodeSequence[0].CodeValue


def _groups(ds):
    [measurements] = [i for i in ds.ContentSequence if _name(i) == IMAGING_MEASUREMENTS]
    return [g for g in measurements.ContentSequence if _name(g) == MEASUREMENT_GROUP]


def _items(group):
    return {_name(c): c for c in group.ContentSequence}


def test_sr_round_trips_and_keeps_study(source, sr):
    back = roundtrip(sr)
    assert back.SOPClassUID == Comprehensive3DSRStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.PatientID == source.PatientID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    assert back.PreliminaryFlag == "PRELIMINARY"
    assert "(DEMO)" in back.SeriesDescription and MODEL.version in back.SeriesDescription
    assert (back.ManufacturerModelName, back.SoftwareVersions) == (MODEL.name, MODEL.version)
    equipment = back.ContributingEquipmentSequence[-2]
    assert equipment.ManufacturerModelName == MODEL.name
    assert equipment.SoftwareVersions == MODEL.version


@needs_dciodvfy
def test_sr_has_no_dciodvfy_errors(sr):
    assert validate(sr) == []


def _scoord(items):
    """The group's outline: its Image Region, or the SCOORD its first NUM is inferred from."""
    if IMAGE_REGION in items:
        return items[IMAGE_REGION]
    num = next(c for c in items.values() if c.ValueType == "NUM")
    return next(c for c in num.ContentSequence if c.ValueType == "SCOORD")


def _num(items):
    return next(c for c in items.values() if c.ValueType == "NUM")


def test_every_measurement_group_is_drawable_by_ohif(source, sr):
    """OHIF draws a group from its SCOORD (at group level, or under a NUM) on the image the
    SCOORD's IMAGE child names; a group without one stops the whole SR from loading."""
    groups = [_items(g) for g in _groups(roundtrip(sr))]
    assert len(groups) == 2 + 2 + 2  # two lung fields, two findings' hot regions, two boxes
    assert len({g[TRACKING_UID].UID for g in groups}) == len(groups)
    for items in groups:
        assert TRACKING_ID in items, "OHIF needs the Tracking Identifier"
        scoord = _scoord(items)
        assert scoord.GraphicType == "POLYLINE"
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        points = list(scoord.GraphicData)
        assert points[:2] == points[-2:], "closed polygon"


def test_findings_and_boxes_load_into_ohifs_measurement_panel(sr):
    """The Cornerstone3D adapters pick the tool from the Tracking Identifier, read the outline
    under the group's first NUM and take the label from the DCM 121106 Comment; region groups
    have a plain identifier (no adapter claims them) and no NUM."""
    groups = [_items(g) for g in _groups(roundtrip(sr))]
    assert {g[COMMENT].TextValue for g in groups} == {
        "Lung fields (AI)", "Consolidation 0.53 (AI)", "Edema 0.59 (AI)", "Lung Opacity 0.87 (AI)",
        "Lung Opacity 0.42 (AI)"}  # fmt: skip
    for items in groups:
        identifier = items[TRACKING_ID].TextValue
        if items[COMMENT].TextValue == "Lung fields (AI)":
            assert identifier == "Lung fields" and IMAGE_REGION in items
            assert not any(c.ValueType == "NUM" for c in items.values())
            continue
        rectangle = len(_scoord(items).GraphicData) == 10
        assert identifier == (RECTANGLE_TRACKING_ID if rectangle else FREEHAND_TRACKING_ID)
        assert IMAGE_REGION not in items and _num(items).ContentSequence


def test_each_located_finding_has_its_probability_and_decision(sr):
    groups = [_items(g) for g in _groups(roundtrip(sr))]
    for label in HEATMAPS:
        concept = codes.finding_code(label)
        [items] = [g for g in groups if g[FINDING].ConceptCodeSequence[0].CodeValue == concept.value]
        assert float(_num(items).MeasuredValueSequence[0].NumericValue) == pytest.approx(probabilities()[label])
        assert items[concept.value].ConceptCodeSequence[0].CodeValue == codes.PRESENT.value
        assert items[COMMENT].TextValue == f"{label} {probabilities()[label]:.2f} (AI)"


def test_findings_without_a_place_are_qualitative_evaluations(sr):
    back = roundtrip(sr)
    [container] = [i for i in back.ContentSequence if _name(i) == codes.QUALITATIVE_EVALUATIONS.value]
    assert container.ContentSequence[0].TextValue.startswith("AI RESULT")
    items = container.ContentSequence[1:]
    unplaced = {label: p for label, p in probabilities().items() if label not in HEATMAPS}
    assert len(items) == 2 * len(unplaced)
    for (label, p), decision, text in zip(unplaced.items(), items[::2], items[1::2], strict=True):
        concept = codes.finding_code(label)
        assert (decision.ValueType, _name(decision), _name(text)) == ("CODE", concept.value, concept.value)
        expected = codes.PRESENT if p >= 0.5 else codes.ABSENT
        assert decision.ConceptCodeSequence[0].CodeValue == expected.value
        assert text.TextValue == f"{concept.meaning}: AI probability {p:g} (threshold 0.5)."


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


def test_the_document_is_what_highdicoms_own_constructor_writes(source, monkeypatch):
    """The writer spares highdicom's constructor its walks over the content tree (sr._document):
    what it writes, and the content highdicom reads back from it, are the plain constructor's."""
    import node.writers.sr as writer

    predecessor = (source.StudyInstanceUID, "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2")
    fast = build(source, with_boxes=True, supersedes=[predecessor])
    monkeypatch.setattr(writer, "_document", lambda content, **kw: Comprehensive3DSR(content=content, **kw))
    plain = build(source, with_boxes=True, supersedes=[predecessor])
    assert len(list(_walk(plain.ContentSequence))) > 100
    assert _written(fast) == _written(plain)
    assert fast.content == plain.content
    assert [type(i) for i in fast.content[0].ContentSequence] == [type(i) for i in plain.content[0].ContentSequence]
    assert fast.CurrentRequestedProcedureEvidenceSequence == plain.CurrentRequestedProcedureEvidenceSequence


def _written(ds):
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


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
    with pytest.raises(ValueError, match=r"result.display has shape \(10, 10\)"):
        build_comprehensive_3d_sr([source], [wrong], MODEL, **identity("sr"))


def test_unknown_region_is_rejected_by_name(source):
    result = fake_result(source.Rows, source.Columns)
    result.regions["heart"] = result.regions["lungs"]
    with pytest.raises(ValueError, match="no coded concept for region 'heart'; known: \\['lungs'\\]"):
        build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr"))


def _dsr2html_text(ds, tmp_path) -> str:
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    rendered = subprocess.run(
        ["dsr2html", str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", rendered)))


@pytest.mark.skipif(shutil.which("dsr2html") is None, reason="no dsr2html (DCMTK)")
def test_dsr2html_names_every_finding_with_probability_and_decision(sr, tmp_path):
    text = _dsr2html_text(sr, tmp_path)
    groups = text.split("Measurement Group")
    for label, probability in probabilities().items():
        decision = "Present" if probability >= 0.5 else "Absent"
        if label in HEATMAPS:  # drawn: its probability, decision and label, in one group
            [group] = [g for g in groups if f"{label} {probability:.2f} (AI)" in g]
            assert f" {probability:g} 1 1 {decision} " in group, (label, group)
        else:  # read as one sentence: "Absent Pulmonary edema: AI probability 0.59 (threshold 0.5)."
            meaning = codes.finding_code(label).meaning
            assert f"{decision} {meaning}: AI probability {probability:g} (threshold 0.5)." in text, label
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


def test_boxes_are_closed_rectangles_with_their_scores(source, sr):
    groups = [_items(g) for g in _groups(roundtrip(sr))]
    rectangles = [g for g in groups if g[TRACKING_ID].TextValue == RECTANGLE_TRACKING_ID]
    assert len(rectangles) == 2
    for items, box in zip(rectangles, boxes(source.Rows, source.Columns), strict=True):
        assert items[FINDING].ConceptCodeSequence[0].CodeValue == codes.OPACITY.value
        assert "363698007" not in items  # no Finding Site: OHIF would label it "363698007: Lung"
        assert "111001" in items  # algorithm name, as the other groups carry
        expected = [box.x0, box.y0, box.x1, box.y0, box.x1, box.y1, box.x0, box.y1, box.x0, box.y0]
        assert list(_scoord(items).GraphicData) == pytest.approx(expected, abs=1e-3)
        assert float(_num(items).MeasuredValueSequence[0].NumericValue) == pytest.approx(box.score)
        assert codes.OPACITY.value not in items  # a score, no decision at a threshold


def test_box_outside_the_image_is_rejected(source):
    result = fake_result(source.Rows, source.Columns)
    [box, _] = boxes(source.Rows, source.Columns)
    result.boxes = [type(box)(float(source.Columns) - 5, 0.0, float(source.Columns) + 5, 10.0, box.label, 0.5)]
    with pytest.raises(ValueError, match="is not inside source"):
        build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr"))


def test_the_findings_kept_on_the_srs_row_are_what_the_sr_states():
    """The job engine records each SR's findings when it writes it (no study page parses the SR);
    the dashboard's reader of older SRs must read the same from the file."""
    from node.engine.inference import stated_findings
    from node.services.results import content_tree, findings

    source = jpeg_source()
    result = fake_result(source.Rows, source.Columns)
    sr = roundtrip(build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr", "1")))
    key = lambda f: f["label"]  # noqa: E731
    read, kept = sorted(findings(content_tree(sr)), key=key), sorted(stated_findings([result]), key=key)
    assert [f["label"] for f in read] == [f["label"] for f in kept] and len(kept) == len(result.findings)
    for r, k in zip(read, kept, strict=True):
        assert (r["decision"], r["threshold"]) == (k["decision"], k["threshold"]), k["label"]
        assert r["probability"] == pytest.approx(k["probability"], abs=1e-5), k["label"]
