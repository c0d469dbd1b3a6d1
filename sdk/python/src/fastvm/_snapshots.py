"""client.snapshots: VM snapshots."""

from __future__ import annotations

from typing import List

from ._core import UNBOUNDED, body, path_segment as seg
from ._resource import Resource
from .models import DeleteResponse, Snapshot


class Snapshots(Resource):
    def list(self) -> List[Snapshot]:
        """GET /v1/snapshots."""
        return self._client._call("GET", "/v1/snapshots", cast=Snapshot, many=True)

    def create(self, *, vm_id: str, name: str | None = None) -> Snapshot:
        """POST /v1/snapshots: snapshot a VM (name auto-generated when omitted).

        The server answers once the capture is done and sets no time limit on it
        (a capture writes the VM's memory to disk, so it grows with the memory
        size), so this call has no HTTP read timeout: the client's default timeout
        does not cut a long capture short.
        """
        return self._client._call(
            "POST",
            "/v1/snapshots",
            body=body(vm_id=vm_id, name=name),
            cast=Snapshot,
            timeout=self._client._operation_timeout(UNBOUNDED),
        )

    def retrieve(self, id: str) -> Snapshot:
        """GET /v1/snapshots/{id}."""
        return self._client._call("GET", f"/v1/snapshots/{seg(id)}", cast=Snapshot)

    def update(self, id: str, *, name: str | None = None) -> Snapshot:
        """PATCH /v1/snapshots/{id}: rename."""
        return self._client._call("PATCH", f"/v1/snapshots/{seg(id)}", body=body(name=name), cast=Snapshot)

    def delete(self, id: str) -> DeleteResponse:
        """DELETE /v1/snapshots/{id}."""
        return self._client._call("DELETE", f"/v1/snapshots/{seg(id)}", cast=DeleteResponse)
