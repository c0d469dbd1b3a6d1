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
