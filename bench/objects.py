"""Per-object cost on one image: build, validate, send over C-STORE and STOW-RS, read back.

    python bench/objects.py --bundle models/chest_xray [--image some.dcm] [--repeat 5]

Starts a throwaway Orthanc (with the DICOMweb plugin) and prints the median seconds per step.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    from node.config import parse_config
    from node.export import ObjectRef, confirm_held, send_files
    from node.writers.gsps import build_presentation_state
    from node.writers.sc import build_overlay_sc
    from node.writers.seg import build_segmentation
    from node.writers.sr import build_comprehensive_3d_sr
    from node.writers.uids import result_uid
    from node.writers.validate import validate
    from pipelines.registry import load_pipeline
    from tests.peers import Orthanc

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=REPO / "models" / "chest_xray")
    p.add_argument("--image", type=Path, default=Path(str(get_testdata_file("RG1_UNCR.dcm"))))
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)

    source = pydicom.dcmread(args.image)
    pipeline = load_pipeline("chest_xray", args.bundle, "cpu")
    [result] = pipeline.run([source])
    builders = {
        "sr": lambda **ids: build_comprehensive_3d_sr([source], [result], pipeline.model, **ids),
        "sc": lambda **ids: build_overlay_sc(source, result, pipeline.model, **ids),
        "seg": lambda **ids: build_segmentation(source, result, pipeline.model, **ids),
        "gsps": lambda **ids: build_presentation_state(source, result, pipeline.model, **ids),
    }
    with tempfile.TemporaryDirectory(prefix="pacsnode-bench-") as tmp:
        pacs = Orthanc(Path(tmp) / "orthanc", allow_find=True, dicomweb=True).start()
        try:
            dimse, web = parse_config({"destinations": [
                {"name": "dimse", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port,
                 "confirm": "cfind"},
                {"name": "web", "protocol": "stow", "url": pacs.dicomweb_url, "confirm": "qido"},
            ]}).destinations
            print(f"{args.image.name} {source.Rows}x{source.Columns}, median of {args.repeat} (s)")
            print(f"{'object':6} {'build':>7} {'validate':>9} {'c-store':>8} {'stow-rs':>8} {'c-find':>7} {'qido':>7} {'kB':>6}")
            for kind, build in builders.items():
                t: dict[str, list[float]] = {k: [] for k in ("build", "validate", "dimse", "stow", "cfind", "qido")}
                for n in range(args.repeat):
                    ids = {"series_instance_uid": result_uid("bench", kind, "series"),
                           "sop_instance_uid": result_uid("bench", kind, str(n)), "series_number": 1,
                           "instance_number": n + 1, "content_datetime": datetime.datetime.now()}
                    t0 = time.perf_counter()
                    ds = build(**ids)
                    t["build"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    assert validate(ds) == []
                    t["validate"].append(time.perf_counter() - t0)
                    path = Path(tmp) / f"{kind}.dcm"
                    ds.save_as(path, enforce_file_format=True)
                    ref = ObjectRef(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID),
                                    str(ds.SOPClassUID))
                    for dest, send_key, confirm_key in ((dimse, "dimse", "cfind"), (web, "stow", "qido")):
                        t0 = time.perf_counter()
                        [out] = send_files(dest, [path], "PACSNODE")
                        t[send_key].append(time.perf_counter() - t0)
                        assert out.ok, out.error
                        t0 = time.perf_counter()
                        assert confirm_held(dest, [ref], "PACSNODE") == {ref.sop_uid: None}
                        t[confirm_key].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) for k, v in t.items()}
                print(f"{kind:6} {med['build']:7.3f} {med['validate']:9.3f} {med['dimse']:8.3f} {med['stow']:8.3f} "
                      f"{med['cfind']:7.3f} {med['qido']:7.3f} {path.stat().st_size / 1000:6.0f}")
        finally:
            pacs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
