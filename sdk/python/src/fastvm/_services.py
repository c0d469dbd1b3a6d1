"""client.vms.services: HTTP services of a VM exposed through the proxy."""

from __future__ import annotations

from typing import List

from ._core import body, path_segment as seg
from ._resource import Resource
from .models import Service


class Services(Resource):
    def list(self, id: str) -> List[Service]:
        """GET /v1/vms/{id}/services: list service registrations."""
        return self._client._call("GET", f"/v1/vms/{seg(id)}/services", cast=Service, many=True)

    def register(self, id: str, *, name: str, port: int, h2c: bool = False) -> Service:
        """POST /v1/vms/{id}/services: register a service on a VM.

        ``h2c=True`` makes the proxy speak HTTP/2 cleartext to the backend (gRPC).
        """
        return self._client._call(
            "POST", f"/v1/vms/{seg(id)}/services", body=body(name=name, port=port, h2c=h2c), cast=Service
        )

    def update(self, id: str, service_name: str, *, port: int, h2c: bool = False) -> Service:
        """PUT /v1/vms/{id}/services/{serviceName}: register or update a service."""
        return self._client._call(
            "PUT",
            f"/v1/vms/{seg(id)}/services/{seg(service_name)}",
            body=body(port=port, h2c=h2c),
            cast=Service,
        )

    def delete(self, id: str, service_name: str) -> None:
        """DELETE /v1/vms/{id}/services/{serviceName}: deregister a service."""
        return self._client._call("DELETE", f"/v1/vms/{seg(id)}/services/{seg(service_name)}")
