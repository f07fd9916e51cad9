"""`python -m training {demo,synthetic,train,export,import-xrv,gradcam}`: demo weights, data, training,
bundles (trained here or torchxrayvision's published weights), Grad-CAM."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipelines.base import DEMO_DISCLAIMER


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run one subcommand; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help=f"train demo weights on synthetic data ({DEMO_DISCLAIMER})")
    demo.add_argument("--out", type=Path, required=True, help="bundle folder to (re)create")
    demo.add_argument("--quick", action="store_true", help="tiny run (seconds) for tests")
    demo.add_argument("--seed", type=int, default=None)
    demo.add_argument("--work", type=Path, default=None, help="folder for the data and runs (default: beside --out); its data/, seg/ and cls/ are replaced")
    syn = sub.add_parser("synthetic", help="write a synthetic data set (generic CSV layout with lung masks)")
    syn.add_argument("--out", type=Path, required=True)
    syn.add_argument("--train", type=int, default=800, help="training images")
    syn.add_argument("--val", type=int, default=240, help="validation images")
    syn.add_argument("--size", type=int, default=256)
    syn.add_argument("--seed", type=int, default=20240601)
    tr = sub.add_parser("train", help="train a recipe (training/recipes/*.yaml) into a run folder")
    tr.add_argument("--recipe", type=Path, required=True)
    tr.add_argument("--data", type=Path, required=True, help="the data set folder, as downloaded")
    tr.add_argument("--out", type=Path, required=True, help="run folder (runs/NAME)")
    tr.add_argument("--resume", action="store_true", help="continue from the run's checkpoint.pt")
    tr.add_argument("--segmentation-run", type=Path, help="lung segmentation run (for crop: lung)")
    tr.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a recipe value, e.g. --set epochs=1 --set image_size=64")  # fmt: skip
    ex = sub.add_parser("export", help="write a node model bundle from a classifier run and a lung segmentation run")
    ex.add_argument("--run", type=Path, required=True)
    ex.add_argument("--out", type=Path, required=True, help="bundle folder, e.g. models/chest_xray")
    ex.add_argument("--version", required=True, help="bundle version, e.g. 1.0.0")
    ex.add_argument("--changelog", default=None)
    ex.add_argument("--segmentation-run", type=Path, default=None,
                    help="lung segmentation run for a whole-image classifier (crop: lung runs bring their own)")
    ex.add_argument("--detection-run", type=Path, default=None,
                    help="RetinaNet lung-opacity run: adds the optional detector to the bundle")
    xi = sub.add_parser("import-xrv", help="write a node model bundle from a torchxrayvision weight file")
    xi.add_argument("--weights", type=Path, required=True, help="the published file, copied in (never downloaded)")
    xi.add_argument("--model", required=True, help="torchxrayvision's name, e.g. densenet121-res224-all")
    xi.add_argument("--out", type=Path, required=True, help="bundle folder, e.g. models/chest_xray")
    xi.add_argument("--version", required=True, help="bundle version, e.g. 1.0.0")
    xi.add_argument("--segmentation-run", type=Path, required=True,
                    help="lung segmentation run (training/recipes/lung_segmentation.yaml) for the SEG and outlines")
    xi.add_argument("--sha256", default=None, help="the file's sha256 as recorded at download (checked)")
    xi.add_argument("--pixels", choices=("stored", "display"), default="stored",
                    help="stored: torchxrayvision's DICOM reader (default); display: the node's rendering")
    xi.add_argument("--changelog", default=None)
    gc = sub.add_parser("gradcam", help="Grad-CAM panel of one image for a finished classifier run")
    gc.add_argument("--run", type=Path, required=True)
    gc.add_argument("--image", type=Path, required=True, help="DICOM, JPEG or PNG")
    gc.add_argument("--label", default=None, help="run label to explain (default: the node's heatmap label)")
    gc.add_argument("--layer", default=None, help="target module name (default: the run's Grad-CAM layer)")
    gc.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    if args.command == "train":
        from training.recipe import load_recipe
        from training.train import train

        recipe = load_recipe(args.recipe, args.overrides)
        run = train(recipe, args.data, args.out, resume=args.resume,
                    segmentation_run=args.segmentation_run, device=args.device)  # fmt: skip
        print(json.dumps({"run": str(args.out), "metrics": run["metrics"], "seconds": run["seconds"],
                          "images_per_s": run["throughput_images_per_s"]}, indent=2, default=str))  # fmt: skip
        return 0
    if args.command == "export":
        from training.export import export_run

        out = export_run(args.run, args.out, args.version, args.changelog, args.segmentation_run, args.detection_run)
        print(json.dumps({"bundle": str(out), "version": args.version}))
        return 0

    if args.command == "import-xrv":
        from training.xrv import XrvImportError, import_xrv

        try:
            out = import_xrv(args.weights, args.model, args.out, args.version, args.segmentation_run,
                             sha256=args.sha256, pixels=args.pixels, changelog=args.changelog)  # fmt: skip
        except XrvImportError as e:
            print(f"import-xrv: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"bundle": str(out), "version": args.version, "model": args.model}))
        return 0
    if args.command == "gradcam":
        from training.gradcam import explain_image

        print(json.dumps(explain_image(args.run, args.image, args.out, args.label, args.layer)))
        return 0
    if args.command == "synthetic":
        from training.synthetic import write_dataset

        path = write_dataset(args.out, args.train, args.val, args.seed, args.size)
        print(json.dumps({"data": str(path), "train": args.train, "val": args.val}))
        return 0

    from training.demo import SEED, train_demo  # imports torch

    metrics = train_demo(args.out, args.quick, SEED if args.seed is None else args.seed, args.work)
    print(json.dumps({"bundle": str(args.out), **metrics}, indent=2))
    print(f"NOTE: {DEMO_DISCLAIMER}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
