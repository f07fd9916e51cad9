"""Fixtures shared by the writer tests."""

from __future__ import annotations

import pytest
from pydicom import Dataset
from writers_data import SOURCES


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request: pytest.FixtureRequest) -> Dataset:
    """Each real source image in turn: RG1 (CR, MONOCHROME1), RG1 as DX, a cxr-sample JPEG as SC."""
    return SOURCES[request.param]()
