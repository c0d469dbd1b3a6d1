"""FastvmClient and AsyncFastvmClient.

Both expose the same surface; on the async client every method is awaited
(``stream`` is an async iterator). They differ only in the send loop below; request
building, error mapping and retry policy are in ``_core.BaseClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any, AsyncIterator, Iterator, Mapping

import httpx

from . import _build, _transfer
from ._core import (
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    NOT_GIVEN,
    BaseClient,
    NotGiven,
    TimeoutTypes,
    as_page,
    decode_json,
    make_status_error,
    parse,
)
from ._exceptions import APIConnectionError, APITimeoutError
from ._me import Me
from ._quotas import Quotas
from ._snapshot_imports import SnapshotImports
from ._snapshots import Snapshots
from ._vms import VMs, AsyncVMs
from ._volumes import Volumes
from .models import VM, HealthResponse, Snapshot

__all__ = ["FastvmClient", "AsyncFastvmClient"]


def _connection_error(exc: httpx.TransportError, request: httpx.Request) -> APIConnectionError:
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"Request timed out: {exc}", request=request)
    return APIConnectionError(f"Connection error: {exc}", request=request)


class FastvmClient(BaseClient):
    """Synchronous client.

    ``api_key`` defaults to ``$FASTVM_API_KEY`` and is sent as ``Authorization:
    Bearer <key>``; ``base_url`` defaults to ``$FASTVM_BASE_URL`` or
    ``http://127.0.0.1:8080``. ``timeout`` is the default HTTP timeout (seconds or
    ``httpx.Timeout``). ``max_retries`` applies to idempotent requests (GET, PUT,
    DELETE) on connect errors and 5xx answers. ``http_client`` lets you bring your
    own ``httpx.Client`` (proxies, transports); it is not closed by ``close()``.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        *,
        http_client: httpx.Client | None = None,
    ) -> None:
        super().__init__(api_key, base_url, timeout, max_retries)
        self._http = http_client or httpx.Client()
        self._owns_http = http_client is None
        self.vms = VMs(self)
        self.me = Me(self)
        self.snapshots = Snapshots(self)
        self.snapshot_imports = SnapshotImports(self)
        self.quotas = Quotas(self)
        self.volumes = Volumes(self)

    # -- lifecycle -----------------------------------------------------------------

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> FastvmClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- top-level API ---------------------------------------------------------------

    def health(self) -> HealthResponse:
        """GET /healthz."""
        return self._call("GET", "/healthz", cast=HealthResponse)

    def wait_for_vm_ready(self, vm_id: str, *, poll_interval: float = 2.0, timeout: float = 300.0) -> VM:
        """Poll GET /v1/vms/{id} until running (VMLaunchError on error / stopped /
        deleting, VMNotReadyError after ``timeout`` seconds)."""
        return self.vms._wait_ready(vm_id, poll_interval=poll_interval, timeout=timeout)

    def upload(
        self,
        vm_id: str,
        local_path: str,
        remote_path: str,
        *,
        fetch_timeout_sec: int = 600,
        exec_timeout_sec: int = 600,
    ) -> None:
        """Copy a local file or directory (tar-streamed) to ``remote_path`` in the VM.

        A directory is sent as a tar rooted at ``./`` that the SDK makes itself with
        ``tarfile`` (no ``tar`` binary is needed on the client), streamed without a
        temporary copy and with an exact Content-Length computed from a first ``lstat``
        walk (S3 presigned URLs require one). If the directory changes during the upload
        (an entry appears or disappears, a size or symlink target differs),
        :class:`FileTransferError` is raised and nothing is extracted in the VM.
        """
        _transfer.upload(
            self, vm_id, str(local_path), remote_path, fetch_timeout_sec=fetch_timeout_sec, exec_timeout_sec=exec_timeout_sec
        )

    def download(self, vm_id: str, remote_path: str, local_path: str, *, exec_timeout_sec: int = 600) -> None:
        """Copy a file or directory of the VM to ``local_path``. A missing
        ``remote_path`` raises ``FileNotFoundError``.

        Uses ``vms.files.presign`` and then ``vms.files.export``
        (``POST /v1/vms/{id}/files/export``), **an extension of this server that is
        not in the API spec**: the server streams the file, or a tar of the
        directory rooted at ``./``, out of the VM over its agent channel into the
        staging object, which is then streamed to ``local_path`` (a directory is
        extracted safely on the client). It works without guest network. Against a
        server without the extension this raises ``NotFoundError``.
        ``exec_timeout_sec`` bounds the VM-side work (classify + stream)."""
        _transfer.download(self, vm_id, remote_path, str(local_path), exec_timeout_sec=exec_timeout_sec)

    def build(
        self,
        image_ref: str | None = None,
        *,
        dockerfile: str | None = None,
        context_dir: str | None = None,
        machine_type: str = "c1m2",
        disk_gi_b: int | None = None,
        name: str | None = None,
        poll_interval: float = 2.0,
        timeout: float = 1800.0,
    ) -> Snapshot:
        """Build a snapshot from ``image_ref`` or from ``dockerfile`` (its text) plus
        ``context_dir``; wait for it and return the Snapshot (BuildError on failure)."""
        return _build.build(
            self,
            image_ref,
            dockerfile=dockerfile,
            context_dir=None if context_dir is None else str(context_dir),
            machine_type=machine_type,
            disk_gi_b=disk_gi_b,
            name=name,
            poll_interval=poll_interval,
            timeout=timeout,
        )

    # -- transport -------------------------------------------------------------------

    def _send(self, request: httpx.Request, *, retries: int, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt < retries and self._retryable_exception(exc):
                    time.sleep(self._retry_delay(attempt))
                    attempt += 1
                    continue
                raise _connection_error(exc, request) from exc
            if response.is_success:
                return response
            if attempt < retries and self._retryable_response(response):
                response.close()
                time.sleep(self._retry_delay(attempt))
                attempt += 1
                continue
            response.read()
            response.close()
            raise make_status_error(response)

    def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        cast: Any = None,
        many: bool = False,
        page: bool = False,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        max_retries: int | None = None,
    ) -> Any:
        request = self._http.build_request(
            **self._request_kwargs(method, path, json_body=body, params=params, timeout=timeout)
        )
        response = self._send(request, retries=self._max_retries_for(method, max_retries))
        result = parse(decode_json(response), cast, many)
        return as_page(result, response) if page else result

    @contextlib.contextmanager
    def _stream(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
    ) -> Iterator[httpx.Response]:
        request = self._http.build_request(
            **self._request_kwargs(method, path, json_body=body, headers=headers, timeout=timeout)
        )
        response = self._send(request, retries=0, stream=True)
        try:
            yield response
        finally:
            response.close()

    def _put_signed(self, url: str, content: Any, *, content_type: str, length: int | None = None) -> None:
        """PUT a body to a signed URL (no Authorization header, no retries: the body streams once)."""
        headers = self._headers({"Content-Type": content_type}, auth=False)
        if length is not None:
            headers["Content-Length"] = str(length)
        request = self._http.build_request(
            "PUT", self._external_url(url), content=content, headers=headers, timeout=self._extended_timeout(None)
        )
        self._send(request, retries=0).close()

    @contextlib.contextmanager
    def _get_signed_stream(self, url: str) -> Iterator[httpx.Response]:
        request = self._http.build_request(
            "GET", self._external_url(url), headers=self._headers(auth=False), timeout=self._extended_timeout(None)
        )
        response = self._send(request, retries=self.max_retries, stream=True)
        try:
            yield response
        finally:
            response.close()


class AsyncFastvmClient(BaseClient):
    """Asynchronous client with the same surface as :class:`FastvmClient`.

    Use it with ``async with AsyncFastvmClient() as client:`` or call
    ``await client.close()``.
    """

    def __init__(
        self,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: TimeoutTypes = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        *,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(api_key, base_url, timeout, max_retries)
        self._http = http_client or httpx.AsyncClient()
        self._owns_http = http_client is None
        self.vms = AsyncVMs(self)
        self.me = Me(self)
        self.snapshots = Snapshots(self)
        self.snapshot_imports = SnapshotImports(self)
        self.quotas = Quotas(self)
        self.volumes = Volumes(self)

    # -- lifecycle -----------------------------------------------------------------

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncFastvmClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- top-level API ---------------------------------------------------------------

    async def health(self) -> HealthResponse:
        """GET /healthz."""
        return await self._call("GET", "/healthz", cast=HealthResponse)

    async def wait_for_vm_ready(self, vm_id: str, *, poll_interval: float = 2.0, timeout: float = 300.0) -> VM:
        """Async :meth:`FastvmClient.wait_for_vm_ready`."""
        return await self.vms._wait_ready(vm_id, poll_interval=poll_interval, timeout=timeout)

    async def upload(
        self,
        vm_id: str,
        local_path: str,
        remote_path: str,
        *,
        fetch_timeout_sec: int = 600,
        exec_timeout_sec: int = 600,
    ) -> None:
        """Async :meth:`FastvmClient.upload`."""
        await _transfer.aupload(
            self, vm_id, str(local_path), remote_path, fetch_timeout_sec=fetch_timeout_sec, exec_timeout_sec=exec_timeout_sec
        )

    async def download(self, vm_id: str, remote_path: str, local_path: str, *, exec_timeout_sec: int = 600) -> None:
        """Async :meth:`FastvmClient.download` (also relies on the ``/files/export``
        extension of this server, which is not in the API spec)."""
        await _transfer.adownload(self, vm_id, remote_path, str(local_path), exec_timeout_sec=exec_timeout_sec)

    async def build(
        self,
        image_ref: str | None = None,
        *,
        dockerfile: str | None = None,
        context_dir: str | None = None,
        machine_type: str = "c1m2",
        disk_gi_b: int | None = None,
        name: str | None = None,
        poll_interval: float = 2.0,
        timeout: float = 1800.0,
    ) -> Snapshot:
        """Async :meth:`FastvmClient.build`."""
        return await _build.abuild(
            self,
            image_ref,
            dockerfile=dockerfile,
            context_dir=None if context_dir is None else str(context_dir),
            machine_type=machine_type,
            disk_gi_b=disk_gi_b,
            name=name,
            poll_interval=poll_interval,
            timeout=timeout,
        )

    # -- transport -------------------------------------------------------------------

    async def _send(self, request: httpx.Request, *, retries: int, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if attempt < retries and self._retryable_exception(exc):
                    await asyncio.sleep(self._retry_delay(attempt))
                    attempt += 1
                    continue
                raise _connection_error(exc, request) from exc
            if response.is_success:
                return response
            if attempt < retries and self._retryable_response(response):
                await response.aclose()
                await asyncio.sleep(self._retry_delay(attempt))
                attempt += 1
                continue
            await response.aread()
            await response.aclose()
            raise make_status_error(response)

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, Any] | None = None,
        cast: Any = None,
        many: bool = False,
        page: bool = False,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
        max_retries: int | None = None,
    ) -> Any:
        request = self._http.build_request(
            **self._request_kwargs(method, path, json_body=body, params=params, timeout=timeout)
        )
        response = await self._send(request, retries=self._max_retries_for(method, max_retries))
        result = parse(decode_json(response), cast, many)
        return as_page(result, response) if page else result

    @contextlib.asynccontextmanager
    async def _stream(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        timeout: TimeoutTypes | NotGiven = NOT_GIVEN,
    ) -> AsyncIterator[httpx.Response]:
        request = self._http.build_request(
            **self._request_kwargs(method, path, json_body=body, headers=headers, timeout=timeout)
        )
        response = await self._send(request, retries=0, stream=True)
        try:
            yield response
        finally:
            await response.aclose()

    async def _put_signed(self, url: str, content: Any, *, content_type: str, length: int | None = None) -> None:
        headers = self._headers({"Content-Type": content_type}, auth=False)
        if length is not None:
            headers["Content-Length"] = str(length)
        request = self._http.build_request(
            "PUT", self._external_url(url), content=content, headers=headers, timeout=self._extended_timeout(None)
        )
        await (await self._send(request, retries=0)).aclose()

    @contextlib.asynccontextmanager
    async def _get_signed_stream(self, url: str) -> AsyncIterator[httpx.Response]:
        request = self._http.build_request(
            "GET", self._external_url(url), headers=self._headers(auth=False), timeout=self._extended_timeout(None)
        )
        response = await self._send(request, retries=self.max_retries, stream=True)
        try:
            yield response
        finally:
            await response.aclose()
