"""Grad-CAM for any classifier a bundle may hold (MONAI's `GradCAM`): the node and training share it.

Target layer per architecture (`DEFAULT_LAYERS`, a `named_modules()` name), overridden by the
recipe key `gradcam_layer`:

    DenseNet121  class_layers.relu   the post-ReLU 1024 feature maps before global pooling
    ResNet50     layer4              the last bottleneck's output (after its ReLU)
    VGG16        features.29         the last ReLU in `features` (before the last max pool)
    SmallCNN     features.19         the ReLU of the fifth (last) conv block

In-place ReLUs: torch's full backward hook (which MONAI registers on the target) fails with
"Output 0 of BackwardHookFunction is a view and is being modified inplace" when the target's
output is overwritten in place: by the target itself (an `nn.ReLU(inplace=True)`) or by the next
module (a conv followed by an in-place ReLU). MONAI switches `inplace` off on the target only,
on the caller's network, and leaves its hooks registered for good. So Grad-CAM runs on a copy
of the network with every `inplace` flag off (`GradCamExplainer`, made once per network): any
module can be the target and the caller's network is left untouched. MONAI's hook state is
cleared after every call; left in place, its autograd graph keeps each copy alive. An in-place tensor operation in a `forward` (ResNet's
`out += residual` after `bn3`) cannot be switched off: such a target is refused with a clear
error (the block's output, e.g. `layer4.2`, is the one to use), and so is a module that runs
more than once per forward pass (ResNet's `act`, shared by the three stages of a bottleneck).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from monai.transforms import ScaleIntensity
from monai.visualize import GradCAM

__all__ = ["DEFAULT_LAYERS", "GradCamExplainer", "gradcam", "target_layer"]

DEFAULT_LAYERS = {
    "DenseNet121": "class_layers.relu",
    "ResNet50": "layer4",
    "VGG16": "features.29",
    "SmallCNN": "features.19",
}


def target_layer(net: torch.nn.Module, spec: dict[str, Any], layer: str | None = None) -> str:
    """The Grad-CAM layer of `net` built from `spec`: `layer` when given, else the default.

    Raises ValueError naming the network's layers when the name is not one of its modules.
    """
    arch = spec.get("architecture")
    name = layer or DEFAULT_LAYERS.get(str(arch))
    if name is None:
        raise ValueError(f"no default Grad-CAM layer for {arch}: set gradcam_layer in the recipe")
    names = [n for n, _ in net.named_modules() if n]
    if name not in names:
        raise ValueError(f"{arch} has no layer {name!r} for Grad-CAM; its layers: {', '.join(names)}")
    return name


def _unit_range(maps: torch.Tensor) -> torch.Tensor:
    # MONAI's default postprocessing maps (min, max) to (1, 0), i.e. flips the map: scale to (0, 1)
    # instead, per image; a constant (all-zero) map stays zero
    scale = ScaleIntensity(minv=0.0, maxv=1.0)
    return torch.stack([torch.as_tensor(scale(m)).as_subclass(torch.Tensor) for m in maps])  # no MetaTensor


class GradCamExplainer:
    """Grad-CAM of one network at one layer, prepared once and reused for every call.

    Holds a copy of `net` with every `inplace` flag off and its weights frozen (the input
    carries the gradient instead, so no weight gradients are kept). After each call MONAI's
    hook state (score, activations, gradients) is cleared: its autograd graph refers back to
    the hooks and the network, a cycle that would otherwise keep every copy alive.
    """

    def __init__(self, net: torch.nn.Module, spec: dict[str, Any], layer: str | None = None) -> None:
        self.layer = target_layer(net, spec, layer)
        # copied outside inference mode: tensors made inside it cannot enter autograd
        with torch.inference_mode(False):
            work = copy.deepcopy(net).eval()
        for m in work.modules():
            if getattr(m, "inplace", False):
                m.inplace = False  # type: ignore[assignment]
        work.requires_grad_(False)
        self.device = next(work.parameters()).device
        self._cam = GradCAM(nn_module=work, target_layers=self.layer, postprocessing=_unit_range)
        # MONAI keeps one activation and one gradient per name: a module run several times per
        # forward (ResNet's shared `act`) would pair the last activation with the first gradient
        self._calls: list[int] = []
        dict(work.named_modules())[self.layer].register_forward_hook(lambda *_: self._calls.append(1))

    def __call__(self, x: torch.Tensor, class_idx: int) -> torch.Tensor:
        """(N, C, H, W) -> (N, H, W) float32 in [0, 1] on the CPU, each map scaled on its own
        (all zero where no feature raises the class score). Works under inference mode too."""
        name, hooks = self.layer, self._cam.nn_module
        self._calls.clear()
        failure: Exception | None = None
        with torch.inference_mode(False), torch.enable_grad():
            inp = x.detach().clone().float().to(self.device).requires_grad_(True)
            try:
                maps = self._cam(inp, class_idx=int(class_idx)).detach()
            except (RuntimeError, ValueError) as e:  # reworded below when the cause is known
                failure = e
        acti = hooks.activations.get(name)
        shape = None if acti is None else tuple(acti.shape)
        hooks.score = None
        hooks.activations.clear()
        hooks.gradients.clear()
        if len(self._calls) > 1:
            raise ValueError(f"Grad-CAM layer {name!r} runs {len(self._calls)} times per forward pass; "
                             "choose a module that runs once") from failure  # fmt: skip
        if failure is not None:
            if shape is not None and len(shape) != inp.ndim:
                raise ValueError(f"Grad-CAM layer {name!r} gives {shape}, not feature maps") from failure
            if "modified inplace" in str(failure):
                raise ValueError(
                    f"Grad-CAM layer {name!r}: its output is changed in place by the operation after it "
                    "(e.g. a residual `+=`); choose the module that ends the block"
                ) from failure
            raise failure
        return maps[:, 0].float().cpu()


def gradcam(
    net: torch.nn.Module, spec: dict[str, Any], x: torch.Tensor, class_idx: int, layer: str | None = None
) -> torch.Tensor:
    """One-off Grad-CAM of output `class_idx` for a batch (N, C, H, W) -> (N, H, W) in [0, 1], CPU.

    `net` is not changed. For many calls on one network, keep a `GradCamExplainer`.
    """
    return GradCamExplainer(net, spec, layer)(x, class_idx)
