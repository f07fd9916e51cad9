"""More listener processes on the listener's port (`listener.processes`), for senders that open
several associations at once.

One listener process serves every association in threads, and Python runs one of them at a
time: four parallel associations of small instances were stored no faster than one (#12).
With `processes: N` the first process starts N - 1 more, each joined to it by a Unix socket
pair. The first accepts every connection and serves it itself or hands it (SCM_RIGHTS, before
any TLS handshake) to the process with the fewest open connections; the whole association
stays there. Kernel-balanced alternatives were tried and measured worse: several processes
accepting from one socket let one take a whole burst of connections, and SO_REUSEPORT
spreads them by address hash, two at a time often to the same process.

The first process keeps what must be single: the completion pass, the spool's sweeper and the
record of which studies open associations are delivering (a study is not completed while one
of them is). The others report on their socket, a line per event: ``ready`` once serving,
``add <association> <study UID>`` when an association delivers a study for the first time,
``close <association>`` when it ends, ``end`` when a connection has closed. A process that ends unexpectedly is logged, its
associations are counted as closed, and it is started again; when the first process ends, even
killed, the others read the end of their socket and stop.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import cast

from sqlalchemy.exc import SQLAlchemyError

from node import metrics
from node.config import Config
from node.dimse import HandedConnectionServer
from node.handlers import AssociationTracker, IngestContext, record_release
from node.services import audit

log = logging.getLogger(__name__)

#: Seconds before a process that ended unexpectedly is started again.
RESTART_DELAY_SECONDS = 1.0
#: ... and before one that ended before it was ready (it failed to start: its error is in the
#: log, and it is not restarted in a tight loop).
FAILED_START_DELAY_SECONDS = 30.0
#: Seconds a stopping process gets to finish before it is killed.
STOP_TIMEOUT_SECONDS = 20.0


@dataclass
class ReportingTracker(AssociationTracker):
    """A further listener process's tracker: each association's studies are reported to the
    first process (its completion pass reads them), once per study."""

    channel: socket.socket | None = None
    _write_lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, assoc_id: Hashable, study_uid: str) -> None:
        with self._lock:
            studies = self._by_assoc[assoc_id]
            if study_uid in studies:
                return
            studies.add(study_uid)
        self.report(f"add {assoc_id} {study_uid}\n")

    def close(self, assoc_id: Hashable) -> set[str]:
        """Report the end; the first process records the release (it knows every process's
        associations). Nothing is left for this process to record."""
        with self._lock:
            delivered = self._by_assoc.pop(assoc_id, None)
        if delivered:
            self.report(f"close {assoc_id}\n")
        return set()

    def report(self, line: str) -> None:
        """Send one event line to the first process."""
        if self.channel is None:
            return
        with self._write_lock:
            try:
                self.channel.sendall(line.encode("ascii"))
            except OSError:  # the first process is gone: this one stops soon
                log.warning("could not report %r: the first listener process has ended", line.strip())


class ListenerProcesses:
    """In the first listener process: start, feed, watch, restart and stop the others."""

    def __init__(self, config: Config, config_file: Path, tracker: AssociationTracker) -> None:
        self.config = config
        self.config_file = config_file
        self.tracker = tracker
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # guards the maps below and each channel's sends
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._channels: dict[int, socket.socket] = {}
        self._connections: dict[int, int] = {}  # connections handed to each and not yet ended

    def start(self) -> None:
        for number in range(2, self.config.listener.processes + 1):
            self._spawn(number)

    def hand_off(self, client: socket.socket, own: int) -> bool:
        """CountingServer's hand_off: send an accepted connection to the process with the fewest
        open connections, unless that is this one (`own` open). False: this process serves it."""
        with self._lock:
            loads = sorted((n, number) for number, n in self._connections.items() if number in self._channels)
            if not loads or loads[0][0] >= own:
                return False
            number = loads[0][1]
            try:
                # Never blocks (the acceptor thread holds the lock): a full socket buffer means
                # that process is not taking connections, and this one serves it.
                socket.send_fds(self._channels[number], [b"c"], [client.fileno()], socket.MSG_DONTWAIT)
            except OSError as e:  # that process is ending or stuck: serve it here
                log.warning("could not hand a connection to listener process %d: %s", number, e)
                return False
            self._connections[number] += 1
        log.debug("connection handed to listener process %d (open: %d here, %s there)", number, own, loads)
        return True

    def stop(self) -> None:
        """Stop every process: each closes its server and ends its associations."""
        self._stopping.set()
        with self._lock:
            self._channels.clear()  # new connections stay with the first process from now on
            procs = list(self._procs.values())
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_SECONDS)

    def _spawn(self, number: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "node.cli", "--config", str(self.config_file), "listener-process",
                "--number", str(number), "--channel-fd", str(theirs.fileno())]
        try:
            with self._lock:
                if self._stopping.is_set():
                    ours.close()
                    return
                proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),))
                self._procs[number] = proc
                self._channels[number] = ours
                self._connections[number] = 0
        finally:
            theirs.close()
        log.info("listener process %d started (pid %d)", number, proc.pid)
        threading.Thread(target=self._follow, args=(number, proc, ours), name=f"listener-process-{number}",
                         daemon=True).start()

    def _follow(self, number: int, proc: subprocess.Popen[bytes], channel: socket.socket) -> None:
        """Apply a process's reports until it ends; then count its associations as closed and,
        unless the listener is stopping, start it again."""
        open_assocs: set[tuple[int, str]] = set()
        ready = False
        with channel.makefile("r", encoding="ascii", errors="replace") as events:
            for line in events:
                kind, _, rest = line.rstrip("\n").partition(" ")
                if kind == "ready":
                    ready = True
                elif kind == "end":
                    with self._lock:
                        self._connections[number] = max(0, self._connections[number] - 1)
                elif kind == "add":
                    assoc, _, study = rest.partition(" ")
                    open_assocs.add((number, assoc))
                    self.tracker.add((number, assoc), study)
                elif kind == "close":
                    open_assocs.discard((number, rest))
                    record_release(self.config, self.tracker.close((number, rest)))
                else:
                    log.error("listener process %d reported %r: ignored", number, line.strip())
        with self._lock:  # no more connections for it
            self._channels.pop(number, None)
        channel.close()
        code = proc.wait()
        for key in open_assocs:  # ended with it: their studies' quiet time starts now
            record_release(self.config, self.tracker.close(key))
        # Not at once: a Ctrl-C reaches every process of the group, and the first may be a moment
        # behind the others in stopping; a process that fails at start is not restarted in a loop.
        if self._stopping.wait(RESTART_DELAY_SECONDS if ready else FAILED_START_DELAY_SECONDS):
            return
        detail = (f"listener process {number} (pid {proc.pid}) ended with {code} "
                  f"{'while the listener runs' if ready else 'before it was ready'}: started again")
        log.error("%s", detail)
        metrics.listener_process_restarted()
        try:
            audit.record(self.config, "listener_process_ended", "listener", detail)
        except SQLAlchemyError:
            log.exception("could not record the listener process's end")
        self._spawn(number)


def serve_further(config: Config, number: int, channel_fd: int) -> int:
    """A further listener process: serve the connections the first process hands over until
    told to stop (SIGTERM, SIGINT) or until the first process has ended."""
    from node.heap import freeze_startup_heap
    from node.listener import start_listener

    multiprocessing.current_process().name = f"listener-{number}"  # the log's processName
    channel = socket.socket(fileno=channel_fd)
    tracker = ReportingTracker(channel=channel)
    ctx = IngestContext(config, tracker=tracker)
    server = start_listener(config, ctx, first=False, server_class=partial(
        HandedConnectionServer, channel=channel, on_connection_end=partial(tracker.report, "end\n")))
    freeze_startup_heap()  # as the first process does
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    def watch_first() -> None:
        cast(HandedConnectionServer, server).ended.wait()
        stop.set()

    threading.Thread(target=watch_first, name="watch-first-listener", daemon=True).start()
    tracker.report("ready\n")
    log.info("listener process %d (pid %d) serving connections handed over by the first", number, os.getpid())
    stop.wait()
    server.shutdown()
    return 0
