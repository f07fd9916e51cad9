"""Coded concepts used by the writers: one table, nothing coded anywhere else.

A pipeline names things in plain words (``pipelines.base.PipelineResult``): finding labels,
region names, box labels. This module turns each name into its coded concept; a name without
one is refused by the writers with the known names listed.

Finding labels (ChestX-ray14 plus "No Finding", and the four more of torchxrayvision's 18
pathologies) map to SNOMED CT (SCT) concepts where one could be checked, else to DICOM (DCM)
codes, else to a private scheme. Provenance of each code is recorded in
``FINDING_CODE_PROVENANCE``:

- ``dicom``: the code/meaning pair appears in a DICOM PS3.16 context group (as
  shipped in pydicom's concept dictionary).
- ``browser``: checked against a SNOMED CT browser page (concept active).
- ``corroborated``: several independent public mappings agree; not checked
  against a SNOMED CT release.
- ``unverified``: best available guess; must be checked against a SNOMED CT
  release before clinical use.
- ``private``: no standard concept could be verified here; coded in pacsnode's private
  scheme ``99PACSNODE`` (DICOM PS3.16 reserves designators beginning with "99" for private
  schemes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes

# --- Finding labels ---------------------------------------------------------------------

NO_FINDING_LABEL = "No Finding"
#: pacsnode's private coding scheme (PS3.16 8.2: private designators begin with "99").
PRIVATE_SCHEME = "99PACSNODE"

FINDING_CODES: Mapping[str, CodedConcept] = MappingProxyType(
    {
        "Atelectasis": CodedConcept("46621007", "SCT", "Atelectasis"),
        "Cardiomegaly": CodedConcept("8186001", "SCT", "Cardiomegaly"),
        "Effusion": CodedConcept("60046008", "SCT", "Pleural effusion"),
        "Infiltration": CodedConcept("409609008", "SCT", "Radiologic infiltrate of lung"),
        "Mass": CodedConcept("4147007", "SCT", "Mass"),
        "Nodule": CodedConcept("786838002", "SCT", "Pulmonary nodule"),
        "Pneumonia": CodedConcept("233604007", "SCT", "Pneumonia"),
        "Pneumothorax": CodedConcept("36118008", "SCT", "Pneumothorax"),
        "Consolidation": CodedConcept("95436008", "SCT", "Lung consolidation"),
        "Edema": CodedConcept("19242006", "SCT", "Pulmonary edema"),
        "Emphysema": CodedConcept("87433001", "SCT", "Pulmonary emphysema"),
        "Fibrosis": CodedConcept("51615001", "SCT", "Fibrosis of lung"),
        "Pleural_Thickening": CodedConcept("78381009", "SCT", "Pleural thickening"),
        "Hernia": CodedConcept("84089009", "SCT", "Hiatal hernia"),
        NO_FINDING_LABEL: CodedConcept("281900007", "SCT", "No abnormality detected"),
        # torchxrayvision's (CheXpert's) four findings beyond ChestX-ray14
        "Lung Lesion": CodedConcept.from_code(codes.SCT.Lesion),
        "Fracture": CodedConcept("125605004", "SCT", "Fracture of bone"),
        "Lung Opacity": CodedConcept.from_code(codes.DCM.Opacity),
        "Enlarged Cardiomediastinum": CodedConcept("ENLCARDIOMED", PRIVATE_SCHEME, "Enlarged cardiomediastinum"),
    }
)

FINDING_CODE_PROVENANCE: Mapping[str, str] = MappingProxyType(
    {
        "Atelectasis": "corroborated",
        "Cardiomegaly": "corroborated",  # DICOM CID 12248 uses SCT 287272002 (fetal context)
        "Effusion": "dicom",
        "Infiltration": "corroborated",  # UMLS SNOMEDCT_US name; DICOM also has DCM 112121
        "Mass": "dicom",  # morphologic abnormality; finding site lung is implied by the report
        "Nodule": "browser",
        "Pneumonia": "corroborated",
        "Pneumothorax": "dicom",
        "Consolidation": "corroborated",
        "Edema": "corroborated",
        "Emphysema": "corroborated",
        "Fibrosis": "corroborated",
        "Pleural_Thickening": "unverified",
        "Hernia": "corroborated",  # ChestX-ray14 "Hernia" is read as hiatal hernia
        NO_FINDING_LABEL: "corroborated",
        "Lung Lesion": "dicom",  # SCT 52988006 (DICOM CID 6336 and others); finding site lung implied
        "Fracture": "corroborated",  # SCT 125605004, the top of SNOMED CT's fracture hierarchy
        "Lung Opacity": "dicom",  # DCM 112001, DICOM CID 6104: the code of the detector's boxes too
        "Enlarged Cardiomediastinum": "private",  # no SCT or DCM concept could be verified here
    }
)


def finding_code(label: str) -> CodedConcept:
    """The coded concept of a finding or detection label."""
    code = FINDING_CODES.get(label) or DETECTION_CODES.get(label)
    if code is None:
        known = sorted({*FINDING_CODES, *DETECTION_CODES})
        raise ValueError(f"no coded concept for finding label {label!r}; known: {known}")
    return code


# --- Report structure --------------------------------------------------------------------

#: Procedure reported (TID 1500): plain chest X-ray.
CHEST_XRAY_PROCEDURE = CodedConcept("399208008", "SCT", "Plain chest X-ray")
#: Anatomy: lung (DICOM CID 7151 / 4).
LUNG = CodedConcept.from_code(codes.SCT.Lung)
ANATOMICAL_STRUCTURE = CodedConcept.from_code(codes.SCT.AnatomicalStructure)
#: Finding type of a lung-opacity detection (see DETECTION_CODES).
OPACITY = CodedConcept.from_code(codes.DCM.Opacity)
#: Numeric measurement name and unit for a classifier output in [0, 1].
PROBABILITY = CodedConcept.from_code(codes.DCM.Probability)
NO_UNITS = CodedConcept.from_code(codes.UCUM.NoUnits)
#: Decision at the bundle threshold (DICOM CID 240 values).
PRESENT = CodedConcept.from_code(codes.SCT.Present)
ABSENT = CodedConcept.from_code(codes.SCT.Absent)
#: Free-text comment (disclaimer, provenance) in the report.
COMMENT = CodedConcept.from_code(codes.DCM.Comment)
#: TID 1500 "Qualitative Evaluations" container (UMLS C0034375).
QUALITATIVE_EVALUATIONS = CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
#: Observer type and algorithm family.
DEVICE_OBSERVER = CodedConcept.from_code(codes.DCM.Device)
ARTIFICIAL_INTELLIGENCE = CodedConcept.from_code(codes.cid7162.ArtificialIntelligence)
PROCESSING_EQUIPMENT = CodedConcept.from_code(codes.DCM.ProcessingEquipment)

#: Lung-opacity detections (the RSNA detector's boxes): finding type "Opacity" (DICOM CID 6102 /
#: 6104, chest CAD findings: "any circumscribed area that appears more nearly white than its
#: surround"); the label says where. No SNOMED CT concept for "lung opacity" could be checked
#: against a SNOMED CT release here, so the DICOM context-group code is used (provenance: dicom).
DETECTION_CODES: Mapping[str, CodedConcept] = MappingProxyType({"Lung Opacity": OPACITY})


# --- Named regions (segmentations) ---------------------------------------------------------


@dataclass(frozen=True)
class Region:
    """How a named region of a pipeline result is coded (SEG segment, SR finding)."""

    label: str  # what readers see, e.g. "Lung fields" (SEG segment label, SR and GSPS text)
    category: CodedConcept  # Segmented Property Category (DICOM CID 7150)
    type: CodedConcept  # Segmented Property Type (DICOM CID 7151 / 4)


REGIONS: Mapping[str, Region] = MappingProxyType(
    {"lungs": Region("Lung fields", ANATOMICAL_STRUCTURE, LUNG)}
)


def region(name: str) -> Region:
    """The coding of a region name of a pipeline result."""
    try:
        return REGIONS[name]
    except KeyError as e:
        raise ValueError(f"no coded concept for region {name!r}; known: {sorted(REGIONS)}") from e
