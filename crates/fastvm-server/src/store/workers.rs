//! Worker hosts of a cluster (the `workers` table) and the queries placement
//! runs inside its transaction.
//!
//! A row is written by the worker's registration ([`Store::register_worker`]:
//! upsert, `generation` + 1, status `ready` unless `draining`), kept fresh by
//! its heartbeats ([`Store::worker_heartbeat`], refused for an older
//! generation or an `unreachable` row: the worker then registers again), and
//! aged by every control plane's monitor ([`Store::mark_stale_workers`]:
//! `ready` rows without a heartbeat for a while become `unreachable` and
//! their live VMs `unknown`). Every statement is idempotent, so several
//! control planes may run them at once.
//!
//! Placement ([`crate::fleet`]) reads candidates and their usage and inserts
//! the VM row on one connection (a PostgreSQL transaction): the `*_on`
//! functions take that connection.

use super::{now_ms, Result, Store, StoreError};
use fastvm_types::OrgId;
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};
use std::collections::HashMap;

/// What a worker is to placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerStatus {
    /// Heartbeating; takes new VMs.
    Ready,
    /// Missed its heartbeats; its VMs are `unknown` until it registers again.
    Unreachable,
    /// Takes no new VMs (an admin drained it); its VMs keep running.
    Draining,
}

impl WorkerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerStatus::Ready => "ready",
            WorkerStatus::Unreachable => "unreachable",
            WorkerStatus::Draining => "draining",
        }
    }

    pub fn parse(s: &str) -> Option<WorkerStatus> {
        match s {
            "ready" => Some(WorkerStatus::Ready),
            "unreachable" => Some(WorkerStatus::Unreachable),
            "draining" => Some(WorkerStatus::Draining),
            _ => None,
        }
    }
}

/// What a worker says of itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WorkerRegistrationRow {
    pub id: String,
    /// Where the control plane dials it (`http://host:port`).
    pub address: String,
    pub cpus: u64,
    pub memory_mib: u64,
    pub disk_free_gib: u64,
    pub qemu_build: String,
    pub accel: String,
    pub cpu_model: String,
    /// Snapshots are restorable between workers with equal keys.
    pub compat_key: String,
}

/// A worker as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerRecord {
    pub id: String,
    pub address: String,
    pub status: WorkerStatus,
    /// Bumped by every registration; the per-worker token derives from it.
    pub generation: i64,
    pub cpus: u64,
    pub memory_mib: u64,
    pub disk_free_gib: u64,
    pub qemu_build: String,
    pub accel: String,
    pub cpu_model: String,
    pub compat_key: String,
    /// VMs the worker reported in its last heartbeat.
    pub vm_count: u64,
    pub last_heartbeat_ms: i64,
    pub registered_at_ms: i64,
}

/// A `ready` worker placement may choose, with what its live VMs hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementCandidate {
    pub id: String,
    pub cpus: u64,
    pub memory_mib: u64,
    /// vCPUs and MiB of the worker's live VMs (not deleted, not stopped or error).
    pub used_cpu: u64,
    pub used_memory_mib: u64,
}

const WORKER_COLUMNS: &str = "id, address, status, generation, cpus, memory_mib, disk_free_gib, qemu_build, accel, cpu_model, \
     compat_key, vm_count, last_heartbeat_ms, registered_at_ms";

/// The VM statuses a lost worker's VMs leave for `unknown`.
const LOSABLE: &str = "('running', 'paused', 'pausing', 'resuming')";

fn corrupt(message: String) -> StoreError {
    StoreError::Corrupt {
        table: "workers",
        message,
    }
}

fn unsigned(row: &AnyRow, col: &str) -> Result<u64> {
    let v: i64 = row.try_get(col)?;
    u64::try_from(v).map_err(|_| corrupt(format!("{col} = {v} is out of range")))
}

fn big(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn worker_from_row(row: &AnyRow) -> Result<WorkerRecord> {
    let status: String = row.try_get("status")?;
    Ok(WorkerRecord {
        id: row.try_get("id")?,
        address: row.try_get("address")?,
        status: WorkerStatus::parse(&status)
            .ok_or_else(|| corrupt(format!("status = {status:?}")))?,
        generation: row.try_get("generation")?,
        cpus: unsigned(row, "cpus")?,
        memory_mib: unsigned(row, "memory_mib")?,
        disk_free_gib: unsigned(row, "disk_free_gib")?,
        qemu_build: row.try_get("qemu_build")?,
        accel: row.try_get("accel")?,
        cpu_model: row.try_get("cpu_model")?,
        compat_key: row.try_get("compat_key")?,
        vm_count: unsigned(row, "vm_count")?,
        last_heartbeat_ms: row.try_get("last_heartbeat_ms")?,
        registered_at_ms: row.try_get("registered_at_ms")?,
    })
}

impl Store {
    /// Insert or refresh the row of a registering worker: its address and
    /// capacity are replaced, `generation` goes up by one (a new worker
    /// starts at 1), the heartbeat is now, and the status becomes `ready`
    /// unless an admin drained it. Returns the row as it is now.
    pub async fn register_worker(&self, reg: &WorkerRegistrationRow) -> Result<WorkerRecord> {
        let now = now_ms();
        let row = sqlx::query(&format!(
            "INSERT INTO workers ({WORKER_COLUMNS}) VALUES ($1, $2, 'ready', 1, $3, $4, $5, $6, $7, $8, $9, 0, $10, $10) \
             ON CONFLICT (id) DO UPDATE SET address = excluded.address, \
               status = CASE WHEN workers.status = 'draining' THEN 'draining' ELSE 'ready' END, \
               generation = workers.generation + 1, cpus = excluded.cpus, memory_mib = excluded.memory_mib, \
               disk_free_gib = excluded.disk_free_gib, qemu_build = excluded.qemu_build, accel = excluded.accel, \
               cpu_model = excluded.cpu_model, compat_key = excluded.compat_key, \
               last_heartbeat_ms = excluded.last_heartbeat_ms, registered_at_ms = excluded.registered_at_ms \
             RETURNING {WORKER_COLUMNS}"
        ))
        .bind(&reg.id)
        .bind(&reg.address)
        .bind(big(reg.cpus))
        .bind(big(reg.memory_mib))
        .bind(big(reg.disk_free_gib))
        .bind(&reg.qemu_build)
        .bind(&reg.accel)
        .bind(&reg.cpu_model)
        .bind(&reg.compat_key)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        worker_from_row(&row)
    }

    /// Record a heartbeat of generation `generation`. False when the row has
    /// another generation, is `unreachable`, or does not exist: the worker
    /// must register again (which reconciles its VMs).
    pub async fn worker_heartbeat(&self, id: &str, generation: i64, vm_count: u64) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE workers SET last_heartbeat_ms = $1, vm_count = $2 \
             WHERE id = $3 AND generation = $4 AND status <> 'unreachable'",
        )
        .bind(now_ms())
        .bind(big(vm_count))
        .bind(id)
        .bind(generation)
        .execute(&self.pool)
        .await?;
        Ok(res.rows_affected() == 1)
    }

    /// Every worker, by id.
    pub async fn list_workers(&self) -> Result<Vec<WorkerRecord>> {
        let rows = sqlx::query(&format!("SELECT {WORKER_COLUMNS} FROM workers ORDER BY id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(worker_from_row).collect()
    }

    /// The worker `id`.
    pub async fn get_worker(&self, id: &str) -> Result<Option<WorkerRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {WORKER_COLUMNS} FROM workers WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(worker_from_row).transpose()
    }

    /// Set the status of worker `id`; false when there is no such worker.
    pub async fn set_worker_status(&self, id: &str, status: WorkerStatus) -> Result<bool> {
        let res = sqlx::query("UPDATE workers SET status = $1 WHERE id = $2")
            .bind(status.as_str())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(res.rows_affected() == 1)
    }

    /// The monitor's round: `ready` workers whose last heartbeat is before
    /// `stale_before_ms` become `unreachable` (their ids are returned), and
    /// the running, paused, pausing or resuming VMs of every unreachable
    /// worker become `unknown` with `message`. Both statements are
    /// idempotent: several control planes may run them at once, and a round
    /// cut short between them is completed by the next.
    pub async fn mark_stale_workers(
        &self,
        stale_before_ms: i64,
        message: &str,
    ) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "UPDATE workers SET status = 'unreachable' WHERE status = 'ready' AND last_heartbeat_ms < $1 RETURNING id",
        )
        .bind(stale_before_ms)
        .fetch_all(&self.pool)
        .await?;
        let ids = rows
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        sqlx::query(&format!(
            "UPDATE vms SET status = 'unknown', status_message = $1, version = version + 1 \
             WHERE deleted_at_ms IS NULL AND status IN {LOSABLE} \
             AND worker_id IN (SELECT id FROM workers WHERE status = 'unreachable')"
        ))
        .bind(message)
        .execute(&self.pool)
        .await?;
        Ok(ids)
    }

    /// How many live VMs each worker holds (admin list).
    pub async fn live_vm_counts(&self) -> Result<HashMap<String, u64>> {
        let rows = sqlx::query(
            "SELECT worker_id, COUNT(*) AS n FROM vms WHERE deleted_at_ms IS NULL GROUP BY worker_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = HashMap::new();
        for row in rows {
            let id: String = row.try_get("worker_id")?;
            let n: i64 = row.try_get("n")?;
            out.insert(id, u64::try_from(n).unwrap_or(0));
        }
        Ok(out)
    }

    /// Whether API key `key_id` is an admin key: the key of user `admin` of
    /// the org `org_name` (the one made at first start).
    pub async fn is_admin_key(&self, key_id: uuid::Uuid, org_name: &str) -> Result<bool> {
        let row = sqlx::query(
            "SELECT k.id FROM api_keys k JOIN users u ON u.id = k.user_id JOIN orgs o ON o.id = k.org_id \
             WHERE k.id = $1 AND u.name = 'admin' AND o.name = $2 AND k.revoked_at_ms IS NULL",
        )
        .bind(key_id.to_string())
        .bind(org_name)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// `NOTIFY channel, payload` (PostgreSQL only; see crate::fleet).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(channel)
            .bind(payload)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A pooled connection (placement on SQLite runs on one, see crate::fleet).
    pub(crate) async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>> {
        Ok(self.pool.acquire().await?)
    }

    /// A transaction (placement on PostgreSQL).
    pub(crate) async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>> {
        Ok(self.pool.begin().await?)
    }
}

/// The `ready` workers placement may choose from, with their usage:
/// all of them, or only those with `compat_key`, or only worker `only`.
pub(crate) async fn placement_candidates_on(
    conn: &mut AnyConnection,
    compat_key: Option<&str>,
    only: Option<&str>,
) -> Result<Vec<PlacementCandidate>> {
    let mut sql = String::from("SELECT id, cpus, memory_mib FROM workers WHERE status = 'ready'");
    let mut binds = Vec::new();
    if let Some(k) = compat_key {
        binds.push(k.to_owned());
        sql.push_str(&format!(" AND compat_key = ${}", binds.len()));
    }
    if let Some(w) = only {
        binds.push(w.to_owned());
        sql.push_str(&format!(" AND id = ${}", binds.len()));
    }
    let mut q = sqlx::query(&sql);
    for b in &binds {
        q = q.bind(b.clone());
    }
    let rows = q.fetch_all(&mut *conn).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(PlacementCandidate {
            id: row.try_get("id")?,
            cpus: unsigned(row, "cpus")?,
            memory_mib: unsigned(row, "memory_mib")?,
            used_cpu: 0,
            used_memory_mib: 0,
        });
    }
    Ok(out)
}

/// Fill in the usage of `candidates` (one grouped query).
pub(crate) async fn candidate_usage_on(
    conn: &mut AnyConnection,
    candidates: &mut [PlacementCandidate],
) -> Result<()> {
    if candidates.is_empty() {
        return Ok(());
    }
    let marks: Vec<String> = (1..=candidates.len()).map(|i| format!("${i}")).collect();
    let sql = format!(
        "SELECT worker_id, CAST(COALESCE(SUM(cpu), 0) AS BIGINT) AS cpu, CAST(COALESCE(SUM(memory_mib), 0) AS BIGINT) AS mem \
         FROM vms WHERE deleted_at_ms IS NULL AND status NOT IN ('stopped', 'error') AND worker_id IN ({}) GROUP BY worker_id",
        marks.join(", ")
    );
    let mut q = sqlx::query(&sql);
    for c in candidates.iter() {
        q = q.bind(c.id.clone());
    }
    let rows = q.fetch_all(&mut *conn).await?;
    for row in &rows {
        let id: String = row.try_get("worker_id")?;
        if let Some(c) = candidates.iter_mut().find(|c| c.id == id) {
            c.used_cpu = unsigned(row, "cpu")?;
            c.used_memory_mib = unsigned(row, "mem")?;
        }
    }
    Ok(())
}

/// Move the reservation of VM `vm` (in `status`) to worker `to` (a move
/// between workers); false when the row is no longer in `status`.
pub(crate) async fn move_vm_on(
    conn: &mut AnyConnection,
    vm: fastvm_types::VmId,
    status: &str,
    to: &str,
) -> Result<bool> {
    let res = sqlx::query(
        "UPDATE vms SET worker_id = $1, version = version + 1 WHERE id = $2 AND status = $3 AND deleted_at_ms IS NULL",
    )
    .bind(to)
    .bind(vm.to_string())
    .bind(status)
    .execute(&mut *conn)
    .await?;
    Ok(res.rows_affected() == 1)
}

/// Lock worker `id`'s row until the transaction ends (PostgreSQL) and say
/// whether it is still `ready`.
pub(crate) async fn lock_ready_worker_on(conn: &mut AnyConnection, id: &str) -> Result<bool> {
    let row = sqlx::query("SELECT status FROM workers WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    match row {
        Some(r) => Ok(r.try_get::<String, _>("status")? == "ready"),
        None => Ok(false),
    }
}

/// Lock org `org`'s row until the transaction ends (PostgreSQL): launches
/// of one org from several control planes check their quota one at a time.
pub(crate) async fn lock_org_on(conn: &mut AnyConnection, org: OrgId) -> Result<()> {
    sqlx::query("SELECT id FROM orgs WHERE id = $1 FOR UPDATE")
        .bind(org.to_string())
        .fetch_optional(&mut *conn)
        .await?;
    Ok(())
}
