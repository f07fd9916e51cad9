"""Model bundle: a MONAI-bundle cousin (see docs/model-bundle.md).

    <bundle>/configs/metadata.json   identity, labels, thresholds, sizes, networks + sha256
    <bundle>/models/segmentation.pt  lung UNet state dict
    <bundle>/models/classifier.pt    classifier state dict (an ARCHITECTURES network)
    <bundle>/models/detector.pt      optional: lung-opacity RetinaNet (pipelines/detector.py)

`load_bundle` checks the metadata, verifies each weight file's sha256 and builds the networks
(on the CPU, in eval mode) from the architecture names and arguments the metadata records.
Only the architectures in `ARCHITECTURES` can be built: metadata never names code to import.
torch and MONAI are imported only when networks are built, so reading metadata stays cheap
(the listener checks the configured bundles at start).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pipelines.base import DEMO_DISCLAIMER, ModelInfo

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHITECTURES",
    "METADATA_PATH",
    "NETWORK_FILES",
    "OPTIONAL_NETWORK_FILES",
    "REQUIRED_FIELDS",
    "Bundle",
    "BundleError",
    "build_network",
    "device_uid_for",
    "list_bundles",
    "load_bundle",
    "network_files",
    "read_metadata",
    "sha256_file",
]

_UID_NAMESPACE = uuid.UUID("8f1d4b8e-3c1a-5d2e-9a57-6b0c2f4e7a10")  # fixed: pacsnode model devices
METADATA_PATH = Path("configs/metadata.json")
NETWORK_FILES = {
    "segmentation": Path("models/segmentation.pt"),
    "classifier": Path("models/classifier.pt"),
}
# present only when the bundle has them; their hashes then join the device_uid
OPTIONAL_NETWORK_FILES = {"detector": Path("models/detector.pt")}
DETECTOR_ARCHITECTURE = "RetinaNet"  # pipelines/detector.py builds it
# pipelines/networks.py builds these; the names live here so reading metadata needs no torch
ARCHITECTURES = ("UNet", "DenseNet121", "ResNet50", "VGG16", "SmallCNN")
REQUIRED_FIELDS = (
    "version", "changelog", "monai_version", "pytorch_version", "name", "authors", "manufacturer",
    "description", "intended_use", "network_data_format", "labels", "thresholds", "input_size",
    "preprocessing", "networks", "device_uid", "demo", "training_data", "metrics",
)  # fmt: skip


class BundleError(ValueError):
    """The model bundle is missing, incomplete, inconsistent or corrupt."""


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle. Networks are on the CPU in eval mode."""

    path: Path
    metadata: dict[str, Any]
    model: ModelInfo
    labels: tuple[str, ...]
    thresholds: tuple[float, ...]  # in label order
    segmentation_size: int
    classifier_size: int
    segmentation: torch.nn.Module
    classifier: torch.nn.Module
    detector: torch.nn.Module | None = None  # lung-opacity RetinaNetDetector, when the bundle has one
    detector_size: int | None = None  # square input size of the detector
    detector_threshold: float | None = None  # detection score threshold (chosen on validation)

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.metadata["preprocessing"])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def device_uid_for(sha256s: list[str]) -> str:
    """A DICOM UID (2.25.<UUID>) derived from the weights' hashes: changes whenever they change.

    The UUID is name-based (RFC 4122 version 5), so the same weights give the same UID.
    """
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, 'pacsnode-device:' + ':'.join(sha256s)).int}"


def build_network(spec: dict[str, Any]) -> torch.nn.Module:
    """Instantiate an allowed architecture from {"architecture": name, "args": {...}}."""
    name = spec.get("architecture")
    if name not in ARCHITECTURES:
        raise BundleError(f"unknown architecture {name!r}; allowed: {list(ARCHITECTURES)}")
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise BundleError(f"architecture {name} args must be a mapping, not {type(args).__name__}")
    from pipelines.networks import ARCHITECTURES as BUILDERS  # heavy: only where networks are built

    try:
        return BUILDERS[name](**args)
    except (TypeError, ValueError) as e:
        raise BundleError(f"cannot build {name} with args {args}: {e}") from e


def network_files(meta: dict[str, Any]) -> dict[str, Path]:
    """{network: weight file} of a bundle: the required ones, then the optional ones it has.

    The order is the device_uid's: a bundle without optional networks hashes as before.
    """
    return {**NETWORK_FILES, **{k: rel for k, rel in OPTIONAL_NETWORK_FILES.items() if k in meta["networks"]}}


def _build_detector(spec: dict[str, Any]) -> torch.nn.Module:
    from pipelines.detector import build_detector  # heavy: only where networks are built

    try:
        return build_detector(spec, spec.get("detection"))
    except (TypeError, ValueError) as e:
        raise BundleError(f"cannot build {DETECTOR_ARCHITECTURE} with args {spec.get('args')}: {e}") from e


def read_metadata(path: Path, version: str | None = None) -> dict[str, Any]:
    """Read and check configs/metadata.json (without touching the weights).

    `version`: the version the configuration pins; any other is refused.
    """
    meta_file = Path(path) / METADATA_PATH
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError as e:
        raise BundleError(
            f"no model bundle at {path}: {meta_file} is missing "
            "(create demo weights with `python -m training demo --out <bundle>`)"
        ) from e
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {meta_file}: {e}") from e
    if not isinstance(meta, dict):
        raise BundleError(f"{meta_file}: top level must be an object")
    missing = [k for k in REQUIRED_FIELDS if k not in meta]
    if missing:
        raise BundleError(f"{meta_file}: missing fields {missing}")
    labels, thresholds = meta["labels"], meta["thresholds"]
    if not isinstance(labels, list) or not labels or len(set(labels)) != len(labels):
        raise BundleError(f"{meta_file}: labels must be a non-empty list of unique names")
    if not isinstance(thresholds, dict) or set(thresholds) != set(labels):
        raise BundleError(f"{meta_file}: thresholds must have exactly one entry per label")
    bad = {k: v for k, v in thresholds.items() if not isinstance(v, int | float) or not 0 <= v <= 1}
    if bad:
        raise BundleError(f"{meta_file}: thresholds must be in [0, 1]: {bad}")
    for key in ("segmentation", "classifier"):
        if not isinstance(meta["input_size"].get(key), int) or meta["input_size"][key] < 32:
            raise BundleError(f"{meta_file}: input_size.{key} must be an integer >= 32")
        if key not in meta["networks"]:
            raise BundleError(f"{meta_file}: networks.{key} is missing")
    det = meta["networks"].get("detector")
    if det is not None:
        if not isinstance(det, dict) or det.get("architecture") != DETECTOR_ARCHITECTURE:
            raise BundleError(f"{meta_file}: networks.detector.architecture must be {DETECTOR_ARCHITECTURE!r}")
        if not isinstance(det.get("input_size"), int) or det["input_size"] < 32:
            raise BundleError(f"{meta_file}: networks.detector.input_size must be an integer >= 32")
        t = det.get("score_threshold")
        if not isinstance(t, int | float) or not 0 <= t <= 1:
            raise BundleError(f"{meta_file}: networks.detector.score_threshold must be in [0, 1]")
    if meta["preprocessing"].get("crop", "lung") not in ("lung", "none"):
        raise BundleError(f"{meta_file}: preprocessing.crop must be 'lung' or 'none'")
    if not isinstance(meta["demo"], bool):
        raise BundleError(f"{meta_file}: demo must be true or false")
    if meta["demo"] and DEMO_DISCLAIMER not in meta["description"]:
        raise BundleError(f"{meta_file}: a demo bundle's description must contain the disclaimer")
    if version is not None and str(meta["version"]) != version:
        raise BundleError(f"model bundle {path} is version {meta['version']}; the configuration asks for {version}")
    return meta


def load_bundle(path: Path | str, version: str | None = None) -> Bundle:
    """Load and verify a bundle (of `version`, when given); raise BundleError naming the fault."""
    import torch

    path = Path(path)
    meta = read_metadata(path, version)
    nets: dict[str, torch.nn.Module] = {}
    shas: list[str] = []
    for key, rel in network_files(meta).items():
        spec = meta["networks"][key]
        weights = path / rel
        if not weights.is_file():
            raise BundleError(f"model bundle {path}: weight file {rel} is missing")
        actual = sha256_file(weights)
        if actual != spec.get("sha256"):
            raise BundleError(
                f"model bundle {path}: {rel} sha256 {actual} does not match metadata "
                f"{spec.get('sha256')} (corrupt or replaced weights)"
            )
        shas.append(actual)
        net = _build_detector(spec) if key == "detector" else build_network(spec)
        # a detector's weights are its RetinaNet's (what training saves); the rest load whole
        target = cast(torch.nn.Module, net.network) if key == "detector" else net
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            target.load_state_dict(state)
        except (RuntimeError, KeyError, OSError, ValueError) as e:
            raise BundleError(f"model bundle {path}: cannot load {rel} into {spec['architecture']}: {e}") from e
        nets[key] = net.eval()
    if meta["device_uid"] != device_uid_for(shas):
        raise BundleError(f"model bundle {path}: device_uid does not match the weights' hashes")
    model = ModelInfo(
        name=str(meta["name"]),
        version=str(meta["version"]),
        manufacturer=str(meta["manufacturer"]),
        device_uid=str(meta["device_uid"]),
        demo=bool(meta["demo"]),
        description=str(meta["description"]),
    )
    labels = tuple(meta["labels"])
    return Bundle(
        path=path,
        metadata=meta,
        model=model,
        labels=labels,
        thresholds=tuple(float(meta["thresholds"][k]) for k in labels),
        segmentation_size=int(meta["input_size"]["segmentation"]),
        classifier_size=int(meta["input_size"]["classifier"]),
        segmentation=nets["segmentation"],
        classifier=nets["classifier"],
        detector=nets.get("detector"),
        detector_size=int(meta["networks"]["detector"]["input_size"]) if "detector" in nets else None,
        detector_threshold=float(meta["networks"]["detector"]["score_threshold"]) if "detector" in nets else None,
    )


def list_bundles(paths: Sequence[Path | str]) -> list[dict[str, Any]]:
    """Describe the bundles at `paths` (each a bundle folder or a folder of bundles).

    One dict per bundle found: path, name, version, demo, labels, device_uid, sha256 check
    ("ok" or the error) and the metrics summary. Weights are hashed but no network is built,
    so listing is cheap. A path that holds no bundle gives one entry with its error.
    """
    out: list[dict[str, Any]] = []
    for root in map(Path, paths):
        if (root / METADATA_PATH).is_file():
            candidates = [root]
        elif root.is_dir():
            candidates = sorted(p for p in root.iterdir() if (p / METADATA_PATH).is_file())
        else:
            candidates = []
        if not candidates:
            out.append({"path": str(root), "status": f"no model bundle at {root}"})
            continue
        for path in candidates:
            entry: dict[str, Any] = {"path": str(path)}
            try:
                meta = read_metadata(path)
            except BundleError as e:
                out.append(entry | {"status": str(e)})
                continue
            status = "ok"
            for key, rel in network_files(meta).items():
                weights = path / rel
                if not weights.is_file():
                    status = f"weight file {rel} is missing"
                elif sha256_file(weights) != meta["networks"][key].get("sha256"):
                    status = f"{rel} sha256 does not match metadata"
            entry |= {
                "name": meta["name"], "version": meta["version"], "demo": meta["demo"],
                "labels": len(meta["labels"]), "device_uid": meta["device_uid"],
                "input_size": meta["input_size"], "status": status,
            }  # fmt: skip
            out.append(entry)
    return out
