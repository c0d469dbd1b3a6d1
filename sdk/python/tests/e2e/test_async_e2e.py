"""AsyncFastvmClient: the same surface as FastvmClient, against a live server."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from fastvm import (
    VM,
    AsyncFastvmClient,
    AuthenticationError,
    DeleteResponse,
    ExecEvent,
    ExecVMResponse,
    HealthResponse,
    NotFoundError,
)


async def test_async_launch_run_stream_delete() -> None:
    async with AsyncFastvmClient() as client:
        health = await client.health()
        assert isinstance(health, HealthResponse) and health.status == "ok"

        vm = await client.vms.launch(machine_type="c1m2", name="async-dev", metadata={"via": "async"}, poll_interval=0.5)
        assert isinstance(vm, VM)
        assert (vm.status, vm.name, vm.machine_name, vm.memory_mi_b, vm.disk_gi_b) == ("running", "async-dev", "c1m2", 2048, 10)
        assert vm.metadata == {"via": "async"}

        r = await client.vms.run(vm.id, command="echo $((1 + 1)); echo e >&2; exit 5")
        assert isinstance(r, ExecVMResponse)
        assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (5, "2\n", "e\n", False)
        r = await client.vms.run(vm.id, command=["printf", "%s", "$HOME"])
        assert (r.exit_code, r.stdout) == (0, "$HOME")

        events = [e async for e in client.vms.stream(vm.id, command="echo a; echo b >&2; exit 3")]
        assert all(isinstance(e, ExecEvent) for e in events)
        assert b"".join(e.data for e in events if e.type == "o") == b"a\n"
        assert b"".join(e.data for e in events if e.type == "e") == b"b\n"
        assert events[-1].type == "x" and events[-1].exit_code == 3 and events[-1].timed_out is False
        assert isinstance(events[-1].duration_ms, int)

        timed = await client.vms.run(vm.id, command="sleep 30", timeout_sec=1)
        assert timed.timed_out is True

        assert vm.id in {v.id for v in await client.vms.list(status="running")}
        assert (await client.vms.retrieve(vm.id)).id == vm.id
        paused = await client.vms.pause(vm.id)
        assert paused.status == "paused"
        resumed = await client.vms.resume(vm.id)
        assert resumed.status == "running"
        updated = await client.vms.update(vm.id, name="async-renamed")
        assert updated.name == "async-renamed"

        deleted = await client.vms.delete(vm.id)
        assert isinstance(deleted, DeleteResponse) and deleted.deleted is True
        with pytest.raises(NotFoundError):
            await client.vms.retrieve(vm.id)


async def test_async_wait_false_and_wait_for_vm_ready() -> None:
    async with AsyncFastvmClient() as client:
        raw = await client.vms.launch(machine_type="c1m2", wait=False)
        assert raw.status in ("provisioning", "running")
        vm = await client.wait_for_vm_ready(raw.id, poll_interval=0.2, timeout=120)
        assert vm.id == raw.id and vm.status == "running"
        await client.vms.delete(vm.id)


async def test_async_concurrent_runs(vm) -> None:
    async with AsyncFastvmClient() as client:
        results = await asyncio.gather(*(client.vms.run(vm.id, command=f"sleep 0.5; echo {i}") for i in range(4)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(4)]


async def test_async_errors() -> None:
    async with AsyncFastvmClient() as client:
        with pytest.raises(NotFoundError) as exc:
            await client.vms.retrieve(str(uuid.uuid4()))
        assert exc.value.status_code == 404
    async with AsyncFastvmClient(api_key="fvm_bad") as bad:
        with pytest.raises(AuthenticationError):
            await bad.vms.list()
