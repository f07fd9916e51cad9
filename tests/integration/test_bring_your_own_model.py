"""An ML engineer's model, end to end: a pneumonia classifier trained by a recipe on the real
cxr-samples JPEGs (whole image, ResNet50, the seeds' transfer-learning recipe), exported with a
lung segmentation run, pinned by version in config.yaml, run by `pacsnode run` on a storescu'd
radiograph; Orthanc receives an SR that names that model, its version and its one finding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import Comprehensive3DSRStorage

from tests.peers import (
    Node,
    Orthanc,
    have,
    node_config,
    received_outputs,
    run_one_study,
    storescu,
    synthetic_cr,
)
from tests.unit import training_data
from training.__main__ import main

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "storescu", "dciodvfy"), reason="needs Orthanc, DCMTK, dicom3tools"),
]

RECIPES = Path(__file__).resolve().parents[2] / "training" / "recipes"
RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
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
    server.stop(wait=False)


def test_a_recipe_trained_resnet50_runs_in_the_node_and_its_sr_reaches_the_pacs(
    pneumonia_bundle: Path, pacs: Orthanc, tmp_path: Path
) -> None:
    job = run_one_study(tmp_path / "node", pneumonia_bundle, pacs, RG1, "2.1.0", timeout=180)
    assert job["model_version"] == "2.1.0" and [o["kind"] for o in job["outputs"]] == ["sr", "sc", "seg", "gsps"]
    for kind, ds in received_outputs(pacs, job, tmp_path):  # every object in Orthanc, from this model, valid
        if kind == "sr":
            assert ds.SOPClassUID == Comprehensive3DSRStorage
            text = json.dumps(ds.to_json_dict())
            assert "Pneumonia" in text and "No abnormality detected" not in text  # the bundle's one label


def test_two_pipelines_on_one_study_each_bring_their_own_job_and_results(
    pneumonia_bundle: Path, demo_bundle: Path, pacs: Orthanc, tmp_path: Path
) -> None:
    """The pipeline contract is generic: chest_xray (the demo bundle) and a second pipeline id,
    pneumonia (the recipe-trained whole-image bundle, run by the chest_xray code), chosen by
    routing rules, each give the same study its own job, result series, UIDs and SR."""
    cfg = node_config(
        tmp_path / "node", demo_bundle,
        [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "timeout": 10}],
        pipelines={"chest_xray": {"bundle": str(demo_bundle), "device": "cpu"},
                   "pneumonia": {"bundle": str(pneumonia_bundle), "implementation": "chest_xray", "device": "cpu",
                                 "version": "2.1.0", "series_number_base": 9910}},
        routing={"mode": "all", "rules": [
            {"name": "chest-findings", "match": {"Modality": ["CR", "DX"]}, "pipelines": ["chest_xray"]},
            {"name": "pneumonia-screen", "match": {"CallingAE": "ED_CR"}, "pipelines": ["pneumonia"]},
        ]},
    )
    emergency, ward = synthetic_cr(tmp_path / "in", 2)
    emergency_uid, ward_uid = (str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in (emergency, ward))
    node = Node(cfg).start(timeout=120)
    try:
        assert storescu(node.port, emergency, aet="ED_CR").returncode == 0
        assert storescu(node.port, ward, aet="WARD").returncode == 0

        def all_done(rows: list[dict]) -> list[dict] | None:
            jobs = [j for j in rows if j["study_instance_uid"] in (emergency_uid, ward_uid)]
            assert not [j for j in jobs if j["state"] == "failed"], jobs
            return jobs if len(jobs) == 3 and all(j["state"] == "done" for j in jobs) else None

        jobs = node.wait_jobs(all_done, 240, "three jobs: two for the emergency study, one for the ward's")
    finally:
        node.stop(wait=False)
    # Routing chose: the ward's study matches only the chest rule.
    assert [j["pipeline"] for j in jobs if j["study_instance_uid"] == ward_uid] == ["chest_xray"]
    mine = {j["pipeline"]: j for j in jobs if j["study_instance_uid"] == emergency_uid}
    assert set(mine) == {"chest_xray", "pneumonia"}
    assert (mine["chest_xray"]["model_version"], mine["pneumonia"]["model_version"]) == ("0.1.0", "2.1.0")
    uids = {name: {o["sop_instance_uid"] for o in j["outputs"]} | {o["series_instance_uid"] for o in j["outputs"]}
            for name, j in mine.items()}
    assert not uids["chest_xray"] & uids["pneumonia"]  # own series, own instances

    # Orthanc holds both sets in the one study: the source, then each pipeline's four series.
    series = {}
    for se in pacs.study_series(emergency_uid):
        first = pacs.get(f"/instances/{se['Instances'][0]}/tags?simplify")
        series[int(first["SeriesNumber"])] = (first["SOPClassUID"], first.get("SoftwareVersions"), se["Instances"])
    results = {n: v for n, v in series.items() if n >= 9900}
    numbering = {"sr": 1, "sc": 2, "seg": 3, "gsps": 4}  # + the pipeline's series_number_base
    expected = {name: {base + numbering[o["kind"]] for o in mine[name]["outputs"]}
                for name, base in (("chest_xray", 9900), ("pneumonia", 9910))}
    assert set(results) == expected["chest_xray"] | expected["pneumonia"]
    assert {9901, 9911} <= set(results)  # an SR each
    assert {results[n][1] for n in expected["chest_xray"]} == {"0.1.0"}
    assert {results[n][1] for n in expected["pneumonia"]} == {"2.1.0"}
    for n, pipeline in ((9901, "chest_xray"), (9911, "pneumonia")):
        sop_class, _, [instance] = results[n]
        assert sop_class == Comprehensive3DSRStorage
        sr = pydicom.dcmread(BytesIO(pacs.get_bytes(f"/instances/{instance}/file")))
        assert str(sr.SOPInstanceUID) in uids[pipeline]
        text = json.dumps(sr.to_json_dict())
        # each SR carries its own model's findings: the bundle's one label, or the demo's fifteen
        assert ("Pneumonia" in text) and (("Cardiomegaly" in text) == (pipeline == "chest_xray")), pipeline
