"""client.volumes: managed shared volumes."""

from __future__ import annotations

from typing import List

from ._core import body, path_segment as seg
from ._resource import Resource
from .models import DeleteResponse, Volume, VolumeAttachmentItemWithVm


class Volumes(Resource):
    def list(self) -> List[Volume]:
        """GET /v1/volumes."""
        return self._client._call("GET", "/v1/volumes", cast=Volume, many=True)

    def create(self, *, name: str, size_gi_b: int, access_mode: str) -> Volume:
        """POST /v1/volumes. ``access_mode`` is ``"rw"`` or ``"ro"``."""
        return self._client._call(
            "POST", "/v1/volumes", body=body(name=name, size_gi_b=size_gi_b, access_mode=access_mode), cast=Volume
        )

    def retrieve(self, id: str) -> Volume:
        """GET /v1/volumes/{id}."""
        return self._client._call("GET", f"/v1/volumes/{seg(id)}", cast=Volume)

    def update(
        self,
        id: str,
        *,
        name: str | None = None,
        size_gi_b: int | None = None,
        access_mode: str | None = None,
    ) -> Volume:
        """PATCH /v1/volumes/{id}: rename, resize, or change access mode."""
        return self._client._call(
            "PATCH",
            f"/v1/volumes/{seg(id)}",
            body=body(name=name, size_gi_b=size_gi_b, access_mode=access_mode),
            cast=Volume,
        )

    def delete(self, id: str) -> DeleteResponse:
        """DELETE /v1/volumes/{id}."""
        return self._client._call("DELETE", f"/v1/volumes/{seg(id)}", cast=DeleteResponse)

    def list_attachments(self, id: str) -> List[VolumeAttachmentItemWithVm]:
        """GET /v1/volumes/{id}/attachments: VMs this volume is attached to."""
        return self._client._call(
            "GET", f"/v1/volumes/{seg(id)}/attachments", cast=VolumeAttachmentItemWithVm, many=True
        )
