import logging

import pytest
from writers_data import rg1

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


def test_missing_tool_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(gate.shutil, "which", lambda name: None)
    gate._tool.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=gate.__name__):
            assert gate.validate(rg1()) == []
            assert gate.validate(rg1()) == []
        missing = [r for r in caplog.records if "dciodvfy not found" in r.getMessage()]
        assert len(missing) == 1
    finally:
        gate._tool.cache_clear()
