//! VM rows. A deleted VM keeps its row (with `deleted_at_ms` set) but is
//! invisible to every org-scoped read.

use super::{parse_id, Result, Store, StoreError};
use fastvm_types::service::Service;
use fastvm_types::{EnvVars, FirewallPolicy, Metadata, OrgId, Ttl, TtlAction, VmId, VmStatus};
use sqlx::any::AnyRow;
use sqlx::Row;

/// A VM as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct VmRecord {
    pub id: VmId,
    pub org_id: OrgId,
    /// The worker that runs it.
    pub worker_id: String,
    pub name: String,
    pub machine_name: String,
    pub source_name: String,
    pub cpu: u32,
    pub memory_mib: u64,
    pub disk_gib: u64,
    pub status: VmStatus,
    /// Why the VM is in `error` (or `stopped`), for operators.
    pub status_message: Option<String>,
    /// The user's policy as given (validated).
    pub firewall: FirewallPolicy,
    pub metadata: Metadata,
    pub env_vars: EnvVars,
    pub ttl: Option<Ttl>,
    pub expires_at_ms: Option<i64>,
    pub ttl_remaining_ms: Option<i64>,
    pub created_at_ms: i64,
    pub paused_at_ms: Option<i64>,
    pub deleted_at_ms: Option<i64>,
    /// Bumped by every update (optimistic concurrency).
    pub version: i64,
    /// The guest's public IPv6 address, once its worker reported it.
    pub public_ipv6: Option<String>,
    /// Registered services (`/v1/vms/{id}/services`), in registration order.
    pub services: Vec<Service>,
}

impl VmRecord {
    /// What the worker enforces: the user's policy plus one ingress rule per
    /// service (the spec's `effectiveFirewall`).
    pub fn effective_firewall(&self) -> FirewallPolicy {
        self.firewall
            .with_service_rules(self.services.iter().map(|s| (s.name.as_str(), s.port)))
    }
}

const VM_COLUMNS: &str = "id, org_id, worker_id, name, machine_name, source_name, cpu, memory_mib, disk_gib, status, status_message, \
     firewall, metadata, env_vars, ttl_seconds, ttl_action, expires_at_ms, ttl_remaining_ms, created_at_ms, paused_at_ms, \
     deleted_at_ms, version, public_ipv6, services";

fn corrupt(message: String) -> StoreError {
    StoreError::Corrupt {
        table: "vms",
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

fn action_str(a: TtlAction) -> &'static str {
    match a {
        TtlAction::Pause => "pause",
        TtlAction::Delete => "delete",
    }
}

fn vm_from_row(row: &AnyRow) -> Result<VmRecord> {
    let status: String = row.try_get("status")?;
    let ttl_seconds: Option<i64> = row.try_get("ttl_seconds")?;
    let ttl_action: Option<String> = row.try_get("ttl_action")?;
    let ttl = match (ttl_seconds, ttl_action.as_deref()) {
        (Some(s), Some(a)) => Some(Ttl {
            seconds: u64::try_from(s).map_err(|_| corrupt(format!("ttl_seconds = {s}")))?,
            action: match a {
                "pause" => TtlAction::Pause,
                "delete" => TtlAction::Delete,
                other => return Err(corrupt(format!("ttl_action = {other:?}"))),
            },
        }),
        _ => None,
    };
    Ok(VmRecord {
        id: parse_id(row, "id", "vms")?,
        org_id: parse_id(row, "org_id", "vms")?,
        worker_id: row.try_get("worker_id")?,
        name: row.try_get("name")?,
        machine_name: row.try_get("machine_name")?,
        source_name: row.try_get("source_name")?,
        cpu: unsigned(row, "cpu")?,
        memory_mib: unsigned(row, "memory_mib")?,
        disk_gib: unsigned(row, "disk_gib")?,
        status: VmStatus::parse(&status).ok_or_else(|| corrupt(format!("status = {status:?}")))?,
        status_message: row.try_get("status_message")?,
        firewall: json_col(row, "firewall")?,
        metadata: json_col(row, "metadata")?,
        env_vars: json_col(row, "env_vars")?,
        ttl,
        expires_at_ms: row.try_get("expires_at_ms")?,
        ttl_remaining_ms: row.try_get("ttl_remaining_ms")?,
        created_at_ms: row.try_get("created_at_ms")?,
        paused_at_ms: row.try_get("paused_at_ms")?,
        deleted_at_ms: row.try_get("deleted_at_ms")?,
        version: row.try_get("version")?,
        public_ipv6: row.try_get("public_ipv6")?,
        services: json_col(row, "services")?,
    })
}

/// Where a page of a VM list starts: after the VM created at
/// `created_at_ms` whose id is `id` (the list's order is (created_at_ms, id)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmListCursor {
    pub created_at_ms: i64,
    pub id: VmId,
}

/// What a VM list needs of a row before (and mostly instead of) the whole
/// row: enough to find a cached view of that version, ask the worker about
/// the VM, and continue the list after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmListEntry {
    pub id: VmId,
    pub version: i64,
    pub status: VmStatus,
    pub created_at_ms: i64,
    pub worker_id: String,
}

impl VmListEntry {
    /// The cursor of the page that follows this entry.
    pub fn cursor(&self) -> VmListCursor {
        VmListCursor {
            created_at_ms: self.created_at_ms,
            id: self.id,
        }
    }
}

/// One [`VmListEntry`] of the text [`Store::list_vm_entries`] aggregates:
/// `<id> <version> <status> <created_at_ms> <worker_id>`.
fn parse_entry(line: &str) -> Result<VmListEntry> {
    let mut f = line.splitn(5, ' ');
    let mut next = |what: &str| {
        f.next()
            .ok_or_else(|| corrupt(format!("list entry {line:?} has no {what}")))
    };
    let (id, version, status, created, worker) = (
        next("id")?,
        next("version")?,
        next("status")?,
        next("created_at_ms")?,
        next("worker_id")?,
    );
    Ok(VmListEntry {
        id: id
            .parse()
            .map_err(|_| corrupt(format!("id {id:?} is not a UUID")))?,
        version: version
            .parse()
            .map_err(|_| corrupt(format!("version {version:?}")))?,
        status: VmStatus::parse(status).ok_or_else(|| corrupt(format!("status = {status:?}")))?,
        created_at_ms: created
            .parse()
            .map_err(|_| corrupt(format!("created_at_ms {created:?}")))?,
        worker_id: worker.to_owned(),
    })
}

/// Most ids bound in one `IN (...)` list of [`Store::get_vms`].
pub(super) const IDS_PER_QUERY: usize = 200;

/// The INSERT of a new VM row (run on the pool or inside placement's transaction).
fn insert_vm_query(
    vm: &VmRecord,
) -> Result<sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments<'static>>> {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!("INSERT INTO vms ({VM_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24)")
    });
    let q = sqlx::query(SQL.as_str())
        .bind(vm.id.to_string())
        .bind(vm.org_id.to_string())
        .bind(vm.worker_id.clone())
        .bind(vm.name.clone())
        .bind(vm.machine_name.clone())
        .bind(vm.source_name.clone())
        .bind(i64::from(vm.cpu))
        .bind(i64::try_from(vm.memory_mib).unwrap_or(i64::MAX))
        .bind(i64::try_from(vm.disk_gib).unwrap_or(i64::MAX))
        .bind(vm.status.as_str())
        .bind(vm.status_message.clone())
        .bind(to_json(&vm.firewall)?)
        .bind(to_json(&vm.metadata)?)
        .bind(to_json(&vm.env_vars)?)
        .bind(vm.ttl.map(|t| i64::try_from(t.seconds).unwrap_or(i64::MAX)))
        .bind(vm.ttl.map(|t| action_str(t.action)))
        .bind(vm.expires_at_ms)
        .bind(vm.ttl_remaining_ms)
        .bind(vm.created_at_ms)
        .bind(vm.paused_at_ms)
        .bind(vm.deleted_at_ms)
        .bind(vm.version)
        .bind(vm.public_ipv6.clone())
        .bind(to_json(&vm.services)?);
    Ok(q)
}

/// [`Store::insert_vm`] on `conn` (inside placement's transaction).
pub(crate) async fn insert_vm_on(conn: &mut sqlx::AnyConnection, vm: &VmRecord) -> Result<()> {
    insert_vm_query(vm)?.execute(&mut *conn).await?;
    Ok(())
}

impl Store {
    /// Insert a new VM row.
    pub async fn insert_vm(&self, vm: &VmRecord) -> Result<()> {
        insert_vm_query(vm)?.execute(&self.pool).await?;
        Ok(())
    }

    /// How many live VMs there are in each status, across every org (metrics).
    pub async fn count_vms_by_status(&self) -> Result<Vec<(VmStatus, i64)>> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM vms WHERE deleted_at_ms IS NULL GROUP BY status",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let status: String = row.try_get("status")?;
            let n: i64 = row.try_get("n")?;
            out.push((
                VmStatus::parse(&status).ok_or_else(|| corrupt(format!("status = {status:?}")))?,
                n,
            ));
        }
        Ok(out)
    }

    /// The live (not deleted) VM `id` of `org`.
    pub async fn get_vm(&self, org: OrgId, id: VmId) -> Result<Option<VmRecord>> {
        let row = sqlx::query(&format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE id = $1 AND org_id = $2 AND deleted_at_ms IS NULL"
        ))
        .bind(id.to_string())
        .bind(org.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(vm_from_row).transpose()
    }

    /// The VM `id` of any org, deleted or not (for background work, never for callers).
    pub async fn get_vm_unscoped(&self, id: VmId) -> Result<Option<VmRecord>> {
        let row = sqlx::query(&format!("SELECT {VM_COLUMNS} FROM vms WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(vm_from_row).transpose()
    }

    /// The live VMs of `org`, oldest first, optionally only those in `status`.
    pub async fn list_vms(&self, org: OrgId, status: Option<VmStatus>) -> Result<Vec<VmRecord>> {
        let rows = match status {
            Some(s) => {
                sqlx::query(&format!(
                    "SELECT {VM_COLUMNS} FROM vms WHERE org_id = $1 AND status = $2 AND deleted_at_ms IS NULL ORDER BY created_at_ms, id"
                ))
                .bind(org.to_string())
                .bind(s.as_str())
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!("SELECT {VM_COLUMNS} FROM vms WHERE org_id = $1 AND deleted_at_ms IS NULL ORDER BY created_at_ms, id"))
                    .bind(org.to_string())
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        rows.iter().map(vm_from_row).collect()
    }

    /// The live VMs of `org` in list order (oldest first, then by id), only
    /// those in `status` when given, starting after `after`, at most `limit`:
    /// id, version, status, creation time and worker of each, not the rows.
    ///
    /// The page comes back as one row of text (`string_agg`, one line per
    /// VM) rather than one row per VM: sqlx's SQLite driver hands rows one
    /// at a time from its connection thread, which made a 1,000-row list
    /// cost tens of milliseconds before any decoding (bench-api list).
    /// Keyset pagination (`created_at_ms >= c AND (created_at_ms > c OR
    /// id > i)`) on the index `vms_org_created`: a VM that exists for the
    /// whole walk is on exactly one page, whatever is created or deleted
    /// meanwhile.
    pub async fn list_vm_entries(
        &self,
        org: OrgId,
        status: Option<VmStatus>,
        after: Option<VmListCursor>,
        limit: Option<u32>,
    ) -> Result<Vec<VmListEntry>> {
        let mut filter = String::from("org_id = $1 AND deleted_at_ms IS NULL");
        let mut n = 1;
        if status.is_some() {
            n += 1;
            filter.push_str(&format!(" AND status = ${n}"));
        }
        if after.is_some() {
            filter.push_str(&format!(
                " AND created_at_ms >= ${} AND (created_at_ms > ${} OR id > ${})",
                n + 1,
                n + 1,
                n + 2
            ));
            n += 2;
        }
        let limit_sql = match limit {
            Some(_) => format!(" LIMIT ${}", n + 1),
            None => String::new(),
        };
        let sql = format!(
            "SELECT string_agg(id || ' ' || CAST(version AS TEXT) || ' ' || status || ' ' || CAST(created_at_ms AS TEXT) || ' ' || worker_id,              '\n' ORDER BY created_at_ms, id) AS page              FROM (SELECT id, version, status, created_at_ms, worker_id FROM vms WHERE {filter} ORDER BY created_at_ms, id{limit_sql}) AS p"
        );
        let mut q = sqlx::query(&sql).bind(org.to_string());
        if let Some(s) = status {
            q = q.bind(s.as_str());
        }
        if let Some(a) = after {
            q = q.bind(a.created_at_ms).bind(a.id.to_string());
        }
        if let Some(l) = limit {
            q = q.bind(i64::from(l));
        }
        let row = q.fetch_one(&self.pool).await?;
        let page: Option<String> = row.try_get("page")?;
        match page {
            None => Ok(Vec::new()),
            Some(text) => text.lines().map(parse_entry).collect(),
        }
    }

    /// The generation of `org`'s VM list: it changes with every insert,
    /// update and delete of a VM row of the org (database triggers,
    /// migration 0012), so an answer built after reading generation `g`
    /// is the list as it is while the generation is still `g`. 0 for an
    /// org that never had a VM.
    pub async fn vm_list_generation(&self, org: OrgId) -> Result<i64> {
        let row = sqlx::query("SELECT generation FROM vm_list_generations WHERE org_id = $1")
            .bind(org.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => row.try_get("generation")?,
            None => 0,
        })
    }

    /// The live VMs of `org` among `ids`, in no particular order (ids of
    /// another org or deleted VMs are left out).
    pub async fn get_vms(&self, org: OrgId, ids: &[VmId]) -> Result<Vec<VmRecord>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(IDS_PER_QUERY) {
            let params: Vec<String> = (0..chunk.len()).map(|i| format!("${}", i + 2)).collect();
            let sql = format!(
                "SELECT {VM_COLUMNS} FROM vms WHERE org_id = $1 AND deleted_at_ms IS NULL AND id IN ({})",
                params.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(org.to_string());
            for id in chunk {
                q = q.bind(id.to_string());
            }
            for row in q.fetch_all(&self.pool).await? {
                out.push(vm_from_row(&row)?);
            }
        }
        Ok(out)
    }

    /// Every live VM of every org placed on `worker_id` (startup reconciliation).
    pub async fn list_live_vms_on(&self, worker_id: &str) -> Result<Vec<VmRecord>> {
        let rows = sqlx::query(&format!("SELECT {VM_COLUMNS} FROM vms WHERE worker_id = $1 AND deleted_at_ms IS NULL ORDER BY created_at_ms, id"))
            .bind(worker_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(vm_from_row).collect()
    }

    /// Running live VMs on `worker_id` whose TTL deadline is at or before `now_ms` (the TTL reaper).
    pub async fn list_ttl_due(&self, worker_id: &str, now_ms: i64) -> Result<Vec<VmRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE worker_id = $1 AND status = 'running' AND deleted_at_ms IS NULL \
             AND expires_at_ms IS NOT NULL AND expires_at_ms <= $2 ORDER BY expires_at_ms, id"
        ))
        .bind(worker_id)
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(vm_from_row).collect()
    }

    /// The earliest TTL deadline of the running live VMs on `worker_id`, if any.
    pub async fn next_ttl_deadline(&self, worker_id: &str) -> Result<Option<i64>> {
        let row = sqlx::query(
            "SELECT MIN(expires_at_ms) AS next FROM vms WHERE worker_id = $1 AND status = 'running' AND deleted_at_ms IS NULL \
             AND expires_at_ms IS NOT NULL",
        )
        .bind(worker_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("next")?)
    }

    /// Running live VMs of every worker whose TTL deadline is at or before
    /// `now_ms` (the TTL reaper of a cluster control plane: one query, index
    /// `vms_expires_at`).
    pub async fn list_ttl_due_all(&self, now_ms: i64) -> Result<Vec<VmRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {VM_COLUMNS} FROM vms WHERE status = 'running' AND deleted_at_ms IS NULL \
             AND expires_at_ms IS NOT NULL AND expires_at_ms <= $1 ORDER BY expires_at_ms, id"
        ))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(vm_from_row).collect()
    }

    /// The earliest TTL deadline of the running live VMs of every worker.
    pub async fn next_ttl_deadline_all(&self) -> Result<Option<i64>> {
        let row = sqlx::query(
            "SELECT MIN(expires_at_ms) AS next FROM vms WHERE status = 'running' AND deleted_at_ms IS NULL \
             AND expires_at_ms IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get("next")?)
    }

    /// Record the public IPv6 address the worker gave the VM. A change bumps
    /// the row's version like every other update (cached list views of the
    /// VM are keyed by it).
    pub async fn set_vm_public_ipv6(&self, id: VmId, ipv6: Option<&str>) -> Result<()> {
        sqlx::query(
            "UPDATE vms SET public_ipv6 = $1, version = version + 1 WHERE id = $2 \
             AND COALESCE(public_ipv6, '') <> COALESCE($1, '')",
        )
        .bind(ipv6.map(str::to_owned))
        .bind(id.to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Write every mutable column of `vm` if its row still has `vm.version`;
    /// on success bump `vm.version` and return true. False means someone
    /// else changed the row first: re-read and decide again.
    pub async fn update_vm(&self, vm: &mut VmRecord) -> Result<bool> {
        let res = sqlx::query(
            "UPDATE vms SET name = $1, status = $2, status_message = $3, firewall = $4, metadata = $5, env_vars = $6, \
             ttl_seconds = $7, ttl_action = $8, expires_at_ms = $9, ttl_remaining_ms = $10, paused_at_ms = $11, \
             deleted_at_ms = $12, version = $13, services = $14 WHERE id = $15 AND org_id = $16 AND version = $17",
        )
        .bind(&vm.name)
        .bind(vm.status.as_str())
        .bind(vm.status_message.clone())
        .bind(to_json(&vm.firewall)?)
        .bind(to_json(&vm.metadata)?)
        .bind(to_json(&vm.env_vars)?)
        .bind(vm.ttl.map(|t| i64::try_from(t.seconds).unwrap_or(i64::MAX)))
        .bind(vm.ttl.map(|t| action_str(t.action)))
        .bind(vm.expires_at_ms)
        .bind(vm.ttl_remaining_ms)
        .bind(vm.paused_at_ms)
        .bind(vm.deleted_at_ms)
        .bind(vm.version + 1)
        .bind(to_json(&vm.services)?)
        .bind(vm.id.to_string())
        .bind(vm.org_id.to_string())
        .bind(vm.version)
        .execute(&self.pool)
        .await?;
        if res.rows_affected() == 1 {
            vm.version += 1;
            Ok(true)
        } else {
            Ok(false)
        }
    }
}
