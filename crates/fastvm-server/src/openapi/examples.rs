//! Examples of the OpenAPI document: what requests and answers of the API look
//! like, shown by the API reference (`/docs`). Used by the handlers'
//! `#[utoipa::path]` annotations as `example = json!(examples::vm())`.
//!
//! They are real shapes: a test in [`crate::openapi`] checks every example
//! against the schema it documents (no unknown field, every required field,
//! enum values), so an example cannot drift from its schema unnoticed.

use serde_json::{json, Value};

pub const VM_ID: &str = "0b9c4a52-6d1e-4f3a-9a57-2f1c8e3d7b10";
pub const ORG_ID: &str = "5e2f8a41-93c7-4b0d-8e6a-1d4c7f9b2a63";
pub const SNAPSHOT_ID: &str = "c71d3e08-2b94-4a6f-b5e1-8f0a9c4d6e27";
const CREATED_AT: &str = "2025-06-01T12:00:00Z";

/// A firewall policy as a request gives it.
pub fn firewall() -> Value {
    json!({
        "ingress": {
            "defaultAction": "deny",
            "rules": [
                {"kind": "cidr", "value": "203.0.113.0/24", "ports": "22", "protocol": "tcp", "action": "allow", "description": "office SSH"}
            ]
        },
        "egress": {
            "defaultAction": "deny",
            "rules": [
                {"kind": "fqdn", "value": "pypi.org", "ports": "443", "protocol": "tcp", "action": "allow"},
                {"kind": "cidr", "value": "10.0.0.0/8", "ports": "any", "protocol": "any", "action": "allow"}
            ]
        },
        "dns": {"mode": "deny", "domains": ["pypi.org", "files.pythonhosted.org"], "blockBypass": true}
    })
}

/// `PATCH /v1/vms/{id}/firewall`: only the blocks given are replaced.
pub fn firewall_patch() -> Value {
    json!({
        "egress": {
            "defaultAction": "deny",
            "rules": [{"kind": "cidr", "value": "198.51.100.7/32", "ports": "443", "protocol": "tcp", "action": "allow"}]
        }
    })
}

fn default_firewall() -> Value {
    json!({
        "ingress": {"defaultAction": "deny", "rules": []},
        "egress": {"defaultAction": "allow", "rules": []},
        "dns": {"mode": "deny", "domains": [], "blockBypass": false}
    })
}

/// A running VM.
pub fn vm() -> Value {
    json!({
        "id": VM_ID,
        "orgId": ORG_ID,
        "name": "build-runner",
        "status": "running",
        "machineName": "c1m2",
        "sourceName": "",
        "cpu": 1,
        "memoryMiB": 2048,
        "diskGiB": 10,
        "metadata": {"team": "ci"},
        "envVars": {"RUST_LOG": "info"},
        "firewall": default_firewall(),
        "effectiveFirewall": default_firewall(),
        "ttl": {"seconds": 3600, "action": "pause"},
        "expiresAtMs": 1748782800000i64,
        "ttlRemainingMs": null,
        "createdAt": CREATED_AT,
        "pausedAt": null,
        "statusMessage": null,
        "deletedAt": null,
        "publicIpv6": null,
        "volumes": [],
        "bucketMounts": []
    })
}

/// The VM, with its status (and the fields that go with it) changed.
pub fn vm_with(changes: Value) -> Value {
    let mut vm = vm();
    if let (Some(o), Value::Object(c)) = (vm.as_object_mut(), changes) {
        o.extend(c);
    }
    vm
}

pub fn vm_paused() -> Value {
    vm_with(
        json!({"status": "paused", "pausedAt": "2025-06-01T12:30:00Z", "expiresAtMs": null, "ttlRemainingMs": 1800000}),
    )
}

pub fn vm_provisioning() -> Value {
    vm_with(json!({"status": "provisioning", "expiresAtMs": null}))
}

pub fn vm_updated() -> Value {
    vm_with(json!({"name": "build-runner-2", "metadata": {"team": "ci", "branch": "main"}}))
}

pub fn vm_firewalled() -> Value {
    vm_with(json!({"firewall": firewall(), "effectiveFirewall": firewall()}))
}

pub fn vm_list() -> Value {
    json!([vm()])
}

pub fn launch_request() -> Value {
    json!({
        "machineType": "c1m2",
        "name": "build-runner",
        "metadata": {"team": "ci"},
        "envVars": {"RUST_LOG": "info"},
        "ttl": {"seconds": 3600, "action": "pause"}
    })
}

pub fn update_vm_request() -> Value {
    json!({"name": "build-runner-2", "metadata": {"team": "ci", "branch": "main"}})
}

pub fn vm_deleted() -> Value {
    json!({"id": VM_ID, "deleted": true})
}

pub fn exec_request() -> Value {
    json!({"command": ["sh", "-c", "echo hello; uname -m"], "cwd": "/root", "env": {"GREETING": "hello"}, "timeoutSec": 30})
}

pub fn exec_response() -> Value {
    json!({
        "exitCode": 0,
        "stdout": "hello\nx86_64\n",
        "stderr": "",
        "stdoutTruncated": false,
        "stderrTruncated": false,
        "timedOut": false,
        "durationMs": 42
    })
}

pub fn presign_request() -> Value {
    json!({"path": "/root/data.csv"})
}

pub fn presign_response() -> Value {
    json!({
        "uploadUrl": "http://127.0.0.1:8080/v1/staging/eyJtIjoiUFVUIiwidm0iOiIwYjljNGE1MiJ9.Xq2dV9Zr4nK8sLwP",
        "downloadUrl": "http://127.0.0.1:8080/v1/staging/eyJtIjoiR0VUIiwidm0iOiIwYjljNGE1MiJ9.Hf7cM1Ta6yQ3pJuE",
        "expiresInSec": 900,
        "maxUploadBytes": 10737418240i64
    })
}

pub fn fetch_request() -> Value {
    json!({"url": "http://127.0.0.1:8080/v1/staging/eyJtIjoiR0VUIiwidm0iOiIwYjljNGE1MiJ9.Hf7cM1Ta6yQ3pJuE", "path": "/root/data.csv", "timeoutSec": 300})
}

pub fn fetch_response() -> Value {
    json!({"exitCode": 0, "stdout": "", "stderr": "", "stdoutTruncated": false, "stderrTruncated": false, "timedOut": false, "durationMs": 318})
}

pub fn export_request() -> Value {
    json!({"url": "http://127.0.0.1:8080/v1/staging/eyJtIjoiUFVUIiwidm0iOiIwYjljNGE1MiJ9.Xq2dV9Zr4nK8sLwP", "path": "/root/results", "timeoutSec": 300})
}

pub fn export_response() -> Value {
    json!({"kind": "directory", "sizeBytes": 204800})
}

pub fn service() -> Value {
    json!({"name": "web", "port": 8080, "h2c": false, "url": format!("https://web--{}.proxy.fastvm.example.com", VM_ID.replace('-', ""))})
}

pub fn service_list() -> Value {
    json!([service()])
}

pub fn register_service_request() -> Value {
    json!({"name": "web", "port": 8080, "h2c": false})
}

pub fn update_service_request() -> Value {
    json!({"port": 9090, "h2c": false})
}

pub fn service_updated() -> Value {
    let mut s = service();
    s["port"] = json!(9090);
    s
}

pub fn service_deleted() -> Value {
    json!({"id": "web", "deleted": true})
}

pub fn snapshot() -> Value {
    json!({
        "id": SNAPSHOT_ID,
        "orgId": ORG_ID,
        "vmId": VM_ID,
        "name": "after-setup",
        "status": "ready",
        "machineName": "c1m2",
        "metadata": {"team": "ci"},
        "envVars": {"RUST_LOG": "info"},
        "firewall": default_firewall(),
        "services": [{"name": "web", "port": 8080, "h2c": false}],
        "volumes": [],
        "bucketMounts": [],
        "createdAt": CREATED_AT
    })
}

pub fn snapshot_list() -> Value {
    json!([snapshot()])
}

pub fn create_snapshot_request() -> Value {
    json!({"vmId": VM_ID, "name": "after-setup"})
}

pub fn update_snapshot_request() -> Value {
    json!({"name": "golden-image"})
}

pub fn snapshot_renamed() -> Value {
    let mut s = snapshot();
    s["name"] = json!("golden-image");
    s
}

pub fn snapshot_deleted() -> Value {
    json!({"id": SNAPSHOT_ID, "deleted": true})
}

pub fn quotas() -> Value {
    json!({
        "orgId": ORG_ID,
        "limits": {"vcpu": 16, "memoryMiB": 32768, "diskGiB": 200, "snapshotCount": 50, "volumeCount": 20, "volumeGiB": 500},
        "usage": {"vcpu": 1, "memoryMiB": 2048, "diskGiB": 10, "snapshotCount": 1, "volumeCount": 0, "volumeGiB": 0}
    })
}

pub fn console_token() -> Value {
    json!({
        "token": "fvc_3q8ZyK1mW0pX7aRt5LbN2vHd",
        "expiresInSec": 60,
        "websocketPath": format!("/v1/vms/{VM_ID}/console")
    })
}

pub fn health() -> Value {
    json!({"status": "ok"})
}

const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq6eRUhpCqM5A4Dyx0Z3c6P0m0Yb0d0yJq2N7d3kq1J";
const SSH_FINGERPRINT: &str = "SHA256:3q2+7wXk2m7oTz8m1w0k9Yx0m8Ue0vQ2m6x7d2c1b0a";

pub fn ssh_key() -> Value {
    json!({"name": "laptop", "publicKey": SSH_KEY, "fingerprint": SSH_FINGERPRINT, "createdAt": "2026-11-29T12:00:00.000Z"})
}

pub fn ssh_key_list() -> Value {
    json!({"keys": [ssh_key()]})
}

pub fn add_ssh_key() -> Value {
    json!({"name": "laptop", "publicKey": SSH_KEY})
}

pub fn ssh_key_deleted() -> Value {
    json!({"id": SSH_FINGERPRINT, "deleted": true})
}

pub fn ssh_gateway() -> Value {
    json!({"hostKeys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB7l2Jt0m1d3s6p9d0X2QmZ7kq3b4n5c6v7x8y9z0a1b"], "port": 2222})
}

pub fn workers() -> Value {
    json!([
        {"id": "wk_3f9a0c1d2e4b5a67", "address": "http://10.0.0.11:7070", "status": "ready", "vmCount": 4,
         "cpus": 32, "memoryMiB": 131072, "lastHeartbeatAt": "2026-12-02T12:00:00.000Z"},
        {"id": "wk_8b7c6d5e4f3a2b10", "address": "http://10.0.0.12:7070", "status": "unreachable", "vmCount": 3,
         "cpus": 32, "memoryMiB": 131072, "lastHeartbeatAt": "2026-12-02T11:59:41.000Z"}
    ])
}

pub fn worker_draining() -> Value {
    json!({"id": "wk_3f9a0c1d2e4b5a67", "address": "http://10.0.0.11:7070", "status": "draining", "vmCount": 4,
           "cpus": 32, "memoryMiB": 131072, "lastHeartbeatAt": "2026-12-02T12:00:00.000Z"})
}

pub const VOLUME_ID: &str = "vol_3f9a1c07b2e84d6a5c1e0f";

pub fn volume() -> Value {
    json!({
        "id": VOLUME_ID, "name": "datasets", "orgId": ORG_ID, "accessMode": "rw", "sizeGiB": 10,
        "status": "ready", "pendingSizeGiB": 0, "mountedCount": 1, "usedGiB": 2,
        "createdAt": "2026-11-29T10:15:00.000Z"
    })
}

pub fn volume_list() -> Value {
    json!([volume()])
}

pub fn create_volume_request() -> Value {
    json!({"name": "datasets", "sizeGiB": 10, "accessMode": "rw"})
}

pub fn update_volume_request() -> Value {
    json!({"sizeGiB": 20})
}

pub fn volume_grown() -> Value {
    let mut v = volume();
    v["sizeGiB"] = json!(20);
    v
}

pub fn volume_deleted() -> Value {
    json!({"id": VOLUME_ID, "deleted": true})
}

pub fn attach_volume_request() -> Value {
    json!({"volumeId": VOLUME_ID, "mountPath": "/mnt/datasets", "readOnly": false})
}

pub fn volume_attachment() -> Value {
    json!({"volumeId": VOLUME_ID, "mountPath": "/mnt/datasets", "readOnly": false, "mountStatus": "mounted", "statusMessage": null})
}

pub fn volume_attachments() -> Value {
    json!([{"vmId": VM_ID, "volumeId": VOLUME_ID, "mountPath": "/mnt/datasets", "readOnly": false, "mountStatus": "mounted", "statusMessage": null}])
}

pub fn bucket_mount() -> Value {
    json!({"id": "bm_0123456789abcdef012345", "vmId": VM_ID, "bucketUri": "s3://team-datasets/train",
        "mountPath": "/mnt/datasets", "readOnly": true, "mountStatus": "mounted", "statusMessage": null,
        "createdAt": "2025-01-01T00:00:00.000Z"})
}

pub fn bucket_mount_list() -> Value {
    json!([bucket_mount()])
}

pub fn attach_bucket_mount_request() -> Value {
    json!({"bucketUri": "s3://team-datasets/train", "mountPath": "/mnt/datasets", "readOnly": true,
        "credentials": {"type": "aws-credentials", "value": {"data":
            "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = wJalrXUtnFEMI/EXAMPLEKEY\nendpoint_url = http://10.0.0.5:9000\n"}}})
}

pub fn rotate_bucket_mount_request() -> Value {
    json!({"credentials": {"type": "aws-credentials", "value": {"data":
        "[default]\naws_access_key_id = AKIANEWEXAMPLE\naws_secret_access_key = bPxRfiCYEXAMPLEKEY\nendpoint_url = http://10.0.0.5:9000\n"}}})
}

pub fn detach_volume_response() -> Value {
    json!({"detached": true, "warnings": []})
}

pub const IMPORT_ID: &str = "9d41c7e2-5a08-4b3f-8c6d-2e7f1a0b9c35";

fn import_event(phase: &str, status: &str, ms: u64, message: Option<&str>) -> Value {
    json!({"phase": phase, "status": status, "timestampMs": ms, "message": message})
}

pub fn create_snapshot_import_request() -> Value {
    json!({
        "machineType": "c1m2",
        "diskGiB": 10,
        "name": "python-base",
        "source": {"type": "image", "image": "registry.example.com:5000/python:3.13-slim"}
    })
}

fn snapshot_import(status: &str, finished: bool) -> Value {
    let mut events = vec![
        import_event("preparing", "started", 1_748_779_200_000, None),
        import_event(
            "preparing",
            "completed",
            1_748_779_200_004,
            Some("worker local"),
        ),
    ];
    if finished {
        events.extend([
            import_event("pull", "started", 1_748_779_200_010, Some("pulling registry.example.com:5000/python:3.13-slim")),
            import_event("pull", "completed", 1_748_779_203_100, Some("5 layers (0 from the cache), 49871233 bytes downloaded, manifest sha256:4f1c...")),
            import_event("export", "started", 1_748_779_203_101, None),
            import_event("export", "completed", 1_748_779_206_900, Some("9120 entries, 131228915 bytes")),
            import_event("saving", "started", 1_748_779_206_901, None),
            import_event("saving", "completed", 1_748_779_209_300, Some("root disk of 10 GiB")),
            import_event("warming", "started", 1_748_779_209_301, None),
            import_event("warming", "completed", 1_748_779_213_800, None),
            import_event("done", "completed", 1_748_779_213_820, Some("snapshot c71d3e08-2b94-4a6f-b5e1-8f0a9c4d6e27")),
        ]);
    }
    json!({
        "id": IMPORT_ID,
        "name": "python-base",
        "status": status,
        "source": {
            "type": "image",
            "image": "registry.example.com:5000/python:3.13-slim",
            "platform": null, "registryUsername": null, "registryHost": null,
            "dockerfilePath": null, "buildArgs": null, "target": null, "contextSizeBytes": null
        },
        "events": events,
        "snapshotId": if status == "succeeded" { json!(SNAPSHOT_ID) } else { Value::Null },
        "error": null,
        "machineName": "c1m2",
        "cpu": 1,
        "memoryMiB": 2048,
        "diskGiB": 10,
        "createdAt": CREATED_AT,
        "startedAt": if finished { json!("2025-06-01T12:00:00.010Z") } else { Value::Null },
        "updatedAt": if finished { "2025-06-01T12:00:13.820Z" } else { CREATED_AT },
        "finishedAt": if finished { json!("2025-06-01T12:00:13.820Z") } else { Value::Null }
    })
}

pub fn snapshot_import_pending() -> Value {
    snapshot_import("pending", false)
}

pub fn snapshot_import_succeeded() -> Value {
    snapshot_import("succeeded", true)
}

pub fn snapshot_import_list() -> Value {
    json!([snapshot_import_succeeded()])
}

pub fn snapshot_import_cancelled() -> Value {
    let mut v = snapshot_import("cancelled", false);
    if let Some(e) = v["events"].as_array_mut() {
        e.push(import_event(
            "done",
            "cancelled",
            1_748_779_201_000,
            Some("cancelled by the user"),
        ));
    }
    v["finishedAt"] = json!("2025-06-01T12:00:01Z");
    v
}

pub fn snapshot_import_deleted() -> Value {
    json!({"id": IMPORT_ID, "deleted": true})
}

pub fn context_presign_request() -> Value {
    json!({"sizeBytes": 1_048_576})
}

pub fn context_presign_response() -> Value {
    json!({
        "contextRef": "ctx_2f9c1e7a",
        "uploadUrl": "http://127.0.0.1:8080/v1/staging/...",
        "expiresInSec": 900,
        "maxUploadBytes": 536_870_912
    })
}
