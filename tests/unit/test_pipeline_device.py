"""Device selection without a GPU: `device: cuda` stops the node at start, with the reason, and
never runs on the CPU instead; the check keeps torch out of the listener's process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.cli import main as pacsnode
from pipelines.chest_xray import ChestXrayPipeline
from pipelines.device import DeviceError, check_device
from tests.peers import REPO, node_config

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="these check a machine without CUDA")
NO_CUDA = "device 'cuda' was requested but CUDA is not available"


def test_check_device_refuses_cuda_and_names_the_fix() -> None:
    check_device("cpu")
    check_device("auto")
    with pytest.raises(DeviceError, match=f"{NO_CUDA} .*use device: auto or cpu"):
        check_device("cuda")
    with pytest.raises(DeviceError, match="'cuda:1' was requested but CUDA is not available"):
        check_device("cuda:1")
    with pytest.raises(DeviceError, match="device must be auto, cpu, cuda or cuda:N, not 'gpu'"):
        check_device("gpu")


def test_check_device_does_not_import_torch_in_the_caller() -> None:
    code = ("import sys\nfrom pipelines.device import DeviceError, check_device\n"
            "try:\n    check_device('cuda')\nexcept DeviceError:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("command", [["run"], ["worker", "-Q", "inference"]])
def test_device_cuda_without_a_gpu_stops_the_node_at_start(
    command: list[str], demo_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = node_config(tmp_path / "node", demo_bundle, [],
                      pipelines={"chest_xray": {"bundle": str(demo_bundle), "device": "cuda"}})  # fmt: skip
    assert pacsnode(["--config", str(cfg), *command]) == 2
    err = capsys.readouterr().err
    assert f"pipelines.chest_xray.device: {NO_CUDA}" in err


def test_the_pipeline_refuses_cuda_before_loading(demo_bundle: Path) -> None:
    with pytest.raises(DeviceError, match=NO_CUDA):
        ChestXrayPipeline(demo_bundle, "cuda")
