"""First run: `pacsnode run` without a model bundle answers DICOM at once, trains demo weights in
the background, and processes the study that arrived meanwhile when the bundle is ready. On a
fresh virtualenv `./dev run` is still installing torch and the inference dependencies then: the
node waits for that install (its state file, simulated here) before it starts the training.

`--quick-demo` trains the small demo bundle (seconds, not minutes); the path through the node
is the same as for the full one. bench/first_start.sh times the full one on a fresh clone.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from node.config import load_config
from node.services.overview import readiness
from tests.peers import Node, Orthanc, have, node_config, storescu, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "storescu", "echoscu", "dciodvfy"), reason="needs Orthanc, DCMTK, dicom3tools"),
]

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))


def _at(job: dict, key: str) -> float:
    """A job's timestamp (stored in UTC; SQLite gives it back without an offset) in epoch seconds."""
    at = datetime.fromisoformat(job[key])
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


@pytest.mark.timeout(900)  # the quick demo training: ~15 s alone, minutes on a busy machine
def test_a_study_sent_while_demo_weights_train_is_processed_once_they_are_ready(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # `./dev run`'s background install of the inference extra, under way: a live pid in its state file.
    install_state = tmp_path / "pacsnode-install.json"
    installer = subprocess.Popen(["sleep", "900"])
    install_state.write_text(json.dumps({"state": "installing", "pid": installer.pid, "started_at": time.time(),
                                         "log": str(tmp_path / "pacsnode-install.log")}))
    monkeypatch.setenv("PACSNODE_INSTALL_STATE", str(install_state))  # the node's and readiness() below
    pacs = Orthanc(tmp_path / "orthanc").start()
    bundle = tmp_path / "models" / "chest_xray"
    ready_marker = bundle / "configs" / "metadata.json"
    cfg = node_config(tmp_path / "node", bundle,
                      [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "timeout": 10}])  # fmt: skip
    config = load_config(cfg)
    node = Node(cfg)
    try:
        node.start(120, "--quick-demo")
        # The listener answers while there is no bundle yet.
        echo = subprocess.run(["echoscu", "-aec", "PACSNODE", "127.0.0.1", str(node.port)],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        assert not ready_marker.exists(), "the bundle was there before the listener answered: nothing is shown"
        models = readiness(config)["checks"]["models"]
        assert models["ok"] is False and models["detail"].startswith("installing the inference dependencies (torch, "), models
        assert models["detail"].endswith("then demo weights are trained for chest_xray"), models

        assert storescu(node.port, RG1).returncode == 0
        study = str(pydicom.dcmread(RG1, stop_before_pixels=True).StudyInstanceUID)
        queued = node.wait_jobs(lambda rows: next((j for j in rows if j["study_instance_uid"] == study), None), 60,
                                "the study's job")
        assert queued["state"] == "queued", queued
        assert not (config.storage.path / "training").exists(), "demo training started during the install"

        # The install ends: the training starts, the job still waits for the bundle.
        install_state.write_text(json.dumps({**json.loads(install_state.read_text()), "state": "done"}))
        installer.kill()

        def training() -> dict | None:
            models = readiness(config)["checks"]["models"]
            return models if models.get("detail", "").startswith("chest_xray: demo weights being trained since") else None

        assert wait_for(training, 60, "the demo training, after the install", interval=0.5)["ok"] is False
        assert not ready_marker.exists(), "the bundle was ready before the study's job was queued"

        job = node.wait_done(study, 600, "the study's job, after the demo training")
        ready_at = ready_marker.stat().st_mtime
        # Queued while the bundle was being made, run after it was there.
        assert _at(job, "queued_at") < ready_at <= _at(job, "running_at"), (job, ready_at)
        assert readiness(config)["checks"]["models"] == {"ok": True}
        assert pacs.find_study(study), "Orthanc does not have the study"
        assert {o["kind"] for o in job["outputs"]} >= {"sr"}
        log = node.log()
        assert "installing the inference dependencies (torch, " in log
        assert "demo training and the inference worker start when it ends" in log
        assert "inference dependencies installed" in log
        assert "training quick demo weights in the background" in log
        assert "studies received meanwhile wait in the queue" in log
        assert "pipeline chest_xray: demo weights ready after" in log
        assert "inference worker started: the studies that waited for the model bundle go now" in log
    finally:
        installer.kill()
        node.stop(wait=False)
        pacs.stop(wait=False)
