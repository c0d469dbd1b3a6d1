import pytest

from fastvm import VM, VMLaunchError, VMNotReadyError

from .conftest import vm_json


def test_launch_201_returns_without_polling(client, server):
    server.on("POST", "/v1/vms", (201, vm_json("running")))
    vm = client.vms.launch(machine_type="c1m2", name="dev")
    assert isinstance(vm, VM) and vm.status == "running" and vm.memory_mi_b == 2048
    assert server.calls() == [("POST", "/v1/vms")]
    assert server.json(server.last()) == {"machineType": "c1m2", "name": "dev"}


def test_launch_202_then_polls_until_running(client, server):
    server.on("POST", "/v1/vms", (202, vm_json("provisioning")))
    server.on("GET", "/v1/vms/vm-1", vm_json("provisioning"), vm_json("some-future-status"), vm_json("running"))
    vm = client.vms.launch(machine_type="c1m2", poll_interval=0.001)
    assert vm.status == "running"
    assert server.calls() == [("POST", "/v1/vms")] + [("GET", "/v1/vms/vm-1")] * 3


def test_launch_body_with_all_options(client, server):
    server.on("POST", "/v1/vms", (201, vm_json()))
    client.vms.launch(
        snapshot_id="snp_1",
        metadata={"team_x": "a"},
        firewall={"ingress": {"default_action": "deny", "rules": []}},
        env_vars={"MY_VAR": "1"},
        ttl={"seconds": 600, "action": "pause"},
    )
    assert server.json(server.last()) == {
        "snapshotId": "snp_1",
        "metadata": {"team_x": "a"},
        "firewall": {"ingress": {"defaultAction": "deny", "rules": []}},
        "envVars": {"MY_VAR": "1"},
        "ttl": {"seconds": 600, "action": "pause"},
    }


@pytest.mark.parametrize("status", ["error", "stopped", "deleting"])
def test_launch_terminal_status_raises(client, server, status):
    server.on("POST", "/v1/vms", (202, vm_json("provisioning")))
    server.on("GET", "/v1/vms/vm-1", vm_json("provisioning"), vm_json(status))
    with pytest.raises(VMLaunchError) as info:
        client.vms.launch(machine_type="c1m2", poll_interval=0.001)
    assert info.value.status == status and info.value.vm.id == "vm-1"


def test_launch_terminal_status_in_post_body(client, server):
    server.on("POST", "/v1/vms", (201, vm_json("error")))
    with pytest.raises(VMLaunchError):
        client.vms.launch(machine_type="c1m2")
    assert len(server.requests) == 1


def test_launch_deadline_raises_not_ready(client, server):
    server.on("POST", "/v1/vms", (202, vm_json("provisioning")))
    server.on("GET", "/v1/vms/vm-1", vm_json("provisioning"))
    with pytest.raises(VMNotReadyError) as info:
        client.vms.launch(machine_type="c1m2", poll_interval=0.001, wait_timeout=0.05)
    assert info.value.vm_id == "vm-1" and info.value.last_status == "provisioning"


def test_launch_wait_false_returns_raw_body(client, server):
    server.on("POST", "/v1/vms", (202, vm_json("provisioning")))
    vm = client.vms.launch(machine_type="c1m2", wait=False)
    assert vm.status == "provisioning"
    assert len(server.requests) == 1


def test_launch_wait_false_does_not_raise_on_error_status(client, server):
    server.on("POST", "/v1/vms", (201, vm_json("error")))
    assert client.vms.launch(machine_type="c1m2", wait=False).status == "error"


def test_wait_for_vm_ready(client, server):
    server.on("GET", "/v1/vms/vm-1", vm_json("resuming"), vm_json("running"))
    assert client.wait_for_vm_ready("vm-1", poll_interval=0.001, timeout=5).status == "running"
    server.on("GET", "/v1/vms/vm-1", vm_json("pausing"))
    with pytest.raises(VMNotReadyError):
        client.wait_for_vm_ready("vm-1", poll_interval=0.001, timeout=0.02)
