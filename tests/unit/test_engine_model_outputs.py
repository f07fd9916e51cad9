"""A replay, or any later run of one model on one content, draws from the model outputs the
first run kept: the same bytes under the same UIDs, even where the networks' numbers would now
move (another thread count or batch size: ~1e-6, enough to change a printed digit or a pixel).
Where the bytes do change (other numbers, an upgraded writer), they take new UIDs."""

from __future__ import annotations

import json
import shutil
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from node.cli import db_upgrade
from node.config import Config, parse_config
from node.db.models import Event, Job, JobState, ModelOutput
from node.db.session import session_scope
from node.engine import inference, model_outputs
from node.jobs import replay
from node.spool import resolve
from node.writers import seg as writers_seg
from node.writers import sr as writers_sr
from tests.unit.jobs_data import nudge_networks, queued_job, upgrade_writer

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))


@pytest.fixture(autouse=True)
def _built_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "enqueue_export", lambda *a, **k: None)  # no destination


def _config(tmp_path: Path, bundle: Path, **pipeline: Any) -> Config:
    """A node on `bundle` with its database migrated; `pipeline`: more of the pipeline's settings."""
    config = parse_config({
        "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 0},
        "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
        "validation": {"tools": []},  # the pydicom re-read: the bytes are what these tests compare
        "pipelines": {"chest_xray": {"bundle": str(bundle), "device": "cpu", **pipeline}},
    })
    db_upgrade(config)
    return config


@pytest.fixture
def cfg(tmp_path: Path, demo_bundle: Path) -> Config:
    return _config(tmp_path, demo_bundle)


def _objects(cfg: Config, job_id: int) -> dict[str, bytes]:
    """Each output's SOP Instance UID -> its bytes in the spool. The job must be encoded; it is
    then marked done, as its export would (these tests send nothing), so it can be replayed."""
    with session_scope(cfg.database.url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.ENCODED, (job and job.state, job and job.error)
        job.state = JobState.DONE
        return {o.sop_instance_uid: resolve(cfg.storage.path, o.path).read_bytes() for o in job.outputs}


def _first_run(cfg: Config) -> tuple[int, dict[str, bytes]]:
    """A job on RG1, run: its id and its objects."""
    first = queued_job(cfg, RG1)
    inference.run_inference(cfg, first, "test")
    return first, _objects(cfg, first)


def test_a_replay_draws_the_same_bytes_from_the_kept_outputs_without_the_networks(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, before = _first_run(cfg)
    assert len(before) == 4  # SR, SC, SEG, GSPS
    with session_scope(cfg.database.url) as s:
        (row,) = s.scalars(select(ModelOutput)).all()
        assert row.pipeline == "chest_xray" and row.sop_instance_uid == pydicom.dcmread(RG1).SOPInstanceUID
        assert len(row.data) < 20_000
    calls = nudge_networks(inference.pipeline_for(cfg, "chest_xray"), monkeypatch)

    second = replay(cfg, first, "test", "byte-identical replay")
    inference.run_inference(cfg, second, "test")
    assert calls == []  # the networks did not run
    assert _objects(cfg, second) == before


def test_a_run_that_loses_the_race_to_keep_outputs_draws_from_the_winners(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, before = _first_run(cfg)
    calls = nudge_networks(inference.pipeline_for(cfg, "chest_xray"), monkeypatch)
    # Another worker's run of the same content: it looked before the first run kept its
    # outputs, so it runs the (here nudged) networks; keeping finds the first run's outputs.
    real_load = model_outputs.load
    looks: list[int] = []

    def load_too_early(config: Config, keys: Any) -> dict[str, Any]:
        looks.append(1)
        return {} if len(looks) == 1 else real_load(config, keys)

    monkeypatch.setattr(model_outputs, "load", load_too_early)
    second = replay(cfg, first, "test", "raced")
    inference.run_inference(cfg, second, "test")
    assert calls  # the networks ran...
    assert _objects(cfg, second) == before  # ...and their numbers were not used
    with session_scope(cfg.database.url) as s:
        assert s.scalar(select(func.count()).select_from(ModelOutput)) == 1


def test_nudged_networks_do_change_the_objects_and_so_their_uids(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    # The control for the tests above: without kept outputs the same nudge changes the bytes;
    # what changed then takes new UIDs (node/engine/revisions.py), the SR superseding the first.
    first, before = _first_run(cfg)
    nudge_networks(inference.pipeline_for(cfg, "chest_xray"), monkeypatch)
    with session_scope(cfg.database.url) as s:
        s.query(ModelOutput).delete()
    second = replay(cfg, first, "test", "without kept outputs")
    inference.run_inference(cfg, second, "test")
    after = _objects(cfg, second)
    assert len(after) == len(before)
    assert all(after[uid] == before[uid] for uid in set(after) & set(before))  # one UID, one set of bytes
    assert _sr(after).SOPInstanceUID not in before  # the SR's numbers changed: a new SR...
    assert _predecessors(_sr(after)) == [_sr(before).SOPInstanceUID]  # ...that supersedes the first


def test_after_writers_change_a_replay_gives_what_changed_new_uids_and_the_next_replay_the_same(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, before = _first_run(cfg)
    upgrade_writer(monkeypatch, writers_sr, "build_comprehensive_3d_sr")
    upgrade_writer(monkeypatch, writers_seg, "build_segmentation")
    second = replay(cfg, first, "test", "after an upgrade")
    inference.run_inference(cfg, second, "test")
    after = _objects(cfg, second)
    kinds = {uid: pydicom.dcmread(BytesIO(data)).Modality for uid, data in {**before, **after}.items()}
    assert sorted(kinds[u] for u in set(after) - set(before)) == ["SEG", "SR"]  # anew, in new series
    assert all(after[uid] == before[uid] for uid in set(after) & set(before))  # SC, GSPS as they were
    assert _series_uids(after, "SEG").isdisjoint(_series_uids(before, "SEG"))
    assert _predecessors(_sr(after)) == [_sr(before).SOPInstanceUID]
    with session_scope(cfg.database.url) as s:  # what the admin reads in the audit log
        said = s.scalars(select(Event.detail).where(Event.kind == "revision", Event.job_id == second)).all()
    assert [d.split(":")[0] for d in said] == ["sr", "seg"] and all(f"jobs [{first}]" in d for d in said)
    # A replay of that replay, under the same code: nothing new for the PACS.
    third = replay(cfg, second, "test", "again")
    inference.run_inference(cfg, third, "test")
    assert _objects(cfg, third) == after


def test_an_attempt_interrupted_before_an_upgrade_is_redone_under_new_uids(
    cfg: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first attempt wrote (and may have sent) its objects, then the node was upgraded and
    # the job, whose worker stopped, runs again: its own earlier objects count as issued.
    job = queued_job(cfg, RG1)
    inference.run_inference(cfg, job, "test")
    with session_scope(cfg.database.url) as s:
        row = s.get(Job, job)
        assert row is not None and row.state == JobState.ENCODED
        before = {o.sop_instance_uid: resolve(cfg.storage.path, o.path).read_bytes() for o in row.outputs}
        row.state = JobState.QUEUED
    upgrade_writer(monkeypatch, writers_sr, "build_comprehensive_3d_sr")
    inference.run_inference(cfg, job, "test")
    after = _objects(cfg, job)
    assert _sr(after).SOPInstanceUID not in before
    assert _predecessors(_sr(after)) == [_sr(before).SOPInstanceUID]
    assert set(after) - {_sr(after).SOPInstanceUID} == set(before) - {_sr(before).SOPInstanceUID}


def test_packed_outputs_round_trip_without_pickles() -> None:
    outputs = {"lung_mask": np.eye(4, dtype=bool), "crop": np.array([1, 2, 3, 4]), "cam:A": np.ones((7, 7), np.float32)}
    back = model_outputs.unpack(model_outputs.pack(outputs))
    assert model_outputs.same(back, outputs)
    assert list(back) == list(outputs)  # the order too: the overlay lists heatmaps in this order
    assert not model_outputs.same(back, {**outputs, "crop": np.array([1, 2, 3, 5])})
    assert not model_outputs.same(back, {**outputs, "cam:A": np.ones((7, 7), np.float64)})
    with pytest.raises(ValueError, match="pickle"):
        model_outputs.pack({"x": np.array([object()])})


@pytest.mark.parametrize("edit", ["threshold in the bundle, same version", "series numbers in config.yaml"])
def test_what_shapes_the_objects_changed_gives_new_uids_never_other_bytes_under_old_ones(
    edit: str, demo_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(demo_bundle, bundle)  # the session's bundle is shared: edit a copy
    cfg = _config(tmp_path, bundle)
    first, before = _first_run(cfg)
    if edit.startswith("threshold"):
        path = bundle / "configs" / "metadata.json"
        meta = json.loads(path.read_text())
        meta["thresholds"] = {label: t / 2 for label, t in meta["thresholds"].items()}
        path.write_text(json.dumps(meta))
    else:
        cfg = _config(tmp_path, bundle, series_number_base=7000)
    inference.get_pipeline.cache_clear()  # a worker started after the edit
    calls = nudge_networks(inference.pipeline_for(cfg, "chest_xray"), monkeypatch)

    second = replay(cfg, first, "test", edit)
    inference.run_inference(cfg, second, "test")
    after = _objects(cfg, second)
    assert len(after) == len(before) and not set(after) & set(before)  # every object anew
    assert _predecessors(_sr(after)) == [_sr(before).SOPInstanceUID]  # supersedes it
    # the networks ran again only where their input changed (a bundle's settings may be its preprocessing)
    assert bool(calls) == edit.startswith("threshold")
    with session_scope(cfg.database.url) as s:
        assert s.scalar(select(func.count()).select_from(ModelOutput)) == (2 if calls else 1)
    # A replay of that replay: the same bytes, its SR superseding the first job's SR as the replay's did.
    third = replay(cfg, second, "test", "again")
    inference.run_inference(cfg, third, "test")
    assert _objects(cfg, third) == after


def _sr(objects: dict[str, bytes]) -> pydicom.Dataset:
    """The SR among a job's objects."""
    [sr] = [ds for ds in (pydicom.dcmread(BytesIO(data)) for data in objects.values()) if ds.Modality == "SR"]
    return sr


def _predecessors(sr: pydicom.Dataset) -> list[str]:
    """The SOP Instance UIDs an SR supersedes."""
    return [ref.ReferencedSOPInstanceUID for item in sr.get("PredecessorDocumentsSequence", [])
            for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]


def _series_uids(objects: dict[str, bytes], modality: str) -> set[str]:
    return {ds.SeriesInstanceUID for ds in (pydicom.dcmread(BytesIO(d)) for d in objects.values())
            if ds.Modality == modality}
