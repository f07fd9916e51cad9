"""node/listener_processes.py's choices, without starting processes: which process gets a new
connection, what a further process reports, and what the first makes of the reports.
tests/integration/test_listener_processes.py runs the real thing."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from node.config import parse_config
from node.handlers import AssociationTracker
from node.listener_processes import ListenerProcesses, ReportingTracker
from tests.peers import wait_for


def _processes(tmp_path: Path, loads: dict[int, int]) -> tuple[ListenerProcesses, dict[int, socket.socket]]:
    """Further processes with `loads` open connections, each joined by a socket pair whose far
    end the test holds."""
    config = parse_config({"database": {"url": f"sqlite:///{tmp_path / 'db.sqlite'}"}})
    lp = ListenerProcesses(config, tmp_path / "config.yaml", AssociationTracker())
    far = {}
    for number, load in loads.items():
        ours, theirs = socket.socketpair()
        lp._channels[number], lp._connections[number], far[number] = ours, load, theirs
    return lp, far


def _handed(far: socket.socket) -> bool:
    far.setblocking(False)
    try:
        data, fds, _, _ = socket.recv_fds(far, 1, 1)
    except BlockingIOError:
        return False
    for fd in fds:
        socket.socket(fileno=fd).close()
    return data == b"c" and len(fds) == 1


@pytest.mark.parametrize(("own", "loads", "expected"), [
    (0, {2: 0, 3: 0}, None),   # all idle: the first keeps it (no hand-over cost)
    (1, {2: 0, 3: 0}, 2),      # the first is busier: the lowest-numbered idle one
    (1, {2: 1, 3: 0}, 3),      # the least busy
    (2, {2: 2, 3: 3}, None),   # the first is among the least busy: it keeps it
    (3, {}, None),             # no further process
])
def test_a_new_connection_goes_to_the_least_busy_process(tmp_path: Path, own: int, loads: dict[int, int],
                                                         expected: int | None) -> None:
    lp, far = _processes(tmp_path, loads)
    client, other = socket.socketpair()
    try:
        assert lp.hand_off(client, own) is (expected is not None)
        assert {n for n, s in far.items() if _handed(s)} == ({expected} if expected else set())
        if expected:
            assert lp._connections[expected] == loads[expected] + 1  # counted until it reports "end"
    finally:
        client.close()
        other.close()


def test_a_process_that_cannot_take_it_leaves_it_to_the_first(tmp_path: Path) -> None:
    lp, far = _processes(tmp_path, {2: 0})
    far[2].close()  # that process has ended; its end of file is not read yet
    client, other = socket.socketpair()
    assert lp.hand_off(client, 1) is False
    assert lp._connections[2] == 0
    client.close()
    other.close()


def test_a_further_process_reports_each_study_once_and_each_end() -> None:
    ours, theirs = socket.socketpair()
    tracker = ReportingTracker(channel=theirs)
    tracker.add(7, "1.2.3")
    tracker.add(7, "1.2.3")  # the second instance of that study: nothing new to say
    tracker.add(7, "1.2.4")
    assert tracker.open_studies() == {"1.2.3", "1.2.4"}
    assert tracker.close(7) == set()  # the first process records the release, not this one
    assert tracker.close(8) == set()  # an association that delivered nothing: nothing to say
    tracker.report("end\n")
    theirs.close()
    assert ours.makefile("r").read() == "add 7 1.2.3\nadd 7 1.2.4\nclose 7\nend\n"


def test_the_first_process_applies_reports_and_closes_what_a_dead_process_left(tmp_path: Path,
                                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    released: list[set[str]] = []
    monkeypatch.setattr("node.listener_processes.record_release", lambda _config, studies: released.append(studies))
    lp, _ = _processes(tmp_path, {})
    lp._stopping.set()  # no restart once the process has ended
    ours, theirs = socket.socketpair()
    lp._channels[2], lp._connections[2] = ours, 1
    proc: Any = subprocess.Popen([sys.executable, "-c", "pass"])
    follow = threading.Thread(target=lp._follow, args=(2, proc, ours))
    follow.start()
    theirs.sendall(b"add 11 1.2.3\nadd 12 1.2.4\nend\nclose 11\nnonsense\n")
    # 11 closed, 12 still open; the connection ended; the line it does not know is ignored
    wait_for(lambda: released == [{"1.2.3"}] or None, 10, "the reports to be applied")
    assert lp.tracker.open_studies() == {"1.2.4"}
    assert lp._connections[2] == 0
    theirs.close()  # the process ends with association 12 open
    follow.join(10)
    assert not follow.is_alive()
    assert released == [{"1.2.3"}, {"1.2.4"}]
    assert lp.tracker.open_studies() == set()
    assert 2 not in lp._channels  # nothing more is handed to it
