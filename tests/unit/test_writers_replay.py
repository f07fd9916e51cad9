"""The same job writes the same bytes: identity, device and times come from the caller."""

import dataclasses
from io import BytesIO

import pytest
from writers_data import MODEL, WHEN, boxes, fake_result, identity, rg1

from node.writers.gsps import build_presentation_state
from node.writers.sc import build_overlay_sc
from node.writers.seg import build_segmentation
from node.writers.sr import build_comprehensive_3d_sr

BUILDERS = {
    "sr": lambda source, result, model, **ids: build_comprehensive_3d_sr([source], [result], model, **ids),
    "seg": build_segmentation,
    "gsps": build_presentation_state,
    "sc": build_overlay_sc,
}


@pytest.fixture(scope="module")
def inputs():
    source = rg1()
    result = fake_result(source.Rows, source.Columns)
    result.boxes = boxes(source.Rows, source.Columns)
    return source, result


def _bytes(ds) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_a_replay_writes_byte_identical_objects(kind, inputs):
    # two builds microseconds apart: any wall-clock time (TM keeps microseconds) or random UID
    # in the object would differ
    first, second = (_bytes(BUILDERS[kind](*inputs, MODEL, **identity(kind))) for _ in range(2))
    assert first == second


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_every_timestamp_is_the_jobs(kind, inputs):
    ds = BUILDERS[kind](*inputs, MODEL, **identity(kind))
    date, time = WHEN.strftime("%Y%m%d"), WHEN.strftime("%H%M%S.%f")
    stamps = {k: str(ds.get(k)) for k in ("InstanceCreationDate", "InstanceCreationTime", "SeriesDate", "SeriesTime",
                                          "ContentDate", "ContentTime", "PresentationCreationDate",
                                          "PresentationCreationTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture")
              if k in ds}  # fmt: skip
    assert {"InstanceCreationDate", "SeriesDate"} <= set(stamps)
    assert all(v == (date if k.endswith("Date") or "DateOf" in k else time) for k, v in stamps.items()), stamps
    assert {str(e.ContributionDateTime) for e in ds.ContributingEquipmentSequence} == {f"{date}{time}"}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_device_attributes_go_through_highdicoms_checks(kind, inputs):
    long_name = dataclasses.replace(MODEL, name="x" * 65)  # LO holds 64 characters
    with pytest.raises(ValueError, match="64"):
        BUILDERS[kind](*inputs, long_name, **identity(kind))
