"""How the inference workers' OpenMP threads should wait: DenseNet121 forwards on idle cores and
beside busy processes, with each waiting setting, in the same run.

A CPU forward pass is several hundred parallel operations; between them torch's OpenMP threads
(libgomp) wait for the next. They can spin (fast to resume, but a spinning thread takes a core
that another program, or a preempted sibling, needs) or sleep (resumed through the kernel, which
costs on a VM). The workers' default (node/cli.py `openmp_defaults`) is measured here against the
alternatives: each setting runs in a process of its own (libgomp reads its environment once),
the frozen channels_last DenseNet121 at 224 px, batch 1, as pipelines/chest_xray.py runs it,
with a pause before each forward as between jobs. Prints the median and 90th percentile per
setting and round, idle and beside `--busy` processes that spin in pure Python, and each
setting's median against the default's.

    python bench/openmp_wait.py [--rounds 3] [--forwards 20] [--busy N (default: one per core)]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.cli import OPENMP_SPINCOUNT  # noqa: E402

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
#: name -> (environment, torch threads; None: torch's default of one per core)
SETTINGS: dict[str, tuple[dict[str, str], int | None]] = {
    f"GOMP_SPINCOUNT={OPENMP_SPINCOUNT} (workers' default)": ({"GOMP_SPINCOUNT": OPENMP_SPINCOUNT}, None),
    "OMP_WAIT_POLICY=PASSIVE (sleep at once)": ({"OMP_WAIT_POLICY": "PASSIVE"}, None),
    "torch's default (spin 3 ms)": ({}, None),
    "one thread": ({"GOMP_SPINCOUNT": OPENMP_SPINCOUNT}, 1),
}
DEFAULT = next(iter(SETTINGS))
PAUSE_S = 0.05


def child(forwards: int, threads: int | None) -> None:
    """Time `forwards` forwards of the pipeline's frozen DenseNet121; print median and p90 (s) as JSON."""
    import torch
    from monai.networks.nets import DenseNet121

    from bench.inference import SIZE, pipeline_frozen

    if threads:
        torch.set_num_threads(threads)
    net = pipeline_frozen(DenseNet121(spatial_dims=2, in_channels=1, out_channels=15).eval()
                          .to(memory_format=torch.channels_last))  # type: ignore[call-overload]
    x = torch.randn(1, 1, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(3):  # the profiling executor specialises the graph on its first calls
            net(x)
        for _ in range(forwards):
            time.sleep(PAUSE_S)
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"median": statistics.median(times), "p90": times[int(0.9 * (len(times) - 1))]}))


def measure(name: str, forwards: int) -> dict[str, float]:
    env, threads = SETTINGS[name]
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    argv = [sys.executable, __file__, "--child", str(forwards)] + (["--threads", str(threads)] if threads else [])
    out = subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forwards", type=int, default=20)
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy processes beside the forwards")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.threads)
        return 0
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; DenseNet121 224 px batch 1, "
          f"frozen channels_last; {args.forwards} forwards a setting, {PAUSE_S * 1e3:.0f} ms pause before each")
    medians: dict[tuple[str, str], list[float]] = {}
    for rnd in range(1, args.rounds + 1):
        for condition in ("idle", "busy"):
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                        for _ in range(args.busy if condition == "busy" else 0)]
            try:
                for name in SETTINGS:
                    r = measure(name, args.forwards)
                    medians.setdefault((name, condition), []).append(r["median"])
                    print(f"round {rnd} {condition:4s} {name:44s} median {r['median'] * 1e3:6.1f} ms  "
                          f"p90 {r['p90'] * 1e3:6.1f} ms", flush=True)
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    print(f"\nmedian of the rounds' medians (ms), and against {DEFAULT}:")
    for condition in ("idle", f"busy ({args.busy} busy processes)"):
        key = condition.split()[0]
        ref = statistics.median(medians[(DEFAULT, key)])
        for name in SETTINGS:
            values = medians[(name, key)]
            m = statistics.median(values)
            print(f"  {condition:24s} {name:44s} {m * 1e3:6.1f} (rounds {min(values) * 1e3:.0f}-"
                  f"{max(values) * 1e3:.0f})  x{m / ref:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
