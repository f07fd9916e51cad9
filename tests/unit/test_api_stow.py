"""STOW-RS over real HTTP (uvicorn on a free port): dicomweb-client and curl as clients."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import uvicorn
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file
from sqlalchemy import select

from node.api.app import create_app
from node.db.models import Instance, Study
from node.db.session import session_scope
from tests.unit.api_data import Api, make_api

CT = Path(get_testdata_file("CT_small.dcm"))
MR = Path(get_testdata_file("MR_small.dcm"))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Api, str]]:
    api = make_api(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(api.config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield api, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _stored(api: Api) -> set[str]:
    with session_scope(api.config.database.url) as s:
        return set(s.scalars(select(Instance.sop_instance_uid)))


def test_stow_with_dicomweb_client_stores_through_ingest(served: tuple[Api, str]) -> None:
    api, base = served
    client = DICOMwebClient(f"{base}/dicom-web", headers={"Authorization": f"Bearer {api.tokens['operator']}"})
    datasets = [pydicom.dcmread(CT), pydicom.dcmread(MR)]
    response = client.store_instances(datasets)
    refs = {str(it.ReferencedSOPInstanceUID) for it in response.ReferencedSOPSequence}
    assert refs == {str(ds.SOPInstanceUID) for ds in datasets} == _stored(api)
    with session_scope(api.config.database.url) as s:
        # Like an association release: the quiet timer of completion has started.
        assert all(st.released_at is not None for st in s.scalars(select(Study)))


def test_stow_with_curl_reports_failed_parts_and_refuses_viewers(served: tuple[Api, str], tmp_path: Path) -> None:
    api, base = served
    assert shutil.which("curl")
    boundary = "pacsnodeBOUNDARY"
    body = b"".join([
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), CT.read_bytes(), b"\r\n",
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), b"not a dicom file at all", b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ])
    (tmp_path / "body").write_bytes(body)
    ctype = f'Content-Type: multipart/related; type="application/dicom"; boundary={boundary}'

    def curl(token: str) -> tuple[int, str]:
        out = subprocess.run(["curl", "-sS", "--max-time", "30", "-w", "\n%{http_code}", "-X", "POST", "-H", ctype,
                              "-H", f"Authorization: Bearer {token}", "--data-binary", f"@{tmp_path / 'body'}",
                              f"{base}/dicom-web/studies"], capture_output=True, text=True, timeout=60, check=True)
        text, _, code = out.stdout.rpartition("\n")
        return int(code), text

    code, text = curl(api.tokens["operator"])
    assert code == 202, text  # some stored, some failed
    resp = json.loads(text)
    assert resp["00081199"]["Value"][0]["00081155"]["Value"] == [str(pydicom.dcmread(CT).SOPInstanceUID)]
    failed = resp["00081198"]["Value"]
    assert len(failed) == 1 and failed[0]["00081197"]["Value"] == [0xC210]  # cannot understand
    assert _stored(api) == {str(pydicom.dcmread(CT).SOPInstanceUID)}
    assert curl(api.tokens["viewer"])[0] == 403
    assert curl("pn_forged")[0] == 401
    # Counted like C-STOREs, and the refusal audited with who sent it.
    text = api.client.get("/metrics", headers=api.as_("viewer")).text
    assert 'pacsnode_instances_received_total{status="0x0000"} 1.0' in text
    assert 'pacsnode_instances_refused_total{status="0xC210"} 1.0' in text
    from node.db.models import Event

    with session_scope(api.config.database.url) as s:
        assert s.scalar(select(Event.actor).where(Event.kind == "store_refused")) == "api:operator"
