"""Binary Segmentation of the lung fields."""

from __future__ import annotations

import numpy as np
from highdicom import AlgorithmIdentificationSequence
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.writers import codes
from node.writers._common import (
    ai_description,
    check_result,
    device_attributes,
    processing_equipment,
)
from node.writers.uids import result_uid
from pipelines.base import ModelInfo, PipelineResult

LUNG_SEGMENT_NUMBER = 1


def _has_valid_pixel_spacing(source: Dataset) -> bool:
    spacing = source.get("PixelSpacing")
    return spacing is None or (len(spacing) == 2 and all(float(v) > 0 for v in spacing))


def _geometry_source(source: Dataset) -> Dataset:
    """``source``, or a shallow view of it without an invalid (zero) Pixel Spacing.

    Some CR writers store PixelSpacing 0\\0; copied into the SEG it would make the SEG
    non-conformant, so the SEG then carries no Pixel Measures (as for an image without
    PixelSpacing). The caller's dataset is not modified.
    """
    if _has_valid_pixel_spacing(source):
        return source
    view = Dataset(dict(source._dict))
    view.file_meta = source.file_meta
    del view.PixelSpacing
    return view


def algorithm_identification(model: ModelInfo) -> AlgorithmIdentificationSequence:
    return AlgorithmIdentificationSequence(
        name=model.name[:64],
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=model.version,
    )


def build_segmentation(
    source: Dataset,
    result: PipelineResult,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
) -> Segmentation:
    """BINARY Segmentation of ``result.lung_mask`` (both lung fields, one segment) on ``source``."""
    check_result(source, result)
    mask = np.asarray(result.lung_mask, dtype=bool)
    if not mask.any():
        raise ValueError(f"lung mask of {source.SOPInstanceUID} is empty: nothing to segment")
    description = SegmentDescription(
        segment_number=LUNG_SEGMENT_NUMBER,
        segment_label="Lung fields",
        segmented_property_category=codes.ANATOMICAL_STRUCTURE,
        segmented_property_type=codes.LUNG,
        algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm_identification(model),
        tracking_uid=result_uid(str(sop_instance_uid), "segment", str(LUNG_SEGMENT_NUMBER)),
        tracking_id="Lung fields",
    )
    seg = Segmentation(
        source_images=[_geometry_source(source)],
        pixel_array=mask[np.newaxis],
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        **device_attributes(model),
        content_label="AI_LUNG_SEG",
        content_description=ai_description("lung segmentation", model),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[processing_equipment(model)],
    )
    seg.SeriesDescription = ai_description("lung segmentation", model)
    # General Image: Patient Orientation is Type 2C (no Image Orientation for a projection
    # radiograph); highdicom leaves it out.
    if "ImageOrientationPatient" not in source:
        seg.PatientOrientation = source.get("PatientOrientation")
    return seg
