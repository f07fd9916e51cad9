"""An ML engineer's model, end to end: a pneumonia classifier trained by a recipe on the real
cxr-samples JPEGs (whole image, ResNet50, the seeds' transfer-learning recipe), exported with a
lung segmentation run, pinned by version in config.yaml, run by `pacsnode run` on a storescu'd
radiograph; Orthanc receives an SR that names that model, its version and its one finding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from tests.peers import Orthanc, have, received_outputs, run_one_study
from tests.unit import training_data
from training.__main__ import main

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "storescu", "dciodvfy"), reason="needs Orthanc, DCMTK, dicom3tools"),
]

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
TINY = ["--device", "cpu", "--set", "num_workers=0", "--set", "epochs=1", "--set", "batch_size=2"]


def _train(recipe: str, data: Path, out: Path, *sets: str) -> None:
    args = ["train", "--recipe", str(RECIPES / recipe), "--data", str(data), "--out", str(out), *TINY]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0


@pytest.fixture(scope="module")
def pneumonia_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("byom")
    _train("lung_segmentation.yaml", training_data.lung_masks(tmp / "masks", n=12, size=96), tmp / "seg",
           "image_size=64", "split.val=0.25", "split.test=0.25", "network.args.channels=[4,8,16]",
           "network.args.strides=[2,2]", "network.args.num_res_units=1")  # fmt: skip
    _train("pneumonia_resnet50.yaml", training_data.kermany(tmp / "kermany"), tmp / "pn",
           "image_size=64", "network.args.widen_factor=0.125", "max_steps=2", "split.val=0.0")  # fmt: skip
    bundle = tmp / "models" / "pneumonia"
    assert main(["export", "--run", str(tmp / "pn"), "--segmentation-run", str(tmp / "seg"),
                 "--out", str(bundle), "--version", "2.1.0"]) == 0  # fmt: skip
    return bundle


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


def test_a_recipe_trained_resnet50_runs_in_the_node_and_its_sr_reaches_the_pacs(
    pneumonia_bundle: Path, pacs: Orthanc, tmp_path: Path
) -> None:
    job = run_one_study(tmp_path / "node", pneumonia_bundle, pacs, RG1, "2.1.0", timeout=180)
    assert job["model_version"] == "2.1.0" and [o["kind"] for o in job["outputs"]] == ["sr", "sc", "seg", "gsps"]
    for kind, ds in received_outputs(pacs, job, tmp_path):  # every object in Orthanc, from this model, valid
        if kind == "sr":
            assert ds.SOPClassUID == SR_CLASS
            text = json.dumps(ds.to_json_dict())
            assert "Pneumonia" in text and "No abnormality detected" not in text  # the bundle's one label
