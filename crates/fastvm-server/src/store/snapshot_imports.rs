//! Snapshot imports (`snapshot_imports`), every read scoped by org. A
//! deleted import keeps its row with `deleted_at_ms` set. No registry
//! password is stored.
//!
//! Progress writes ([`Store::save_import_progress`]) only land while the
//! import is in flight (`pending`, `claimed`, `running`): once it is
//! terminal its row no longer changes, except for the delete mark.

use super::{now_ms, parse_id, Result, Store, StoreError};
use fastvm_types::snapshot_import::{
    SnapshotImportEvent, SnapshotImportSourceView, SnapshotImportStatus,
};
use fastvm_types::{OrgId, SnapshotId, SnapshotImportId};
use sqlx::any::AnyRow;
use sqlx::Row;

/// A stored import.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotImportRecord {
    pub id: SnapshotImportId,
    pub org_id: OrgId,
    pub name: String,
    pub status: SnapshotImportStatus,
    pub source: SnapshotImportSourceView,
    pub events: Vec<SnapshotImportEvent>,
    /// Build log, newest last (capped by the writer).
    pub logs: String,
    pub worker_id: Option<String>,
    pub snapshot_id: Option<SnapshotId>,
    pub error: Option<String>,
    pub machine_name: String,
    pub cpu: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub created_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub updated_at_ms: i64,
    pub finished_at_ms: Option<i64>,
}

const COLUMNS: &str = "id, org_id, name, status, source, events, logs, worker_id, snapshot_id, error, \
     machine_name, cpu, memory_mib, disk_gib, created_at_ms, started_at_ms, updated_at_ms, finished_at_ms";

/// Statuses of an import still running (it holds a VM and will add a snapshot).
pub(super) const IN_FLIGHT: &str = "('pending', 'claimed', 'running')";

fn corrupt(message: String) -> StoreError {
    StoreError::Corrupt {
        table: "snapshot_imports",
        message,
    }
}

/// The stored form of a status.
pub fn import_status_str(s: SnapshotImportStatus) -> &'static str {
    match s {
        SnapshotImportStatus::Pending => "pending",
        SnapshotImportStatus::Claimed => "claimed",
        SnapshotImportStatus::Running => "running",
        SnapshotImportStatus::Succeeded => "succeeded",
        SnapshotImportStatus::Failed => "failed",
        SnapshotImportStatus::Cancelled => "cancelled",
    }
}

fn status_of(s: &str) -> Result<SnapshotImportStatus> {
    Ok(match s {
        "pending" => SnapshotImportStatus::Pending,
        "claimed" => SnapshotImportStatus::Claimed,
        "running" => SnapshotImportStatus::Running,
        "succeeded" => SnapshotImportStatus::Succeeded,
        "failed" => SnapshotImportStatus::Failed,
        "cancelled" => SnapshotImportStatus::Cancelled,
        other => return Err(corrupt(format!("unknown status {other:?}"))),
    })
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| corrupt(format!("cannot encode: {e}")))
}

fn record_from(row: &AnyRow) -> Result<SnapshotImportRecord> {
    let status: String = row.try_get("status")?;
    let source: String = row.try_get("source")?;
    let events: String = row.try_get("events")?;
    let snapshot: Option<String> = row.try_get("snapshot_id")?;
    let int = |col: &str| -> Result<i64> { Ok(row.try_get::<i64, _>(col)?) };
    Ok(SnapshotImportRecord {
        id: parse_id(row, "id", "snapshot_imports")?,
        org_id: parse_id(row, "org_id", "snapshot_imports")?,
        name: row.try_get("name")?,
        status: status_of(&status)?,
        source: serde_json::from_str(&source).map_err(|e| corrupt(format!("source: {e}")))?,
        events: serde_json::from_str(&events).map_err(|e| corrupt(format!("events: {e}")))?,
        logs: row.try_get("logs")?,
        worker_id: row.try_get("worker_id")?,
        snapshot_id: snapshot
            .map(|s| s.parse().map_err(|_| corrupt(format!("snapshot_id {s:?}"))))
            .transpose()?,
        error: row.try_get("error")?,
        machine_name: row.try_get("machine_name")?,
        cpu: u32::try_from(int("cpu")?).map_err(|_| corrupt("cpu out of range".into()))?,
        memory_mib: u64::try_from(int("memory_mib")?)
            .map_err(|_| corrupt("memory_mib out of range".into()))?,
        disk_gib: u64::try_from(int("disk_gib")?)
            .map_err(|_| corrupt("disk_gib out of range".into()))?,
        created_at_ms: int("created_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        updated_at_ms: int("updated_at_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
    })
}

impl Store {
    pub async fn insert_snapshot_import(&self, r: &SnapshotImportRecord) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO snapshot_imports ({COLUMNS}) VALUES \
             ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
        ))
        .bind(r.id.to_string())
        .bind(r.org_id.to_string())
        .bind(&r.name)
        .bind(import_status_str(r.status))
        .bind(json(&r.source)?)
        .bind(json(&r.events)?)
        .bind(&r.logs)
        .bind(r.worker_id.clone())
        .bind(r.snapshot_id.map(|s| s.to_string()))
        .bind(r.error.clone())
        .bind(&r.machine_name)
        .bind(i64::from(r.cpu))
        .bind(i64::try_from(r.memory_mib).unwrap_or(i64::MAX))
        .bind(i64::try_from(r.disk_gib).unwrap_or(i64::MAX))
        .bind(r.created_at_ms)
        .bind(r.started_at_ms)
        .bind(r.updated_at_ms)
        .bind(r.finished_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Live import `id` of `org`.
    pub async fn get_snapshot_import(
        &self,
        org: OrgId,
        id: SnapshotImportId,
    ) -> Result<Option<SnapshotImportRecord>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM snapshot_imports WHERE org_id = $1 AND id = $2 AND deleted_at_ms IS NULL"
        ))
        .bind(org.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(record_from)
        .transpose()
    }

    /// Live imports of `org`, oldest first.
    pub async fn list_snapshot_imports(&self, org: OrgId) -> Result<Vec<SnapshotImportRecord>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM snapshot_imports WHERE org_id = $1 AND deleted_at_ms IS NULL \
             ORDER BY created_at_ms, id"
        ))
        .bind(org.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(record_from)
        .collect()
    }

    /// Every import still in flight (all orgs): what a restarted server
    /// must settle.
    pub async fn snapshot_imports_in_flight(&self) -> Result<Vec<SnapshotImportRecord>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM snapshot_imports WHERE status IN {IN_FLIGHT} AND deleted_at_ms IS NULL"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(record_from)
        .collect()
    }

    /// True when `id` (a VM id of a worker) is an import in flight: its
    /// build VM, which has no VM row.
    pub async fn is_import_in_flight(&self, id: fastvm_types::VmId) -> Result<bool> {
        let row = sqlx::query(&format!(
            "SELECT id FROM snapshot_imports WHERE id = $1 AND status IN {IN_FLIGHT}"
        ))
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Write an in-flight import's progress: status, worker, events, logs,
    /// and the outcome fields. Returns false (nothing written) when the
    /// import is no longer in flight (cancelled meanwhile).
    pub async fn save_import_progress(&self, r: &SnapshotImportRecord) -> Result<bool> {
        let res = sqlx::query(&format!(
            "UPDATE snapshot_imports SET status = $2, worker_id = $3, events = $4, logs = $5, \
             snapshot_id = $6, error = $7, started_at_ms = $8, updated_at_ms = $9, finished_at_ms = $10 \
             WHERE id = $1 AND status IN {IN_FLIGHT}"
        ))
        .bind(r.id.to_string())
        .bind(import_status_str(r.status))
        .bind(r.worker_id.clone())
        .bind(json(&r.events)?)
        .bind(&r.logs)
        .bind(r.snapshot_id.map(|s| s.to_string()))
        .bind(r.error.clone())
        .bind(r.started_at_ms)
        .bind(now_ms())
        .bind(r.finished_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() > 0)
    }

    /// Mark a terminal import deleted; false when it is not (or no longer) there.
    pub async fn mark_snapshot_import_deleted(
        &self,
        org: OrgId,
        id: SnapshotImportId,
    ) -> Result<bool> {
        let res = sqlx::query(&format!(
            "UPDATE snapshot_imports SET deleted_at_ms = $3 \
             WHERE org_id = $1 AND id = $2 AND deleted_at_ms IS NULL AND status NOT IN {IN_FLIGHT}"
        ))
        .bind(org.to_string())
        .bind(id.to_string())
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() > 0)
    }
}
