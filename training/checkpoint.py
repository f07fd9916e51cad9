"""Resumable checkpoints shared by the training loops (classifier/segmentation and detection).

One file per run (`checkpoint.pt`), replaced atomically after every epoch: network, optimiser,
scheduler and gradient-scaler states, the CPU (and CUDA) random states, and the loop's own
state (epoch, best score, history). With shuffling and augmentation seeded by (seed, epoch), a
resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

__all__ = ["restore_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

_LOOP_KEYS = ("epoch", "best", "history")


def save_checkpoint(
    path: Path, state: dict[str, Any], net: torch.nn.Module, opt: torch.optim.Optimizer,
    sched: Any, scaler: torch.amp.GradScaler, dev: torch.device,
) -> None:  # fmt: skip
    """Write the checkpoint beside `path` and rename it into place (a crash keeps the last one)."""
    tmp = path.with_suffix(".tmp")
    torch.save({**{k: state[k] for k in _LOOP_KEYS}, "net": net.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict() if sched is not None else None, "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if dev.type == "cuda" else None}, tmp)  # fmt: skip
    tmp.replace(path)


def restore_checkpoint(
    path: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, scaler: torch.amp.GradScaler,
    dev: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """Load everything `save_checkpoint` wrote back into the objects; returns the loop state."""
    c = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds RNG states
    net.load_state_dict(c["net"])
    opt.load_state_dict(c["opt"])
    if sched is not None and c["sched"] is not None:
        sched.load_state_dict(c["sched"])
    scaler.load_state_dict(c["scaler"])
    torch.set_rng_state(c["torch_rng"])
    if dev.type == "cuda" and c.get("cuda_rng") is not None:
        torch.cuda.set_rng_state_all(c["cuda_rng"])  # dropout and samplers on the GPU draw from these
    state = {k: c[k] for k in _LOOP_KEYS}
    log.info("resuming %s after epoch %d", path.parent, state["epoch"])
    return state
