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

from pydantic import ValidationError

from pipelines.base import ModelInfo
from pipelines.bundle_metadata import (
    ARCHITECTURES,
    DETECTOR_ARCHITECTURE,
    BundleMetadata,
    DetectorSpec,
    NetworkSpec,
    Preprocessing,
    describe_errors,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHITECTURES",
    "METADATA_PATH",
    "NETWORK_FILES",
    "OPTIONAL_NETWORK_FILES",
    "Bundle",
    "BundleError",
    "BundleMetadata",
    "build_network",
    "device_uid_for",
    "list_bundles",
    "load_bundle",
    "network_files",
    "read_metadata",
    "settings_sha256",
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


class BundleError(ValueError):
    """The model bundle is missing, incomplete, inconsistent or corrupt."""


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle. Networks are on the CPU in eval mode."""

    path: Path
    metadata: BundleMetadata
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
    def preprocessing(self) -> Preprocessing:
        return self.metadata.preprocessing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def settings_sha256(meta: BundleMetadata) -> str:
    """sha256 of the metadata as validated (canonical JSON: key order and spacing do not count)."""
    return hashlib.sha256(json.dumps(meta.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


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


def network_files(networks: Any) -> dict[str, Path]:
    """{network: weight file} of a bundle: the required ones, then the optional ones it has.

    `networks`: the metadata's `networks` (a mapping or `Networks`). The order is the
    device_uid's: a bundle without optional networks hashes as before.
    """
    present = networks if isinstance(networks, dict) else networks.model_dump(exclude_none=True)
    return {**NETWORK_FILES, **{k: rel for k, rel in OPTIONAL_NETWORK_FILES.items() if present.get(k) is not None}}


def _build_detector(spec: dict[str, Any]) -> torch.nn.Module:
    from pipelines.detector import build_detector  # heavy: only where networks are built

    try:
        return build_detector(spec, spec.get("detection"))
    except (TypeError, ValueError) as e:
        raise BundleError(f"cannot build {DETECTOR_ARCHITECTURE} with args {spec.get('args')}: {e}") from e


def read_metadata(path: Path, version: str | None = None) -> BundleMetadata:
    """Read and validate configs/metadata.json (without touching the weights).

    Every key the node uses is checked here (BundleMetadata), so a bundle that reads fine also
    builds. `version`: the version the configuration pins; any other is refused.
    """
    meta_file = Path(path) / METADATA_PATH
    try:
        raw = json.loads(meta_file.read_text())
    except FileNotFoundError as e:
        raise BundleError(
            f"no model bundle at {path}: {meta_file} is missing "
            "(create demo weights with `python -m training demo --out <bundle>`)"
        ) from e
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"cannot read {meta_file}: {e}") from e
    if not isinstance(raw, dict):
        raise BundleError(f"{meta_file}: top level must be an object")
    try:
        meta = BundleMetadata.model_validate(raw)
    except ValidationError as e:
        raise BundleError(f"{meta_file}: {describe_errors(e)}") from e
    if version is not None and meta.version != version:
        raise BundleError(f"model bundle {path} is version {meta.version}; the configuration asks for {version}")
    return meta


def load_bundle(path: Path | str, version: str | None = None) -> Bundle:
    """Load and verify a bundle (of `version`, when given); raise BundleError naming the fault."""
    import torch

    path = Path(path)
    meta = read_metadata(path, version)
    nets: dict[str, torch.nn.Module] = {}
    shas: list[str] = []
    for key, rel in network_files(meta.networks).items():
        spec: NetworkSpec | DetectorSpec = getattr(meta.networks, key)
        weights = path / rel
        if not weights.is_file():
            raise BundleError(f"model bundle {path}: weight file {rel} is missing")
        actual = sha256_file(weights)
        if actual != spec.sha256:
            raise BundleError(
                f"model bundle {path}: {rel} sha256 {actual} does not match metadata "
                f"{spec.sha256} (corrupt or replaced weights)"
            )
        shas.append(actual)
        args = spec.model_dump()
        net = _build_detector(args) if key == "detector" else build_network(args)
        # a detector's weights are its RetinaNet's (what training saves); the rest load whole
        target = cast(torch.nn.Module, net.network) if key == "detector" else net
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            target.load_state_dict(state)
        except (RuntimeError, KeyError, OSError, ValueError) as e:
            raise BundleError(f"model bundle {path}: cannot load {rel} into {spec.architecture}: {e}") from e
        nets[key] = net.eval()
    if meta.device_uid != device_uid_for(shas):
        raise BundleError(f"model bundle {path}: device_uid does not match the weights' hashes")
    model = ModelInfo(
        name=meta.name,
        version=meta.version,
        manufacturer=meta.manufacturer,
        device_uid=meta.device_uid,
        demo=meta.demo,
        settings_sha256=settings_sha256(meta),
        description=meta.description,
    )
    det = meta.networks.detector
    return Bundle(
        path=path,
        metadata=meta,
        model=model,
        labels=tuple(meta.labels),
        thresholds=meta.threshold_list(),
        segmentation_size=meta.input_size.segmentation,
        classifier_size=meta.input_size.classifier,
        segmentation=nets["segmentation"],
        classifier=nets["classifier"],
        detector=nets.get("detector"),
        detector_size=det.input_size if det is not None else None,
        detector_threshold=det.score_threshold if det is not None else None,
    )


def list_bundles(paths: Sequence[Path | str]) -> list[dict[str, Any]]:
    """Describe the bundles at `paths` (each a bundle folder or a folder of bundles).

    One dict per bundle found: path, name, version, demo, labels, device_uid and the check
    ("ok", or the first problem: invalid metadata naming the key, a missing or changed weight
    file). Weights are hashed but no network is built, so listing is cheap; the metadata check
    is the one loading makes, so "ok" means the node can build the bundle. A path that holds no
    bundle gives one entry with its error.
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
            for key, rel in network_files(meta.networks).items():
                weights = path / rel
                if not weights.is_file():
                    status = f"weight file {rel} is missing"
                elif sha256_file(weights) != getattr(meta.networks, key).sha256:
                    status = f"{rel} sha256 does not match metadata"
            entry |= {
                "name": meta.name, "version": meta.version, "demo": meta.demo,
                "third_party": meta.source is not None, "labels": len(meta.labels),
                "device_uid": meta.device_uid, "input_size": meta.input_size.model_dump(), "status": status,
            }  # fmt: skip
            out.append(entry)
    return out
