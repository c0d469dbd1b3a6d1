//! Org quotas applied to launches, resumes, snapshot captures, imports and volumes.
//!
//! Limits and usage come from the store ([`crate::store::DEFAULT_QUOTA`],
//! [`crate::store::Store::quota_usage`] says what counts). A call that would
//! take an org past a limit answers 429 with `QUOTA_EXCEEDED_<RESOURCE>` and a
//! message giving limit, usage and what was requested, and changes nothing.
//!
//! Check and reservation are atomic per org: the check and the row insert
//! that reserves the resources (the `provisioning` VM row, the `creating`
//! snapshot row) run under one async mutex per org ([`AppState::quota_lock`]).
//! Concurrent launches of one org therefore queue at the check and each sees
//! the rows of the ones before it. That holds for one server process; in
//! cluster mode (several control planes on one PostgreSQL) a launch's check
//! and insert run in one transaction holding the org's `orgs` row
//! `FOR UPDATE` (see crate::fleet), and so do a snapshot capture's check and
//! insert on PostgreSQL. Resume checks (which add no usage) rely on the
//! in-process mutex only.

use crate::error::{codes, ApiError};
use crate::AppState;
use axum::http::StatusCode;
use fastvm_types::quota::{OrgQuotaUsage, OrgQuotaValues};
use fastvm_types::OrgId;
use std::sync::Arc;

/// One resource of a request, checked against its limit.
struct Need {
    code: &'static str,
    what: &'static str,
    unit: &'static str,
    limit: u64,
    usage: u64,
    requested: u64,
}

fn exceeded(org: OrgId, action: &str, n: &Need) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        n.code,
        format!(
            "quota exceeded: {action} needs {requested}{unit} of {what}; org {org} uses {usage}{unit} of its limit of {limit}{unit}",
            requested = n.requested,
            unit = n.unit,
            what = n.what,
            usage = n.usage,
            limit = n.limit,
        ),
    )
}

fn check(org: OrgId, action: &str, needs: &[Need]) -> Result<(), ApiError> {
    for n in needs {
        if n.usage.saturating_add(n.requested) > n.limit {
            return Err(exceeded(org, action, n));
        }
    }
    Ok(())
}

/// What a VM holds: vCPUs, memory (MiB), disk (GiB).
#[derive(Clone, Copy, Debug)]
pub(crate) struct VmShape {
    pub cpu: u64,
    pub memory_mib: u64,
    pub disk_gib: u64,
}

fn vm_needs(limits: &OrgQuotaValues, usage: &OrgQuotaValues, shape: VmShape) -> [Need; 3] {
    [
        Need {
            code: codes::QUOTA_EXCEEDED_VCPU,
            what: "vcpu",
            unit: " vCPU",
            limit: limits.vcpu,
            usage: usage.vcpu,
            requested: shape.cpu,
        },
        Need {
            code: codes::QUOTA_EXCEEDED_MEMORY_MIB,
            what: "memoryMiB",
            unit: " MiB",
            limit: limits.memory_mib,
            usage: usage.memory_mib,
            requested: shape.memory_mib,
        },
        Need {
            code: codes::QUOTA_EXCEEDED_DISK_GIB,
            what: "diskGiB",
            unit: " GiB",
            limit: limits.disk_gib,
            usage: usage.disk_gib,
            requested: shape.disk_gib,
        },
    ]
}

/// 429 unless `org`, using `usage` of its `limits`, can take one more VM of
/// `shape` (placement checks this inside its transaction, see crate::fleet).
pub(crate) fn check_vm_limits(
    org: OrgId,
    action: &str,
    limits: &OrgQuotaValues,
    usage: &OrgQuotaValues,
    shape: VmShape,
) -> Result<(), ApiError> {
    check(org, action, &vm_needs(limits, usage, shape))
}

/// 429 unless `org`, using `usage` of its `limits`, can take one more snapshot.
pub(crate) fn check_snapshot_limits(
    org: OrgId,
    limits: &OrgQuotaValues,
    usage: &OrgQuotaValues,
) -> Result<(), ApiError> {
    check(
        org,
        "this snapshot",
        &[Need {
            code: codes::QUOTA_EXCEEDED_SNAPSHOT_COUNT,
            what: "snapshotCount",
            unit: "",
            limit: limits.snapshot_count,
            usage: usage.snapshot_count,
            requested: 1,
        }],
    )
}

/// 429 unless `org`, using `usage` of its `limits`, can take `count` more
/// volumes and `gib` more GiB of them.
pub(crate) fn check_volume_limits(
    org: OrgId,
    action: &str,
    limits: &OrgQuotaValues,
    usage: &OrgQuotaValues,
    count: u64,
    gib: u64,
) -> Result<(), ApiError> {
    let needs = [
        Need {
            code: codes::QUOTA_EXCEEDED_VOLUME_COUNT,
            what: "volumeCount",
            unit: "",
            limit: limits.volume_count,
            usage: usage.volume_count,
            requested: count,
        },
        Need {
            code: codes::QUOTA_EXCEEDED_VOLUME_GIB,
            what: "volumeGiB",
            unit: " GiB",
            limit: limits.volume_gib,
            usage: usage.volume_gib,
            requested: gib,
        },
    ];
    // Only what this call adds: a grow is not refused for a count that an
    // operator lowered below the org's usage.
    let adding: Vec<Need> = needs.into_iter().filter(|n| n.requested > 0).collect();
    check(org, action, &adding)
}

impl AppState {
    /// The mutex serialising quota checks and reservations of `org`.
    pub(crate) fn quota_lock(&self, org: OrgId) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .inner
            .quota_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(org).or_default().clone()
    }

    /// `GET /v1/org/quotas`.
    pub(crate) async fn org_quotas(&self, org: OrgId) -> Result<OrgQuotaUsage, ApiError> {
        let limits = self.store().quota_limits(org).await?;
        let usage = self.store().quota_usage(org).await?;
        Ok(OrgQuotaUsage {
            org_id: org,
            limits,
            usage,
        })
    }

    /// 429 unless `org` can take one more VM of `shape` (call with the org's quota lock held).
    pub(crate) async fn check_vm_quota(
        &self,
        org: OrgId,
        action: &str,
        shape: VmShape,
    ) -> Result<(), ApiError> {
        let limits = self.store().quota_limits(org).await?;
        let usage = self.store().quota_usage(org).await?;
        check(org, action, &vm_needs(&limits, &usage, shape))
    }

    /// 429 unless `org`, which already counts the paused VM of `shape`, is
    /// within its limits (resuming does not add usage: paused VMs count; it
    /// fails only when the limits were lowered below the usage meanwhile).
    pub(crate) async fn check_resume_quota(
        &self,
        org: OrgId,
        shape: VmShape,
    ) -> Result<(), ApiError> {
        let limits = self.store().quota_limits(org).await?;
        let mut usage = self.store().quota_usage(org).await?;
        usage.vcpu = usage.vcpu.saturating_sub(shape.cpu);
        usage.memory_mib = usage.memory_mib.saturating_sub(shape.memory_mib);
        usage.disk_gib = usage.disk_gib.saturating_sub(shape.disk_gib);
        check(org, "resuming this VM", &vm_needs(&limits, &usage, shape))
    }

    /// 429 unless `org` can take one more snapshot (call with the org's quota lock held).
    pub(crate) async fn check_snapshot_quota(&self, org: OrgId) -> Result<(), ApiError> {
        let limits = self.store().quota_limits(org).await?;
        let usage = self.store().quota_usage(org).await?;
        check_snapshot_limits(org, &limits, &usage)
    }

    /// 429 unless `org` can take one more import running a VM of `shape`
    /// (call with the org's quota lock held). Its usage already counts the
    /// imports in flight, VM and snapshot each ([`crate::store::Store::quota_usage`]);
    /// this one needs both too.
    pub(crate) async fn check_import_quota(
        &self,
        org: OrgId,
        shape: VmShape,
    ) -> Result<(), ApiError> {
        let limits = self.store().quota_limits(org).await?;
        let usage = self.store().quota_usage(org).await?;
        check(org, "this import", &vm_needs(&limits, &usage, shape))?;
        check_snapshot_limits(org, &limits, &usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exceeded_resource_names_limit_usage_and_request() {
        let limits = OrgQuotaValues {
            vcpu: 4,
            memory_mib: 8192,
            disk_gib: 20,
            ..Default::default()
        };
        let usage = OrgQuotaValues {
            vcpu: 3,
            memory_mib: 2048,
            disk_gib: 10,
            ..Default::default()
        };
        let org = OrgId::new_v4();
        let ok = VmShape {
            cpu: 1,
            memory_mib: 2048,
            disk_gib: 10,
        };
        assert!(check(org, "launching", &vm_needs(&limits, &usage, ok)).is_ok());
        let e = check(
            org,
            "launching",
            &vm_needs(&limits, &usage, VmShape { cpu: 2, ..ok }),
        )
        .err()
        .map(|e| (e.status, e.code, e.message));
        let (status, code, message) = e.unwrap_or_default();
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::TOO_MANY_REQUESTS, codes::QUOTA_EXCEEDED_VCPU)
        );
        assert!(
            message.contains("needs 2 vCPU")
                && message.contains("uses 3 vCPU")
                && message.contains("limit of 4 vCPU"),
            "{message}"
        );
        let e = check(
            org,
            "launching",
            &vm_needs(&limits, &usage, VmShape { disk_gib: 11, ..ok }),
        )
        .err()
        .map(|e| e.code);
        assert_eq!(e.as_deref(), Some(codes::QUOTA_EXCEEDED_DISK_GIB));
    }
}
