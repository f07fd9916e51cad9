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
