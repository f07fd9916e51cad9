"""The vertical slice against real peers: storescu -> pacsnode run -> Orthanc, checked by REST.

Sends RG1 (uncompressed and JPEG 2000), a real JPEG chest radiograph wrapped by img2dcm, and a
CT that routing must skip; then checks what Orthanc holds, validates our objects with dciodvfy,
and reads the jobs back through the CLI's JSON.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    Comprehensive3DSRStorage,
    GrayscaleSoftcopyPresentationStateStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

from tests.peers import CXR_SAMPLES, Node, Orthanc, have, img2dcm, node_config, storescu, wait_for

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.skipif(not have("Orthanc", "storescu", "img2dcm", "dciodvfy"), reason="needs Orthanc, DCMTK, dicom3tools"),
]

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))
RG1_J2K = Path(get_testdata_file("RG1_J2KR.dcm"))
CT = Path(get_testdata_file("CT_small.dcm"))
CXR = CXR_SAMPLES / "pneumonia" / "person1946_bacteria_4874.jpeg"
RESULT_CLASSES = (Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage,
                  GrayscaleSoftcopyPresentationStateStorage)


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop(wait=False)


@pytest.fixture(scope="module")
def running_node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc, demo_bundle: Path) -> Iterator[Node]:
    work = tmp_path_factory.mktemp("node")
    # the bundle `training demo` made with `train` + `export`, named with its version as an
    # admin would pin a bundle they installed
    cfg = node_config(work, demo_bundle, [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1",
                                           "port": pacs.dicom_port, "timeout": 10}],
                      pipelines={"chest_xray": {"bundle": str(demo_bundle), "device": "cpu", "version": "0.1.0"}})
    n = Node(cfg).start(timeout=120)
    yield n
    n.stop(wait=False)
    print(n.log()[-5000:])


def _result_series(pacs: Orthanc, study_uid: str) -> dict[str, list[str]]:
    """SOP class -> instance ids of the series we added (by SOP class of their first instance)."""
    found: dict[str, list[str]] = {}
    for series in pacs.study_series(study_uid):
        first = pacs.get(f"/instances/{series['Instances'][0]}/tags?simplify")
        if first["SOPClassUID"] in RESULT_CLASSES and first.get("Manufacturer") != "DCMTK":
            found.setdefault(first["SOPClassUID"], []).extend(series["Instances"])
    return found


def _dciodvfy_errors(data: bytes, tmp: Path) -> list[str]:
    path = tmp / "obj.dcm"
    path.write_bytes(data)
    out = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _job_for(n: Node, study_uid: str, state: str = "done") -> dict:
    def check(rows: list[dict]) -> dict | None:
        jobs = [j for j in rows if j["study_instance_uid"] == study_uid]
        failed = [j for j in jobs if j["state"] == "failed"]
        assert not failed, f"job failed: {failed[0]['error_stage']}: {failed[0]['error']}"
        return next((j for j in jobs if j["state"] == state), None)

    return n.wait_jobs(check, 180, f"job of study {study_uid} to be {state}")


@pytest.mark.parametrize("source", ["RG1_UNCR", "RG1_J2KR", "cxr-sample"])
def test_radiograph_comes_back_as_sr_and_overlay_in_the_same_study(
    source: str, running_node: Node, pacs: Orthanc, tmp_path: Path
) -> None:
    if source == "cxr-sample":
        path = img2dcm(CXR, tmp_path / "cxr.dcm", "ViewPosition=PA")
        extra: tuple[str, ...] = ("-xy",)  # img2dcm keeps the JPEG: propose JPEG baseline
    else:
        path = RG1 if source == "RG1_UNCR" else RG1_J2K
        extra = ("-xv",) if source == "RG1_J2KR" else ()
    src = pydicom.dcmread(path, stop_before_pixels=True)
    study_uid = str(src.StudyInstanceUID)
    # RG1 in two syntaxes shares one study: the second send is a late arrival, processed again.
    before = {j["id"] for j in running_node.jobs() if j["study_instance_uid"] == study_uid}
    out = storescu(running_node.port, path, extra=extra)
    assert out.returncode == 0, out.stderr

    def new_done_job(rows: list[dict]) -> dict | None:
        jobs = [j for j in rows if j["study_instance_uid"] == study_uid and j["id"] not in before]
        failed = [j for j in jobs if j["state"] == "failed"]
        assert not failed, f"job failed at {failed[0]['error_stage']}: {failed[0]['error']}"
        return next((j for j in jobs if j["state"] == "done"), None)

    job = running_node.wait_jobs(new_done_job, 180, f"a new done job for {source}")
    assert job["pipeline"] == "chest_xray"
    assert job["model_version"] == "0.1.0"
    for key in ("created_at", "queued_at", "running_at", "encoded_at", "sending_at", "done_at"):
        assert job[key], key
    assert {"read", "inference", "encode", "validate", "send"} <= set(job["timings"])
    kinds = [o["kind"] for o in job["outputs"]]
    # By default (export.objects): one SR for the study's processed images, then per image an
    # overlay SC, a lung SEG and a GSPS (a late arrival makes the job process the study's images).
    n = kinds.count("sc")
    assert n >= 1 and kinds == ["sr"] + ["sc"] * n + ["seg"] * n + ["gsps"] * n
    for o in job["outputs"]:
        assert [(s["destination"], s["state"], s["remote_status"]) for s in o["sends"]] == [("orthanc", "sent", 0)]

    results = _result_series(pacs, study_uid)
    sent = {o["sop_instance_uid"] for o in job["outputs"]}
    for sop_class in RESULT_CLASSES:
        assert results.get(sop_class), f"Orthanc lacks the {sop_class} series of study {study_uid}"
    for instance_id in [i for c in RESULT_CLASSES for i in results[c]]:
        data = pacs.get_bytes(f"/instances/{instance_id}/file")
        ds = pydicom.dcmread(BytesIO(data))
        if str(ds.SOPInstanceUID) not in sent:
            continue  # an earlier job's result for the same study
        assert ds.StudyInstanceUID == study_uid
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        assert "AI" in str(ds.get("SeriesDescription", ""))
        assert _dciodvfy_errors(data, tmp_path) == []
        sent.discard(str(ds.SOPInstanceUID))
    assert sent == set(), "some of the job's objects are not in Orthanc"
    if before:
        # A late instance (RG1 J2K joins RG1's study): the new SR replaces the earlier one.
        jobs = {j["id"]: j for j in running_node.jobs()}
        previous = jobs[job["supersedes"]]
        assert previous["state"] == "superseded"
        old_sr = next(o["sop_instance_uid"] for o in previous["outputs"] if o["kind"] == "sr")
        new_sr = next(o for o in job["outputs"] if o["kind"] == "sr")
        sr_id = next(h["ID"] for h in pacs.lookup(new_sr["sop_instance_uid"]) if h["Type"] == "Instance")
        ds = pydicom.dcmread(BytesIO(pacs.get_bytes(f"/instances/{sr_id}/file")))
        refs = [i.ReferencedSOPInstanceUID for st in ds.PredecessorDocumentsSequence
                for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
        assert refs == [old_sr]


def test_ct_is_stored_and_skipped_with_a_reason(running_node: Node, pacs: Orthanc) -> None:
    out = storescu(running_node.port, CT)
    assert out.returncode == 0, out.stderr
    study_uid = str(pydicom.dcmread(CT, stop_before_pixels=True).StudyInstanceUID)

    def skipped() -> dict | None:
        studies = json.loads(running_node.cli("studies", "--json"))
        return next((s for s in studies if s["study_instance_uid"] == study_uid and s["state"] == "skipped"), None)

    study = wait_for(skipped, 30, "the CT study to be skipped", interval=0.3)
    assert study["jobs"] == []
    assert "modality CT" in study["series"][0]["skip_reason"]
    assert pacs.find_study(study_uid) is None  # nothing was sent for it


def test_replay_reruns_a_done_job_with_the_same_result_uids(running_node: Node, pacs: Orthanc) -> None:
    study_uid = str(pydicom.dcmread(RG1, stop_before_pixels=True).StudyInstanceUID)
    done = [j for j in running_node.jobs() if j["study_instance_uid"] == study_uid and j["state"] in ("done", "superseded")]
    if not done:
        assert storescu(running_node.port, RG1).returncode == 0
        done = [_job_for(running_node, study_uid)]
    original = done[0]
    out = json.loads(running_node.cli("replay", str(original["id"]), "--json", "--reason", "test"))
    new_id = out[0]["job"]

    def replayed(rows: list[dict]) -> dict | None:
        j = next(j for j in rows if j["id"] == new_id)
        assert j["state"] != "failed", j["error"]
        return j if j["state"] == "done" else None

    job = running_node.wait_jobs(replayed, 180, "the replayed job")
    assert job["replay_of"] == original["id"]
    # Same images and model: same UIDs, so the PACS is not given duplicates.
    assert [o["sop_instance_uid"] for o in job["outputs"]] == [o["sop_instance_uid"] for o in original["outputs"]]


def test_run_starts_the_inference_workers_configured_and_both_take_jobs(
    tmp_path: Path, pacs: Orthanc, demo_bundle: Path
) -> None:
    """`queue.inference_workers: 2`: `pacsnode run` starts two named inference workers (the cores
    split between them), both load the models, and studies sent together are shared out."""
    from tests.peers import synthetic_cr

    cfg = node_config(tmp_path / "node", demo_bundle, [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1",
                                                        "port": pacs.dicom_port, "timeout": 10}],
                      queue={"inference_workers": 2, "batch_size": 1})
    files = synthetic_cr(tmp_path / "studies", 8, size=256)
    n = Node(cfg).start(timeout=120)
    try:
        wait_for(lambda: n.log().count("pipeline chest_xray loaded") == 2, 180, "two inference workers to load")
        assert storescu(n.port, *files).returncode == 0

        def all_done(rows: list[dict]) -> list[dict] | None:
            assert not [j for j in rows if j["state"] == "failed"], rows
            done = [j for j in rows if j["state"] == "done"]
            return done if len(done) == len(files) else None

        done = n.wait_jobs(all_done, 180, f"{len(files)} jobs done")
        workers = {j["worker"].split("@")[0] for j in done}
        assert workers == {"inference1", "inference2"}, workers
    finally:
        n.stop(wait=False)
