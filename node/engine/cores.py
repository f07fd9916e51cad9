"""How many torch threads the next forward pass gets: one per core other programs left free,
up to the worker's own count (#12).

A forward pass is several hundred parallel operations, each ending at a barrier where the
worker's OpenMP threads wait for one another. When another program keeps a core busy, one of
those threads is preempted and every barrier waits for it. DenseNet121 (224 px, batch 1) on a
2-core VM, median ms a forward (`python bench/openmp_wait.py`, two rounds, one run):

| | idle | 1 busy process | 2 busy processes |
|---|---|---|---|
| 2 threads, spinning ~0.1 ms at barriers (GOMP_SPINCOUNT=10000) | 54.5 | 260.4 | 123.1 |
| 2 threads, sleeping at once (OMP_WAIT_POLICY=PASSIVE) | 96.1 | 85.1 | 224.7 |
| 1 thread | 77.1 | 81.4 | 153.1 |
| spinning ~0.1 ms, threads from this module (the workers' default) | 50.2 | 84.2 | 157.5 |

No fixed setting is close to the best in every column, so the worker looks before each forward
pass: a thread samples the machine's CPU time (/proc/stat) four times a second, less this
process's own, and `CoreMonitor.threads` gives one thread per core the others left free over the
last sample. On a GPU worker this sizes only the CPU work around the pass.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

#: Seconds between samples: what the next forward pass is judged on (a forward is 50-250 ms).
SAMPLE_SECONDS = 0.25
#: How much of a core other programs may use for it still to count as free (see `threads`).
FREE_CORE_SHARE = 0.8
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CoreMonitor:
    """How much CPU other programs used over the last sample, and the threads that leaves us."""

    def __init__(self, stat: Path = Path("/proc/stat"), cores: int | None = None,
                 sample_seconds: float = SAMPLE_SECONDS) -> None:
        self.stat = stat
        self.cores = cores or usable_cores()
        self.sample_seconds = sample_seconds
        self._others: float | None = None  # cores' worth other programs used over the last sample
        self._last = self._sample()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _sample(self) -> tuple[float, float, float] | None:
        """(monotonic time, busy CPU seconds of the whole machine, CPU seconds of this process);
        None where /proc/stat cannot be read (not Linux)."""
        try:
            with self.stat.open() as f:
                fields = f.readline().split()
        except OSError:
            return None
        if len(fields) < 8 or fields[0] != "cpu":
            return None
        # user nice system idle iowait irq softirq [steal ...]: busy is what some program ran;
        # steal is the hypervisor's, not a program's on this machine.
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[1:8])
        return time.monotonic(), (user + nice + system + irq + softirq) / _TICK, _own_cpu_seconds()

    def update(self) -> None:
        """Take a sample: what other programs used since the previous one."""
        now = self._sample()
        with self._lock:
            last, self._last = self._last, now
            if now is None or last is None or now[0] <= last[0]:
                return
            others = ((now[1] - last[1]) - (now[2] - last[2])) / (now[0] - last[0])
            self._others = max(0.0, others)

    def others(self) -> float | None:
        """Cores' worth of CPU other programs used over the last sample (None: not known yet)."""
        with self._lock:
            return self._others

    def threads(self, most: int) -> int:
        """Threads for the next forward pass: up to `most`, one per core other programs left free.

        A core counts as free while others used less than FREE_CORE_SHARE of it: a program
        that keeps a core busy shows as about one core, while the bursts a node makes beside its
        own inference (the listener storing an instance, an export worker sending the previous
        study's objects) showed as 0.2-0.6 of one and end within the pass.
        """
        others = self.others()
        if others is None:
            return most
        return max(1, min(most, int(self.cores - others + FREE_CORE_SHARE)))

    def start(self) -> CoreMonitor:
        """Sample every `sample_seconds` in a daemon thread (idempotent); returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="core-monitor", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while True:
            time.sleep(self.sample_seconds)
            self.update()


_monitor: CoreMonitor | None = None
_most: int | None = None


def set_threads_for_next_pass() -> int:
    """Set torch's thread count for the next forward pass from the cores free now (at most the
    count the worker started with: `pacsnode worker --threads` or torch's default); return it."""
    import torch

    global _monitor, _most
    if _monitor is None:
        _most = torch.get_num_threads()
        _monitor = CoreMonitor().start()
    assert _most is not None
    threads = _monitor.threads(_most)
    if threads != torch.get_num_threads():
        # INFO: an operator wondering why inference slowed down sees that the cores were shared.
        log.info("%d of %d torch threads for the next forward pass: other programs use %.1f of %d cores",
                 threads, _most, _monitor.others() or 0.0, _monitor.cores)
        torch.set_num_threads(threads)
    return threads
