"""Recipe files (YAML): defaults, `--set key.sub=value` overrides, validation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipelines.base import merge_settings

__all__ = ["DEFAULTS", "TASKS", "RecipeError", "load_recipe", "merge_settings"]

TASKS = ("segmentation", "multilabel", "binary", "detection")


class RecipeError(ValueError):
    """A recipe file or override is invalid."""


DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "split": {"val": 0.1, "test": 0.2, "seed": 0},
    "image_size": 224,
    "inference_size": None,  # size the bundle runs at and validation uses; None = image_size
    "pretrained": None,  # local state-dict path; None = random initialisation (nothing is downloaded)
    "epochs": 10,
    "batch_size": 16,
    "optimizer": {"name": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "scheduler": {"name": "plateau", "factor": 0.1, "patience": 1},
    "augment": {"prob": 0.5, "rotate_deg": 10.0, "shift": 0.1, "zoom": 0.1, "flip_lr": False},
    "postprocess": {"mask_threshold": 0.5, "opening_radius": 2, "crop_margin": 0.08},
    "crop": "none",  # "lung": classify lung boxes from a segmentation run (as the node does)
    "class_weighting": True,
    "pos_weight_max": 50.0,  # cap on a rare label's positive weight (weighted BCE)
    "threshold_rule": "youden",
    "num_workers": 0,
    "cache": True,  # keep preprocessed images in memory (per split)
    "max_steps": None,  # cap on optimiser steps per epoch (smoke tests)
    "limit": None,  # cap on images per split (smoke tests)
    "gradcam_layer": None,  # classifiers: Grad-CAM target module name; None = the architecture's default
}


def load_recipe(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe, fill defaults, apply overrides like `epochs=1` or `network.args.channels=[4,8]`."""
    try:
        recipe = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"cannot read recipe {path}: {e}") from e
    if not isinstance(recipe, dict):
        raise RecipeError(f"recipe {path}: top level must be a mapping")
    recipe = merge_settings(DEFAULTS, recipe)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key.sub=value")
        node = recipe
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {p} is not a mapping")
        node[leaf] = yaml.safe_load(raw)
    if recipe.get("task") not in TASKS:
        raise RecipeError(f"recipe {path}: task must be one of {TASKS}, not {recipe.get('task')!r}")
    for key in ("dataset", "network"):
        if not isinstance(recipe.get(key), dict):
            raise RecipeError(f"recipe {path}: {key} section is missing")
    if float(recipe["pos_weight_max"]) < 1:
        raise RecipeError(f"recipe {path}: pos_weight_max must be >= 1, not {recipe['pos_weight_max']}")
    if recipe["crop"] not in ("none", "lung"):
        raise RecipeError(f"recipe {path}: crop must be 'none' or 'lung', not {recipe['crop']!r}")
    if recipe["augment"].get("flip_lr"):
        # allowed, but worth a word: a left-right flip swaps heart laterality
        recipe.setdefault("warnings", []).append("flip_lr is on: left-right flips swap heart laterality")
    return recipe
