"""client.snapshot_imports: build snapshots from OCI images or Dockerfiles.

``client.build`` composes these calls and waits for the result.
"""

from __future__ import annotations

from typing import Any, List, Mapping, Union

from ._core import body, path_segment as seg, to_wire
from ._resource import Resource
from .models import ContextPresignResponse, DeleteResponse, SnapshotImportResponse, SnapshotImportSourceSpec


class SnapshotImports(Resource):
    def list(self) -> List[SnapshotImportResponse]:
        """GET /v1/snapshot-imports."""
        return self._client._call("GET", "/v1/snapshot-imports", cast=SnapshotImportResponse, many=True)

    def create(
        self,
        *,
        source: Union[SnapshotImportSourceSpec, Mapping[str, Any]],
        machine_type: str | None = None,
        disk_gi_b: int | None = None,
        name: str | None = None,
    ) -> SnapshotImportResponse:
        """POST /v1/snapshot-imports. ``source`` is ``{"type": "image", "image": ...}`` or
        ``{"type": "dockerfile", "context_ref": ..., "dockerfile_path": ...}`` (model or dict)."""
        return self._client._call(
            "POST",
            "/v1/snapshot-imports",
            body=body(
                machine_type=machine_type,
                disk_gi_b=disk_gi_b,
                name=name,
                source=to_wire(source, SnapshotImportSourceSpec),
            ),
            cast=SnapshotImportResponse,
        )

    def presign_context(self, *, size_bytes: int | None = None) -> ContextPresignResponse:
        """POST /v1/snapshot-imports/context-presign: signed PUT URL for a build-context ZIP."""
        return self._client._call(
            "POST",
            "/v1/snapshot-imports/context-presign",
            body=body(size_bytes=size_bytes),
            cast=ContextPresignResponse,
        )

    def retrieve(self, id: str) -> SnapshotImportResponse:
        """GET /v1/snapshot-imports/{id}."""
        return self._client._call("GET", f"/v1/snapshot-imports/{seg(id)}", cast=SnapshotImportResponse)

    def delete(self, id: str) -> DeleteResponse:
        """DELETE /v1/snapshot-imports/{id} (terminal imports only; cascades to the snapshot)."""
        return self._client._call("DELETE", f"/v1/snapshot-imports/{seg(id)}", cast=DeleteResponse)

    def cancel(self, id: str) -> SnapshotImportResponse:
        """POST /v1/snapshot-imports/{id}/cancel."""
        return self._client._call("POST", f"/v1/snapshot-imports/{seg(id)}/cancel", cast=SnapshotImportResponse)
