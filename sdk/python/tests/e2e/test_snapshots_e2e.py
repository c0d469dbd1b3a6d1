"""client.snapshots.* and vms.launch(snapshot_id=...) against a live server."""

from __future__ import annotations

import time
import uuid

import httpx
import pytest

from fastvm import VM, DeleteResponse, NotFoundError, Snapshot


@pytest.fixture
def snapshots_served(fastvm_server) -> None:
    """The server serves /v1/snapshots (a 404 here is a failure, never a skip)."""
    r = httpx.get(
        f"{fastvm_server.base_url}/v1/snapshots",
        headers={"Authorization": f"Bearer {fastvm_server.api_key}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def _wait_snapshot_ready(client, snap: Snapshot, timeout: float = 180.0) -> Snapshot:
    deadline = time.monotonic() + timeout
    while snap.status == "creating" and time.monotonic() < deadline:
        time.sleep(0.5)
        snap = client.snapshots.retrieve(snap.id)
    return snap


def test_snapshot_create_restore_delete(client, fresh_vm, snapshots_served) -> None:
    assert client.vms.run(fresh_vm.id, command="echo from-snapshot > /root/marker && sync").exit_code == 0

    snap = client.snapshots.create(vm_id=fresh_vm.id, name="e2e-snap")
    assert isinstance(snap, Snapshot)
    uuid.UUID(snap.id)
    assert (snap.vm_id, snap.name) == (fresh_vm.id, "e2e-snap")
    snap = _wait_snapshot_ready(client, snap)
    assert snap.status in (None, "ready"), snap.status

    assert snap.id in {s.id for s in client.snapshots.list()}
    got = client.snapshots.retrieve(snap.id)
    assert (got.id, got.vm_id, got.name) == (snap.id, fresh_vm.id, "e2e-snap")
    renamed = client.snapshots.update(snap.id, name="e2e-renamed")
    assert renamed.name == "e2e-renamed"

    # The spec's example, with a real snapshot id.
    restored = client.vms.launch(snapshot_id=snap.id)
    assert isinstance(restored, VM)
    assert restored.status == "running" and restored.id != fresh_vm.id
    assert restored.source_name  # empty only on a fresh boot
    r = client.vms.run(restored.id, command="cat /root/marker")
    assert (r.exit_code, r.stdout) == (0, "from-snapshot\n")
    client.vms.delete(restored.id)

    deleted = client.snapshots.delete(snap.id)
    assert isinstance(deleted, DeleteResponse) and (deleted.id, deleted.deleted) == (snap.id, True)
    with pytest.raises(NotFoundError):
        client.snapshots.retrieve(snap.id)


def test_snapshot_not_found(client, snapshots_served) -> None:
    with pytest.raises(NotFoundError):
        client.snapshots.retrieve(str(uuid.uuid4()))
