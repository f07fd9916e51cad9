"""First run on a fresh virtualenv: while `./dev run` installs the inference dependencies in the
background, /readyz's "models" check says so, and `pacsnode run` waits for the install to end
before it starts the demo training (node/first_run.py). The install is simulated by its state
file and a fake list of inference modules; tests/integration/test_first_start.py runs the node
through it."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from node import first_run
from node.config import load_config
from tests.peers import node_config


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pacsnode-install.json"
    monkeypatch.setenv("PACSNODE_INSTALL_STATE", str(path))
    monkeypatch.setattr(first_run, "INFERENCE_MODULES", ("json", "pacsnode_no_such_module"))
    return path


def _write(path: Path, state: str, pid: int, **more: object) -> None:
    path.write_text(json.dumps({"state": state, "pid": pid, "started_at": time.time(), "log": "/v/pip.log", **more}))


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_models_are_not_ready_while_the_inference_dependencies_install(state: Path, tmp_path: Path) -> None:
    config = load_config(node_config(tmp_path / "node", tmp_path / "models" / "chest_xray", []))
    _write(state, "installing", pid=os.getpid())
    check = first_run.readiness_check(config)
    assert check["ok"] is False
    assert check["detail"].startswith(f"installing the inference dependencies ({first_run.INFERENCE_NAMES}) since ")
    assert "(pip's output: /v/pip.log); studies received meanwhile wait in the queue" in check["detail"]
    assert check["detail"].endswith("; then demo weights are trained for chest_xray")

    _write(state, "failed", pid=_dead_pid(), exit_code=1)
    assert "failed with exit status 1 (pip's output: /v/pip.log)" in first_run.readiness_check(config)["detail"]

    _write(state, "installing", pid=_dead_pid())  # the installer was killed
    assert "stopped before it ended" in first_run.readiness_check(config)["detail"]

    state.unlink()  # a plain `pip install .`: no extra, nothing installing it
    detail = first_run.readiness_check(config)["detail"]
    assert "not installed (missing: pacsnode_no_such_module)" in detail and "pip install -e '.[inference]'" in detail

    _write(state, "done", pid=_dead_pid())
    first_run.INFERENCE_MODULES = ("json",)  # restored by monkeypatch
    assert first_run.inference_install() == {"state": "ready"}
    # The install is over: the check is the demo training's (none started here), then ok.
    assert first_run.readiness_check(config) == {"ok": True}


def test_production_api_host_needs_no_torch(state: Path, tmp_path: Path) -> None:
    """With a Redis broker the inference workers run elsewhere: the API's host lacking the
    inference dependencies does not make the node unready."""
    config = load_config(node_config(tmp_path / "node", tmp_path / "models" / "chest_xray", [],
                                     queue={"broker_url": "redis://127.0.0.1:1/0"}))
    assert first_run.inference_install()["state"] == "missing"
    assert "inference dependencies" not in first_run.readiness_check(config).get("detail", "")


def test_run_waits_for_the_install_to_end(state: Path, caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="node.first_run")
    _write(state, "installing", pid=os.getpid())
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(first_run.wait_for_inference_deps(threading.Event(), poll=0.05)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive(), "run went on while the install was under way"
    assert "installing the inference dependencies" in caplog.text
    assert "demo training and the inference worker start when it ends" in caplog.text

    monkeypatch.setattr(first_run, "INFERENCE_MODULES", ("json",))
    _write(state, "done", pid=_dead_pid())
    waiter.join(5)
    assert result == [True]
    assert "inference dependencies installed" in caplog.text


def test_run_says_why_when_the_install_fails(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(state, "failed", pid=_dead_pid(), exit_code=2)
    assert first_run.wait_for_inference_deps(threading.Event(), poll=0.05) is False
    assert "failed with exit status 2" in caplog.text
    assert "demo training and the inference worker do not start" in caplog.text


def test_a_stopping_node_stops_waiting(state: Path) -> None:
    _write(state, "installing", pid=os.getpid())
    stopping = threading.Event()
    stopping.set()
    assert first_run.wait_for_inference_deps(stopping, poll=5) is False
