"""client.vms.volumes: attach / detach managed volumes."""

from __future__ import annotations

from ._core import body, path_segment as seg
from ._resource import Resource
from .models import DetachVolumeResponse, VolumeAttachmentItem


class VMVolumes(Resource):
    def attach(self, id: str, *, volume_id: str, mount_path: str, read_only: bool = False) -> VolumeAttachmentItem:
        """POST /v1/vms/{id}/volumes: attach a volume (``mount_path`` under /mnt/ or /data/)."""
        return self._client._call(
            "POST",
            f"/v1/vms/{seg(id)}/volumes",
            body=body(volume_id=volume_id, mount_path=mount_path, read_only=read_only),
            cast=VolumeAttachmentItem,
        )

    def detach(self, id: str, volume_id: str) -> DetachVolumeResponse:
        """DELETE /v1/vms/{id}/volumes/{volumeId}: detach a volume."""
        return self._client._call(
            "DELETE", f"/v1/vms/{seg(id)}/volumes/{seg(volume_id)}", cast=DetachVolumeResponse
        )
