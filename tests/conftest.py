"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chest_xray bundle made by `training demo --quick` (synthetic data -> train -> export),
    once per test session (~15 s). Its runs are in `.chest_xray-training` beside it."""
    from training.demo import train_demo

    out = tmp_path_factory.mktemp("bundles") / "chest_xray"
    train_demo(out, quick=True)
    return out
