"""Torch device selection: "auto" picks CUDA when present; an explicit CUDA request never falls back.

`check_device` answers "can this machine run `device`?" at start without importing torch in the
calling process (`pacsnode run` hosts the listener, which must stay small): a child Python
resolves the device. `python -m pipelines.device cuda` is that child.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceError", "autocast", "check_device", "resolve_device"]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceError(RuntimeError):
    """The configured device cannot be used on this machine."""


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available else cpu; cpu; cuda or cuda:N (error if not available)."""
    if not _DEVICE.fullmatch(device):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r} was requested but CUDA is not available "
            f"(torch {torch.__version__}, built for CUDA: {torch.version.cuda}); "
            "use device: auto or cpu to run on the CPU"
        )
    dev = torch.device(device)
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise DeviceError(
            f"device {device!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist"
        )
    return dev


def check_device(device: str, timeout: float = 120.0) -> None:
    """Raise DeviceError unless this machine can run `device`; torch is imported in a child only.

    auto and cpu always can; cuda and cuda:N are resolved by `python -m pipelines.device`.
    """
    if not _DEVICE.fullmatch(device):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device in ("auto", "cpu"):
        return
    try:
        out = subprocess.run([sys.executable, "-m", "pipelines.device", device],
                             capture_output=True, text=True, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise DeviceError(f"checking device {device!r} took more than {timeout:.0f} s") from e
    if out.returncode != 0:
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        raise DeviceError(lines[-1] if lines else f"checking device {device!r} failed (exit {out.returncode})")


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed precision (float16) on CUDA; a no-op on the CPU."""
    if device.type == "cuda":
        import torch

        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        yield


def _main(argv: list[str]) -> int:
    """`python -m pipelines.device DEVICE`: print the resolved device, or the reason on stderr."""
    try:
        print(resolve_device(argv[0] if argv else "auto"))
    except DeviceError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
