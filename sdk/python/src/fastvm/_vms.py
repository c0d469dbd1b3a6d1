"""client.vms: VM lifecycle, firewall, exec.

``launch`` (wait for running) and ``stream`` (NDJSON exec) have sync and async
versions; every other method is shared (see ``_resource``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, AsyncIterator, Iterator, List, Mapping, Sequence, Union


from ._bucket_mounts import BucketMounts
from ._core import (
    NOT_GIVEN,
    NotGiven,
    TimeoutTypes,
    body,
    exec_body,
    path_segment as seg,
    to_wire,
    vm_readiness,
)
from ._exceptions import VMLaunchError, VMNotReadyError
from ._files import Files
from ._resource import Resource
from ._services import Services
from ._vm_volumes import VMVolumes
from .models import (
    TTL,
    VM,
    ConsoleTokenResponse,
    DeleteResponse,
    DNSPolicy,
    EgressPolicy,
    ExecEvent,
    ExecVMResponse,
    FirewallPolicy,
    IngressPolicy,
    Metadata,
)

NDJSON = "application/x-ndjson"

FirewallArg = Union[FirewallPolicy, Mapping[str, Any]]
TTLArg = Union[TTL, Mapping[str, Any]]


class _VMsBase(Resource):
    def __init__(self, client: Any) -> None:
        super().__init__(client)
        self.services = Services(client)
        self.files = Files(client)
        self.volumes = VMVolumes(client)
        self.bucket_mounts = BucketMounts(client)

    def list(self, *, status: str | None = None, limit: int | None = None, cursor: str | None = None) -> List[VM]:
        """GET /v1/vms, optionally only VMs with ``status``.

        ``limit`` and ``cursor`` are an extension (not in the spec): with
        ``limit`` (1 to 1000) the answer is one page of at most that many VMs,
        from ``cursor`` on; the returned list's ``next_cursor`` is the cursor
        of the next page (``None`` on the last page). Without them: every VM.
        """
        params = {"status": status, "limit": limit, "cursor": cursor}
        return self._client._call("GET", "/v1/vms", params=params, cast=VM, many=True, page=True)

    def retrieve(self, id: str) -> VM:
        """GET /v1/vms/{id}."""
        return self._client._call("GET", f"/v1/vms/{seg(id)}", cast=VM)

    def update(
        self,
        id: str,
        *,
        name: str | NotGiven = NOT_GIVEN,
        metadata: Metadata | NotGiven = NOT_GIVEN,
        ttl: TTLArg | None | NotGiven = NOT_GIVEN,
    ) -> VM:
        """PATCH /v1/vms/{id}.

        Only the arguments you pass are sent. ``ttl=None`` sends ``"ttl": null`` and
        clears the TTL; ``ttl=TTL(seconds=3600, action="pause")`` (or the same as a
        dict) sets it.
        """
        payload: dict[str, Any] = {}
        if not isinstance(name, NotGiven):
            payload["name"] = name
        if not isinstance(metadata, NotGiven):
            payload["metadata"] = metadata
        if not isinstance(ttl, NotGiven):
            payload["ttl"] = None if ttl is None else to_wire(ttl, TTL)
        return self._client._call("PATCH", f"/v1/vms/{seg(id)}", body=payload, cast=VM)

    def delete(self, id: str) -> DeleteResponse:
        """DELETE /v1/vms/{id}."""
        return self._client._call("DELETE", f"/v1/vms/{seg(id)}", cast=DeleteResponse)

    def pause(self, id: str) -> VM:
        """POST /v1/vms/{id}/pause."""
        return self._client._call("POST", f"/v1/vms/{seg(id)}/pause", cast=VM)

    def resume(self, id: str) -> VM:
        """POST /v1/vms/{id}/resume."""
        return self._client._call("POST", f"/v1/vms/{seg(id)}/resume", cast=VM)

    def fork(self, id: str, *, count: int) -> List[VM]:
        """POST /v1/vms/{id}/fork (extension beyond the reference API).

        ``count`` (1 to 32) running copies of a running or paused VM, each with a
        fresh identity (id, hostname, addresses, entropy), sharing the source's
        memory copy-on-write; returned once every copy has started (a copy that
        failed is in status ``error``).
        """
        return self._client._call("POST", f"/v1/vms/{seg(id)}/fork", body={"count": count}, cast=VM, many=True)

    def refresh_ttl(self, id: str) -> VM:
        """POST /v1/vms/{id}/ttl/refresh: restart the TTL cycle."""
        return self._client._call("POST", f"/v1/vms/{seg(id)}/ttl/refresh", cast=VM)

    def set_firewall(
        self,
        id: str,
        *,
        ingress: IngressPolicy | Mapping[str, Any] | None = None,
        egress: EgressPolicy | Mapping[str, Any] | None = None,
        dns: DNSPolicy | Mapping[str, Any] | None = None,
    ) -> VM:
        """PUT /v1/vms/{id}/firewall: replace the whole policy (omitted blocks get server defaults)."""
        return self._client._call(
            "PUT", f"/v1/vms/{seg(id)}/firewall", body=_firewall_body(ingress, egress, dns), cast=VM
        )

    def patch_firewall(
        self,
        id: str,
        *,
        ingress: IngressPolicy | Mapping[str, Any] | None = None,
        egress: EgressPolicy | Mapping[str, Any] | None = None,
        dns: DNSPolicy | Mapping[str, Any] | None = None,
    ) -> VM:
        """PATCH /v1/vms/{id}/firewall: replace only the blocks given."""
        return self._client._call(
            "PATCH", f"/v1/vms/{seg(id)}/firewall", body=_firewall_body(ingress, egress, dns), cast=VM
        )

    def console_token(self, id: str) -> ConsoleTokenResponse:
        """POST /v1/vms/{id}/console-token."""
        return self._client._call("POST", f"/v1/vms/{seg(id)}/console-token", cast=ConsoleTokenResponse)

    def run(
        self,
        id: str,
        *,
        command: str | Sequence[str],
        timeout_sec: int | None = None,
        max_retries: int = 0,
    ) -> ExecVMResponse:
        """POST /v1/vms/{id}/exec, buffered.

        A ``str`` command runs as ``["sh", "-c", command]``; a list/tuple is the argv.
        Without ``timeout_sec`` the HTTP read timeout is lifted: the server bounds
        the command.
        """
        return self._client._call(
            "POST",
            f"/v1/vms/{seg(id)}/exec",
            body=exec_body(command, timeout_sec),
            cast=ExecVMResponse,
            timeout=_exec_timeout(self._client, timeout_sec),
            max_retries=max_retries,
        )

    # -- shared pieces of launch ---------------------------------------------------

    @staticmethod
    def _launch_body(
        machine_type: str | None,
        snapshot_id: str | None,
        name: str | None,
        metadata: Metadata | None,
        firewall: FirewallArg | None,
        env_vars: Mapping[str, str] | None,
        ttl: TTLArg | None,
    ) -> dict[str, Any]:
        return body(
            machine_type=machine_type,
            snapshot_id=snapshot_id,
            name=name,
            metadata=metadata,
            firewall=None if firewall is None else to_wire(firewall, FirewallPolicy),
            env_vars=env_vars,
            ttl=None if ttl is None else to_wire(ttl, TTL),
        )


def _firewall_body(ingress: Any, egress: Any, dns: Any) -> dict[str, Any]:
    return FirewallPolicy.from_dict(
        {k: v for k, v in (("ingress", ingress), ("egress", egress), ("dns", dns)) if v is not None}
    ).to_dict()


def _exec_timeout(client: Any, timeout_sec: int | None) -> TimeoutTypes:
    # Without timeout_sec the server does not bound the command.
    return client._operation_timeout(timeout_sec)


def _check_ready(vm: VM) -> bool:
    """True when running; raises VMLaunchError on a terminal failure status."""
    state = vm_readiness(vm.status)
    if state == "failed":
        raise VMLaunchError(vm)
    return state == "ready"


def _event(line: str) -> ExecEvent | None:
    line = line.strip()
    return ExecEvent.from_dict(json.loads(line)) if line else None


class VMs(_VMsBase):
    def launch(
        self,
        *,
        machine_type: str | None = None,
        snapshot_id: str | None = None,
        name: str | None = None,
        metadata: Metadata | None = None,
        firewall: FirewallArg | None = None,
        wait: bool = True,
        poll_interval: float = 2.0,
        wait_timeout: float = 300.0,
        timeout: TimeoutTypes = None,
        max_retries: int = 0,
        env_vars: Mapping[str, str] | None = None,
        ttl: TTLArg | None = None,
    ) -> VM:
        """POST /v1/vms, then (``wait=True``) poll until ``status == "running"``.

        201 (running now) and 202 (queued) are both handled. ``wait=False`` returns
        the raw 201/202 body. Raises :class:`VMLaunchError` on error / stopped /
        deleting and :class:`VMNotReadyError` after ``wait_timeout`` seconds.
        ``timeout`` is the HTTP timeout of the POST (``None``: client default).
        """
        vm = self._client._call(
            "POST",
            "/v1/vms",
            body=self._launch_body(machine_type, snapshot_id, name, metadata, firewall, env_vars, ttl),
            cast=VM,
            timeout=NOT_GIVEN if timeout is None else timeout,
            max_retries=max_retries,
        )
        if not wait:
            return vm
        if _check_ready(vm):
            return vm
        return self._wait_ready(vm.id, poll_interval=poll_interval, timeout=wait_timeout)

    def _wait_ready(self, vm_id: str, *, poll_interval: float, timeout: float) -> VM:
        deadline = time.monotonic() + timeout
        last_status: str | None = None
        while True:
            vm = self.retrieve(vm_id)
            last_status = vm.status
            if _check_ready(vm):
                return vm
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VMNotReadyError(vm_id, last_status, timeout)
            time.sleep(min(poll_interval, remaining))

    def stream(
        self,
        id: str,
        *,
        command: str | Sequence[str],
        timeout_sec: int | None = None,
    ) -> Iterator[ExecEvent]:
        """POST /v1/vms/{id}/exec with ``Accept: application/x-ndjson``: yields
        :class:`ExecEvent` as the output arrives (``o`` stdout, ``e`` stderr, ``x`` exit).
        The request is sent when iteration starts."""
        with self._client._stream(
            "POST",
            f"/v1/vms/{seg(id)}/exec",
            body=exec_body(command, timeout_sec),
            headers={"Accept": NDJSON},
            timeout=self._client._extended_timeout(None),
        ) as response:
            for line in response.iter_lines():
                event = _event(line)
                if event is not None:
                    yield event


class AsyncVMs(_VMsBase):
    async def launch(
        self,
        *,
        machine_type: str | None = None,
        snapshot_id: str | None = None,
        name: str | None = None,
        metadata: Metadata | None = None,
        firewall: FirewallArg | None = None,
        wait: bool = True,
        poll_interval: float = 2.0,
        wait_timeout: float = 300.0,
        timeout: TimeoutTypes = None,
        max_retries: int = 0,
        env_vars: Mapping[str, str] | None = None,
        ttl: TTLArg | None = None,
    ) -> VM:
        """Async :meth:`VMs.launch`."""
        vm = await self._client._call(
            "POST",
            "/v1/vms",
            body=self._launch_body(machine_type, snapshot_id, name, metadata, firewall, env_vars, ttl),
            cast=VM,
            timeout=NOT_GIVEN if timeout is None else timeout,
            max_retries=max_retries,
        )
        if not wait:
            return vm
        if _check_ready(vm):
            return vm
        return await self._wait_ready(vm.id, poll_interval=poll_interval, timeout=wait_timeout)

    async def _wait_ready(self, vm_id: str, *, poll_interval: float, timeout: float) -> VM:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            vm = await self.retrieve(vm_id)
            if _check_ready(vm):
                return vm
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise VMNotReadyError(vm_id, vm.status, timeout)
            await asyncio.sleep(min(poll_interval, remaining))

    async def stream(
        self,
        id: str,
        *,
        command: str | Sequence[str],
        timeout_sec: int | None = None,
    ) -> AsyncIterator[ExecEvent]:
        """Async :meth:`VMs.stream`: ``async for event in client.vms.stream(...)``."""
        async with self._client._stream(
            "POST",
            f"/v1/vms/{seg(id)}/exec",
            body=exec_body(command, timeout_sec),
            headers={"Accept": NDJSON},
            timeout=self._client._extended_timeout(None),
        ) as response:
            async for line in response.aiter_lines():
                event = _event(line)
                if event is not None:
                    yield event


__all__ = ["VMs", "AsyncVMs"]
