"""client.vms.bucket_mounts: customer GCS / S3 buckets mounted into a VM."""

from __future__ import annotations

from typing import Any, List, Mapping, Union

from ._core import body, path_segment as seg, to_wire
from ._resource import Resource
from .models import BucketMount, BucketMountCredentials

Credentials = Union[BucketMountCredentials, Mapping[str, Any]]


class BucketMounts(Resource):
    def list(self, id: str) -> List[BucketMount]:
        """GET /v1/vms/{id}/bucket-mounts."""
        return self._client._call("GET", f"/v1/vms/{seg(id)}/bucket-mounts", cast=BucketMount, many=True)

    def attach(
        self,
        id: str,
        *,
        bucket_uri: str,
        mount_path: str,
        credentials: Credentials,
        read_only: bool = False,
    ) -> BucketMount:
        """POST /v1/vms/{id}/bucket-mounts: mount ``gs://bucket[/prefix]`` or ``s3://bucket[/prefix]``."""
        return self._client._call(
            "POST",
            f"/v1/vms/{seg(id)}/bucket-mounts",
            body=body(
                bucket_uri=bucket_uri,
                mount_path=mount_path,
                read_only=read_only,
                credentials=to_wire(credentials, BucketMountCredentials),
            ),
            cast=BucketMount,
        )

    def retrieve(self, id: str, bucket_mount_id: str) -> BucketMount:
        """GET /v1/vms/{id}/bucket-mounts/{bucketMountId}."""
        return self._client._call(
            "GET", f"/v1/vms/{seg(id)}/bucket-mounts/{seg(bucket_mount_id)}", cast=BucketMount
        )

    def rotate(self, id: str, bucket_mount_id: str, *, credentials: Credentials) -> BucketMount:
        """PATCH /v1/vms/{id}/bucket-mounts/{bucketMountId}: replace the credentials in place."""
        return self._client._call(
            "PATCH",
            f"/v1/vms/{seg(id)}/bucket-mounts/{seg(bucket_mount_id)}",
            body={"credentials": to_wire(credentials, BucketMountCredentials)},
            cast=BucketMount,
        )

    def delete(self, id: str, bucket_mount_id: str) -> None:
        """DELETE /v1/vms/{id}/bucket-mounts/{bucketMountId}: detach and delete."""
        return self._client._call("DELETE", f"/v1/vms/{seg(id)}/bucket-mounts/{seg(bucket_mount_id)}")
