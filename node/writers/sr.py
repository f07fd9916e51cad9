"""Comprehensive 3D SR (TID 1500 Measurement Report) of a pipeline's findings, as viewers draw it.

Layout, chosen from what OHIF 3.13 (extension cornerstone-dicom-sr) and @cornerstonejs/adapters
(Cornerstone3D ``MeasurementReport``, which OHIF uses to load an SR into its measurement panel)
read, and within TID 1500 so other readers keep working:

- Imaging Measurements holds only groups with a place in the image (``_common.outlines``):
  - a named region (the lung fields): TID 1410, its outline as a closed SCOORD POLYLINE "Image
    Region" on the source image, Finding (anatomy), Finding Category, Tracking Identifier (the
    region's name) and Tracking UID, the algorithm (TID 4019) and its label as a TEXT
    qualitative evaluation (DCM 121106 "Comment");
  - a finding above threshold (its Grad-CAM hot region) or a detection box: TID 1501, Finding,
    the algorithm, the probability (NUM, UCUM "1") INFERRED FROM the closed SCOORD POLYLINE on the
    source image (TID 300), the decision at the threshold (present / absent) for a classifier
    finding, and the label "Consolidation 0.53 (AI)" as a TEXT "Comment".
- Qualitative Evaluations: the AI statement, then each finding without an outline, as a CODE
  (present / absent, the coded question being the finding) and a TEXT naming the finding, its
  probability and threshold (DCMTK's dsr2html shows the values only).

What drove it, from the viewer's source:
- OHIF draws a measurement group (``_processTID1410Measurement`` for a group-level SCOORD,
  ``_processNonGeometricallyDefinedMeasurement`` for SCOORDs under its NUMs) on the instance its
  SCOORD's IMAGE child names. A group without any SCOORD gets empty coordinates, and
  ``_checkIfCanAddMeasurementsToDisplaySet`` then reads ``coords[0].ReferencedSOPSequence``: one
  such group stops the whole SR from loading. So findings without a place are not groups.
- "Yes, track measurements" loads the SR into the measurement panel with the adapters, one
  group at a time: the tool comes from the Tracking Identifier (``Cornerstone3DTools@^0.1.0:
  PlanarFreehandROI`` / ``...:RectangleROI``; a 4- or 5-point POLYLINE also finds the rectangle),
  the coordinates from the SCOORD under the group's first NUM (a freehand group without NUM
  fails on ``NUMGroup.MeasuredValueSequence``), the label from the DCM 121106 "Comment" TEXT.
  The panel then lists each finding and box by its label. A region group has a plain Tracking
  Identifier, so no adapter claims it: it is drawn with the SR, and the SEG carries the region.
- In the SR viewport before loading, OHIF labels a TID 1501 group with its Comment and its NUMs
  ("Probability: 0.53 1"), and a Finding Site as "363698007: Lung": hence none here.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any, cast

import highdicom as hd
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentItem,
    ContentSequence,
    CoordinatesForMeasurement,
    DeviceObserverIdentifyingAttributes,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from node.writers import codes
from node.writers._common import (
    Outline,
    ai_description,
    ai_statement,
    check_result,
    content_time,
    outlines,
    processing_equipment,
    stamp,
)
from node.writers.uids import result_uid
from pipelines.base import Finding, ModelInfo, PipelineResult

#: (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of an SR this one replaces.
Predecessor = tuple[str, str, str]

#: Tracking Identifiers by which @cornerstonejs/adapters picks the tool that edits a region when
#: OHIF loads the SR into its measurement panel: a freehand polygon; a rectangle (found from its
#: 5-point shape anyway, named for the same reason).
FREEHAND_TRACKING_ID = "Cornerstone3DTools@^0.1.0:PlanarFreehandROI"
RECTANGLE_TRACKING_ID = "Cornerstone3DTools@^0.1.0:RectangleROI"

def _image(source: Dataset) -> SourceImageForRegion:
    """The IMAGE item under an SCOORD, built from the UIDs alone: highdicom's
    from_source_image() needs a Modality, which secondary captures (e.g. from img2dcm) may lack."""
    return SourceImageForRegion(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
    )


def _algorithm(model: ModelInfo, threshold: float | None = None) -> AlgorithmIdentification:
    return AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=None if threshold is None else [f"threshold={threshold:g}"],
        family=codes.ARTIFICIAL_INTELLIGENCE,
        manufacturer=model.manufacturer,
    )


def _comment(text: str) -> TextContentItem:
    """A TEXT qualitative evaluation (DCM 121106 "Comment"): the label OHIF shows for a group."""
    return TextContentItem(name=codes.COMMENT, value=text, relationship_type=RelationshipTypeValues.CONTAINS)


def _region_group(
    source: Dataset, outline: Outline, tracking_uid: str, algorithm: AlgorithmIdentification
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of a named region: its outline as a closed SCOORD POLYLINE "Image Region" on
    ``source``, what it is (anatomy), and its label."""
    region = codes.region(outline.name)
    group = PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=region.label),
        referenced_region=ImageRegion(
            graphic_type=GraphicTypeValues.POLYLINE,  # closed: first point == last
            graphic_data=outline.points,
            source_image=_image(source),
        ),
        finding_type=region.type,
        finding_category=region.category,
        algorithm_id=algorithm,
    )
    group[0].ContentSequence.append(_comment(outline.text))
    return group


def _finding_group(
    source: Dataset, outline: Outline, threshold: float | None, tracking_uid: str, algorithm: AlgorithmIdentification
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of a finding's hot region or a detection box: the probability (or score)
    inferred from the outline (NUM > INFERRED FROM SCOORD POLYLINE > IMAGE, TID 300), the decision
    at the threshold for a classifier finding, and the label. The algorithm (with its threshold)
    is named once, on the group: TID 300's optional copy under the NUM would repeat the same five
    items in every group (a fifth of the document) and no reader needs it there."""
    assert outline.probability is not None  # findings and boxes have one
    concept = codes.finding_code(outline.name)
    probability = Measurement(
        name=codes.PROBABILITY, value=round(float(outline.probability), 6), unit=codes.NO_UNITS,
        referenced_coordinates=[CoordinatesForMeasurement(
            graphic_type=GraphicTypeValues.POLYLINE,  # closed: first point == last
            graphic_data=outline.points,
            source_image=_image(source),
        )],
    )  # fmt: skip
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid,
            identifier=RECTANGLE_TRACKING_ID if outline.kind == "box" else FREEHAND_TRACKING_ID,
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=None if threshold is None else [QualitativeEvaluation(
            name=concept, value=codes.PRESENT if outline.probability >= threshold else codes.ABSENT)],
    )  # fmt: skip
    group[0].ContentSequence.append(_comment(outline.text))
    return group


def _qualitative_evaluations(statement: str, findings: Sequence[tuple[Finding, str]]) -> ContainerContentItem:
    """TID 1500 "Qualitative Evaluations": the AI statement, then each finding without a place in
    the image as a CODE (present / absent) and a TEXT naming its probability and threshold."""
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    items: list[ContentItem] = [
        TextContentItem(name=codes.COMMENT, value=statement[:1024], relationship_type=RelationshipTypeValues.CONTAINS)
    ]
    for finding, where in findings:
        concept = codes.finding_code(finding.label)
        # DCMTK's dsr2html shows these items' values only, one after the other: "Absent" then
        # "Pulmonary edema: AI probability 0.05 (threshold 0.5)." reads as one sentence.
        items.append(CodeContentItem(
            name=concept, value=codes.PRESENT if finding.present else codes.ABSENT,
            relationship_type=RelationshipTypeValues.CONTAINS,
        ))  # fmt: skip
        items.append(TextContentItem(
            name=concept,
            value=f"{concept.meaning}: AI probability {finding.probability:.6g} "
                  f"(threshold {finding.threshold:g}){where}.",
            relationship_type=RelationshipTypeValues.CONTAINS,
        ))  # fmt: skip
    container.ContentSequence = ContentSequence(items)
    return container


def _predecessor_datasets(supersedes: Sequence[Predecessor]) -> list[Dataset]:
    datasets = []
    for study_uid, series_uid, sop_uid in supersedes:
        ds = Dataset()
        ds.StudyInstanceUID = hd.UID(study_uid)
        ds.SeriesInstanceUID = hd.UID(series_uid)
        ds.SOPInstanceUID = hd.UID(sop_uid)
        ds.SOPClassUID = Comprehensive3DSRStorage
        datasets.append(ds)
    return datasets


def _document(content: ContainerContentItem, **kwargs: Any) -> Comprehensive3DSR:
    """highdicom's Comprehensive3DSR of ``content``, without the three walks its constructor
    makes over a content tree it did not build: it deep-copies the tree, parses the copy back
    into content items and searches the original twice for the images it references. For an RG1
    SR (124 content items) that was 90 ms of the 130 ms build, on the turnaround's critical path
    (#12). Our tree is built with highdicom's templates above and references only the sources,
    which are the evidence. So the constructor gets the root container without its children (it
    builds the header, evidence and equipment from the sources as usual), and the tree is then
    attached as it is: the document's Content Sequence and the content highdicom reads back.
    tests/unit/test_writers_sr.py checks the bytes are those of the plain constructor."""
    root = ContainerContentItem(
        name=content.name,
        template_id=content.ContentTemplateSequence[0].TemplateIdentifier,
    )
    root.ContentSequence = ContentSequence([])  # the constructor searches it for references
    sr = Comprehensive3DSR(content=root, **kwargs)
    sr.ContentSequence = content.ContentSequence
    # highdicom keeps its parsed copy of the tree here (read by `sr.content`); ours is already parsed.
    sr._content = ContentSequence([content], is_root=True)
    return sr


def build_comprehensive_3d_sr(
    sources: Sequence[Dataset],
    results: Sequence[PipelineResult],
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    content_datetime: datetime.datetime,
    supersedes: Sequence[Predecessor] = (),
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """TID 1500 Measurement Report of ``results`` (one per source image); layout in the module
    docstring. Tracking UIDs derive from ``sop_instance_uid``, the source's position and what
    each outline is, and times from ``content_datetime``: a re-run writes the same document."""
    if len(sources) == 0 or len(sources) != len(results):
        raise ValueError(
            f"need one result per source image, got {len(sources)} sources "
            f"and {len(results)} results"
        )
    study_uids = {ds.StudyInstanceUID for ds in sources}
    if len(study_uids) != 1:
        raise ValueError(f"source images span several studies: {sorted(study_uids)}")
    for source, result in zip(sources, results, strict=True):
        check_result(source, result)
    for predecessor in supersedes:
        if len(predecessor) != 3:
            raise ValueError(f"supersedes items are (study, series, sop) UIDs, got {predecessor}")

    observer = ObserverContext(
        observer_type=codes.DEVICE_OBSERVER,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=model.device_uid,
            name=model.name,
            manufacturer_name=model.manufacturer,
            model_name=f"{model.name} {model.version}",
        ),
    )
    groups: list[MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations] = []
    # One algorithm identification per threshold, its items shared by the groups that name it:
    # they are never changed once built, and seven copies cost 4 ms of each SR (#12).
    algorithms: dict[float | None, AlgorithmIdentification] = {}

    def algorithm(threshold: float | None = None) -> AlgorithmIdentification:
        if threshold not in algorithms:
            algorithms[threshold] = _algorithm(model, threshold)
        return algorithms[threshold]

    unplaced: list[tuple[Finding, str]] = []
    for index, (source, result) in enumerate(zip(sources, results, strict=True)):
        placed = set()
        for outline in outlines(result):
            uid = result_uid(str(sop_instance_uid), str(index), outline.key)
            if outline.kind == "region":
                groups.append(_region_group(source, outline, uid, algorithm()))
                continue
            threshold = result.finding(outline.name).threshold if outline.kind == "finding" else None
            groups.append(_finding_group(source, outline, threshold, uid, algorithm(threshold)))
            placed.add(outline.name)
        where = f" (image {index + 1} of {len(sources)})" if len(sources) > 1 else ""
        unplaced += [(f, where) for f in result.findings if f.label not in placed]

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.CHEST_XRAY_PROCEDURE,
        imaging_measurements=groups or None,
    )
    report[0].ContentSequence.append(_qualitative_evaluations(ai_statement(model), unplaced))

    sr = _document(
        cast(ContainerContentItem, report[0]),  # MeasurementReport's root container
        evidence=list(sources),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.device_uid,
        series_description=ai_description("CXR findings", model),
        institution_name=institution_name,
        is_complete=True,
        is_final=False,  # unverified machine output: PRELIMINARY
        is_verified=False,
        previous_versions=_predecessor_datasets(supersedes) or None,
        performed_procedure_codes=[codes.CHEST_XRAY_PROCEDURE],
        contributing_equipment=[processing_equipment(model, content_datetime)],
        **content_time(content_datetime),
    )
    stamp(sr, content_datetime)
    return sr


__all__ = ["FREEHAND_TRACKING_ID", "RECTANGLE_TRACKING_ID", "Predecessor", "build_comprehensive_3d_sr"]
