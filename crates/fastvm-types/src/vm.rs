//! VMs: the view returned by every VM endpoint, launch and update bodies, status
//! and TTL.
//!
//! ```text
//!                launch (202)          pause           (pause done)
//!  provisioning ─────────────▶ running ──────▶ pausing ──────────▶ paused
//!       │                       ▲   │                                │
//!       │                       │   │ delete / TTL delete            │ resume
//!       ▼                       │   ▼                                ▼
//!     error          resumed ── resuming ◀─────────────────────── (resume)
//!                                   deleting ──▶ (gone; deletedAt set)
//!  stopped: the VM process exited on its own (terminal failure, like error)
//! ```
//!
//! TTL: while `running`, `expiresAtMs` is the absolute deadline; on pause the
//! remaining budget freezes in `ttlRemainingMs` and `expiresAtMs` is null; on
//! resume the deadline is rebuilt from it. When the deadline passes, `ttl.action`
//! (`pause` or `delete`) runs.

use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::bucket_mount::BucketMount;
use crate::common::{codes, normalize_name, OrgId, Patch, SnapshotId, ValidationError, VmId};
use crate::firewall::FirewallPolicy;
use crate::metadata::{schema, validate_env_vars, validate_metadata, EnvVars, Metadata};
use crate::volume::VolumeAttachmentItem;

/// Lifecycle status of a VM. Clients treat unknown future values as "in transition".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = VMStatus)]
pub enum VmStatus {
    /// Being created or restored.
    Provisioning,
    /// Running; exec, files, services work.
    Running,
    /// The VM process stopped on its own (terminal failure).
    Stopped,
    /// A pause is in flight.
    Pausing,
    /// Paused: memory saved, no CPU used, TTL frozen.
    Paused,
    /// A resume is in flight.
    Resuming,
    /// A delete is in flight.
    Deleting,
    /// Launch or a transition failed (terminal failure).
    Error,
    /// Extension (cluster mode): the VM's worker stopped answering; the VM
    /// may still run there. Its `statusMessage` says so; it goes back to what
    /// the worker reports when the worker returns.
    Unknown,
}

impl VmStatus {
    /// Every known status.
    pub const ALL: [VmStatus; 9] = [
        VmStatus::Provisioning,
        VmStatus::Running,
        VmStatus::Stopped,
        VmStatus::Pausing,
        VmStatus::Paused,
        VmStatus::Resuming,
        VmStatus::Deleting,
        VmStatus::Error,
        VmStatus::Unknown,
    ];

    /// The wire form (`running`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            VmStatus::Provisioning => "provisioning",
            VmStatus::Running => "running",
            VmStatus::Stopped => "stopped",
            VmStatus::Pausing => "pausing",
            VmStatus::Paused => "paused",
            VmStatus::Resuming => "resuming",
            VmStatus::Deleting => "deleting",
            VmStatus::Error => "error",
            VmStatus::Unknown => "unknown",
        }
    }

    /// The status with wire form `s`, or None for an unknown value (the list
    /// filter then returns an empty list rather than an error).
    pub fn parse(s: &str) -> Option<VmStatus> {
        VmStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }

    /// `error` and `stopped`.
    pub fn is_terminal_failure(self) -> bool {
        matches!(self, VmStatus::Error | VmStatus::Stopped)
    }

    /// `provisioning`, `pausing`, `resuming`, `deleting`.
    pub fn is_transitional(self) -> bool {
        matches!(
            self,
            VmStatus::Provisioning | VmStatus::Pausing | VmStatus::Resuming | VmStatus::Deleting
        )
    }
}

/// What happens when a TTL fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TtlAction {
    /// Pause the VM.
    Pause,
    /// Delete the VM.
    Delete,
}

/// Longest TTL accepted, in seconds (10 years; keeps millisecond deadlines far
/// from overflow).
pub const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// Auto-action timer: after `seconds` of running time, `action` runs. The
/// countdown freezes while the VM is paused; `POST /ttl/refresh` restarts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ttl {
    /// Cycle length in seconds, at least 1.
    #[schema(minimum = 1)]
    pub seconds: u64,
    /// `pause` or `delete`.
    pub action: TtlAction,
}

impl Ttl {
    /// Checks `seconds` is in `1..=MAX_TTL_SECONDS`.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.seconds == 0 || self.seconds > MAX_TTL_SECONDS {
            return Err(ValidationError::new(
                codes::INVALID_TTL,
                format!(
                    "ttl.seconds is {}; it must be between 1 and {MAX_TTL_SECONDS}",
                    self.seconds
                ),
            ));
        }
        Ok(())
    }

    /// The cycle length in milliseconds.
    pub fn millis(&self) -> u64 {
        self.seconds.saturating_mul(1000)
    }
}

/// A VM as returned by every VM endpoint. Every field is always present;
/// optional ones are `null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = VM)]
pub struct Vm {
    /// VM id (UUID).
    pub id: VmId,
    /// Normalized name.
    pub name: String,
    /// Owning org.
    pub org_id: OrgId,
    /// Machine type (e.g. `c1m2`).
    pub machine_name: String,
    /// Source snapshot or image name (empty on fresh boot).
    pub source_name: String,
    /// The user's policy (normalized: every block present).
    pub firewall: FirewallPolicy,
    /// Read-only: `firewall` plus per-service auto-rules; what the worker enforces.
    pub effective_firewall: FirewallPolicy,
    /// Free-form labels.
    #[schema(value_type = schema::Metadata)]
    pub metadata: Metadata,
    /// Environment injected at boot.
    #[schema(value_type = schema::EnvVars)]
    pub env_vars: EnvVars,
    /// Public IPv6 address (from the server's `--ipv6-prefix`). Always present
    /// in the JSON, `null` while no address is assigned: the VM is still
    /// `provisioning` (its network comes up with its first boot), its boot
    /// failed (`error`), or the server runs without VM networking
    /// (`fastvm serve --no-network`). A running VM of a networked server always
    /// has one.
    #[serde(rename = "publicIpv6")]
    pub public_ipv6: Option<String>,
    /// vCPUs.
    pub cpu: u32,
    /// Memory in MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Disk in GiB.
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
    /// Lifecycle status.
    pub status: VmStatus,
    /// Why the VM is `error` or `stopped` (e.g. its boot failed, or its
    /// hypervisor stopped responding); null in every other status. An
    /// extension of the spec.
    pub status_message: Option<String>,
    /// Creation time (RFC 3339).
    pub created_at: String,
    /// Deletion time (RFC 3339), null while not deleted.
    pub deleted_at: Option<String>,
    /// TTL, null when none is configured.
    pub ttl: Option<Ttl>,
    /// Absolute ms timestamp when the TTL fires; set only while running.
    pub expires_at_ms: Option<u64>,
    /// Remaining TTL budget in ms; set only while paused.
    pub ttl_remaining_ms: Option<u64>,
    /// When the VM became paused (RFC 3339); null otherwise.
    pub paused_at: Option<String>,
    /// Currently-attached volumes.
    pub volumes: Vec<VolumeAttachmentItem>,
    /// Currently-attached bucket-mounts.
    pub bucket_mounts: Vec<BucketMount>,
}

/// Body of `POST /v1/vms`. Either `machineType` (fresh boot) or `snapshotId`
/// (restore) must be given.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchVmRequest {
    /// Machine type (`c1m2`, `c2m4`, ...). Required unless `snapshotId` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_type: Option<String>,
    /// Snapshot to restore from instead of booting fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<SnapshotId>,
    /// Name (normalized; `vm-<8-char-id-prefix>` when empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::Metadata>)]
    pub metadata: Option<Metadata>,
    /// Environment injected at boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::EnvVars>)]
    pub env_vars: Option<EnvVars>,
    /// Initial firewall policy; null or absent means the safe default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<FirewallPolicy>,
    /// Auto-action timer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<Ttl>,
}

impl LaunchVmRequest {
    /// Checks the body: machine type or snapshot given, metadata, env vars,
    /// firewall and TTL valid.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let machine_type_missing = self
            .machine_type
            .as_deref()
            .is_none_or(|m| m.trim().is_empty());
        if machine_type_missing && self.snapshot_id.is_none() {
            return Err(ValidationError::new(
                codes::INVALID_MACHINE_TYPE,
                "machineType is required unless snapshotId is set; pass e.g. \"c1m2\"",
            ));
        }
        if let Some(m) = &self.metadata {
            validate_metadata(m)?;
        }
        if let Some(e) = &self.env_vars {
            validate_env_vars(e)?;
        }
        if let Some(f) = &self.firewall {
            f.validate()?;
        }
        if let Some(t) = &self.ttl {
            t.validate()?;
        }
        Ok(())
    }
}

/// Body of `PATCH /v1/vms/{id}`. At least one field must be present.
/// `metadata` replaces the whole map (`{}` clears it); `ttl: null` removes the
/// TTL, an absent `ttl` keeps it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateVmRequest {
    /// New name (normalized; `vm-<8-char-id-prefix>` when empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New metadata, replacing the current map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::Metadata>)]
    pub metadata: Option<Metadata>,
    /// Absent: keep; null: remove the TTL; a value: set it and restart the cycle.
    #[serde(default, skip_serializing_if = "Patch::is_absent")]
    #[schema(value_type = Option<Ttl>)]
    pub ttl: Patch<Ttl>,
}

impl UpdateVmRequest {
    /// Checks the body: something to change, metadata and TTL valid.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.name.is_none() && self.metadata.is_none() && self.ttl.is_absent() {
            return Err(ValidationError::new(
                codes::INVALID_REQUEST,
                "nothing to update; give at least one of name, metadata, ttl",
            ));
        }
        if let Some(m) = &self.metadata {
            validate_metadata(m)?;
        }
        if let Some(t) = self.ttl.as_value() {
            t.validate()?;
        }
        Ok(())
    }
}

/// Normalized VM name: see [`normalize_name`]; `vm-<first 8 chars of id>` when empty.
pub fn normalize_vm_name(raw: Option<&str>, id: &VmId) -> String {
    let name = normalize_name(raw.unwrap_or(""));
    if name.is_empty() {
        format!("vm-{}", id.short())
    } else {
        name
    }
}

/// Query of `GET /v1/vms`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListVmsQuery {
    /// Only VMs with this status; an unknown value yields an empty list.
    #[serde(default)]
    pub status: Option<String>,
    /// Extension (not in the spec): at most this many VMs (1 to 1000), from
    /// `cursor` on; the cursor of the next page is in the `X-Next-Cursor`
    /// response header (absent on the last page). Without it: every VM.
    #[serde(default)]
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    pub limit: Option<String>,
    /// Extension (not in the spec): continue a list after the page whose
    /// `X-Next-Cursor` response header this is (opaque; pass it unchanged).
    #[serde(default)]
    pub cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::{DnsMode, DnsPolicy};
    use serde_json::json;
    use std::error::Error;

    fn sample_vm() -> Result<Vm, uuid::Error> {
        Ok(Vm {
            id: "11111111-2222-4333-8444-555555555555".parse()?,
            name: "dev".into(),
            org_id: "00000000-0000-4000-8000-000000000001".parse()?,
            machine_name: "c1m2".into(),
            source_name: String::new(),
            firewall: FirewallPolicy::default().normalized(),
            effective_firewall: FirewallPolicy::default().normalized(),
            metadata: Metadata::from([("env".into(), "prod".into())]),
            env_vars: EnvVars::new(),
            public_ipv6: None,
            cpu: 1,
            memory_mib: 2048,
            disk_gib: 10,
            status: VmStatus::Running,
            created_at: "2025-01-01T00:00:00Z".into(),
            deleted_at: None,
            ttl: Some(Ttl {
                seconds: 60,
                action: TtlAction::Pause,
            }),
            expires_at_ms: Some(1_735_689_660_000),
            ttl_remaining_ms: None,
            paused_at: None,
            status_message: None,
            volumes: vec![],
            bucket_mounts: vec![],
        })
    }

    #[test]
    fn vm_wire_keys_are_exact() -> Result<(), Box<dyn Error>> {
        let v = serde_json::to_value(sample_vm()?)?;
        let obj = v.as_object().ok_or("not an object")?;
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut want = vec![
            "id",
            "name",
            "orgId",
            "machineName",
            "sourceName",
            "firewall",
            "effectiveFirewall",
            "metadata",
            "envVars",
            "publicIpv6",
            "cpu",
            "memoryMiB",
            "diskGiB",
            "status",
            "createdAt",
            "deletedAt",
            "ttl",
            "expiresAtMs",
            "ttlRemainingMs",
            "pausedAt",
            "statusMessage",
            "volumes",
            "bucketMounts",
        ];
        want.sort_unstable();
        assert_eq!(keys, want);
        assert_eq!(v["publicIpv6"], json!(null));
        assert_eq!(v["deletedAt"], json!(null));
        assert_eq!(v["ttlRemainingMs"], json!(null));
        assert_eq!(v["memoryMiB"], json!(2048));
        assert_eq!(v["status"], json!("running"));
        assert_eq!(v["ttl"], json!({"seconds": 60, "action": "pause"}));
        assert_eq!(v["id"], json!("11111111-2222-4333-8444-555555555555"));
        assert_eq!(v["firewall"]["dns"]["mode"], json!("deny"));
        let back: Vm = serde_json::from_value(v)?;
        assert_eq!(back, sample_vm()?);
        Ok(())
    }

    #[test]
    fn vm_status_wire_values() -> Result<(), serde_json::Error> {
        for s in VmStatus::ALL {
            assert_eq!(serde_json::to_value(s)?, json!(s.as_str()));
            assert_eq!(VmStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(VmStatus::parse("Running"), None);
        assert_eq!(VmStatus::parse("hibernating"), None);
        assert!(VmStatus::Error.is_terminal_failure() && VmStatus::Stopped.is_terminal_failure());
        assert!(!VmStatus::Paused.is_terminal_failure());
        assert!(VmStatus::Pausing.is_transitional() && !VmStatus::Running.is_transitional());
        Ok(())
    }

    #[test]
    fn ttl_bounds() {
        let t = |seconds| Ttl {
            seconds,
            action: TtlAction::Delete,
        };
        assert_eq!(
            t(0).validate().err().map(|e| e.code),
            Some(codes::INVALID_TTL)
        );
        assert_eq!(t(1).validate(), Ok(()));
        assert_eq!(t(MAX_TTL_SECONDS).validate(), Ok(()));
        assert_eq!(
            t(MAX_TTL_SECONDS + 1).validate().err().map(|e| e.code),
            Some(codes::INVALID_TTL)
        );
        assert_eq!(t(2).millis(), 2000);
    }

    #[test]
    fn ttl_wire_form() -> Result<(), serde_json::Error> {
        let t: Ttl = serde_json::from_value(json!({"seconds": 30, "action": "delete"}))?;
        assert_eq!(
            t,
            Ttl {
                seconds: 30,
                action: TtlAction::Delete
            }
        );
        assert!(serde_json::from_value::<Ttl>(json!({"seconds": 30, "action": "stop"})).is_err());
        assert!(serde_json::from_value::<Ttl>(json!({"seconds": -1, "action": "pause"})).is_err());
        assert!(serde_json::from_value::<Ttl>(json!({"seconds": 30})).is_err());
        assert!(
            serde_json::from_value::<Ttl>(json!({"seconds": 3, "action": "pause", "x": 1}))
                .is_err()
        );
        Ok(())
    }

    #[test]
    fn update_ttl_tri_state() -> Result<(), serde_json::Error> {
        let absent: UpdateVmRequest = serde_json::from_value(json!({"name": "x"}))?;
        assert_eq!(absent.ttl, Patch::Absent);
        let null: UpdateVmRequest = serde_json::from_value(json!({"ttl": null}))?;
        assert_eq!(null.ttl, Patch::Null);
        assert_eq!(null.validate(), Ok(()));
        let set: UpdateVmRequest =
            serde_json::from_value(json!({"ttl": {"seconds": 5, "action": "pause"}}))?;
        assert_eq!(
            set.ttl,
            Patch::Value(Ttl {
                seconds: 5,
                action: TtlAction::Pause
            })
        );
        let zero: UpdateVmRequest =
            serde_json::from_value(json!({"ttl": {"seconds": 0, "action": "pause"}}))?;
        assert_eq!(
            zero.validate().err().map(|e| e.code),
            Some(codes::INVALID_TTL)
        );
        let empty: UpdateVmRequest = serde_json::from_value(json!({}))?;
        assert_eq!(
            empty.validate().err().map(|e| e.code),
            Some(codes::INVALID_REQUEST)
        );
        assert_eq!(serde_json::to_value(&absent)?, json!({"name": "x"}));
        assert_eq!(serde_json::to_value(&null)?, json!({"ttl": null}));
        assert!(serde_json::from_value::<UpdateVmRequest>(json!({"nmae": "x"})).is_err());
        Ok(())
    }

    #[test]
    fn launch_request_wire_and_validation() -> Result<(), Box<dyn Error>> {
        let req: LaunchVmRequest = serde_json::from_value(json!({
            "machineType": "c1m2",
            "name": "dev",
            "metadata": {"a": "b"},
            "envVars": {"FOO": "bar"},
            "firewall": null,
            "ttl": {"seconds": 60, "action": "delete"}
        }))?;
        assert_eq!(req.firewall, None);
        assert_eq!(req.validate(), Ok(()));

        let snap: LaunchVmRequest = serde_json::from_value(json!({
            "snapshotId": "11111111-2222-4333-8444-555555555555"
        }))?;
        assert_eq!(snap.validate(), Ok(()));

        let none: LaunchVmRequest = serde_json::from_value(json!({"name": "x"}))?;
        assert_eq!(
            none.validate().err().map(|e| e.code),
            Some(codes::INVALID_MACHINE_TYPE)
        );
        let blank: LaunchVmRequest = serde_json::from_value(json!({"machineType": " "}))?;
        assert_eq!(
            blank.validate().err().map(|e| e.code),
            Some(codes::INVALID_MACHINE_TYPE)
        );

        assert!(
            serde_json::from_value::<LaunchVmRequest>(json!({"machine_type": "c1m2"})).is_err()
        );
        assert!(serde_json::from_value::<LaunchVmRequest>(json!({"snapshotId": "snp_1"})).is_err());

        let bad_env = LaunchVmRequest {
            machine_type: Some("c1m2".into()),
            env_vars: Some(EnvVars::from([("1X".into(), "v".into())])),
            ..Default::default()
        };
        assert_eq!(
            bad_env.validate().err().map(|e| e.code),
            Some(codes::INVALID_ENV_VARS)
        );

        let dead = LaunchVmRequest {
            machine_type: Some("c1m2".into()),
            firewall: Some(serde_json::from_value(json!({
                "egress": {"rules": [{"kind": "fqdn", "value": "a.com", "action": "allow"}]},
                "dns": {"mode": "allow", "domains": ["b.com"]}
            }))?),
            ..Default::default()
        };
        assert_eq!(
            dead.validate().err().map(|e| e.code),
            Some(codes::DEAD_FQDN_RULE)
        );
        let ok_fw = LaunchVmRequest {
            firewall: Some(FirewallPolicy {
                dns: Some(DnsPolicy {
                    mode: DnsMode::Allow,
                    domains: vec!["a.com".into()],
                    block_bypass: true,
                }),
                ..Default::default()
            }),
            ..dead.clone()
        };
        assert_eq!(ok_fw.validate(), Ok(()));
        Ok(())
    }

    #[test]
    fn vm_name_defaults() -> Result<(), uuid::Error> {
        let id: VmId = "abcdef01-2222-4333-8444-555555555555".parse()?;
        assert_eq!(normalize_vm_name(None, &id), "vm-abcdef01");
        assert_eq!(normalize_vm_name(Some("  "), &id), "vm-abcdef01");
        assert_eq!(normalize_vm_name(Some(" a  b "), &id), "a b");
        Ok(())
    }

    #[test]
    fn list_query() -> Result<(), serde_json::Error> {
        let q: ListVmsQuery = serde_json::from_value(json!({}))?;
        assert_eq!(q.status, None);
        assert_eq!((q.limit, q.cursor), (None, None));
        Ok(())
    }
}
