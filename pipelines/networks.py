"""Networks a bundle may name, by architecture: what the node can build and training trains.

UNet and DenseNet121 come from MONAI; ResNet50 is MONAI's (torchvision's layer names, so
ImageNet checkpoints map one to one); VGG16 and the seeds' small CNN are plain torch here (no
torchvision in this environment). Metadata names an entry of `ARCHITECTURES`, never code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from monai.networks.nets import DenseNet121, UNet, resnet50
from torch import nn

__all__ = ["ARCHITECTURES", "SmallCNN", "VGG16"]


class SmallCNN(nn.Module):
    """The seeds' Kermany CNN (150 x 150 grayscale): five conv blocks (32-64-64-128-256) with
    batch norm, max pooling and dropout, dense 128, one logit.

    The 4 x 4 adaptive pool is what 150 px gives after five poolings; it lets tiny test images
    through unchanged otherwise.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c, drop in ((32, False), (64, True), (64, False), (128, True), (256, True)):
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
            if drop:
                layers.append(nn.Dropout(dropout))
            layers += [nn.BatchNorm2d(c), nn.MaxPool2d(2, ceil_mode=False)]
            c_in = c
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256 * 16, 128), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(128, out_channels)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16(nn.Module):
    """VGG16 (configuration D) with torchvision's parameter names (`features.N`, `classifier.N`),
    so an ImageNet vgg16 state dict loads by name. `width` scales the channels (tiny tests)."""

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: float = 1.0,
                 hidden: int = 4096, dropout: float = 0.5) -> None:  # fmt: skip
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                c = max(1, int(int(v) * width))
                layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(inplace=True)]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(7)
        self.classifier = nn.Sequential(
            nn.Linear(c_in * 49, hidden), nn.ReLU(True), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout), nn.Linear(hidden, out_channels),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _resnet50(**args: Any) -> nn.Module:
    return resnet50(pretrained=False, **args)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "UNet": UNet, "DenseNet121": DenseNet121, "ResNet50": _resnet50, "VGG16": VGG16, "SmallCNN": SmallCNN,
}  # fmt: skip
