"""Headless Debian Chromium driven by Python playwright, for the page and viewer tests.

Never `playwright install`: it downloads a browser, and hospitals (and CI here) are offline.
The flags keep Chromium from reaching out to Google's hosts, which this machine refuses.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic",
]  # fmt: skip
#: Seconds any page action or navigation may take before the test fails (not hangs).
PAGE_TIMEOUT_S = 30.0


@contextmanager
def chromium(viewport: tuple[int, int] = (1366, 768)) -> Iterator[Browser]:
    """A headless Chromium (Debian's) for one test module; skipped where it is not installed."""
    if shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed (Debian package chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                    timeout=PAGE_TIMEOUT_S * 1000)
        try:
            yield browser
        finally:
            browser.close()
