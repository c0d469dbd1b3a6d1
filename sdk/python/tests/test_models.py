import base64

import pytest

import fastvm
from fastvm import (
    VM,
    BucketMountCredentials,
    DNSPolicy,
    EgressRule,
    ExecEvent,
    ExecVMResponse,
    FirewallPolicy,
    IngressRule,
    OrgQuotaUsage,
    Snapshot,
    SnapshotImportResponse,
    Volume,
)
from fastvm._model import camel


@pytest.mark.parametrize(
    "snake,wire",
    [
        ("memory_mi_b", "memoryMiB"),
        ("disk_gi_b", "diskGiB"),
        ("size_gi_b", "sizeGiB"),
        ("expires_at_ms", "expiresAtMs"),
        ("org_id", "orgId"),
        ("public_ipv6", "publicIpv6"),
        ("block_bypass", "blockBypass"),
        ("stdout_truncated", "stdoutTruncated"),
        ("ttl_remaining_ms", "ttlRemainingMs"),
        ("h2c", "h2c"),
    ],
)
def test_camel(snake, wire):
    assert camel(snake) == wire


VM_WIRE = {
    "id": "vm-1",
    "name": "dev",
    "orgId": "org-1",
    "machineName": "c1m2",
    "sourceName": "",
    "metadata": {"team_name": "x", "someKey": "y"},
    "envVars": {"MY_VAR": "1"},
    "publicIpv6": "2001:db8::1",
    "cpu": 1,
    "memoryMiB": 2048,
    "diskGiB": 10,
    "status": "running",
    "createdAt": "2025-01-01T00:00:00Z",
    "deletedAt": None,
    "ttl": {"seconds": 3600, "action": "pause"},
    "expiresAtMs": 1700000000000,
    "firewall": {
        "ingress": {"defaultAction": "deny", "rules": [{"kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "22", "action": "allow", "description": "ssh"}]},
        "egress": {"defaultAction": "allow", "rules": [{"kind": "fqdn", "value": "*.example.com", "protocol": "tcp", "ports": "443", "action": "deny"}]},
        "dns": {"mode": "allow", "domains": ["example.com"], "blockBypass": True},
    },
    "volumes": [{"volumeId": "vol_1", "mountPath": "/mnt/a", "readOnly": False, "mountStatus": "mounted"}],
    "bucketMounts": [{"id": "bm_1", "vmId": "vm-1", "bucketUri": "s3://b", "mountPath": "/data/b", "readOnly": True}],
    "someFutureField": {"x": 1},
}


def test_vm_from_wire():
    vm = VM.from_dict(VM_WIRE)
    assert vm.org_id == "org-1"
    assert vm.memory_mi_b == 2048 and vm.disk_gi_b == 10
    assert vm.public_ipv6 == "2001:db8::1"
    assert vm.expires_at_ms == 1700000000000
    assert vm.env_vars == {"MY_VAR": "1"}
    assert vm.metadata == {"team_name": "x", "someKey": "y"}  # free-form keys untouched
    assert vm.ttl.seconds == 3600 and vm.ttl.action == "pause"
    assert isinstance(vm.firewall, FirewallPolicy)
    assert vm.firewall.ingress.default_action == "deny"
    assert isinstance(vm.firewall.ingress.rules[0], IngressRule)
    assert vm.firewall.ingress.rules[0].ports == "22"
    assert isinstance(vm.firewall.egress.rules[0], EgressRule)
    assert vm.firewall.egress.rules[0].kind == "fqdn"
    assert vm.firewall.dns.block_bypass is True
    assert vm.volumes[0].volume_id == "vol_1"
    assert vm.bucket_mounts[0].bucket_uri == "s3://b"
    assert vm.extra == {"someFutureField": {"x": 1}}


def test_vm_round_trip_to_wire():
    out = VM.from_dict(VM_WIRE).to_dict()
    expected = {k: v for k, v in VM_WIRE.items() if v is not None}
    assert out == expected


def test_from_dict_accepts_snake_case_and_models():
    policy = FirewallPolicy.from_dict({"ingress": {"default_action": "deny"}, "dns": DNSPolicy(block_bypass=True)})
    assert policy.to_dict() == {"ingress": {"defaultAction": "deny"}, "dns": {"blockBypass": True}}


def test_ttl_null_and_missing_fields():
    vm = VM.from_dict({"id": "a", "ttl": None})
    assert vm.ttl is None and vm.status is None
    assert vm.to_dict() == {"id": "a"}


def test_other_models_wire_names():
    vol = Volume.from_dict({"id": "vol_1", "sizeGiB": 5, "pendingSizeGiB": 8, "usedGiB": 1, "accessMode": "rw", "mountedCount": 2})
    assert (vol.size_gi_b, vol.pending_size_gi_b, vol.used_gi_b, vol.access_mode, vol.mounted_count) == (5, 8, 1, "rw", 2)
    assert vol.to_dict()["sizeGiB"] == 5

    quota = OrgQuotaUsage.from_dict({"orgId": "o", "limits": {"vcpu": 8, "memoryMiB": 1024, "volumeGiB": 3}, "usage": {"snapshotCount": 2}})
    assert quota.org_id == "o" and quota.limits.memory_mi_b == 1024 and quota.limits.volume_gi_b == 3
    assert quota.usage.snapshot_count == 2

    res = ExecVMResponse.from_dict({"exitCode": 1, "stdout": "a", "stderr": "b", "timedOut": False, "stdoutTruncated": True, "stderrTruncated": False, "durationMs": 12})
    assert res.exit_code == 1 and res.stdout_truncated is True and res.duration_ms == 12

    imp = SnapshotImportResponse.from_dict(
        {"id": "i", "status": "failed", "error": "boom", "snapshotId": None, "source": {"type": "image", "image": "alpine", "contextSizeBytes": 3}, "events": [{"phase": "pull", "status": "failed", "timestampMs": 5}]}
    )
    assert imp.source.image == "alpine" and imp.source.context_size_bytes == 3
    assert imp.events[0].timestamp_ms == 5


def test_bucket_mount_credentials_value_is_verbatim():
    creds = BucketMountCredentials(type="gcp-service-account-json", value={"type": "service_account", "client_email": "a@b", "private_key": "k"})
    assert creds.to_dict() == {"type": "gcp-service-account-json", "value": {"type": "service_account", "client_email": "a@b", "private_key": "k"}}


def test_exec_event_decoding():
    out = ExecEvent.from_dict({"t": "o", "d": base64.b64encode(b"hi\x00\xff").decode()})
    assert out.type == "o" and out.data == b"hi\x00\xff"
    assert out.exit_code is None
    x = ExecEvent.from_dict({"t": "x", "c": 3, "to": True, "ms": 42, "d": "spawn failed"})
    assert (x.type, x.exit_code, x.timed_out, x.duration_ms) == ("x", 3, True, 42)
    assert x.data == b"spawn failed" and x.diagnostic == "spawn failed"
    bare = ExecEvent.from_dict({"t": "x", "c": 0, "to": False, "ms": 1})
    assert bare.data == b"" and bare.diagnostic == ""
    assert out.to_dict() == {"t": "o", "d": base64.b64encode(b"hi\x00\xff").decode()}
    assert bare.to_dict() == {"t": "x", "c": 0, "to": False, "ms": 1}


def test_every_spec_schema_is_exported():
    for name in [
        "VM", "Snapshot", "ExecVMResponse", "ExecEvent", "FilePresignResponse", "FirewallPolicy", "IngressPolicy",
        "EgressPolicy", "IngressRule", "EgressRule", "DNSPolicy", "Service", "Volume", "BucketMount", "SshKey",
        "SshKeyListResponse", "OrgQuotaUsage", "OrgQuotaValues", "SnapshotImportResponse", "ContextPresignResponse",
        "ConsoleTokenResponse", "DeleteResponse", "HealthResponse", "DetachVolumeResponse", "VolumeAttachmentItem",
        "VolumeAttachmentItemWithVm", "DetachWarning", "SnapshotService", "SnapshotVolumeAttachment",
        "SnapshotBucketMountAttachment", "SnapshotImportSourceSpec", "SnapshotImportSourceView", "SnapshotImportEvent",
        "BucketMountCredentials", "VMStatus", "SnapshotStatus", "MachineType", "Metadata", "EnvVars",
    ]:
        assert hasattr(fastvm, name), name


def test_snapshot_carries_machine_name_and_firewall_typed():
    # The fields the server sends (GET /v1/snapshots/{id}) land in attributes, not in .extra.
    wire = {
        "id": "s-1", "name": "snap", "orgId": "o", "vmId": "v", "status": "ready", "machineName": "c2m4",
        "firewall": {"ingress": {"defaultAction": "deny", "rules": []}, "egress": {"defaultAction": "allow", "rules": []},
                     "dns": {"mode": "deny", "domains": [], "blockBypass": False}},
        "metadata": {}, "envVars": {}, "services": [], "volumes": [], "bucketMounts": [], "createdAt": "2025-01-01T00:00:00Z",
    }
    snap = Snapshot.from_dict(wire)
    assert snap.extra == {}
    assert snap.machine_name == "c2m4"
    assert isinstance(snap.firewall, FirewallPolicy) and snap.firewall.ingress.default_action == "deny"
    assert snap.to_dict() == wire


def test_volume_used_gib_omitted_when_unknown():
    vol = Volume.from_dict({"id": "vol_1", "sizeGiB": 10})
    assert vol.used_gi_b is None and "usedGiB" not in vol.to_dict()
    assert Volume.from_dict({"id": "vol_1", "usedGiB": 3}).used_gi_b == 3
