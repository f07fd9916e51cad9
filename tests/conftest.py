"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.peers import reap


@pytest.fixture(scope="session", autouse=True)
def _reap_peers() -> Iterator[None]:
    """Servers that fixtures stopped without waiting (their shutdown overlaps the next tests) are
    waited for at the end of the session: none outlives it."""
    yield
    reap()


@pytest.fixture(scope="session")
def demo_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A chest_xray bundle made by `training demo --quick` (synthetic data -> train -> export),
    once per test session (~15 s). Its runs are in `.chest_xray-training` beside it."""
    from training.demo import train_demo

    out = tmp_path_factory.mktemp("bundles") / "chest_xray"
    train_demo(out, quick=True)
    return out
