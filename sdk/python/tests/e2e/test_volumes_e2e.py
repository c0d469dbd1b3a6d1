"""client.volumes and client.vms.volumes against a live server, with real guests:
volumes served by the worker over NFSv3 (docs/ARCHITECTURE.md "Volumes")."""

from __future__ import annotations

import time

import pytest

from fastvm import VM, BadRequestError, ConflictError, FastvmClient, NotFoundError, RateLimitError


def run_ok(client: FastvmClient, vm: VM, cmd: str) -> str:
    r = client.vms.run(vm.id, command=cmd, timeout_sec=60)
    assert r.exit_code == 0, (cmd, r.stdout, r.stderr)
    return r.stdout


def test_volume_lifecycle_shared_between_vms(client: FastvmClient, fresh_vm: VM, vm: VM) -> None:
    vol = client.volumes.create(name="Shared Data", size_gi_b=1, access_mode="rw")
    try:
        assert (vol.status, vol.size_gi_b, vol.access_mode, vol.pending_size_gi_b) == ("ready", 1, "rw", 0)
        assert vol.id.startswith("vol_") and len(vol.id) == 26
        assert vol.id in [v.id for v in client.volumes.list()]
        usage = client.quotas.retrieve().usage
        assert usage.volume_count >= 1 and usage.volume_gi_b >= 1

        # Hot attach: read-write in one VM, read-only in another, no restart.
        a = client.vms.volumes.attach(fresh_vm.id, volume_id=vol.id, mount_path="/mnt/shared")
        assert (a.mount_status, a.read_only, a.status_message) == ("mounted", False, None)
        b = client.vms.volumes.attach(vm.id, volume_id=vol.id, mount_path="/data/shared", read_only=True)
        assert b.mount_status == "mounted" and b.read_only
        try:
            assert [x.mount_path for x in client.vms.retrieve(fresh_vm.id).volumes] == ["/mnt/shared"]
            listed = {v.id: v for v in client.vms.list()}
            assert [x.mount_path for x in listed[fresh_vm.id].volumes] == ["/mnt/shared"]
            assert [x.mount_path for x in listed[vm.id].volumes] == ["/data/shared"]
            assert client.volumes.retrieve(vol.id).mounted_count == 2
            assert sorted(x.vm_id for x in client.volumes.list_attachments(vol.id)) == sorted([fresh_vm.id, vm.id])

            run_ok(client, fresh_vm, "echo written by one VM > /mnt/shared/note.txt")
            deadline = time.monotonic() + 10
            while True:
                r = client.vms.run(vm.id, command="cat /data/shared/note.txt")
                if r.exit_code == 0:
                    assert r.stdout == "written by one VM\n"
                    break
                assert time.monotonic() < deadline, r.stderr
                time.sleep(0.2)
            ro = client.vms.run(vm.id, command="touch /data/shared/nope")
            assert ro.exit_code != 0 and "Read-only" in ro.stderr

            # A volume in use is not deleted; the same path twice is refused.
            with pytest.raises(ConflictError) as e:
                client.volumes.delete(vol.id)
            assert e.value.code == "VOLUME_IN_USE"
            with pytest.raises(ConflictError):
                client.vms.volumes.attach(fresh_vm.id, volume_id=vol.id, mount_path="/mnt/shared")

            # Grow online: the new limit holds in the guests at once.
            grown = client.volumes.update(vol.id, name="renamed", size_gi_b=2)
            assert (grown.name, grown.size_gi_b, grown.pending_size_gi_b) == ("renamed", 2, 0)
        finally:
            # The shared VM must leave clean.
            client.vms.volumes.detach(vm.id, vol.id)

        # Detach while a process uses the mount: a warning, the VM keeps running.
        run_ok(client, fresh_vm, "cd /mnt/shared && (setsid sleep 600 < note.txt > /dev/null 2>&1 &); sleep 0.3")
        d = client.vms.volumes.detach(fresh_vm.id, vol.id)
        assert d.detached and [w.type for w in d.warnings] == ["busy"], d
        assert run_ok(client, fresh_vm, "echo alive") == "alive\n"
        assert client.vms.retrieve(fresh_vm.id).volumes == []
        assert {v.id: v for v in client.vms.list()}[fresh_vm.id].volumes == []
        with pytest.raises(NotFoundError):
            client.vms.volumes.detach(fresh_vm.id, vol.id)
    finally:
        for att in client.volumes.list_attachments(vol.id):
            client.vms.volumes.detach(att.vm_id, vol.id)
        client.volumes.delete(vol.id)
    with pytest.raises(NotFoundError):
        client.volumes.retrieve(vol.id)


def test_attach_to_a_paused_vm_is_pending_until_resume(client: FastvmClient, fresh_vm: VM) -> None:
    vol = client.volumes.create(name="later", size_gi_b=1, access_mode="rw")
    try:
        client.vms.pause(fresh_vm.id)
        a = client.vms.volumes.attach(fresh_vm.id, volume_id=vol.id, mount_path="/data/later")
        assert a.mount_status == "pending" and "paused" in (a.status_message or "")
        resumed = client.vms.resume(fresh_vm.id)
        assert [(x.mount_path, x.mount_status) for x in resumed.volumes] == [("/data/later", "mounted")]
        run_ok(client, fresh_vm, "echo ok > /data/later/f && cat /data/later/f")
        # A mounted volume survives a pause and resume (same server, NFS is stateless).
        client.vms.pause(fresh_vm.id)
        client.vms.resume(fresh_vm.id)
        assert run_ok(client, fresh_vm, "cat /data/later/f && echo more >> /data/later/f && wc -l < /data/later/f") == "ok\n2\n"
        client.vms.volumes.detach(fresh_vm.id, vol.id)
    finally:
        client.volumes.delete(vol.id)


def test_bad_volume_requests_are_clear_errors(client: FastvmClient, vm: VM) -> None:
    with pytest.raises(BadRequestError):
        client.volumes.create(name="x", size_gi_b=0, access_mode="rw")
    with pytest.raises(BadRequestError):
        client.volumes.create(name="  ", size_gi_b=1, access_mode="rw")
    with pytest.raises(RateLimitError) as q:
        client.volumes.create(name="huge", size_gi_b=100_000, access_mode="rw")
    assert q.value.code == "QUOTA_EXCEEDED_VOLUME_GIB"
    assert "huge" not in [v.name for v in client.volumes.list()]
    with pytest.raises(NotFoundError):
        client.volumes.retrieve("vol_0000000000000000000000")
    with pytest.raises(NotFoundError):
        client.vms.volumes.attach(vm.id, volume_id="vol_0000000000000000000000", mount_path="/mnt/x")
    vol = client.volumes.create(name="paths", size_gi_b=1, access_mode="ro")
    try:
        for bad in ["/etc/passwd", "mnt/x", "/mnt/../etc", "/mnt/"]:
            with pytest.raises(BadRequestError) as e:
                client.vms.volumes.attach(vm.id, volume_id=vol.id, mount_path=bad)
            assert e.value.code == "INVALID_MOUNT_PATH", bad
        # An `ro` volume is mounted read-only whatever the attach asks.
        a = client.vms.volumes.attach(vm.id, volume_id=vol.id, mount_path="/mnt/ro")
        assert a.read_only
        r = client.vms.run(vm.id, command="touch /mnt/ro/x")
        assert r.exit_code != 0
        client.vms.volumes.detach(vm.id, vol.id)
    finally:
        client.volumes.delete(vol.id)


def test_snapshots_record_volumes_and_restores_attach_them_again(client: FastvmClient, fresh_vm: VM) -> None:
    kept = client.volumes.create(name="kept", size_gi_b=1, access_mode="rw")
    gone = client.volumes.create(name="gone", size_gi_b=1, access_mode="rw")
    restored = None
    try:
        client.vms.volumes.attach(fresh_vm.id, volume_id=kept.id, mount_path="/mnt/kept")
        client.vms.volumes.attach(fresh_vm.id, volume_id=gone.id, mount_path="/mnt/gone", read_only=True)
        run_ok(client, fresh_vm, "echo before snapshot > /mnt/kept/f")
        snap = client.snapshots.create(vm_id=fresh_vm.id, name="with-volumes")
        assert sorted((v.volume_id, v.mount_path, v.read_only) for v in snap.volumes) == sorted(
            [(kept.id, "/mnt/kept", False), (gone.id, "/mnt/gone", True)]
        )
        client.vms.volumes.detach(fresh_vm.id, gone.id)
        client.volumes.delete(gone.id)
        # Written after the snapshot: the restored VM sees the volume as it is now.
        run_ok(client, fresh_vm, "echo after snapshot >> /mnt/kept/f")

        restored = client.vms.launch(snapshot_id=snap.id)
        vm = client.vms.retrieve(restored.id)
        by_path = {v.mount_path: v for v in vm.volumes}
        assert by_path["/mnt/kept"].mount_status == "mounted", by_path
        assert by_path["/mnt/gone"].mount_status == "failed"
        assert "no longer exists" in (by_path["/mnt/gone"].status_message or "")
        assert run_ok(client, vm, "cat /mnt/kept/f") == "before snapshot\nafter snapshot\n"
        # The deleted volume's old mount was detached in the guest: nothing hangs on it.
        r = client.vms.run(vm.id, command="timeout 10 ls /mnt/gone; grep -c ' /mnt/gone ' /proc/mounts", timeout_sec=30)
        assert r.stdout.strip().endswith("0"), (r.stdout, r.stderr)
        for path in ["/mnt/kept", "/mnt/gone"]:
            client.vms.volumes.detach(vm.id, by_path[path].volume_id)
    finally:
        if restored is not None:
            client.vms.delete(restored.id)
        for att in client.volumes.list_attachments(kept.id):
            client.vms.volumes.detach(att.vm_id, kept.id)
        client.volumes.delete(kept.id)
