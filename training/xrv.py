"""`python -m training import-xrv`: torchxrayvision's published weights -> a node model bundle.

torchxrayvision (Cohen et al., Apache-2.0) publishes chest X-ray classifiers whose weights it
downloads at run time; a site copies the files in instead (docs/model-bundle.md). The importer
reads a file into the node's own network registry, with no torchxrayvision, torchvision or
network access:

- DenseNet121 files are whole pickled `torchxrayvision.models.DenseNet` modules (torch.save of
  the module; the 2020 releases in torch's legacy format). They are read by a restricted
  unpickler (`read_weights`): only the globals in `ALLOWED_GLOBALS` resolve, torchxrayvision's
  four module classes resolve to an inert stand-in, and anything else stops the import naming
  the global, so nothing in the file is executed. The parameters are then renamed onto MONAI's
  DenseNet121 (same architecture: features -> relu -> global average pool -> linear), which
  keeps the node's backward-free Grad-CAM.
- The ResNet50 file is a state dict of torchvision's resnet50 with a one-channel conv1; MONAI's
  ResNet50 uses the same names.

What the file does not hold comes from torchxrayvision's own table (`XRV_MODELS`, copied from
torchxrayvision 1.5.7 `models.model_urls`): the 18 output names, the operating thresholds
(`op_threshs`), the input resolution and the data sets. Outputs the library leaves untrained
(no name, or no threshold: its `op_norm` then returns a constant 0.5) are dropped from the
bundle's classifier and listed in `source.dropped_outputs`.

Probabilities are the sigmoid of the logits (torchxrayvision's `apply_sigmoid=True`); the
bundle's thresholds are the op_threshs, so a finding is present exactly when the library's
op_norm'd output is >= 0.5.
"""

from __future__ import annotations

import logging
import pickle
import re
import types
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipelines.bundle import sha256_file
from training.export import export_bundle

__all__ = [
    "ALLOWED_GLOBALS",
    "XRV_LIBRARY_VERSION",
    "XRV_MODELS",
    "XrvImportError",
    "XrvModel",
    "import_xrv",
    "read_weights",
    "to_registry",
]

log = logging.getLogger(__name__)

XRV_LIBRARY_VERSION = "1.5.7"  # the release whose definitions XRV_MODELS and pipelines/xrv.py follow
_RELEASES = "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
_LICENSE = "Apache-2.0 (torchxrayvision); check each training data set's terms before clinical or commercial use"
_CITATION = (
    "Cohen JP et al. TorchXRayVision: A library of chest X-ray datasets and models. MIDL 2022 "
    "(arXiv:2111.00595); Cohen JP et al. On the limits of cross-domain generalization in automated "
    "X-ray prediction. MIDL 2020 (arXiv:2002.02497)"
)
_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)  # fmt: skip


class XrvImportError(ValueError):
    """A weight file cannot be imported: wrong model, unknown content, or not allowed to load."""


@dataclass(frozen=True)
class XrvModel:
    """One published torchxrayvision model (`models.model_urls[name]`)."""

    name: str
    architecture: str  # the node registry's: DenseNet121 or ResNet50
    file: str  # the published file name (last part of the URL)
    labels: tuple[str, ...]  # 18 outputs; "" where the library leaves an output untrained
    op_threshs: tuple[float | None, ...]  # None where the library has NaN
    resolution: int
    trained_on: tuple[str, ...]

    @property
    def url(self) -> str:
        return _RELEASES + self.file

    def kept(self) -> list[int]:
        """Output indices the bundle keeps: named and with an operating threshold."""
        return [i for i, (lab, t) in enumerate(zip(self.labels, self.op_threshs, strict=True)) if lab and t is not None]


def _outputs(present: str, op: list[float | None]) -> tuple[tuple[str, ...], tuple[float | None, ...]]:
    """Labels from a mask over the 18 pathologies ("1" = trained), thresholds as given."""
    return tuple(p if m == "1" else "" for p, m in zip(_PATHOLOGIES, present, strict=True)), tuple(op)


_N = None  # torchxrayvision's np.nan
_D = "-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt"
XRV_MODELS: dict[str, XrvModel] = {
    m.name: m
    for m in (
        XrvModel("densenet121-res224-all", "DenseNet121", "nih-pc-chex-mimic_ch-google-openi-kaggle" + _D,
                 *_outputs("111111111111111111", [
                     0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358, 0.010060724,
                     0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857, 0.01939503, 0.042889766,
                     0.053369623, 0.035975814, 0.20204692, 0.05015312]),
                 224, ("NIH ChestX-ray14", "PadChest", "CheXpert", "MIMIC-CXR (CheXpert labeler)",
                       "Google NIH relabelling", "OpenI", "RSNA Pneumonia Detection Challenge")),
        XrvModel("densenet121-res224-nih", "DenseNet121", "nih" + _D,
                 *_outputs("111111111111110000", [
                     0.039117552, 0.0034529066, 0.11396341, 0.0057298196, 0.00045666535, 0.0018880932, 0.012037827,
                     0.038744126, 0.0037213727, 0.014730946, 0.016149804, 0.054241467, 0.037198864, 0.0004403434,
                     _N, _N, _N, _N]),
                 224, ("NIH ChestX-ray14",)),
        XrvModel("densenet121-res224-pc", "DenseNet121", "pc" + _D,
                 *_outputs("111111111111110100", [
                     0.031012505, 0.013347598, 0.081435576, 0.001262615, 0.002587246, 0.0035944257, 0.0023071,
                     0.055412333, 0.044385884, 0.042766232, 0.043258056, 0.037629247, 0.005658899, 0.0091741895,
                     _N, 0.026507627, _N, _N]),
                 224, ("PadChest",)),
        XrvModel("densenet121-res224-chex", "DenseNet121", "chex" + _D,
                 *_outputs("110110011010001111", [
                     0.1988969, 0.05710573, _N, 0.0531293, 0.1435217, _N, _N, 0.27212676, 0.07749717, _N,
                     0.19712369, _N, _N, _N, 0.09932402, 0.09273402, 0.3270967, 0.10888247]),
                 224, ("CheXpert",)),
        XrvModel("densenet121-res224-rsna", "DenseNet121", "kaggle" + _D,
                 *_outputs("000000001000000010", [
                     _N, _N, _N, _N, _N, _N, _N, _N, 0.13486601, _N, _N, _N, _N, _N, _N, _N, 0.13511065, _N]),
                 224, ("RSNA Pneumonia Detection Challenge",)),
        XrvModel("densenet121-res224-mimic_nb", "DenseNet121", "mimic_nb" + _D,
                 *_outputs("110110011010001111", [
                     0.08558747, 0.011884617, _N, 0.0040595434, 0.010733786, _N, _N, 0.118761964, 0.022924708, _N,
                     0.06358637, _N, _N, _N, 0.022143636, 0.017476924, 0.1258702, 0.014020768]),
                 224, ("MIMIC-CXR (NegBio labeler)",)),
        XrvModel("densenet121-res224-mimic_ch", "DenseNet121", "mimic_ch" + _D,
                 *_outputs("110110011010001111", [
                     0.09121389, 0.010573786, _N, 0.005023008, 0.003698257, _N, _N, 0.08001232, 0.037242252, _N,
                     0.05006329, _N, _N, _N, 0.019866971, 0.03823637, 0.11303808, 0.0069147074]),
                 224, ("MIMIC-CXR (CheXpert labeler)",)),
        XrvModel("resnet50-res512-all", "ResNet50", "pc-nih-rsna-siim-vin-resnet50-test512-e400-state.pt",
                 *_outputs("111111111111111111", [
                     0.51570356, 0.50444704, 0.53787947, 0.50723547, 0.5025118, 0.5035252, 0.5038076, 0.51862943,
                     0.5078151, 0.50724894, 0.5056339, 0.510706, 0.5053923, 0.5020846, _N, 0.5080557, 0.5138526, _N]),
                 512, ("PadChest", "NIH ChestX-ray14", "RSNA Pneumonia Detection Challenge", "SIIM-ACR Pneumothorax",
                       "VinDr-CXR")),
    )
}  # fmt: skip

# The node registry's networks for the two architectures (pipelines/networks.py)
_REGISTRY_SPECS: dict[str, dict[str, Any]] = {
    "DenseNet121": {"architecture": "DenseNet121", "args": {
        "spatial_dims": 2, "in_channels": 1, "init_features": 64, "growth_rate": 32,
        "block_config": [6, 12, 24, 16], "bn_size": 4, "dropout_prob": 0.0}},
    "ResNet50": {"architecture": "ResNet50", "args": {
        "spatial_dims": 2, "n_input_channels": 1, "conv1_t_size": 7, "conv1_t_stride": 2, "bias_downsample": False}},
}  # fmt: skip


# ---- reading the files without executing them ------------------------------------------------


class _Unpickled(nn.Module):
    """What torchxrayvision's module classes become when read: a container whose parameters,
    buffers and submodules torch restores (nn.Module.__setstate__). It is never run."""

    def forward(self, *args: Any) -> Any:
        raise XrvImportError("a module read from a torchxrayvision file is a container, not a network")


def _no_backend() -> None:
    """Pickles from torch < 1.5 name torch.nn.backends.thnn's backend on every module; torch
    keeps that function for them and it returns None (here too, without importing it)."""


ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "__builtin__.set": set,  # protocol 2 names builtins the Python 2 way
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,  # type: ignore[attr-defined]
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,  # type: ignore[attr-defined]
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,  # type: ignore[attr-defined]
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,  # type: ignore[attr-defined]
    "torch.nn.backends.thnn._get_thnn_function_backend": _no_backend,
    **{f"torch.nn.modules.{mod}.{cls.__name__}": cls for mod, cls in (
        ("conv", nn.Conv2d), ("batchnorm", nn.BatchNorm2d), ("activation", nn.ReLU), ("pooling", nn.MaxPool2d),
        ("pooling", nn.AvgPool2d), ("linear", nn.Linear), ("container", nn.Sequential))},
    **{f"torchxrayvision.models.{name}": _Unpickled for name in ("DenseNet", "_DenseBlock", "_DenseLayer", "_Transition")},
}  # fmt: skip
# Storage types (torch.FloatStorage, ...) are resolved by torch.load itself before find_class.


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle's documented way to restrict globals: every class or function a pickle names goes
    through find_class, which resolves only ALLOWED_GLOBALS."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(
                f"the file refers to {module}.{name}, which is not on the allow-list of torchxrayvision "
                "weight files (nothing was executed)"
            ) from None


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# torch.load takes a pickle *module*: Unpickler for the objects, load for the legacy headers
_RESTRICTED_PICKLE = types.ModuleType("pacsnode_restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torchxrayvision weight file, by name, without executing the file.

    A pickled module (torch's zip or legacy format) gives its state dict; a state dict is
    returned as is (a DataParallel "module." prefix removed). Raises XrvImportError.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            # torch compares the source saved with a legacy module pickle to the class it got
            # (our stand-in) and warns that it changed: expected, the source is never used
            warnings.simplefilter("ignore", torch.serialization.SourceChangeWarning)
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RESTRICTED_PICKLE)
    except pickle.UnpicklingError as e:
        raise XrvImportError(f"{path}: {e}") from e
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise XrvImportError(f"{path}: not a torch weight file ({e})") from e
    if isinstance(obj, nn.Module):
        state: Mapping[str, Any] = obj.state_dict()
    elif isinstance(obj, Mapping):
        state = obj
    else:
        raise XrvImportError(f"{path}: holds a {type(obj).__name__}, not a module or a state dict")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise XrvImportError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k.removeprefix("module.")] = v
    return out


# ---- torchxrayvision names -> the node registry ---------------------------------------------

_DENSE_LAYER = re.compile(r"^(features\.denseblock\d+\.denselayer\d+)\.(.+)$")


def to_registry(state: Mapping[str, torch.Tensor], model: XrvModel) -> tuple[nn.Module, dict[str, Any]]:
    """Build the registry network for `model` and load `state` (torchxrayvision's names) into it.

    DenseNet121: `...denselayerN.<layer>` -> `...denselayerN.layers.<layer>`, `classifier` ->
    `class_layers.out`; ResNet50: the same names. The output layer keeps `model.kept()` rows.
    Every tensor must land (strict), so a file of another architecture or size is refused.
    Returns (network in eval mode, its registry spec).
    """
    from pipelines.bundle import build_network

    keep = model.kept()
    spec = {**_REGISTRY_SPECS[model.architecture]}
    out_key = "out_channels" if model.architecture == "DenseNet121" else "num_classes"
    spec["args"] = {**spec["args"], out_key: len(keep)}
    head = "classifier" if model.architecture == "DenseNet121" else "fc"
    mapped: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if k == "op_threshs":  # a buffer of newer DenseNets; the thresholds come from XRV_MODELS
            continue
        if k in (f"{head}.weight", f"{head}.bias"):
            if v.shape[0] != len(model.labels):
                raise XrvImportError(f"{model.name} has {len(model.labels)} outputs, the file's {k} has {v.shape[0]}")
            v = v[keep]
        if model.architecture == "DenseNet121":
            k = _DENSE_LAYER.sub(r"\1.layers.\2", k)
            k = {"classifier.weight": "class_layers.out.weight", "classifier.bias": "class_layers.out.bias"}.get(k, k)
        mapped[k] = v.detach().clone().float() if v.is_floating_point() else v.detach().clone()
    net = build_network(spec)
    try:
        net.load_state_dict(mapped, strict=True)
    except RuntimeError as e:
        raise XrvImportError(f"the file's tensors do not fit {model.name} ({model.architecture}): {e}") from e
    return net.eval(), spec


# ---- the bundle ----------------------------------------------------------------------------------


def import_xrv(
    weights: Path, model_name: str, out: Path, version: str, segmentation_run: Path,
    *, sha256: str | None = None, pixels: str = "stored", changelog: str | None = None,
) -> Path:
    """Write a bundle at `out` from a torchxrayvision weight file and a lung segmentation run.

    `sha256`: the file's hash as recorded where it was downloaded (refused when different).
    `pixels`: "stored" (torchxrayvision's DICOM reader) or "display" (the node's rendering).
    """
    from training.train import load_run_network, read_run

    if model_name not in XRV_MODELS:
        raise XrvImportError(f"unknown torchxrayvision model {model_name!r}; known: {sorted(XRV_MODELS)}")
    model = XRV_MODELS[model_name]
    weights = Path(weights)
    if not weights.is_file():
        raise XrvImportError(f"weight file {weights} does not exist")
    actual = sha256_file(weights)
    if sha256 is not None and actual != sha256.lower():
        raise XrvImportError(f"{weights}: sha256 {actual} is not the expected {sha256.lower()} (corrupt or another file)")
    if weights.name != model.file:
        log.warning("%s: torchxrayvision publishes %s as %s", weights, model.name, model.file)
    net, spec = to_registry(read_weights(weights), model)
    seg_run = Path(segmentation_run)
    if read_run(seg_run)["task"] != "segmentation":
        raise XrvImportError(f"{seg_run} is not a lung segmentation run")
    seg, seg_meta = load_run_network(seg_run)
    demo = seg_meta["data"].get("synthetic") == "true"  # a lung UNet trained on synthetic images is demo output
    keep = model.kept()
    labels = [model.labels[i] for i in keep]
    # float32 as torchxrayvision holds them, so the decision equals its op_norm(p) >= 0.5
    thresholds = [float(np.float32(model.op_threshs[i])) for i in keep]
    dropped = [f"{i}:{model.labels[i] or '(unnamed)'}" for i in range(len(model.labels)) if i not in keep]
    datasets = ", ".join(model.trained_on)
    post = seg_meta["preprocessing"]
    return export_bundle(
        out,
        networks={"segmentation": (seg, seg_meta["network"]), "classifier": (net, spec)},
        labels=labels,
        thresholds=thresholds,
        input_size={"segmentation": int(seg_meta["input_size"]), "classifier": model.resolution},
        preprocessing={**{k: post[k] for k in ("mask_threshold", "opening_radius", "crop_margin")},
                       "crop": "center", "scaling": "torchxrayvision", "pixels": pixels},
        metrics={
            "segmentation": seg_meta["metrics"],
            "classifier": "not measured by pacsnode: see torchxrayvision's BENCHMARKS.md and its papers",
            "threshold_rule": "torchxrayvision's published operating points (op_threshs)",
        },
        training_data={
            "classifier": {"source": "torchxrayvision", "model": model.name, "datasets": list(model.trained_on)},
            "segmentation": {**seg_meta["data"], "run": str(seg_run.resolve())},
            "recipes": {"segmentation": seg_meta["recipe"]},
        },
        version=version,
        changelog={version: changelog or f"imported torchxrayvision {model.name} ({model.file}, sha256 {actual})"},
        demo=demo,
        name=f"torchxrayvision {model.name}",
        manufacturer="torchxrayvision, third-party",
        authors="Joseph Paul Cohen et al. (torchxrayvision); lung segmentation: this site's run",
        description=(
            f"Third-party published weights: torchxrayvision {model.name} ({model.architecture}, {len(labels)} findings, "
            f"{model.resolution} px), trained on {datasets}; imported from {model.file}. Lung segmentation "
            f"(UNet) trained on {seg_meta['data']['dataset']}."
        ),
        intended_use=(
            "Research use only. Third-party model published by torchxrayvision, not validated by pacsnode "
            "or at this site; not a medical device."
        ),
        source={
            "third_party": True, "library": "torchxrayvision", "library_version": XRV_LIBRARY_VERSION,
            "model": model.name, "weights_file": model.file, "weights_sha256": actual, "weights_url": model.url,
            "trained_on": list(model.trained_on), "license": _LICENSE, "citation": _CITATION,
            "dropped_outputs": dropped,
        },
    )
