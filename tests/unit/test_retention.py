"""Spool retention (storage.retention_days): only settled, old studies lose their files; their
rows stay; replay and re-send then say why they cannot; the study sent again gets its files back,
and a replay redoes it into the same objects under the same UIDs (the outputs' digests stand in
for their files)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import select

from node import metrics
from node.cli import db_upgrade, main
from node.completion import CompletionService
from node.config import Config, parse_config
from node.db.models import (
    Event,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    SeriesState,
    Study,
    StudyState,
    utcnow,
)
from node.db.session import session_scope
from node.engine import inference
from node.handlers import AssociationTracker, IngestContext, ingest
from node.jobs import TransitionError, replay, resend
from node.services.jobs import failed_job_ids
from node.services.retention import RetentionThread, purge
from node.spool import instance_relpath, output_relpath, resolve, write_atomic
from tests.peers import Postgres, wait_for
from tests.unit.jobs_data import queued_job

RG1 = Path(str(get_testdata_file("RG1_UNCR.dcm")))
DAY = 86400.0


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each backend: the purge's queries (a correlated UPDATE) run on both."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return request.getfixturevalue("pg").create_database(f"retention_{uuid.uuid4().hex[:12]}")


def _config(tmp_path: Path, url: str | None = None, **more: object) -> Config:
    config = parse_config({"storage": {"path": str(tmp_path / "spool"), "min_free_mb": 0, "retention_days": 30},
                           "database": {"url": url or f"sqlite:///{tmp_path / 'db.sqlite'}"}, **more})
    db_upgrade(config)
    return config


def _aged(path: Path, age_s: float) -> None:
    then = utcnow().timestamp() - age_s
    os.utime(path, (then, then))


def _study(config: Config, name: str, age_days: float, *jobs: JobState, state: StudyState = StudyState.COMPLETE,
           file_age_days: float | None = None) -> tuple[int, list[int], list[Path]]:
    """A study last active `age_days` ago, with one instance and one output per job (files aged
    alike, or `file_age_days`): its id, its jobs' ids, its files."""
    then = utcnow() - timedelta(days=age_days)
    files: list[Path] = []

    def spooled(rel: str) -> str:
        files.append(write_atomic(config.storage.path, rel, b"DICM" + name.encode()))
        _aged(files[-1], (file_age_days if file_age_days is not None else age_days) * DAY)
        return rel

    with session_scope(config.database.url) as s:
        study = Study(study_instance_uid=f"1.2.826.0.1.{int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)}", state=state,
                      first_received_at=then, last_received_at=then, instance_count=1)
        series = Series(study=study, series_instance_uid=study.study_instance_uid + ".1", state=SeriesState.ROUTED)
        inst = Instance(series=series, sop_instance_uid=study.study_instance_uid + ".1.1", sop_class_uid="1.2",
                        transfer_syntax_uid="1.2.840.10008.1.2.1", size=10, sha256="ab" * 32,
                        path=spooled(instance_relpath(study.study_instance_uid, name, "ab" * 32)))
        s.add_all([study, series, inst])
        s.flush()
        ids = []
        for state_ in jobs:
            job = Job(study_id=study.id, pipeline="chest_xray", state=state_, attempt=0, instance_ids=[inst.id],
                      timings={}, created_at=then, updated_at=then)
            s.add(job)
            s.flush()
            s.add(Output(job_id=job.id, kind="sr", sop_class_uid="1.2", sop_instance_uid=f"2.25.{job.id}",
                         series_instance_uid="2.25.9", path=spooled(output_relpath(job.id, "sr", 0))))
            ids.append(job.id)
        return study.id, ids, files


def _purged(config: Config, study_id: int) -> bool:
    with session_scope(config.database.url) as s:
        return s.get_one(Study, study_id).purged_at is not None


def test_only_settled_studies_past_the_retention_lose_their_files_and_keep_their_rows(tmp_path: Path,
                                                                                     db_url: str) -> None:
    config = _config(tmp_path, db_url)
    done, _, done_files = _study(config, "done", 31, JobState.DONE)
    skipped, _, skipped_files = _study(config, "skipped", 40, state=StudyState.SKIPPED)
    recent, _, recent_files = _study(config, "recent", 29, JobState.DONE)
    busy, _, busy_files = _study(config, "busy", 31, JobState.SENDING)
    receiving, _, receiving_files = _study(config, "receiving", 31, state=StudyState.RECEIVING)
    failed, failed_jobs, failed_files = _study(config, "failed", 31, JobState.FAILED)
    replayed, _, replayed_files = _study(config, "replayed", 31, JobState.FAILED, JobState.DONE)
    with session_scope(config.database.url) as s:  # the done job redid the failed one
        first, second = s.scalars(select(Job).where(Job.study_id == replayed).order_by(Job.id)).all()
        second.replay_of = first.id
    fresh, _, fresh_files = _study(config, "fresh file", 31, JobState.DONE, file_age_days=0)

    dry = purge(config, dry_run=True)
    assert dry.files == 6 and all(f.exists() for f in done_files + skipped_files + replayed_files)
    assert not any(_purged(config, i) for i in (done, skipped, replayed))

    report = purge(config)
    assert report.files == 6 and report.bytes == sum(len(b"DICM" + n.encode()) for n in
                                                      ("done",) * 2 + ("skipped",) + ("replayed",) * 3)
    for study_id, files in ((done, done_files), (skipped, skipped_files), (replayed, replayed_files)):
        assert _purged(config, study_id) and not any(f.exists() for f in files)
    for study_id, files in ((recent, recent_files), (busy, busy_files), (receiving, receiving_files),
                            (failed, failed_files)):
        assert not _purged(config, study_id) and all(f.exists() for f in files)
    # Written since the cutoff (received again meanwhile): it stays, whatever the rows say.
    assert _purged(config, fresh) and all(f.exists() for f in fresh_files)
    with session_scope(config.database.url) as s:  # rows stay; each purge audited
        assert s.get_one(Study, done).instance_count == 1 and len(s.get_one(Study, done).jobs) == 1
        assert len(s.scalars(select(Event).where(Event.kind == "purge")).all()) == 4
    assert purge(config).studies == []  # nothing twice

    # A failure waits for an admin; replay --failed then has nothing to redo it from.
    assert failed_jobs[0] in failed_job_ids(config)
    assert main(["--config", str(_write(config, tmp_path)), "purge", "--include-failed"]) == 0
    assert _purged(config, failed) and not any(f.exists() for f in failed_files)
    assert failed_jobs[0] not in failed_job_ids(config)
    with pytest.raises(TransitionError, match=r"1 of its 1 source instances are no longer in the spool: its study's "
                                              r"files left the spool on .* \(storage.retention_days\)"):
        replay(config, failed_jobs[0], "admin", "too late")


def test_earlier_versions_go_with_the_instance_and_only_the_studys_own_folders_are_removed(tmp_path: Path) -> None:
    config = _config(tmp_path)
    done, _, files = _study(config, "done", 31, JobState.DONE)
    alone, _, alone_files = _study(config, "done alone", 31, JobState.DONE)
    kept, _, kept_files = _study(config, "recent", 1, JobState.DONE)
    with session_scope(config.database.url) as s:
        uid = s.get_one(Study, done).study_instance_uid
    # An earlier version of the re-sent instance (same SOP, other content), named in no row;
    # and another SOP's file in the same study folder that no row names either.
    earlier = write_atomic(config.storage.path, instance_relpath(uid, "done", "cd" * 32), b"DICMearlier")
    stranger = write_atomic(config.storage.path, instance_relpath(uid, "another sop", "ef" * 32), b"DICMother")
    for f in (earlier, stranger):
        _aged(f, 31 * DAY)
    report = purge(config)
    assert len(report.studies) == 2 and report.files == 5 and not earlier.exists()
    assert stranger.exists()  # not the study's instance: left, and with it the study's folder
    assert not files[1].parent.exists() and not alone_files[0].parent.exists()  # their own folders, emptied, go
    # The shared levels above stay, empty or not: the listener may be creating a folder there now.
    assert alone_files[0].parent.parent.is_dir() and files[1].parent.parent.is_dir()
    assert all(f.exists() for f in kept_files)


def _write(config: Config, tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(f"storage: {{path: {config.storage.path}, min_free_mb: 0, retention_days: 30}}\n"
                    f"database: {{url: '{config.database.url}'}}\n")
    return path


@pytest.fixture(autouse=True)
def _built_not_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(inference, "enqueue_export", lambda *a, **k: None)  # no destination


def test_a_purged_study_sent_again_is_restored_and_a_replay_redoes_it_into_the_same_objects(
    tmp_path: Path, demo_bundle: Path
) -> None:
    config = _config(tmp_path, validation={"tools": []},  # the pydicom re-read: the bytes are what is compared
                     pipelines={"chest_xray": {"bundle": str(demo_bundle), "device": "cpu"}},
                     destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 11112}])
    first = queued_job(config, RG1)
    inference.run_inference(config, first, "test")
    with session_scope(config.database.url) as s:
        job = s.get_one(Job, first)
        job.state = JobState.DONE  # as its export would (nothing is sent here)
        before = {o.sop_instance_uid: resolve(config.storage.path, o.path).read_bytes() for o in job.outputs}
        source = resolve(config.storage.path, s.scalars(select(Instance.path)).one())
    assert len(before) == 4

    report = purge(config, now=utcnow() + timedelta(days=31))
    assert report.files == 5 and not source.exists() and not any((config.storage.path / "outputs").rglob("*.dcm"))
    with pytest.raises(TransitionError, match="result objects are no longer in the spool.*retention_days.*replay it"):
        resend(config, first, "admin", "again")
    with pytest.raises(TransitionError, match="source instances are no longer in the spool.*send the study again, then replay"):
        replay(config, first, "admin", "again")

    # Sent again: the duplicate's file is placed again. As any duplicate, it starts nothing; the
    # study counts as active again (retention waits its days again), and a replay can redo it.
    ingest(RG1.read_bytes(), IngestContext(config), "MODALITY")
    assert source.read_bytes() == RG1.read_bytes()
    with session_scope(config.database.url) as s:
        study = s.get_one(Job, first).study
        assert study.purged_at is None and study.state == StudyState.COMPLETE and study.instance_count == 1
    assert CompletionService(config, AssociationTracker()).tick(now=utcnow() + timedelta(hours=1)) == []
    assert purge(config, now=utcnow() + timedelta(days=29)).studies == []
    second = replay(config, first, "admin", "sent again")
    inference.run_inference(config, second, "test")
    with session_scope(config.database.url) as s:
        job = s.get_one(Job, second)
        assert job.state == JobState.ENCODED, job.error
        after = {o.sop_instance_uid: resolve(config.storage.path, o.path).read_bytes() for o in job.outputs}
        # The earlier objects' files are gone; their recorded digests show these are the same
        # bytes: same UIDs, no revision (the PACS receives nothing new).
        assert not s.scalars(select(Event).where(Event.kind == "revision")).all()
    assert after == before


def test_the_listeners_spool_thread_removes_staged_files_orphaned_while_it_runs(tmp_path: Path) -> None:
    """Without retention too: a staged file that an API or worker process left when it was
    killed is removed by the listener's next hourly pass, not only at the next start; one still
    being written to is left alone."""
    from node.spool import INCOMING

    config = _config(tmp_path, storage={"path": str(tmp_path / "spool"), "min_free_mb": 0})
    assert config.storage.retention_days is None
    incoming = config.storage.path / INCOMING
    incoming.mkdir(parents=True)
    at_start = incoming / ".before.part"
    at_start.write_bytes(b"\0" * 100)
    _aged(at_start, 2 * 3600)
    thread = RetentionThread(config)
    thread.PASS_SECONDS = 0.2  # an hour in the node
    thread.start()
    try:
        wait_for(lambda: not at_start.exists(), 10, "the first pass")
        orphan, live = incoming / ".killed.part", incoming / ".live.part"
        orphan.write_bytes(b"\0" * 100)
        _aged(orphan, 2 * 3600)  # after the first pass: only a later one can remove it
        live.write_bytes(b"\0" * 10)
        wait_for(lambda: not orphan.exists(), 10, "a later pass to remove the orphaned staged file")
        assert live.exists()
    finally:
        thread.stop(timeout=5)
    assert not thread.is_alive()


def test_the_listener_purges_in_its_own_thread_at_start_and_stops_with_it(tmp_path: Path) -> None:
    config = _config(tmp_path)
    done, _, files = _study(config, "done", 31, JobState.DONE)
    counted = {what: metrics._m()["purged"].labels(what=what)._value.get() for what in ("studies", "files", "bytes")}
    thread = RetentionThread(config)
    thread.start()
    try:
        wait_for(lambda: _purged(config, done), 10, "the first retention pass")
        assert not any(f.exists() for f in files)
    finally:
        thread.stop(timeout=5)
    assert not thread.is_alive()
    # pacsnode_spool_purged_total{what=...}
    assert {what: metrics._m()["purged"].labels(what=what)._value.get() - n for what, n in counted.items()} == \
        {"studies": 1, "files": 2, "bytes": 2 * len(b"DICMdone")}
