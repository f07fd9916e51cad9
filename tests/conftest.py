"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chest_xray bundle from the --quick demo recipe, built once per test session (~15 s)."""
    from training.demo import QUICK, train_demo

    out = tmp_path_factory.mktemp("bundles") / "chest_xray"
    train_demo(out, QUICK)
    return out
