"""Torch device selection: "auto" picks CUDA when present; an explicit CUDA request never falls back."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch

__all__ = ["DeviceError", "resolve_device", "autocast"]


class DeviceError(RuntimeError):
    """The configured device cannot be used on this machine."""


def resolve_device(device: str) -> torch.device:
    """auto -> cuda when available else cpu; cpu; cuda or cuda:N (error if not available)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise DeviceError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
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


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed precision (float16) on CUDA; a no-op on the CPU."""
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            yield
    else:
        yield
