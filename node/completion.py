"""Study completion: decide when a study has fully arrived, then route it and create its jobs.

`completion_rule` is a pure function of the study's state and the clock; `CompletionService`
polls the database in the listener process and acts on what it returns.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from node import metrics
from node.background import BackgroundLoop
from node.config import Config
from node.db.models import Study, StudyState, utcnow
from node.db.session import session_scope
from node.handlers import AssociationTracker
from node.jobs import create_jobs_for_study, reconcile
from node.queue import enqueue_job

log = logging.getLogger(__name__)


class StudyClock(NamedTuple):
    """What decides a receiving study's completion (a tuple: thousands are built a pass)."""

    first_received_at: datetime
    last_received_at: datetime
    released_at: datetime | None
    association_open: bool
    instance_count: int
    expected_instances: int | None


def completion_rule(study: StudyClock, now: datetime, quiet_seconds: float, max_wait_seconds: float,
                    open_quiet_seconds: float | None = None) -> str | None:
    """Name of the rule that completes the study now, or None while it is still arriving.

    - "count": the sender announced how many instances the study has and all are here;
    - "quiet": the delivering association was released and nothing arrived for quiet_seconds;
    - "open_quiet": the association is still open (a router may hold one for hours) and nothing
      arrived for open_quiet_seconds (None: such a study waits for the release or the cap);
    - "max_wait": the hard cap since the first instance, whatever else is going on.
    """
    if study.expected_instances and study.instance_count >= study.expected_instances:
        return "count"
    if (now - study.first_received_at).total_seconds() >= max_wait_seconds:
        return "max_wait"
    if study.association_open:
        if open_quiet_seconds is not None and (now - study.last_received_at).total_seconds() >= open_quiet_seconds:
            return "open_quiet"
        return None
    since = max(study.last_received_at, study.released_at or study.last_received_at)
    if (now - since).total_seconds() >= quiet_seconds:
        return "quiet"
    return None


def due_at(study: StudyClock, quiet_seconds: float, max_wait_seconds: float,
           open_quiet_seconds: float | None = None) -> datetime:
    """When ``completion_rule`` fires for the study if nothing else arrives: the completion
    thread sleeps until then, not a whole poll period past it."""
    due = study.first_received_at + timedelta(seconds=max_wait_seconds)
    if study.association_open:
        if open_quiet_seconds is None:
            return due
        return min(due, study.last_received_at + timedelta(seconds=open_quiet_seconds))
    since = max(study.last_received_at, study.released_at or study.last_received_at)
    return min(due, since + timedelta(seconds=quiet_seconds))


#: The most of the listener's time the completion passes may take (see CompletionService._sleep).
PASS_SHARE = 0.1

_RECEIVING_CLOCKS = select(Study.id, Study.study_instance_uid, Study.first_received_at, Study.last_received_at,
                           Study.released_at, Study.instance_count, Study.expected_instances).where(
    Study.state == StudyState.RECEIVING)


def _clock(study: Any, open_studies: set[str]) -> StudyClock:
    """A receiving study's clock, from a Study or a row of _RECEIVING_CLOCKS (same attribute names)."""
    return StudyClock(
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        released_at=study.released_at,
        association_open=study.study_instance_uid in open_studies,
        instance_count=study.instance_count,
        expected_instances=study.expected_instances,
    )


class CompletionService(BackgroundLoop):
    """Background thread: completes studies, creates jobs, queues them, reconciles stuck jobs."""

    name = "completion"

    def __init__(self, config: Config, tracker: AssociationTracker) -> None:
        self.config = config
        self.tracker = tracker
        self._last_reconcile = 0.0
        self._asked: dict[str, float] = {}  # study UID -> monotonic time of the last C-FIND
        #: The earliest time a study still arriving completes unless more arrives (see due_at).
        self.next_due: datetime | None = None
        self.pass_seconds = 0.0  #: how long the last pass took
        super().__init__()

    def run_once(self) -> None:
        started = time.perf_counter()
        self.tick()
        self.pass_seconds = time.perf_counter() - started
        now = time.monotonic()
        if now - self._last_reconcile >= self.config.queue.reconcile_seconds:
            self._last_reconcile = now
            reconcile(self.config)

    def wait_seconds(self) -> float:
        return self._sleep()

    def _sleep(self) -> float:
        """Seconds until the next pass: a poll period, or less when a study falls due sooner (a
        study completes at its quiet time, not up to a poll period later: #12's turnaround), but
        never so soon that the passes take more than PASS_SHARE of the time."""
        wait = self.config.completion.poll_seconds
        if self.next_due is not None:
            wait = min(wait, (self.next_due - utcnow()).total_seconds())
        # At least 1 ms: a pass never spins, whatever the clocks say. And the passes take at most
        # PASS_SHARE of the time: they run in the listener's process, and with thousands of
        # studies arriving at once a pass costs tens of milliseconds that C-STORE would wait for.
        return max(wait, 0.001, self.pass_seconds * (1 / PASS_SHARE - 1))

    def tick(self, now: datetime | None = None) -> list[int]:
        """One pass: complete every study whose rule fires; return the ids of the jobs queued."""
        now = now or utcnow()
        cc = self.config.completion
        if cc.query_source is not None:
            self.ask_source()
        open_studies = self.tracker.open_studies()
        jobs: list[tuple[int, int]] = []
        dues: list[datetime] = []
        limits = (cc.quiet_seconds, cc.max_wait_seconds, cc.open_quiet_seconds)
        with session_scope(self.config.database.url) as s:
            # The clocks alone, as rows: this runs ten times a second in the listener's process,
            # and a long association can hold thousands of studies (as ORM objects, 2,000 cost
            # 45 ms a pass). A study due is then loaded whole and looked at again.
            due_now: list[int] = []
            for row in s.execute(_RECEIVING_CLOCKS):
                clock = _clock(row, open_studies)
                if completion_rule(clock, now, *limits) is not None:
                    due_now.append(row.id)
                else:
                    dues.append(due_at(clock, *limits))
        # One study a transaction: on SQLite a transaction holds the database's one write lock
        # from its first change to its commit, and C-STORE and the workers wait for it (#12):
        # thirty studies in one held it 320 ms, four ~10 ms, one ~3 ms (its routing and job rows
        # through the ORM), for ~0.5 ms more CPU a study (its own commit). Its jobs are queued
        # as it commits, so the first workers start sooner too.
        for study_id in due_now:
            done: list[tuple[int, int]] = []
            with session_scope(self.config.database.url) as s:
                study = s.get(Study, study_id)
                if study is None or study.state != StudyState.RECEIVING:
                    continue
                clock = _clock(study, open_studies)
                rule = completion_rule(clock, now, *limits)
                if rule is not None:
                    done = self._complete(s, study, rule, now)
                else:  # more arrived meanwhile (a database where each statement sees the latest commit)
                    dues.append(due_at(clock, *limits))
            # Sent only after the commit, so a worker always finds its job row.
            for job_id, priority in done:
                enqueue_job(self.config, job_id, priority)
            jobs += done
        self.next_due = min(dues, default=None)
        return [job_id for job_id, _ in jobs]

    def ask_source(self) -> None:
        """Learn the expected instance count of arriving studies from the source PACS (C-FIND).

        Runs outside any database transaction (the query may take up to its timeout); a count
        the sender put in the instances (Number of Study Related Instances) is kept as is.
        """

        from node.source_query import study_instance_count

        source = self.config.completion.query_source
        assert source is not None
        with session_scope(self.config.database.url) as s:
            waiting = s.scalars(select(Study.study_instance_uid).where(
                Study.state == StudyState.RECEIVING, Study.expected_instances.is_(None))).all()
        self._asked = {uid: t for uid, t in self._asked.items() if uid in waiting}
        for uid in waiting:
            if time.monotonic() - self._asked.get(uid, float("-inf")) < source.requery_seconds:
                continue
            self._asked[uid] = time.monotonic()
            count = study_instance_count(source, uid, self.config.listener.ae_title)
            if not count:
                continue
            with session_scope(self.config.database.url) as s:
                study = s.scalar(select(Study).where(Study.study_instance_uid == uid))
                if study is not None and study.expected_instances is None:
                    study.expected_instances = count
                    log.info("study %s: source %s reports %d instances", uid, source.ae_title, count)

    def _complete(self, s: Session, study: Study, rule: str, now: datetime) -> list[tuple[int, int]]:
        study.completed_at = now
        study.completion_rule = rule
        metrics.study_completed(rule)
        jobs = create_jobs_for_study(s, self.config, study)
        study.state = StudyState.COMPLETE if jobs or study.jobs else StudyState.SKIPPED
        s.flush()
        log.info("study %s complete by rule %s: %d job(s)", study.study_instance_uid, rule, len(jobs))
        return [(j.id, j.priority) for j in jobs]
