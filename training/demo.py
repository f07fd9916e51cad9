"""`python -m training demo`: the node's first-run weights, made by the ordinary commands.

It runs, in a work folder beside the bundle, exactly what an ML engineer would type:

    python -m training synthetic --out WORK/data
    python -m training train --recipe training/recipes/demo_lung_segmentation.yaml --data WORK/data --out WORK/seg
    python -m training train --recipe training/recipes/demo_chest_densenet121.yaml --data WORK/data \
        --out WORK/cls --segmentation-run WORK/seg
    python -m training export --run WORK/cls --out OUT --version 0.1.0

`export` marks the bundle as demo weights because the data set says it is synthetic.
`--quick` shrinks the data and the networks (a test-suite bundle in seconds).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from training.export import export_run
from training.recipe import load_recipe
from training.synthetic import write_dataset
from training.train import train

__all__ = ["RECIPES", "VERSION", "train_demo"]

log = logging.getLogger(__name__)

VERSION = "0.1.0"
RECIPES = Path(__file__).resolve().parent / "recipes"
SEED = 20240601
# (train images, validation images, image size), recipe overrides: segmentation, classifier
FULL: dict[str, Any] = {"data": (800, 240, 256), "seg": [], "cls": []}
QUICK: dict[str, Any] = {
    "data": (160, 64, 256),
    "seg": ["image_size=128", "limit=96", "optimizer.lr=2.0e-3"],
    "cls": ["image_size=64", "epochs=1", "optimizer.lr=2.0e-3"],
}


def train_demo(out: Path, quick: bool = False, seed: int = SEED, work: Path | None = None) -> dict[str, Any]:
    """Synthetic data -> segmentation run -> classifier run -> demo bundle at `out`.

    The work folder (default: `.<name>-training` beside `out`) keeps the data, the runs and
    their reports; its `data`, `seg` and `cls` folders are replaced on every call, nothing else
    in it is touched.
    """
    t0 = time.perf_counter()
    plan = QUICK if quick else FULL
    out = Path(out)
    work = Path(work) if work else out.parent / f".{out.name}-training"
    for part in ("data", "seg", "cls"):
        if (work / part).exists():
            shutil.rmtree(work / part)
    n_train, n_val, size = plan["data"]
    data = write_dataset(work / "data", n_train, n_val, seed, size)
    sets = [f"seed={seed}"]
    seg = load_recipe(RECIPES / "demo_lung_segmentation.yaml", [*sets, *plan["seg"]])
    seg_run = train(seg, data, work / "seg", device="cpu")
    cls = load_recipe(RECIPES / "demo_chest_densenet121.yaml", [*sets, *plan["cls"]])
    cls_run = train(cls, data, work / "cls", segmentation_run=work / "seg", device="cpu")
    export_run(work / "cls", out, VERSION, "demo weights trained on synthetic images")
    return {
        "work": str(work), "segmentation": seg_run["metrics"], "classifier_mean_roc_auc":
        cls_run["metrics"]["val"]["mean_roc_auc"], "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
