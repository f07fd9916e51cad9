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
