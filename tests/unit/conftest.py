"""Fixtures shared by the unit tests: source images for the writers, listeners for the DICOM edge."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from pydicom import Dataset
from writers_data import SOURCES

from node.config import Config
from node.handlers import IngestContext
from node.listener import start_listener


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request: pytest.FixtureRequest) -> Dataset:
    """Each real source image in turn: RG1 (CR, MONOCHROME1), RG1 as DX, a cxr-sample JPEG as SC
    (pixels re-encoded by highdicom, and JPEG-wrapped by img2dcm)."""
    return SOURCES[request.param]()


@pytest.fixture
def serve() -> Iterator[Callable[[Config], IngestContext]]:
    """Start listeners for a test (`ctx = serve(cfg)`); each is shut down afterwards."""
    servers = []

    def start(cfg: Config) -> IngestContext:
        ctx = IngestContext(cfg)
        servers.append(start_listener(cfg, ctx))
        return ctx

    yield start
    for server in servers:
        server.shutdown()
