"""Deterministic UIDs for result objects: a re-run of a job produces the same UIDs."""

from __future__ import annotations

import uuid

from highdicom import UID

#: Fixed namespace of pacsnode result UIDs (never change: it would re-key every result).
PACSNODE_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacsnode:writers:result-uid")

_SEPARATOR = "\x1f"  # ASCII unit separator: ("a", "bc") and ("ab", "c") differ


def result_uid(*parts: str) -> UID:
    """UID (2.25 root) derived from ``parts``, e.g. (job key, model version, kind, index).

    The same parts always give the same UID; any change in any part gives another.
    """
    if not parts:
        raise ValueError("result_uid needs at least one part")
    for part in parts:
        if not isinstance(part, str) or part == "":
            raise ValueError(f"result_uid parts must be non-empty strings, got {part!r}")
    name = _SEPARATOR.join(parts)
    return UID.from_uuid(str(uuid.uuid5(PACSNODE_NAMESPACE, name)))
