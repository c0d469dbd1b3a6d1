//! Per-org quota limits and live usage (computed from the rows, never cached).
//!
//! Limits live in `org_quotas`, one row per org that overrode something; a
//! missing row or a NULL column means the built-in default ([`DEFAULT_QUOTA`]).
//!
//! Usage counts:
//! - `vcpu`, `memoryMiB`, `diskGiB`: every live VM that holds host resources,
//!   i.e. not deleted and not `stopped` or `error`. Paused VMs count: their
//!   QEMU process keeps its memory and their disk stays allocated.
//!   Provisioning, pausing, resuming and deleting VMs count too (they hold or
//!   are about to hold the resources).
//!   Snapshot imports in flight (`pending`, `claimed`, `running`) count with
//!   their machine's vCPUs and memory and their disk: each runs a VM (the
//!   image's first boot, a Dockerfile's builder) that has no VM row.
//! - `snapshotCount`: live (not deleted) snapshots, whatever their status,
//!   plus imports in flight (each will add one).
//! - `volumeCount`, `volumeGiB`: the org's live volumes and their sizes.

use super::{Result, Store, StoreError};
use fastvm_types::quota::OrgQuotaValues;
use fastvm_types::OrgId;
use sqlx::Row;

/// Limits of an org that never changed them.
pub const DEFAULT_QUOTA: OrgQuotaValues = OrgQuotaValues {
    vcpu: 16,
    memory_mib: 32768,
    disk_gib: 200,
    snapshot_count: 50,
    volume_count: 20,
    volume_gib: 500,
};

/// A partial change of an org's limits: `None` keeps the current value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QuotaPatch {
    pub vcpu: Option<u64>,
    pub memory_mib: Option<u64>,
    pub disk_gib: Option<u64>,
    pub snapshot_count: Option<u64>,
    pub volume_count: Option<u64>,
    pub volume_gib: Option<u64>,
}

impl QuotaPatch {
    /// Every limit set to `v`'s.
    pub fn all(v: OrgQuotaValues) -> Self {
        QuotaPatch {
            vcpu: Some(v.vcpu),
            memory_mib: Some(v.memory_mib),
            disk_gib: Some(v.disk_gib),
            snapshot_count: Some(v.snapshot_count),
            volume_count: Some(v.volume_count),
            volume_gib: Some(v.volume_gib),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == QuotaPatch::default()
    }
}

fn opt_i64(v: Option<u64>) -> Option<i64> {
    v.map(|x| i64::try_from(x).unwrap_or(i64::MAX))
}

fn col_or(row: &sqlx::any::AnyRow, col: &str, default: u64) -> Result<u64> {
    let v: Option<i64> = row.try_get(col)?;
    match v {
        None => Ok(default),
        Some(v) => u64::try_from(v).map_err(|_| StoreError::Corrupt {
            table: "org_quotas",
            message: format!("{col} = {v}"),
        }),
    }
}

fn count(row: &sqlx::any::AnyRow, col: &str) -> Result<u64> {
    let v: i64 = row.try_get(col)?;
    Ok(u64::try_from(v).unwrap_or(0))
}

impl Store {
    /// The limits of `org` (defaults for what it never changed).
    pub async fn quota_limits(&self, org: OrgId) -> Result<OrgQuotaValues> {
        let row = sqlx::query(LIMITS_SQL)
            .bind(org.to_string())
            .fetch_optional(&self.pool)
            .await?;
        limits_from(row)
    }

    /// Change some limits of `org` (the others keep their value); returns
    /// the limits now in force. `NotFound` when there is no such org.
    pub async fn set_quota(&self, org: OrgId, patch: QuotaPatch) -> Result<OrgQuotaValues> {
        let exists = sqlx::query("SELECT id FROM orgs WHERE id = $1")
            .bind(org.to_string())
            .fetch_optional(&self.pool)
            .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound(format!("no org with id {org}")));
        }
        sqlx::query(
            "INSERT INTO org_quotas (org_id, vcpu, memory_mib, disk_gib, snapshot_count, volume_count, volume_gib, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (org_id) DO UPDATE SET \
               vcpu = COALESCE(excluded.vcpu, org_quotas.vcpu), \
               memory_mib = COALESCE(excluded.memory_mib, org_quotas.memory_mib), \
               disk_gib = COALESCE(excluded.disk_gib, org_quotas.disk_gib), \
               snapshot_count = COALESCE(excluded.snapshot_count, org_quotas.snapshot_count), \
               volume_count = COALESCE(excluded.volume_count, org_quotas.volume_count), \
               volume_gib = COALESCE(excluded.volume_gib, org_quotas.volume_gib), \
               updated_at_ms = excluded.updated_at_ms",
        )
        .bind(org.to_string())
        .bind(opt_i64(patch.vcpu))
        .bind(opt_i64(patch.memory_mib))
        .bind(opt_i64(patch.disk_gib))
        .bind(opt_i64(patch.snapshot_count))
        .bind(opt_i64(patch.volume_count))
        .bind(opt_i64(patch.volume_gib))
        .bind(super::now_ms())
        .execute(&self.pool)
        .await?;
        self.quota_limits(org).await
    }

    /// What `org` uses now (see the module doc for what counts).
    pub async fn quota_usage(&self, org: OrgId) -> Result<OrgQuotaValues> {
        let vms = sqlx::query(USAGE_VMS_SQL)
            .bind(org.to_string())
            .fetch_one(&self.pool)
            .await?;
        let snaps = sqlx::query(USAGE_SNAPSHOTS_SQL)
            .bind(org.to_string())
            .fetch_one(&self.pool)
            .await?;
        let imports = sqlx::query(&usage_imports_sql())
            .bind(org.to_string())
            .fetch_one(&self.pool)
            .await?;
        usage_from(&vms, &snaps, &imports, self.volume_usage(org).await?)
    }
}

const LIMITS_SQL: &str = "SELECT vcpu, memory_mib, disk_gib, snapshot_count, volume_count, volume_gib FROM org_quotas WHERE org_id = $1";
const USAGE_VMS_SQL: &str = "SELECT CAST(COALESCE(SUM(cpu), 0) AS BIGINT) AS vcpu, CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS memory_mib, \
        CAST(COALESCE(SUM(disk_gib), 0) AS BIGINT) AS disk_gib \
     FROM vms WHERE org_id = $1 AND deleted_at_ms IS NULL AND status NOT IN ('stopped', 'error')";
const USAGE_SNAPSHOTS_SQL: &str =
    "SELECT COUNT(*) AS n FROM snapshots WHERE org_id = $1 AND deleted_at_ms IS NULL";

fn limits_from(row: Option<sqlx::any::AnyRow>) -> Result<OrgQuotaValues> {
    let Some(row) = row else {
        return Ok(DEFAULT_QUOTA);
    };
    let d = DEFAULT_QUOTA;
    Ok(OrgQuotaValues {
        vcpu: col_or(&row, "vcpu", d.vcpu)?,
        memory_mib: col_or(&row, "memory_mib", d.memory_mib)?,
        disk_gib: col_or(&row, "disk_gib", d.disk_gib)?,
        snapshot_count: col_or(&row, "snapshot_count", d.snapshot_count)?,
        volume_count: col_or(&row, "volume_count", d.volume_count)?,
        volume_gib: col_or(&row, "volume_gib", d.volume_gib)?,
    })
}

fn usage_from(
    vms: &sqlx::any::AnyRow,
    snaps: &sqlx::any::AnyRow,
    imports: &sqlx::any::AnyRow,
    (volume_count, volume_gib): (u64, u64),
) -> Result<OrgQuotaValues> {
    let sum =
        |col: &str| Ok::<_, StoreError>(count(vms, col)?.saturating_add(count(imports, col)?));
    Ok(OrgQuotaValues {
        vcpu: sum("vcpu")?,
        memory_mib: sum("memory_mib")?,
        disk_gib: sum("disk_gib")?,
        snapshot_count: count(snaps, "n")?.saturating_add(count(imports, "n")?),
        volume_count,
        volume_gib,
    })
}

/// Imports in flight: their VMs' resources and the snapshots they will add.
fn usage_imports_sql() -> String {
    format!(
        "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(cpu), 0) AS BIGINT) AS vcpu, \
            CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS memory_mib, CAST(COALESCE(SUM(disk_gib), 0) AS BIGINT) AS disk_gib \
         FROM snapshot_imports WHERE org_id = $1 AND deleted_at_ms IS NULL AND status IN {}",
        super::snapshot_imports::IN_FLIGHT
    )
}

/// [`Store::quota_limits`] on `conn` (inside placement's transaction).
pub(crate) async fn quota_limits_on(
    conn: &mut sqlx::AnyConnection,
    org: OrgId,
) -> Result<OrgQuotaValues> {
    let row = sqlx::query(LIMITS_SQL)
        .bind(org.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    limits_from(row)
}

/// [`Store::quota_usage`] on `conn` (inside placement's transaction).
pub(crate) async fn quota_usage_on(
    conn: &mut sqlx::AnyConnection,
    org: OrgId,
) -> Result<OrgQuotaValues> {
    let vms = sqlx::query(USAGE_VMS_SQL)
        .bind(org.to_string())
        .fetch_one(&mut *conn)
        .await?;
    let snaps = sqlx::query(USAGE_SNAPSHOTS_SQL)
        .bind(org.to_string())
        .fetch_one(&mut *conn)
        .await?;
    let imports = sqlx::query(&usage_imports_sql())
        .bind(org.to_string())
        .fetch_one(&mut *conn)
        .await?;
    let volumes = super::volumes::volume_usage_on(&mut *conn, org).await?;
    usage_from(&vms, &snaps, &imports, volumes)
}
