"""node.engine.warmup: a starting inference worker runs a synthetic study in memory (#12)."""

from pathlib import Path

import pytest

from node.engine.warmup import synthetic_radiograph, warm_up
from node.writers.validate import validate
from pipelines.base import Pipeline
from pipelines.registry import load_pipeline


@pytest.fixture(scope="module")
def pipeline(demo_bundle: Path) -> Pipeline:
    return load_pipeline("chest_xray", demo_bundle, "cpu")


def test_the_synthetic_radiograph_is_a_valid_image_the_pipeline_reads(pipeline: Pipeline) -> None:
    source = synthetic_radiograph()
    assert validate(source, tools=()) == []  # pydicom reads it back, pixels included
    [result] = pipeline.run([source])
    assert result.findings


def test_warm_up_builds_every_kind_in_memory(pipeline: Pipeline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every kind of object is built and encoded to bytes: nothing lands in the working folder."""
    monkeypatch.chdir(tmp_path)
    built = warm_up(pipeline)
    assert {"sr", "gsps", "sc"} <= set(built)  # a SEG only where the model found a region
    assert list(tmp_path.iterdir()) == []


def test_a_failing_warm_up_is_logged_and_never_stops_the_worker(pipeline: Pipeline, caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import node.writers.sr

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise ValueError("no such thing")

    monkeypatch.setattr(node.writers.sr, "build_comprehensive_3d_sr", refuse)
    with caplog.at_level("WARNING", logger="node.engine.warmup"):
        built = warm_up(pipeline)
    assert "sr" not in built and "gsps" in built
    assert "the SR was not built (ValueError: no such thing); the first study pays" in caplog.text

    monkeypatch.setattr(pipeline, "run", refuse)
    assert warm_up(pipeline) == []
    assert "failed on the synthetic radiograph (ValueError: no such thing)" in caplog.text
