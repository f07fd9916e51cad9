"""Engine and sessions; one engine per process, created from the config's URL."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from node import metrics


@cache
def engine_for(url: str) -> Engine:
    """Create (once per URL and process) an engine; SQLite gets WAL and a busy timeout."""
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///") :]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": WRITER_WAIT_SECONDS, "check_same_thread": False,
                                                  "factory": WriterQueueConnection})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record) -> None:  # type: ignore[no-untyped-def]
            cur = conn.cursor()
            # WAL lets the listener write while workers read; FULL sync makes a commit durable.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, connect_args=_pg_args(url))


#: How long a write waits for the database (SQLite's busy timeout, and the writers' queue).
WRITER_WAIT_SECONDS = 30.0
_DML = ("INSERT", "UPDATE", "DELETE", "REPLACE")


class WriterQueueConnection(sqlite3.Connection):
    """A pysqlite connection whose write transactions first take an exclusive lock on a file
    beside the database (`<db>.writers`), released at commit or rollback.

    SQLite has one write lock, and a writer that finds it taken sleeps in SQLite's busy handler
    1, 2, 5, 10 ... 100 ms between tries (328 ms after twelve): with the listener, two workers
    and the export writing, writes waited up to 330 ms for a lock that each transaction held
    for a few (#12). The file lock is tried at least every millisecond, so a waiting writer
    takes over within a millisecond of the last one's commit. SQLite's lock and busy timeout
    still decide; this only lines up the node's writers. A write that waits here longer than
    WRITER_WAIT_SECONDS goes on to SQLite's wait without it. A writer never waits here while
    its own transaction is open (only its first write waits), so two cannot hold each other up.
    """

    def __init__(self, database: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(database, *args, **kwargs)
        name = os.fsdecode(database)
        self._queue = None if name in ("", ":memory:") or name.startswith("file:") else f"{name}.writers"
        self._fd: int | None = None

    def cursor(self, factory: Any = None) -> sqlite3.Cursor:  # type: ignore[override]  # as sqlite3.Connection
        return super().cursor(factory or _QueuedCursor)

    def queue_for_write(self) -> None:
        """Before a statement that opens a write transaction: wait for this node's other writers."""
        if self._queue is None or self._fd is not None or self.in_transaction:
            return
        try:  # read access is enough for flock: a process of another user sharing the database may lock it too
            fd = os.open(self._queue, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:  # cannot be made or opened here: SQLite's own wait, as without the queue
            return
        start, nap = time.monotonic(), 0.0001
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._fd = fd
                    return
                except BlockingIOError:
                    if time.monotonic() - start > WRITER_WAIT_SECONDS:  # SQLite's busy timeout decides from here
                        os.close(fd)
                        return
                    time.sleep(nap)
                    nap = min(nap * 2, 0.001)
        finally:
            metrics.database_write_wait(time.monotonic() - start)

    def _dequeue(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._dequeue()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._dequeue()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._dequeue()


class _QueuedCursor(sqlite3.Cursor):
    """Queues its connection before a statement that pysqlite opens a write transaction for."""

    def _queue(self, sql: str) -> None:
        if sql.lstrip()[:7].upper().startswith(_DML):
            self.connection.queue_for_write()  # type: ignore[attr-defined]  # a WriterQueueConnection's

    def execute(self, sql: str, parameters: Any = (), /) -> _QueuedCursor:
        self._queue(sql)
        return super().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> _QueuedCursor:
        self._queue(sql)
        return super().executemany(sql, seq_of_parameters)


def _pg_args(url: str) -> dict[str, object]:
    if url.startswith("postgresql"):
        return {"connect_timeout": 10}
    return {}


@cache
def _factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(engine_for(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = _factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
