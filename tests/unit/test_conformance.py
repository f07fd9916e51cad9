"""docs/conformance.md is what `python -m node.conformance` prints for the code as it is."""

from __future__ import annotations

from pathlib import Path

from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

from node.conformance import default_config, statement
from node.listener import build_ae

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "conformance.md"


def test_conformance_statement_matches_the_code() -> None:
    assert DOC.read_text() == statement(default_config()), (
        "docs/conformance.md is stale: run `python -m node.conformance > docs/conformance.md`"
    )


def test_every_accepted_context_is_listed_with_our_role() -> None:
    text = DOC.read_text()
    for cx in build_ae(default_config()).supported_contexts:
        # Storage Commitment reports come from the PACS as SCP: we accept them as its SCU.
        role = "SCU (the requestor is SCP: role selection)" if cx.abstract_syntax == StorageCommitmentPushModel else "SCP"
        assert f"| `{cx.abstract_syntax}` | {role} |" in text
    assert "| Computed Radiography Image Storage | `1.2.840.10008.5.1.4.1.1.1` | SCP |" in text
