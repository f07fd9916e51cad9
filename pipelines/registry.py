"""Pipeline code by name. How a pipeline id in config.yaml finds what it runs:

- **code**: `pipelines.<id>.implementation` names an entry of `PIPELINES` (default: the id
  itself), e.g. `chest_xray` -> pipelines/chest_xray.py's `ChestXrayPipeline`;
- **model**: `pipelines.<id>.bundle` names the bundle that code loads (weights, labels,
  thresholds, preprocessing, version).

So one piece of code can serve several pipeline ids, each with its own bundle: a pneumonia
bundle (whole-image classifier) runs as pipeline id `pneumonia` with `implementation:
chest_xray`. Each pipeline id gets its own job per study, its own result UIDs (the id is part
of their key) and its own result series (`series_number_base`). A new kind of computation
(another modality, another output) is new code: a module here, registered under its own name,
which is also its default pipeline id and bundle folder name.

Imported by config validation for the names only; the classes are imported on demand, by
worker processes (importing a pipeline imports torch and MONAI).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pipelines.base import Pipeline

__all__ = ["PIPELINES", "UnknownPipelineError", "load_pipeline"]

# code name -> "module:Class"; modules are imported on demand
PIPELINES: dict[str, str] = {"chest_xray": "pipelines.chest_xray:ChestXrayPipeline"}


class UnknownPipelineError(KeyError):
    """No pipeline code is registered under this name."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0])


def load_pipeline(pipeline_id: str, bundle: Path, device: str = "auto", version: str | None = None,
                  implementation: str | None = None) -> Pipeline:
    """Build pipeline `pipeline_id` from its bundle on `device` (auto, cpu, cuda, cuda:N), with
    the code registered as `implementation` (None: as `pipeline_id`).

    `version`: the bundle version the configuration pins (None: whatever is installed)."""
    code = implementation or pipeline_id
    try:
        target = PIPELINES[code]
    except KeyError as e:
        what = f"pipeline id {pipeline_id!r}" if implementation is None else \
            f"pipeline code {code!r} (pipeline id {pipeline_id!r})"
        raise UnknownPipelineError(f"unknown {what}; known: {sorted(PIPELINES)}") from e
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    pipeline: Pipeline = cls(bundle, device, version)
    pipeline.id = pipeline_id  # the configured id, which may differ from the code's name
    return pipeline
