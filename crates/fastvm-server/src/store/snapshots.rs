//! Snapshot rows. Like VMs, a deleted snapshot keeps its row (with
//! `deleted_at_ms` set) but is invisible to every org-scoped read.
//!
//! The row is what the control plane knows of a capture: the source VM's
//! shape, labels, env, firewall and services at capture time, and the
//! worker that holds the memory and disk layers.

use super::{parse_id, Result, Store, StoreError};
use fastvm_types::snapshot::{
    SnapshotBucketMountAttachment, SnapshotService, SnapshotStatus, SnapshotVolumeAttachment,
};
use fastvm_types::{EnvVars, FirewallPolicy, Metadata, OrgId, SnapshotId, VmId};
use sqlx::any::AnyRow;
use sqlx::Row;

/// A snapshot as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    pub org_id: OrgId,
    /// The VM it was captured from.
    pub vm_id: VmId,
    /// The worker holding its memory and disk layers.
    pub worker_id: String,
    pub name: String,
    pub status: SnapshotStatus,
    /// Why the snapshot is in `error`, for operators and the failed request.
    pub status_message: Option<String>,
    pub machine_name: String,
    pub cpu: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub metadata: Metadata,
    pub env_vars: EnvVars,
    pub firewall: FirewallPolicy,
    pub services: Vec<SnapshotService>,
    pub volumes: Vec<SnapshotVolumeAttachment>,
    pub bucket_mounts: Vec<SnapshotBucketMountAttachment>,
    pub created_at_ms: i64,
    pub deleted_at_ms: Option<i64>,
    /// The capturing worker's compatibility key; `None`: restorable only on
    /// `worker_id` (single-host servers, or a cluster without a snapshot store).
    pub compat_key: Option<String>,
    /// In the shared snapshot store: restorable on any ready worker with the
    /// same `compat_key`.
    pub stored: bool,
}

const SNAPSHOT_COLUMNS: &str = "id, org_id, vm_id, worker_id, name, status, status_message, machine_name, cpu, memory_mib, disk_gib, \
     metadata, env_vars, firewall, services, volumes, bucket_mounts, created_at_ms, deleted_at_ms, compat_key, stored";

fn corrupt(message: String) -> StoreError {
    StoreError::Corrupt {
        table: "snapshots",
        message,
    }
}

fn json_col<T: serde::de::DeserializeOwned>(row: &AnyRow, col: &str) -> Result<T> {
    let s: String = row.try_get(col)?;
    serde_json::from_str(&s).map_err(|e| corrupt(format!("{col}: {e}")))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| corrupt(format!("cannot encode: {e}")))
}

fn unsigned<T: TryFrom<i64>>(row: &AnyRow, col: &str) -> Result<T> {
    let v: i64 = row.try_get(col)?;
    T::try_from(v).map_err(|_| corrupt(format!("{col} = {v} is out of range")))
}

/// The stored form of a status.
pub fn status_str(s: SnapshotStatus) -> &'static str {
    match s {
        SnapshotStatus::Creating => "creating",
        SnapshotStatus::Ready => "ready",
        SnapshotStatus::Error => "error",
    }
}

fn parse_status(s: &str) -> Option<SnapshotStatus> {
    match s {
        "creating" => Some(SnapshotStatus::Creating),
        "ready" => Some(SnapshotStatus::Ready),
        "error" => Some(SnapshotStatus::Error),
        _ => None,
    }
}

fn snapshot_from_row(row: &AnyRow) -> Result<SnapshotRecord> {
    let status: String = row.try_get("status")?;
    Ok(SnapshotRecord {
        id: parse_id(row, "id", "snapshots")?,
        org_id: parse_id(row, "org_id", "snapshots")?,
        vm_id: parse_id(row, "vm_id", "snapshots")?,
        worker_id: row.try_get("worker_id")?,
        name: row.try_get("name")?,
        status: parse_status(&status).ok_or_else(|| corrupt(format!("status = {status:?}")))?,
        status_message: row.try_get("status_message")?,
        machine_name: row.try_get("machine_name")?,
        cpu: unsigned(row, "cpu")?,
        memory_mib: unsigned(row, "memory_mib")?,
        disk_gib: unsigned(row, "disk_gib")?,
        metadata: json_col(row, "metadata")?,
        env_vars: json_col(row, "env_vars")?,
        firewall: json_col(row, "firewall")?,
        services: json_col(row, "services")?,
        volumes: json_col(row, "volumes")?,
        bucket_mounts: json_col(row, "bucket_mounts")?,
        created_at_ms: row.try_get("created_at_ms")?,
        deleted_at_ms: row.try_get("deleted_at_ms")?,
        compat_key: row.try_get("compat_key")?,
        stored: row.try_get::<i64, _>("stored")? != 0,
    })
}

/// The INSERT of a new snapshot row (on the pool or in a transaction).
fn insert_snapshot_query(
    s: &SnapshotRecord,
) -> Result<sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments<'static>>> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("INSERT INTO snapshots ({SNAPSHOT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)")
    });
    let q = sqlx::query(SQL.as_str())
        .bind(s.id.to_string())
        .bind(s.org_id.to_string())
        .bind(s.vm_id.to_string())
        .bind(s.worker_id.clone())
        .bind(s.name.clone())
        .bind(status_str(s.status))
        .bind(s.status_message.clone())
        .bind(s.machine_name.clone())
        .bind(i64::from(s.cpu))
        .bind(i64::try_from(s.memory_mib).unwrap_or(i64::MAX))
        .bind(i64::try_from(s.disk_gib).unwrap_or(i64::MAX))
        .bind(to_json(&s.metadata)?)
        .bind(to_json(&s.env_vars)?)
        .bind(to_json(&s.firewall)?)
        .bind(to_json(&s.services)?)
        .bind(to_json(&s.volumes)?)
        .bind(to_json(&s.bucket_mounts)?)
        .bind(s.created_at_ms)
        .bind(s.deleted_at_ms)
        .bind(s.compat_key.clone())
        .bind(i64::from(s.stored));
    Ok(q)
}

/// [`Store::insert_snapshot`] on `conn` (inside a quota transaction, see crate::fleet).
pub(crate) async fn insert_snapshot_on(
    conn: &mut sqlx::AnyConnection,
    s: &SnapshotRecord,
) -> Result<()> {
    insert_snapshot_query(s)?.execute(&mut *conn).await?;
    Ok(())
}

impl Store {
    /// Insert a new snapshot row.
    pub async fn insert_snapshot(&self, s: &SnapshotRecord) -> Result<()> {
        insert_snapshot_query(s)?.execute(&self.pool).await?;
        Ok(())
    }

    /// The live (not deleted) snapshot `id` of `org`.
    pub async fn get_snapshot(&self, org: OrgId, id: SnapshotId) -> Result<Option<SnapshotRecord>> {
        let row = sqlx::query(&format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = $1 AND org_id = $2 AND deleted_at_ms IS NULL"))
            .bind(id.to_string())
            .bind(org.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(snapshot_from_row).transpose()
    }

    /// The snapshot `id` of any org, deleted or not (for background work, never for callers).
    pub async fn get_snapshot_unscoped(&self, id: SnapshotId) -> Result<Option<SnapshotRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE id = $1"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(snapshot_from_row).transpose()
    }

    /// The live snapshots of `org`, oldest first.
    pub async fn list_snapshots(&self, org: OrgId) -> Result<Vec<SnapshotRecord>> {
        let rows = sqlx::query(&format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE org_id = $1 AND deleted_at_ms IS NULL ORDER BY created_at_ms, id"))
            .bind(org.to_string())
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(snapshot_from_row).collect()
    }

    /// Every live snapshot of every org in `status` (startup reconciliation).
    pub async fn list_snapshots_in(&self, status: SnapshotStatus) -> Result<Vec<SnapshotRecord>> {
        let rows = sqlx::query(&format!("SELECT {SNAPSHOT_COLUMNS} FROM snapshots WHERE status = $1 AND deleted_at_ms IS NULL ORDER BY created_at_ms, id"))
            .bind(status_str(status))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(snapshot_from_row).collect()
    }

    /// Move the live snapshot `id` from `from` to `to` (with `message`).
    /// False when it is deleted or no longer in `from`.
    pub async fn set_snapshot_status(
        &self,
        id: SnapshotId,
        from: SnapshotStatus,
        to: SnapshotStatus,
        message: Option<&str>,
    ) -> Result<bool> {
        let res = sqlx::query("UPDATE snapshots SET status = $1, status_message = $2 WHERE id = $3 AND status = $4 AND deleted_at_ms IS NULL")
            .bind(status_str(to))
            .bind(message.map(str::to_owned))
            .bind(id.to_string())
            .bind(status_str(from))
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Rename the live snapshot `id` of `org`; false when there is none.
    pub async fn rename_snapshot(&self, org: OrgId, id: SnapshotId, name: &str) -> Result<bool> {
        let res = sqlx::query("UPDATE snapshots SET name = $1 WHERE id = $2 AND org_id = $3 AND deleted_at_ms IS NULL")
            .bind(name)
            .bind(id.to_string())
            .bind(org.to_string())
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Mark the live snapshot `id` of `org` deleted at `at_ms`; false when
    /// there is none (already deleted, or another org's).
    pub async fn mark_snapshot_deleted(
        &self,
        org: OrgId,
        id: SnapshotId,
        at_ms: i64,
    ) -> Result<bool> {
        let res = sqlx::query("UPDATE snapshots SET deleted_at_ms = $1 WHERE id = $2 AND org_id = $3 AND deleted_at_ms IS NULL")
            .bind(at_ms)
            .bind(id.to_string())
            .bind(org.to_string())
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }
}
