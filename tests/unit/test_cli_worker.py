"""`pacsnode worker`: how many torch threads an inference worker runs, and how they wait; the
inference workers `pacsnode run` starts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from node.cli import build_parser, cmd_worker, inference_workers_argv
from node.config import parse_config


def test_threads_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["worker", "--threads", "0"])
    assert "must be at least 1, got 0" in capsys.readouterr().err


def test_threads_are_set_before_the_worker_starts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The thread count is applied before Celery (and with it the models) starts."""
    args = build_parser().parse_args(["worker", "-Q", "export", "--threads", "1"])
    started: list[list[str]] = []

    class App:
        def worker_main(self, argv: list[str]) -> None:
            started.append(argv)

    monkeypatch.setattr("node.queue.configure", lambda config: App())
    before = torch.get_num_threads()
    try:
        assert cmd_worker(args, parse_config({"storage": {"path": str(tmp_path)}})) == 0
        assert torch.get_num_threads() == 1
        assert started and "export" in started[0]
    finally:
        torch.set_num_threads(before)


def test_a_worker_starting_removes_staged_files_a_killed_one_left(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    """A worker killed while writing a result leaves its staged file in incoming/: the next
    worker to start removes it once nobody has written to it for an hour, and leaves a recent one."""
    from node.spool import INCOMING

    incoming = tmp_path / INCOMING
    incoming.mkdir()
    orphan, recent = incoming / ".result.part", incoming / ".arriving.part"
    orphan.write_bytes(b"half an SC")
    recent.write_bytes(b"a data set arriving")
    old = orphan.stat().st_mtime - 2 * 3600
    os.utime(orphan, (old, old))

    class App:
        def worker_main(self, argv: list[str]) -> None:
            assert not orphan.exists()  # before Celery starts taking tasks

    monkeypatch.setattr("node.queue.configure", lambda config: App())
    args = build_parser().parse_args(["worker", "-Q", "export"])
    assert cmd_worker(args, parse_config({"storage": {"path": str(tmp_path)}})) == 0
    assert not orphan.exists() and recent.exists()


@pytest.mark.parametrize(("given", "used"), [
    ({}, {"GOMP_SPINCOUNT": "10000"}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    ({"GOMP_SPINCOUNT": "0"}, {"GOMP_SPINCOUNT": "0"}),
])
def test_openmp_threads_spin_briefly_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                            given: dict[str, str], used: dict[str, str]) -> None:
    """A worker sets how OpenMP threads wait before torch is loaded in it (libgomp reads it once),
    and never over what the environment already says."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in given.items():
        monkeypatch.setenv(name, value)
    seen: list[dict[str, str]] = []

    class App:
        def worker_main(self, argv: list[str]) -> None:
            seen.append({k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ})

    monkeypatch.setattr("node.queue.configure", lambda config: App())
    args = build_parser().parse_args(["worker", "-Q", "export"])
    assert cmd_worker(args, parse_config({"storage": {"path": str(tmp_path)}})) == 0
    assert seen == [used]


def test_run_starts_one_worker_as_before_or_n_named_with_the_cores_split() -> None:
    cfg = Path("/etc/pacsnode.yaml")
    [one] = inference_workers_argv(cfg, 1, 16)
    assert one[-3:] == ["worker", "-Q", "inference"]  # torch's own thread count, Celery's default name
    two = inference_workers_argv(cfg, 2, 16)
    assert [a[-7:] for a in two] == [["worker", "-Q", "inference", "-n", f"inference{i}@%h", "--threads", "8"]
                                     for i in (1, 2)]
    assert {a[-1] for a in inference_workers_argv(cfg, 3, 2)} == {"1"}  # never fewer than one thread
    assert build_parser().parse_args(two[0][3:]).threads == 8  # what `pacsnode worker` accepts
