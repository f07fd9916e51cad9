"""First run: demo weights trained in the background while the node already listens.

`pacsnode run` with a pipeline whose bundle is missing (and no version pinned) starts
`python -m training demo` as a child process and answers DICOM at once; studies that arrive
meanwhile are stored and their jobs wait in the queue, and the inference worker starts when
every bundle is ready. Each training writes its state to `<storage>/training/<pipeline>.json`
(and its output to `<pipeline>.log` beside it), which /readyz reads.

On a fresh virtualenv `./dev run` installs the node's own dependencies first and the `inference`
extra (torch, MONAI, SciPy, scikit-image) in the background, recording its progress in
`<venv>/pacsnode-install.json`: the listener answers meanwhile, and `run` starts the demo
training and the inference worker when that install has ended (`wait_for_inference_deps`).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.config import Config

log = logging.getLogger(__name__)

TRAINING_DIR = "training"
# The import names of pyproject.toml's `inference` extra: what the inference worker and the demo
# training need beyond the node's own dependencies.
INFERENCE_MODULES = ("torch", "monai", "scipy", "skimage", "tqdm")
INFERENCE_NAMES = "torch, MONAI, SciPy, scikit-image"
# Written by `./dev run` while it installs the inference extra in the background:
# {"state": "installing" | "done" | "failed", "pid", "started_at", "log", "exit_code"}.
INSTALL_STATE = "pacsnode-install.json"


def install_state_path() -> Path:
    """`<venv>/pacsnode-install.json`; PACSNODE_INSTALL_STATE names another file (tests)."""
    return Path(os.environ.get("PACSNODE_INSTALL_STATE") or Path(sys.prefix) / INSTALL_STATE)


def inference_install() -> dict[str, Any]:
    """Where the inference dependencies stand. "ready": importable, no install running;
    "installing" (started_at, pid, log): `./dev run` is installing them; "failed" (exit_code,
    log): that install failed; "stopped": its installer is gone before it ended (the node was
    killed during it); "missing": not installed and no install under way (a plain
    `pip install .` without the extra)."""
    try:
        state = json.loads(install_state_path().read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("state") == "installing":
        if _alive(int(state.get("pid", 0))):
            return state
        return {**state, "state": "stopped"}
    if state.get("state") == "failed":
        return state
    importlib.invalidate_caches()  # the finders cache directory listings from before the install
    missing = [m for m in INFERENCE_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return {"state": "ready"}
    return {**state, "state": "missing", "missing": missing}


def _since(state: dict[str, Any]) -> str:
    return time.strftime("%H:%M:%S", time.localtime(float(state.get("started_at", 0))))


def describe_install(state: dict[str, Any]) -> str:
    """One line for /readyz and the log: why the models are not ready while the inference
    dependencies are not there."""
    where = f" (pip's output: {state['log']})" if state.get("log") else ""
    if state["state"] == "installing":
        return (f"installing the inference dependencies ({INFERENCE_NAMES}) since {_since(state)}{where}; "
                "studies received meanwhile wait in the queue and are processed when the models are ready")
    if state["state"] == "failed":
        return (f"installing the inference dependencies ({INFERENCE_NAMES}) failed with exit status "
                f"{state.get('exit_code')}{where}; studies received wait in the queue; fix it and run "
                "`./dev run` again")
    if state["state"] == "stopped":
        return (f"the install of the inference dependencies ({INFERENCE_NAMES}) started at {_since(state)} "
                f"stopped before it ended{where}; studies received wait in the queue; run `./dev run` again")
    return (f"the inference dependencies are not installed (missing: {', '.join(state.get('missing', []))}); "
            "studies received wait in the queue; install them (`pip install -e '.[inference]'`, or `./dev run`) "
            "and restart the node")


def wait_for_inference_deps(stopping: threading.Event, poll: float = 1.0) -> bool:
    """Block until the inference dependencies are importable and no install is running: True;
    False when their install failed or stopped, when they are not installed and nothing installs
    them (logged as an error: the node keeps receiving, the jobs stay queued), or when `stopping`
    is set."""
    waited = False
    while True:
        state = inference_install()
        if state["state"] == "ready":
            if waited:
                log.info("inference dependencies installed (%s): the models can be loaded", INFERENCE_NAMES)
            return True
        if state["state"] != "installing":
            log.error("%s: demo training and the inference worker do not start", describe_install(state))
            return False
        if not waited:
            log.warning("%s; demo training and the inference worker start when it ends", describe_install(state))
            waited = True
        if stopping.wait(poll):
            return False


def needs_training(config: Config) -> list[str]:
    """Enabled pipelines whose bundle is missing and whose version is not pinned: a pinned
    version is never replaced by demo weights."""
    return [name for name, pc in config.pipelines.items()
            if pc.enabled and pc.version is None and not (pc.bundle / "configs" / "metadata.json").exists()]


def _state_path(config: Config, name: str) -> Path:
    return config.storage.path / TRAINING_DIR / f"{name}.json"


def _write_state(config: Config, name: str, **state: Any) -> None:
    path = _state_path(config, name)
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps(state))
    staged.replace(path)  # readers never see half a file


@dataclass
class DemoTraining:
    """One `training demo` child process making a pipeline's bundle."""

    name: str
    bundle: Path
    proc: subprocess.Popen[bytes]
    started: float
    log_path: Path

    def wait(self, config: Config) -> bool:
        """Wait for the training to end; record and log how it ended; True when the bundle is there."""
        code = self.proc.wait()
        seconds = round(time.time() - self.started, 1)
        ok = code == 0 and (self.bundle / "configs" / "metadata.json").exists()
        state = "done" if ok else "stopped" if code < 0 else "failed"  # < 0: ended by a signal (the node stopping)
        _write_state(config, self.name, state=state, pid=self.proc.pid, started_at=self.started,
                     ended_at=time.time(), exit_code=code, bundle=str(self.bundle), log=str(self.log_path))
        if ok:
            log.info("pipeline %s: demo weights ready after %.1f s in %s", self.name, seconds, self.bundle)
        elif state == "stopped":
            log.warning("pipeline %s: demo training stopped after %.1f s (signal %d)", self.name, seconds, -code)
        else:
            log.error("pipeline %s: demo training failed after %.1f s (exit status %d; its output: %s); "
                      "studies are still received and their jobs stay queued until the node is restarted "
                      "with a bundle", self.name, seconds, code, self.log_path)
        return ok


def start_training(config: Config, names: list[str], quick: bool = False) -> list[DemoTraining]:
    """Start `python -m training demo` for each pipeline in `names`, in the background."""
    folder = config.storage.path / TRAINING_DIR
    folder.mkdir(parents=True, exist_ok=True)
    started = []
    for name in names:
        bundle = config.pipelines[name].bundle
        log_path = folder / f"{name}.log"
        argv = [sys.executable, "-m", "training", "demo", "--out", str(bundle), *(["--quick"] if quick else [])]
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        t = DemoTraining(name, bundle, proc, time.time(), log_path)
        _write_state(config, name, state="training", pid=proc.pid, started_at=t.started, bundle=str(bundle),
                     log=str(log_path), quick=quick)
        log.warning("pipeline %s: model bundle %s is missing: training %sdemo weights in the background "
                    "(pid %d, output in %s); studies received meanwhile wait in the queue and are processed "
                    "when the bundle is ready", name, bundle, "quick " if quick else "", proc.pid, log_path)
        started.append(t)
    return started


def training_status(config: Config) -> dict[str, dict[str, Any]]:
    """The state of each pipeline's demo training that `run` started (none: no such training):
    {"state": "training" | "done" | "failed" | "stopped", "started_at", ...}. "stopped": the state
    file says training but its process is gone (the node was killed during it)."""
    out: dict[str, dict[str, Any]] = {}
    for name in config.pipelines:
        try:
            state = json.loads(_state_path(config, name).read_text())
        except (OSError, ValueError):
            continue
        if state.get("state") == "training" and not _alive(int(state.get("pid", 0))):
            state["state"] = "stopped"
        out[name] = state
    return out


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by `run`) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def readiness_check(config: Config) -> dict[str, Any]:
    """The /readyz check "models": not ok while demo weights are being trained (the node
    receives, and the jobs wait in the queue) or when their training failed; before that, not ok
    while the inference dependencies are being installed (or when they are not there).
    The install is this host's only when the node runs embedded (`pacsnode run`): in production
    the API's host need not have torch, the inference workers' hosts do."""
    install = inference_install() if config.embedded_queue else {"state": "ready"}
    if install["state"] != "ready":
        then = needs_training(config)
        return {"ok": False, "detail": describe_install(install)
                + (f"; then demo weights are trained for {', '.join(then)}" if then else "")}
    waiting = []
    for name, state in training_status(config).items():
        pc = config.pipelines[name]
        if state["state"] == "done" or (pc.bundle / "configs" / "metadata.json").exists():
            continue
        since = _since(state)
        if state["state"] == "training":
            waiting.append(f"{name}: demo weights being trained since {since}; studies received meanwhile "
                           "wait in the queue and are processed when the bundle is ready")
        else:
            waiting.append(f"{name}: demo training {state['state']} (see {state.get('log')}); jobs wait in the queue")
    return {"ok": not waiting, **({"detail": "; ".join(waiting)} if waiting else {})}
