"""Fuzz the C-STORE path with atheris (not in CI: `pip install -e .[fuzz]`).

    nice -n 10 .venv/bin/python bench/fuzz_ingest.py ingest   --seconds 360 --work var/fuzz
    nice -n 10 .venv/bin/python bench/fuzz_ingest.py listener --seconds 300 --work var/fuzz
    .venv/bin/python -m coverage run --source node bench/fuzz_ingest.py replay var/fuzz/corpus-ingest --listener

Mode `ingest` feeds mutated encoded instances straight into `node.handlers.ingest()` with a temp
spool and database; mode `listener` sends them to a live listener over a socket, either as the
file sent by pynetdicom's SCU, its data set bytes in a well-formed C-STORE-RQ (past any SCU
check), raw bytes as the first PDU, or as a P-DATA-TF after a well-formed association, and
checks after every batch that the listener still answers C-ECHO. Seeds are real files
(pydicom-data's RG1 cut down, CT/MR, malformed test files, img2dcm-wrapped shared/data/cxr-samples).

A finding is: an exception other than StoreRefused out of ingest(), a hang (libFuzzer's
-timeout in process; a C-STORE the listener does not answer within its DIMSE timeout), a file
written outside the spool, a staged file left in the spool's incoming folder after its request
is over, or a listener that stops answering C-ECHO. Each unique finding (by kind and innermost
frame) is saved under WORK/findings/ and the run goes on.

`replay` runs a corpus through ingest() and, with --listener, through a live listener too, so
that coverage.py sees both paths (node/handlers.py, node/dimse.py, node/spool.py).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import atheris  # noqa: E402  (a fuzz-only dependency, imported before the instrumented modules)

with atheris.instrument_imports(include=["node", "pydicom", "pynetdicom"]):
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from node.cli import db_upgrade
    from node.config import Config, parse_config
    from node.handlers import IngestContext, StoreRefused, ingest
    from node.listener import start_listener
    from node.spool import INCOMING

from tests.peers import free_port  # noqa: E402

SEED_FILES = ["CT_small.dcm", "MR_small.dcm", "bad_sequence.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm",
              "JPEG2000.dcm", "rtplan.dcm", "SC_rgb_rle.dcm", "no_meta.dcm", "ExplVR_BigEnd.dcm",
              "image_dfl.dcm", "OBXXXX1A.dcm", "liver_1frame.dcm"]
CHECK_EVERY = 25  # listener mode: C-ECHO after this many inputs
MAX_LEN = 64 * 1024


def seeds(out: Path) -> list[Path]:
    """Write the seed corpus: small real instances plus malformed variants."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SEED_FILES:
        try:
            src = get_testdata_file(name)
        except (ValueError, OSError):
            continue
        if isinstance(src, str) and os.path.getsize(src) <= MAX_LEN:
            written.append(out / name)
            shutil.copy(src, written[-1])
    # RG1 (CR chest, 7 MB) with its real header and a 32x32 crop of its pixels.
    rg1 = pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))
    rg1.PixelData = np.ascontiguousarray(rg1.pixel_array[:32, :32]).tobytes()
    rg1.Rows = rg1.Columns = 32
    rg1.save_as(out / "rg1_crop.dcm", enforce_file_format=True)
    written.append(out / "rg1_crop.dcm")
    data = (out / "rg1_crop.dcm").read_bytes()
    for label, variant in (("truncated", data[: len(data) - 700]), ("no_preamble", data[128:]),
                           ("meta_only", data[:400])):
        written.append(out / f"rg1_{label}.dcm")
        written[-1].write_bytes(variant)
    # The shared chest radiographs, shrunk (JPEG re-encoded small) and wrapped by DCMTK's img2dcm.
    cxr = REPO.parent / "shared" / "data" / "cxr-samples"
    if shutil.which("img2dcm") and cxr.is_dir():
        from PIL import Image

        for jpeg in sorted(cxr.rglob("*.jp*g"))[:4]:
            small = out / f"{jpeg.stem}.small.jpg"
            Image.open(jpeg).convert("L").resize((48, 48)).save(small, quality=80)
            dcm = out / f"cxr_{jpeg.stem}.dcm"
            subprocess.run(["img2dcm", "-k", "BodyPartExamined=CHEST", str(small), str(dcm)],
                           check=True, capture_output=True, timeout=60)
            small.unlink()
            written.append(dcm)
    return written


def make_config(work: Path) -> Config:
    raw = {
        "listener": {"host": "127.0.0.1", "port": free_port(), "allowed_callers": [{"ae_title": "FUZZ"}],
                     "timeouts": {"acse": 5, "dimse": 5, "network": 5}},
        "storage": {"path": str(work / "spool"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{work / 'db.sqlite'}"},
        # The identifier key file is written there on the first keyed hash: a configured place.
        "api": {"state_dir": str(work / "state")},
    }
    cfg = parse_config(raw)
    db_upgrade(cfg)
    return cfg


def tree(root: Path, exclude: set[Path]) -> dict[str, tuple[int, int]]:
    """Files under root (size, mtime_ns), skipping the given folders/files (the spool, the db)."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = [n for n in dirnames if d / n not in exclude]
        for n in filenames:
            p = d / n
            if p in exclude or n.startswith("db.sqlite"):
                continue
            st = p.stat()
            found[str(p)] = (st.st_size, st.st_mtime_ns)
    return found


def leftovers(cfg: Config) -> list[str]:
    """Staged files still in the spool's incoming folder."""
    folder = cfg.storage.path / INCOMING
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


class Findings:
    """Unique findings by signature, saved with the input and the traceback."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.seen: set[str] = {p.stem for p in folder.glob("*.txt")}
        self.count = 0

    def add(self, kind: str, data: bytes, detail: str, where: str) -> None:
        self.count += 1
        sig = hashlib.sha1(f"{kind}:{where}".encode()).hexdigest()[:12]
        if sig in self.seen:
            return
        self.seen.add(sig)
        (self.folder / f"{sig}.bin").write_bytes(data)
        (self.folder / f"{sig}.txt").write_text(f"{kind} at {where}\n\n{detail}")
        print(f"\n=== finding {sig}: {kind} at {where}", file=sys.stderr, flush=True)


def _where(e: BaseException) -> str:
    tb = traceback.extract_tb(e.__traceback__)
    frame = tb[-1] if tb else None
    return f"{type(e).__name__} {frame.filename}:{frame.lineno}" if frame else type(e).__name__


class IngestTarget:
    """Mode A: ingest() in process; findings are other exceptions and writes outside the spool."""

    def __init__(self, work: Path, findings: Findings) -> None:
        self.work = work
        self.cfg = make_config(work)
        self.ctx = IngestContext(self.cfg)
        self.findings = findings
        # The run's own folder is the working directory too (fuzz() changes into it), so a
        # relative path built from the wire would land here and be seen.
        self.exclude = {self.cfg.storage.path, self.cfg.api.state_dir}
        self.before = {str(work): tree(work, self.exclude)}
        self.runs = 0
        self.outcomes: dict[str, int] = {}

    def __call__(self, data: bytes) -> None:
        self.runs += 1
        try:
            ingest(data, self.ctx, "FUZZ")
            self.outcomes["stored"] = self.outcomes.get("stored", 0) + 1
        except StoreRefused as e:
            key = f"0x{e.status:04X}"
            self.outcomes[key] = self.outcomes.get(key, 0) + 1
        except Exception as e:  # the finding we are looking for
            self.findings.add("exception", data, traceback.format_exc(), _where(e))
        left = leftovers(self.cfg)
        if left:
            self.findings.add("staged file left behind", data, "\n".join(left), "ingest")
            for name in left:
                (self.cfg.storage.path / INCOMING / name).unlink()
        if self.runs % 200 == 0:
            self.check_tree(data)

    def check_tree(self, data: bytes) -> None:
        for root, old in self.before.items():
            new = tree(Path(root), self.exclude)
            added = sorted(set(new) - set(old))
            if added:
                self.findings.add("write outside spool", data, "\n".join(added[:20]), root)
                old.update(new)


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


class ListenerTarget:
    """Mode B: a live listener; each input goes over a socket as a C-STORE dataset or raw PDUs."""

    def __init__(self, work: Path, findings: Findings) -> None:
        self.cfg = make_config(work)
        self.ctx = IngestContext(self.cfg)
        self.server = start_listener(self.cfg, self.ctx)
        self.work = work
        self.port = self.cfg.listener.port
        self.findings = findings
        self.scu = AE(ae_title="FUZZ")
        self.scu.acse_timeout = self.scu.dimse_timeout = self.scu.network_timeout = 5
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom.sop_class import (  # type: ignore[attr-defined]
            ComputedRadiographyImageStorage,
            CTImageStorage,
            MRImageStorage,
            SecondaryCaptureImageStorage,
            Verification,
        )

        for sop in (CTImageStorage, MRImageStorage, ComputedRadiographyImageStorage, SecondaryCaptureImageStorage):
            self.scu.add_requested_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.scu.add_requested_context(Verification)
        self.tmp = work / "send.dcm"
        # The listener runs in this process, whose working directory is the run's folder: a path
        # built from the wire would land there. The spool, the state folder and our input are expected.
        self.exclude = {self.cfg.storage.path, self.cfg.api.state_dir, self.tmp}
        self.before = tree(work, self.exclude)
        self.runs = 0
        self.pending: list[bytes] = []
        self.outcomes: dict[str, int] = {}

    def _count(self, key: str) -> None:
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def __call__(self, data: bytes) -> None:
        self.runs += 1
        self.pending.append(data)
        mode = data[0] % 4 if data else 0
        try:
            if mode == 0:  # the mutated file sent by pynetdicom's SCU, as a modality would
                self.store(data)
            elif mode == 1:  # its data set bytes in a well-formed C-STORE-RQ, whatever they are
                self.store_raw(data)
            elif mode == 2:  # raw bytes as the first PDU (before any association)
                self.raw(data[1:])
            else:  # raw bytes as P-DATA-TF after a well-formed association
                self.raw_after_associate(data[1:])
        except Exception as e:
            self.findings.add("scu side", data, traceback.format_exc(), _where(e))
        if self.runs % CHECK_EVERY == 0:
            self.check_alive()

    def store(self, data: bytes) -> None:
        self.tmp.write_bytes(data)
        try:
            pydicom.dcmread(self.tmp, stop_before_pixels=True)  # file meta and SOP class for the SCU
        except Exception:  # noqa: BLE001 (unparsable here: send it as raw PDUs instead)
            self.raw_after_associate(data)
            return
        assoc = self.scu.associate("127.0.0.1", self.port, ae_title="PACSNODE")
        if not assoc.is_established:
            self._count("not established")
            return
        try:
            status = assoc.send_c_store(self.tmp)
            if "Status" in status:
                self._count(f"0x{status.Status:04X}")
            else:  # no response within the DIMSE timeout: the listener hung on it
                self.findings.add("C-STORE not answered", data, f"association {assoc}", "store")
        except Exception as e:  # noqa: BLE001 (pynetdicom as the SCU could not encode or send it)
            self._count(f"scu refused: {type(e).__name__}")
        finally:
            assoc.release()

    def store_raw(self, data: bytes) -> None:
        """C-STORE-RQ on context 1 (CT Image Storage, explicit VR little endian) whose data set is
        the input after its file meta, if it has one: no SCU-side check stands in the way."""
        start = 0
        if data[128:132] == b"DICM" and len(data) >= 144:
            start = 144 + struct.unpack("<I", data[140:144])[0]  # (0002,0000) group length
        if not data[start:]:
            # pynetdicom would announce a data set (0x0001) and send none: the listener rightly
            # waits for it until its network timeout. Not a test of anything.
            self._count("raw: no data set")
            return
        rq = C_STORE()
        rq.MessageID = 1
        rq.AffectedSOPClassUID = CTImageStorage
        rq.AffectedSOPInstanceUID = generate_uid()
        rq.Priority = 2
        rq.DataSet = BytesIO(data[start:])
        msg = C_STORE_RQ()
        msg.primitive_to_message(rq)
        assoc = self.scu.associate("127.0.0.1", self.port, ae_title="PACSNODE")
        if not assoc.is_established:
            self._count("not established")
            return
        # As Association.send_c_store does: pause the SCU's reactor so that it leaves the response to us.
        assoc._reactor_checkpoint.clear()
        while not assoc._is_paused:
            time.sleep(0.0001)
        try:
            for pdata in msg.encode_msg(1, 16384):
                assoc.dul.send_pdu(pdata)
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            assoc._reactor_checkpoint.set()
        if rsp is not None and getattr(rsp, "Status", None) is not None:
            self._count(f"raw 0x{rsp.Status:04X}")
        elif assoc.is_aborted:
            self._count("raw aborted")
        else:
            self.findings.add("C-STORE not answered", data, "raw C-STORE", "store_raw")
        if assoc.is_established:
            assoc.release()

    def raw(self, payload: bytes) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.settimeout(5)
            try:
                s.sendall(payload)
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            except (ConnectionResetError, BrokenPipeError, TimeoutError):
                pass
        self._count("raw")

    def raw_after_associate(self, payload: bytes) -> None:
        assoc = self.scu.associate("127.0.0.1", self.port, ae_title="PACSNODE")
        if not assoc.is_established:
            self._count("not established")
            return
        sock = assoc.dul.socket.socket  # type: ignore[union-attr]
        try:
            # One presentation data value: context 1, last command fragment flag, the fuzz bytes.
            pdv = struct.pack(">IBB", len(payload) + 2, 1, 0x03) + payload
            sock.sendall(_pdu(0x04, pdv))
            time.sleep(0.01)
        except OSError:
            pass
        assoc.abort()
        self._count("raw after associate")

    def check_alive(self) -> None:
        assoc = self.scu.associate("127.0.0.1", self.port, ae_title="PACSNODE")
        ok = assoc.is_established and "Status" in (st := assoc.send_c_echo()) and st.Status == 0
        if assoc.is_established:
            assoc.release()
        batch = b"".join(self.pending[-CHECK_EVERY:])
        if not ok:
            self.findings.add("listener stopped answering C-ECHO", batch, f"after {self.runs} inputs", "check_alive")
        # Every association of the batch is over: the listener has had a moment to clean up.
        deadline = time.monotonic() + 5
        while leftovers(self.cfg) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = leftovers(self.cfg)
        if left:
            self.findings.add("staged file left behind", batch, "\n".join(left), "listener")
            for name in left:
                (self.cfg.storage.path / INCOMING / name).unlink(missing_ok=True)
        added = sorted(set(tree(self.work, self.exclude)) - set(self.before))
        if added:
            self.findings.add("write outside spool", batch, "\n".join(added[:20]), str(self.work))
            self.before = tree(self.work, self.exclude)
        self.pending.clear()


def fuzz(mode: str, seconds: int, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"corpus-{mode}"
    if not corpus.is_dir() or not any(corpus.iterdir()):
        seeds(corpus)
    findings = Findings(work / "findings")
    state = Path(tempfile.mkdtemp(prefix=f"fuzz-{mode}-", dir=work))
    os.chdir(state)
    target = IngestTarget(state, findings) if mode == "ingest" else ListenerTarget(state, findings)
    start = time.monotonic()

    def one(data: bytes) -> None:
        target(data)

    import atexit

    def report() -> None:
        took = time.monotonic() - start
        print(f"\n{mode}: {target.runs} executions in {took:.0f} s ({target.runs / max(took, 1):.0f}/s); "
              f"{findings.count} findings ({len(findings.seen)} unique); outcomes {target.outcomes}",
              file=sys.stderr, flush=True)
        if isinstance(target, ListenerTarget):
            target.check_alive()
            target.server.shutdown()

    atexit.register(report)
    args = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", "-timeout=30", f"-max_len={MAX_LEN}",
            "-rss_limit_mb=3072", "-print_final_stats=1", f"-artifact_prefix={work}/findings/"]
    atheris.Setup(args, one)
    atheris.Fuzz()


def replay(corpus: Path, listener: bool) -> None:
    """Run every corpus file once through ingest() (and a live listener), for coverage.py;
    print the outcome counts."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        findings = Findings(work / "findings")
        targets: list[IngestTarget | ListenerTarget] = [IngestTarget(work / "ingest", findings)]
        if listener:
            targets.append(ListenerTarget(work / "listener", findings))
        inputs = [p.read_bytes() for p in sorted(corpus.iterdir()) if p.is_file()]
        for target in targets:
            for data in inputs:
                target(data)
            print(f"replayed {target.runs} inputs through {type(target).__name__}: {target.outcomes}")
            if isinstance(target, ListenerTarget):
                target.check_alive()
                target.server.shutdown()
        print(f"{findings.count} findings ({len(findings.seen)} unique)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["ingest", "listener", "replay", "seeds"])
    p.add_argument("path", nargs="?", type=Path, help="replay/seeds: the corpus folder")
    p.add_argument("--seconds", type=int, default=360)
    p.add_argument("--work", type=Path, default=REPO / "var" / "fuzz")
    p.add_argument("--listener", action="store_true", help="replay: through a live listener too")
    a = p.parse_args()
    if a.mode == "replay":
        replay(a.path, a.listener)
    elif a.mode == "seeds":
        print("\n".join(map(str, seeds(a.path))))
    else:
        fuzz(a.mode, a.seconds, a.work.resolve())


if __name__ == "__main__":
    main()
