"""node.writers.preload: a worker's first study reads none of highdicom's tables (#12)."""

import pkgutil
from functools import partial

import pytest
from highdicom import _standard_utils
from writers_data import MODEL, fake_result, identity, rg1

from node.writers import HIGHDICOM_TABLES, preload
from node.writers.seg import build_segmentation
from node.writers.sr import build_comprehensive_3d_sr


def test_every_table_loader_is_in_the_installed_highdicom() -> None:
    """preload() skips a loader that is not there: an upgrade that renames one fails here."""
    for name in HIGHDICOM_TABLES:
        assert callable(getattr(_standard_utils, name).cache_clear), name


@pytest.mark.parametrize("kind", ["sr", "seg"])
def test_after_preload_building_an_object_reads_no_table(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables are read by preload, not by the first object built after it (that read took
    0.22 s of the first study). Each loader's cache is emptied first, as in a new worker."""
    for name in HIGHDICOM_TABLES:
        getattr(_standard_utils, name).cache_clear()
    preload()
    reads: list[str] = []
    get_data = pkgutil.get_data
    monkeypatch.setattr(pkgutil, "get_data", lambda package, resource: reads.append(resource) or get_data(package, resource))
    source = rg1()
    result = fake_result(source.Rows, source.Columns)
    build = {"sr": partial(build_comprehensive_3d_sr, [source], [result], MODEL),
             "seg": partial(build_segmentation, source, result, MODEL)}[kind]
    build(**identity(kind))
    assert reads == []
