"""client.snapshot_imports.* and client.build(image_ref=...) against a live server,
with images pushed by the test to real registries (docker-registry) on this machine.

Every import pulls over plain HTTP (the server runs with --insecure-registry for
both test registries), unpacks the layers on the worker, makes a root disk, boots
it once (our agent as PID 1: the images hold busybox only) and captures it.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import httpx
import pytest

from fastvm import NotFoundError, Snapshot

from . import oci_registry as oci


def _api(server):
    return httpx.Client(
        base_url=server.base_url, headers={"Authorization": f"Bearer {server.api_key}"}, timeout=60
    )


def _wait(client, imp_id: str, timeout: float = 300.0):
    deadline = time.monotonic() + timeout
    imp = client.snapshot_imports.retrieve(imp_id)
    while imp.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"import {imp_id} still {imp.status}: {imp.events}"
        time.sleep(0.5)
        imp = client.snapshot_imports.retrieve(imp_id)
    return imp


def _run(client, vm_id: str, command: str) -> str:
    r = client.vms.run(vm_id, command=command)
    assert r.exit_code == 0, (command, r.stdout, r.stderr)
    return r.stdout


def test_busybox_image_builds_boots_and_runs_as_the_image_user(client, fastvm_server, oci_registries) -> None:
    ref = oci_registries["images"]["busybox"]
    snap = client.build(image_ref=ref)
    assert isinstance(snap, Snapshot) and snap.status in (None, "ready")
    imports = [i for i in client.snapshot_imports.list() if i.snapshot_id == snap.id]
    assert len(imports) == 1
    imp = imports[0]
    assert imp.status == "succeeded" and imp.error is None
    assert imp.machine_name == "c1m2" and imp.disk_gi_b == 10
    phases = [(e.phase, e.status) for e in imp.events]
    for want in [("pull", "completed"), ("export", "completed"), ("saving", "completed"), ("warming", "completed"), ("done", "completed")]:
        assert want in phases, phases
    logs = _api(fastvm_server).get(f"/v1/snapshot-imports/{imp.id}/logs")
    assert logs.status_code == 200 and "layer 1/1" in logs.text, logs.text

    vm = client.vms.launch(snapshot_id=snap.id, env_vars={"FROM_LAUNCH": "yes"})
    try:
        assert vm.status == "running"
        assert vm.source_name and "busybox" in vm.source_name
        # The image's User, WorkingDir and Env are the defaults of every exec.
        assert _run(client, vm.id, "id -un; id -u; pwd; echo $GREETING; echo $FROM_LAUNCH; echo $HOME") == (
            "app\n1000\n/home/app\nhello from the image\nyes\n/home/app\n"
        )
        assert _run(client, vm.id, "cat /etc/passwd") == oci.PASSWD
        # The agent configured the network without any tool of the image.
        assert "nameserver" in _run(client, vm.id, "cat /etc/resolv.conf")
        assert _run(client, vm.id, "ls /bin/busybox /proc/1/status >/dev/null && echo ok") == "ok\n"
        # The disk is the requested size (made at full size: nothing in the image grows it).
        df = _run(client, vm.id, "df -k / | tail -1").split()
        assert int(df[1]) > 9 * 1024 * 1024, df
    finally:
        client.vms.delete(vm.id)

    # A second import of the same image reuses the cached layers.
    again = client.snapshot_imports.create(source={"type": "image", "image": ref}, name="busybox-again")
    assert again.status == "pending" and again.name == "busybox-again"
    again = _wait(client, again.id)
    assert again.status == "succeeded", again.error
    pull = [e for e in again.events if (e.phase, e.status) == ("pull", "completed")]
    assert pull and "(1 from the cache), 0 bytes downloaded" in (pull[0].message or ""), pull

    # Delete cascades to the snapshot.
    for i in (imp, again):
        assert client.snapshot_imports.delete(i.id).deleted is True
        with pytest.raises(NotFoundError):
            client.snapshot_imports.retrieve(i.id)
    with pytest.raises(NotFoundError):
        client.snapshots.retrieve(snap.id)


def test_layered_images_apply_whiteouts_links_and_modes(client, oci_registries) -> None:
    images = oci_registries["images"]
    expect = oci.LAYERED_EXPECT
    # OCI index (arm64 listed first; gzip, zstd and plain layers), then a Docker
    # manifest list of Docker v2 manifests.
    for ref in (images["layered"], images["docker_list"]):
        snap = client.build(image_ref=ref)
        vm = client.vms.launch(snapshot_id=snap.id)
        try:
            assert _run(client, vm.id, "pwd") == "/data\n"
            assert _run(client, vm.id, "test -e /PLATFORM || echo amd64-picked") == "amd64-picked\n"
            for path, (content, mode) in expect["files"].items():
                assert _run(client, vm.id, f"cat {path}") == content, path
                assert _run(client, vm.id, f"stat -c %a {path}").strip() == format(mode, "o"), path
            for path, (uid, gid) in expect["owners"].items():
                assert _run(client, vm.id, f"stat -c '%u %g' {path}") == f"{uid} {gid}\n", path
            for path, target in expect["symlinks"].items():
                assert _run(client, vm.id, f"readlink {path}") == target + "\n", path
            for a, b in expect["hardlinks"]:
                assert _run(client, vm.id, f"stat -c %i {a}") == _run(client, vm.id, f"stat -c %i {b}")
            for path in expect["absent"]:
                assert _run(client, vm.id, f"test -e {path} && echo present || echo absent") == "absent\n", path
            for d, names in expect["dir_listings"].items():
                assert _run(client, vm.id, f"ls -A {d}").split() == names
            assert _run(client, vm.id, "/data/exec") == "layer3-script\n"
            assert _run(client, vm.id, "ls -A /data | grep -c '^.wh.' || true").strip() == "0"
        finally:
            client.vms.delete(vm.id)
            for i in client.snapshot_imports.list():
                if i.snapshot_id == snap.id:
                    client.snapshot_imports.delete(i.id)


def test_hostile_layers_stay_inside_the_root_disk(client, fastvm_server, oci_registries) -> None:
    passwd = Path("/etc/passwd").read_bytes()
    before = hashlib.sha256(passwd).hexdigest()
    ref = oci_registries["images"]["hostile"]
    imp = client.snapshot_imports.create(source={"type": "image", "image": ref})
    imp = _wait(client, imp.id)
    assert imp.status == "succeeded", imp.error
    # Nothing landed on the host: not through `..`, not through symlinks.
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == before
    assert not Path("/tmp/fastvm-escape-marker").exists()
    for name in ("escape-dotdot", "escape2", "fastvm-escape-up"):
        hits = [p for p in (fastvm_server.data_dir / "imports").rglob(name)] if (fastvm_server.data_dir / "imports").exists() else []
        assert not hits, hits
        for parent in (fastvm_server.data_dir, fastvm_server.data_dir.parent, Path("/")):
            assert not (parent / name).exists(), parent / name
    logs = _api(fastvm_server).get(f"/v1/snapshot-imports/{imp.id}/logs").text
    assert "skipped" in logs, logs
    vm = client.vms.launch(snapshot_id=imp.snapshot_id)
    try:
        assert _run(client, vm.id, "cat /hostile-ok") == "the image itself is fine\n"
        # The absolute symlink resolved inside the image's root.
        out = _run(client, vm.id, "cat /tmp/fastvm-escape-marker 2>/dev/null; ls / | grep -c escape || true")
        assert "fastvm-escape-dotdot" not in out
        # Hard links to /etc/passwd are the image's own file (or were skipped).
        out = _run(client, vm.id, "cat /passwd-link 2>/dev/null || echo skipped")
        assert out in (oci.PASSWD, "skipped\n"), out
    finally:
        client.vms.delete(vm.id)
        client.snapshot_imports.delete(imp.id)


def test_import_errors_are_clear(client, fastvm_server, oci_registries) -> None:
    host = oci_registries["open"].host
    api = _api(fastvm_server)
    cases = [
        ({"source": {"type": "image", "image": f"{host}/nope/missing:1"}}, "not found"),
        # The index names the platforms it has.
        ({"source": {"type": "image", "image": oci_registries["images"]["layered"], "platform": "linux/s390x"}}, "it has: linux/arm64, linux/amd64"),
        ({"source": {"type": "image", "image": oci_registries["private"]}}, "credentials"),
        (
            {"source": {"type": "image", "image": oci_registries["private"], "registryUsername": "puller", "registryPassword": "wrong"}},
            "credentials",
        ),
    ]
    for body, needle in cases:
        r = api.post("/v1/snapshot-imports", json=body)
        assert r.status_code == 201, r.text
        imp = _wait(client, r.json()["id"])
        assert imp.status == "failed", (body, imp)
        assert needle in (imp.error or ""), (needle, imp.error)
        assert "s3cret" not in (imp.error or "") and "wrong" not in r.text
        assert [e.phase for e in imp.events][-1] == "done"
        assert imp.snapshot_id is None
        client.snapshot_imports.delete(imp.id)
    # Bad requests are refused before anything starts.
    for body, status, code in [
        ({"source": {"type": "image"}}, 400, None),
        ({"source": {"type": "image", "image": "x"}, "diskGiB": 0}, 400, None),
        ({"source": {"type": "image", "image": "x"}, "machineType": "c99"}, 400, "INVALID_MACHINE_TYPE"),
        ({"source": {"type": "image", "image": "x"}, "diskGiB": 100000}, 400, None),
        ({"source": {"type": "dockerfile", "contextRef": "abc"}}, 501, "NOT_IMPLEMENTED"),
    ]:
        r = api.post("/v1/snapshot-imports", json=body)
        assert r.status_code == status, (body, r.text)
        if code:
            assert r.json()["error"]["code"] == code
    assert api.post("/v1/snapshot-imports/context-presign", json={"sizeBytes": 10}).status_code == 501
    assert api.get("/v1/snapshot-imports/not-a-uuid").status_code == 404
    assert api.post(f"/v1/snapshot-imports/{'0' * 8}-0000-4000-8000-{'0' * 12}/cancel").status_code == 404


def test_private_registry_and_cancel_frees_everything(client, fastvm_server, oci_registries) -> None:
    user, password = oci_registries["credentials"]
    ref = oci_registries["private"]
    imp = client.snapshot_imports.create(
        source={"type": "image", "image": ref, "registry_username": user, "registry_password": password},
        name="private",
    )
    assert imp.source.registry_username == user
    # Cancel once the image is pulled (the build VM may be booting).
    deadline = time.monotonic() + 120
    while True:
        cur = client.snapshot_imports.retrieve(imp.id)
        if any((e.phase, e.status) == ("pull", "completed") for e in cur.events) or cur.status in ("failed", "succeeded"):
            break
        assert time.monotonic() < deadline, cur.events
        time.sleep(0.2)
    assert cur.status not in ("failed",), cur.error
    cancelled = client.snapshot_imports.cancel(imp.id)
    if cur.status != "succeeded":
        assert cancelled.status == "cancelled" and cancelled.snapshot_id is None
        assert [(e.phase, e.status) for e in cancelled.events][-1] == ("done", "cancelled")
        # Its build VM and scratch files go.
        deadline = time.monotonic() + 30
        while (fastvm_server.data_dir / "vms" / imp.id).exists() or (fastvm_server.data_dir / "imports" / imp.id).exists():
            assert time.monotonic() < deadline, "the cancelled import left files behind"
            time.sleep(0.2)
        assert imp.id not in fastvm_server.qemu_pids()
        r = _api(fastvm_server).post(f"/v1/snapshot-imports/{imp.id}/cancel")
        assert r.status_code == 409 and r.json()["error"]["code"] == "INVALID_STATE"
    client.snapshot_imports.delete(imp.id)
    assert os.path.isdir(fastvm_server.data_dir / "oci" / "blobs" / "sha256")
