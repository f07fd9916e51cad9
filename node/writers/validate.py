"""Validation gate for written objects: dciodvfy, dcmpschk (GSPS) and a pydicom re-read.

``judge(ds, tools)`` runs the gate and returns a ``Verdict``: the error messages (empty: the
object passed) and which checks ran. ``validate(ds)`` returns the messages; ``check(ds)``
raises ``ValidationFailed`` carrying them. The gate fails closed: a configured validator that
is not installed is an error for every object, never a skipped check; ``require_tools`` lets
the node refuse to start instead. Warnings of the external tools are logged at DEBUG.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage

logger = logging.getLogger(__name__)

#: Seconds an external validator may run before it counts as failed.
TOOL_TIMEOUT_S = 60.0

#: The external validators, each with the Debian package that installs it.
TOOLS = {"dciodvfy": "dicom3tools", "dcmpschk": "dcmtk"}
#: The check that always runs: the written bytes are read back (and the pixels decoded) by pydicom.
REREAD = "pydicom"


class ValidatorMissing(RuntimeError):
    """A validator the gate is configured to run is not installed."""


@dataclass(frozen=True)
class Verdict:
    """What the gate found in one object, and which checks ran on it (in order)."""

    errors: list[str]
    checks: tuple[str, ...]


class ValidationFailed(Exception):
    """A written object failed validation; ``messages`` lists every error."""

    def __init__(self, sop_instance_uid: str, messages: list[str]):
        self.sop_instance_uid = sop_instance_uid
        self.messages = list(messages)
        super().__init__(
            f"{sop_instance_uid}: {len(self.messages)} validation error(s): "
            + " | ".join(self.messages)
        )


def missing_tools(tools: Iterable[str]) -> list[str]:
    """The validators among `tools` that are not installed (not on PATH)."""
    return [t for t in tools if shutil.which(t) is None]


def require_tools(tools: Iterable[str]) -> None:
    """Raise ValidatorMissing naming each validator in `tools` that is not installed."""
    missing = missing_tools(tools)
    if missing:
        named = ", ".join(f"{t} (Debian package {TOOLS.get(t, '?')})" for t in missing)
        raise ValidatorMissing(f"validators not installed: {named}")


def tools_for(ds: Dataset, tools: Sequence[str]) -> tuple[str, ...]:
    """Which of the configured external validators apply to ds (dcmpschk: GSPS only)."""
    gsps = ds.get("SOPClassUID") == GrayscaleSoftcopyPresentationStateStorage
    return tuple(t for t in TOOLS if t in tools and (t != "dcmpschk" or gsps))


def _run(tool: str, path: Path) -> tuple[int, str]:
    """Run one validator on a file; RuntimeError when it cannot run (missing, timed out)."""
    exe = shutil.which(tool)
    if exe is None:
        # Fail closed: an object the configured gate cannot check does not pass it.
        raise RuntimeError(f"not installed (Debian package {TOOLS[tool]}); the gate cannot check this object")
    try:
        proc = subprocess.run(
            [exe, str(path)], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise RuntimeError(f"timed out after {TOOL_TIMEOUT_S} s") from e
    except OSError as e:
        raise RuntimeError(f"cannot run: {e}") from e
    return proc.returncode, proc.stdout + proc.stderr


def _dciodvfy(path: Path) -> list[str]:
    try:
        _, output = _run("dciodvfy", path)
    except RuntimeError as e:
        return [f"dciodvfy: {e}"]
    errors = []
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("Error"):
            errors.append(f"dciodvfy: {line}")
        elif line.startswith("Warning"):
            logger.debug("dciodvfy: %s", line)
    return errors


#: dcmpschk findings that are stricter than the standard: Patient's Name is Type 2 (PS3.3
#: C.7.1.1), so a GSPS of an anonymised image may leave it empty, but DCMTK's presentation state
#: reader refuses it (DCMTK-based viewers will not load such a GSPS; others do). Logged, not failed.
DCMPSCHK_TOLERATED = ("patientName absent or empty in presentation state",)


def _dcmpschk(path: Path) -> list[str]:
    try:
        returncode, output = _run("dcmpschk", path)
    except RuntimeError as e:
        return [f"dcmpschk: {e}"]
    lines = output.splitlines()
    errors = [
        f"dcmpschk: {line.strip()}"
        for line in lines
        if line.startswith(("E:", "F:")) or line.lstrip().lower().startswith("error")
    ]
    # dcmpschk reports its semantic check (pass 3) as warnings and exits 0 even when that check
    # fails; its verdict is the "Test failed" line, and the warnings before it are the reasons.
    if any(line.startswith("W: Test failed") for line in lines) and not errors:
        reasons = [line[3:].strip() for line in lines if line.startswith("W: ")
                   and not line.startswith(("W: Testing:", "W: Test failed"))]
        untolerated = [r for r in reasons if r not in DCMPSCHK_TOLERATED]
        if untolerated or not reasons:
            errors += [f"dcmpschk: {r}" for r in untolerated] or ["dcmpschk: Test failed (no reason given)"]
        else:
            logger.warning("dcmpschk: %s (tolerated: stricter than the standard)", "; ".join(reasons))
    if returncode != 0 and not errors:
        errors.append(f"dcmpschk: exit status {returncode}: {output.strip()[-500:]}")
    for line in lines:
        if line.startswith("W:"):
            logger.debug("dcmpschk: %s", line)
    return errors


_CHECKS = {"dciodvfy": _dciodvfy, "dcmpschk": _dcmpschk}


def _reread(data: bytes) -> list[str]:
    try:
        ds = dcmread(BytesIO(data))
        if "PixelData" in ds:
            ds.pixel_array  # noqa: B018 - decodes the pixels
    except Exception as e:  # any failure to read back is a validation error, reported
        return [f"pydicom: cannot re-read written object: {type(e).__name__}: {e}"]
    return []


def judge(ds: Dataset, tools: Sequence[str] = tuple(TOOLS)) -> Verdict:
    """Run the gate on ``ds`` written as a DICOM file: the pydicom re-read, then each of
    ``tools`` that applies to its SOP class. A tool that is not installed is an error."""
    buffer = BytesIO()
    try:
        ds.save_as(buffer, enforce_file_format=True)
    except Exception as e:  # cannot be written: that is the validation result
        return Verdict([f"pydicom: cannot write object: {type(e).__name__}: {e}"], (REREAD,))
    data = buffer.getvalue()
    errors = _reread(data)
    applied = tools_for(ds, tools)
    with tempfile.TemporaryDirectory(prefix="pacsnode-validate-") as tmp:
        path = Path(tmp) / "object.dcm"
        path.write_bytes(data)
        for tool in applied:
            errors += _CHECKS[tool](path)
    uid = ds.get("SOPInstanceUID", "?")
    if errors:
        logger.info("%s failed validation with %d error(s)", uid, len(errors))
    return Verdict(errors, (REREAD, *applied))


def validate(ds: Dataset, tools: Sequence[str] = tuple(TOOLS)) -> list[str]:
    """Error messages for ``ds`` written as a DICOM file (empty list: valid)."""
    return judge(ds, tools).errors


def check(ds: Dataset) -> None:
    """Raise ValidationFailed when ``validate(ds)`` reports errors."""
    errors = validate(ds)
    if errors:
        raise ValidationFailed(str(ds.get("SOPInstanceUID", "?")), errors)
