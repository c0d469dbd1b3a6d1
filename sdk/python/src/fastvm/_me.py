"""client.me: the calling user's own resources."""

from __future__ import annotations

from typing import Any

from ._core import body, path_segment as seg
from ._resource import Resource
from .models import DeleteResponse, SshGatewayInfo, SshKey, SshKeyListResponse


class SshKeys(Resource):
    def list(self) -> SshKeyListResponse:
        """GET /v1/me/ssh-keys."""
        return self._client._call("GET", "/v1/me/ssh-keys", cast=SshKeyListResponse)

    def add(self, *, public_key: str, name: str | None = None) -> SshKey:
        """POST /v1/me/ssh-keys: register an OpenSSH public key (``ssh-ed25519 AAAA...``)."""
        return self._client._call("POST", "/v1/me/ssh-keys", body=body(name=name, public_key=public_key), cast=SshKey)

    def delete(self, fingerprint: str) -> DeleteResponse:
        """DELETE /v1/me/ssh-keys/{fingerprint}; the fingerprint (``SHA256:...``) is URL-encoded."""
        return self._client._call("DELETE", f"/v1/me/ssh-keys/{seg(fingerprint)}", cast=DeleteResponse)


class Me(Resource):
    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.ssh_keys = SshKeys(client)

    def ssh_gateway(self) -> SshGatewayInfo:
        """GET /v1/ssh-gateway, an extension of this server: the SSH gateway's port and host keys.

        Connect with ``ssh -p <port> <vm.id>@<API host>`` after ``ssh_keys.add``; trust the host keys
        (``[host]:port <key>`` in a known_hosts file)."""
        return self._client._call("GET", "/v1/ssh-gateway", cast=SshGatewayInfo)
