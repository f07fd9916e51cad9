"""Fixtures shared by the writer tests."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from writers_data import SOURCES


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request: pytest.FixtureRequest) -> Dataset:
    """Each real source image in turn: RG1 (CR, MONOCHROME1) and a cxr-sample JPEG."""
    return SOURCES[request.param]()
