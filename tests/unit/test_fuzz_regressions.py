"""Inputs bench/fuzz_ingest.py found: some made ingest() raise something other than
StoreRefused (each must now be refused with 0xC210, store nothing and leave no file behind),
one ended a listener thread (it must now abort only its own association).
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


def test_command_set_without_command_field_aborts_the_association_only(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the listener mode: a P-DATA-TF whose last command fragment decodes to a command
    set without (0000,0100) Command Field made pynetdicom's DIMSE decoding raise inside the DUL
    thread, which ended without answering. The listener now treats it as an invalid PDU: A-ABORT
    to the peer, no thread dies, and other associations go on."""
    import struct
    import threading

    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    from node.listener import start_listener
    from tests.peers import free_port, wait_for

    died: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", died.append)
    cfg = parse_config({"listener": {"host": "127.0.0.1", "port": free_port(), "allowed_callers": "any",
                                     "timeouts": {"acse": 5, "dimse": 5, "network": 5}},
                        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
                        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}})
    db_upgrade(cfg)
    server = start_listener(cfg, IngestContext(cfg))
    try:
        ae = AE(ae_title="FUZZ")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(CTImageStorage)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
        assert assoc.is_established
        command = (FUZZ / "command_without_command_field.bin").read_bytes()
        pdv = struct.pack(">IBB", len(command) + 2, 1, 0x03) + command  # context 1, last command fragment
        assoc.dul.socket.socket.sendall(struct.pack(">BBI", 0x04, 0, len(pdv)) + pdv)  # type: ignore[union-attr]
        wait_for(lambda: assoc.is_aborted, 10, "the listener's A-ABORT")
        other = ae.associate("127.0.0.1", cfg.listener.port, ae_title="PACSNODE")
        assert int(other.send_c_echo().Status) == 0
        other.release()
    finally:
        server.shutdown()
    assert died == []
