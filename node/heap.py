"""Keeping Python's cycle collector out of the way of the node's long-running processes (#12).

Each process loads a large heap at start that lives as long as it does: pydicom's dictionaries,
SQLAlchemy, pynetdicom; the API's FastAPI and pydantic models; a worker's models and highdicom's
tables. A full collection walks all of it every time. Measured on the 2-core VM: 64-81 ms in
the listener (one every ~1,000 small instances), 70-122 ms in an export worker (its threads all
wait, the SR's send included), 105-115 ms in the API (every few requests under load), 73-85 ms
in an inference worker. Frozen once started, a full collection walks only what came after:
8-10, 3-6, 5-17 and 12-14 ms.
"""

from __future__ import annotations

import gc

#: Allocations between young collections, then young collections between older ones, in a
#: process whose unit of work makes tens of thousands of objects that reference counting frees
#: (an SR build: ~50,000; a dashboard page). With the defaults (700, 10, 10) an SR build ran ~70
#: collections and still paused 225 ms in 15 builds (73 ms at most with these); the API, frozen,
#: ran a full collection every ~150 ms on the overview and metrics pages (p95 38-54 ms, against
#: 15-26 ms with these; bench/api.py, 20,000 studies).
BUSY_THRESHOLDS = (50_000, 50, 1000)


def freeze_startup_heap(busy: bool = False) -> None:
    """Collect what start-up left, then exempt everything alive from later collections; with
    ``busy``, collect young objects only every BUSY_THRESHOLDS[0] allocations."""
    gc.collect()
    gc.freeze()
    if busy:
        gc.set_threshold(*BUSY_THRESHOLDS)
