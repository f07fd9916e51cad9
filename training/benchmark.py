"""Measure the pipeline: `python -m training.benchmark --bundle models/chest_xray [--device cpu]`.

Prints JSON: per-stage medians over N runs on RG1_UNCR (after warm-up), DenseNet121 ms/image at
the bundle's classifier size (eager vs the pipeline's optimised module, batch 1 and 8), load
time and the process's peak RSS after loading.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import pydicom
import torch
from pydicom.data import get_testdata_file

from pipelines.chest_xray import ChestXrayPipeline, FeatureHead


def _ms_per_image(fn, x: torch.Tensor, n: int) -> float:  # type: ignore[no-untyped-def]
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        t = time.perf_counter()
        for _ in range(n):
            fn(x)
    return round((time.perf_counter() - t) / n / len(x) * 1000, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    t0 = time.perf_counter()
    p = ChestXrayPipeline(args.bundle, args.device)
    load_s = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    path = str(get_testdata_file("RG1_UNCR.dcm"))
    for _ in range(3):
        p.run([pydicom.dcmread(path)])
    runs = [p.run([pydicom.dcmread(path)])[0].timings for _ in range(args.runs)]
    stages = {k: round(statistics.median(r[k] for r in runs) * 1000, 1) for k in runs[0]}
    c = p.bundle.classifier_size
    eager = FeatureHead(p.bundle.classifier).eval()
    dense = {}
    for b in (1, 8):
        x = torch.rand(b, 1, c, c, generator=torch.Generator().manual_seed(0))
        dense[f"eager_b{b}"] = _ms_per_image(eager, x, 10)
        xc = x.contiguous(memory_format=torch.channels_last)
        dense[f"optimised_b{b}"] = _ms_per_image(p._cls, xc, 10)
    print(json.dumps({
        "device": str(p.device), "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
        "maxrss_mb_after_load": round(rss_mb), "stages_ms_median": stages,
        "densenet121_ms_per_image": dense,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
