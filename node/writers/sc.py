"""RGB Secondary Capture overlay: the image with outlines, heatmaps and findings burned in.

Displays in every viewer (it is an image): the one result object that needs no support for
SR, SEG or presentation states.
"""

from __future__ import annotations

import datetime
from functools import lru_cache

import numpy as np
from highdicom import PatientOrientationValuesBiped
from highdicom.sc import SCImage
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.writers._common import (
    COLOURS,
    ai_description,
    ai_statement,
    check_result,
    content_time,
    draw_outlines,
    finding_text,
    font,
    outlines,
    processing_equipment,
    stamp,
    wrap,
)
from pipelines.base import ModelInfo, PipelineResult

#: Longest side of the overlay in pixels; larger images are downscaled.
MAX_SIDE = 2048
#: Heatmap values below this are fully transparent; opacity rises to HEATMAP_MAX_ALPHA at 1.
HEATMAP_FLOOR = 0.25
HEATMAP_MAX_ALPHA = 0.5
BANNER_RGB = (160, 0, 0)
TEXT_RGB = (255, 255, 255)


@lru_cache(maxsize=1)
def _heatmap_luts() -> tuple[np.ndarray, np.ndarray]:
    """(256, 3) uint8 "jet"-like colour table and (256,) uint8 opacity table."""
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack(
        [
            np.clip(1.5 - np.abs(4 * x - 3), 0, 1),
            np.clip(1.5 - np.abs(4 * x - 2), 0, 1),
            np.clip(1.5 - np.abs(4 * x - 1), 0, 1),
        ],
        axis=1,
    )
    alpha = np.clip((x - HEATMAP_FLOOR) / (1 - HEATMAP_FLOOR), 0, 1) * HEATMAP_MAX_ALPHA
    return (rgb * 255).round().astype(np.uint8), (alpha * 255).round().astype(np.uint8)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _nearest(source: int, target: int) -> np.ndarray:
    """For each of ``target`` evenly spaced pixels over ``source`` pixels, the source pixel under its centre."""
    return np.minimum(((np.arange(target) + 0.5) * (source / target)).astype(np.int64), source - 1)


def render_overlay(result: PipelineResult, model: ModelInfo) -> np.ndarray:
    """The overlay as an (rows, cols, 3) uint8 RGB array (at most MAX_SIDE on the long side)."""
    rows, cols = result.display.shape
    scale = min(1.0, MAX_SIDE / max(rows, cols))
    size = (max(1, round(cols * scale)), max(1, round(rows * scale)))  # PIL: (width, height)

    gray = Image.fromarray(_to_uint8(result.display), mode="L")
    if scale < 1.0:
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    canvas = gray.convert("RGB")
    if result.heatmaps:
        # all findings' heatmaps in one layer: the strongest evidence at each pixel, read at the
        # overlay's pixels (the source pixel under each one's centre), not made whole and shrunk;
        # one at a time: all at once (a list, then its stack) held two arrays per finding, 446 MB
        # for 14 findings at 2048 px
        at_rows, at_cols = _nearest(rows, size[1]), _nearest(cols, size[0])
        maps = iter(result.heatmaps.values())
        layer = next(maps).at(at_rows, at_cols)
        for h in maps:
            np.maximum(layer, h.at(at_rows, at_cols), out=layer)
        heat = Image.fromarray(_to_uint8(layer), mode="L")
        colours, opacity = _heatmap_luts()
        heat_rgb = Image.merge("RGB", [heat.point(colours[:, i].tolist()) for i in range(3)])
        canvas = Image.composite(heat_rgb, canvas, heat.point(opacity.tolist()))

    draw = ImageDraw.Draw(canvas)
    draw_outlines(draw, outlines(result), lambda o: COLOURS[o.kind], scale, halo=(0, 0, 0))

    # Text: about 2.2 % of the long side (~45 px at 2048), never below 12 px.
    width, height = size
    long_side = max(width, height)
    typeface = font(max(12, round(long_side * 0.022)))
    margin = max(4, round(long_side * 0.008))
    line_height = round(typeface.size * 1.25) if hasattr(typeface, "size") else 14
    banner_lines = wrap(draw, ai_statement(model), typeface, width - 2 * margin)
    banner_height = margin * 2 + line_height * len(banner_lines)
    draw.rectangle((0, 0, width, banner_height), fill=BANNER_RGB)
    for i, text in enumerate(banner_lines):
        draw.text((margin, margin + i * line_height), text, font=typeface, fill=TEXT_RGB)

    findings = [
        finding_text(f.label, f.probability) + (" (above threshold)" if f.present else "")
        for f in result.top(3)
    ]
    if result.heatmaps:
        heatmaps = "heatmaps: " + ", ".join(label.replace("_", " ") for label in result.heatmaps)
        findings += wrap(draw, heatmaps, typeface, width - 2 * margin)
    box_height = margin * 2 + line_height * len(findings)
    top = height - box_height
    box_width = margin * 2 + max(draw.textlength(t, font=typeface) for t in findings)
    draw.rectangle((0, top, min(width, box_width), height), fill=(0, 0, 0))
    for i, text in enumerate(findings):
        draw.text((margin, top + margin + i * line_height), text, font=typeface, fill=TEXT_RGB)
    return np.asarray(canvas)


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2:
        return None
    try:
        return (PatientOrientationValuesBiped(value[0]).value,
                PatientOrientationValuesBiped(value[1]).value)
    except ValueError:
        return None


def build_overlay_sc(
    source: Dataset,
    result: PipelineResult,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    content_datetime: datetime.datetime,
) -> SCImage:
    """RGB Secondary Capture of ``result`` over ``source``, in the source study, new series.

    Burned in: every outline with its label, the findings' heatmaps (semi-transparent), the top 3
    findings with probabilities, an "AI RESULT" banner with algorithm name, version and (demo)
    disclaimer.
    """
    check_result(source, result)
    pixels = render_overlay(result, model)
    orientation = _patient_orientation(source)
    sc = SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=model.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.device_uid,
        # highdicom requires an orientation for PATIENT images; an unknown one is written
        # empty below (Type 2C) rather than guessed.
        patient_orientation=orientation or ("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[processing_equipment(model, content_datetime)],
        series_description=ai_description("CXR overlay", model),
        **content_time(content_datetime),
    )
    if orientation is None:
        sc.PatientOrientation = []  # Type 2C: empty (unknown)
    # SC Equipment and SC Image attributes highdicom sets to fixed values or leaves out.
    sc.ConversionType = "WSD"  # produced on a workstation, not digitised
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = ai_statement(model)[:10240]
    sc.DerivationDescription = ai_statement(model)[:1024]
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [reference]
    if "BodyPartExamined" in source:
        sc.BodyPartExamined = source.BodyPartExamined
    else:
        # General Series Laterality (2C) is needed unless the body part is known to be
        # unpaired: copy the source's value, or send it empty (unknown), never guess.
        sc.Laterality = source.get("Laterality")
    stamp(sc, content_datetime)
    return sc
