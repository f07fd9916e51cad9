"""`pacsnode worker --threads`: how many torch threads an inference worker runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.cli import build_parser, cmd_worker
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
