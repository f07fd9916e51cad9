"""GPU proof: the node's models on CUDA in one call (at most 8 minutes), with a JSON report.

    python bench/gpu.py [--bundle models/chest_xray ...] [--out bench/out/gpu.json] [--budget 420]
    python bench/gpu.py --dry-run     # the same code on the CPU, small: what can be checked without a GPU

On a CUDA machine, in this order:

1. device: name, capability, memory, torch / CUDA / cuDNN versions.
2. parity: the chest_xray pipeline on CUDA (float16 autocast, as the node runs it) and on the
   CPU in float32, on the same images (RG1 and the cxr-samples radiographs): max probability
   difference, decisions that differ, lung mask Dice, heatmap difference (largest at a pixel,
   mean over the pixels either device heats).
3. throughput: images/s of `pipeline.run` at batch 1, 8 and 32 against a bare PyTorch forward
   of the same two networks (segmentation + classifier, autocast, channels_last) timed in the
   same run; the ratio is the node's overhead around its models; the pipeline's time per stage.
   Peak GPU memory per batch.
4. training: one short epoch (a few steps) of every recipe in training/recipes on tiny data,
   through the training loop itself (its float16 autocast and gradient scaler on CUDA).
5. retinanet: one training step (AMP) and one detection pass of the RSNA recipe's RetinaNet.

Every section records its seconds and peak GPU memory; a section that fails records the error
and the script exits 1; a section the time budget cannot fit is marked skipped. Nothing is
downloaded: without `--bundle`, quick demo weights are trained into the work folder first.

`--dry-run` runs all of it on the CPU with batches 1 and 2 and shrunken networks: the parity
section then compares the CPU pipeline with itself (difference 0 by construction) and says
nothing about CUDA. The first CUDA run (an H200, eighteenth session) is reported in
docs/training.md, "The GPU path", and the README's benchmark table.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402

from pipelines.bundle import load_bundle  # noqa: E402
from pipelines.chest_xray import ChestXrayPipeline  # noqa: E402
from pipelines.device import DeviceError, autocast, resolve_device  # noqa: E402
from tests.peers import CXR_SAMPLES  # noqa: E402

RECIPES = REPO / "training" / "recipes"
GPU_BATCHES = (1, 8, 32)
DRY_BATCHES = (1, 2)
TRAIN_STEPS = 3


# ---- inputs -----------------------------------------------------------------------------------


def radiographs() -> list[Dataset]:
    """RG1 (CR, MONOCHROME1) and the cxr-samples JPEGs as 8-bit MONOCHROME2 DICOM, in memory."""
    out: list[Dataset] = [pydicom.dcmread(str(get_testdata_file("RG1_UNCR.dcm")))]
    for jpeg in sorted(CXR_SAMPLES.glob("*/*.jpeg")):
        pixels = np.asarray(Image.open(jpeg).convert("L"))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = pixels.tobytes()
        out.append(ds)
    return out


def assemble(images: Sequence[Dataset], n: int) -> list[Dataset]:
    """A batch of n datasets: the images in turn, repeated as needed (n >= 1)."""
    if n < 1 or not images:
        raise ValueError(f"a batch needs n >= 1 and at least one image, not n={n} with {len(images)}")
    return [images[i % len(images)] for i in range(n)]


# ---- measuring ----------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_mb(dev: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(dev) / 2**20, 1) if dev.type == "cuda" else None


def rate(fn: Callable[[], object], images: int, dev: torch.device, min_seconds: float, min_runs: int = 3) -> float:
    """Images/s of fn (one warm-up call, then at least min_runs calls and min_seconds)."""
    fn()
    _sync(dev)
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < min_seconds:
        fn()
        runs += 1
    _sync(dev)
    return images * runs / (time.perf_counter() - t0)


# ---- sections -----------------------------------------------------------------------------------


def device_info(dev: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
                            "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}  # fmt: skip
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info |= {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gb": round(p.total_memory / 2**30, 1),
                 "cudnn": torch.backends.cudnn.version(), "devices": torch.cuda.device_count()}  # fmt: skip
    return info


def parity(bundles: Sequence[Path], dev: torch.device, images: list[Dataset]) -> dict[str, Any]:
    """The pipeline on `dev` (mixed precision on CUDA) against the CPU in float32, same images."""
    out: dict[str, Any] = {}
    for bundle in bundles:
        ref = ChestXrayPipeline(bundle, "cpu").run(images)
        _reset_peak(dev)
        got = ChestXrayPipeline(bundle, str(dev)).run(images)
        p_ref = np.array([[f.probability for f in r.findings] for r in ref])
        p_got = np.array([[f.probability for f in r.findings] for r in got])
        flips = sum(a.present != b.present for r, g in zip(ref, got, strict=True)
                    for a, b in zip(r.findings, g.findings, strict=True))  # fmt: skip
        dice = [2 * (r.regions[name] & g.regions[name]).sum() / max(1, r.regions[name].sum() + g.regions[name].sum())
                for r, g in zip(ref, got, strict=True) for name in r.regions]  # fmt: skip
        # heatmaps of the findings both devices put above threshold (a flip is counted above): the
        # largest difference at any pixel, and the mean over the pixels either device heats
        pairs = [(np.asarray(r.heatmaps[k]), np.asarray(g.heatmaps[k]))
                 for r, g in zip(ref, got, strict=True) for k in r.heatmaps.keys() & g.heatmaps.keys()]  # fmt: skip
        diffs = [(np.abs(a - b), (a > 0) | (b > 0)) for a, b in pairs]
        out[str(bundle)] = {
            "images": len(images), "findings": p_ref.shape[1],
            "max_probability_difference": float(np.abs(p_ref - p_got).max()),
            "decisions_that_differ": int(flips),
            "min_region_dice": round(float(min(dice)), 5) if dice else None,
            "heatmaps_compared": len(diffs),
            "max_heatmap_difference": max(float(d.max()) for d, _ in diffs) if diffs else None,
            "mean_heatmap_difference": float(np.mean([d[hot].mean() for d, hot in diffs if hot.any()])) if diffs else None,
            "peak_gpu_mb": _peak_mb(dev),
        }  # fmt: skip
    return {"bundles": out}


def throughput(bundle: Path, dev: torch.device, images: list[Dataset], batches: Sequence[int],
               min_seconds: float, min_runs: int) -> dict[str, Any]:  # fmt: skip
    """pipeline.run vs the bare forward of its two networks, images/s per batch size."""
    pipeline = ChestXrayPipeline(bundle, str(dev))
    b = load_bundle(bundle)
    seg = b.segmentation.to(dev).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    cls = b.classifier.to(dev).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    s, c = b.segmentation_size, b.classifier_size
    out: dict[str, Any] = {"bundle": str(bundle), "segmentation_size": s, "classifier_size": c, "batches": {}}
    for n in batches:
        batch = assemble(images, n)
        _reset_peak(dev)
        node = rate(lambda batch=batch: pipeline.run(batch), n, dev, min_seconds, min_runs)  # type: ignore[misc]
        node_peak = _peak_mb(dev)
        timings = [r.timings for r in pipeline.run(batch)]  # where an image's time goes, per stage
        stages = {k: round(1000 * sum(t[k] for t in timings) / n, 1) for k in timings[0]}
        xs = torch.randn(n, 1, s, s, device=dev).contiguous(memory_format=torch.channels_last)
        xc = torch.randn(n, 1, c, c, device=dev).contiguous(memory_format=torch.channels_last)

        def bare(xs: torch.Tensor = xs, xc: torch.Tensor = xc) -> None:
            with torch.inference_mode(), autocast(dev):
                seg(xs)
                cls(xc)

        _reset_peak(dev)
        ref = rate(bare, n, dev, min_seconds, min_runs)
        out["batches"][str(n)] = {"pipeline_images_per_s": round(node, 2), "bare_forward_images_per_s": round(ref, 2),
                                  "pipeline_over_bare": round(node / ref, 3), "pipeline_stage_ms": stages, "pipeline_peak_gpu_mb": node_peak,
                                  "bare_peak_gpu_mb": _peak_mb(dev)}  # fmt: skip
    return out


# recipe -> (data set maker, overrides); dry-run overrides shrink the networks as the tests do
def _tiny_data(fmt: str, root: Path) -> Path:
    from tests.unit import training_data
    from training.synthetic import write_dataset

    makers: dict[str, Callable[[], Path]] = {
        "csv": lambda: write_dataset(root, 12, 6, seed=3, size=96),
        "lung_masks": lambda: training_data.lung_masks(root, n=12, size=96),
        "nih": lambda: training_data.nih(root, n=16, size=96),
        "kermany": lambda: training_data.kermany(root, real=CXR_SAMPLES.is_dir(), size=96),
        "rsna": lambda: training_data.rsna(root, size=96, n=12, opacity=0.5),
    }
    return makers[fmt]()


SMALL_NETWORKS = {
    "UNet": ["network.args.channels=[4,8,16]", "network.args.strides=[2,2]", "network.args.num_res_units=1"],
    "ResNet50": ["network.args.widen_factor=0.125"],
    "VGG16": ["network.args.width=0.0625", "network.args.hidden=16", "gradcam_layer=features.27"],
    "RetinaNet": ["network.args.backbone=resnet10", "network.args.widen_factor=0.125", "network.args.returned_layers=[1,2]",
                  "network.args.fpn_channels=16", "network.args.anchor_shapes=[[12,12],[16,12]]"],
}  # fmt: skip


def training_epochs(dev: torch.device, work: Path, dry_run: bool) -> dict[str, Any]:
    """One short epoch of every recipe, through `training.train.train` (AMP on CUDA)."""
    from training.recipe import load_recipe
    from training.train import train

    out: dict[str, Any] = {}
    recipes = sorted(RECIPES.glob("*.yaml"), key=lambda p: (load_recipe(p)["task"] != "segmentation", p.name))
    seg_run: Path | None = None
    for path in recipes:  # segmentation first: the lung-crop recipes need its run
        recipe = load_recipe(path)
        arch = recipe["network"]["architecture"]
        steps = 1 if dry_run else TRAIN_STEPS
        sets = ["epochs=1", "num_workers=0", "cache=true", f"max_steps={steps}", "batch_size=4",
                "split.val=0.25", "split.test=0.25", "limit=null"]  # fmt: skip
        if dry_run:
            size = {"SmallCNN": 48, "RetinaNet": 64}.get(arch, 32)  # as small as each network takes
            sets += [f"image_size={size}", "inference_size=null", *SMALL_NETWORKS.get(arch, [])]
        recipe = load_recipe(path, sets)
        data = _tiny_data(recipe["dataset"]["format"], work / "data" / path.stem)
        needs_seg = recipe["task"] != "segmentation" and recipe["crop"] == "lung"
        _reset_peak(dev)
        t0 = time.perf_counter()
        run = train(recipe, data, work / "runs" / path.stem, segmentation_run=seg_run if needs_seg else None,
                    device=str(dev))  # fmt: skip
        losses = [e.get("train_loss") for e in run["history"]]
        out[path.stem] = {"task": recipe["task"], "architecture": arch, "image_size": recipe["image_size"],
                          "steps": steps, "amp": dev.type == "cuda", "seconds": round(time.perf_counter() - t0, 1),
                          "images_per_s": run["throughput_images_per_s"], "train_loss": losses,
                          "finite": all(v is not None and math.isfinite(v) for v in losses),
                          "peak_gpu_mb": _peak_mb(dev)}  # fmt: skip
        if not out[path.stem]["finite"]:
            raise RuntimeError(f"{path.name}: training loss is not finite: {losses}")
        if recipe["task"] == "segmentation" and seg_run is None:
            seg_run = work / "runs" / path.stem
    return {"recipes": out}


def retinanet_step(dev: torch.device, dry_run: bool) -> dict[str, Any]:
    """One AMP training step and one detection pass of the RSNA recipe's RetinaNet."""
    from pipelines.detector import build_detector
    from training.recipe import load_recipe
    from training.train import optimisation

    recipe = load_recipe(RECIPES / "rsna_retinanet.yaml", SMALL_NETWORKS["RetinaNet"] if dry_run else [])
    size = 128 if dry_run else 512
    det = build_detector(recipe["network"], recipe["detection"]).to(dev)
    opt, _, scaler = optimisation(recipe, det.network.parameters(), dev, mode="max")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, size, size, generator=g).to(dev)
    targets = [{det.target_box_key: torch.tensor([[size * 0.2, size * 0.2, size * 0.6, size * 0.5]], device=dev),
                det.target_label_key: torch.zeros(1, dtype=torch.long, device=dev)} for _ in range(2)]  # fmt: skip
    _reset_peak(dev)
    det.train()
    t0 = time.perf_counter()
    with autocast(dev):
        parts = det(x, targets)
    loss = sum(v.float() for v in parts.values())
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    _sync(dev)
    t_train = time.perf_counter() - t0
    det.eval()
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast(dev):
        found = det(x)
    _sync(dev)
    if not math.isfinite(float(loss.detach())):
        raise RuntimeError(f"RetinaNet loss is not finite: { {k: float(v) for k, v in parts.items()} }")
    return {"backbone": recipe["network"]["args"]["backbone"], "input_size": size, "batch": 2, "amp": dev.type == "cuda",
            "losses": {k: round(float(v.detach()), 4) for k, v in parts.items()}, "train_step_s": round(t_train, 3),
            "detect_s": round(time.perf_counter() - t0, 3), "boxes_per_image": [len(d[det.target_box_key]) for d in found],
            "peak_gpu_mb": _peak_mb(dev)}  # fmt: skip


# ---- the run ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, action="append", default=[],
                   help="bundle(s) to compare and time (default: models/chest_xray, else quick demo weights)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu.json")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; sections that would not fit are skipped")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, small: every path that needs no GPU")
    p.add_argument("--work", type=Path, default=None, help="folder for tiny data, runs and demo weights (default: temporary)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    try:
        dev = resolve_device("cpu" if args.dry_run else "cuda")
    except DeviceError as e:
        print(f"bench/gpu.py: {e} (--dry-run checks the CPU path)", file=sys.stderr)
        return 2
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="pacsnode-gpu-"))
    bundles = list(args.bundle) or ([REPO / "models" / "chest_xray"] if (REPO / "models" / "chest_xray").is_dir() else [])
    report: dict[str, Any] = {"dry_run": args.dry_run, "cuda_verified": not args.dry_run, "budget_s": args.budget,
                              "device": device_info(dev), "sections": {}}  # fmt: skip
    print(json.dumps(report["device"]), flush=True)
    if not bundles:
        from training.demo import train_demo

        t0 = time.perf_counter()
        train_demo(work / "models" / "chest_xray", quick=True)
        bundles = [work / "models" / "chest_xray"]
        report["demo_weights_s"] = round(time.perf_counter() - t0, 1)
    images = radiographs()[:2] if args.dry_run else radiographs()  # RG1 and one radiograph suffice on the CPU
    batches = DRY_BATCHES if args.dry_run else GPU_BATCHES
    min_seconds, min_runs = (0.0, 1) if args.dry_run else (2.0, 3)
    sections: list[tuple[str, float, Callable[[], dict[str, Any]]]] = [  # (name, estimated seconds, run)
        ("parity", 60, lambda: parity(bundles, dev, images)),
        ("throughput", 90, lambda: throughput(bundles[0], dev, images, batches, min_seconds, min_runs)),
        ("training", 150, lambda: training_epochs(dev, work / "training", args.dry_run)),
        ("retinanet", 30, lambda: retinanet_step(dev, args.dry_run)),
    ]
    failed = False
    for name, estimate, fn in sections:
        left = args.budget - (time.perf_counter() - t_start)
        if left < estimate and not args.dry_run:
            report["sections"][name] = {"skipped": f"{left:.0f} s of the budget left, about {estimate:.0f} s needed"}
            continue
        t0 = time.perf_counter()
        try:
            result = fn()
            report["sections"][name] = {"seconds": round(time.perf_counter() - t0, 1), **result}
        except Exception as e:  # noqa: BLE001  (a failed section is reported; the others still run)
            failed = True
            report["sections"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=8)}
        print(f"{name}: {json.dumps(report['sections'][name], default=str)[:2000]}", flush=True)
    report["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"report: {args.out} ({report['elapsed_s']} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
