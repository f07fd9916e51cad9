"""The SQLite writer queue: a write transaction holds `<db>.writers` from its first change to its
commit or rollback; reads never take it (node.db.session.WriterQueueConnection)."""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from node import metrics
from node.db.session import engine_for


@contextmanager
def _probe(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        yield fd
    finally:
        os.close(fd)


def _held(queue: Path) -> bool:
    """Whether some connection holds the queue now (another open of the file cannot lock it)."""
    with _probe(queue) as fd:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False


@pytest.fixture
def db(tmp_path: Path) -> tuple[str, Path]:
    path = tmp_path / "node.db"
    url = f"sqlite:///{path}"
    with engine_for(url).begin() as c:
        c.execute(text("CREATE TABLE t (a INTEGER)"))
    return url, Path(f"{path}.writers")


def test_a_write_holds_the_queue_until_its_commit(db: tuple[str, Path]) -> None:
    url, queue = db
    with engine_for(url).connect() as c:
        c.execute(text("SELECT count(*) FROM t")).scalar()
        assert not _held(queue), "a read took the writers' queue"
        c.execute(text("INSERT INTO t VALUES (1)"))
        assert _held(queue)
        c.execute(text("UPDATE t SET a = 2"))  # the same transaction: no second wait
        assert _held(queue)
        c.commit()
        assert not _held(queue)
    with engine_for(url).connect() as c:
        assert c.execute(text("SELECT a FROM t")).scalar() == 2


def test_a_rollback_or_a_closed_connection_lets_the_next_writer_in(db: tuple[str, Path]) -> None:
    url, queue = db
    with engine_for(url).connect() as c:
        c.execute(text("INSERT INTO t VALUES (1)"))
        c.rollback()
        assert not _held(queue)
    raw = engine_for(url).raw_connection()
    cur = raw.cursor()
    cur.execute("INSERT INTO t VALUES (3)")
    assert _held(queue)
    raw.invalidate()  # closes the DBAPI connection mid-transaction
    assert not _held(queue)
    with engine_for(url).connect() as c:
        assert c.execute(text("SELECT count(*) FROM t")).scalar() == 0


def _waited_seconds() -> float:
    """pacsnode_database_write_wait_seconds' sum in this process."""
    [family] = metrics._m()["db_wait"].collect()
    return next(s.value for s in family.samples if s.name.endswith("_sum"))


def test_a_writer_waits_in_the_queue_not_in_sqlite(db: tuple[str, Path]) -> None:
    """While one connection holds the queue, another's write has not even begun its SQLite
    transaction (without the queue it would have, and would sleep in SQLite's busy handler).
    Its wait is counted in pacsnode_database_write_wait_seconds."""
    url, queue = db
    waited = _waited_seconds()
    first, second = engine_for(url).raw_connection(), engine_for(url).raw_connection()
    first.cursor().execute("INSERT INTO t VALUES (1)")
    started, errors = threading.Event(), []

    def write() -> None:
        try:
            started.set()
            second.cursor().execute("INSERT INTO t VALUES (2)")
            second.commit()
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    assert started.wait(10)
    t.join(0.3)
    assert t.is_alive(), "the second write did not wait for the first"
    assert not second.driver_connection.in_transaction  # type: ignore[union-attr]
    first.commit()
    t.join(10)
    assert not t.is_alive() and not errors
    assert not _held(queue)
    # held >= 0.3 s after `started`; the writer's clock starts a moment later (its own
    # statement's start-up), so the count is a little under that on a loaded machine (0.2999 in CI)
    assert _waited_seconds() - waited >= 0.25
    first.close()
    second.close()
    with engine_for(url).connect() as c:
        assert sorted(c.execute(text("SELECT a FROM t")).scalars()) == [1, 2]


def test_an_in_memory_database_has_no_queue_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with engine_for("sqlite:///:memory:").begin() as c:
        c.execute(text("CREATE TABLE t (a INTEGER)"))
        c.execute(text("INSERT INTO t VALUES (1)"))
    assert list(tmp_path.iterdir()) == []


def test_a_queue_file_that_cannot_be_opened_leaves_the_write_to_sqlite(db: tuple[str, Path]) -> None:
    """Another user's folder, a broken link: the write goes ahead under SQLite's own wait."""
    url, queue = db
    queue.symlink_to(queue.parent / "missing" / "writers")
    with engine_for(url).begin() as c:
        c.execute(text("INSERT INTO t VALUES (1)"))
    with engine_for(url).connect() as c:
        assert c.execute(text("SELECT count(*) FROM t")).scalar() == 1
