"""The Celery app and the only place that puts work on the queue.

Tasks take a job id (JSON), never pixels or paths of another machine. Embedded mode uses
kombu's filesystem transport inside the spool, so a first run needs no Redis; production sets
`queue.broker_url: redis://...` and the same code runs there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from queue import Empty
from typing import Any, ClassVar, cast

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.transport import TRANSPORT_ALIASES, filesystem
from kombu.transport.virtual import BrokerState
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads
from kombu.utils.scheduling import FairCycle

from node.config import DEFAULT_PRIORITY, Config
from node.fswatch import FolderWatch

log = logging.getLogger(__name__)

INFERENCE_QUEUE = "inference"
EXPORT_QUEUE = "export"
RUN_JOB = "pacsnode.run_job"
EXPORT_JOB = "pacsnode.export_job"

app = Celery("pacsnode", include=["node.tasks"])
_configured: str | None = None
_lock = threading.Lock()


class _WholeMessageChannel(filesystem.Channel):
    """kombu's filesystem channel writes a message under its final name, and a consumer polling
    the folder can move and read it before its bytes are there: the empty read raises
    JSONDecodeError, which stops the worker ("Unrecoverable error"). Seen once in an end-to-end
    run at a 10 ms polling interval. Written beside it and renamed, a message appears whole."""

    def _put(self, queue: Any, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]  # as kombu.transport.filesystem.Channel
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        partial = os.path.join(self.data_folder_out, f".{uuid.uuid4()}.partial")  # no queue's name
        with open(partial, "wb") as f:
            f.write(str_to_bytes(dumps(payload)))
        os.replace(partial, os.path.join(self.data_folder_out, name))

    def _get(self, queue: Any, timeout: Any = None) -> Any:  # as kombu.transport.filesystem.Channel
        """kombu's, except where a message is taken to: kombu moves it into the system's temp
        folder (unless it keeps processed messages), which is outside the spool and, on another
        filesystem, a copy and a delete that two workers can both make of one message. A rename
        within the spool is atomic: one consumer takes each message."""
        for name in sorted(os.listdir(self.data_folder_in)):
            if name.partition(".")[2] != f"{queue}.msg":  # kombu's test: another queue's message
                continue
            taken = os.path.join(self.processed_folder, name)
            try:
                os.rename(os.path.join(self.data_folder_in, name), taken)
            except OSError:  # another consumer took it first
                continue
            try:
                with open(taken, "rb") as f:
                    payload = f.read()
            except FileNotFoundError:  # put back meanwhile (requeue_orphaned_messages): taken again later
                continue
            except OSError as e:
                raise ChannelError(f"Cannot read file {taken!r} from queue.") from e
            try:
                os.remove(taken)
            except FileNotFoundError:  # put back after this read: delivered twice, which a job's claim absorbs
                pass
            except OSError as e:
                raise ChannelError(f"Cannot remove file {taken!r} from queue.") from e
            return loads(bytes_to_str(payload))
        raise Empty()


#: A message still in `processed/` this long after it was taken there (the rename sets its
#: change time) belongs to a consumer that died before reading it: a living one reads it at once.
#: A `.partial` message file this old was left by a producer that died while writing it.
ORPHANED_MESSAGE_SECONDS = 60.0


def requeue_orphaned_messages(config: Config, older_than: float = ORPHANED_MESSAGE_SECONDS) -> int:
    """Embedded broker, at a worker's start: put back the messages a consumer took but never read
    (it died between taking and reading one), and remove half-written ones; return how many were
    put back. The reconciler would queue such a job again anyway, later; a job delivered twice
    runs once (its claim). Production's broker (Redis) re-delivers by itself."""
    if not config.embedded_queue:
        return 0
    folder = config.storage.path / "queue"
    messages, processed = folder / "messages", folder / "processed"
    limit = time.time() - older_than
    put_back = 0
    for entry in _entries(processed, ".msg"):
        st = _stat(entry)
        if st is not None and max(st.st_ctime, st.st_mtime) < limit:
            with contextlib.suppress(FileNotFoundError):  # read by a living consumer meanwhile
                os.rename(entry, messages / entry.name)  # the same name: its place in the queue's order
                put_back += 1
    removed = 0
    for entry in _entries(messages, ".partial"):
        st = _stat(entry)
        if st is not None and st.st_mtime < limit:
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    if put_back or removed:
        log.warning("embedded queue: %d message(s) a stopped worker had taken but not read put back, "
                    "%d half-written message(s) removed", put_back, removed)
    return put_back


def _entries(folder: Path, suffix: str) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.name.endswith(suffix))
    except FileNotFoundError:
        return []


def _stat(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except FileNotFoundError:
        return None


#: Seconds an idle embedded worker waits for a message file before it looks again anyway,
#: where the folder is watched (FolderWatch); where it is not, it polls at `polling_interval`.
WATCHED_POLL_SECONDS = 1.0


class WholeMessageFilesystemTransport(filesystem.Transport):
    """The embedded broker: kombu's filesystem transport with messages written atomically, and
    picked up as soon as they are written."""

    Channel = _WholeMessageChannel
    _watch: FolderWatch | None = None
    #: kombu keeps one exchange/binding table for every filesystem connection in a process and
    #: skips writing a binding to the control folder when that table already has it: a second
    #: spool in the same process (tests, a reconfigured app) got no binding file, and what was
    #: published to it was dropped. One table per control folder, as the files are.
    _states: ClassVar[dict[str, BrokerState]] = {}

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        folder = os.path.abspath(client.transport_options.get("control_folder", "control"))
        self.state = self._states.setdefault(folder, BrokerState())  # setdefault: atomic under the GIL

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:  # type: ignore[override]  # as kombu's virtual.Transport
        """kombu's virtual transport loop (deliver one message or raise socket.timeout), except
        that an empty pass waits for a message file to land (inotify) rather than sleeping
        `polling_interval`: a job is picked up as it is queued, not on average half an interval
        later (twice on the SR's way: inference, then its export; #12), and an idle worker
        wakes once a second instead of a hundred times."""
        if self._watch is None:  # before the first look: a message written after it still wakes the wait
            self._watch = FolderWatch(self.client.transport_options["data_folder_in"])  # type: ignore[union-attr]  # kombu sets client
        nap = WATCHED_POLL_SECONDS if self._watch.active else (self.polling_interval or 0.0)
        start = time.monotonic()
        cycle = cast(FairCycle, self.cycle)  # kombu's virtual.Transport sets it up in __init__
        while True:
            try:
                cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                left = None if timeout is None else timeout - (time.monotonic() - start)
                if left is not None and left <= 0:
                    raise TimeoutError from None  # socket.timeout, which Celery's loop expects
                self._watch.wait(nap if left is None else min(nap, left))


TRANSPORT_ALIASES["pacsnode-filesystem"] = f"{__name__}:WholeMessageFilesystemTransport"


def broker_settings(config: Config) -> dict[str, object]:
    q = config.queue
    if config.embedded_queue:
        folder = config.storage.path / "queue"
        for sub in ("messages", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            # a host name, which the filesystem transport ignores: without one kombu warns at each start
            "broker_url": "pacsnode-filesystem://localhost/",
            "broker_transport_options": {
                "data_folder_in": str(folder / "messages"),
                "data_folder_out": str(folder / "messages"),
                # where a consumer takes a message while it reads it (and then deletes it)
                "processed_folder": str(folder / "processed"),
                "control_folder": str(folder / "control"),  # default is ./control in the cwd
                # Only where the messages folder cannot be watched (not Linux): a job waits this
                # long at most to be picked up, twice on its way (inference, then the SR's export);
                # at 50 ms the inference pickup took 58 ms median, at 10 ms 20 ms, and an idle
                # worker polled at 2.3% of a core. Production (Redis) does not poll.
                "polling_interval": 0.01,
            },
            # The filesystem transport has no fanout exchange for remote control.
            "worker_enable_remote_control": False,
        }
    return {
        "broker_url": q.broker_url,
        "broker_transport_options": {
            # Ten Redis lists per queue instead of kombu's default four buckets, so every rule
            # priority is its own step.
            "priority_steps": list(range(10)),
            # Longer than the slowest job, or Redis re-delivers a task that is still running.
            "visibility_timeout": q.visibility_timeout,
            "socket_timeout": 10,
            "socket_connect_timeout": 10,
        },
    }


def configure(config: Config) -> Celery:
    """Configure the process-wide app for this config (once per process)."""
    global _configured
    with _lock:
        key = config.model_dump_json()
        if _configured == key:
            return app
        if _configured is not None:
            _drop_connections()
        app.conf.update(
            task_serializer="json",
            accept_content=["json"],
            task_ignore_result=True,
            result_backend=None,
            # Acknowledge after the task: a worker killed mid-job leaves its message to be
            # delivered again (the database heartbeat lets the reconciler act sooner).
            task_acks_late=True,
            task_reject_on_worker_lost=True,
            # One message per process: a GPU worker never sits on studies another could run.
            worker_prefetch_multiplier=1,
            # No worker_max_tasks_per_child: recycling a process reloads the models (seconds of
            # GPU warm-up each time) and solo-pool inference workers have no child to recycle.
            # A lost broker connection must not cancel a running GPU job: the job's row lock
            # and heartbeat make the message's re-delivery harmless.
            worker_cancel_long_running_tasks_on_connection_loss=False,
            task_time_limit=config.queue.task_time_limit,
            task_soft_time_limit=max(config.queue.task_time_limit - 30, 5),
            task_routes={RUN_JOB: {"queue": INFERENCE_QUEUE}, EXPORT_JOB: {"queue": EXPORT_QUEUE}},
            task_default_queue=INFERENCE_QUEUE,
            broker_connection_retry_on_startup=True,
            broker_connection_timeout=10,
            worker_hijack_root_logger=False,
            worker_send_task_events=False,
            **broker_settings(config),
        )
        app.conf.pacsnode_config = key
        _configured = key
    return app


def _drop_connections() -> None:
    """Forget pooled broker connections: they carry the previous config's transport options
    (for the embedded broker, the previous spool), and kombu keys its pools by URL only."""
    from kombu import pools

    app._pool = None
    app.amqp._producer_pool = None
    pools.reset()


def broker_priority(config: Config, priority: int) -> int:
    """Our priority (0-9, 9 most urgent) as the broker's: Redis serves 0 first, AMQP serves 9 first."""
    if config.queue.broker_url.startswith(("amqp", "pyamqp")):
        return priority
    return 9 - priority


def enqueue_job(config: Config, job_id: int, priority: int = DEFAULT_PRIORITY) -> None:
    """Queue inference for a job whose row is committed, at the job's routing priority."""
    configure(config).send_task(RUN_JOB, args=[job_id], queue=INFERENCE_QUEUE,
                                priority=broker_priority(config, priority))
    log.debug("job %d queued for inference (priority %d)", job_id, priority)


def enqueue_export(config: Config, job_id: int, countdown: float = 0.0) -> None:
    """Queue the sending of a job's encoded results."""
    configure(config).send_task(EXPORT_JOB, args=[job_id], queue=EXPORT_QUEUE, countdown=countdown or None)


def waiting(config: Config, queue: str) -> int:
    """Messages waiting in a broker queue (not counting those a worker already holds)."""
    # Not passive: Redis has no key for an empty queue, and a passive declare would call it missing.
    with configure(config).connection_or_acquire() as conn:
        return int(conn.default_channel.queue_declare(queue=queue).message_count)
