"""Pipeline ids -> classes. A pipeline's module name, id and bundle name are the same.

Imported only by worker processes: importing a pipeline imports torch and MONAI.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pipelines.base import Pipeline

__all__ = ["PIPELINES", "UnknownPipelineError", "load_pipeline"]

# id -> "module:Class"; modules are imported on demand
PIPELINES: dict[str, str] = {"chest_xray": "pipelines.chest_xray:ChestXrayPipeline"}


class UnknownPipelineError(KeyError):
    """No pipeline is registered under this id."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


def load_pipeline(pipeline_id: str, bundle: Path, device: str = "auto", version: str | None = None) -> Pipeline:
    """Build the pipeline `pipeline_id` from its bundle on `device` (auto, cpu, cuda, cuda:N).

    `version`: the bundle version the configuration pins (None: whatever is installed)."""
    try:
        target = PIPELINES[pipeline_id]
    except KeyError as e:
        raise UnknownPipelineError(
            f"unknown pipeline id {pipeline_id!r}; known: {sorted(PIPELINES)}"
        ) from e
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    pipeline: Pipeline = cls(bundle, device, version)
    return pipeline
