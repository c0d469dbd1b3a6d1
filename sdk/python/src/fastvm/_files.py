"""client.vms.files: signed-URL file staging (see client.upload / client.download)."""

from __future__ import annotations

from ._core import NOT_GIVEN, body, path_segment as seg
from ._resource import Resource
from .models import ExecVMResponse, FilePresignResponse

# Extra seconds of HTTP read timeout on top of a server-side timeout, so the server
# answers (with its own timeout result) before the client gives up.
TIMEOUT_MARGIN = 30.0


class Files(Resource):
    def presign(self, id: str, *, path: str) -> FilePresignResponse:
        """POST /v1/vms/{id}/files/presign: mint upload/download URLs for one staging object."""
        return self._client._call(
            "POST", f"/v1/vms/{seg(id)}/files/presign", body=body(path=path), cast=FilePresignResponse
        )

    def fetch(self, id: str, *, url: str, path: str, timeout_sec: int | None = None) -> ExecVMResponse:
        """POST /v1/vms/{id}/files/fetch: the VM downloads ``url`` (a presigned
        ``download_url``) to ``path``."""
        return self._client._call(
            "POST",
            f"/v1/vms/{seg(id)}/files/fetch",
            body=body(url=url, path=path, timeout_sec=timeout_sec),
            cast=ExecVMResponse,
            timeout=NOT_GIVEN if timeout_sec is None else self._client._extended_timeout(timeout_sec + TIMEOUT_MARGIN),
        )

    def export(self, id: str, *, path: str, url: str, timeout_sec: int | None = None) -> dict:
        """POST /v1/vms/{id}/files/export (an extension of this server, not in the spec):
        the server streams ``path`` of the VM (a file, or a tar of a directory rooted at
        ``./``) into the staging object of ``url`` (an ``upload_url`` presigned for this
        VM) over its agent channel, so it works without guest network. Answers
        ``{"kind": "file"|"directory", "sizeBytes": n}``; a missing path is a 404
        ``FILE_NOT_FOUND``."""
        return self._client._call(
            "POST",
            f"/v1/vms/{seg(id)}/files/export",
            body=body(path=path, url=url, timeout_sec=timeout_sec),
            timeout=NOT_GIVEN if timeout_sec is None else self._client._extended_timeout(timeout_sec + TIMEOUT_MARGIN),
        )
