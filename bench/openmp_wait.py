"""How the inference workers' OpenMP threads should wait, and how many: DenseNet121 forwards on
idle cores and beside busy processes, with each setting, in the same run.

A CPU forward pass is several hundred parallel operations; between them torch's OpenMP threads
(libgomp) wait for the next. They can spin (fast to resume, but a spinning thread takes a core
that another program, or a preempted sibling, needs) or sleep (resumed through the kernel, which
costs on a VM). The workers' default (node/cli.py `openmp_defaults`: a short spin; and
node/engine/cores.py: one thread per core other programs left free) is measured here against
the alternatives. Each setting runs in a process of its own (libgomp reads its environment
once): the frozen channels_last DenseNet121 at 224 px, batch 1, built by the pipeline's own
`frozen_for_cpu`, with a pause before each forward as between jobs. Prints the median and 90th
percentile per setting and round, idle and beside each count of `--busy` processes that spin in
pure Python, and each setting's median against the default's.

    python bench/openmp_wait.py [--rounds 3] [--forwards 20] [--busy 1,2 (default: 1 and one per core)]
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

from node.cli import OPENMP_SPINCOUNT, OPENMP_WAIT_VARIABLES  # noqa: E402

ADAPTIVE = 0  # threads: as node/engine/cores.py decides before each forward
#: name -> (environment, torch threads; None: torch's default of one per core)
SETTINGS: dict[str, tuple[dict[str, str], int | None]] = {
    "workers' default (spin, threads by free cores)": ({"GOMP_SPINCOUNT": OPENMP_SPINCOUNT}, ADAPTIVE),
    f"GOMP_SPINCOUNT={OPENMP_SPINCOUNT}, all threads": ({"GOMP_SPINCOUNT": OPENMP_SPINCOUNT}, None),
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
    from node.engine.cores import SAMPLE_SECONDS, set_threads_for_next_pass

    if threads:
        torch.set_num_threads(threads)
    net = pipeline_frozen(DenseNet121(spatial_dims=2, in_channels=1, out_channels=15).eval()
                          .to(memory_format=torch.channels_last))  # type: ignore[call-overload]
    x = torch.randn(1, 1, SIZE, SIZE).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(3):  # the profiling executor specialises the graph on its first calls
            net(x)
        if threads == ADAPTIVE:
            set_threads_for_next_pass()  # starts the sampling
            time.sleep(2 * SAMPLE_SECONDS)
        for _ in range(forwards):
            time.sleep(PAUSE_S)
            if threads == ADAPTIVE:
                set_threads_for_next_pass()
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"median": statistics.median(times), "p90": times[int(0.9 * (len(times) - 1))]}))


def measure(name: str, forwards: int) -> dict[str, float]:
    env, threads = SETTINGS[name]
    clean = {k: v for k, v in os.environ.items() if k not in OPENMP_WAIT_VARIABLES}
    argv = [sys.executable, __file__, "--child", str(forwards)] + ([] if threads is None else ["--threads", str(threads)])
    out = subprocess.run(argv, env={**clean, **env}, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forwards", type=int, default=20)
    ap.add_argument("--busy", default=f"1,{os.cpu_count() or 2}", help="counts of busy processes beside the forwards")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.threads)
        return 0
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; DenseNet121 224 px batch 1, "
          f"frozen channels_last; {args.forwards} forwards a setting, {PAUSE_S * 1e3:.0f} ms pause before each")
    medians: dict[tuple[str, int], list[float]] = {}
    busy_counts = [0, *(int(n) for n in args.busy.split(","))]
    for rnd in range(1, args.rounds + 1):
        for busy in busy_counts:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
            try:
                for name in SETTINGS:
                    r = measure(name, args.forwards)
                    medians.setdefault((name, busy), []).append(r["median"])
                    print(f"round {rnd} busy {busy} {name:48s} median {r['median'] * 1e3:6.1f} ms  "
                          f"p90 {r['p90'] * 1e3:6.1f} ms", flush=True)
            finally:
                for p in spinners:
                    p.kill()
                    p.wait()
    print(f"\nmedian of the rounds' medians (ms), and against {DEFAULT}:")
    for busy in busy_counts:
        ref = statistics.median(medians[(DEFAULT, busy)])
        for name in SETTINGS:
            values = medians[(name, busy)]
            m = statistics.median(values)
            print(f"  {busy} busy processes  {name:48s} {m * 1e3:6.1f} (rounds {min(values) * 1e3:.0f}-"
                  f"{max(values) * 1e3:.0f})  x{m / ref:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
