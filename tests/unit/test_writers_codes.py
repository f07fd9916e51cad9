import pytest

from node.writers import codes

CHESTXRAY14 = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]


# torchxrayvision's 18 pathologies = ChestX-ray14's 14 + these
XRV_EXTRA = ["Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]


def test_every_label_has_one_concept_and_a_provenance():
    assert set(codes.FINDING_CODES) == {*CHESTXRAY14, "No Finding", *XRV_EXTRA}
    assert set(codes.FINDING_CODE_PROVENANCE) == set(codes.FINDING_CODES)
    for label, concept in codes.FINDING_CODES.items():
        provenance = codes.FINDING_CODE_PROVENANCE[label]
        scheme = {"dicom": ("SCT", "DCM"), "private": (codes.PRIVATE_SCHEME,)}.get(provenance, ("SCT",))
        assert concept.scheme_designator in scheme and concept.meaning, label
        if concept.scheme_designator in ("SCT", "DCM"):
            assert concept.value.isdigit(), label
    values = [(c.value, c.scheme_designator) for c in codes.FINDING_CODES.values()]
    assert len(set(values)) == len(values)
    assert codes.PRIVATE_SCHEME.startswith("99")  # PS3.16: private coding scheme designators


def test_dicom_provenance_means_the_code_is_in_pydicoms_dictionary():
    from pydicom.sr.codedict import codes as dicom_codes

    for label, concept in codes.FINDING_CODES.items():
        if codes.FINDING_CODE_PROVENANCE[label] == "dicom":
            scheme = getattr(dicom_codes, concept.scheme_designator)
            assert any(c.value == concept.value for c in (getattr(scheme, k) for k in dir(scheme))), label


def test_unknown_label_is_rejected_by_name():
    with pytest.raises(ValueError, match="'Support Devices'"):
        codes.finding_code("Support Devices")


def test_detection_labels_and_regions_are_coded_and_unknown_ones_named():
    assert codes.finding_code("Lung Opacity") == codes.OPACITY
    lungs = codes.region("lungs")
    assert (lungs.label, lungs.type, lungs.category) == ("Lung fields", codes.LUNG, codes.ANATOMICAL_STRUCTURE)
    with pytest.raises(ValueError, match=r"no coded concept for region 'liver'; known: \['lungs'\]"):
        codes.region("liver")
    with pytest.raises(ValueError, match="known: .*'Lung Opacity'"):
        codes.finding_code("Rib fracture")
