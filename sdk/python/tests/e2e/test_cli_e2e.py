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


def test_cli_keys_and_quotas_manage_the_live_store(fastvm_server) -> None:
    """`fastvm keys` and `fastvm orgs quota` work on the server's store while it runs."""
    import httpx

    data = ["--data-dir", str(fastvm_server.data_dir)]
    token = cli(fastvm_server, "keys", "create", "--name", "ci-key", *data).stdout.decode().strip()
    assert token.startswith("fvm_")
    url = f"{fastvm_server.base_url}/v1/vms"
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"}).status_code == 200

    listing = cli(fastvm_server, "keys", "list", *data).stdout.decode()
    line = next(row for row in listing.splitlines() if "ci-key" in row)
    key_id, revoked = line.split()[0], line.split()[-1]
    assert revoked == "no" and token not in listing  # secrets are never listed
    cli(fastvm_server, "keys", "revoke", key_id, *data)
    assert "yes" in next(row for row in cli(fastvm_server, "keys", "list", *data).stdout.decode().splitlines() if key_id in row)
    # The server caches keys that authenticated for at most 1 s (KEY_CACHE_TTL): a
    # revocation by another process (this CLI) is seen within that.
    import time

    deadline = time.monotonic() + 3
    while True:
        denied = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        if denied.status_code == 401 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "UNAUTHENTICATED"

    # Raising limits (harmless for the other tests sharing this server).
    shown = cli(fastvm_server, "orgs", "quota", "set", "--vcpu", "96", "--snapshot-count", "77", *data).stdout.decode()
    assert any(row.split()[:2] == ["vcpu", "96"] for row in shown.splitlines()), shown
    quotas = httpx.get(f"{fastvm_server.base_url}/v1/org/quotas", headers={"Authorization": f"Bearer {fastvm_server.api_key}"}).json()
    assert quotas["limits"]["vcpu"] == 96 and quotas["limits"]["snapshotCount"] == 77, quotas
    nothing = cli(fastvm_server, "orgs", "quota", "set", *data, check=False)
    assert nothing.returncode != 0 and b"nothing to set" in nothing.stderr
