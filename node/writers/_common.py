"""Helpers shared by the writers: input checks, what is drawn where, descriptions, equipment, time.

Every writer draws the same things from a ``PipelineResult`` (``outlines``): the outline of each
named region, the hot region of each finding's heatmap, and each detection box, each with the
text a reader sees. The SR, the GSPS and the overlay SC differ only in how they encode them.
"""

from __future__ import annotations

import datetime
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypedDict

import numpy as np
from highdicom import ContributingEquipment
from PIL import ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.valuerep import DA, DT, TM
from skimage.measure import find_contours

from node.writers import codes
from pipelines.base import Box, Heatmap, ModelInfo, PipelineResult

#: LO (64 characters) is the VR of SeriesDescription, ContentDescription, ...
_LO_MAX = 64
#: A finding's hot region: where its heatmap (scaled to [0, 1] per finding) reaches this level.
HOT_LEVEL = 0.5
#: Recommended display colours (RGB) of what is drawn, by kind: SEG segments, GSPS layers, SC.
COLOURS: dict[str, tuple[int, int, int]] = {
    "region": (0, 255, 255),  # cyan: anatomy the AI outlined
    "finding": (255, 255, 0),  # yellow: where a finding's evidence is
    "box": (255, 128, 0),  # orange: detections
}

Kind = Literal["region", "finding", "box"]


def check_result(source: Dataset, result: PipelineResult) -> None:
    """Raise ValueError when ``result`` does not belong to ``source`` or is malformed."""
    shape = (int(source.Rows), int(source.Columns))
    sop = source.get("SOPInstanceUID", "?")
    shapes = {"display": result.display.shape}
    shapes.update({f"regions[{name!r}]": mask.shape for name, mask in result.regions.items()})
    shapes.update({f"heatmaps[{label!r}]": heat.shape for label, heat in result.heatmaps.items()})
    for name, got in shapes.items():
        if got != shape:
            raise ValueError(
                f"result.{name} has shape {got}, source {sop} has (Rows, Columns) {shape}"
            )
    if not result.findings:
        raise ValueError(f"result for {sop} has no findings")
    for finding in result.findings:
        codes.finding_code(finding.label)  # raises for unknown labels
        if not 0.0 <= finding.probability <= 1.0:
            raise ValueError(
                f"probability of {finding.label!r} is {finding.probability}, not in [0, 1]"
            )
    for name, mask in result.regions.items():
        codes.region(name)  # raises for unknown names
        if mask.dtype != bool:
            raise ValueError(f"result.regions[{name!r}] has dtype {mask.dtype}, not bool")
    for label in result.heatmaps:
        result.finding(label)  # KeyError: a heatmap of no finding
    rows, cols = shape
    for box in result.boxes:
        codes.finding_code(box.label)
        if not (0 <= box.x0 < box.x1 <= cols and 0 <= box.y0 < box.y1 <= rows):
            raise ValueError(f"box {box} is not inside source {sop} (Rows, Columns) {shape}")
        if not 0.0 <= box.score <= 1.0:
            raise ValueError(f"box score {box.score} is not in [0, 1]")


@dataclass(frozen=True)
class Outline:
    """One closed polygon drawn on the source image, and what it stands for."""

    kind: Kind
    name: str  # region name, finding label or box label
    points: np.ndarray  # float32 (n, 2) of (column, row), first point == last (see mask_outlines)
    text: str  # what a reader sees beside it, e.g. "Consolidation 0.53"
    probability: float | None  # the finding's probability or the box's score; None for regions
    index: int  # 0, 1, ... among the outlines of the same kind and name

    @property
    def key(self) -> str:
        """A name for this outline that is stable across runs (for derived UIDs)."""
        return f"{self.kind}:{self.name}:{self.index}"


#: Outlines already traced, by id() of a result still alive (entries leave with their result): the
#: SR, the GSPS and the overlay SC of one job draw the same outlines, traced once.
_traced: dict[int, tuple[Outline, ...]] = {}


def outlines(result: PipelineResult) -> list[Outline]:
    """What every writer draws: region outlines (left to right), each finding's hot region (most
    probable first; none where its heatmap has no hot region), then the boxes (best first).
    Traced once per result: later calls return the same outlines."""
    key = id(result)
    if key not in _traced:
        _traced[key] = tuple(_trace(result))
        weakref.finalize(result, _traced.pop, key, None)
    return list(_traced[key])


def _trace(result: PipelineResult) -> list[Outline]:
    drawn: list[Outline] = []
    for name, mask in result.regions.items():
        label = codes.region(name).label
        for i, points in enumerate(mask_outlines(mask)):
            drawn.append(Outline("region", name, points, f"{label} (AI)", None, i))
    for label in sorted(result.heatmaps, key=lambda lab: -result.finding(lab).probability):
        hot = hot_region(result.heatmaps[label])
        if hot is not None:
            p = result.finding(label).probability
            drawn.append(Outline("finding", label, hot, f"{finding_text(label, p)} (AI)", p, 0))
    for i, box in enumerate(sorted(result.boxes, key=lambda b: -b.score)):
        text = f"{finding_text(box.label, box.score)} (AI)"
        drawn.append(Outline("box", box.label, box_outline(box), text, box.score, i))
    return drawn


def finding_text(label: str, probability: float) -> str:
    """A finding or detection with its probability as readers see it: "Pleural Thickening 0.77"."""
    return f"{label.replace('_', ' ')} {probability:.2f}"


def box_outline(box: Box) -> np.ndarray:
    """A detection as a closed rectangle: float32 (5, 2) of (column, row), clockwise from the top
    left. Box corners are pixel edges, which is DICOM's sub-pixel convention (see mask_outlines)."""
    x0, y0, x1, y1 = box.x0, box.y0, box.x1, box.y1
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)], dtype=np.float32)


def hot_region(heatmap: Heatmap, level: float = HOT_LEVEL) -> np.ndarray | None:
    """The outline of the largest area where ``heatmap`` >= ``level`` (None if there is none).
    Thresholded on the grid ``mask_outlines`` traces on, not on every source pixel."""
    step = _step(heatmap.shape, MAX_TRACE_SIDE)
    rows, cols = heatmap.shape
    grid = heatmap.at(np.arange(0, rows, step), np.arange(0, cols, step))
    candidates = _outlines_of(grid >= level, step, heatmap.shape)
    if not candidates:
        return None
    return max(candidates, key=_area)


def _area(outline: np.ndarray) -> float:
    x, y = outline[:, 0].astype(np.float64), outline[:, 1].astype(np.float64)
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


#: Outlines are traced on masks subsampled to at most this many pixels a side: the pipelines'
#: masks come from a 256 px segmentation or a 7 x 7 heatmap upsampled to the source, so a finer
#: grid adds cost and points, not detail (on a 2000 px radiograph, tracing at 512 px gave 2-3
#: times the points and took 90 ms for the lungs; at 256 px, 25 ms).
MAX_TRACE_SIDE = 256


def _step(shape: tuple[int, ...], max_side: int) -> int:
    return max(1, -(-max(shape) // max_side))


def mask_outlines(mask: np.ndarray, tolerance: float = 1.5, max_side: int = MAX_TRACE_SIDE,
                  min_fraction: float = 0.02) -> list[np.ndarray]:
    """Closed outlines of ``mask`` as float32 arrays (n, 2) of (column, row) pixel coordinates.

    Coordinates follow DICOM's sub-pixel convention shared by SR SCOORD and GSPS PIXEL units:
    the top left corner of the top left pixel is (0, 0), so pixel (row r, column c) has its
    centre at (c + 0.5, r + 0.5). First point == last point. Specks are dropped: outlines of
    fewer than 4 points or enclosing less than ``min_fraction`` of the largest one's area.
    Outlines are traced on the mask subsampled to at most ``max_side`` pixels
    (``MAX_TRACE_SIDE``) and simplified (Douglas-Peucker, ``tolerance`` subsampled pixels).
    Sorted left to right.
    """
    step = _step(mask.shape, max_side)
    return _outlines_of(np.asarray(mask, dtype=bool)[::step, ::step], step, mask.shape, tolerance, min_fraction)


def _outlines_of(small: np.ndarray, step: int, shape: tuple[int, ...], tolerance: float = 1.5,
                 min_fraction: float = 0.02) -> list[np.ndarray]:
    """``mask_outlines`` of a mask already subsampled by ``step`` from ``shape``."""
    padded = np.pad(small, 1)  # close outlines touching the border
    found = []
    for contour in find_contours(padded.astype(np.uint8), 0.5):
        contour = simplify(contour - 1.0, tolerance)
        if len(contour) < 4:
            continue
        # Back to source pixels: subsampled pixel k stands for source pixel k * step.
        rows = np.clip(contour[:, 0] * step, 0, shape[0] - 1) + 0.5
        cols = np.clip(contour[:, 1] * step, 0, shape[1] - 1) + 0.5
        outline = np.stack([cols, rows], axis=1).astype(np.float32)
        if not np.array_equal(outline[0], outline[-1]):
            outline = np.vstack([outline, outline[:1]])
        found.append(outline)
    if found:
        largest = max(_area(o) for o in found)
        found = [o for o in found if _area(o) >= min_fraction * largest]
    found.sort(key=lambda o: float(o[:, 0].mean()))
    return found


def simplify(contour: np.ndarray, tolerance: float) -> np.ndarray:
    """``contour`` (n, 2) simplified by Douglas-Peucker to within ``tolerance``: the points
    ``skimage.measure.approximate_polygon`` keeps, but where two points are exactly as far from a
    chord, which the two may break differently (tests/unit/test_writers_common.py compares).

    Why not skimage's: it runs some twenty numpy calls per split, 12 ms for a radiograph's lungs
    on the SR's critical path (#12). A marching-squares contour is mostly straight runs; a point
    inside a run is never the farthest from a chord (distance to a segment is convex, so along a
    run it peaks at an end), so the runs' inner points are dropped first and the few hundred
    corners left are split in plain Python: 2.6 ms.
    """
    if len(contour) < 3:
        return contour
    step = np.diff(contour, axis=0)
    turn = step[:-1, 0] * step[1:, 1] - step[:-1, 1] * step[1:, 0]
    ahead = (step[:-1] * step[1:]).sum(axis=1) > 0
    corners = contour[np.concatenate(([True], (np.abs(turn) > 1e-9) | ~ahead, [True]))]
    points = corners.tolist()
    keep = [False] * len(points)
    keep[0] = keep[-1] = True
    spans = [(0, len(points) - 1)]
    while spans:
        start, end = spans.pop()
        (r0, c0), (r1, c1) = points[start], points[end]
        dr, dc = r1 - r0, c1 - c0
        length = (dr * dr + dc * dc) ** 0.5
        farthest, at = -1.0, -1
        for i in range(start + 1, end):
            r, c = points[i]
            if (r - r0) * dr + (c - c0) * dc > 0 and (r1 - r) * dr + (c1 - c) * dc > 0:
                d = abs((r - r0) * dc - (c - c0) * dr) / length  # beside the chord: to the line
            else:  # beyond an end: to the nearer end
                d = min(((r - r0) ** 2 + (c - c0) ** 2) ** 0.5, ((r - r1) ** 2 + (c - c1) ** 2) ** 0.5)
            if d > farthest:
                farthest, at = d, i
        if farthest > tolerance:
            keep[at] = True
            spans += [(at, end), (start, at)]
    return corners[np.array(keep)]


def ai_description(kind: str, model: ModelInfo) -> str:
    """A series/content description (LO) naming the AI output, algorithm and version."""
    demo = " (DEMO)" if model.demo else ""
    text = f"AI {kind} {model.name} {model.version}{demo}"
    if len(text) > _LO_MAX:  # keep version and demo flag, shorten the name
        room = _LO_MAX - len(f"AI {kind}  {model.version}{demo}")
        text = f"AI {kind} {model.name[: max(room, 0)]} {model.version}{demo}"
    return text[:_LO_MAX]


def ai_statement(model: ModelInfo) -> str:
    """One sentence naming the algorithm, its version and that this is AI output."""
    text = (
        f"AI RESULT generated by {model.name} version {model.version} "
        f"({model.manufacturer}); not reviewed by a physician."
    )
    if model.disclaimer is not None:
        text += f" {model.disclaimer.upper()}."
    return text


class DeviceAttributes(TypedDict):
    """General Equipment keyword arguments of highdicom's constructors."""

    manufacturer: str
    manufacturer_model_name: str
    software_versions: str
    device_serial_number: str


def device_attributes(model: ModelInfo) -> DeviceAttributes:
    """General Equipment keywords of highdicom constructors naming the algorithm as the device.

    Passed to the constructors, which check each value against its VR (a model name over 64
    characters is refused there, not silently cut)."""
    return DeviceAttributes(
        manufacturer=model.manufacturer,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        device_serial_number=model.device_uid,
    )


class SeriesTime(TypedDict):
    """Series date/time keyword arguments of highdicom's constructors."""

    series_date: datetime.date
    series_time: datetime.time


class ContentTime(SeriesTime):
    """Content and series date/time keyword arguments of highdicom's constructors."""

    content_date: datetime.date
    content_time: datetime.time


def series_time(when: datetime.datetime) -> SeriesTime:
    """Series date/time from the job's timestamp (not the clock): for objects without content
    date/time (GSPS, whose creation date/time ``stamp`` sets)."""
    return SeriesTime(series_date=when.date(), series_time=when.time())


def content_time(when: datetime.datetime) -> ContentTime:
    """Content and series date/time from the job's timestamp (not the clock), so a replay of the
    same job writes the same bytes."""
    return ContentTime(content_date=when.date(), content_time=when.time(), **series_time(when))


def processing_equipment(model: ModelInfo, when: datetime.datetime) -> ContributingEquipment:
    """Contributing Equipment item naming the algorithm that produced the object."""
    return ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_datetime=when,
        contribution_description=ai_description("analysis", model),
    )


def stamp(ds: Dataset, when: datetime.datetime) -> None:
    """Replace the wall-clock timestamps highdicom writes with no argument to set them
    (instance creation, its own Contributing Equipment item, secondary capture and presentation
    creation) by ``when``: the same job gives the same bytes."""
    date, time = DA(when.date()), TM(when.time())
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for item in ds.get("ContributingEquipmentSequence", []):
        item.ContributionDateTime = DT(when)
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture = date, time
    if "PresentationCreationDate" in ds:
        ds.PresentationCreationDate, ds.PresentationCreationTime = date, time


# --- Drawing (pixels: the overlay SC, the GSPS's bitmap shutter, docs/render.py) -----------------


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in scalable font at ``size`` pixels (no font file on the host needed)."""
    return ImageFont.load_default(size=size)


def wrap(draw: ImageDraw.ImageDraw, text: str, typeface: ImageFont.FreeTypeFont | ImageFont.ImageFont,
         width: float) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (words are never split)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=typeface) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def draw_outlines(
    draw: ImageDraw.ImageDraw,
    drawn: list[Outline],
    colour: Callable[[Outline], int | tuple[int, int, int]],
    scale: float = 1.0,
    halo: tuple[int, int, int] | None = None,
) -> None:
    """Draw each outline and its text (once per region name: both lungs share one label) onto
    ``draw``, an image of the source scaled by ``scale``. Text sits above the outline's top left
    corner, or inside it at the image's top edge; sizes follow the image's long side. ``halo``:
    a colour drawn around the letters, to keep them legible on bright bone (colour images)."""
    width, height = draw.im.size
    long_side = max(width, height)
    line = max(2, round(long_side / 700))
    typeface = font(max(12, round(long_side * 0.02)))
    labelled: set[tuple[str, str]] = set()
    taken: list[tuple[float, float, float, float]] = []  # labels already placed: none covers another
    for o in drawn:
        points = [(float(x) * scale, float(y) * scale) for x, y in o.points]
        draw.line(points, fill=colour(o), width=line, joint="curve")
        if (o.kind, o.name) in labelled and o.kind == "region":
            continue
        labelled.add((o.kind, o.name))
        left, top = min(p[0] for p in points), min(p[1] for p in points)
        box = draw.textbbox((0, 0), o.text, font=typeface)
        w, h = box[2] - box[0], box[3] - box[1] + line
        x = min(max(0.0, left), max(0.0, width - w))
        y = top - h - line if top - h - line >= 0 else top + line
        while any(x < r and x + w > lf and y < b and y + h > t for lf, t, r, b in taken) and y + h < height:
            y += h  # below the label in the way
        taken.append((x, y, x + w, y + h))
        draw.text((x, y), o.text, font=typeface, fill=colour(o),
                  stroke_width=0 if halo is None else max(1, line // 2), stroke_fill=halo)
