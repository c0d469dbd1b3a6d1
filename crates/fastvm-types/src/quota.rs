//! `GET /v1/org/quotas`: the org's limits and current usage.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::OrgId;

/// One set of quota figures (used both for limits and usage).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrgQuotaValues {
    /// vCPUs of non-deleted VMs.
    pub vcpu: u64,
    /// Memory of non-deleted VMs, MiB.
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// Disk of non-deleted VMs, GiB.
    #[serde(rename = "diskGiB")]
    pub disk_gib: u64,
    /// Snapshots.
    pub snapshot_count: u64,
    /// Volumes.
    pub volume_count: u64,
    /// Provisioned volume size, GiB.
    #[serde(rename = "volumeGiB")]
    pub volume_gib: u64,
}

/// Limits and usage of an org.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OrgQuotaUsage {
    /// The org.
    pub org_id: OrgId,
    /// Configured limits.
    pub limits: OrgQuotaValues,
    /// Current usage.
    pub usage: OrgQuotaValues,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn wire_names() -> Result<(), Box<dyn std::error::Error>> {
        let v = serde_json::to_value(OrgQuotaUsage {
            org_id: "00000000-0000-4000-8000-000000000001".parse()?,
            limits: OrgQuotaValues {
                vcpu: 8,
                memory_mib: 16384,
                disk_gib: 100,
                snapshot_count: 10,
                volume_count: 5,
                volume_gib: 50,
            },
            usage: OrgQuotaValues::default(),
        })?;
        assert_eq!(v["orgId"], json!("00000000-0000-4000-8000-000000000001"));
        assert_eq!(
            v["limits"],
            json!({"vcpu": 8, "memoryMiB": 16384, "diskGiB": 100, "snapshotCount": 10,
                   "volumeCount": 5, "volumeGiB": 50})
        );
        assert_eq!(v["usage"]["volumeGiB"], json!(0));
        Ok(())
    }
}
