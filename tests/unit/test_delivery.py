"""Delivery's pieces that need no peer: reading Storage Commitment reports."""

from __future__ import annotations

import pytest


def test_a_commitment_report_is_read_from_its_event_information() -> None:
    from pydicom import Dataset

    from node.engine.commitment import CommitmentReport, failure_reason, read_report

    info = Dataset()
    info.TransactionUID = "2.25.42"
    ok, bad = Dataset(), Dataset()
    ok.ReferencedSOPClassUID = bad.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ok.ReferencedSOPInstanceUID, bad.ReferencedSOPInstanceUID, bad.FailureReason = "1.2.1", "1.2.2", 0x0112
    info.ReferencedSOPSequence, info.FailedSOPSequence = [ok], [bad]
    assert read_report(info) == CommitmentReport("2.25.42", frozenset({"1.2.1"}), {"1.2.2": 0x0112})
    assert failure_reason(0x0112) == "0x0112 (No Such SOP Instance)"
    assert failure_reason(0xA7FF) == "0xA7FF"
    with pytest.raises(ValueError, match="Event Information has no Transaction UID"):
        read_report(Dataset())


def test_only_a_commitment_destination_from_its_own_address_is_a_commitment_peer() -> None:
    from node.config import parse_config
    from node.engine.commitment import commitment_peer

    cfg = parse_config({"destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104, "confirm": "commitment"},
        {"name": "plain", "ae_title": "PLAIN", "host": "127.0.0.1", "port": 105},
        {"name": "named", "ae_title": "NAMED", "host": "localhost", "port": 106, "confirm": "commitment"},
    ]})
    assert commitment_peer(cfg, "PACS", "127.0.0.1") is cfg.destinations[0]
    assert commitment_peer(cfg, "PACS ", "127.0.0.1") is cfg.destinations[0]  # AE titles are space-padded
    assert commitment_peer(cfg, "PACS", "10.0.0.9") is None  # its title, not its address
    assert commitment_peer(cfg, "PLAIN", "127.0.0.1") is None  # it does not confirm by commitment
    assert commitment_peer(cfg, "NAMED", "127.0.0.1") is cfg.destinations[2]  # a host name is resolved
