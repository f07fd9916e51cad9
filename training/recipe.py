"""Recipe files (YAML): a pydantic model (the one place the defaults live), `--set key.sub=value`
overrides, validation that names the bad key.

Like node/config.py: unknown keys and bad values are errors at load (`optimizer.lr: Input should
be greater than 0`), so a typo in a recipe stops `train` before any data is read. The training
code receives the validated recipe as a plain mapping (`Recipe.model_dump()`), which is also
what run.json records.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipelines.bundle_metadata import ARCHITECTURES, DETECTOR_ARCHITECTURE, describe_errors

__all__ = ["TASKS", "Recipe", "RecipeError", "load_recipe"]

Task = Literal["segmentation", "multilabel", "binary", "detection"]
TASKS: tuple[str, ...] = get_args(Task)


class RecipeError(ValueError):
    """A recipe file or override is invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetSection(_Strict):
    """Which loader reads the data folder (training/datasets), and its options."""

    format: Literal["kermany", "rsna", "nih", "lung_masks", "csv", "dicom_folder"]
    csv: str | None = Field(None, description="csv, dicom_folder: the labels file (default labels.csv)")
    multi_label: bool = Field(True, description="csv, dicom_folder: labels are multi-hot")
    images: str | None = Field(None, description="lung_masks: the images folder")
    masks: list[str] | None = Field(None, description="lung_masks: the mask folders")


class Split(_Strict):
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.2, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _room_to_train(self) -> Split:
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must leave images to train on, not {self.val} + {self.test}")
        return self


class Optimizer(_Strict):
    name: Literal["adam", "rmsprop", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, description="sgd only")


class Scheduler(_Strict):
    name: Literal["plateau", "none"] = "plateau"
    factor: float = Field(0.1, gt=0, lt=1)
    patience: int = Field(1, ge=0)


class Augment(_Strict):
    prob: float = Field(0.5, ge=0, le=1)
    rotate_deg: float = Field(10.0, ge=0)
    shift: float = Field(0.1, ge=0)
    zoom: float = Field(0.1, ge=0)
    flip_lr: bool = False  # a left-right flip swaps heart laterality: allowed, with a warning


class Postprocess(_Strict):
    """The node's lung mask post-processing, recorded into the bundle."""

    mask_threshold: float = Field(0.5, ge=0, le=1)
    opening_radius: int = Field(2, ge=0)
    crop_margin: float = Field(0.08, ge=0, le=1)


class Network(_Strict):
    architecture: Literal["UNet", "DenseNet121", "ResNet50", "VGG16", "SmallCNN", "RetinaNet"]
    args: dict[str, Any] = Field(default_factory=dict)


class Recipe(_Strict):
    task: Task
    dataset: DatasetSection
    network: Network
    split: Split = Split()
    seed: int = 0
    image_size: int = Field(224, ge=8)
    inference_size: int | None = Field(None, ge=8, description="size the bundle runs at and validation uses; None = image_size")
    pretrained: str | None = Field(None, description="local state-dict path; None = random initialisation (nothing is downloaded)")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: Optimizer = Optimizer()
    scheduler: Scheduler | None = Scheduler()
    augment: Augment = Augment()
    postprocess: Postprocess = Postprocess()
    crop: Literal["none", "lung"] = Field("none", description="lung: classify lung boxes from a segmentation run (as the node does)")
    class_weighting: bool = True
    pos_weight_max: float = Field(50.0, ge=1, description="cap on a rare label's positive weight (weighted BCE)")
    threshold_rule: Literal["youden", "f1"] = "youden"
    num_workers: int = Field(0, ge=0)
    cache: bool = Field(True, description="keep preprocessed images in memory (per split)")
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps per epoch (smoke tests)")
    limit: int | None = Field(None, ge=1, description="cap on images per split (smoke tests)")
    gradcam_layer: str | None = Field(None, description="classifiers: Grad-CAM target module; None = the architecture's default")
    detection: dict[str, Any] | None = Field(None, description="detection: RetinaNet settings over pipelines.detector.DETECTION_DEFAULTS")
    warnings: list[str] = Field(default_factory=list, description="what the loader found worth a word (a run's recipe.yaml keeps it)")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        detector = self.network.architecture == DETECTOR_ARCHITECTURE
        if detector != (self.task == "detection"):
            raise ValueError(f"task {self.task!r} cannot train a {self.network.architecture} "
                             f"(detection trains {DETECTOR_ARCHITECTURE}; the others train {list(ARCHITECTURES)})")  # fmt: skip
        if self.detection is not None and not detector:
            raise ValueError("detection settings are for task: detection only")
        return self


def load_recipe(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe, apply overrides like `epochs=1` or `network.args.channels=[4,8]`, validate.

    Returns the validated recipe with every default filled in (a mapping, as run.json keeps it);
    raises RecipeError naming the file and each bad key.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from e
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: top level must be a mapping")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        node = raw
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {p} is not a mapping")
        node[leaf] = yaml.safe_load(value)
    try:
        recipe = Recipe.model_validate(raw).model_dump()
    except ValidationError as e:
        raise RecipeError(f"recipe {path}: {describe_errors(e)}") from e
    flip = "flip_lr is on: left-right flips swap heart laterality"
    if recipe["augment"]["flip_lr"] and flip not in recipe["warnings"]:
        recipe["warnings"].append(flip)
    return recipe
