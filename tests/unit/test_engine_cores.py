"""node/engine/cores.py: the torch threads a forward pass gets, from the cores other programs leave."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.engine import cores
from node.engine.cores import CoreMonitor


def _stat(path: Path, busy_seconds: float) -> None:
    """A /proc/stat whose first line says the machine has been busy `busy_seconds` (user time)."""
    ticks = round(busy_seconds * cores._TICK)
    path.write_text(f"cpu  {ticks} 0 0 1000000 0 0 0 0 0 0\ncpu0 0 0 0 0 0 0 0 0 0 0\n")


def test_all_threads_on_free_cores_one_on_busy_ones(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, 100.0)
    monitor = CoreMonitor(stat, cores=2)
    assert monitor.others() is None and monitor.threads(2) == 2  # nothing known yet: as configured
    time.sleep(0.2)
    _stat(stat, 100.0 + 0.2 * 0.1)  # others used 0.1 of a core
    monitor.update()
    others = monitor.others()
    assert others is not None and others < 0.5
    assert monitor.threads(2) == 2
    time.sleep(0.2)
    _stat(stat, 100.02 + 0.2 * 0.6)  # a burst (an instance stored, a send): the cores still count as free
    monitor.update()
    assert monitor.threads(2) == 2
    time.sleep(0.2)
    _stat(stat, 100.14 + 0.2 * 1.1)  # a program keeping a core busy, and a little more
    monitor.update()
    assert monitor.threads(2) == 1
    assert monitor.threads(1) == 1


def test_a_larger_host_gives_what_is_free(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, 0.0)
    monitor = CoreMonitor(stat, cores=8)
    time.sleep(0.2)
    _stat(stat, 0.2 * 5.0)  # five cores busy elsewhere: three are free
    monitor.update()
    assert monitor.threads(8) == 3
    assert monitor.threads(2) == 2


def test_without_proc_stat_the_configured_threads_are_used(tmp_path: Path) -> None:
    monitor = CoreMonitor(tmp_path / "missing", cores=2)
    monitor.update()
    assert monitor.others() is None and monitor.threads(2) == 2


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux only")
def test_a_busy_program_beside_the_worker_is_seen() -> None:
    """The real /proc/stat: a process spinning beside us counts as about a core (more on a
    loaded machine, never much less), and the pass then gets one thread."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started and spinning
        monitor = CoreMonitor(cores=2)
        time.sleep(0.5)
        monitor.update()
        others = monitor.others()
        assert others is not None and others >= 0.8
        assert monitor.threads(2) == 1
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="Linux only")
def test_own_work_is_not_counted_as_others(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    _stat(stat, 0.0)
    monitor = CoreMonitor(stat, cores=2)
    t0 = time.perf_counter()
    spent = time.process_time()
    while time.perf_counter() - t0 < 0.3:  # this process busy: the machine's busy time grows with it
        pass
    _stat(stat, time.process_time() - spent)
    monitor.update()
    others = monitor.others()
    assert others is not None and others < 0.2


def test_the_next_pass_gets_the_threads_the_cores_allow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """set_threads_for_next_pass sets torch's thread count: one while others keep the cores busy,
    back to the worker's own count once they are free."""
    import torch

    before = torch.get_num_threads()
    stat = tmp_path / "stat"
    _stat(stat, 0.0)
    monitor = CoreMonitor(stat, cores=2)
    monkeypatch.setattr(cores, "_monitor", monitor)
    monkeypatch.setattr(cores, "_most", 2)
    try:
        time.sleep(0.2)
        _stat(stat, 0.2 * 1.8)
        monitor.update()
        assert cores.set_threads_for_next_pass() == 1
        assert torch.get_num_threads() == 1
        time.sleep(0.2)
        _stat(stat, 0.2 * 1.8)  # idle since
        monitor.update()
        assert cores.set_threads_for_next_pass() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
