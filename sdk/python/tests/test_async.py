"""The async client has the same surface and behaviour as the sync one."""

import base64
import inspect
import json

import httpx
import pytest

from fastvm import (
    AsyncFastvmClient,
    ConflictError,
    ExecEvent,
    FastvmClient,
    InternalServerError,
    UnsafeArchiveError,
    VMLaunchError,
    VMNotReadyError,
)

from .conftest import vm_json
from .test_tar import make_tar
from .test_transfer import PRESIGN


def public_surface(obj, prefix=""):
    names = set()
    for name in dir(obj):
        if name.startswith("_"):
            continue
        value = getattr(obj, name)
        if callable(value):
            names.add(prefix + name)
        elif hasattr(value, "_client"):
            names |= public_surface(value, prefix + name + ".")
    return names


def test_same_surface_and_signatures():
    sync_c, async_c = FastvmClient(api_key="k"), AsyncFastvmClient(api_key="k")
    surface = public_surface(sync_c)
    assert surface == public_surface(async_c)
    for dotted in surface:
        s, a = sync_c, async_c
        for part in dotted.split("."):
            s, a = getattr(s, part), getattr(a, part)
        # same parameters, names and defaults (return types differ: awaitables / async iterators)
        assert inspect.signature(s).parameters == inspect.signature(a).parameters, dotted
    sync_c.close()


async def test_async_launch_202_then_poll(aclient, server):
    server.on("POST", "/v1/vms", (202, vm_json("provisioning")))
    server.on("GET", "/v1/vms/vm-1", vm_json("provisioning"), vm_json("running"))
    vm = await aclient.vms.launch(machine_type="c1m2", poll_interval=0.001)
    assert vm.status == "running"
    assert server.calls() == [("POST", "/v1/vms"), ("GET", "/v1/vms/vm-1"), ("GET", "/v1/vms/vm-1")]
    assert server.json(server.requests[0]) == {"machineType": "c1m2"}
    assert server.requests[0].headers["Authorization"] == "Bearer sk-test"


async def test_async_launch_201_and_wait_false(aclient, server):
    server.on("POST", "/v1/vms", (201, vm_json("running")))
    assert (await aclient.vms.launch(machine_type="c1m2")).status == "running"
    server.on("POST", "/v1/vms", (202, vm_json("provisioning")))
    assert (await aclient.vms.launch(machine_type="c1m2", wait=False)).status == "provisioning"
    assert len(server.requests) == 2


async def test_async_launch_errors(aclient, server):
    server.on("POST", "/v1/vms", (202, vm_json("provisioning")))
    server.on("GET", "/v1/vms/vm-1", vm_json("error"))
    with pytest.raises(VMLaunchError):
        await aclient.vms.launch(machine_type="c1m2", poll_interval=0.001)
    server.on("GET", "/v1/vms/vm-1", vm_json("provisioning"))
    with pytest.raises(VMNotReadyError):
        await aclient.vms.launch(machine_type="c1m2", poll_interval=0.001, wait_timeout=0.02)
    with pytest.raises(VMNotReadyError):
        await aclient.wait_for_vm_ready("vm-1", poll_interval=0.001, timeout=0.01)


async def test_async_run(aclient, server):
    server.on("POST", "/v1/vms/vm-1/exec", {"exitCode": 0, "stdout": "ok"})
    res = await aclient.vms.run("vm-1", command="echo ok")
    assert res.stdout == "ok"
    assert server.json(server.last()) == {"command": ["sh", "-c", "echo ok"]}
    await aclient.vms.run("vm-1", command=["echo", "ok"], timeout_sec=5)
    assert server.json(server.last()) == {"command": ["echo", "ok"], "timeoutSec": 5}


async def test_async_stream(aclient, server):
    lines = [
        {"t": "o", "d": base64.b64encode(b"out").decode()},
        {"t": "e", "d": base64.b64encode(b"err").decode()},
        {"t": "x", "c": 0, "to": False, "ms": 9},
    ]
    server.on("POST", "/v1/vms/vm-1/exec", httpx.Response(200, content="".join(json.dumps(x) + "\n" for x in lines).encode()))
    events = [e async for e in aclient.vms.stream("vm-1", command="make")]
    assert all(isinstance(e, ExecEvent) for e in events)
    assert [(e.type, e.data) for e in events[:2]] == [("o", b"out"), ("e", b"err")]
    assert events[2].exit_code == 0 and events[2].duration_ms == 9
    assert server.last().headers["Accept"] == "application/x-ndjson"


async def test_async_errors_and_retries(aclient, server):
    server.on("GET", "/v1/vms/vm-1", (503, {}), vm_json())
    assert (await aclient.vms.retrieve("vm-1")).id == "vm-1"
    server.on("POST", "/v1/snapshots", (409, {"error": {"code": "SNAPSHOT_BUSY", "message": "busy"}}))
    with pytest.raises(ConflictError) as info:
        await aclient.snapshots.create(vm_id="vm-1")
    assert info.value.code == "SNAPSHOT_BUSY"
    server.on("POST", "/v1/vms/vm-1/pause", (500, {}))
    with pytest.raises(InternalServerError):
        await aclient.vms.pause("vm-1")
    assert len(server.requests) == 4  # GET retried once, POSTs not retried


async def test_async_shared_namespaces(aclient, server):
    server.on("DELETE", "/v1/me/ssh-keys/SHA256%3Aa%2Bb%2F", {"deleted": True})
    assert (await aclient.me.ssh_keys.delete("SHA256:a+b/")).deleted is True
    server.on("GET", "/v1/org/quotas", {"orgId": "o", "limits": {"vcpu": 4}})
    assert (await aclient.quotas.retrieve()).limits.vcpu == 4


async def test_async_upload_and_download_dir(aclient, server, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f.txt").write_text("hello")
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("PUT", "/put/obj1", httpx.Response(200))
    server.on("POST", "/v1/vms/vm-1/files/fetch", {"exitCode": 0})
    server.on("POST", "/v1/vms/vm-1/exec", {"exitCode": 0})
    await aclient.upload("vm-1", str(src), "/root/src")
    put = server.last("PUT")
    assert b"hello" in put.content and "Authorization" not in put.headers
    assert put.headers["Content-Length"] == str(len(put.content))

    server.on("POST", "/v1/vms/vm-1/files/export", {"kind": "directory", "sizeBytes": 1})
    big = b"x" * (3 * 1024 * 1024)  # larger than a pipe buffer
    server.on("GET", "/get/obj1", httpx.Response(200, content=make_tar(("./", "dir", None), ("./big", "file", big), ("./s/t", "file", "t"))))
    await aclient.download("vm-1", "/root/src", str(tmp_path / "back"))
    assert (tmp_path / "back" / "big").read_bytes() == big
    assert (tmp_path / "back" / "s" / "t").read_text() == "t"


async def test_async_download_refuses_traversal_and_missing(aclient, server, tmp_path):
    server.on("POST", "/v1/vms/vm-1/files/presign", PRESIGN)
    server.on("POST", "/v1/vms/vm-1/files/export", {"kind": "directory", "sizeBytes": 1})
    server.on("GET", "/get/obj1", httpx.Response(200, content=make_tar(("ok", "file", "1"), ("/abs", "file", "x"), ("big", "file", b"y" * 2_000_000))))
    with pytest.raises(UnsafeArchiveError):
        await aclient.download("vm-1", "/d", str(tmp_path / "back"))
    server.on("POST", "/v1/vms/vm-1/files/export", httpx.Response(404, json={"error": {"code": "FILE_NOT_FOUND", "message": "no"}}))
    with pytest.raises(FileNotFoundError):
        await aclient.download("vm-1", "/nope", str(tmp_path / "x"))


async def test_async_build_image(aclient, server):
    server.on("POST", "/v1/snapshot-imports", {"id": "imp", "status": "pending"})
    server.on("GET", "/v1/snapshot-imports/imp", {"id": "imp", "status": "succeeded", "snapshotId": "snp"})
    server.on("GET", "/v1/snapshots/snp", {"id": "snp"})
    snap = await aclient.build(image_ref="python:3.13-slim", poll_interval=0.001)
    assert snap.id == "snp"


async def test_async_context_manager():
    async with AsyncFastvmClient(api_key="k") as c:
        assert not c._http.is_closed
    assert c._http.is_closed
