"""The HTTP side of a running `pacsnode run` (tests.peers.Node): its first admin's password,
tokens made with the CLI as an admin would, and a bearer-token client with timeouts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.peers import Node, Orthanc, node_config, wait_for, wait_port

TIMEOUT = httpx.Timeout(30.0, connect=5.0)


def orthanc_for_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Body of a module fixture: a real Orthanc as the PACS, stopped afterwards."""
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        yield server
    finally:
        server.stop(wait=False)


def node_for_module(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc, bundle: Path,
                    destination: str) -> Iterator[Node]:
    """Body of a module fixture: `pacsnode run` (listener, workers, API on a free port) sending
    its results to `pacs` under the destination name given; its log's tail printed at the end."""
    work = tmp_path_factory.mktemp("node")
    cfg = node_config(work, bundle, [{"name": destination, "ae_title": pacs.aet, "host": "127.0.0.1",
                                      "port": pacs.dicom_port, "timeout": 10}])
    n = Node(cfg).start(timeout=120)
    try:
        yield n
    finally:
        n.stop(wait=False)
        print(n.log()[-4000:])


def first_admin_password(node: Node, timeout: float = 60) -> str:
    """The password `pacsnode run` wrote for `admin` on its first start (var/admin-password.txt)."""
    path = node.config_path.parent / "var" / "admin-password.txt"
    wait_for(path.exists, timeout, f"{path} to be written", interval=0.2)
    return path.read_text().split("password: ", 1)[1].strip()


class NodeApi:
    """Requests to the node's API as a script sends them (Authorization: Bearer)."""

    def __init__(self, node: Node, timeout: float = 60) -> None:
        self.node = node
        self.base = f"http://127.0.0.1:{node.api_port}"
        wait_port(node.api_port, timeout)
        wait_for(lambda: httpx.get(f"{self.base}/healthz", timeout=TIMEOUT).status_code == 200, timeout, "the API")
        self.tokens: dict[str, str] = {}

    def user(self, name: str, role: str, password: str) -> str:
        """Add a user with `pacsnode users add` and give them a token (`pacsnode tokens create`)."""
        import subprocess
        import sys

        from tests.peers import REPO

        subprocess.run([sys.executable, "-m", "node.cli", "--config", str(self.node.config_path), "users", "add", name,
                        "--role", role, "--password-stdin"], input=password + "\n", text=True, check=True,
                       capture_output=True, timeout=60, cwd=REPO)
        self.tokens[name] = self.node.cli("tokens", "create", "--user", name).strip()
        return self.tokens[name]

    def request(self, method: str, path: str, as_: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if as_ is not None:
            headers["Authorization"] = f"Bearer {self.tokens[as_]}"
        return httpx.request(method, self.base + path, headers=headers, timeout=TIMEOUT, **kwargs)

    def get(self, path: str, as_: str | None = "admin", **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, as_, **kwargs)

    def post(self, path: str, as_: str | None = "admin", **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, as_, **kwargs)

    def study(self, uid: str) -> dict[str, Any]:
        r = self.get(f"/api/v1/studies/{uid}")
        r.raise_for_status()
        return dict(r.json())

    def wait_job(self, study_uid: str, state: str, timeout: float = 240, after: int = 0) -> dict[str, Any]:
        """The first job of the study with id > after to reach `state` (a failure before it is reported)."""
        def check() -> dict[str, Any] | None:
            r = self.get(f"/api/v1/studies?q={study_uid}")
            if r.status_code != 200 or not r.json()["items"]:
                return None
            jobs = [j for j in self.study(study_uid)["job_details"] if j["id"] > after]
            bad = [j for j in jobs if j["state"] == "failed" and state != "failed"]
            assert not bad, f"job {bad[0]['id']} failed at {bad[0]['error_stage']}: {bad[0]['error']}"
            return next((j for j in jobs if j["state"] == state), None)

        return wait_for(check, timeout, f"a job of study {study_uid} to be {state}", interval=0.5)
