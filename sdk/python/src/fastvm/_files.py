"""client.vms.files: signed-URL file staging (see client.upload / client.download).

``fetch`` and ``export`` run as long as the server lets them: up to ``timeout_sec``,
or the server's default of :data:`~fastvm._core.FILE_TRANSFER_DEFAULT_TIMEOUT_SEC`
(600 s) when it is omitted. Their HTTP read timeout is derived from that limit (plus
a margin), never the client's default timeout, so a large transfer does not raise
``APITimeoutError`` while the server is still copying.
"""

from __future__ import annotations

from ._core import FILE_TRANSFER_DEFAULT_TIMEOUT_SEC, body, path_segment as seg
from ._resource import Resource
from .models import ExecVMResponse, FilePresignResponse


def _server_limit(timeout_sec: int | None) -> int:
    return FILE_TRANSFER_DEFAULT_TIMEOUT_SEC if timeout_sec is None else timeout_sec


class Files(Resource):
    def presign(self, id: str, *, path: str) -> FilePresignResponse:
        """POST /v1/vms/{id}/files/presign: mint upload/download URLs for one staging object."""
        return self._client._call(
            "POST", f"/v1/vms/{seg(id)}/files/presign", body=body(path=path), cast=FilePresignResponse
        )

    def fetch(self, id: str, *, url: str, path: str, timeout_sec: int | None = None) -> ExecVMResponse:
        """POST /v1/vms/{id}/files/fetch: the VM downloads ``url`` (a presigned
        ``download_url``) to ``path``.

        The server copies for at most ``timeout_sec`` seconds (omitted: its default,
        600 s); the HTTP read timeout of this call is that limit plus a margin, not
        the client's default timeout.
        """
        return self._client._call(
            "POST",
            f"/v1/vms/{seg(id)}/files/fetch",
            body=body(url=url, path=path, timeout_sec=timeout_sec),
            cast=ExecVMResponse,
            timeout=self._client._operation_timeout(_server_limit(timeout_sec)),
        )

    def export(self, id: str, *, path: str, url: str, timeout_sec: int | None = None) -> dict:
        """POST /v1/vms/{id}/files/export.

        **An extension of this server, not in the spec**: other servers of the API
        do not have it (there, ``client.download`` would need the VM to ``curl -T -``
        to the ``upload_url``, which needs guest network). The server streams ``path``
        of the VM (a file, or a tar of a directory rooted at ``./``) into the staging
        object of ``url`` (an ``upload_url`` presigned for this VM) over its agent
        channel, so it works without guest network. Answers
        ``{"kind": "file"|"directory", "sizeBytes": n}``; a missing path is a 404
        ``FILE_NOT_FOUND``.

        The server works for at most ``timeout_sec`` seconds (omitted: its default,
        600 s); the HTTP read timeout of this call is that limit plus a margin.
        """
        return self._client._call(
            "POST",
            f"/v1/vms/{seg(id)}/files/export",
            body=body(path=path, url=url, timeout_sec=timeout_sec),
            timeout=self._client._operation_timeout(_server_limit(timeout_sec)),
        )
