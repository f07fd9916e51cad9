"""Binary Segmentation of a result's named regions: one segment per region, as OHIF overlays it.

What OHIF 3.13's SEG loader (@cornerstonejs/adapters, Segmentation_4X ``generateToolState``)
needs beyond the standard, for a 2D projection radiograph that has no Frame of Reference:
- Shared Functional Groups > Pixel Measures: the SEG viewport destructures it unconditionally
  ("Cannot destructure property 'SpacingBetweenSlices' of 'PixelMeasures'"). Spacing comes from
  the source's Pixel Spacing, else its Imager Pixel Spacing, else a nominal 1 mm.
- Shared Functional Groups > Plane Orientation: ``checkOrientation`` reads Image Orientation
  (Patient) from it (TypeError when absent) and accepts only the source's own orientation or an
  in-plane flip/rotation of it. For a source without one, OHIF assumes [1, 0, 0, 0, 1, 0]
  (its metadata provider's default), so the SEG states that nominal orientation. highdicom
  refuses an orientation without a Frame of Reference (it guards spatial alignment); here every
  frame is pixel-aligned with its source by construction (same Rows/Columns, Derivation Image
  Sequence per frame), so it is added after construction. dciodvfy accepts it.
- Each frame's Derivation Image > Source Image Sequence names the source SOP Instance (how the
  loader finds the image to draw on), and Segment Label and Recommended Display CIELab Value
  give the segment's name and colour in the segmentation panel.
"""

from __future__ import annotations

import datetime

import numpy as np
from highdicom import (
    AlgorithmIdentificationSequence,
    PixelMeasuresSequence,
    PlaneOrientationSequence,
)
from highdicom.color import CIELabColor
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
    COLOURS,
    ai_description,
    check_result,
    content_time,
    device_attributes,
    processing_equipment,
    stamp,
)
from node.writers.uids import result_uid
from pipelines.base import ModelInfo, PipelineResult

#: Pixel spacing (mm) stated when the source has none: the convention of the viewers, which
#: measure such images in pixels.
NOMINAL_SPACING = (1.0, 1.0)
#: Image Orientation (Patient) stated when the source has none: what OHIF assumes for it.
NOMINAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def pixel_spacing(source: Dataset) -> tuple[float, float]:
    """Row and column spacing in mm: Pixel Spacing, else Imager Pixel Spacing (projection
    radiographs), else nominal. Zero or malformed values (some CR writers store 0\\0) are skipped."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return NOMINAL_SPACING


def _geometry_source(source: Dataset) -> Dataset:
    """``source`` without an invalid (zero) Pixel Spacing, which highdicom would copy into the SEG.

    The caller's dataset is not modified (a shallow view is returned when one must go).
    """
    spacing = source.get("PixelSpacing")
    if spacing is None or (len(spacing) == 2 and all(float(v) > 0 for v in spacing)):
        return source
    view = Dataset(dict(source._dict))
    view.file_meta = source.file_meta
    del view.PixelSpacing
    return view


def algorithm_identification(model: ModelInfo) -> AlgorithmIdentificationSequence:
    return AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=model.version,
    )


def segmented_regions(result: PipelineResult) -> list[str]:
    """The regions of ``result`` with any pixel, in its order: a SEG's segments (none: no SEG)."""
    return [name for name, mask in result.regions.items() if mask.any()]


def build_segmentation(
    source: Dataset,
    result: PipelineResult,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    content_datetime: datetime.datetime,
) -> Segmentation:
    """BINARY Segmentation on ``source``: one segment per non-empty region of ``result``, in the
    order of ``result.regions``, labelled and coloured as codes.REGIONS and COLOURS say."""
    check_result(source, result)
    names = segmented_regions(result)
    if not names:
        raise ValueError(
            f"no region of {source.SOPInstanceUID} has any pixel (regions: {sorted(result.regions)}): "
            "nothing to segment"
        )
    descriptions = []
    for number, name in enumerate(names, start=1):
        region = codes.region(name)
        descriptions.append(SegmentDescription(
            segment_number=number,
            segment_label=f"{region.label} (AI)",
            segmented_property_category=region.category,
            segmented_property_type=region.type,
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification(model),
            tracking_uid=result_uid(str(sop_instance_uid), "segment", name),
            tracking_id=region.label,
            display_color=CIELabColor.from_rgb(*COLOURS["region"]),
        ))  # fmt: skip
    # (frames, rows, cols, segments): one frame, a channel per segment
    pixels = np.stack([np.asarray(result.regions[name], dtype=bool) for name in names], axis=-1)[np.newaxis]
    seg = Segmentation(
        source_images=[_geometry_source(source)],
        pixel_array=pixels,
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        **device_attributes(model),
        content_label="AI_SEGMENTATION",
        content_description=ai_description("segmentation", model),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        pixel_measures=None if "FrameOfReferenceUID" in source else PixelMeasuresSequence(
            pixel_spacing=pixel_spacing(source), slice_thickness=None
        ),
        contributing_equipment=[processing_equipment(model, content_datetime)],
        series_description=ai_description("segmentation", model),
        **content_time(content_datetime),
    )
    if "FrameOfReferenceUID" not in source:
        orientation = source.get("ImageOrientationPatient") or NOMINAL_ORIENTATION
        seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence = PlaneOrientationSequence(
            coordinate_system="PATIENT", image_orientation=[float(v) for v in orientation]
        )
        # General Image: Patient Orientation is Type 2C (no Image Orientation for a projection
        # radiograph); highdicom leaves it out. The source's value, or empty (unknown).
        seg.PatientOrientation = source.get("PatientOrientation")
    # highdicom draws a random Dimension Organization UID: derive it, so a replay is identical.
    dimension_uid = result_uid(str(sop_instance_uid), "dimension-organization")
    seg.DimensionOrganizationSequence[0].DimensionOrganizationUID = dimension_uid
    for item in seg.DimensionIndexSequence:
        item.DimensionOrganizationUID = dimension_uid
    stamp(seg, content_datetime)
    return seg


__all__ = ["build_segmentation", "pixel_spacing"]
