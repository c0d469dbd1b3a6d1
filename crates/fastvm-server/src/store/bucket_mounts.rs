//! Bucket mounts of VMs (`bucket_mounts`), every query scoped by org. No
//! credentials are stored: the worker serving a mount holds them. Every
//! change bumps the VM row's version (its JSON lists its bucket mounts).

use super::volumes::{mount_status_of, mount_str};
use super::{now_ms, parse_id, Result, Store};
use fastvm_types::volume::MountStatus;
use fastvm_types::{OrgId, VmId};
use sqlx::any::AnyRow;
use sqlx::Row;
use std::collections::HashMap;

/// A stored bucket mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BucketMountRecord {
    pub id: String,
    pub vm_id: VmId,
    pub org_id: OrgId,
    pub bucket_uri: String,
    pub mount_path: String,
    pub read_only: bool,
    pub mount_status: MountStatus,
    pub status_message: Option<String>,
    pub created_at_ms: i64,
}

const COLUMNS: &str =
    "id, vm_id, org_id, bucket_uri, mount_path, read_only, mount_status, status_message, created_at_ms";

fn record_from(row: &AnyRow) -> Result<BucketMountRecord> {
    let status: String = row.try_get("mount_status")?;
    let ro: i64 = row.try_get("read_only")?;
    Ok(BucketMountRecord {
        id: row.try_get("id")?,
        vm_id: parse_id(row, "vm_id", "bucket_mounts")?,
        org_id: parse_id(row, "org_id", "bucket_mounts")?,
        bucket_uri: row.try_get("bucket_uri")?,
        mount_path: row.try_get("mount_path")?,
        read_only: ro != 0,
        mount_status: mount_status_of("bucket_mounts", &status)?,
        status_message: row.try_get("status_message")?,
        created_at_ms: row.try_get("created_at_ms")?,
    })
}

impl Store {
    /// Record a bucket mount (`created_at_ms` set here).
    pub async fn insert_bucket_mount(&self, m: &BucketMountRecord) -> Result<BucketMountRecord> {
        let m = BucketMountRecord {
            created_at_ms: now_ms(),
            ..m.clone()
        };
        sqlx::query(&format!(
            "INSERT INTO bucket_mounts ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(&m.id)
        .bind(m.vm_id.to_string())
        .bind(m.org_id.to_string())
        .bind(&m.bucket_uri)
        .bind(&m.mount_path)
        .bind(i64::from(m.read_only))
        .bind(mount_str(m.mount_status))
        .bind(m.status_message.clone())
        .bind(m.created_at_ms)
        .execute(&self.pool)
        .await?;
        self.touch_vm(m.vm_id).await?;
        Ok(m)
    }

    /// Bucket mount `id` of VM `vm` of `org`.
    pub async fn get_bucket_mount(
        &self,
        org: OrgId,
        vm: VmId,
        id: &str,
    ) -> Result<Option<BucketMountRecord>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM bucket_mounts WHERE org_id = $1 AND vm_id = $2 AND id = $3"
        ))
        .bind(org.to_string())
        .bind(vm.to_string())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(record_from)
        .transpose()
    }

    /// New mount status (and message) of a bucket mount.
    pub async fn set_bucket_mount_status(
        &self,
        vm: VmId,
        id: &str,
        status: MountStatus,
        message: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE bucket_mounts SET mount_status = $3, status_message = $4 \
             WHERE vm_id = $1 AND id = $2",
        )
        .bind(vm.to_string())
        .bind(id)
        .bind(mount_str(status))
        .bind(message.map(str::to_owned))
        .execute(&self.pool)
        .await?;
        self.touch_vm(vm).await
    }

    pub async fn delete_bucket_mount(&self, vm: VmId, id: &str) -> Result<bool> {
        let res = sqlx::query("DELETE FROM bucket_mounts WHERE vm_id = $1 AND id = $2")
            .bind(vm.to_string())
            .bind(id)
            .execute(&self.pool)
            .await?;
        self.touch_vm(vm).await?;
        Ok(res.rows_affected() > 0)
    }

    /// Remove every bucket mount of a VM (the VM is gone).
    pub async fn delete_bucket_mounts_of_vm(&self, vm: VmId) -> Result<()> {
        sqlx::query("DELETE FROM bucket_mounts WHERE vm_id = $1")
            .bind(vm.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Bucket mounts of several VMs (the VM list), by VM, oldest first.
    pub async fn bucket_mounts_of_vms(
        &self,
        vms: &[VmId],
    ) -> Result<HashMap<VmId, Vec<BucketMountRecord>>> {
        let mut out: HashMap<VmId, Vec<BucketMountRecord>> = HashMap::new();
        for chunk in vms.chunks(super::vms::IDS_PER_QUERY) {
            let params: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 1)).collect();
            let sql = format!(
                "SELECT {COLUMNS} FROM bucket_mounts WHERE vm_id IN ({}) ORDER BY created_at_ms, id",
                params.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for row in q.fetch_all(&self.pool).await? {
                let m = record_from(&row)?;
                out.entry(m.vm_id).or_default().push(m);
            }
        }
        Ok(out)
    }

    /// Bucket mounts of one VM, oldest first.
    pub async fn bucket_mounts_of_vm(&self, vm: VmId) -> Result<Vec<BucketMountRecord>> {
        Ok(self
            .bucket_mounts_of_vms(&[vm])
            .await?
            .remove(&vm)
            .unwrap_or_default())
    }
}
