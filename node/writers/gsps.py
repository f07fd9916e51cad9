"""Grayscale Softcopy Presentation State: lung outline and findings text over the original."""

from __future__ import annotations

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
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.writers._common import (
    ai_description,
    ai_statement,
    box_outline,
    check_result,
    device_attributes,
    lung_contours,
    processing_equipment,
)
from pipelines.base import ModelInfo, PipelineResult

OUTLINE_LAYER = "AI_LUNG_OUTLINE"
TEXT_LAYER = "AI_FINDINGS"
BOX_LAYER = "AI_LUNG_OPACITY"


def _findings_text(result: PipelineResult) -> str:
    return "; ".join(
        f"{f.label.replace('_', ' ')} {f.probability:.2f}" + (" (+)" if f.present else "")
        for f in result.top(3)
    )


def build_presentation_state(
    source: Dataset,
    result: PipelineResult,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
) -> GrayscaleSoftcopyPresentationState:
    """GSPS over ``source``: lung outline (closed POLYLINE) and an "AI RESULT" findings label;
    each lung-opacity box (``result.boxes``) as a closed rectangle labelled "Opacity 0.xx".

    Window and modality LUT come from the source image; a MONOCHROME1 source gets an
    INVERSE presentation LUT so it displays as it does without the presentation state.
    """
    check_result(source, result)
    rows, cols = int(source.Rows), int(source.Columns)
    outline_layer = GraphicLayer(
        layer_name=OUTLINE_LAYER,
        order=1,
        description="AI lung outline",
        display_color=CIELabColor.from_rgb(0, 255, 255),
    )
    text_layer = GraphicLayer(
        layer_name=TEXT_LAYER,
        order=2,
        description="AI findings",
        display_color=CIELabColor.from_rgb(255, 255, 0),
    )
    outlines = [
        GraphicObject(
            graphic_type=GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            units=AnnotationUnitsValues.PIXEL,
        )
        for outline in lung_contours(result.lung_mask)
    ]
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
            text_value=f"AI RESULT: {_findings_text(result)}"[:1024],
            units=AnnotationUnitsValues.PIXEL,
            bounding_box=(margin, rows - margin - band, cols - margin, rows - margin),
            text_justification=TextJustificationValues.LEFT,
        ),
    ]
    annotations = [
        GraphicAnnotation(referenced_images=[source], graphic_layer=text_layer, text_objects=texts)
    ]
    if outlines:
        annotations.insert(
            0,
            GraphicAnnotation(
                referenced_images=[source], graphic_layer=outline_layer, graphic_objects=outlines
            ),
        )
    layers = [outline_layer, text_layer] if outlines else [text_layer]
    if result.boxes:
        box_layer = GraphicLayer(
            layer_name=BOX_LAYER,
            order=3,
            description="AI lung opacity boxes",
            display_color=CIELabColor.from_rgb(255, 128, 0),
        )
        annotations.append(
            GraphicAnnotation(
                referenced_images=[source],
                graphic_layer=box_layer,
                graphic_objects=[
                    GraphicObject(
                        graphic_type=GraphicTypeValues.POLYLINE,
                        graphic_data=box_outline(box),
                        units=AnnotationUnitsValues.PIXEL,
                    )
                    for box in result.boxes
                ],
                text_objects=[
                    TextObject(
                        text_value=f"Opacity {box[4]:.2f}",
                        units=AnnotationUnitsValues.PIXEL,
                        anchor_point=(box[0], box[1]),  # the box's top left corner
                        anchor_point_visible=False,
                        text_justification=TextJustificationValues.LEFT,
                    )
                    for box in result.boxes
                ],
            )
        )
        layers.append(box_layer)
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
        contributing_equipment=[processing_equipment(model)],
    )
    gsps.SeriesDescription = ai_description("CXR findings overlay", model)
    # General Series Laterality is Type 2C; dciodvfy requires it for PR. The source's value
    # (if any) applies, otherwise it is sent empty (unknown), never guessed.
    gsps.Laterality = source.get("Laterality")
    return gsps
