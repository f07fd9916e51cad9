"""Inputs bench/fuzz_ingest.py found that made ingest() raise something other than StoreRefused.

Each must now be refused with 0xC210 (cannot understand), store nothing and leave no file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.cli import db_upgrade
from node.config import Config, parse_config
from node.db.models import Event, Instance
from node.db.session import session_scope
from node.handlers import CANNOT_UNDERSTAND, IngestContext, StoreRefused, ingest

FUZZ = Path(__file__).resolve().parent.parent / "data" / "fuzz"
CASES = {
    "deflate_bad_distance.bin": "error",  # zlib.error inside a deflated data set
    "sequence_no_tag.bin": "OSError",  # "No tag to read" in a sequence item
    "meta_group_length_odd.bin": "BytesLengthException",  # odd-length UL, raised lazily on access
}


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    cfg = parse_config({"storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
                        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}})
    db_upgrade(cfg)
    return cfg


@pytest.mark.parametrize(("name", "raised"), sorted(CASES.items()))
def test_fuzz_finding_is_refused_as_unparsable(cfg: Config, name: str, raised: str) -> None:
    data = (FUZZ / name).read_bytes()
    with pytest.raises(StoreRefused) as e:
        ingest(data, IngestContext(cfg), "FUZZ")
    assert e.value.status == CANNOT_UNDERSTAND
    assert f"{raised}:" in str(e.value)  # the message names what pydicom could not read
    with session_scope(cfg.database.url) as s:
        assert s.scalar(select(func.count()).select_from(Instance)) == 0
    files = [f for _, _, names in os.walk(cfg.storage.path) for f in names]
    assert files == []


def test_fuzz_finding_over_the_handler_answers_c210_and_is_audited(cfg: Config) -> None:
    """Through handle_store's path: the status is 0xC210, not the catch-all 0xA700."""
    from types import SimpleNamespace

    from node.handlers import handle_store

    data = (FUZZ / "meta_group_length_odd.bin").read_bytes()
    ident = SimpleNamespace(ae_title="FUZZ", address="127.0.0.1")
    # A data set that stayed in memory (request without a streamed file): the handler stages it.
    event = SimpleNamespace(assoc=SimpleNamespace(requestor=ident, acceptor=SimpleNamespace(ae_title="PACSNODE")),
                            request=SimpleNamespace(), encoded_dataset=lambda include_meta: data)
    assert handle_store(event, IngestContext(cfg)) == CANNOT_UNDERSTAND  # type: ignore[arg-type]
    with session_scope(cfg.database.url) as s:
        kinds = list(s.scalars(select(Event.kind)))
    assert kinds == ["store_refused"]
