"""Jobs written straight into the database, for tests of the state machine, the engine and the admin CLI."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom

from node.config import Config
from node.db.models import Instance, Job, JobState, Series, SeriesState, Study, StudyState, utcnow
from node.db.session import session_scope
from node.spool import instance_relpath, write_atomic


def make_job(config: Config, state: JobState, age_s: float = 0, **fields: Any) -> int:
    """A job of a new one-instance study in `state`, last changed age_s ago; return its id."""
    then = utcnow() - timedelta(seconds=age_s)
    with session_scope(config.database.url) as s:
        study = Study(study_instance_uid=f"1.2.3.{int(then.timestamp() * 1e6)}", state=StudyState.COMPLETE,
                      first_received_at=then, last_received_at=then, instance_count=1)
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, pipeline="chest_xray", state=state, attempt=0, instance_ids=[],
                  timings={}, created_at=then, updated_at=then, **fields)
        s.add(job)
        s.flush()
        return job.id


def queued_job(cfg: Config, source: Path) -> int:
    """Spool one received image and record it with a queued job, as the listener and routing would."""
    data = source.read_bytes()
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    sha = hashlib.sha256(data).hexdigest()
    rel = instance_relpath(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), sha)
    write_atomic(cfg.storage.path, rel, data)
    with session_scope(cfg.database.url) as s:
        study = Study(study_instance_uid=str(ds.StudyInstanceUID), state=StudyState.COMPLETE, instance_count=1)
        series = Series(study=study, series_instance_uid=str(ds.SeriesInstanceUID), modality=ds.get("Modality"),
                        state=SeriesState.ROUTED)
        inst = Instance(series=series, sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID), path=rel, size=len(data),
                        sha256=sha)
        s.add_all([study, series, inst])
        s.flush()
        job = Job(study_id=study.id, pipeline="chest_xray", state=JobState.QUEUED, attempt=0,
                  instance_ids=[inst.id], timings={})
        s.add(job)
        s.flush()
        return job.id


def nudge_networks(pipeline: Any, monkeypatch: Any) -> list[int]:
    """Make the pipeline's networks give 1% other numbers (as another thread count or batch
    would, only more), counting their calls."""
    real = pipeline._forward
    calls: list[int] = []

    def forward(net: Any, x: Any) -> Any:
        calls.append(1)
        out = real(net, x)
        return tuple(t * 1.01 for t in out) if isinstance(out, tuple) else out * 1.01

    monkeypatch.setattr(pipeline, "_forward", forward)
    return calls


def upgrade_writer(monkeypatch: Any, module: Any, name: str) -> None:
    """What an upgrade of the node, pydicom or highdicom might do: the writer `module.name`
    writes other bytes (its objects' Series Description gains " (upgraded)")."""
    real = getattr(module, name)

    def build(*args: Any, **kwargs: Any) -> pydicom.Dataset:
        ds = real(*args, **kwargs)
        ds.SeriesDescription = f"{ds.SeriesDescription} (upgraded)"
        return ds

    monkeypatch.setattr(module, name, build)
