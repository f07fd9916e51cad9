"""Networks the recipes train: the node's own registry (pipelines/networks.py), so anything a
recipe trains can be bundled, plus local pretrained weights.

No weights are downloaded: `load_pretrained` takes a local file (state dict) and otherwise the
network keeps its random initialisation.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from pipelines.bundle import build_network
from pipelines.networks import VGG16, SmallCNN

__all__ = ["SmallCNN", "VGG16", "build_network", "load_pretrained"]

log = logging.getLogger(__name__)


def load_pretrained(net: nn.Module, path: Path) -> dict[str, int]:
    """Load a local checkpoint (a state dict, or {"state_dict": ...}) into `net` by name.

    A 3-channel first convolution (ImageNet) is summed over its input channels for grayscale
    input; tensors whose shape still differs (the new output layer) are skipped. Raises
    ValueError when nothing matches (the wrong architecture's file). Returns the counts.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = net.state_dict()
    loaded, skipped = {}, 0
    for k, v in state.items():
        k = k.removeprefix("module.")
        if k not in own:
            skipped += 1
            continue
        if v.ndim == 4 and own[k].ndim == 4 and v.shape[1] == 3 and own[k].shape[1] == 1 and v.shape[0] == own[k].shape[0]:
            v = v.sum(dim=1, keepdim=True)  # RGB filters -> one grayscale filter with the same response
        if v.shape != own[k].shape:
            skipped += 1
            continue
        loaded[k] = v
    if not loaded:
        raise ValueError(f"{path}: no tensor matches {type(net).__name__}'s parameter names and shapes")
    net.load_state_dict(loaded, strict=False)
    counts = {"loaded": len(loaded), "skipped": skipped, "random_init": len(own) - len(loaded)}
    log.info("pretrained weights %s: %s", path, counts)
    return counts
