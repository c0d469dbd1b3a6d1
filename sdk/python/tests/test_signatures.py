"""Names, order and defaults of the spec's override / helper signatures."""

import inspect

import pytest

from fastvm import AsyncFastvmClient, FastvmClient

EMPTY = inspect.Parameter.empty

SPEC = {
    "vms.launch": [
        ("machine_type", None), ("snapshot_id", None), ("name", None), ("metadata", None), ("firewall", None),
        ("wait", True), ("poll_interval", 2.0), ("wait_timeout", 300.0), ("timeout", None), ("max_retries", 0),
        ("env_vars", None), ("ttl", None),
    ],
    "vms.run": [("id", EMPTY), ("command", EMPTY), ("timeout_sec", None), ("max_retries", 0)],
    "vms.stream": [("id", EMPTY), ("command", EMPTY), ("timeout_sec", None)],
    "upload": [("vm_id", EMPTY), ("local_path", EMPTY), ("remote_path", EMPTY), ("fetch_timeout_sec", 600), ("exec_timeout_sec", 600)],
    "download": [("vm_id", EMPTY), ("remote_path", EMPTY), ("local_path", EMPTY), ("exec_timeout_sec", 600)],
    "wait_for_vm_ready": [("vm_id", EMPTY), ("poll_interval", 2.0), ("timeout", 300.0)],
    "build": [
        ("image_ref", None), ("dockerfile", None), ("context_dir", None), ("machine_type", "c1m2"), ("disk_gi_b", None),
        ("name", None), ("poll_interval", 2.0), ("timeout", 1800.0),
    ],
    "vms.services.register": [("id", EMPTY), ("name", EMPTY), ("port", EMPTY), ("h2c", False)],
    "vms.volumes.attach": [("id", EMPTY), ("volume_id", EMPTY), ("mount_path", EMPTY), ("read_only", False)],
}


def resolve(obj, dotted):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("cls", [FastvmClient, AsyncFastvmClient])
@pytest.mark.parametrize("dotted", sorted(SPEC))
def test_signature(cls, dotted):
    client = cls(api_key="k")
    params = inspect.signature(resolve(client, dotted)).parameters
    assert [(n, p.default) for n, p in params.items()] == SPEC[dotted]


def test_client_constructor():
    params = inspect.signature(FastvmClient).parameters
    assert list(params)[:4] == ["api_key", "base_url", "timeout", "max_retries"]
    assert params["api_key"].default is None and params["base_url"].default is None and params["max_retries"].default == 2
