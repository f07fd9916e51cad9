"""Result objects (SR, SEG, GSPS, overlay SC) built with highdicom and checked by the gate."""

from __future__ import annotations

#: highdicom's loaders of the standard's tables, each read once per process on first use.
HIGHDICOM_TABLES = ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map")


def preload() -> None:
    """Import the writers and read what highdicom reads while building its first object, so a
    worker's first study does not: the standard's IOD and module tables (0.22 s here, and
    200,000 objects a process keeps; a worker freezes them with the rest, see node/tasks.py)."""
    # highdicom has no public way to load them; an upgrade that renames a loader fails
    # tests/unit/test_writers_preload.py instead of slowing the first study unnoticed.
    from highdicom import _standard_utils

    import node.writers.gsps  # noqa: F401
    import node.writers.sc  # noqa: F401
    import node.writers.seg  # noqa: F401
    import node.writers.sr  # noqa: F401
    import node.writers.validate  # noqa: F401

    for name in HIGHDICOM_TABLES:
        loader = getattr(_standard_utils, name, None)
        if loader is not None:
            loader()
