"""Outgoing associations kept open for a few seconds after a send, for the next one to reuse.

A job's SR and its other objects leave in two export tasks a few hundred milliseconds apart, and
each new association costs its connect and A-ASSOCIATE exchange before the first C-STORE
(about 5 ms against Orthanc on the 2-core VM, on the SR's way to the PACS) and its A-RELEASE
after the last (3-11 ms of the export thread). Orthanc does the same for its own sends
(`DicomAssociationCloseDelay`, 5 s by default). An association is lent to one thread at a time;
one left idle longer than its keep time is released by a daemon thread; the peer may close it
sooner (its own idle timeout, a restart), so a lent association is checked as it is taken, and
`node.export` sends a batch again on a new association when a reused one was lost before any
answer. Associations are never shared across processes (cleared in a forked child).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pynetdicom.association import Association

log = logging.getLogger(__name__)


@dataclass
class _Idle:
    assoc: Association
    expires: float  # time.monotonic() after which it is released


class AssociationPool:
    """Idle established associations by key (peer, calling AE, proposed contexts)."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._idle: dict[Hashable, list[_Idle]] = {}
        self._reaper: threading.Thread | None = None

    @contextmanager
    def lease(self, key: Hashable, open_new: Callable[[], Association], keep_seconds: float,
              reuse: bool = True) -> Iterator[tuple[Association, bool]]:
        """Lend an association for `key`: an idle one still established (unless `reuse` is
        False), else `open_new()`. Yields (association, reused). Afterwards it is kept
        `keep_seconds` for the next lease if still established (0: released at once)."""
        assoc = self._take(key) if reuse else None
        reused = assoc is not None
        if assoc is None:
            assoc = open_new()
        try:
            yield assoc, reused
        except BaseException:
            # Left mid-exchange, perhaps: not fit for another lease.
            if assoc.is_established:
                assoc.abort()
            raise
        self._give_back(key, assoc, keep_seconds)

    def _take(self, key: Hashable) -> Association | None:
        with self._lock:
            entries = self._idle.get(key, [])
            while entries:
                entry = entries.pop()
                if usable(entry.assoc):
                    return entry.assoc
                log.debug("pooled association for %s was closed by the peer: dropped", key)
        return None

    def _give_back(self, key: Hashable, assoc: Association, keep_seconds: float) -> None:
        if not usable(assoc):
            return
        if keep_seconds <= 0:
            _release(assoc)
            return
        with self._lock:
            self._idle.setdefault(key, []).append(_Idle(assoc, time.monotonic() + keep_seconds))
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, name="association-reaper", daemon=True)
                self._reaper.start()
            self._lock.notify_all()

    def _expired(self, now: float) -> list[Association]:
        """Remove and return the idle associations whose keep time has passed (lock held)."""
        done: list[Association] = []
        for key in list(self._idle):
            keep = [e for e in self._idle[key] if e.expires > now]
            done += [e.assoc for e in self._idle[key] if e.expires <= now]
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return done

    def _reap(self) -> None:
        """Release idle associations as their keep time passes; end when none is left."""
        while True:
            with self._lock:
                done = self._expired(time.monotonic())
                if not done:
                    if not self._idle:
                        self._reaper = None
                        return
                    soonest = min(e.expires for entries in self._idle.values() for e in entries)
                    self._lock.wait(timeout=max(0.01, soonest - time.monotonic()))
                    continue
            for assoc in done:  # outside the lock: a release waits for the peer's answer
                _release(assoc)

    def close_all(self) -> None:
        """Release every idle association (process exit, tests)."""
        with self._lock:
            done = [e.assoc for entries in self._idle.values() for e in entries]
            self._idle.clear()
            self._lock.notify_all()
        for assoc in done:
            _release(assoc)

    def idle_count(self) -> int:
        """How many associations wait for a lease."""
        with self._lock:
            return sum(len(entries) for entries in self._idle.values())

    def _forget_after_fork(self) -> None:
        # The parent's sockets and threads are not the child's: never send on them.
        self._lock = threading.Condition()
        self._idle = {}
        self._reaper = None


def usable(assoc: Association) -> bool:
    """Established, and no abort from the peer waiting to be acted on. The association thread
    marks an aborted association as not established only when it next looks; a send that got
    no answer returns before that."""
    return bool(assoc.is_established) and not assoc.acse.is_aborted()


def _release(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # a peer that vanished: the association is gone either way
        log.debug("release of an idle association failed", exc_info=True)


#: The process's pool (node.export leases from it).
POOL = AssociationPool()
atexit.register(POOL.close_all)
os.register_at_fork(after_in_child=POOL._forget_after_fork)
