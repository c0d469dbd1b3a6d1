"""Unit-test fakes: an httpx.MockTransport router standing in for the server.

These only check what the SDK puts on the wire and how it reads answers; the
end-to-end tests against a live server booting real VMs are in ``tests/e2e``.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import httpx
import pytest

from fastvm import AsyncFastvmClient, FastvmClient

BASE = "http://fastvm.test"

Handler = Callable[[httpx.Request], httpx.Response]


class FakeServer:
    """Routes (METHOD, raw path) to a handler, a response, or a queue of responses,
    and records every request (with its body read)."""

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Any] = {}
        self.requests: list[httpx.Request] = []

    def on(self, method: str, path: str, *responses: Any) -> None:
        """Each response is an httpx.Response, a JSON-able value (-> 200), a
        (status, json) pair, an exception to raise, or a callable(request)."""
        self.routes[(method, path)] = list(responses)

    def handle(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        key = (request.method, request.url.raw_path.decode().split("?")[0])
        queue = self.routes.get(key)
        if not queue:
            return httpx.Response(404, json={"error": {"code": "NO_ROUTE", "message": f"no fake route {key}"}})
        item = queue[0] if len(queue) == 1 else queue.pop(0)
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            return item(request)
        if isinstance(item, httpx.Response):
            return item
        if isinstance(item, tuple):
            status, payload = item
            return httpx.Response(status, json=payload)
        return httpx.Response(200, json=item)

    async def ahandle(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        return self.handle(request)

    # helpers for assertions
    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.url.raw_path.decode()) for r in self.requests]

    def last(self, method: str | None = None, path: str | None = None) -> httpx.Request:
        for r in reversed(self.requests):
            if (method is None or r.method == method) and (path is None or r.url.raw_path.decode().split("?")[0] == path):
                return r
        raise AssertionError(f"no request {method} {path}; got {self.calls()}")

    @staticmethod
    def json(request: httpx.Request) -> Any:
        return json.loads(request.content)


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def client(server: FakeServer) -> FastvmClient:
    c = FastvmClient(api_key="sk-test", base_url=BASE, http_client=httpx.Client(transport=httpx.MockTransport(server.handle)))
    c.retry_base_delay = 0.0
    return c


@pytest.fixture
def aclient(server: FakeServer) -> AsyncFastvmClient:
    c = AsyncFastvmClient(
        api_key="sk-test", base_url=BASE, http_client=httpx.AsyncClient(transport=httpx.MockTransport(server.ahandle))
    )
    c.retry_base_delay = 0.0
    return c


def vm_json(status: str = "running", **extra: Any) -> dict[str, Any]:
    return {"id": "vm-1", "name": "dev", "status": status, "machineName": "c1m2", "memoryMiB": 2048, "diskGiB": 10, **extra}
