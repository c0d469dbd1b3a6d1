//! Snapshots: a VM's memory and disk captured for restore (`POST /v1/vms` with
//! `snapshotId`), with the VM's labels, env, firewall, services and mounts.
//!
//! ```text
//!  creating ──▶ ready
//!      └──────▶ error
//! ```

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{normalize_name, OrgId, SnapshotId, VmId};
use crate::firewall::FirewallPolicy;
use crate::metadata::{schema, EnvVars, Metadata};

/// Lifecycle status of a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    /// Being captured.
    Creating,
    /// Restorable.
    Ready,
    /// Capture failed.
    Error,
}

/// A service registration captured with a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotService {
    /// Service name.
    pub name: String,
    /// TCP port.
    pub port: u16,
    /// HTTP/2 cleartext to the backend.
    pub h2c: bool,
}

/// A volume attachment captured with a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotVolumeAttachment {
    /// The volume.
    pub volume_id: String,
    /// Mount path in the guest.
    pub mount_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A bucket-mount captured with a snapshot (no credentials).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotBucketMountAttachment {
    /// `gs://...` or `s3://...`.
    pub bucket_uri: String,
    /// Mount path in the guest.
    pub mount_path: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// A snapshot as returned by the API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    /// Snapshot id (UUID).
    pub id: SnapshotId,
    /// Normalized name.
    pub name: String,
    /// Owning org.
    pub org_id: OrgId,
    /// The VM it was captured from.
    pub vm_id: VmId,
    /// Lifecycle status.
    pub status: SnapshotStatus,
    /// Machine type it was captured on; VMs restored from it inherit it.
    pub machine_name: String,
    /// The source VM's firewall policy (normalized).
    pub firewall: FirewallPolicy,
    /// The source VM's labels.
    #[schema(value_type = schema::Metadata)]
    pub metadata: Metadata,
    /// The source VM's environment.
    #[schema(value_type = schema::EnvVars)]
    pub env_vars: EnvVars,
    /// Captured service registrations.
    pub services: Vec<SnapshotService>,
    /// Captured volume attachments.
    pub volumes: Vec<SnapshotVolumeAttachment>,
    /// Captured bucket-mounts (no credentials).
    pub bucket_mounts: Vec<SnapshotBucketMountAttachment>,
    /// Creation time (RFC 3339).
    pub created_at: String,
}

/// Body of `POST /v1/snapshots`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The VM to capture (running or paused).
    pub vm_id: VmId,
    /// Name (see [`normalize_snapshot_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl CreateSnapshotRequest {
    /// The name to store.
    pub fn normalized_name(&self) -> String {
        normalize_snapshot_name(self.name.as_deref(), &self.vm_id)
    }
}

/// Body of `PATCH /v1/snapshots/{id}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateSnapshotRequest {
    /// New name (normalized; the default name when empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Snapshot name rule: trimmed, internal whitespace runs collapsed to one space,
/// truncated to 64 Unicode scalar values; `snapshot-<first 8 chars of vmId>`
/// when that leaves nothing.
pub fn normalize_snapshot_name(raw: Option<&str>, vm_id: &VmId) -> String {
    let name = normalize_name(raw.unwrap_or(""));
    if name.is_empty() {
        format!("snapshot-{}", vm_id.short())
    } else {
        name
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vm_id() -> VmId {
        VmId(uuid::Uuid::from_u128(
            0x9abcdef0_1111_4222_8333_444455556666,
        ))
    }

    #[test]
    fn snapshot_names() {
        let id = vm_id();
        assert_eq!(normalize_snapshot_name(None, &id), "snapshot-9abcdef0");
        assert_eq!(normalize_snapshot_name(Some(""), &id), "snapshot-9abcdef0");
        assert_eq!(
            normalize_snapshot_name(Some(" \t\n "), &id),
            "snapshot-9abcdef0"
        );
        assert_eq!(
            normalize_snapshot_name(Some("  base   image\t v2 "), &id),
            "base image v2"
        );
        assert_eq!(
            normalize_snapshot_name(Some(&"x".repeat(64)), &id),
            "x".repeat(64)
        );
        assert_eq!(
            normalize_snapshot_name(Some(&"x".repeat(65)), &id),
            "x".repeat(64)
        );
        // 64 scalar values, not bytes.
        assert_eq!(
            normalize_snapshot_name(Some(&"日".repeat(70)), &id),
            "日".repeat(64)
        );
        assert_eq!(
            normalize_snapshot_name(Some(&"🦀".repeat(65)), &id)
                .chars()
                .count(),
            64
        );
    }

    #[test]
    fn create_request() -> Result<(), serde_json::Error> {
        let r: CreateSnapshotRequest =
            serde_json::from_value(json!({"vmId": "9abcdef0-1111-4222-8333-444455556666"}))?;
        assert_eq!(r.vm_id, vm_id());
        assert_eq!(r.normalized_name(), "snapshot-9abcdef0");
        assert!(serde_json::from_value::<CreateSnapshotRequest>(json!({"name": "x"})).is_err());
        assert!(serde_json::from_value::<CreateSnapshotRequest>(
            json!({"vmId": "9abcdef0-1111-4222-8333-444455556666", "vm_id": "x"})
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn snapshot_wire_keys() -> Result<(), Box<dyn std::error::Error>> {
        let s = Snapshot {
            id: SnapshotId::new_v4(),
            name: "s".into(),
            org_id: OrgId::new_v4(),
            vm_id: vm_id(),
            status: SnapshotStatus::Ready,
            machine_name: "c1m2".into(),
            firewall: FirewallPolicy::default().normalized(),
            metadata: Metadata::new(),
            env_vars: EnvVars::new(),
            services: vec![SnapshotService {
                name: "web".into(),
                port: 8080,
                h2c: false,
            }],
            volumes: vec![SnapshotVolumeAttachment {
                volume_id: "vol_0123456789abcdef012345".into(),
                mount_path: "/mnt/v".into(),
                read_only: false,
            }],
            bucket_mounts: vec![SnapshotBucketMountAttachment {
                bucket_uri: "gs://b-1".into(),
                mount_path: "/mnt/b".into(),
                read_only: true,
            }],
            created_at: "t".into(),
        };
        let v = serde_json::to_value(&s)?;
        let mut keys: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        keys.sort();
        assert_eq!(
            keys,
            [
                "bucketMounts",
                "createdAt",
                "envVars",
                "firewall",
                "id",
                "machineName",
                "metadata",
                "name",
                "orgId",
                "services",
                "status",
                "vmId",
                "volumes"
            ]
        );
        assert_eq!(v["status"], json!("ready"));
        assert_eq!(v["bucketMounts"][0]["bucketUri"], json!("gs://b-1"));
        assert_eq!(
            v["volumes"][0]["volumeId"],
            json!("vol_0123456789abcdef012345")
        );
        let back: Snapshot = serde_json::from_value(v)?;
        assert_eq!(back, s);
        for (st, w) in [
            (SnapshotStatus::Creating, "creating"),
            (SnapshotStatus::Error, "error"),
        ] {
            assert_eq!(serde_json::to_value(st)?, json!(w));
        }
        Ok(())
    }
}
