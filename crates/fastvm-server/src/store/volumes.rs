//! Volumes (`volumes`) and their attachments to VMs (`volume_attachments`),
//! every query scoped by org. A volume row reserves its size against the
//! org's quota from the moment it is inserted (`creating`) until it is
//! deleted. Every change to a VM's attachments bumps the VM row's version
//! (its JSON lists them: the VM list caches views by row version).

use super::{now_ms, parse_id, Result, Store, StoreError};
use fastvm_types::volume::{AccessMode, MountStatus, VolumeStatus};
use fastvm_types::{OrgId, VmId};
use sqlx::any::AnyRow;
use sqlx::Row;

/// A stored volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: String,
    pub org_id: OrgId,
    pub name: String,
    pub access_mode: AccessMode,
    pub size_gib: u64,
    pub pending_size_gib: u64,
    pub status: VolumeStatus,
    /// The worker holding its files, once created there.
    pub worker_id: Option<String>,
    pub created_at_ms: i64,
}

/// A stored attachment of a volume to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachmentRecord {
    pub vm_id: VmId,
    pub volume_id: String,
    pub org_id: OrgId,
    pub mount_path: String,
    pub read_only: bool,
    pub mount_status: MountStatus,
    pub status_message: Option<String>,
    pub created_at_ms: i64,
}

fn corrupt(table: &'static str, message: String) -> StoreError {
    StoreError::Corrupt { table, message }
}

fn mode_str(m: AccessMode) -> &'static str {
    match m {
        AccessMode::Rw => "rw",
        AccessMode::Ro => "ro",
    }
}

/// `creating`, `ready` or `deleting`.
pub fn status_str(s: VolumeStatus) -> &'static str {
    match s {
        VolumeStatus::Creating => "creating",
        VolumeStatus::Ready => "ready",
        VolumeStatus::Deleting => "deleting",
    }
}

/// `mounted`, `failed` or `pending` (volume attachments and bucket mounts).
pub(super) fn mount_str(s: MountStatus) -> &'static str {
    match s {
        MountStatus::Mounted => "mounted",
        MountStatus::Failed => "failed",
        MountStatus::Pending => "pending",
    }
}

/// The [`MountStatus`] stored as `s` in `table`.
pub(super) fn mount_status_of(table: &'static str, s: &str) -> Result<MountStatus> {
    match s {
        "mounted" => Ok(MountStatus::Mounted),
        "failed" => Ok(MountStatus::Failed),
        "pending" => Ok(MountStatus::Pending),
        other => Err(corrupt(table, format!("mount_status {other:?}"))),
    }
}

fn gib(row: &AnyRow, col: &str) -> Result<u64> {
    let v: i64 = row.try_get(col)?;
    u64::try_from(v).map_err(|_| corrupt("volumes", format!("{col} = {v}")))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const COLUMNS: &str =
    "id, org_id, name, access_mode, size_gib, pending_size_gib, status, worker_id, created_at_ms";
const ATT_COLUMNS: &str =
    "vm_id, volume_id, org_id, mount_path, read_only, mount_status, status_message, created_at_ms";

fn volume_from(row: &AnyRow) -> Result<VolumeRecord> {
    let mode: String = row.try_get("access_mode")?;
    let status: String = row.try_get("status")?;
    Ok(VolumeRecord {
        id: row.try_get("id")?,
        org_id: parse_id(row, "org_id", "volumes")?,
        name: row.try_get("name")?,
        access_mode: match mode.as_str() {
            "rw" => AccessMode::Rw,
            "ro" => AccessMode::Ro,
            other => return Err(corrupt("volumes", format!("access_mode {other:?}"))),
        },
        size_gib: gib(row, "size_gib")?,
        pending_size_gib: gib(row, "pending_size_gib")?,
        status: match status.as_str() {
            "creating" => VolumeStatus::Creating,
            "ready" => VolumeStatus::Ready,
            "deleting" => VolumeStatus::Deleting,
            other => return Err(corrupt("volumes", format!("status {other:?}"))),
        },
        worker_id: row.try_get("worker_id")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

fn attachment_from(row: &AnyRow) -> Result<AttachmentRecord> {
    let status: String = row.try_get("mount_status")?;
    let ro: i64 = row.try_get("read_only")?;
    Ok(AttachmentRecord {
        vm_id: parse_id(row, "vm_id", "volume_attachments")?,
        volume_id: row.try_get("volume_id")?,
        org_id: parse_id(row, "org_id", "volume_attachments")?,
        mount_path: row.try_get("mount_path")?,
        read_only: ro != 0,
        mount_status: mount_status_of("volume_attachments", &status)?,
        status_message: row.try_get("status_message")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

/// Count and provisioned GiB (the larger of size and pending size) of an
/// org's volumes, on `conn` (inside a quota transaction).
pub(crate) async fn volume_usage_on(
    conn: &mut sqlx::AnyConnection,
    org: OrgId,
) -> Result<(u64, u64)> {
    let row = sqlx::query(USAGE_SQL)
        .bind(org.to_string())
        .fetch_one(&mut *conn)
        .await?;
    usage_from(&row)
}

const USAGE_SQL: &str =
    "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(CASE WHEN pending_size_gib > size_gib \
     THEN pending_size_gib ELSE size_gib END), 0) AS BIGINT) AS gib FROM volumes WHERE org_id = $1";

fn usage_from(row: &AnyRow) -> Result<(u64, u64)> {
    let n: i64 = row.try_get("n")?;
    let g: i64 = row.try_get("gib")?;
    Ok((u64::try_from(n).unwrap_or(0), u64::try_from(g).unwrap_or(0)))
}

impl Store {
    /// Bump a VM row's version: its JSON (which lists its attachments)
    /// changed, so cached views of the old version must not be served.
    pub(super) async fn touch_vm(&self, vm: VmId) -> Result<()> {
        sqlx::query("UPDATE vms SET version = version + 1 WHERE id = $1")
            .bind(vm.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Attachments of several VMs (the VM list), by VM, in attach order.
    pub async fn attachments_of_vms(
        &self,
        vms: &[VmId],
    ) -> Result<std::collections::HashMap<VmId, Vec<AttachmentRecord>>> {
        let mut out: std::collections::HashMap<VmId, Vec<AttachmentRecord>> =
            std::collections::HashMap::new();
        for chunk in vms.chunks(super::vms::IDS_PER_QUERY) {
            let params: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 1)).collect();
            let sql = format!(
                "SELECT {ATT_COLUMNS} FROM volume_attachments WHERE vm_id IN ({}) ORDER BY created_at_ms, volume_id",
                params.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for row in q.fetch_all(&self.pool).await? {
                let a = attachment_from(&row)?;
                out.entry(a.vm_id).or_default().push(a);
            }
        }
        Ok(out)
    }

    /// Count and provisioned GiB of `org`'s volumes.
    pub async fn volume_usage(&self, org: OrgId) -> Result<(u64, u64)> {
        let row = sqlx::query(USAGE_SQL)
            .bind(org.to_string())
            .fetch_one(&self.pool)
            .await?;
        usage_from(&row)
    }

    /// Insert a new volume row (`created_at_ms` set here).
    pub async fn insert_volume(&self, v: &VolumeRecord) -> Result<VolumeRecord> {
        let v = VolumeRecord {
            created_at_ms: now_ms(),
            ..v.clone()
        };
        sqlx::query(&format!(
            "INSERT INTO volumes ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(&v.id)
        .bind(v.org_id.to_string())
        .bind(&v.name)
        .bind(mode_str(v.access_mode))
        .bind(i64_of(v.size_gib))
        .bind(i64_of(v.pending_size_gib))
        .bind(status_str(v.status))
        .bind(v.worker_id.clone())
        .bind(v.created_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(v)
    }

    pub async fn get_volume(&self, org: OrgId, id: &str) -> Result<Option<VolumeRecord>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM volumes WHERE org_id = $1 AND id = $2"
        ))
        .bind(org.to_string())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(volume_from)
        .transpose()
    }

    /// The org's volumes, oldest first.
    pub async fn list_volumes(&self, org: OrgId) -> Result<Vec<VolumeRecord>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM volumes WHERE org_id = $1 ORDER BY created_at_ms, id"
        ))
        .bind(org.to_string())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(volume_from)
        .collect()
    }

    /// Write every mutable field of `v` (name, mode, sizes, status, worker).
    pub async fn save_volume(&self, v: &VolumeRecord) -> Result<()> {
        let res = sqlx::query(
            "UPDATE volumes SET name = $3, access_mode = $4, size_gib = $5, pending_size_gib = $6, \
             status = $7, worker_id = $8 WHERE org_id = $1 AND id = $2",
        )
        .bind(v.org_id.to_string())
        .bind(&v.id)
        .bind(&v.name)
        .bind(mode_str(v.access_mode))
        .bind(i64_of(v.size_gib))
        .bind(i64_of(v.pending_size_gib))
        .bind(status_str(v.status))
        .bind(v.worker_id.clone())
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!("no volume {}", v.id)));
        }
        Ok(())
    }

    /// Remove a volume row (its attachments must be gone).
    pub async fn delete_volume_row(&self, org: OrgId, id: &str) -> Result<bool> {
        let res = sqlx::query("DELETE FROM volumes WHERE org_id = $1 AND id = $2")
            .bind(org.to_string())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() > 0)
    }

    /// Record an attachment; `Conflict` when the VM has this volume or this
    /// mount path already.
    pub async fn insert_attachment(&self, a: &AttachmentRecord) -> Result<AttachmentRecord> {
        let a = AttachmentRecord {
            created_at_ms: now_ms(),
            ..a.clone()
        };
        let res = sqlx::query(&format!(
            "INSERT INTO volume_attachments ({ATT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(a.vm_id.to_string())
        .bind(&a.volume_id)
        .bind(a.org_id.to_string())
        .bind(&a.mount_path)
        .bind(i64::from(a.read_only))
        .bind(mount_str(a.mount_status))
        .bind(a.status_message.clone())
        .bind(a.created_at_ms)
        .execute(&self.pool)
        .await;
        match res {
            Ok(_) => {
                self.touch_vm(a.vm_id).await?;
                Ok(a)
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                Err(StoreError::Conflict(format!(
                    "the VM already has volume {} or something mounted at {}",
                    a.volume_id, a.mount_path
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// New mount status (and message) of an attachment.
    pub async fn set_attachment_status(
        &self,
        vm: VmId,
        volume: &str,
        status: MountStatus,
        message: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE volume_attachments SET mount_status = $3, status_message = $4 \
             WHERE vm_id = $1 AND volume_id = $2",
        )
        .bind(vm.to_string())
        .bind(volume)
        .bind(mount_str(status))
        .bind(message.map(str::to_owned))
        .execute(&self.pool)
        .await?;
        self.touch_vm(vm).await
    }

    pub async fn delete_attachment(&self, vm: VmId, volume: &str) -> Result<bool> {
        let res = sqlx::query("DELETE FROM volume_attachments WHERE vm_id = $1 AND volume_id = $2")
            .bind(vm.to_string())
            .bind(volume)
            .execute(&self.pool)
            .await?;
        self.touch_vm(vm).await?;
        Ok(res.rows_affected() > 0)
    }

    /// Remove every attachment of a VM (the VM is gone).
    pub async fn delete_attachments_of_vm(&self, vm: VmId) -> Result<()> {
        sqlx::query("DELETE FROM volume_attachments WHERE vm_id = $1")
            .bind(vm.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Attachments of one VM, in attach order.
    pub async fn attachments_of_vm(&self, vm: VmId) -> Result<Vec<AttachmentRecord>> {
        Ok(self
            .attachments_of_vms(&[vm])
            .await?
            .remove(&vm)
            .unwrap_or_default())
    }

    /// Attachments of one volume, in attach order.
    pub async fn attachments_of_volume(&self, volume: &str) -> Result<Vec<AttachmentRecord>> {
        sqlx::query(&format!(
            "SELECT {ATT_COLUMNS} FROM volume_attachments WHERE volume_id = $1 ORDER BY created_at_ms, vm_id"
        ))
        .bind(volume)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(attachment_from)
        .collect()
    }
}
