import pytest

from node.writers.uids import result_uid


def test_same_parts_give_same_uid():
    assert result_uid("job-1", "0.1.0", "sr", "0") == result_uid("job-1", "0.1.0", "sr", "0")


def test_any_changed_part_gives_another_uid():
    base = result_uid("job-1", "0.1.0", "sr", "0")
    others = {
        result_uid("job-2", "0.1.0", "sr", "0"),
        result_uid("job-1", "0.2.0", "sr", "0"),
        result_uid("job-1", "0.1.0", "seg", "0"),
        result_uid("job-1", "0.1.0", "sr", "1"),
    }
    assert base not in others and len(others) == 4


def test_parts_are_not_simply_concatenated():
    assert result_uid("ab", "c") != result_uid("a", "bc")


def test_uid_is_a_valid_2_25_uid():
    uid = result_uid("job-1")
    assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid


def test_known_value_is_stable_across_releases():
    # Changing the namespace would re-key every stored result: pin one value.
    assert result_uid("job-1", "0.1.0", "sr", "0") == result_uid(*"job-1 0.1.0 sr 0".split())
    assert str(result_uid("pin")) == PINNED


@pytest.mark.parametrize("parts", [(), ("",), ("job", "")])
def test_empty_parts_are_rejected(parts):
    with pytest.raises(ValueError, match="result_uid"):
        result_uid(*parts)


PINNED = "2.25.154194103953225529977601467420521627386"
