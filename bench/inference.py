"""CPU inference: DenseNet121 at 224 px, batch 1 and 8, against its FLOP bound.

The bound is the network's FLOPs (counted by torch's FlopCounterMode on this very model) at
the matmul peak measured in the same run (float32 GEMM, the same threads): the time the
forward pass would take if every FLOP ran at GEMM speed. Prints images/s and time / bound
(target: at most 1.5) for each way of running it:

- eager: the MONAI network as built;
- eager, channels_last: NHWC weights and input (oneDNN's preferred layout for convolutions);
- frozen, channels_last: TorchScript trace + torch.jit.freeze, as pipelines/chest_xray.py runs it;
- frozen + optimize_for_inference: torch.jit.optimize_for_inference on top (oneDNN/MKLDNN
  layouts and fusions chosen at load);
- with --compile, torch.compile (Inductor: fuses the batch norms, ReLUs and concatenations
  between the convolutions into generated C++; needs a C++ compiler, and compiles once per
  batch size: the compile time is printed).

    python bench/inference.py [--threads N] [--repeat 5] [--compile]

The classifier of the demo bundle is this network (one input channel, 15 labels); the weights
do not change the time, so the network is built here with random ones.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from node.cli import OPENMP_WAIT_VARIABLES, openmp_defaults  # noqa: E402

if __name__ == "__main__":
    # How the workers' OpenMP threads wait (read once, when torch loads): measured as they run.
    openmp_defaults(os.environ)

import torch  # noqa: E402
from monai.networks.nets import DenseNet121  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipelines.chest_xray import frozen_for_cpu  # noqa: E402

SIZE = 224
BATCHES = (1, 8)


def matmul_peak(n: int = 2048, repeat: int = 10) -> float:
    """FLOP/s of float32 n x n GEMM (best of `repeat`), the CPU's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: oneDNN/MKL pick their kernels
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeat))
    return 2 * n**3 / best


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def count_flops(net: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (a multiply-add counts 2), as torch counts them."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x)
    return int(counter.get_total_flops())


def pipeline_frozen(nhwc: torch.nn.Module) -> torch.jit.ScriptModule:
    """A channels_last network traced and frozen by the pipeline's own code (pipelines/chest_xray.py)."""
    return frozen_for_cpu(nhwc, (1, 1, SIZE, SIZE))


def variants(net: torch.nn.Module, compiled: bool = False) -> dict[str, Callable[[torch.Tensor], object]]:
    """The ways of running `net` compared here (each returns a callable taking a NCHW batch)."""
    eager = net.eval()
    nhwc = DenseNet121(spatial_dims=2, in_channels=1, out_channels=15).eval()
    nhwc.load_state_dict(net.state_dict())
    nhwc = nhwc.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    frozen = pipeline_frozen(nhwc)
    with torch.no_grad():
        optimised = torch.jit.optimize_for_inference(pipeline_frozen(nhwc))

    def nhwc_input(run: Callable[[torch.Tensor], object]) -> Callable[[torch.Tensor], object]:
        return lambda x: run(x.contiguous(memory_format=torch.channels_last))

    runs: dict[str, Callable[[torch.Tensor], object]] = {
        "eager": eager,
        "eager, channels_last": nhwc_input(nhwc),
        "frozen, channels_last (the pipeline's)": nhwc_input(frozen),
        "frozen + optimize_for_inference": nhwc_input(optimised),
    }
    if compiled:
        runs["torch.compile (Inductor), channels_last"] = nhwc_input(_compile_timed(nhwc))
    return runs


def _compile_timed(net: torch.nn.Module) -> Callable[[torch.Tensor], object]:
    """torch.compile'd ``net``; the first call of each batch size compiles, and says how long it took."""
    compiled = torch.compile(net, dynamic=False)
    seen: set[int] = set()

    def run(x: torch.Tensor) -> object:
        if x.shape[0] in seen:
            return compiled(x)
        t0 = time.perf_counter()
        out = compiled(x)
        seen.add(x.shape[0])
        print(f"  (torch.compile for batch {x.shape[0]}: {time.perf_counter() - t0:.0f} s)", flush=True)
        return out

    return run


def seconds_per_batch(run: Callable[[torch.Tensor], object], batch: int, repeat: int) -> float:
    """Median seconds of one forward pass over `batch` images (after 3 warm-up passes: the
    profiling executor specialises a TorchScript graph on its first calls)."""
    x = torch.randn(batch, 1, SIZE, SIZE)
    with torch.inference_mode():
        for _ in range(3):
            run(x)
        return statistics.median(_timed(lambda: run(x)) for _ in range(repeat))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="also torch.compile (Inductor; minutes of compiling)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=15).eval()
    flops = count_flops(net, torch.zeros(1, 1, SIZE, SIZE))
    peak = matmul_peak()
    waits = {k: os.environ[k] for k in OPENMP_WAIT_VARIABLES if k in os.environ}
    print(f"OpenMP threads wait with {waits} (the workers' default unless the environment sets one: node/cli.py)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, oneDNN "
          f"{'on' if torch.backends.mkldnn.is_available() else 'off'}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} (a shared machine inflates the times; the peak is measured in the same run)")
    print(f"matmul peak (float32 2048^3 GEMM): {peak / 1e9:.1f} GFLOP/s")
    bound = flops / peak
    print(f"DenseNet121 {SIZE} px, 1 channel: {flops / 1e9:.2f} GFLOP per image; FLOP bound {bound * 1e3:.1f} ms per image")
    # On a shared machine the load drifts: each row is also set against a peak measured just
    # before it ("local"), and all rows against the best peak seen in the run.
    print(f"{'variant':42s} {'batch':>5s} {'ms/image':>9s} {'images/s':>9s} {'local peak':>10s} "
          f"{'time/bound':>10s}", flush=True)
    rows = []
    for name, run in variants(net, args.compile).items():
        for b in BATCHES:
            local = matmul_peak(repeat=5)
            peak = max(peak, local)
            per_image = seconds_per_batch(run, b, args.repeat) / b
            rows.append((name, b, per_image))
            print(f"{name:42s} {b:5d} {per_image * 1e3:9.1f} {1 / per_image:9.1f} {local / 1e9:8.1f} G "
                  f"{per_image * local / flops:10.2f}", flush=True)
    print(f"best matmul peak seen in the run: {peak / 1e9:.1f} GFLOP/s; against it (FLOP bound "
          f"{flops / peak * 1e3:.1f} ms per image):")
    for name, b, per_image in rows:
        print(f"  {name:40s} batch {b}: time/bound {per_image * peak / flops:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
