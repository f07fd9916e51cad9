"""Delivery's pieces that need no peer: which DIMSE statuses count as done."""

from __future__ import annotations

import pytest

from node.export import succeeded


@pytest.mark.parametrize(("status", "done"), [
    (0x0000, True),   # success
    (0xB000, True),   # C-STORE warning: coercion of data elements
    (0xB007, True),   # C-STORE warning: data set does not match SOP class
    (0xA700, False),  # out of resources
    (0xC210, False),  # cannot understand
    (0x0110, False),  # processing failure
    (0xFF00, False),  # pending: not an answer yet
    (None, False),    # no response (timeout or abort)
])
def test_a_status_is_done_only_when_pynetdicom_calls_it_success_or_warning(status: int | None, done: bool) -> None:
    assert succeeded(status) is done
