"""Per-request HTTP timeouts of the long operations: derived from the server's own
limit, never the client's (short) default. The live proof, with transfers that
outlast a 2 s client timeout, is in ``e2e/test_long_operations_e2e.py``."""

from __future__ import annotations

import httpx
import pytest

from fastvm import AsyncFastvmClient, FastvmClient
from fastvm._core import FILE_TRANSFER_DEFAULT_TIMEOUT_SEC, TIMEOUT_MARGIN

from .conftest import BASE, FakeServer

SNAPSHOT = {"id": "s-1", "vmId": "vm-1", "status": "ready"}
EXEC = {"exitCode": 0, "stdout": "", "stderr": "", "timedOut": False, "durationMs": 1}


def read_timeout(request: httpx.Request) -> float | None:
    return request.extensions["timeout"]["read"]


def routes(server: FakeServer) -> None:
    server.on("POST", "/v1/vms/v/files/fetch", EXEC)
    server.on("POST", "/v1/vms/v/files/export", {"kind": "file", "sizeBytes": 1})
    server.on("POST", "/v1/snapshots", (201, SNAPSHOT))
    server.on("POST", "/v1/vms/v/exec", EXEC)
    server.on("GET", "/v1/vms/v", {"id": "v", "status": "running"})


CASES = [
    # (call, expected read timeout; None = no read timeout)
    (lambda c: c.vms.files.fetch("v", url="http://u", path="/p"), FILE_TRANSFER_DEFAULT_TIMEOUT_SEC + TIMEOUT_MARGIN),
    (lambda c: c.vms.files.fetch("v", url="http://u", path="/p", timeout_sec=900), 900 + TIMEOUT_MARGIN),
    (lambda c: c.vms.files.export("v", path="/p", url="http://u"), FILE_TRANSFER_DEFAULT_TIMEOUT_SEC + TIMEOUT_MARGIN),
    (lambda c: c.vms.files.export("v", path="/p", url="http://u", timeout_sec=1200), 1200 + TIMEOUT_MARGIN),
    (lambda c: c.snapshots.create(vm_id="vm-1"), None),
    (lambda c: c.vms.run("v", command="true"), None),
    (lambda c: c.vms.run("v", command="true", timeout_sec=100), 100 + TIMEOUT_MARGIN),
    # An ordinary call keeps the client's timeout.
    (lambda c: c.vms.retrieve("v"), 2.0),
]


def test_server_default_is_the_one_the_openapi_document_declares() -> None:
    import json
    from pathlib import Path

    doc = json.loads((Path(__file__).resolve().parents[3] / "openapi" / "fastvm.json").read_text())
    for schema in ("FileFetchRequest", "FileExportRequest"):
        assert doc["components"]["schemas"][schema]["properties"]["timeoutSec"]["default"] == FILE_TRANSFER_DEFAULT_TIMEOUT_SEC


@pytest.mark.parametrize("call,expected", CASES)
def test_long_operations_outlast_a_short_client_timeout(call, expected) -> None:
    server = FakeServer()
    routes(server)
    client = FastvmClient(api_key="k", base_url=BASE, timeout=2.0, http_client=httpx.Client(transport=httpx.MockTransport(server.handle)))
    call(client)
    request = server.requests[-1]
    assert read_timeout(request) == expected
    assert request.extensions["timeout"]["connect"] == 2.0  # only the read timeout is raised


@pytest.mark.parametrize("call,expected", CASES)
async def test_async_long_operations_outlast_a_short_client_timeout(call, expected) -> None:
    server = FakeServer()
    routes(server)
    client = AsyncFastvmClient(
        api_key="k", base_url=BASE, timeout=2.0, http_client=httpx.AsyncClient(transport=httpx.MockTransport(server.ahandle))
    )
    await call(client)
    assert read_timeout(server.requests[-1]) == expected


def test_a_longer_client_timeout_is_kept() -> None:
    server = FakeServer()
    routes(server)
    client = FastvmClient(api_key="k", base_url=BASE, timeout=3600.0, http_client=httpx.Client(transport=httpx.MockTransport(server.handle)))
    client.vms.files.fetch("v", url="http://u", path="/p")
    assert read_timeout(server.requests[-1]) == 3600.0


def test_no_client_timeout_stays_none() -> None:
    server = FakeServer()
    routes(server)
    client = FastvmClient(api_key="k", base_url=BASE, timeout=None, http_client=httpx.Client(transport=httpx.MockTransport(server.handle)))
    client.vms.files.export("v", path="/p", url="http://u")
    assert read_timeout(server.requests[-1]) is None
