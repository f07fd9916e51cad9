"""Completion rules and routing decisions: pure functions, checked exhaustively."""

from datetime import UTC, datetime, timedelta

import pytest

from node.completion import CompletionService, StudyClock, completion_rule, due_at
from node.config import Config, RoutingConfig
from node.db.models import utcnow
from node.handlers import AssociationTracker
from node.routing import SeriesAttributes, route

T0 = datetime(2026, 1, 1, tzinfo=UTC)
CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"


def clock(last: float = 0, released: float | None = 0, open_: bool = False, count: int = 1,
          expected: int | None = None) -> StudyClock:
    return StudyClock(T0, T0 + timedelta(seconds=last),
                      None if released is None else T0 + timedelta(seconds=released), open_, count, expected)


@pytest.mark.parametrize(
    ("study", "now", "rule"),
    [
        (clock(released=1), 2.9, None),  # quiet time counts from the release
        (clock(released=1), 3.0, "quiet"),
        (clock(released=None), 2.0, "quiet"),  # release unknown (e.g. restart): from the last instance
        (clock(open_=True), 100, None),  # association still open
        (clock(open_=True), 600, "max_wait"),
        (clock(open_=True, count=3, expected=3), 0.1, "count"),
        (clock(open_=True, count=2, expected=3), 0.1, None),
    ],
)
def test_completion_rule(study: StudyClock, now: float, rule: str | None) -> None:
    assert completion_rule(study, T0 + timedelta(seconds=now), quiet_seconds=2, max_wait_seconds=600) == rule


@pytest.mark.parametrize(
    "study",
    [clock(released=1), clock(last=5, released=1), clock(released=None, last=3), clock(open_=True),
     clock(open_=True, count=2, expected=3), clock(released=590)],
)
def test_a_study_falls_due_when_its_rule_fires(study: StudyClock) -> None:
    """The completion thread sleeps until due_at: the rule must fire then, and not a moment before."""
    due = due_at(study, quiet_seconds=2, max_wait_seconds=600)
    assert completion_rule(study, due, quiet_seconds=2, max_wait_seconds=600) is not None
    assert completion_rule(study, due - timedelta(microseconds=1), quiet_seconds=2, max_wait_seconds=600) is None


@pytest.mark.parametrize(("open_quiet", "last", "now", "rule"), [
    (60, 0, 59.9, None),
    (60, 0, 60, "open_quiet"),  # a router holding its association: nothing new for a minute
    (60, 30, 89.9, None),  # counted from the last instance
    (None, 0, 599, None),  # switched off: the release or the cap
])
def test_a_study_completes_when_quiet_while_its_association_stays_open(
        open_quiet: float | None, last: float, now: float, rule: str | None) -> None:
    study = clock(last=last, released=None, open_=True)
    assert completion_rule(study, T0 + timedelta(seconds=now), 2, 600, open_quiet) == rule
    due = due_at(study, 2, 600, open_quiet)
    assert due == T0 + timedelta(seconds=600 if open_quiet is None else last + open_quiet)
    assert completion_rule(study, due, 2, 600, open_quiet) is not None


def test_the_completion_thread_sleeps_until_the_next_study_is_due(tmp_path) -> None:
    service = CompletionService(Config.model_validate({"storage": {"path": str(tmp_path)},
                                                       "completion": {"poll_seconds": 5}}), AssociationTracker())
    assert service._sleep() == 5  # nothing arriving: a poll period
    service.next_due = utcnow() + timedelta(seconds=0.5)
    assert 0.3 < service._sleep() <= 0.5
    service.next_due = utcnow() - timedelta(seconds=1)
    assert service._sleep() == 0.001  # overdue: the next pass at once, never a spin
    service.pass_seconds = 0.05  # thousands of studies arriving: passes take a tenth of the time at most
    assert service._sleep() == pytest.approx(0.45)
    service.next_due = None
    assert service._sleep() == 5


def test_a_pass_builds_objects_only_for_the_studies_due(tmp_path) -> None:
    """Studies still arriving are looked at as rows: a pass runs ten times a second in the
    listener, and a backlog in one association holds thousands of them."""
    from sqlalchemy import event

    from node.cli import db_upgrade
    from node.db.models import Study, StudyState
    from node.db.session import session_scope

    config = Config.model_validate({"storage": {"path": str(tmp_path / "spool")},
                                    "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
                                    "completion": {"quiet_seconds": 2, "max_wait_seconds": 600}})
    db_upgrade(config)
    now = utcnow()
    tracker = AssociationTracker()
    with session_scope(config.database.url) as s:
        for i in range(20):  # still open, or released a moment ago: not due
            s.add(Study(study_instance_uid=f"1.2.{i}", state=StudyState.RECEIVING, instance_count=1,
                        first_received_at=now, last_received_at=now, released_at=now if i % 2 else None))
            if not i % 2:
                tracker.add(1, f"1.2.{i}")
        s.add(Study(study_instance_uid="1.3", state=StudyState.RECEIVING, instance_count=2, expected_instances=2,
                    first_received_at=now, last_received_at=now))  # all its instances are here
    loaded: list[str] = []

    def on_load(study: Study, _context: object) -> None:
        loaded.append(study.study_instance_uid)

    event.listen(Study, "load", on_load)
    try:
        CompletionService(config, tracker).tick(now)
    finally:
        event.remove(Study, "load", on_load)
    assert loaded == ["1.3"]
    with session_scope(config.database.url) as s:
        states = {st.study_instance_uid: st.state for st in s.query(Study)}
    assert states.pop("1.3") == StudyState.SKIPPED  # complete by count (no series rows here, so no job)
    assert set(states.values()) == {StudyState.RECEIVING}


def test_each_study_commits_and_queues_its_jobs_on_its_own(tmp_path, monkeypatch) -> None:
    """On SQLite a transaction holds the one write lock from its first change to its commit: a
    pass commits every study apart (four a transaction held it ~10 ms, one ~3 ms) and queues
    its jobs as soon as they are committed, before it looks at the next study."""
    from io import BytesIO

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from sqlalchemy import func, select, update

    from node import completion
    from node.cli import db_upgrade
    from node.db.models import Job, Study, StudyState
    from node.db.session import session_scope
    from node.handlers import IngestContext, ingest

    config = Config.model_validate({"listener": {"allowed_callers": "any"},
                                    "storage": {"path": str(tmp_path / "spool"), "min_free_mb": 1},
                                    "database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"},
                                    "completion": {"quiet_seconds": 2, "max_wait_seconds": 600}})
    db_upgrade(config)
    ctx = IngestContext(config)
    ds = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    for _ in range(3):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        ingest(buf.getvalue(), ctx, "SCU")
    with session_scope(config.database.url) as s:
        s.execute(update(Study).values(last_received_at=utcnow() - timedelta(seconds=10)))
    seen: list[tuple[int, int]] = []  # at each job queued: (studies complete, jobs) as committed

    def enqueue(_config: Config, job_id: int, priority: int) -> None:
        with session_scope(config.database.url) as s:
            seen.append((s.scalar(select(func.count()).where(Study.state == StudyState.COMPLETE)) or 0,
                         s.scalar(select(func.count()).select_from(Job)) or 0))

    monkeypatch.setattr(completion, "enqueue_job", enqueue)
    jobs = CompletionService(config, ctx.tracker).tick()
    assert len(jobs) == 3
    assert seen == [(1, 1), (2, 2), (3, 3)]


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        (SeriesAttributes(CR, "CR", "CHEST", "PA"), None),
        (SeriesAttributes(DX, "DX", None, None), None),
        (SeriesAttributes(CR, "CR", "CHEST", "LL"), "ViewPosition LL is not frontal"),
        (SeriesAttributes(CR, "CR", "KNEE", "AP"), "BodyPartExamined KNEE"),
        (SeriesAttributes(CT, "CT", None, None), "modality CT"),
        (SeriesAttributes(SC, "OT", "CHEST", None), None),
        (SeriesAttributes(SC, "OT", None, None), "secondary capture without BodyPartExamined CHEST"),
        (SeriesAttributes(CR, "MG", None, None), "modality MG is not CR or DX"),
    ],
)
def test_route(attrs: SeriesAttributes, reason: str | None) -> None:
    d = route(attrs, RoutingConfig(), ("chest_xray",))
    if reason is None:
        assert d.pipelines == ("chest_xray",)
    else:
        assert d.skipped and reason in d.reason


def test_route_with_no_pipeline_enabled_skips() -> None:
    assert route(SeriesAttributes(CR, "CR", None, None), RoutingConfig(), ()).reason == "no pipeline is enabled"
