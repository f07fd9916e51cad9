"""Validation gate for written objects: dciodvfy, dcmpschk (GSPS) and a pydicom re-read.

``judge(ds, tools)`` runs the gate and returns a ``Verdict``: the error messages (empty: the
object passed), which checks ran and the bytes they judged (store and send those: encoding the
object again would cost as much as judging it, and would not be what was checked). The external
validators run as processes while pydicom re-reads the bytes here; ``start`` returns while they
still run (``Judging.verdict()`` waits), so the next object can be drawn meanwhile.
``validate(ds)`` returns the messages; ``check(ds)`` raises ``ValidationFailed`` carrying them.
The gate fails closed: a configured validator that is not installed is an error for every
object, never a skipped check; ``require_tools`` lets the node refuse to start instead.
Warnings of the external tools are logged at DEBUG.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.filewriter import correct_ambiguous_vr
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
    #: The object as written (a DICOM file with its meta header): exactly what the checks read.
    data: bytes = field(default=b"", compare=False, repr=False)


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


class _Running:
    """One validator started on a file; ``result()`` waits for its exit status and output."""

    def __init__(self, tool: str, path: Path) -> None:
        self.tool = tool
        self.error: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        exe = shutil.which(tool)
        if exe is None:
            # Fail closed: an object the configured gate cannot check does not pass it.
            self.error = f"not installed (Debian package {TOOLS[tool]}); the gate cannot check this object"
            return
        try:
            # its own process group: stopped whole, with any child of a wrapper script
            self.proc = subprocess.Popen([exe, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        except OSError as e:
            self.error = f"cannot run: {e}"

    def result(self) -> tuple[int, str]:
        """Exit status and output (stdout and stderr); RuntimeError when it could not run or timed out."""
        if self.proc is None:
            raise RuntimeError(self.error)
        try:
            output, _ = self.proc.communicate(timeout=TOOL_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            self.stop()
            raise RuntimeError(f"timed out after {TOOL_TIMEOUT_S} s") from e
        return self.proc.returncode, output

    def stop(self) -> None:
        """Kill it (and its children) if it still runs."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate()


def _dciodvfy(run: _Running) -> list[str]:
    try:
        _, output = run.result()
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


def _dcmpschk(run: _Running) -> list[str]:
    try:
        returncode, output = run.result()
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


_CHECKS: dict[str, Callable[[_Running], list[str]]] = {"dciodvfy": _dciodvfy, "dcmpschk": _dcmpschk}


def _reread(data: bytes) -> list[str]:
    try:
        ds = dcmread(BytesIO(data))
        if "PixelData" in ds:
            ds.pixel_array  # noqa: B018 - decodes the pixels
    except Exception as e:  # any failure to read back is a validation error, reported
        return [f"pydicom: cannot re-read written object: {type(e).__name__}: {e}"]
    return []


def encode(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file (its meta header's transfer syntax), as ``ds.save_as`` writes it.

    pydicom checks each data set it writes for elements of ambiguous VR (US or SS, ...), and
    for a new data set each item again under every level above it: a quarter of an SR's
    write (124 content items nested six deep: 35 -> 28 ms, #12). Done here once for the whole
    tree, after which every item is marked as already in the file's encoding, so the writer
    skips it. tests/unit/test_writers_validate.py checks the bytes are ``save_as``'s.
    """
    syntax = ds.file_meta.TransferSyntaxUID
    correct_ambiguous_vr(ds, syntax.is_little_endian)
    items = [ds]
    while items:
        item = items.pop()
        item.set_original_encoding(syntax.is_implicit_VR, syntax.is_little_endian, item._character_set)
        items += [child for elem in item.elements() if elem.VR == "SQ" for child in item[elem.tag].value]
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Judging:
    """The gate under way on one object (``start``): the bytes, the checks and pydicom's re-read
    at once; the external validators run as processes of their own until ``verdict()`` waits for
    them, so a caller can draw its next object meanwhile. ``close()`` stops them and removes the
    file (``verdict()`` does both)."""

    def __init__(self, ds: Dataset, tools: Sequence[str]) -> None:
        self.uid = str(ds.get("SOPInstanceUID", "?"))
        self.checks: tuple[str, ...] = (REREAD,)
        self._running: list[_Running] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        try:
            self.data = encode(ds)
        except Exception as e:  # cannot be written: that is the validation result
            self.data = b""
            self._errors = [f"pydicom: cannot write object: {type(e).__name__}: {e}"]
            return
        applied = tools_for(ds, tools)
        self.checks = (REREAD, *applied)
        if applied:
            self._tmp = tempfile.TemporaryDirectory(prefix="pacsnode-validate-")
            path = Path(self._tmp.name) / "object.dcm"
            path.write_bytes(self.data)
            self._running = [_Running(tool, path) for tool in applied]
        # pydicom re-reads the bytes here while the validators judge the file
        self._errors = _reread(self.data)

    def verdict(self) -> Verdict:
        """Wait for every validator; the object's verdict. Once only."""
        try:
            errors = self._errors + [e for run in self._running for e in _CHECKS[run.tool](run)]
        finally:
            self.close()
        if errors:
            logger.info("%s failed validation with %d error(s)", self.uid, len(errors))
        return Verdict(errors, self.checks, self.data)

    def close(self) -> None:
        """Stop validators still running and remove their file (the verdict is then not wanted)."""
        for run in self._running:
            run.stop()
        self._running = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def start(ds: Dataset, tools: Sequence[str] = tuple(TOOLS)) -> Judging:
    """Start the gate on ``ds`` written as a DICOM file: the pydicom re-read, then each of
    ``tools`` that applies to its SOP class. A tool that is not installed is an error."""
    return Judging(ds, tools)


def judge(ds: Dataset, tools: Sequence[str] = tuple(TOOLS)) -> Verdict:
    """``start``, then wait for its verdict."""
    return start(ds, tools).verdict()


def validate(ds: Dataset, tools: Sequence[str] = tuple(TOOLS)) -> list[str]:
    """Error messages for ``ds`` written as a DICOM file (empty list: valid)."""
    return judge(ds, tools).errors


def check(ds: Dataset) -> None:
    """Raise ValidationFailed when ``validate(ds)`` reports errors."""
    errors = validate(ds)
    if errors:
        raise ValidationFailed(str(ds.get("SOPInstanceUID", "?")), errors)
