import pytest

from node.writers import codes

CHESTXRAY14 = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]


def test_every_label_has_one_sct_concept_and_a_provenance():
    assert set(codes.FINDING_CODES) == {*CHESTXRAY14, "No Finding"}
    assert set(codes.FINDING_CODE_PROVENANCE) == set(codes.FINDING_CODES)
    for label, concept in codes.FINDING_CODES.items():
        assert concept.scheme_designator == "SCT", label
        assert concept.value.isdigit() and concept.meaning
    values = [c.value for c in codes.FINDING_CODES.values()]
    assert len(set(values)) == len(values)


def test_unknown_label_is_rejected_by_name():
    with pytest.raises(ValueError, match="'Fracture'"):
        codes.finding_code("Fracture")


def test_detection_labels_and_regions_are_coded_and_unknown_ones_named():
    assert codes.finding_code("Lung Opacity") == codes.OPACITY
    lungs = codes.region("lungs")
    assert (lungs.label, lungs.type, lungs.category) == ("Lung fields", codes.LUNG, codes.ANATOMICAL_STRUCTURE)
    with pytest.raises(ValueError, match=r"no coded concept for region 'liver'; known: \['lungs'\]"):
        codes.region("liver")
    with pytest.raises(ValueError, match="known: .*'Lung Opacity'"):
        codes.finding_code("Rib fracture")
