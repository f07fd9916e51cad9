"""The test peers' own start-up: ports no client can take first, and a peer that dies is reported
at once with its log (a CI run once waited 30 s on an Orthanc that had exited, and said only
"connection refused")."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.peers import PeerExited, Redis, _answering, _ephemeral_ports, free_port, have, port_open


def test_free_ports_are_outside_the_ephemeral_range_and_never_handed_out_twice() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if p in _ephemeral_ports()]
    for port in ports[:20]:  # bindable when handed out
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_client_socket_takes_its_local_port_from_the_ephemeral_range() -> None:
    """Why free_port() avoids that range: what a connect() binds lies in it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", free_port()))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            assert client.getsockname()[1] in _ephemeral_ports()


@pytest.mark.skipif(not have("redis-server"), reason="redis-server not installed")
def test_a_peer_that_exits_before_it_answers_fails_at_once_with_its_log(tmp_path: Path) -> None:
    with socket.socket() as taken:  # bound, not listening: as a client socket holds its local port
        taken.bind(("127.0.0.1", free_port()))
        server = Redis(tmp_path, port=taken.getsockname()[1])
        started = time.monotonic()
        with pytest.raises(PeerExited, match=r"(?s)redis-server exited with code \d+ before it answered.*in use"):
            server.start()
    assert time.monotonic() - started < 10  # not the 30 s deadline
    assert server.proc is not None and server.proc.poll() is not None


def test_a_peer_still_silent_at_the_deadline_fails_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(["sh", "-c", "echo still loading its index; exec sleep 30"], stdout=out)
    try:
        with pytest.raises(TimeoutError, match=r"(?s)timed out after 1 s waiting for the server.*still loading its index"):
            _answering(proc, lambda: port_open(free_port()), 1, "the server", log)
    finally:
        proc.kill()
        proc.wait(timeout=10)
