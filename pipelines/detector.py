"""The lung-opacity detector (MONAI RetinaNet) as the node builds it: network, settings, box conversions.

`training/detection.py` trains it on RSNA and records the run; a bundle's optional
`networks.detector` names the same architecture, arguments and settings, and `build_detector`
makes the same network from them. Only the building lives here: the node never trains.

Box conventions. RSNA labels are (x, y, width, height) in source pixels, x along the columns.
MONAI's detector works in StandardMode "xyxy" whose first coordinate runs along the tensor's
first spatial axis, which for a (C, H, W) image is the row: a detector box here is
(row0, col0, row1, col1) at the input size, and anchor shapes are (height, width).
`to_detector` and `from_detector` are the only conversions.

Without torchvision (this environment) two MONAI helpers cannot be used:
`resnet_fpn_feature_extractor` (torchvision's IntermediateLayerGetter) and the detector's
matcher dispatch (an isinstance check against torchvision's Matcher raises even when the ATSS
matcher is set). `ResNetFPN` and `_Detector` below replace exactly those two pieces.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
from monai.networks.nets import resnet
from torch import nn

from pipelines.base import merge_settings

__all__ = [
    "BACKBONES",
    "DETECTION_DEFAULTS",
    "ResNetFPN",
    "build_detector",
    "from_detector",
    "to_detector",
]

BACKBONES = {name: getattr(resnet, name) for name in ("resnet10", "resnet18", "resnet34", "resnet50", "resnet101")}

DETECTION_DEFAULTS: dict[str, Any] = {
    "atss_candidates": 4,  # anchors per level per box that ATSS considers
    "center_in_gt": False,  # MONAI's advice for small objects; keeps more candidates
    "hard_negative": {"batch_size_per_image": 64, "positive_fraction": 0.3, "min_neg": 16, "pool_size": 20},
    "box_selector": {"score_thresh": 0.05, "topk_candidates_per_level": 1000, "nms_thresh": 0.22,
                     "detections_per_img": 8},  # fmt: skip
}


# ---- network ---------------------------------------------------------------------------------


class ResNetFPN(nn.Module):
    """MONAI ResNet stages -> MONAI FPN (+ a max-pooled top level), without torchvision.

    The same network as `resnet_fpn_feature_extractor` (whose layer getter needs torchvision):
    `body` keeps the ResNet's module names up to the last returned stage, so torchvision/MONAI
    ResNet state dicts load into it by name. Output: one map per returned stage, plus one.
    """

    def __init__(self, backbone: resnet.ResNet, returned_layers: Sequence[int], out_channels: int) -> None:
        super().__init__()
        self.returned = [f"layer{k}" for k in returned_layers]
        stem = ["conv1", "bn1", "act"] + ([] if backbone.no_max_pool else ["maxpool"])
        keep = stem + [f"layer{k}" for k in range(1, max(returned_layers) + 1)]
        self.body = nn.Sequential(OrderedDict((n, getattr(backbone, n)) for n in keep))
        # stage k has (layer-4 channels / 8) * 2**(k-1) channels, as MONAI's _resnet_fpn_extractor assumes
        in_channels = [backbone.in_planes // 8 * 2 ** (k - 1) for k in returned_layers]
        self.fpn = FeaturePyramidNetwork(spatial_dims=2, in_channels_list=in_channels, out_channels=out_channels,
                                         extra_blocks=LastLevelMaxPool(2))  # fmt: skip
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats: OrderedDict[str, torch.Tensor] = OrderedDict()
        for name, module in self.body.named_children():
            x = module(x)
            if name in self.returned:
                feats[name] = x
        out: dict[str, torch.Tensor] = self.fpn(feats)
        return out


class _Detector(RetinaNetDetector):
    """RetinaNetDetector whose anchor matching never touches torchvision.

    MONAI's `compute_anchor_matched_idxs` tests isinstance(matcher, torchvision Matcher) before
    the ATSS branch; without torchvision that test raises OptionalImportError. This is its ATSS
    branch alone (`build_detector` always sets the ATSS matcher).
    """

    def compute_anchor_matched_idxs(
        self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]], num_anchor_locs_per_level: Sequence[int]
    ) -> list[torch.Tensor]:  # fmt: skip
        out = []
        for a, t in zip(anchors, targets, strict=True):
            boxes = t[self.target_box_key].to(a.device)
            if boxes.numel() == 0:  # no opacity: every anchor is background
                out.append(torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device))
                continue
            _, matched = self.proposal_matcher(boxes, a, num_anchor_locs_per_level, self.num_anchors_per_loc)
            out.append(matched)
        return out


def build_detector(network: dict[str, Any], detection: dict[str, Any] | None = None) -> RetinaNetDetector:
    """A 2D, one-channel, one-class RetinaNet detector from a recipe's `network` and `detection`.

    network: {"architecture": "RetinaNet", "args": {backbone: resnet10..resnet101,
    widen_factor, conv1_t_stride, returned_layers, fpn_channels, anchor_shapes: [[h, w], ...]}}.
    Anchor shapes are for the first (finest) level in training pixels; level l uses them x 2**l,
    matching the FPN's stride doubling.
    """
    if network.get("architecture") != "RetinaNet":
        raise ValueError(f"detection needs architecture: RetinaNet, not {network.get('architecture')!r}")
    a = dict(network.get("args", {}))
    name = a.pop("backbone", "resnet50")
    if name not in BACKBONES:
        raise ValueError(f"unknown RetinaNet backbone {name!r}; known: {sorted(BACKBONES)}")
    returned = [int(k) for k in a.pop("returned_layers", [1, 2, 3])]
    if not returned or min(returned) < 1 or max(returned) > 4:
        raise ValueError(f"returned_layers must be stages 1..4, not {returned}")
    fpn_channels = int(a.pop("fpn_channels", 256))
    shapes = a.pop("anchor_shapes", [[32, 32], [48, 32], [64, 32]])
    stride = int(a.setdefault("conv1_t_stride", 2))
    backbone = BACKBONES[name](pretrained=False, spatial_dims=2, n_input_channels=1, feed_forward=False, **a)
    anchors = AnchorGeneratorWithAnchorShape(
        feature_map_scales=[2**level for level in range(len(returned) + 1)], base_anchor_shapes=shapes
    )
    net = RetinaNet(
        spatial_dims=2, num_classes=1, num_anchors=anchors.num_anchors_per_location()[0],
        feature_extractor=ResNetFPN(backbone, returned, fpn_channels),
        # input sides must survive every downsampling: conv1 stride x maxpool x stages x extra pool
        size_divisible=stride * 2 * 2 ** max(returned),
    )  # fmt: skip
    det = _Detector(net, anchors)
    cfg = merge_settings(DETECTION_DEFAULTS, detection or {})
    det.set_atss_matcher(num_candidates=int(cfg["atss_candidates"]), center_in_gt=bool(cfg["center_in_gt"]))
    det.set_hard_negative_sampler(**cfg["hard_negative"])
    det.set_box_selector_parameters(**cfg["box_selector"])
    return det


# ---- boxes ---------------------------------------------------------------------------------


def to_detector(boxes: Sequence[Sequence[float]], shape: tuple[int, int], size: int) -> np.ndarray:
    """RSNA (x, y, w, h) in an (H, W) source image -> (N, 4) detector boxes at size x size."""
    h, w = shape
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    x, y, bw, bh = b.T
    return np.stack([y * size / h, x * size / w, (y + bh) * size / h, (x + bw) * size / w], 1)


def from_detector(boxes: np.ndarray, shape: tuple[int, int], size: int) -> np.ndarray:
    """Inverse of `to_detector`: (N, 4) (row0, col0, row1, col1) at size -> RSNA (x, y, w, h)."""
    h, w = shape
    r0, c0, r1, c1 = np.asarray(boxes, np.float64).reshape(-1, 4).T
    return np.stack([c0 * w / size, r0 * h / size, (c1 - c0) * w / size, (r1 - r0) * h / size], 1)
