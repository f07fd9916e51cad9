"""Write a model bundle (layout and checks: pipelines/bundle.py, docs/model-bundle.md)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, cast

import monai
import torch

from pipelines.base import DEMO_DISCLAIMER
from pipelines.bundle import (
    METADATA_PATH,
    NETWORK_FILES,
    OPTIONAL_NETWORK_FILES,
    device_uid_for,
    load_bundle,
    network_files,
    sha256_file,
)

__all__ = ["export_bundle", "export_run"]


def export_bundle(
    out: Path,
    *,
    networks: dict[str, tuple[torch.nn.Module, dict[str, Any]]],
    labels: list[str],
    thresholds: list[float],
    input_size: dict[str, int],
    preprocessing: dict[str, Any],
    metrics: dict[str, Any],
    training_data: dict[str, Any],
    version: str,
    changelog: dict[str, str],
    demo: bool,
    name: str = "pacsnode chest_xray",
    description: str = "",
    authors: str = "pacsnode",
    manufacturer: str = "pacsnode",
    intended_use: str | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write `out` (replaced atomically if it exists) and check it loads. Returns `out`.

    networks: {"segmentation": (module, {"architecture": "UNet", "args": {...}}),
               "classifier": (module, {"architecture": "DenseNet121", "args": {...}}),
               optional "detector": (RetinaNet module, {"architecture": "RetinaNet", "args", "detection",
                                     "score_threshold", "input_size"})}
    intended_use: default "Research use only." (the demo text for demo weights).
    source: third-party provenance (pipelines.bundle_metadata.Source), for imported weights.
    """
    if not set(NETWORK_FILES) <= set(networks) <= set(NETWORK_FILES) | set(OPTIONAL_NETWORK_FILES):
        raise ValueError(f"networks must be {sorted(NETWORK_FILES)} (optionally with {sorted(OPTIONAL_NETWORK_FILES)}), "
                         f"not {sorted(networks)}")
    if len(thresholds) != len(labels):
        raise ValueError(f"{len(thresholds)} thresholds for {len(labels)} labels")
    if demo and DEMO_DISCLAIMER not in description:
        description = f"{description} ({DEMO_DISCLAIMER})".strip()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        specs: dict[str, Any] = {}
        for key, rel in network_files(networks).items():
            net, spec = networks[key]
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            torch.save(state, tmp / rel)
            specs[key] = {**spec, "weights": str(rel), "sha256": sha256_file(tmp / rel)}
        c, s = input_size["classifier"], input_size["segmentation"]
        meta = {
            "schema": "pacsnode-bundle/1 (MONAI bundle metadata fields + pacsnode fields)",
            "version": version,
            "changelog": changelog,
            "monai_version": monai.__version__,
            "pytorch_version": torch.__version__.split("+")[0],
            "name": name,
            "authors": authors,
            "manufacturer": manufacturer,
            "description": description,
            "intended_use": (
                "Demonstration of the pacsnode DICOM workflow only. Not a medical device; "
                "must not be used for diagnosis or patient care."
                if demo
                else intended_use or "Research use only."
            ),
            "network_data_format": {
                "inputs": {
                    "image": {
                        "type": "image", "format": "magnitude", "modality": "CR/DX chest PA/AP",
                        "num_channels": 1, "spatial_shape": [s, s], "dtype": "float32",
                        "value_range": [0, 1], "is_patch_data": False,
                        "channel_def": {"0": "display image (pipelines.imaging.to_display), histogram-equalised"},
                    },
                    "classifier_input": {
                        "type": "image", "format": "magnitude", "modality": "CR/DX chest PA/AP",
                        "num_channels": 1, "spatial_shape": [c, c], "dtype": "float32",
                        **_classifier_input_format(preprocessing), "is_patch_data": False,
                    },
                },
                "outputs": {
                    "lung_mask": {
                        "type": "image", "format": "segmentation", "num_channels": 1,
                        "spatial_shape": [s, s], "dtype": "float32", "value_range": [0, 1],
                        "is_patch_data": False, "channel_def": {"0": "lung (sigmoid)"},
                    },
                    "pred": {
                        "type": "probabilities", "format": "classes", "num_channels": len(labels),
                        "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1],
                        "is_patch_data": False,
                        "channel_def": {str(i): lab for i, lab in enumerate(labels)},
                    },
                },
            },  # fmt: skip
            "labels": list(labels),
            "thresholds": {lab: float(t) for lab, t in zip(labels, thresholds, strict=True)},
            "input_size": dict(input_size),
            "preprocessing": dict(preprocessing),
            "networks": specs,
            "device_uid": device_uid_for([specs[k]["sha256"] for k in network_files(specs)]),
            "demo": demo,
            "training_data": training_data,
            "metrics": metrics,
            **({"source": source} if source is not None else {}),
        }
        (tmp / METADATA_PATH).parent.mkdir(parents=True, exist_ok=True)
        (tmp / METADATA_PATH).write_text(json.dumps(meta, indent=2) + "\n")
        load_bundle(tmp)  # refuse to publish a bundle that does not load
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _classifier_input_format(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """MONAI `value_range` and `channel_def` of the classifier input the preprocessing defines."""
    if preprocessing.get("scaling") == "torchxrayvision":
        pixels = "stored values" if preprocessing.get("pixels") == "stored" else "display image"
        return {"value_range": [-1024, 1024],
                "channel_def": {"0": f"centre square crop of the {pixels}, torchxrayvision scaling (pipelines/xrv.py)"}}
    crop = "lung bounding box crop" if preprocessing.get("crop", "lung") == "lung" else "whole image"
    return {"value_range": [0, 1], "channel_def": {"0": f"{crop} of the display image, histogram-equalised"}}


def export_run(
    run: Path, out: Path, version: str, changelog: str | None = None, segmentation_run: Path | None = None,
    detection_run: Path | None = None,
) -> Path:
    """Bundle a finished classifier run with a lung segmentation run.

    A `crop: lung` run brings the segmentation run it cropped with (a different one is refused:
    the crops would change). A whole-image run (the pneumonia recipes) needs `segmentation_run`
    for the lung mask the node's SEG and outlines show; its classifier still sees the whole
    image. Segmentation and detection runs are refused with the reason. `detection_run` (a
    finished RetinaNet run) adds the optional lung-opacity detector.
    """
    from training.train import load_run_network, read_run  # the training stack, only when exporting

    if read_run(run)["task"] == "detection":
        raise ValueError(f"{run} is a detection run: pass it as --detection-run beside a classifier --run "
                         "(a bundle's detector only adds boxes to a classifier's findings)")  # fmt: skip
    cls, meta = load_run_network(Path(run))
    if meta["task"] == "segmentation":
        raise ValueError(f"{run} is a segmentation run: export the classifier run that used it (crop: lung)")
    crop = meta["preprocessing"].get("crop", "none")
    if crop == "lung":
        seg_path = Path(meta["segmentation_run"])
        if segmentation_run is not None and Path(segmentation_run).resolve() != seg_path.resolve():
            raise ValueError(f"{run} was trained on lung crops from {seg_path}; the bundle must use that segmentation run")
    elif segmentation_run is None:
        raise ValueError(f"{run} classifies whole images: pass --segmentation-run (a lung segmentation run) "
                         "for the lung mask the node's SEG and outlines show")  # fmt: skip
    else:
        seg_path = Path(segmentation_run)
    seg, seg_meta = load_run_network(seg_path)
    if seg_meta["task"] != "segmentation":
        raise ValueError(f"{seg_path} is a {seg_meta['task']} run, not a lung segmentation run")
    networks: dict[str, tuple[torch.nn.Module, dict[str, Any]]] = {}
    det_meta: dict[str, Any] | None = None
    if detection_run is not None:
        if read_run(detection_run)["task"] != "detection":
            raise ValueError(f"{detection_run} is not a detection run: --detection-run takes a RetinaNet run")
        from training.detection import load_detection_run

        detector, det_meta = load_detection_run(Path(detection_run))
        networks["detector"] = (
            cast(torch.nn.Module, detector.network),  # what the run saved and the bundle loads into
            {**det_meta["network"], "detection": det_meta["detection"],
             "score_threshold": float(det_meta["score_threshold"]), "input_size": int(det_meta["input_size"])},
        )  # fmt: skip
    # weights trained on synthetic images are demo weights whatever the caller says
    demo = any(m["data"].get("synthetic") == "true" for m in (meta, seg_meta, det_meta) if m is not None)
    post = seg_meta["preprocessing"]
    labels, arch = list(meta["labels"]), meta["network"]["architecture"]
    cls_spec = dict(meta["network"])
    if meta["recipe"].get("gradcam_layer"):  # the node explains with the layer the run used
        cls_spec["gradcam_layer"] = meta["recipe"]["gradcam_layer"]
    return export_bundle(
        out,
        networks={"segmentation": (seg, seg_meta["network"]), "classifier": (cls, cls_spec), **networks},
        labels=labels,
        thresholds=[float(t) for t in meta["thresholds"]],
        input_size={"segmentation": int(seg_meta["input_size"]), "classifier": int(meta["input_size"])},
        preprocessing={**{k: post[k] for k in ("mask_threshold", "opening_radius", "crop_margin")}, "crop": crop},
        metrics={
            "segmentation": seg_meta["metrics"], "classifier": meta["metrics"],
            "threshold_rule": f"{meta['recipe']['threshold_rule']} on the validation split",
            **({"detector": det_meta["metrics"], "detector_threshold_rule": "maximises the RSNA score on validation"}
               if det_meta is not None else {}),
        },  # fmt: skip
        training_data={
            "segmentation": {**seg_meta["data"], "run": str(seg_path)},
            "classifier": {**meta["data"], "run": str(Path(run).resolve())},
            "recipes": {"segmentation": seg_meta["recipe"], "classifier": meta["recipe"]},
            "pretrained": meta.get("pretrained"),
            **({"detector": {**det_meta["data"], "run": str(Path(detection_run).resolve()),
                             "recipe": det_meta["recipe"], "pretrained": det_meta.get("pretrained")}}
               if det_meta is not None and detection_run is not None else {}),
        },  # fmt: skip
        version=version,
        changelog={version: changelog or f"trained with training/ recipes on {meta['data']['dataset']}"},
        demo=demo,
        description=(
            f"Lung segmentation (UNet) and {len(labels)}-label chest radiograph classifier ({arch}, "
            f"{'lung crops' if crop == 'lung' else 'whole image'}) trained on {meta['data']['dataset']}"
            + (f"; lung-opacity detector (RetinaNet) trained on {det_meta['data']['dataset']}" if det_meta else "")
        ),
    )
