"""A daemon thread that repeats one pass until stopped: the listener's study completion and
spool retention run this way beside the DICOM server."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class BackgroundLoop:
    """Runs `run_once` until `stop`, waiting `wait_seconds()` between passes. A pass that
    raises is logged and the next one runs as usual: one bad row must not stop the loop."""

    name = "background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)

    def run_once(self) -> None:
        raise NotImplementedError

    def wait_seconds(self) -> float:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:  # the error is in the log; the next pass runs as usual
                log.exception("%s pass failed", self.name)
            self._stop.wait(self.wait_seconds())
