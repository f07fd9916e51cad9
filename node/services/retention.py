"""Spool retention: a settled study's files leave the spool after `storage.retention_days`.

Without it the spool only grows, and once the disk reaches `storage.min_free_mb` every C-STORE
is refused. A study is purged when nothing has happened to it for that many days (no instance
received, no job changed) and nothing about it is pending: no job queued, running or sending,
and no failed job left unreplayed (a failure waits for an admin; `pacsnode purge
--include-failed` purges those too). Its received instances and its jobs' result objects are
deleted from the spool; every row stays (the study page, its findings, the audit) and
`study.purged_at` says when. Nothing is ever deleted on the PACS. A study sent again after its
purge gets its instances' files back (node/handlers.py); as for any duplicate nothing starts by
itself, and a replay then redoes it.

Files written since the cutoff are never deleted, whatever the rows say: an instance received
again while its study is being purged stays (a purge and the listener never race for a file).

Also here, and always on: `remove_orphaned_staging`, which the listener and each worker run as
they start, removes staged files left in the spool's `incoming/` by a process killed while it
received a data set or wrote a result (nothing in them was acknowledged or recorded).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, exists, not_, or_, select, update
from sqlalchemy.orm import Session, aliased

from node import metrics
from node.background import BackgroundLoop
from node.config import Config
from node.db.models import (
    ACTIVE_JOB_STATES,
    Event,
    Instance,
    Job,
    JobState,
    Output,
    Series,
    Study,
    StudyState,
    utcnow,
)
from node.db.session import session_scope
from node.spool import SpoolError, resolve, sweep_incoming, versions_of

log = logging.getLogger(__name__)

#: Studies looked up per query; each is then purged in its own transaction, so a pass never
#: holds the database long.
BATCH = 100


@dataclass
class PurgeReport:
    """What a purge removed (or, dry run, would remove)."""

    cutoff: datetime
    dry_run: bool
    studies: list[str] = field(default_factory=list)  # Study Instance UIDs
    files: int = 0
    bytes: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"cutoff": self.cutoff.isoformat(), "dry_run": self.dry_run, "studies": self.studies,
                "files": self.files, "bytes": self.bytes}


def settled(cutoff: datetime, include_failed: bool = False) -> ColumnElement[bool]:
    """SQL condition: the study has its files, had no activity since cutoff and nothing pending."""
    replay = aliased(Job)
    busy = or_(Job.state.in_(ACTIVE_JOB_STATES), Job.updated_at >= cutoff)
    if not include_failed:
        # A failed job nobody replayed yet: its study waits for the admin.
        busy = or_(busy, and_(Job.state == JobState.FAILED, not_(exists().where(replay.replay_of == Job.id))))
    return and_(Study.purged_at.is_(None), Study.state != StudyState.RECEIVING, Study.last_received_at < cutoff,
                not_(exists().where(Job.study_id == Study.id, busy)))


def purge(config: Config, *, days: float | None = None, dry_run: bool = False, include_failed: bool = False,
          now: datetime | None = None, actor: str = "retention") -> PurgeReport:
    """Remove the files of every settled study older than `days` (default storage.retention_days);
    each study is marked purged and audited (kind "purge") in the transaction that removes its files."""
    days = days if days is not None else config.storage.retention_days
    if days is None:
        raise ValueError("storage.retention_days is not set: give the number of days")
    cutoff = (now or utcnow()) - timedelta(days=days)
    report = PurgeReport(cutoff, dry_run)
    last_id = 0
    while True:
        with session_scope(config.database.url) as s:
            ids = list(s.scalars(select(Study.id).where(Study.id > last_id, settled(cutoff, include_failed))
                                 .order_by(Study.id).limit(BATCH)))
        if not ids:
            return report
        last_id = ids[-1]
        for study_id in ids:
            _purge_study(config, study_id, cutoff, include_failed, report, actor)


def _purge_study(config: Config, study_id: int, cutoff: datetime, include_failed: bool, report: PurgeReport,
                 actor: str) -> None:
    with session_scope(config.database.url) as s:
        # Claimed first, still settled: the listener's write for a late instance now waits for
        # this transaction (SQLite) or its row lock (PostgreSQL); if one came first, it is skipped.
        if not report.dry_run:
            claimed = s.execute(update(Study).where(Study.id == study_id, settled(cutoff, include_failed))
                                .values(purged_at=utcnow()).execution_options(synchronize_session=False))
            if claimed.rowcount != 1:  # type: ignore[attr-defined]
                return
        study = s.get_one(Study, study_id)
        uid = study.study_instance_uid
        files, size = 0, 0
        paths = _files(config, s, study)
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue  # already gone (an earlier pass that did not commit)
            if st.st_mtime >= cutoff.timestamp():
                continue  # written since the cutoff: received again meanwhile, it stays
            if not report.dry_run:
                path.unlink(missing_ok=True)
            files, size = files + 1, size + st.st_size
        if not report.dry_run:
            _remove_folders({p.parent for p in paths})
            s.add(Event(kind="purge", actor=actor,
                        detail=f"study {uid}: {files} files ({size} bytes) removed from the spool"))
    report.studies.append(uid)
    report.files, report.bytes = report.files + files, report.bytes + size
    if not report.dry_run:  # committed
        log.info("purged study %s: %d files (%d bytes) removed from the spool", uid, files, size)
        metrics.spool_purged(1, files, size)


def _files(config: Config, s: Session, study: Study) -> list[Path]:
    """The study's files in the spool: its instances (every version kept of a re-sent one) and
    its jobs' result objects."""
    root = config.storage.path
    instances = s.scalars(select(Instance.path).join(Series).where(Series.study_id == study.id)).all()
    outputs = s.scalars(select(Output.path).join(Job).where(Job.study_id == study.id)).all()
    found: set[Path] = set()
    for rel in instances:
        try:
            found.update(versions_of(root, rel))
        except SpoolError:
            _outside(study, rel)
    for rel in outputs:
        try:
            found.add(resolve(root, rel))
        except SpoolError:
            _outside(study, rel)
    return sorted(found)


def _outside(study: Study, relpath: str) -> None:
    log.warning("study %s: %r is not under the spool; left alone", study.study_instance_uid, relpath)


def _remove_folders(folders: set[Path]) -> None:
    """Remove the study's and its jobs' own folders once empty. The shared levels above them
    (instances/ab/, outputs/0001/) stay: the listener may be creating a folder in one right now."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # not empty (a file received again meanwhile), or gone
            pass


class RetentionThread(BackgroundLoop):
    """The listener's spool housekeeping: one pass at start, then every `PASS_SECONDS`, each in
    this thread (a first pass over months of studies must not hold up study completion). Each
    removes the staged files orphaned since (an API or worker process stopped while writing one
    and none has started since) and, where storage.retention_days is set, purges settled studies."""

    name = "retention"
    PASS_SECONDS = 3600.0

    def __init__(self, config: Config) -> None:
        self.config = config
        super().__init__()

    def run_once(self) -> None:
        remove_orphaned_staging(self.config)
        if self.config.storage.retention_days is None:
            return
        report = purge(self.config)
        if report.studies:
            log.info("retention: %d studies, %d files, %d bytes removed from the spool (last activity before %s)",
                     len(report.studies), report.files, report.bytes, report.cutoff.isoformat())

    def wait_seconds(self) -> float:
        return self.PASS_SECONDS


#: A staged file untouched this long (or twice the listener's network timeout, if longer) is an orphan.
STALE_STAGING_SECONDS = 3600


def remove_orphaned_staging(config: Config) -> int:
    """Remove the spool's staged files nobody has written to for STALE_STAGING_SECONDS (a transfer
    in progress writes at least once per network timeout, or its association is aborted and its
    file discarded); log and return how many."""
    idle = max(STALE_STAGING_SECONDS, 2 * config.listener.timeouts.network)
    stale = sweep_incoming(config.storage.path, idle)
    if stale:
        log.warning("removed %d staged file(s) not written to for %.0f s (left by a process that stopped "
                    "while receiving or writing: none was acknowledged or recorded)", stale, idle)
    return stale
