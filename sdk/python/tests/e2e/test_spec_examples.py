"""The code examples of the SDK reference (fastvm-sdk-reference), pasted as a user
would, for every feature the server serves today.

Each example is copied verbatim; only ``vm`` / ``some_id`` come from a fixture and
``sys`` is imported. Setup the example assumes (a ``main.py`` in the VM, a project
with a ``make`` step) is done before the pasted lines, and the results are checked
after them.
"""

from __future__ import annotations

import pytest

from fastvm import APIStatusError

MAIN_PY = "import sys\nprint('main.py args:', sys.argv[1:])\n"

# A stand-in for the user's build: `make -j8` writes to stdout and stderr.
FAKE_MAKE = """#!/bin/sh
echo "make: building with $*"
echo "warning: this is a test build" >&2
echo "make: done"
"""


def test_import_example(fastvm_server) -> None:
    # --- pasted from "Import" ---
    from fastvm import FastvmClient

    client = FastvmClient()  # reads FASTVM_API_KEY / FASTVM_BASE_URL
    # ---
    assert client.api_key == fastvm_server.api_key
    assert client.base_url == fastvm_server.base_url
    assert client.health().status == "ok"


def test_wait_for_vm_ready_example(client, vm) -> None:
    some_id = vm.id
    # --- pasted from client.wait_for_vm_ready ---
    vm = client.vms.retrieve(some_id)
    vm = client.wait_for_vm_ready(vm.id, timeout=120)
    # ---
    assert vm.id == some_id and vm.status == "running"


def test_launch_example(capsys) -> None:
    # --- pasted from client.vms.launch (the snapshot line is the next test) ---
    from fastvm import FastvmClient

    client = FastvmClient()
    vm = client.vms.launch(machine_type="c1m2", name="dev")
    print(vm.id, vm.status)  # "running"
    # ---
    assert capsys.readouterr().out == f"{vm.id} running\n"
    assert vm.name == "dev" and vm.machine_name == "c1m2"
    first = vm

    # --- pasted ---
    # Skip polling — get the raw 201/202 body
    vm = client.vms.launch(machine_type="c1m2", wait=False)
    # ---
    assert vm.status in ("provisioning", "running") and vm.id != first.id
    assert client.wait_for_vm_ready(vm.id, poll_interval=0.2).status == "running"
    for v in (first, vm):
        client.vms.delete(v.id)


def test_launch_example_restore_from_snapshot_placeholder(client) -> None:
    # The example's id is a placeholder ("snp_..."); the server must refuse it
    # with a clear error rather than boot something.
    with pytest.raises(APIStatusError) as exc:
        # --- pasted ---
        # Restore from snapshot
        vm = client.vms.launch(snapshot_id="snp_...")  # noqa: F841 (the spec example, as pasted)
        # ---
    assert 400 <= exc.value.status_code < 500
    assert exc.value.message


def test_run_example(client, vm, capsys) -> None:
    setup = client.vms.run(vm.id, command=["python3", "-c", f"open('/root/main.py', 'w').write({MAIN_PY!r})"])
    assert setup.exit_code == 0, setup.stderr

    # --- pasted from client.vms.run ---
    # Shell strings work — auto-wrapped into ["sh", "-c", ...]
    result = client.vms.run(vm.id, command="ls -la /root")

    # Argv lists pass through unchanged
    result = client.vms.run(vm.id, command=["python3", "main.py", "--flag"])

    print(result.exit_code, result.stdout)
    # ---
    assert capsys.readouterr().out == "0 main.py args: ['--flag']\n\n"
    listing = client.vms.run(vm.id, command="ls -la /root")
    assert listing.exit_code == 0 and "main.py" in listing.stdout and listing.stdout.startswith("total ")


def test_stream_example(client, vm, capsysbinary) -> None:
    import sys

    setup = client.vms.run(
        vm.id,
        command=["python3", "-c", f"import os; open('/usr/local/bin/make', 'w').write({FAKE_MAKE!r}); os.chmod('/usr/local/bin/make', 0o755)"],
    )
    assert setup.exit_code == 0, setup.stderr

    # --- pasted from client.vms.stream ---
    from fastvm import FastvmClient, ExecEvent

    client = FastvmClient()
    for event in client.vms.stream(vm.id, command="make -j8"):
        if event.type == "o":
            sys.stdout.buffer.write(event.data)
        elif event.type == "e":
            sys.stderr.buffer.write(event.data)
        elif event.type == "x":
            print(f"exit {event.exit_code} in {event.duration_ms} ms")
    # ---
    sys.stdout.flush()
    captured = capsysbinary.readouterr()
    out, err = captured.out.decode(), captured.err.decode()
    assert "make: building with -j8\nmake: done\n" in out
    assert err == "warning: this is a test build\n"
    assert "exit 0 in " in out and out.rstrip().endswith(" ms")
    assert isinstance(event, ExecEvent) and event.type == "x"
