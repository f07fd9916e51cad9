"""Wait until a file lands in a folder, or a timeout passes: Linux inotify through ctypes.

The embedded broker (node/queue.py) keeps its messages as files in one folder; its workers
wait here between polls, so a message is picked up when it is written instead of up to a
polling interval later, and an idle worker does not wake a hundred times a second. Where
inotify is not available (not Linux, or the limit on watches is reached), ``FolderWatch.wait``
is a plain sleep and the caller polls as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import sys
import time

log = logging.getLogger(__name__)

# <sys/inotify.h>
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        return libc
    except (OSError, AttributeError):
        return None


class FolderWatch:
    """Files written whole into ``folder`` (closed after writing, or renamed into it) wake ``wait``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self._fd = -1
        libc = _libc()
        if libc is None:
            return
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            log.warning("inotify unavailable (%s): polling %s", os.strerror(ctypes.get_errno()), folder)
            return
        if libc.inotify_add_watch(fd, os.fsencode(folder), _IN_CLOSE_WRITE | _IN_MOVED_TO) < 0:
            log.warning("cannot watch %s (%s): polling it", folder, os.strerror(ctypes.get_errno()))
            os.close(fd)
            return
        self._fd = fd

    @property
    def active(self) -> bool:
        """Whether ``wait`` wakes on files (inotify) rather than only sleeping."""
        return self._fd >= 0

    def wait(self, timeout: float) -> bool:
        """Return once a file landed since the last call (True), or after ``timeout`` seconds (False)."""
        if self._fd < 0:
            time.sleep(timeout)
            return False
        ready, _, _ = select.select([self._fd], [], [], timeout)
        if not ready:
            return False
        try:
            while os.read(self._fd, 65536):  # the events themselves do not matter: drain them
                pass
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
