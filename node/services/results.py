"""Read our own result objects and a study's first instance back from the spool, one named file
at a time (paths come from the database and are resolved inside storage.path): the findings
an SR records, the SR as readable text, a PNG preview of an overlay, the patient attributes
shown on the study page. Nothing here lists or scans the spool."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from node.config import Config
from node.services.errors import NotFound
from node.spool import SpoolError, resolve
from node.writers import codes as finding_codes

#: Patient and study attributes the study page shows to logged-in users (never logged, never in
#: the database, never in the JSON API).
PATIENT_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyDate",
                    "StudyTime", "StudyDescription", "ReferringPhysicianName", "InstitutionName")
_MAX_ITEMS = 5000  # content items read from one SR: ours have a few hundred
_MAX_DEPTH = 32
_UNREADABLE = (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, AttributeError, IndexError, OSError)


def read(config: Config, relpath: str, **kwargs: Any) -> Dataset:
    """Parse one spool file named by a database row; NotFound when it is gone or unreadable."""
    try:
        path = resolve(config.storage.path, relpath)
        return pydicom.dcmread(path, **kwargs)
    except FileNotFoundError as e:
        raise NotFound(f"file {relpath} is no longer in the spool") from e
    except (SpoolError, *_UNREADABLE) as e:
        raise NotFound(f"file {relpath} cannot be read: {type(e).__name__}") from e


@dataclass
class Item:
    """One SR content item: concept name, value type, its value as text, and its children."""

    relationship: str
    name: str
    value_type: str
    value: str
    code: tuple[str, str] | None = None  # (value, scheme) of the concept name
    value_code: tuple[str, str] | None = None  # (value, scheme) of a CODE item's value
    children: list[Item] = field(default_factory=list)


def _code(seq: Any) -> tuple[str, str] | None:
    if not seq:
        return None
    return str(seq[0].get("CodeValue", "")), str(seq[0].get("CodingSchemeDesignator", ""))


def _value(it: Dataset) -> str:
    vt = str(it.get("ValueType", ""))
    if vt == "TEXT":
        return str(it.get("TextValue", ""))
    if vt == "CODE":
        seq = it.get("ConceptCodeSequence")
        return str(seq[0].get("CodeMeaning", "")) if seq else ""
    if vt == "NUM":
        seq = it.get("MeasuredValueSequence")
        if not seq:
            return "(no value)"
        units = seq[0].get("MeasurementUnitsCodeSequence")
        unit = str(units[0].get("CodeValue", "")) if units else ""
        return f"{seq[0].get('NumericValue', '')}{'' if unit in ('', '1') else ' ' + unit}"
    if vt == "UIDREF":
        return str(it.get("UID", ""))
    if vt in ("DATETIME", "DATE", "TIME"):
        return str(it.get(vt.capitalize() if vt != "DATETIME" else "DateTime", ""))
    if vt == "PNAME":
        return str(it.get("PersonName", ""))
    if vt in ("SCOORD", "SCOORD3D"):
        dims = 2 if vt == "SCOORD" else 3
        return f"{it.get('GraphicType', '')} of {len(it.get('GraphicData', [])) // dims} points"
    if vt in ("IMAGE", "COMPOSITE"):
        seq = it.get("ReferencedSOPSequence")
        return f"instance {seq[0].get('ReferencedSOPInstanceUID', '')}" if seq else ""
    return ""


def content_tree(ds: Dataset) -> Item:
    """The SR's content tree (document title at the root), bounded in size and depth."""
    count = 0

    def walk(seq: Any, depth: int) -> list[Item]:
        nonlocal count
        out = []
        for it in seq or []:
            count += 1
            if count > _MAX_ITEMS or depth > _MAX_DEPTH:
                raise ValueError(f"SR content exceeds {_MAX_ITEMS} items or depth {_MAX_DEPTH}")
            names = it.get("ConceptNameCodeSequence")
            out.append(Item(str(it.get("RelationshipType", "")), str(names[0].get("CodeMeaning", "")) if names else "",
                            str(it.get("ValueType", "")), _value(it), _code(names),
                            _code(it.get("ConceptCodeSequence")), walk(it.get("ContentSequence"), depth + 1)))
        return out

    title = ds.get("ConceptNameCodeSequence")
    return Item("", str(title[0].get("CodeMeaning", "")) if title else "", "CONTAINER", "", _code(title), None,
                walk(ds.get("ContentSequence"), 1))


def _is(code: tuple[str, str] | None, concept: Any) -> bool:
    return code == (concept.value, concept.scheme_designator)


def findings(root: Item) -> list[dict[str, Any]]:
    """The classifier findings our SR states (node/writers/sr.py), in document order: label,
    probability, decision (Present / Absent) and threshold. A finding drawn on the image is a
    TID 1501 group (Finding, Probability NUM, decision CODE, threshold in the algorithm's
    parameters); one without a place is a CODE (decision) then a TEXT ("...: AI probability P
    (threshold T)...") under Qualitative Evaluations. Detection boxes and regions carry no
    decision and are not findings."""
    labels = {(c.value, c.scheme_designator): label for label, c in finding_codes.FINDING_CODES.items()}
    out: list[dict[str, Any]] = []

    def visit(node: Item) -> None:
        if _is(node.code, codes.DCM.MeasurementGroup):
            concept = next((c.value_code for c in node.children if _is(c.code, codes.DCM.Finding)), None)
            prob = next((c for c in node.children if _is(c.code, codes.DCM.Probability) and c.value_type == "NUM"), None)
            decision = next((c.value for c in node.children if c.value_type == "CODE" and c.code == concept), None)
            params = [c.value for c in _descendants(node) if _is(c.code, codes.DCM.AlgorithmParameters)]
            threshold = next((float(p.split("=", 1)[1]) for p in params if p.startswith("threshold=")), None)
            if concept in labels and prob is not None and decision is not None:
                out.append({"label": labels[concept], "probability": _number(prob.value.split()[0]),
                            "decision": decision, "threshold": threshold})
            return
        for c, t in zip(node.children, node.children[1:], strict=False):
            said = _STATED.match(t.value) if c.value_type == "CODE" and t.value_type == "TEXT" else None
            if said and c.code in labels and t.code == c.code:
                out.append({"label": labels[c.code], "probability": _number(said["p"]),
                            "decision": c.value, "threshold": _number(said["t"])})
        for c in node.children:
            visit(c)

    visit(root)
    return out


#: How the SR states a finding without a place (node/writers/sr.py _qualitative_evaluations).
_STATED = re.compile(r".*: AI probability (?P<p>\S+) \(threshold (?P<t>[^)]+)\)")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _descendants(node: Item) -> list[Item]:
    out = []
    for c in node.children:
        out.append(c)
        out.extend(_descendants(c))
    return out


def sr_findings(config: Config, relpath: str) -> list[dict[str, Any]]:
    """The findings recorded in one SR file of the spool."""
    return findings(content_tree(read(config, relpath)))


def sr_text(config: Config, relpath: str) -> dict[str, Any]:
    """An SR as readable text: header facts and its content tree as (depth, name, value) lines."""
    ds = read(config, relpath)
    lines: list[tuple[int, str, str]] = []

    def flatten(node: Item, depth: int) -> None:
        lines.append((depth, node.name, node.value))
        for c in node.children:
            flatten(c, depth + 1)

    flatten(content_tree(ds), 0)
    return {"title": lines[0][1] if lines else "", "series_description": str(ds.get("SeriesDescription", "")),
            "completion": str(ds.get("CompletionFlag", "")), "verification": str(ds.get("VerificationFlag", "")),
            "manufacturer": str(ds.get("Manufacturer", "")), "software": str(ds.get("SoftwareVersions", "")),
            "lines": lines[1:]}


def preview_png(config: Config, relpath: str, max_side: int = 1024) -> bytes:
    """A PNG of one image object of the spool (our overlay SC), at most max_side pixels a side."""
    from PIL import Image
    from pydicom.pixels import apply_voi_lut

    ds = read(config, relpath)
    try:
        pixels = ds.pixel_array
    except (AttributeError, ValueError, RuntimeError, NotImplementedError) as e:
        raise NotFound(f"file {relpath} has no pixel data to preview: {e}") from e
    if pixels.ndim == 4 or (pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) == 1):
        pixels = pixels[0]  # the first frame
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    else:
        values = apply_voi_lut(pixels, ds).astype(np.float32)
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) / (hi - lo or 1.0) * 255.0
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            scaled = 255.0 - scaled
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    image.thumbnail((max_side, max_side))
    buf = BytesIO()
    image.save(buf, "PNG", optimize=False)
    return buf.getvalue()


def patient_attributes(config: Config, relpath: str) -> dict[str, str]:
    """Patient and study attributes of one received instance (header only, pixels not read)."""
    ds = read(config, relpath, stop_before_pixels=True, specific_tags=list(PATIENT_KEYWORDS))
    return {k: str(ds.get(k, "") or "") for k in PATIENT_KEYWORDS}


__all__ = ["PATIENT_KEYWORDS", "Item", "content_tree", "findings", "patient_attributes", "preview_png", "read",
           "sr_findings", "sr_text"]
