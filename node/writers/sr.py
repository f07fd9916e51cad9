"""Comprehensive 3D SR (TID 1500 Measurement Report) of chest X-ray classifier findings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
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
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage

from node.writers import codes
from node.writers._common import (
    ai_description,
    ai_statement,
    box_outline,
    check_result,
    lung_contours,
    processing_equipment,
)
from node.writers.uids import result_uid
from pipelines.base import Finding, ModelInfo, PipelineResult

#: (StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID) of an SR this one replaces.
Predecessor = tuple[str, str, str]



_Ref = TypeVar("_Ref", SourceImageForMeasurementGroup, SourceImageForRegion)


def _reference(cls: type[_Ref], source: Dataset) -> _Ref:
    """Image reference built from the UIDs alone: highdicom's from_source_image() needs a
    Modality, which secondary captures (e.g. from img2dcm) may lack."""
    return cls(
        referenced_sop_class_uid=source.SOPClassUID,
        referenced_sop_instance_uid=source.SOPInstanceUID,
    )

def _algorithm(model: ModelInfo, finding: Finding | None = None) -> AlgorithmIdentification:
    parameters = None if finding is None else [f"threshold={finding.threshold:g}"]
    return AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=parameters,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        manufacturer=model.manufacturer,
    )


def _finding_group(
    source: Dataset, finding: Finding, model: ModelInfo, tracking_uid: str
) -> MeasurementsAndQualitativeEvaluations:
    concept = codes.finding_code(finding.label)
    algorithm = _algorithm(model, finding)
    probability = Measurement(
        name=codes.PROBABILITY,
        value=round(float(finding.probability), 6),
        unit=codes.NO_UNITS,
        algorithm_id=algorithm,
    )
    decision = QualitativeEvaluation(
        name=concept, value=codes.PRESENT if finding.present else codes.ABSENT
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=tracking_uid, identifier=finding.label),
        finding_type=concept,
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=[decision],
        source_images=[_reference(SourceImageForMeasurementGroup, source)],
    )


def _region_group(
    source: Dataset, outline: np.ndarray, uid: str, identifier: str, model: ModelInfo, **kwargs: Any
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group: a closed SCOORD POLYLINE on ``source`` plus ``kwargs`` (finding type, ...)."""
    region = ImageRegion(
        graphic_type=GraphicTypeValues.POLYLINE,  # closed: first point == last
        graphic_data=outline,
        source_image=_reference(SourceImageForRegion, source),
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uid, identifier=identifier),
        referenced_region=region,
        algorithm_id=_algorithm(model),
        **kwargs,
    )


def _lung_groups(
    source: Dataset, result: PipelineResult, model: ModelInfo, uid_parts: tuple[str, ...]
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    return [
        _region_group(
            source, outline, result_uid(*uid_parts, "lung-region", str(index)), f"Lung field {index + 1}", model,
            finding_type=codes.LUNG, finding_category=codes.ANATOMICAL_STRUCTURE,
        )
        for index, outline in enumerate(lung_contours(result.lung_mask))
    ]  # fmt: skip


def _opacity_groups(
    source: Dataset, result: PipelineResult, model: ModelInfo, uid_parts: tuple[str, ...]
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """One TID 1410 group per detected lung opacity: closed rectangle and detection score."""
    return [
        _region_group(
            source, box_outline(box), result_uid(*uid_parts, "opacity", str(index)), f"Lung opacity {index + 1}", model,
            finding_type=codes.OPACITY, finding_sites=[FindingSite(codes.LUNG)],
            measurements=[Measurement(
                name=codes.PROBABILITY,  # the detector's score: sigmoid of its opacity logit
                value=round(float(box[4]), 6), unit=codes.NO_UNITS, algorithm_id=_algorithm(model),
            )],
        )
        for index, box in enumerate(result.boxes)
    ]  # fmt: skip


def _text_container(texts: Sequence[str]) -> ContainerContentItem:
    """TID 1500 "Qualitative Evaluations" container holding free-text comments."""
    container = ContainerContentItem(
        name=codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = ContentSequence(
        [
            TextContentItem(
                name=codes.COMMENT,
                value=text[:1024],
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
            for text in texts
        ]
    )
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


def build_comprehensive_3d_sr(
    sources: Sequence[Dataset],
    results: Sequence[PipelineResult],
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    supersedes: Sequence[Predecessor] = (),
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """TID 1500 Measurement Report of the findings for ``sources`` (one result per source).

    Per source image and finding: one TID 1501 group with the finding type, the algorithm
    (TID 4019), the probability (UCUM "1") and the decision at the threshold (present /
    absent); per lung outline: one TID 1410 group with a closed SCOORD POLYLINE; per detected
    lung opacity (``result.boxes``): one TID 1410 group with a closed rectangle, finding "Opacity"
    at site lung and the detection score. Tracking UIDs are
    derived from ``sop_instance_uid`` so a re-run gives the same document.
    """
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
            name=model.name[:64],
            manufacturer_name=model.manufacturer,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    groups: list[
        MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    for source_index, (source, result) in enumerate(zip(sources, results, strict=True)):
        uid_parts = (str(sop_instance_uid), str(source_index))
        for finding in result.findings:
            tracking_uid = result_uid(*uid_parts, "finding", finding.label)
            groups.append(_finding_group(source, finding, model, tracking_uid))
        groups.extend(_lung_groups(source, result, model, uid_parts))
        groups.extend(_opacity_groups(source, result, model, uid_parts))

    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.CHEST_XRAY_PROCEDURE,
        imaging_measurements=groups,
    )
    report[0].ContentSequence.append(_text_container([ai_statement(model)]))

    sr = Comprehensive3DSR(
        evidence=list(sources),
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        institution_name=institution_name,
        is_complete=True,
        is_final=False,  # unverified machine output: PRELIMINARY
        is_verified=False,
        previous_versions=_predecessor_datasets(supersedes) or None,
        performed_procedure_codes=[codes.CHEST_XRAY_PROCEDURE],
        contributing_equipment=[processing_equipment(model)],
    )
    sr.SeriesDescription = ai_description("CXR findings", model)
    sr.ManufacturerModelName = model.name[:64]
    sr.SoftwareVersions = model.version
    return sr


__all__ = ["Predecessor", "build_comprehensive_3d_sr"]
