"""Destinations (and C-ECHO), model bundles and the rule tester."""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path
from typing import Any

from node.config import Config
from node.services.errors import Invalid, NotFound


def destinations(config: Config) -> list[dict[str, Any]]:
    """Configured destinations (no secrets: the config holds none for them)."""
    return [{"name": d.name, "protocol": d.protocol, "ae_title": d.ae_title, "host": d.host, "port": d.port,
             "url": d.url, "objects": list(d.wants(config.export)), "confirm": d.confirm} for d in config.destinations]


def echo(config: Config, name: str) -> dict[str, Any]:
    """C-ECHO a DIMSE destination (or GET the base URL of a STOW one); its result and round trip."""
    dest = next((d for d in config.destinations if d.name == name), None)
    if dest is None:
        raise NotFound(f"no destination {name!r}")
    t0 = time.monotonic()
    if dest.protocol == "stow":
        import requests

        assert dest.url is not None
        try:
            r = requests.get(dest.url.rstrip("/") + "/studies?limit=1", timeout=dest.timeout)
            ok, detail = r.status_code < 500, f"HTTP {r.status_code}"
        except requests.RequestException as e:
            ok, detail = False, str(e)
    else:
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        from node.export import _ae, refusal

        ae = _ae(dest, config.export.calling_ae_title)
        ae.add_requested_context(Verification)
        assert dest.host is not None and dest.port is not None and dest.ae_title is not None
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if not assoc.is_established:
            ok = False
            detail = f"association {refusal(assoc)}"
        else:
            status = assoc.send_c_echo()
            assoc.release()
            code = getattr(status, "Status", None)
            ok, detail = code == 0, "success" if code == 0 else f"status {code!r}"
    return {"destination": name, "ok": ok, "detail": detail, "seconds": round(time.monotonic() - t0, 4)}


def models(config: Config, extra: list[Path] | None = None) -> list[dict[str, Any]]:
    """Bundles the config names (and any in `extra` folders), with pinned-version mismatches."""
    from pipelines.bundle import list_bundles

    pinned = {str(pc.bundle): pc.version for pc in config.pipelines.values() if pc.version}
    rows = list_bundles([pc.bundle for pc in config.pipelines.values()] + list(extra or []))
    for r in rows:
        want = pinned.get(r["path"])
        if want and r.get("status") == "ok" and str(r["version"]) != want:
            r["status"] = f"config.yaml pins version {want}"
    return rows


def rules_test(config: Config, data: bytes, calling_ae: str | None = None, called_ae: str | None = None,
               address: str | None = None) -> dict[str, Any]:
    """The routing decision for one DICOM file (as the first instance of its series), and why."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    from node.jobs import enabled_pipelines
    from node.routing import decision_for

    try:
        ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:
        raise Invalid("file", f"not a DICOM file: {e}") from e
    d = decision_for(ds, config.routing, enabled_pipelines(config), calling_ae,
                     called_ae or config.listener.ae_title, address)
    return {"mode": config.routing.mode, "rule": d.rule, "action": "skip" if d.skipped else "process",
            "reason": d.reason, "pipelines": list(d.pipelines), "priority": d.priority,
            "destinations": None if d.destinations is None else list(d.destinations),
            "trace": list(d.trace)}
