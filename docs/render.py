"""Render what a viewer shows of our results, as PNGs: the overlay SC, and the GSPS on its image.

    # the newest job of a study, from the node's database and spool
    python docs/render.py --config config.yaml --study 1.2.3... --out /tmp/render
    # files at hand
    python docs/render.py --image image.dcm --gsps gsps.dcm [--sc sc.dcm] --out /tmp/render
    # README pictures: run the pipeline on one image, build the SC and GSPS, render them
    img2dcm -k BodyPartExamined=CHEST -k ViewPosition=PA sample.jpeg /tmp/cxr.dcm
    python docs/render.py --demo /tmp/cxr.dcm --bundle models/chest_xray --out docs/img

The GSPS is applied by DCMTK's `dcmp2pgm`, as a DICOM viewer would: grayscale pipeline
(modality, VOI and presentation LUTs) and the bitmap display shutter that carries the outlines
and their labels. `dcmp2pgm` does not draw graphic annotations, so the polylines and text boxes
are drawn here on top from the GSPS's own Graphic Annotation Sequence (in its layers'
recommended colours): the picture shows what the object says, not what the pipeline returned.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pydicom
from highdicom.color import CIELabColor
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

#: Longest side of a rendered PNG, and the size it must stay under (README pictures).
MAX_SIDE = 1024
MAX_BYTES = 500_000
DCMP2PGM_TIMEOUT_S = 60


def render_sc(sc: Dataset) -> Image.Image:
    """The overlay secondary capture as it is stored (RGB, burned in)."""
    return Image.fromarray(np.asarray(sc.pixel_array, dtype=np.uint8), mode="RGB")


def render_gsps(gsps_path: Path, image_path: Path) -> Image.Image:
    """``image_path`` through the GSPS's grayscale pipeline (dcmp2pgm), with its graphics drawn on top."""
    with tempfile.TemporaryDirectory(prefix="pacsnode-render-") as tmp:
        pgm = Path(tmp) / "out.pgm"
        image = pydicom.dcmread(image_path)
        if image.file_meta.TransferSyntaxUID.is_compressed:
            # dcmp2pgm registers no decoders: give it the same image uncompressed.
            image.decompress()
            image_path = Path(tmp) / "image.dcm"
            image.save_as(image_path, enforce_file_format=True)
        gsps = pydicom.dcmread(gsps_path)
        if not gsps.get("PatientName"):
            # DCMTK will not load a GSPS without a Patient's Name (Type 2, so ours may have
            # none); this copy exists only for rendering, and no name is drawn.
            gsps.PatientName = "ANONYMOUS"
            gsps_path = Path(tmp) / "gsps.dcm"
            gsps.save_as(gsps_path, enforce_file_format=True)
        proc = subprocess.run(["dcmp2pgm", "-p", str(gsps_path), str(image_path), str(pgm)],
                              capture_output=True, text=True, timeout=DCMP2PGM_TIMEOUT_S, check=False)
        if proc.returncode != 0 or not pgm.exists():
            raise RuntimeError(f"dcmp2pgm failed on {gsps_path} + {image_path}: {proc.stderr.strip()[-500:]}")
        with Image.open(pgm) as im:
            picture = im.convert("RGB")
    _draw_annotations(picture, gsps)
    return picture


def _layer_colours(gsps: Dataset) -> dict[str, tuple[int, int, int]]:
    colours = {}
    for layer in gsps.get("GraphicLayerSequence", []):
        lab = layer.get("GraphicLayerRecommendedDisplayCIELabValue")
        rgb = CIELabColor.from_dicom_value(tuple(int(v) for v in lab)).to_rgb() if lab else (255, 255, 0)
        colours[str(layer.GraphicLayer)] = (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    return colours


def _draw_annotations(picture: Image.Image, gsps: Dataset) -> None:
    """Draw PIXEL-unit polylines and text objects of every graphic annotation (one-frame images)."""
    from node.writers._common import wrap  # one word-wrapper for burned-in and drawn text

    draw = ImageDraw.Draw(picture)
    colours = _layer_colours(gsps)
    width = max(2, round(max(picture.size) / 400))
    font = ImageFont.load_default(size=max(12, round(picture.size[1] * 0.022)))
    for annotation in gsps.get("GraphicAnnotationSequence", []):
        colour = colours.get(str(annotation.GraphicLayer), (255, 255, 0))
        for g in annotation.get("GraphicObjectSequence", []):
            if g.GraphicAnnotationUnits != "PIXEL" or g.GraphicType not in ("POLYLINE", "INTERPOLATED"):
                continue  # the writers only make pixel polylines; anything else is not drawn
            xy = [(float(x), float(y)) for x, y in np.asarray(g.GraphicData, dtype=float).reshape(-1, 2)]
            draw.line(xy, fill=colour, width=width, joint="curve")
        for t in annotation.get("TextObjectSequence", []):
            left, top = (float(v) for v in t.BoundingBoxTopLeftHandCorner)
            right = float(t.BoundingBoxBottomRightHandCorner[0])
            # Wrapped inside the bounding box, as viewers do.
            lines = wrap(draw, str(t.UnformattedTextValue), font, right - left)
            draw.multiline_text((left, top), "\n".join(lines), fill=colour, font=font,
                                stroke_width=max(1, width // 2), stroke_fill=(0, 0, 0))


def save_png(picture: Image.Image, path: Path) -> Path:
    """Save at most MAX_SIDE wide/high and under MAX_BYTES: palette colours, then smaller, if it must."""
    path.parent.mkdir(parents=True, exist_ok=True)
    side = MAX_SIDE
    while True:
        small = picture.copy()
        small.thumbnail((side, side), Image.Resampling.LANCZOS)
        small.save(path, optimize=True)
        if path.stat().st_size > MAX_BYTES:
            small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size <= MAX_BYTES:
            return path
        if side <= 256:
            raise RuntimeError(f"{path} is {path.stat().st_size} bytes at {side} px, over {MAX_BYTES}")
        side = int(side * 0.85)


def render_files(image: Path, gsps: Path | None, sc: Path | None, out: Path, stem: str) -> list[Path]:
    """PNGs of the SC and of the GSPS on ``image``, named <stem>-sc.png and <stem>-gsps.png."""
    written = []
    if sc is not None:
        written.append(save_png(render_sc(pydicom.dcmread(sc)), out / f"{stem}-sc.png"))
    if gsps is not None:
        written.append(save_png(render_gsps(gsps, image), out / f"{stem}-gsps.png"))
    return written


def render_study(config_path: Path, study_uid: str, out: Path) -> list[Path]:
    """Render the SC and GSPS outputs of the newest job of a study that has any, from the spool."""
    from sqlalchemy import select

    from node.config import load_config
    from node.db.models import Instance, Job, Study
    from node.db.session import session_scope
    from node.spool import resolve

    config = load_config(config_path)
    written: list[Path] = []
    with session_scope(config.database.url) as s:
        jobs = s.scalars(select(Job).join(Study).where(Study.study_instance_uid == study_uid)
                         .order_by(Job.id.desc())).all()
        job = next((j for j in jobs if any(o.kind in ("sc", "gsps") for o in j.outputs)), None)
        if job is None:
            raise SystemExit(f"no job of study {study_uid} has an SC or GSPS output")
        for n, o in enumerate((o for o in job.outputs if o.kind in ("sc", "gsps")), start=1):
            path = resolve(config.storage.path, o.path)
            if o.kind == "sc":
                written.append(save_png(render_sc(pydicom.dcmread(path)), out / f"job{job.id}-sc-{n}.png"))
                continue
            ref = pydicom.dcmread(path).ReferencedSeriesSequence[0].ReferencedImageSequence[0]
            image = s.scalars(select(Instance).where(
                Instance.sop_instance_uid == str(ref.ReferencedSOPInstanceUID))).first()
            if image is None:
                raise SystemExit(f"the image of GSPS {o.sop_instance_uid} is not in the spool")
            picture = render_gsps(path, resolve(config.storage.path, image.path))
            written.append(save_png(picture, out / f"job{job.id}-gsps-{n}.png"))
    return written


def render_demo(image: Path, bundle: Path, out: Path, device: str = "cpu") -> list[Path]:
    """Run the pipeline on one DICOM image, build its SC and GSPS as the worker does, render both."""
    from node.writers.gsps import build_presentation_state
    from node.writers.sc import build_overlay_sc
    from node.writers.uids import result_uid
    from pipelines.registry import load_pipeline

    source = pydicom.dcmread(image)
    pipeline = load_pipeline("chest_xray", bundle, device)
    [result] = pipeline.run([source])
    key = (str(source.SOPInstanceUID), pipeline.model.version, "render")
    stem = image.stem
    with tempfile.TemporaryDirectory(prefix="pacsnode-render-") as tmp:
        paths = {}
        for kind, build in (("sc", build_overlay_sc), ("gsps", build_presentation_state)):
            ds = build(source, result, pipeline.model, series_instance_uid=result_uid(*key, kind, "series"),
                       sop_instance_uid=result_uid(*key, kind), series_number=1, instance_number=1,
                       content_datetime=datetime.datetime.now())
            paths[kind] = Path(tmp) / f"{kind}.dcm"
            ds.save_as(paths[kind], enforce_file_format=True)
        return render_files(image, paths["gsps"], paths["sc"], out, stem)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the PNGs")
    p.add_argument("--config", type=Path, help="node config (with --study)")
    p.add_argument("--study", help="Study Instance UID (with --config)")
    p.add_argument("--image", type=Path, help="the source image (with --gsps and/or --sc)")
    p.add_argument("--gsps", type=Path)
    p.add_argument("--sc", type=Path)
    p.add_argument("--demo", type=Path, help="a DICOM chest radiograph to run the pipeline on")
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "chest_xray")
    args = p.parse_args(argv)
    if args.study and args.config:
        written = render_study(args.config, args.study, args.out)
    elif args.demo:
        written = render_demo(args.demo, args.bundle, args.out)
    elif args.image and (args.gsps or args.sc):
        written = render_files(args.image, args.gsps, args.sc, args.out, args.image.stem)
    else:
        p.error("give --config and --study, --demo, or --image with --gsps/--sc")
    for path in written:
        print(f"{path} ({path.stat().st_size // 1000} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
