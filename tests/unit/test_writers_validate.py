from pathlib import Path

import pytest
from writers_data import needs_dciodvfy, rg1

from node.writers import validate as gate


def test_unwritable_object_is_reported_not_raised():
    ds = rg1()
    ds.Rows = 70000  # does not fit VR US
    errors = gate.validate(ds)
    assert errors and errors[0].startswith("pydicom: cannot write object")


def test_validation_failed_carries_messages():
    error = gate.ValidationFailed("1.2.3", ["dciodvfy: Error - a", "dciodvfy: Error - b"])
    assert error.messages == ["dciodvfy: Error - a", "dciodvfy: Error - b"]
    with pytest.raises(gate.ValidationFailed, match=r"1\.2\.3: 2 validation error\(s\)"):
        raise error


def test_a_missing_validator_fails_the_object_it_cannot_check(monkeypatch, tmp_path):
    """The gate fails closed: without dciodvfy on PATH an object does not pass unchecked."""
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no validator on it
    errors = gate.validate(rg1())
    assert errors == ["dciodvfy: not installed (Debian package dicom3tools); the gate cannot check this object"]
    assert gate.missing_tools(["dciodvfy", "dcmpschk"]) == ["dciodvfy", "dcmpschk"]
    with pytest.raises(gate.ValidatorMissing, match=r"dciodvfy \(Debian package dicom3tools\), dcmpschk"):
        gate.require_tools(["dciodvfy", "dcmpschk"])


def test_a_weaker_gate_is_chosen_explicitly_and_says_which_checks_ran(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    verdict = gate.judge(rg1(), tools=[])
    assert verdict == gate.Verdict([], ("pydicom",))


@needs_dciodvfy
def test_the_full_gate_names_its_checks(source):
    assert gate.judge(source).checks == ("pydicom", "dciodvfy")  # dcmpschk: presentation states only

def test_dcmpschk_applies_to_presentation_states_only():
    from pydicom.uid import GrayscaleSoftcopyPresentationStateStorage

    gsps = rg1()
    gsps.SOPClassUID = GrayscaleSoftcopyPresentationStateStorage
    assert gate.tools_for(gsps, ["dciodvfy", "dcmpschk"]) == ("dciodvfy", "dcmpschk")
    assert gate.tools_for(rg1(), ["dciodvfy", "dcmpschk"]) == ("dciodvfy",)
    assert gate.tools_for(gsps, ["dcmpschk"]) == ("dcmpschk",)


@pytest.mark.parametrize("kind", ["sr", "seg", "sc", "gsps"])
def test_the_gate_writes_what_pydicom_writes(kind):
    """gate.encode skips pydicom's per-item ambiguous-VR pass: the bytes must not change."""
    from io import BytesIO

    from writers_data import MODEL, boxes, fake_result, identity

    from node.writers.gsps import build_presentation_state
    from node.writers.sc import build_overlay_sc
    from node.writers.seg import build_segmentation
    from node.writers.sr import build_comprehensive_3d_sr

    source = rg1()
    result = fake_result(source.Rows, source.Columns)
    result.boxes = boxes(source.Rows, source.Columns)
    build = {
        "sr": lambda: build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr")),
        "seg": lambda: build_segmentation(source, result, MODEL, **identity("seg")),
        "sc": lambda: build_overlay_sc(source, result, MODEL, **identity("sc")),
        "gsps": lambda: build_presentation_state(source, result, MODEL, **identity("gsps")),
    }[kind]
    plain = BytesIO()
    build().save_as(plain, enforce_file_format=True)
    ds = build()
    assert gate.encode(ds) == plain.getvalue()
    assert gate.encode(ds) == plain.getvalue()  # and again, once marked


def test_the_gate_still_resolves_ambiguous_vrs_in_nested_items():
    """An element of VR "US or SS" deep in the tree is written as SS where the pixels are signed."""
    from io import BytesIO

    from pydicom import Dataset, dcmread
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    def build():
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, "1.2.3.4"
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.PixelRepresentation = 1
        inner = Dataset()
        inner.SmallestImagePixelValue = -5
        middle = Dataset()
        middle.ReferencedImageSequence = [inner]
        ds.SourceImageSequence = [middle]
        return ds

    plain = BytesIO()
    build().save_as(plain, enforce_file_format=True)
    data = gate.encode(build())
    assert data == plain.getvalue()
    back = dcmread(BytesIO(data))
    value = back.SourceImageSequence[0].ReferencedImageSequence[0]["SmallestImagePixelValue"]
    assert (value.VR, value.value) == ("SS", -5)


def _slow_validator(folder, seconds: float, log=None) -> None:
    """A `dciodvfy` on folder that takes `seconds` and reports one error (and notes its start and end in log)."""
    note = f'echo "start $(date +%s.%N)" >> {log}; ' if log else ""
    done = f'; echo "end $(date +%s.%N)" >> {log}' if log else ""
    script = folder / "dciodvfy"
    script.write_text(f'#!/bin/sh\n{note}sleep {seconds}{done}\necho "Error - slow and strict"\n')
    script.chmod(0o755)


def test_the_gate_starts_and_the_verdict_waits_for_its_validators(monkeypatch, tmp_path):
    """`start` returns while the validator runs (the worker draws the next object meanwhile);
    the verdict waits for it; `close` stops one whose verdict is not wanted, and its file goes."""
    import time

    _slow_validator(tmp_path, 1.0)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    t0 = time.monotonic()
    judging = gate.start(rg1(), tools=["dciodvfy"])
    assert time.monotonic() - t0 < 0.9
    assert judging.checks == ("pydicom", "dciodvfy") and judging.data[128:132] == b"DICM"
    verdict = judging.verdict()
    assert time.monotonic() - t0 >= 1.0
    assert verdict.errors == ["dciodvfy: Error - slow and strict"]

    stopped = gate.start(rg1(), tools=["dciodvfy"])
    folder = stopped._running[0].proc.args[1].rsplit("/", 1)[0]
    t0 = time.monotonic()
    stopped.close()
    assert time.monotonic() - t0 < 0.9
    assert stopped._running == [] and not Path(folder).exists()


def test_the_workers_gate_overlaps_validators_up_to_its_limit(monkeypatch, tmp_path):
    """Four objects through a gate of limit 2, each validator taking 0.5 s: at most two run at
    once, and `passed()` fails the job with the first object's errors."""
    from node.config import Config
    from node.engine.errors import PermanentError
    from node.engine.inference import _Gate

    log = tmp_path / "runs.log"
    _slow_validator(tmp_path, 0.5, log)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    config = Config.model_validate({"storage": {"path": str(tmp_path / "spool")}, "validation": {"tools": ["dciodvfy"]}})
    timings: dict[str, float] = {}
    with pytest.raises(PermanentError, match="seg failed validation: dciodvfy: Error - slow and strict"), \
            _Gate(config, timings, limit=2) as g:
        for kind in ("seg", "sc", "gsps", "sc"):
            g.submit(kind, rg1())
        g.passed()
    events = sorted((float(t), kind) for kind, t in (line.split() for line in log.read_text().splitlines()))
    running = peak = 0
    for _, kind in events:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    assert peak == 2
    assert timings["validate"] > 0 and "validate_seg" in timings
