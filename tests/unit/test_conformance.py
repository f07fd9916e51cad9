"""docs/conformance.md is what `python -m node.conformance` prints for the code as it is."""

from __future__ import annotations

from pathlib import Path

from node.conformance import default_config, statement
from node.listener import build_ae

DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "conformance.md"


def test_conformance_statement_matches_the_code() -> None:
    assert DOC.read_text() == statement(default_config()), (
        "docs/conformance.md is stale: run `python -m node.conformance > docs/conformance.md`"
    )


def test_every_accepted_context_is_listed_as_scp() -> None:
    text = DOC.read_text()
    for cx in build_ae(default_config()).supported_contexts:
        assert f"| `{cx.abstract_syntax}` | SCP |" in text
    assert "| Computed Radiography Image Storage | `1.2.840.10008.5.1.4.1.1.1` | SCP |" in text
