"""The embedded broker: messages wake a waiting consumer as they are written (node/fswatch.py)."""

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from kombu import Connection, Exchange, Queue

from node.config import Config
from node.fswatch import FolderWatch
from node.queue import broker_settings, requeue_orphaned_messages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")


def _later(seconds: float, action) -> threading.Thread:
    thread = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    thread.start()
    return thread


@linux
def test_a_file_renamed_into_the_folder_wakes_the_wait(tmp_path: Path) -> None:
    (tmp_path / ".partial").write_bytes(b"x")  # written before the watch: it wakes nothing
    watch = FolderWatch(str(tmp_path))
    assert watch.active
    assert watch.wait(0.05) is False  # nothing landed: the timeout
    thread = _later(0.2, lambda: os.replace(tmp_path / ".partial", tmp_path / "1.msg"))
    t0 = time.monotonic()
    assert watch.wait(5) is True
    assert 0.15 < time.monotonic() - t0 < 2
    thread.join()
    (tmp_path / "2.msg").write_bytes(b"y")  # landed before the wait began: not lost
    assert watch.wait(0) is True
    assert watch.wait(0.05) is False  # and each file wakes it once
    watch.close()


def test_without_inotify_the_wait_is_a_sleep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("node.fswatch._libc", lambda: None)
    watch = FolderWatch(str(tmp_path))
    assert not watch.active
    t0 = time.monotonic()
    assert watch.wait(0.1) is False
    assert time.monotonic() - t0 >= 0.1


@linux
def test_an_idle_consumer_takes_a_message_as_it_is_queued(tmp_path: Path) -> None:
    """An idle embedded consumer looks for messages once a second; one sent meanwhile is
    delivered at once, not at the next look."""
    config = Config.model_validate({"storage": {"path": str(tmp_path)}})
    settings = broker_settings(config)
    # kombu's own loop would sleep this long between looks: only the watched folder can wake it sooner
    options = {**settings["broker_transport_options"], "polling_interval": 5.0}
    queue = Queue("inference", Exchange("inference"), routing_key="inference")
    got: list[float] = []
    with Connection(str(settings["broker_url"]), transport_options=options) as conn:
        consumer = conn.Consumer(queue, callbacks=[lambda body, message: (got.append(time.monotonic()), message.ack())])
        consumer.consume()
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.1)  # nothing queued: the wait times out
        sent: list[float] = []

        def send() -> None:
            with Connection(str(settings["broker_url"]), transport_options=options) as other:
                other.Producer().publish({"job": 1}, exchange=queue.exchange, routing_key="inference", declare=[queue])
            sent.append(time.monotonic())

        thread = _later(0.3, send)
        conn.drain_events(timeout=5)
        thread.join()
        assert conn.transport._watch.active
    assert len(got) == 1
    assert got[0] - sent[0] < 0.2  # woken by the message, not at the next look (1 s, or 5 s polling)


def test_a_second_spool_in_one_process_gets_its_messages(tmp_path: Path) -> None:
    """kombu shares one binding table among a process's filesystem connections; ours keeps one
    per control folder, so a queue bound for one spool is bound again (on disk) for the next."""
    queue = Queue("inference", Exchange("inference"), routing_key="inference")
    for spool in ("first", "second"):
        settings = broker_settings(Config.model_validate({"storage": {"path": str(tmp_path / spool)}}))
        with Connection(str(settings["broker_url"]), transport_options=settings["broker_transport_options"]) as conn:
            conn.Producer().publish({"spool": spool}, exchange=queue.exchange, routing_key="inference", declare=[queue])
            got: list[object] = []
            with conn.Consumer(queue, callbacks=[lambda body, message, got=got: (got.append(body), message.ack())]):
                conn.drain_events(timeout=5)
        assert got == [{"spool": spool}]


def test_the_embedded_broker_connects_without_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every worker's start used to log kombu's "No hostname was supplied" WARNING for the
    embedded broker's URL, a warning an admin could do nothing about."""
    settings = broker_settings(Config.model_validate({"storage": {"path": str(tmp_path)}}))
    with caplog.at_level("WARNING"), Connection(str(settings["broker_url"]),
                                                transport_options=settings["broker_transport_options"]) as conn:
        conn.ensure_connection(max_retries=1)
        conn.info()  # what Celery's start-up banner reads
    assert not [r for r in caplog.records if r.name.startswith("kombu")], caplog.text


def test_consumers_take_each_message_once_inside_the_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """kombu's filesystem consumer moved each message into the system's temp folder: outside the
    spool, and across filesystems a copy and a delete that two consumers could both make. Ours
    renames it within the spool: four consumers racing for 40 messages get each exactly once."""
    import tempfile

    # a system temp folder that cannot be written: kombu's consumer took nothing from its queue
    system_tmp = tmp_path / "missing" / "tmp"
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    settings = broker_settings(Config.model_validate({"storage": {"path": str(tmp_path / "spool")}}))
    url, options = str(settings["broker_url"]), settings["broker_transport_options"]
    queue = Queue("inference", Exchange("inference"), routing_key="inference")
    with Connection(url, transport_options=options) as conn:
        for i in range(40):
            conn.Producer().publish({"job": i}, exchange=queue.exchange, routing_key="inference", declare=[queue])
    got: list[int] = []
    lock = threading.Lock()

    def consume() -> None:
        with Connection(url, transport_options=options) as conn:
            def take(body: dict, message) -> None:  # noqa: ANN001  (kombu's Message)
                with lock:
                    got.append(body["job"])
                message.ack()

            with conn.Consumer(queue, callbacks=[take]):
                while True:
                    try:
                        conn.drain_events(timeout=0.5)
                    except TimeoutError:
                        return

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(got) == list(range(40))
    assert not system_tmp.parent.exists()
    assert list((tmp_path / "spool" / "queue" / "processed").iterdir()) == []


def _publish(settings: dict, jobs: range) -> Queue:
    queue = Queue("inference", Exchange("inference"), routing_key="inference")
    with Connection(str(settings["broker_url"]), transport_options=settings["broker_transport_options"]) as conn:
        for job in jobs:
            conn.Producer().publish({"job": job}, exchange=queue.exchange, routing_key="inference", declare=[queue])
    return queue


def _drain(settings: dict, queue: Queue) -> list[int]:
    got: list[int] = []
    with Connection(str(settings["broker_url"]), transport_options=settings["broker_transport_options"]) as conn:
        with conn.Consumer(queue, callbacks=[lambda body, message: (got.append(body["job"]), message.ack())]):
            while True:
                try:
                    conn.drain_events(timeout=0.5)
                except TimeoutError:
                    return got


def test_a_message_a_stopped_worker_took_but_never_read_is_put_back(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """A consumer that dies between taking a message (its rename into processed/) and reading it
    left it there for good; a worker's start puts back what has waited there too long, and
    removes message files a producer left half-written. Recent ones are left alone."""
    config = Config.model_validate({"storage": {"path": str(tmp_path)}})
    settings = broker_settings(config)
    queue = _publish(settings, range(3))
    messages, processed = tmp_path / "queue" / "messages", tmp_path / "queue" / "processed"
    taken = sorted(messages.glob("*.msg"))[1]
    taken.rename(processed / taken.name)  # what _get does before it reads; then the worker died
    (messages / ".stale.partial").write_bytes(b'{"half')
    old = time.time() - 120
    os.utime(messages / ".stale.partial", (old, old))
    (messages / ".fresh.partial").write_bytes(b'{"being written')

    with caplog.at_level("WARNING", logger="node.queue"):
        assert requeue_orphaned_messages(config) == 0  # taken a moment ago: a living consumer's
    assert "0 message(s) a stopped worker had taken but not read put back, 1 half-written" in caplog.text
    assert (processed / taken.name).exists()
    assert [p.name for p in messages.glob(".*.partial")] == [".fresh.partial"]
    time.sleep(0.05)
    assert requeue_orphaned_messages(config, older_than=0.01) == 1
    assert list(processed.iterdir()) == []
    assert list(messages.glob(".*.partial")) == []
    assert sorted(_drain(settings, queue)) == [0, 1, 2]  # each once


def test_a_message_put_back_while_a_consumer_takes_it_is_delivered_later(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The put-back can meet a consumer that is only slow: the consumer then finds no file to
    read and moves on; the message is delivered once, from where it was put back."""
    import node.queue

    settings = broker_settings(Config.model_validate({"storage": {"path": str(tmp_path)}}))
    queue = _publish(settings, range(2))
    rename = os.rename
    raced: list[str] = []

    def rename_then_put_back(src: str, dst: str) -> None:
        rename(src, dst)
        if not raced and Path(dst).parent.name == "processed":
            raced.append(Path(dst).name)  # the first take only: put back between rename and read
            rename(dst, src)

    monkeypatch.setattr(node.queue.os, "rename", rename_then_put_back)
    assert sorted(_drain(settings, queue)) == [0, 1]  # each once
    assert raced
