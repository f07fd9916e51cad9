"""Routing: which series go to which pipelines. A pure function of a series' attributes."""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom.sop_class import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    SecondaryCaptureImageStorage,
)

from node.config import RoutingConfig

PROJECTION_RADIOGRAPHY = {
    str(ComputedRadiographyImageStorage),
    str(DigitalXRayImageStorageForPresentation),
    str(DigitalXRayImageStorageForProcessing),
}
SECONDARY_CAPTURE = {
    str(SecondaryCaptureImageStorage),
    str(MultiFrameGrayscaleByteSecondaryCaptureImageStorage),
    str(MultiFrameGrayscaleWordSecondaryCaptureImageStorage),
}


@dataclass(frozen=True)
class SeriesAttributes:
    sop_class_uid: str
    modality: str | None
    body_part: str | None
    view_position: str | None


@dataclass(frozen=True)
class Decision:
    pipelines: tuple[str, ...]
    reason: str  # why processed or why skipped, for the database and `pacsnode studies`

    @property
    def skipped(self) -> bool:
        return not self.pipelines


def route(attrs: SeriesAttributes, cfg: RoutingConfig, pipelines: tuple[str, ...]) -> Decision:
    """Frontal chest radiographs go to every enabled pipeline; everything else is skipped with a reason."""
    if not pipelines:
        return Decision((), "no pipeline is enabled")
    modality = (attrs.modality or "").upper()
    if attrs.sop_class_uid in SECONDARY_CAPTURE:
        if attrs.body_part != "CHEST":
            return Decision((), "secondary capture without BodyPartExamined CHEST")
    elif attrs.sop_class_uid in PROJECTION_RADIOGRAPHY:
        if modality not in cfg.modalities:
            return Decision((), f"modality {modality or 'absent'} is not in routing.modalities")
    else:
        return Decision((), f"modality {modality or 'absent'} / SOP class {attrs.sop_class_uid} is not a projection radiograph")
    if attrs.body_part is not None and attrs.body_part not in cfg.body_parts:
        return Decision((), f"BodyPartExamined {attrs.body_part} is not in routing.body_parts")
    if attrs.view_position is not None and attrs.view_position not in cfg.view_positions:
        return Decision((), f"ViewPosition {attrs.view_position} is not frontal (routing.view_positions)")
    return Decision(pipelines, "frontal chest radiograph")
