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
