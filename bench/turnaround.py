"""Turnaround benchmark: sender's association release -> SR stored in a real Orthanc.

Starts Orthanc and `pacsnode run` (embedded mode), sends RG1_UNCR.dcm N times as new studies
with a pynetdicom SCU (TCP_NODELAY), and reads from the node's database when Orthanc answered
the SR's C-STORE. Prints the median turnaround less the quiet time; the node's own part of it
(the turnaround less the models' time: segmentation, classification and heatmap, measured in the
same job; for a compressed image less its decode too, which the targets allow) against the
150 ms target; the turnaround against the models' time + 150 ms and against 0.3 s (each plus
the decode for a compressed image); a plain storescu -> Orthanc
store of the same file measured in the same run; the PACS's part of the SR's path (the same SR,
under a new SOP Instance UID, sent to Orthanc by node.export.send_files alone: association and
C-STORE, no database or queue); and the stage breakdown (the SR's path: encode_sr,
validate_sr, uid_check_sr = what earlier outputs hold under its UID, then sr_store_queue_send =
writing it to the spool, queueing its export, the export worker picking it up and the C-STORE
until Orthanc answered). The first study after the node started is printed apart, not in the
medians.

    python bench/turnaround.py [--runs 5] [--bundle models/chest_xray] [--objects sr,seg,sc,gsps]
                               [--image RG1_UNCR.dcm | RG1_J2KR.dcm | a file] [--keep-association SECONDS]

--objects: what the destination receives (the node builds only that); `--objects sr` shows what
drawing the other objects while the SR is being sent costs the SR (two cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from pynetdicom import AE, evt  # noqa: E402

from node.dimse import tune_connection  # noqa: E402
from tests.peers import Node, Orthanc, node_config, storescu, wait_for  # noqa: E402

QUIET = 0.3


def send(port: int, ds: pydicom.Dataset) -> float:
    """C-STORE ds and release; return the wall-clock time of the release."""
    ae = AE(ae_title="BENCHSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(str(ds.SOPClassUID), [str(ds.file_meta.TransferSyntaxUID)])
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE", evt_handlers=[(evt.EVT_CONN_OPEN, tune_connection)])
    assert assoc.is_established, "association refused"
    status = assoc.send_c_store(ds)
    assert int(status.Status) == 0, status
    assoc.release()
    return time.time()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "chest_xray")
    p.add_argument("--gap", type=float, default=2.0, help="seconds between studies")
    p.add_argument("--objects", default="sr,seg,sc,gsps", help="result objects the destination receives")
    p.add_argument("--image", default="RG1_UNCR.dcm", help="a pydicom-data test file (RG1_J2KR.dcm: JPEG 2000) or a path")
    p.add_argument("--keep-association", type=float, default=None, metavar="SECONDS",
                   help="export.keep_association_seconds (default: the node's); 0 releases after each send")
    args = p.parse_args()
    if not (args.bundle / "configs" / "metadata.json").exists():
        subprocess.run([sys.executable, "-m", "training", "demo", "--out", str(args.bundle)], check=True, cwd=REPO)
    rg1 = Path(args.image) if Path(args.image).is_file() else Path(str(get_testdata_file(args.image)))
    meta = pydicom.dcmread(rg1, stop_before_pixels=True)
    compressed = meta.file_meta.TransferSyntaxUID.is_compressed
    image = (f"{rg1.name}, {meta.Modality} {meta.Rows}x{meta.Columns}, "
             f"{meta.file_meta.TransferSyntaxUID.name if compressed else 'uncompressed'}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pacs = Orthanc(work / "orthanc").start()
        try:
            # Reference in the same run: a plain store of the same file straight into Orthanc.
            t0 = time.perf_counter()
            # storescu proposes uncompressed syntaxes unless told: a JPEG 2000 file travels as it is.
            proposes = {"1.2.840.10008.1.2.4.90": ("-xv",), "1.2.840.10008.1.2.4.91": ("-xw",)}
            out = storescu(pacs.dicom_port, rg1, aec=pacs.aet,
                           extra=proposes.get(str(meta.file_meta.TransferSyntaxUID), ()))
            plain_store = time.perf_counter() - t0
            assert out.returncode == 0, out.stderr
            cfg = node_config(work / "node", args.bundle.resolve(),
                              [{"name": "orthanc", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
                                "objects": args.objects.split(",")}],
                              completion={"quiet_seconds": QUIET},  # the default poll period
                              **({"export": {"keep_association_seconds": args.keep_association}}
                                 if args.keep_association is not None else {}))
            node = Node(cfg).start(timeout=300)
            try:
                # The first study is reported apart: it may wait for a worker still starting.
                rows, studies = [], []
                for _ in range(args.runs + 1):
                    # Each study arrives at an idle node and PACS: the previous one's background
                    # work (Orthanc indexes what it stored; StableAge is 1 s) is not measured here.
                    time.sleep(args.gap)
                    study, row = run_once(node, pacs, rg1)
                    rows.append(row)
                    studies.append(study)
                first, rows = rows[0], rows[1:]
                sr_send = pacs_sr_store(node, studies[-1])
            finally:
                node.stop()
        finally:
            pacs.stop()
    for r in rows:
        print("  run:", {k: round(v * 1000, 1) for k, v in r.items()})
    report(rows, plain_store, sr_send, args.objects, image, compressed)
    # What a worker still loads or touches first on a real study shows here (its queue wait is
    # the worker's start, when the study came before it was ready).
    print("  first:", {k: round(v * 1000, 1) for k, v in first.items()})
    print(f"first study after the node started (not in the medians): turnaround {first['turnaround_less_quiet']:.3f} s, "
          f"SR encode {first['encode_sr'] * 1000:.0f} ms, all objects' encode {first['encode_all'] * 1000:.0f} ms, "
          f"models {first['models'] * 1000:.0f} ms")
    return 0


def jobs_of(node: Node, study_uid: str) -> list[dict]:
    """The study's jobs, read from the node's database in this process: polling through the
    CLI would start a Python process every poll and steal the CPU being measured."""
    from sqlalchemy import select

    from node.db.models import Job, Study
    from node.db.session import session_scope
    from node.jobs import job_to_dict

    with session_scope(node.config["database"]["url"]) as s:
        return [job_to_dict(j) for j in s.scalars(select(Job).join(Study).where(Study.study_instance_uid == study_uid))]


def run_once(node: Node, pacs: Orthanc, rg1: Path) -> tuple[str, dict[str, float]]:
    """Send RG1 as a new study; return its Study Instance UID and the timings of its job."""
    ds = pydicom.dcmread(rg1)
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    released = send(node.port, ds)
    study = str(ds.StudyInstanceUID)

    def done() -> dict | None:
        jobs = jobs_of(node, study)
        if jobs and jobs[0]["state"] == "failed":
            raise RuntimeError(jobs[0]["error"])
        return jobs[0] if jobs and jobs[0]["state"] == "done" else None

    job = wait_for(done, 120, "job done", interval=0.05)
    assert pacs.find_study(study), "Orthanc does not have the study"
    sr = next(o for o in job["outputs"] if o["kind"] == "sr")
    sr_stored = datetime.fromisoformat(sr["sends"][0]["sent_at"]).timestamp()

    def at(key: str) -> float:
        return datetime.fromisoformat(job[key]).timestamp()

    t = job["timings"]
    turnaround = sr_stored - released - QUIET
    # The models' time: the pipeline less decoding the image (the node's own work for an
    # uncompressed image; the targets allow it on top for a compressed one).
    models = t["inference"] - t["inference_decode"]
    return study, {
        "turnaround_less_quiet": turnaround,
        "models": models,
        "node_own_work": turnaround - models,
        "release_to_queued": at("queued_at") - released - QUIET,
        "queue_wait": at("running_at") - at("queued_at"),
        "read": t["read"], "decode": t["inference_decode"], "segmentation": t["inference_segmentation"],
        "classification": t["inference_classification"], "heatmap": t["inference_heatmap"], "pipeline": t["inference"],
        "keep_outputs": t.get("keep_outputs", 0.0),  # the model outputs kept for replays (node/engine/model_outputs.py)
        "encode_sr": t["encode_sr"], "validate_sr": t["validate_sr"],
        # what earlier outputs hold under the SR's UID (node/engine/revisions.py)
        "uid_check_sr": t.get("uids_sr", 0.0),
        "sr_store_queue_send": sr_stored - at("running_at") - t["read"] - t["inference"] - t.get("keep_outputs", 0.0)
        - t["encode_sr"] - t["validate_sr"] - t.get("uids_sr", 0.0),
        "encode_all": t["encode"], "validate_all": t.get("validate", 0.0),
        # the worker's whole span: the SR's path, then the other objects drawn and judged
        "running_to_encoded": at("encoded_at") - at("running_at"),
        "encoded_to_sending": at("sending_at") - at("encoded_at"),
        "send_all_objects": t["send"],
    }


def pacs_sr_store(node: Node, study_uid: str, repeat: int = 5) -> float:
    """Median seconds for node.export.send_files to store the study's SR (as a new instance) in
    Orthanc: the PACS's and the network's part of the SR's path, without database or queue."""
    from sqlalchemy import select

    from node.config import load_config
    from node.db.models import Job, Output, Study
    from node.db.session import session_scope
    from node.export import send_files
    from node.spool import resolve

    config = load_config(node.config_path)
    with session_scope(config.database.url) as s:
        relpath = s.scalars(select(Output.path).join(Job).join(Study).where(
            Study.study_instance_uid == study_uid, Output.kind == "sr")).one()
    sr = pydicom.dcmread(resolve(config.storage.path, relpath))
    [dest] = config.destinations
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(repeat):
            sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = Path(tmp) / f"sr{n}.dcm"
            sr.save_as(path, enforce_file_format=True)
            time.sleep(0.5)
            t0 = time.time()
            [out] = send_files(dest, [path], config.export.calling_ae_title)
            assert out.ok, out.error
            times.append(out.at.timestamp() - t0)
    return statistics.median(times)


def report(rows: list[dict[str, float]], plain_store: float, sr_send: float, objects: str, image: str,
           compressed: bool) -> None:
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(f"runs: {len(rows)} ({image}; quiet time {QUIET} s subtracted; objects: {objects})")
    for k, v in med.items():
        print(f"  {k:24s} {v * 1000:8.1f} ms")
    tt, own, models = med["turnaround_less_quiet"], med["node_own_work"], med["models"]
    # A compressed image's decode is allowed on top of each target; an uncompressed one's is own work.
    allowed = statistics.median(r["decode"] for r in rows) if compressed else 0.0
    plus = f" + decode {allowed:.3f} s" if compressed else ""
    print(f"turnaround (median)         {tt:.3f} s   ratio to the 0.3 s{plus} target: {tt / (0.3 + allowed):.2f}")
    print(f"models (median)             {models:.3f} s   turnaround / (models + 0.15 s{plus}): "
          f"{tt / (models + 0.15 + allowed):.2f}")
    print(f"node's own work (median)    {own - allowed:.3f} s   ratio to the 0.15 s target: {(own - allowed) / 0.15:.2f}   "
          f"own / models: {(own - allowed) / models:.2f}"
          + (" (turnaround less models and decode)" if compressed else " (turnaround less models; decode included)"))
    print(f"reference: storescu -> Orthanc plain store of the same file: {plain_store:.3f} s "
          f"(turnaround / plain store = {tt / plain_store:.1f}x)")
    print(f"reference: the same SR sent to Orthanc by node.export.send_files alone (association + C-STORE): {sr_send * 1000:.1f} ms; "
          f"own work less it: {(own - allowed - sr_send) * 1000:.1f} ms")
    print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
          "(a shared machine inflates every stage; compare ratios)")
    print(json.dumps({"median": med, "plain_store_s": plain_store, "pacs_sr_store_s": sr_send}))


if __name__ == "__main__":
    sys.exit(main())
