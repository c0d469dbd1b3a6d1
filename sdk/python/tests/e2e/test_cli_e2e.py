"""The `fastvm` CLI (the same binary as the server) against the live server:
VM lifecycle, exec with live output and exit codes, snapshots and restores.
Configuration comes from FASTVM_BASE_URL / FASTVM_API_KEY, as for the SDK."""

from __future__ import annotations

import json
import os
import subprocess

import pytest


def cli(server, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, FASTVM_BASE_URL=server.base_url, FASTVM_API_KEY=server.api_key)
    proc = subprocess.run([str(server.binary), *args], env=env, capture_output=True, timeout=300)
    if check and proc.returncode != 0:
        pytest.fail(f"fastvm {' '.join(args)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}")
    return proc


def test_cli_vm_exec_snapshot_round_trip(fastvm_server) -> None:
    vm = json.loads(cli(fastvm_server, "vm", "launch", "-m", "c1m2", "--name", "cli-test", "-e", "GREETING=hi there", "--json").stdout)
    assert vm["status"] == "running" and vm["name"] == "cli-test"
    vm_id = vm["id"]
    try:
        # exec streams stdout/stderr and exits with the command's exit code.
        out = cli(fastvm_server, "exec", vm_id, "--", "sh", "-c", 'echo "$GREETING"; echo oops >&2; exit 7', check=False)
        assert out.returncode == 7
        assert out.stdout == b"hi there\n"
        assert out.stderr == b"oops\n"
        assert cli(fastvm_server, "exec", vm_id, "--", "sh", "-c", "echo state > /root/state").returncode == 0

        table = cli(fastvm_server, "vm", "list").stdout.decode()
        assert vm_id in table and "running" in table
        paused = json.loads(cli(fastvm_server, "vm", "pause", vm_id, "--json").stdout)
        assert paused["status"] == "paused"
        resumed = json.loads(cli(fastvm_server, "vm", "resume", vm_id, "--json").stdout)
        assert resumed["status"] == "running"

        snap = json.loads(cli(fastvm_server, "snapshot", "create", vm_id, "--name", "cli snap", "--json").stdout)[0]
        assert snap["status"] == "ready" and snap["name"] == "cli snap"
        listed = json.loads(cli(fastvm_server, "snapshot", "list", "--json").stdout)
        assert snap["id"] in [s["id"] for s in listed]
        clone = json.loads(cli(fastvm_server, "vm", "launch", "--snapshot", snap["id"], "--json").stdout)
        try:
            restored = cli(fastvm_server, "exec", clone["id"], "--", "cat", "/root/state")
            assert restored.stdout == b"state\n"
        finally:
            cli(fastvm_server, "vm", "rm", clone["id"])
        cli(fastvm_server, "snapshot", "rm", snap["id"])
        gone = cli(fastvm_server, "snapshot", "get", snap["id"], check=False)
        assert gone.returncode != 0 and b"NOT_FOUND" in gone.stderr
    finally:
        cli(fastvm_server, "vm", "rm", vm_id)
    missing = cli(fastvm_server, "vm", "get", vm_id, check=False)
    assert missing.returncode != 0 and b"NOT_FOUND" in missing.stderr


def test_cli_reports_bad_input_clearly(fastvm_server) -> None:
    out = cli(fastvm_server, "vm", "launch", "-m", "c9m99", check=False)
    assert out.returncode != 0 and b"INVALID_MACHINE_TYPE" in out.stderr
    out = cli(fastvm_server, "vm", "launch", check=False)
    assert out.returncode != 0 and b"--machine" in out.stderr
