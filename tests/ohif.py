"""OHIF's prebuilt viewer (npm package @ohif/app, its `dist/`) in front of an Orthanc's DICOMweb.

`ohif_dist()` fetches the pinned release once with `npm pack` into a cache outside the checkout
(~/.cache/pacsnode, or $PACSNODE_CACHE); `OhifServer` serves it on a free loopback port and
forwards /dicom-web/ to the PACS on the same origin (OHIF then needs no CORS), with an
app-config.js that points OHIF's DICOMweb data source there. Nothing here is a mock: the
viewer is the released JavaScript, the PACS a real Orthanc.
"""

from __future__ import annotations

import json
import mimetypes
import os
import shutil
import subprocess
import tarfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.peers import free_port

OHIF_VERSION = "3.13.2"
NPM_TIMEOUT_S = 600.0  # the tarball is ~50 MB
PROXY_TIMEOUT_S = 60.0
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length",
               "proxy-authenticate", "proxy-authorization"}  # fmt: skip


def cache_dir() -> Path:
    return Path(os.environ.get("PACSNODE_CACHE", Path.home() / ".cache" / "pacsnode"))


def ohif_dist(version: str = OHIF_VERSION) -> Path:
    """The `dist/` folder of @ohif/app `version`, fetched with `npm pack` on first use (skips the
    test where npm is not installed; fails where the registry cannot be reached)."""
    target = cache_dir() / f"ohif-app-{version}"
    dist = target / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: cannot fetch OHIF's prebuilt viewer")
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([npm, "pack", f"@ohif/app@{version}", "--pack-destination", str(target)],
                   check=True, capture_output=True, timeout=NPM_TIMEOUT_S)  # fmt: skip
    [tarball] = target.glob("ohif-app-*.tgz")
    partial = target / "partial"
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(tarball) as tar:
        tar.extractall(partial, filter="data")  # no paths outside `partial`
    (partial / "package").rename(target / "package")  # whole or nothing: a crash leaves no half dist
    partial.rmdir()
    tarball.unlink()
    return dist


def app_config(name: str = "pacsnode test") -> str:
    """OHIF's window.config: one DICOMweb data source at this origin's /dicom-web."""
    config = {
        "routerBasename": "/",
        "showStudyList": True,
        "extensions": [],
        "modes": [],
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "pacs",
        "dataSources": [{
            "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
            "sourceName": "pacs",
            "configuration": {
                "friendlyName": name,
                "name": "pacs",
                "qidoRoot": "/dicom-web",
                "wadoRoot": "/dicom-web",
                "wadoUriRoot": "/wado",
                "qidoSupportsIncludeField": False,
                "imageRendering": "wadors",
                "thumbnailRendering": "wadors",
                "enableStudyLazyLoad": True,
                "supportsFuzzyMatching": False,
                "supportsWildcard": True,
                "dicomUploadEnabled": False,
                "bulkDataURI": {"enabled": True},
                "omitQuotationForMultipartRequest": True,
            },
        }],
    }  # fmt: skip
    return f"window.config = {json.dumps(config, indent=1)};\n"


class OhifServer:
    """OHIF's dist at / and the PACS's DICOMweb at /dicom-web on one loopback port."""

    def __init__(self, dist: Path, dicomweb_url: str) -> None:
        self.dist = dist.resolve()
        self.dicomweb_url = dicomweb_url.rstrip("/")  # http://host:port/dicom-web
        self.port = free_port()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def viewer_url(self, study_uid: str) -> str:
        """The basic viewer (longitudinal mode) on one study."""
        return f"{self.url}/viewer?StudyInstanceUIDs={study_uid}"

    def start(self) -> OhifServer:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="ohif-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(app: OhifServer) -> type[BaseHTTPRequestHandler]:
    config = app_config().encode()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass  # quiet: OHIF makes hundreds of requests

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.startswith("/dicom-web/"):
                self._forward()
            elif self.path.split("?")[0] == "/app-config.js":
                self._send(200, config, "text/javascript")
            else:
                self._static()

        def do_POST(self) -> None:  # noqa: N802
            self._forward()

        def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _static(self) -> None:
            rel = self.path.split("?")[0].split("#")[0].lstrip("/")
            path = (app.dist / rel).resolve()
            if not path.is_relative_to(app.dist) or not path.is_file():
                path = app.dist / "index.html"  # a single-page app: its routes are index.html
            content_type = "application/wasm" if path.suffix == ".wasm" else (
                mimetypes.guess_type(path.name)[0] or "application/octet-stream")
            self._send(200, path.read_bytes(), content_type)

        def _forward(self) -> None:
            target = app.dicomweb_url + self.path[len("/dicom-web"):]
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
            request = urllib.request.Request(target, data=body, headers=headers, method=self.command)
            try:
                with urllib.request.urlopen(request, timeout=PROXY_TIMEOUT_S) as r:
                    status, data, reply = r.status, r.read(), dict(r.headers.items())
            except urllib.error.HTTPError as e:
                status, data, reply = e.code, e.read(), dict(e.headers.items())
            content_type = reply.pop("Content-Type", "application/octet-stream")
            self._send(status, data, content_type,
                       {k: v for k, v in reply.items() if k.lower() not in _HOP_BY_HOP})  # fmt: skip

    return Handler
