"""Grayscale Softcopy Presentation State: what the AI outlined and found, over the original image.

Two encodings of the same drawing (``_common.outlines``), for two kinds of renderer:
- Graphic annotations, one layer per kind (regions, findings, detections) in its colour, plus
  the AI statement and the top findings as text: what a PACS viewer with GSPS support draws
  and lets the reader toggle layer by layer.
- A Bitmap Display Shutter (an overlay plane in the presentation state, PS3.3 C.7.6.15) with the
  outlines and their labels rasterised: DCMTK's presentation-state renderer (``dcmp2pgm -p``,
  dcmpstat's ``DVPresentationState::getPixelData``) applies the grayscale pipeline, spatial
  transforms and shutters, but adds graphic annotations and graphic overlays as hidden planes;
  a bitmap shutter is the one drawing it renders. Labels are raster only (a viewer that draws
  both would otherwise show each label twice); outlines are in both and coincide.
"""

from __future__ import annotations

import datetime

import numpy as np
from highdicom import PresentationLUTShapeValues, PresentationLUTTransformation
from highdicom.color import CIELabColor
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    TextJustificationValues,
    TextObject,
)
from PIL import Image, ImageDraw
from pydicom import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian

from node.writers._common import (
    COLOURS,
    Outline,
    ai_description,
    ai_statement,
    check_result,
    device_attributes,
    draw_outlines,
    finding_text,
    outlines,
    processing_equipment,
    series_time,
    stamp,
)
from pipelines.base import ModelInfo, PipelineResult

#: Graphic layer per kind of outline, and the layer of the statement and summary text.
LAYERS = {"region": "AI_REGIONS", "finding": "AI_FINDINGS", "box": "AI_DETECTIONS"}
TEXT_LAYER = "AI_TEXT"
_LAYER_DESCRIPTIONS = {
    "region": "AI outlines of anatomy",
    "finding": "AI: where each finding above threshold is (Grad-CAM hot region)",
    "box": "AI detections",
}
#: Overlay group of the bitmap shutter, and its presentation value (P-value: white on any image).
SHUTTER_GROUP = 0x6000
SHUTTER_P_VALUE = 0xFFFF


def _summary(result: PipelineResult) -> str:
    return "; ".join(
        finding_text(f.label, f.probability) + (" (+)" if f.present else "") for f in result.top(3)
    )


def _shutter_bitmap(drawn: list[Outline], rows: int, cols: int) -> np.ndarray:
    """(rows, cols) bool: the outlines and their labels, rasterised at source resolution."""
    canvas = Image.new("L", (cols, rows), 0)
    draw_outlines(ImageDraw.Draw(canvas), drawn, lambda _: 255)
    return np.asarray(canvas) > 127


def _add_bitmap_shutter(gsps: Dataset, bitmap: np.ndarray) -> None:
    """Overlay Plane (in the presentation state) + Bitmap Display Shutter modules.

    The plane covers the drawn pixels' bounding box only (Overlay Origin is 1-based), which
    keeps the object small. highdicom has no bitmap shutter: the modules are added here.
    """
    rows_used, cols_used = np.flatnonzero(bitmap.any(axis=1)), np.flatnonzero(bitmap.any(axis=0))
    if rows_used.size == 0:
        return
    r0, r1, c0, c1 = rows_used[0], rows_used[-1] + 1, cols_used[0], cols_used[-1] + 1
    plane = bitmap[r0:r1, c0:c1]
    g = SHUTTER_GROUP << 16
    gsps.add_new(g | 0x0010, "US", plane.shape[0])  # Overlay Rows
    gsps.add_new(g | 0x0011, "US", plane.shape[1])  # Overlay Columns
    gsps.add_new(g | 0x0022, "LO", "AI outlines and labels")  # Overlay Description
    gsps.add_new(g | 0x0040, "CS", "G")  # Overlay Type: graphics
    gsps.add_new(g | 0x0050, "SS", [int(r0) + 1, int(c0) + 1])  # Overlay Origin (row, column)
    gsps.add_new(g | 0x0100, "US", 1)  # Overlay Bits Allocated
    gsps.add_new(g | 0x0102, "US", 0)  # Overlay Bit Position
    gsps.add_new(g | 0x1500, "LO", "AI_RESULT")  # Overlay Label
    gsps.add_new(g | 0x3000, "OW", pack_bits(plane.ravel()))  # Overlay Data
    gsps.ShutterShape = "BITMAP"
    gsps.ShutterOverlayGroup = SHUTTER_GROUP
    gsps.ShutterPresentationValue = SHUTTER_P_VALUE


def build_presentation_state(
    source: Dataset,
    result: PipelineResult,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    content_datetime: datetime.datetime,
) -> GrayscaleSoftcopyPresentationState:
    """GSPS over ``source``: every outline of ``result`` as a closed POLYLINE in its kind's layer,
    the AI statement (top) and top 3 findings (bottom) as text, and the outlines with their
    labels as a bitmap display shutter (see the module docstring).

    Window and modality LUT come from the source image; a MONOCHROME1 source gets an
    INVERSE presentation LUT so it displays as it does without the presentation state.
    """
    check_result(source, result)
    rows, cols = int(source.Rows), int(source.Columns)
    drawn = outlines(result)
    layers, annotations = [], []
    for order, (kind, name) in enumerate(LAYERS.items(), start=1):
        mine = [o for o in drawn if o.kind == kind]
        if not mine:
            continue
        layer = GraphicLayer(
            layer_name=name,
            order=order,
            description=_LAYER_DESCRIPTIONS[kind],
            display_color=CIELabColor.from_rgb(*COLOURS[kind]),
        )
        layers.append(layer)
        annotations.append(GraphicAnnotation(
            referenced_images=[source],
            graphic_layer=layer,
            graphic_objects=[GraphicObject(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=o.points,
                                           units=AnnotationUnitsValues.PIXEL) for o in mine],
        ))  # fmt: skip
    text_layer = GraphicLayer(
        layer_name=TEXT_LAYER,
        order=len(LAYERS) + 1,
        description="AI statement and findings",
        display_color=CIELabColor.from_rgb(255, 255, 255),
    )
    margin = max(2.0, round(min(rows, cols) * 0.01))
    band = max(20.0, round(rows * 0.05))
    texts = [
        TextObject(
            text_value=ai_statement(model)[:1024],
            units=AnnotationUnitsValues.PIXEL,
            bounding_box=(margin, margin, cols - margin, margin + band),
            text_justification=TextJustificationValues.LEFT,
        ),
        TextObject(
            text_value=f"AI RESULT: {_summary(result)}"[:1024],
            units=AnnotationUnitsValues.PIXEL,
            bounding_box=(margin, rows - margin - band, cols - margin, rows - margin),
            text_justification=TextJustificationValues.LEFT,
        ),
    ]
    layers.append(text_layer)
    annotations.append(GraphicAnnotation(referenced_images=[source], graphic_layer=text_layer, text_objects=texts))
    inverse = source.get("PhotometricInterpretation") == "MONOCHROME1"
    gsps = GrayscaleSoftcopyPresentationState(
        referenced_images=[source],
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        **device_attributes(model),
        content_label="AI_RESULT",
        content_description=ai_description("CXR findings", model),
        graphic_annotations=annotations,
        graphic_layers=layers,
        presentation_lut_transformation=PresentationLUTTransformation(
            presentation_lut_shape=(
                PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY
            )
        ),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[processing_equipment(model, content_datetime)],
        series_description=ai_description("CXR presentation state", model),
        **series_time(content_datetime),
    )
    _add_bitmap_shutter(gsps, _shutter_bitmap(drawn, rows, cols))
    # General Series Laterality is Type 2C; dciodvfy requires it for PR. The source's value
    # (if any) applies, otherwise it is sent empty (unknown), never guessed.
    gsps.Laterality = source.get("Laterality")
    stamp(gsps, content_datetime)
    return gsps


__all__ = ["LAYERS", "TEXT_LAYER", "build_presentation_state"]
