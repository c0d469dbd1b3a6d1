//! The workers a control plane drives ([`Fleet`]): which worker runs a VM,
//! where a new VM goes (placement), and what happens when a worker is lost
//! or comes back.
//!
//! Two shapes:
//! - **embedded** ([`Fleet::embedded`]): `fastvm serve`'s single host. One
//!   worker (`local`), no `workers` table, launches reserve under the org's
//!   in-process quota mutex exactly as before cluster mode existed.
//! - **cluster** ([`Fleet::cluster`]): workers register over HTTP
//!   (`routes/internal.rs`) into the `workers` table. Handles on them come
//!   from a connector (the remote client in production, in-process fakes in
//!   tests), cached per (id, generation). Every call carries the per-worker
//!   token [`worker_token`] of the generation the handle was made for, so a
//!   handle of an older generation is refused by the worker (fencing).
//!
//! Placement ([`Fleet::place`], cluster only) runs quota check, choice of
//! worker and VM row insert in one transaction (the VM row with its
//! `worker_id` is the reservation): on PostgreSQL it locks the org's row and
//! then the chosen worker's row `FOR UPDATE`, so several control planes
//! racing launches can neither pass an org's quota nor overfill a worker; on
//! SQLite (one control plane) an in-process mutex serialises placements.
//! Best-of-K: [`PLACEMENT_CHOICES`] random `ready` candidates (filtered by the
//! snapshot's compatibility key, or the snapshot's own worker when it is not
//! in the shared store), the one with the most free memory (then vCPUs)
//! that fits wins. Capacity: `cpus * CPU_OVERCOMMIT` vCPUs and `memory_mib`
//! MiB, minus the live VMs on it (not stopped or error).
//!
//! Drain ([`AppState::drain_worker`]): a `draining` worker takes no new VMs;
//! its paused VMs move to compatible workers through the shared snapshot
//! store ([`AppState::move_paused_vms`]).
//!
//! Failure ([`spawn_monitor`]): every [`MONITOR_EVERY`] each control plane
//! marks `ready` workers without a heartbeat for [`HEARTBEAT_TIMEOUT`]
//! `unreachable` and their VMs `unknown` (idempotent statements). When a
//! worker registers again ([`AppState::reconcile_worker`]) its VMs are
//! reconciled: rows it still runs take its state, VMs it runs that the store
//! deleted or placed elsewhere are deleted on it, rows it does not know
//! become `error` ("lost with its worker"). On PostgreSQL, registrations and
//! status changes are announced on the `fastvm_workers` channel
//! (`LISTEN/NOTIFY`) so every control plane drops its cached handle at once;
//! the monitor's round also compares the cache with the table.

use crate::error::{codes, ApiError};
use crate::quotas::{check_vm_limits, VmShape};
use crate::store::{self, Backend, Store, VmRecord, WorkerRecord, WorkerStatus};
use crate::worker::{Worker, WorkerError};
use crate::AppState;
use axum::http::StatusCode;
use fastvm_types::{VmId, VmStatus};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How many random candidates placement compares (best-of-K).
pub const PLACEMENT_CHOICES: usize = 3;
/// vCPUs placed per host CPU.
pub const CPU_OVERCOMMIT: u64 = 4;
/// How often workers heartbeat (told to them at registration).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// A `ready` worker silent this long becomes `unreachable`.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the monitor looks.
pub const MONITOR_EVERY: Duration = Duration::from_secs(1);
/// The `LISTEN/NOTIFY` channel of worker changes (payload: the worker id).
pub const NOTIFY_CHANNEL: &str = "fastvm_workers";
/// The `statusMessage` of a VM whose worker is lost.
pub const UNKNOWN_MESSAGE: &str =
    "the VM's worker stopped answering; the VM may still run there and is reconciled when the worker returns";
/// How often a placement transaction is retried (lost races, deadlocks).
const PLACE_ATTEMPTS: usize = 8;

pub use fastvm_worker_api::cluster::{tokens_equal as secrets_equal, worker_token};
/// Where and how to reach a worker: what a [`Connector`] gets.
pub use fastvm_worker_api::WorkerEndpoint;

/// Makes a handle on a remote worker.
pub type Connector = Arc<dyn Fn(WorkerEndpoint) -> Arc<dyn Worker> + Send + Sync>;

/// Which workers may take a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    /// Any ready worker (a fresh launch).
    Any,
    /// Ready workers with this compatibility key (a restore of a snapshot in
    /// the shared store).
    Compatible(String),
    /// Only this worker (a restore of a snapshot that lives only there).
    Only(String),
}

struct Cached {
    generation: i64,
    status: WorkerStatus,
    worker: Arc<dyn Worker>,
}

struct Cluster {
    store: Store,
    secret: String,
    connector: Connector,
    /// An embedded worker beside the remote ones (served without a table lookup).
    local: Option<Arc<dyn Worker>>,
    /// Its `workers` row (registered at start, heartbeated by the monitor)
    /// and the generation that registration got.
    local_registration: Option<(store::WorkerRegistrationRow, std::sync::atomic::AtomicI64)>,
    /// Snapshots go to the shared store (restorable across compatible workers).
    snapshot_store: bool,
    cache: Mutex<HashMap<String, Cached>>,
    /// SQLite: placements of this process one at a time (one writer anyway).
    sqlite_placement: tokio::sync::Mutex<()>,
}

enum Kind {
    Embedded(Arc<dyn Worker>),
    Cluster(Box<Cluster>),
}

/// The workers of this control plane (see the module docs).
pub struct Fleet {
    kind: Kind,
}

impl Fleet {
    /// Single host: `worker` runs every VM.
    pub fn embedded(worker: Arc<dyn Worker>) -> Self {
        Fleet {
            kind: Kind::Embedded(worker),
        }
    }

    /// Cluster: the workers of the `workers` table, reached through `connector`
    /// with tokens derived from `secret`.
    pub fn cluster(store: Store, secret: impl Into<String>, connector: Connector) -> Self {
        Fleet {
            kind: Kind::Cluster(Box::new(Cluster {
                store,
                secret: secret.into().trim().to_owned(),
                connector,
                local: None,
                local_registration: None,
                snapshot_store: false,
                cache: Mutex::new(HashMap::new()),
                sqlite_placement: tokio::sync::Mutex::new(()),
            })),
        }
    }

    /// Cluster with an embedded worker too (`fastvm serve` on PostgreSQL
    /// without `--no-local-worker`): requests for its id use it directly;
    /// it takes new VMs only if it has a `workers` row (register it with
    /// [`Store::register_worker`]).
    pub fn with_local(mut self, worker: Arc<dyn Worker>) -> Self {
        if let Kind::Cluster(c) = &mut self.kind {
            c.local = Some(worker);
        }
        self
    }

    /// The embedded worker of a cluster takes new VMs too: [`Fleet::register_local`]
    /// writes its row (`reg.id` is replaced by the worker's id) and every
    /// monitor round heartbeats it.
    pub fn with_local_registration(mut self, mut reg: store::WorkerRegistrationRow) -> Self {
        if let Kind::Cluster(c) = &mut self.kind {
            if let Some(w) = &c.local {
                reg.id = w.id().to_owned();
            }
            c.local_registration = Some((reg, std::sync::atomic::AtomicI64::new(0)));
        }
        self
    }

    /// Register the embedded worker of a cluster (when it has a registration):
    /// its row is upserted as any worker's is. Returns its id.
    pub async fn register_local(&self) -> Result<Option<String>, store::StoreError> {
        let Kind::Cluster(c) = &self.kind else {
            return Ok(None);
        };
        let Some((reg, generation)) = &c.local_registration else {
            return Ok(None);
        };
        let row = c.store.register_worker(reg).await?;
        generation.store(row.generation, std::sync::atomic::Ordering::SeqCst);
        Ok(Some(row.id))
    }

    /// Heartbeat the embedded worker's row; register again when refused
    /// (it was marked unreachable while this control plane was away).
    /// Returns the id when it registered again (reconcile it).
    async fn heartbeat_local(&self) -> Result<Option<String>, store::StoreError> {
        let Kind::Cluster(c) = &self.kind else {
            return Ok(None);
        };
        let (Some((reg, generation)), Some(local)) = (&c.local_registration, &c.local) else {
            return Ok(None);
        };
        let vm_count = match local.list().await {
            Ok(vms) => vms.len() as u64,
            Err(_) => return Ok(None),
        };
        let g = generation.load(std::sync::atomic::Ordering::SeqCst);
        if c.store.worker_heartbeat(&reg.id, g, vm_count).await? {
            return Ok(None);
        }
        self.register_local().await
    }

    /// Cluster with a shared snapshot store: snapshots are recorded `stored`
    /// with their worker's compatibility key.
    pub fn with_snapshot_store(mut self, on: bool) -> Self {
        if let Kind::Cluster(c) = &mut self.kind {
            c.snapshot_store = on;
        }
        self
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// The embedded worker, if this control plane has one.
    pub fn local(&self) -> Option<&Arc<dyn Worker>> {
        match &self.kind {
            Kind::Embedded(w) => Some(w),
            Kind::Cluster(c) => c.local.as_ref(),
        }
    }

    /// The cluster secret (cluster mode).
    pub fn secret(&self) -> Option<&str> {
        match &self.kind {
            Kind::Embedded(_) => None,
            Kind::Cluster(c) => Some(&c.secret),
        }
    }

    /// The worker `worker_id`: `Unreachable` when it is not known or its row
    /// is `unreachable`. Handles are cached per (id, generation).
    pub async fn get(&self, worker_id: &str) -> Result<Arc<dyn Worker>, WorkerError> {
        let c = match &self.kind {
            Kind::Embedded(w) if w.id() == worker_id => return Ok(w.clone()),
            Kind::Embedded(_) => {
                return Err(WorkerError::Unreachable(format!(
                    "worker {worker_id:?} is not driven by this server"
                )))
            }
            Kind::Cluster(c) => c,
        };
        if let Some(w) = c.local.as_ref().filter(|w| w.id() == worker_id) {
            return Ok(w.clone());
        }
        if let Some(found) = c.cached(worker_id) {
            return found;
        }
        let row = c
            .store
            .get_worker(worker_id)
            .await
            .map_err(|e| WorkerError::Failed(format!("looking up worker {worker_id:?}: {e}")))?
            .ok_or_else(|| WorkerError::Unreachable(format!("no worker {worker_id:?}")))?;
        c.remember(&row);
        c.cached(worker_id).unwrap_or_else(|| {
            Err(WorkerError::Unreachable(format!(
                "worker {worker_id:?} is unknown"
            )))
        })
    }

    /// Forget the cached handle of `worker_id` (it registered again or changed status).
    pub fn invalidate(&self, worker_id: &str) {
        if let Kind::Cluster(c) = &self.kind {
            if let Ok(mut cache) = c.cache.lock() {
                cache.remove(worker_id);
            }
        }
    }

    /// Align the cache with the table: entries whose generation changed are
    /// dropped, statuses are refreshed.
    pub async fn refresh(&self) -> Result<(), store::StoreError> {
        let Kind::Cluster(c) = &self.kind else {
            return Ok(());
        };
        let rows = c.store.list_workers().await?;
        let by_id: HashMap<&str, &WorkerRecord> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
        if let Ok(mut cache) = c.cache.lock() {
            cache.retain(|id, e| match by_id.get(id.as_str()) {
                Some(r) if r.generation == e.generation => {
                    e.status = r.status;
                    true
                }
                _ => false,
            });
        }
        Ok(())
    }

    /// Every worker handle to sweep (TTL, firewalls): the embedded one, or
    /// each worker of the table that is not unreachable.
    pub async fn reachable(&self) -> Vec<Arc<dyn Worker>> {
        match &self.kind {
            Kind::Embedded(w) => vec![w.clone()],
            Kind::Cluster(c) => {
                let mut out: Vec<Arc<dyn Worker>> = c.local.iter().cloned().collect();
                let rows = match c.store.list_workers().await {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::warn!(error = %e, "listing workers failed");
                        return out;
                    }
                };
                for r in rows {
                    if r.status == WorkerStatus::Unreachable || out.iter().any(|w| w.id() == r.id) {
                        continue;
                    }
                    c.remember(&r);
                    if let Some(Ok(w)) = c.cached(&r.id) {
                        out.push(w);
                    }
                }
                out
            }
        }
    }

    /// Whether snapshots of VMs on `worker_id` are restorable elsewhere:
    /// its compatibility key and `stored`, for the snapshot row.
    pub async fn snapshot_traits(&self, worker_id: &str) -> (Option<String>, bool) {
        let Kind::Cluster(c) = &self.kind else {
            return (None, false);
        };
        if !c.snapshot_store {
            return (None, false);
        }
        match c.store.get_worker(worker_id).await {
            Ok(Some(r)) => (Some(r.compat_key), true),
            _ => (None, false),
        }
    }

    /// Let go of the embedded worker's VMs (server shutdown); remote workers keep theirs.
    pub fn detach(&self) {
        if let Some(w) = self.local() {
            w.detach();
        }
    }

    /// Cluster placement: check the org's quota, choose a worker for `vm`
    /// among those `affinity` allows, set `vm.worker_id` and insert the row,
    /// all in one transaction (see the module docs). 429 over quota, 503
    /// `NO_CAPACITY` when no worker fits. The embedded fleet inserts under
    /// the caller's quota mutex instead (see `AppState::launch_vm`).
    pub(crate) async fn place(
        &self,
        vm: &mut VmRecord,
        affinity: &Affinity,
        action: &str,
    ) -> Result<(), ApiError> {
        self.place_for(vm, affinity, action, Purpose::Launch).await
    }

    /// Move the reservation of the stored VM `vm` (a drain's move) to
    /// another worker `affinity` allows, with the same capacity checks and
    /// locks as a launch (no quota check: the VM counts already). Sets
    /// `vm.worker_id`.
    pub(crate) async fn relocate(
        &self,
        vm: &mut VmRecord,
        affinity: &Affinity,
    ) -> Result<(), ApiError> {
        self.place_for(vm, affinity, "moving this VM", Purpose::Move)
            .await
    }

    /// Whether snapshots go to the shared store (VMs can move between workers).
    pub fn shares_snapshots(&self) -> bool {
        matches!(&self.kind, Kind::Cluster(c) if c.snapshot_store)
    }

    async fn place_for(
        &self,
        vm: &mut VmRecord,
        affinity: &Affinity,
        action: &str,
        purpose: Purpose,
    ) -> Result<(), ApiError> {
        let Kind::Cluster(c) = &self.kind else {
            return Err(ApiError::internal("placement needs a cluster fleet"));
        };
        // A move never goes back to where the VM is.
        let mut excluded: Vec<String> = match purpose {
            Purpose::Launch => Vec::new(),
            Purpose::Move => vec![vm.worker_id.clone()],
        };
        for _ in 0..PLACE_ATTEMPTS {
            let outcome = match c.store.backend() {
                Backend::Postgres => {
                    let mut tx = c.store.begin().await?;
                    let o =
                        try_place(&mut tx, true, vm, affinity, action, &excluded, purpose).await;
                    match o {
                        Ok(Placed::Done) => {
                            tx.commit().await.map_err(store::StoreError::from)?;
                            Placed::Done
                        }
                        Ok(other) => {
                            let _ = tx.rollback().await;
                            other
                        }
                        Err(e) if is_retryable(&e) => {
                            let _ = tx.rollback().await;
                            Placed::Retry(None)
                        }
                        Err(e) => {
                            let _ = tx.rollback().await;
                            return Err(e);
                        }
                    }
                }
                Backend::Sqlite => {
                    let _one = c.sqlite_placement.lock().await;
                    let mut conn = c.store.acquire().await?;
                    try_place(&mut conn, false, vm, affinity, action, &excluded, purpose).await?
                }
            };
            match outcome {
                Placed::Done => return Ok(()),
                Placed::Retry(lost) => excluded.extend(lost),
            }
        }
        Err(no_capacity(affinity, "placement kept losing races; retry"))
    }
}

impl Fleet {
    /// Cluster on PostgreSQL: check the org's snapshot quota and insert the
    /// `creating` row in one transaction holding the org's row, so control
    /// planes racing captures cannot pass the quota. Elsewhere: `None` (the
    /// caller checks and inserts under the org's in-process mutex).
    pub(crate) async fn reserve_snapshot(
        &self,
        rec: &crate::store::SnapshotRecord,
    ) -> Option<Result<(), ApiError>> {
        let Kind::Cluster(c) = &self.kind else {
            return None;
        };
        if c.store.backend() != Backend::Postgres {
            return None;
        }
        Some(
            async {
                let mut tx = c.store.begin().await?;
                store::lock_org_on(&mut tx, rec.org_id).await?;
                let limits = store::quota_limits_on(&mut tx, rec.org_id).await?;
                let usage = store::quota_usage_on(&mut tx, rec.org_id).await?;
                crate::quotas::check_snapshot_limits(rec.org_id, &limits, &usage)?;
                store::insert_snapshot_on(&mut tx, rec).await?;
                tx.commit().await.map_err(store::StoreError::from)?;
                Ok(())
            }
            .await,
        )
    }
}

impl Cluster {
    fn cached(&self, id: &str) -> Option<Result<Arc<dyn Worker>, WorkerError>> {
        let cache = self.cache.lock().ok()?;
        let e = cache.get(id)?;
        Some(match e.status {
            WorkerStatus::Unreachable => Err(WorkerError::Unreachable(format!(
                "worker {id} is unreachable (no heartbeat for {} s)",
                HEARTBEAT_TIMEOUT.as_secs()
            ))),
            _ => Ok(e.worker.clone()),
        })
    }

    /// Cache a handle for `row`'s generation (kept when it is the same).
    fn remember(&self, row: &WorkerRecord) {
        let Ok(mut cache) = self.cache.lock() else {
            return;
        };
        match cache.get_mut(&row.id) {
            Some(e) if e.generation == row.generation => e.status = row.status,
            _ => {
                let endpoint = WorkerEndpoint {
                    id: row.id.clone(),
                    address: row.address.clone(),
                    token: worker_token(&self.secret, &row.id, row.generation),
                    generation: row.generation,
                };
                let worker = (self.connector)(endpoint);
                cache.insert(
                    row.id.clone(),
                    Cached {
                        generation: row.generation,
                        status: row.status,
                        worker,
                    },
                );
            }
        }
    }
}

/// What a placement is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A new VM: quota checked, row inserted.
    Launch,
    /// A stored VM moving off its worker: its row's `worker_id` changes.
    Move,
}

enum Placed {
    Done,
    /// Lost a race on this worker (it filled up or left `ready`): try again without it.
    Retry(Option<String>),
}

fn is_retryable(e: &ApiError) -> bool {
    // Deadlock / serialization failures surface as database errors; the
    // transaction is simply run again.
    e.code == codes::DATABASE_ERROR
        && (e.message.contains("40P01")
            || e.message.contains("40001")
            || e.message.contains("deadlock")
            || e.message.contains("could not serialize"))
}

fn no_capacity(affinity: &Affinity, why: &str) -> ApiError {
    let which = match affinity {
        Affinity::Any => "no ready worker has room for this VM".to_owned(),
        Affinity::Compatible(k) => format!(
            "no ready worker compatible with the snapshot (compatibility key {k}) has room for this VM"
        ),
        Affinity::Only(w) => format!(
            "the snapshot lives only on worker {w:?}, which is not ready or has no room for this VM"
        ),
    };
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        codes::NO_CAPACITY,
        format!("{which}: {why}"),
    )
}

fn fits(c: &store::PlacementCandidate, shape: VmShape) -> bool {
    c.used_cpu.saturating_add(shape.cpu) <= c.cpus.saturating_mul(CPU_OVERCOMMIT)
        && c.used_memory_mib.saturating_add(shape.memory_mib) <= c.memory_mib
}

/// Best of the fitting candidates: most free memory, then most free vCPUs.
fn best(cands: &[store::PlacementCandidate], shape: VmShape) -> Option<store::PlacementCandidate> {
    cands
        .iter()
        .filter(|c| fits(c, shape))
        .max_by_key(|c| {
            (
                c.memory_mib.saturating_sub(c.used_memory_mib),
                c.cpus
                    .saturating_mul(CPU_OVERCOMMIT)
                    .saturating_sub(c.used_cpu),
            )
        })
        .cloned()
}

/// One placement attempt on `conn` (a transaction when `locking`).
async fn try_place(
    conn: &mut sqlx::AnyConnection,
    locking: bool,
    vm: &mut VmRecord,
    affinity: &Affinity,
    action: &str,
    excluded: &[String],
    purpose: Purpose,
) -> Result<Placed, ApiError> {
    let shape = VmShape {
        cpu: u64::from(vm.cpu),
        memory_mib: vm.memory_mib,
        disk_gib: vm.disk_gib,
    };
    if purpose == Purpose::Launch {
        if locking {
            store::lock_org_on(conn, vm.org_id).await?;
        }
        let limits = store::quota_limits_on(conn, vm.org_id).await?;
        let usage = store::quota_usage_on(conn, vm.org_id).await?;
        check_vm_limits(vm.org_id, action, &limits, &usage, shape)?;
    }
    let (compat, only) = match affinity {
        Affinity::Any => (None, None),
        Affinity::Compatible(k) => (Some(k.as_str()), None),
        Affinity::Only(w) => (None, Some(w.as_str())),
    };
    let mut all = store::placement_candidates_on(conn, compat, only).await?;
    all.retain(|c| !excluded.contains(&c.id));
    if all.is_empty() {
        return Err(no_capacity(affinity, "none is ready"));
    }
    // Best of K random candidates; all of them when none of the K fits.
    let mut sample: Vec<store::PlacementCandidate> = {
        use rand::seq::SliceRandom;
        let mut rng = rand::thread_rng();
        all.choose_multiple(&mut rng, PLACEMENT_CHOICES)
            .cloned()
            .collect()
    };
    store::candidate_usage_on(conn, &mut sample).await?;
    let chosen = match best(&sample, shape) {
        Some(c) => c,
        None if sample.len() < all.len() => {
            store::candidate_usage_on(conn, &mut all).await?;
            best(&all, shape).ok_or_else(|| no_capacity(affinity, "all are full"))?
        }
        None => return Err(no_capacity(affinity, "all are full")),
    };
    if locking {
        // Under the worker's row lock, its usage is final until we commit.
        if !store::lock_ready_worker_on(conn, &chosen.id).await? {
            return Ok(Placed::Retry(Some(chosen.id)));
        }
        let mut again = vec![chosen.clone()];
        store::candidate_usage_on(conn, &mut again).await?;
        if !again.first().is_some_and(|c| fits(c, shape)) {
            return Ok(Placed::Retry(Some(chosen.id)));
        }
    }
    match purpose {
        Purpose::Launch => {
            vm.worker_id = chosen.id;
            store::insert_vm_on(conn, vm).await?;
        }
        Purpose::Move => {
            if !store::move_vm_on(conn, vm.id, vm.status.as_str(), &chosen.id).await? {
                return Err(ApiError::invalid_state(format!(
                    "VM {} changed while it was being moved",
                    vm.id
                )));
            }
            vm.worker_id = chosen.id;
        }
    }
    Ok(Placed::Done)
}

impl AppState {
    /// The worker that runs the VM `id` (embedded: the one worker, without a query).
    pub(crate) async fn worker_of(&self, id: VmId) -> Result<Arc<dyn Worker>, WorkerError> {
        if let (false, Some(w)) = (self.fleet().is_cluster(), self.fleet().local()) {
            return Ok(w.clone());
        }
        let rec = self
            .store()
            .get_vm_unscoped(id)
            .await
            .map_err(|e| WorkerError::Failed(format!("looking up VM {id}: {e}")))?
            .ok_or_else(|| WorkerError::NotFound(format!("no VM with id {id}")))?;
        self.fleet().get(&rec.worker_id).await
    }

    /// The worker `worker_id` (of a VM or snapshot row).
    pub(crate) async fn worker_for(&self, worker_id: &str) -> Result<Arc<dyn Worker>, WorkerError> {
        self.fleet().get(worker_id).await
    }

    /// Reconcile the VMs of worker `worker_id` with what it runs (after it
    /// registered): rows it runs take its state; VMs it runs that the store
    /// deleted or placed elsewhere are deleted on it (they must not keep
    /// running); rows it does not know become `error`. Provisioning rows are
    /// left to the launch that owns them.
    pub async fn reconcile_worker(&self, worker_id: &str) -> Result<(), ApiError> {
        self.fleet().invalidate(worker_id);
        let worker = self.worker_for(worker_id).await?;
        // Rows first, then the worker's list: a VM that starts running in
        // between is in the list (never taken for lost); a row that changed
        // meanwhile is left alone by the guarded writes below.
        let rows = self.store().list_live_vms_on(worker_id).await?;
        let running: HashMap<VmId, crate::worker::VmState> =
            worker.list().await?.into_iter().collect();
        for rec in rows {
            let id = rec.id;
            let (to, message) = match (rec.status, running.get(&id)) {
                (VmStatus::Provisioning, _) => continue,
                (VmStatus::Deleting, None) => {
                    self.modify(Some(rec.org_id), id, |r| {
                        r.deleted_at_ms = Some(store::now_ms());
                        Ok(())
                    })
                    .await?;
                    continue;
                }
                (VmStatus::Deleting, Some(_)) => {
                    if let Err(e) = worker.delete(id).await {
                        tracing::warn!(vm = %id, error = %e, "finishing a delete on a returning worker failed");
                        continue;
                    }
                    self.modify(Some(rec.org_id), id, |r| {
                        r.deleted_at_ms = Some(store::now_ms());
                        Ok(())
                    })
                    .await?;
                    continue;
                }
                (VmStatus::Stopped | VmStatus::Error, _) => continue,
                (_, Some(state)) => crate::lifecycle::observed(Some(state.clone())),
                (_, None) => (
                    VmStatus::Error,
                    Some(format!("lost with its worker {worker_id}")),
                ),
            };
            if to == rec.status && rec.status != VmStatus::Unknown {
                continue;
            }
            let from = rec.status;
            tracing::info!(vm = %id, worker = worker_id, from = from.as_str(), to = to.as_str(), "VM reconciled with its returning worker");
            self.modify(None, id, |r| {
                if r.status == from {
                    crate::lifecycle::set_status(r, to, store::now_ms());
                    r.status_message = message.clone();
                }
                Ok(())
            })
            .await?;
        }
        for id in running.keys() {
            let keep = match self.store().get_vm_unscoped(*id).await? {
                Some(r) => r.deleted_at_ms.is_none() && r.worker_id == worker_id,
                // The build VM (id = import id) or the builder VM of a
                // Dockerfile import in flight has no VM row.
                None => {
                    self.store().is_import_in_flight(*id).await?
                        || match fastvm_worker_api::builder_vm_id(&id.to_string())
                            .and_then(|b| b.to_string().parse().ok())
                        {
                            Some(import) => self.store().is_import_in_flight(import).await?,
                            None => false,
                        }
                }
            };
            if !keep {
                tracing::info!(vm = %id, worker = worker_id, "fencing: deleting a VM the store deleted or placed elsewhere");
                if let Err(e) = worker.delete(*id).await {
                    tracing::warn!(vm = %id, error = %e, "fencing delete failed");
                }
            }
        }
        Ok(())
    }

    /// `POST /v1/admin/workers/{id}/drain`: no new VMs go to the worker.
    /// Its running VMs keep running there until deleted; its paused VMs are
    /// moved to other workers in the background ([`Self::move_paused_vms`]).
    pub(crate) async fn drain_worker(&self, worker_id: &str) -> Result<WorkerRecord, ApiError> {
        if !self.fleet().is_cluster() {
            return Err(ApiError::invalid_state(
                "this server runs its one embedded worker: there is no other worker to drain to",
            ));
        }
        if !self
            .store()
            .set_worker_status(worker_id, WorkerStatus::Draining)
            .await?
        {
            return Err(ApiError::not_found(format!(
                "no worker with id {worker_id:?}"
            )));
        }
        self.workers_changed(worker_id).await;
        tracing::info!(
            worker = worker_id,
            "worker draining: no new VMs are placed on it; moving its paused VMs"
        );
        let s = self.clone();
        let id = worker_id.to_owned();
        tokio::spawn(async move {
            match s.move_paused_vms(&id).await {
                Ok(n) => tracing::info!(worker = %id, moved = n, "drain: paused VMs moved"),
                Err(e) => {
                    tracing::warn!(worker = %id, error = %e.message, "drain: moving paused VMs failed")
                }
            }
        });
        self.store()
            .get_worker(worker_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no worker with id {worker_id:?}")))
    }

    /// Move every paused VM of worker `worker_id` to another compatible
    /// worker (a drain): each is captured to the shared snapshot store,
    /// restored on a worker placement chose (the reservation moves in one
    /// transaction), paused there, and deleted on the old worker. The VM
    /// keeps its id; it is `pausing` while it moves (no resume meanwhile)
    /// and `paused` after, with a `statusMessage` when the move failed (it
    /// then stays where it was). Needs the shared snapshot store; returns
    /// how many moved.
    pub async fn move_paused_vms(&self, worker_id: &str) -> Result<usize, ApiError> {
        if !self.fleet().shares_snapshots() {
            tracing::warn!(
                worker = worker_id,
                "drain: no shared snapshot store; paused VMs stay on the draining worker"
            );
            return Ok(0);
        }
        let old = self.worker_for(worker_id).await?;
        let (Some(compat), _) = self.fleet().snapshot_traits(worker_id).await else {
            return Ok(0);
        };
        let mut moved = 0;
        for rec in self.store().list_live_vms_on(worker_id).await? {
            if rec.status != VmStatus::Paused {
                continue;
            }
            let id = rec.id;
            match self.move_vm(&old, rec, &compat).await {
                Ok(()) => moved += 1,
                Err(e) => {
                    tracing::warn!(vm = %id, error = %e.message, "drain: moving a paused VM failed; it stays")
                }
            }
        }
        Ok(moved)
    }

    async fn move_vm(
        &self,
        old: &Arc<dyn Worker>,
        rec: VmRecord,
        compat: &str,
    ) -> Result<(), ApiError> {
        let (org, id) = (rec.org_id, rec.id);
        let mut held = self
            .modify(Some(org), id, |r| {
                if r.status != VmStatus::Paused || r.worker_id != old.id() {
                    return Err(ApiError::invalid_state(format!(
                        "VM {id} is no longer paused here"
                    )));
                }
                r.status = VmStatus::Pausing;
                Ok(())
            })
            .await?;
        let result = self.move_held(old, &mut held, compat).await;
        let message = result.as_ref().err().map(|e| {
            format!(
                "moving the VM off its draining worker failed: {}",
                e.message
            )
        });
        self.modify(Some(org), id, |r| {
            if r.status == VmStatus::Pausing {
                r.status = VmStatus::Paused;
                r.status_message = message.clone();
            }
            Ok(())
        })
        .await?;
        if result.is_ok() {
            tracing::info!(vm = %id, from = old.id(), to = %held.worker_id, "paused VM moved off a draining worker");
        }
        result
    }

    /// The move of a VM held in `pausing` (see [`Self::move_paused_vms`]).
    async fn move_held(
        &self,
        old: &Arc<dyn Worker>,
        rec: &mut VmRecord,
        compat: &str,
    ) -> Result<(), ApiError> {
        let snap = fastvm_types::SnapshotId::new_v4();
        let spec = crate::lifecycle::move_spec(rec, snap)?;
        old.snapshot(rec.id, snap).await?;
        let from = rec.worker_id.clone();
        if let Err(e) = self
            .fleet()
            .relocate(rec, &Affinity::Compatible(compat.to_owned()))
            .await
        {
            let _ = old.delete_snapshot(snap).await;
            return Err(e);
        }
        let restored = async {
            let new = self.worker_for(&rec.worker_id).await?;
            new.create(spec).await?;
            new.pause(rec.id).await?;
            Ok::<_, WorkerError>(new)
        }
        .await;
        let new = match restored {
            Ok(new) => new,
            Err(e) => {
                if let Ok(new) = self.worker_for(&rec.worker_id).await {
                    let _ = new.delete(rec.id).await;
                }
                // The reservation goes back where the VM still is.
                let mut conn = self.store().acquire().await?;
                store::move_vm_on(&mut conn, rec.id, VmStatus::Pausing.as_str(), &from).await?;
                rec.worker_id = from;
                let _ = old.delete_snapshot(snap).await;
                return Err(e.into());
            }
        };
        match new.public_ipv6(rec.id).await {
            Ok(ip) => {
                if let Err(e) = self.store().set_vm_public_ipv6(rec.id, ip.as_deref()).await {
                    tracing::warn!(vm = %rec.id, error = %e, "recording the moved VM's IPv6 failed");
                }
            }
            Err(e) => {
                tracing::warn!(vm = %rec.id, error = %e, "the new worker did not report the VM's IPv6")
            }
        }
        // Off the old worker (if it cannot be told now, reconciliation at
        // its next registration deletes it: its row points elsewhere).
        if let Err(e) = old.delete(rec.id).await {
            tracing::warn!(vm = %rec.id, error = %e, "deleting the moved VM on its old worker failed");
        }
        // The transfer snapshot: the new worker's delete removes it from the store too.
        if let Err(e) = new.delete_snapshot(snap).await {
            tracing::warn!(snapshot = %snap, error = %e, "removing a move's snapshot failed");
        }
        let _ = old.delete_snapshot(snap).await;
        Ok(())
    }

    /// A worker row changed: drop the local handle and tell the other
    /// control planes (PostgreSQL `NOTIFY`).
    pub(crate) async fn workers_changed(&self, worker_id: &str) {
        self.fleet().invalidate(worker_id);
        if self.store().backend() == Backend::Postgres {
            if let Err(e) = self.store().notify(NOTIFY_CHANNEL, worker_id).await {
                tracing::debug!(error = %e, "NOTIFY fastvm_workers failed");
            }
        }
    }

    /// One monitor round (see [`spawn_monitor`]): returns the workers it
    /// marked unreachable.
    pub async fn monitor_round(&self) -> Result<Vec<String>, ApiError> {
        let stale_before =
            store::now_ms() - i64::try_from(HEARTBEAT_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
        self.monitor_round_with(stale_before).await
    }

    /// [`Self::monitor_round`] with heartbeats before `stale_before` (Unix
    /// ms) counting as missed.
    pub async fn monitor_round_with(&self, stale_before: i64) -> Result<Vec<String>, ApiError> {
        if let Some(id) = self.fleet().heartbeat_local().await? {
            self.workers_changed(&id).await;
            if let Err(e) = self.reconcile_worker(&id).await {
                tracing::warn!(worker = %id, error = %e.message, "reconciling the embedded worker failed");
            }
        }
        let lost = self
            .store()
            .mark_stale_workers(stale_before, UNKNOWN_MESSAGE)
            .await?;
        for id in &lost {
            tracing::warn!(worker = %id, "worker unreachable: no heartbeat for {} s; its VMs are unknown", HEARTBEAT_TIMEOUT.as_secs());
            self.workers_changed(id).await;
        }
        self.fleet().refresh().await?;
        Ok(lost)
    }
}

/// The monitor task of a cluster control plane; stops when dropped.
pub struct Monitor(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Monitor {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Start the monitor (every [`MONITOR_EVERY`]) and, on PostgreSQL with
/// `database_url`, the `LISTEN fastvm_workers` task that drops cached
/// handles as soon as another control plane changes a worker. Nothing runs
/// for an embedded fleet.
pub fn spawn_monitor(state: &AppState, database_url: Option<&str>) -> Monitor {
    let mut tasks = Vec::new();
    if !state.fleet().is_cluster() {
        return Monitor(tasks);
    }
    let s = state.clone();
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(MONITOR_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = s.monitor_round().await {
                tracing::warn!(error = %e.message, "worker monitor round failed");
            }
        }
    }));
    if let Some(url) = database_url.filter(|u| u.starts_with("postgres")) {
        let s = state.clone();
        let url = url.to_owned();
        tasks.push(tokio::spawn(async move { listen_loop(s, url).await }));
    }
    Monitor(tasks)
}

async fn listen_loop(state: AppState, url: String) {
    loop {
        match sqlx::postgres::PgListener::connect(&url).await {
            Ok(mut listener) => {
                if let Err(e) = listener.listen(NOTIFY_CHANNEL).await {
                    tracing::warn!(error = %e, "LISTEN fastvm_workers failed");
                } else {
                    loop {
                        match listener.recv().await {
                            Ok(n) => state.fleet().invalidate(n.payload()),
                            Err(e) => {
                                tracing::warn!(error = %e, "LISTEN fastvm_workers: connection lost");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "LISTEN fastvm_workers: cannot connect"),
        }
        // Missed notifications are covered by the monitor's refresh.
        tokio::time::sleep(MONITOR_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_hmac_of_id_and_generation() {
        use hmac::{Hmac, Mac};
        use sha2::Sha256;
        let t = worker_token("s3cret\n", "wk_0123456789abcdef", 3);
        assert_eq!(t.len(), 64);
        assert_eq!(t, worker_token("s3cret", "wk_0123456789abcdef", 3));
        assert_ne!(t, worker_token("s3cret", "wk_0123456789abcdef", 4));
        assert_ne!(t, worker_token("other", "wk_0123456789abcdef", 3));
        // RFC 4231-style check of the construction: HMAC-SHA256(key, msg).
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret")
            .map_err(|_| ())
            .ok();
        if let Some(m) = mac.as_mut() {
            m.update(b"fastvm-worker:wk_0123456789abcdef:3");
        }
        let want = mac.map(|m| hex::encode(m.finalize().into_bytes()));
        assert_eq!(Some(t), want);
    }

    #[test]
    fn secrets_compare() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
    }

    #[test]
    fn best_fit_prefers_free_memory_and_respects_capacity() {
        let c = |id: &str, used_mem| store::PlacementCandidate {
            id: id.into(),
            cpus: 2,
            memory_mib: 8192,
            used_cpu: 0,
            used_memory_mib: used_mem,
        };
        let shape = VmShape {
            cpu: 1,
            memory_mib: 2048,
            disk_gib: 10,
        };
        let cands = [c("a", 4096), c("b", 2048), c("c", 8192)];
        assert_eq!(best(&cands, shape).map(|c| c.id), Some("b".into()));
        assert!(best(&[c("full", 7000)], shape).is_none());
        let busy = store::PlacementCandidate {
            used_cpu: 8,
            ..c("cpu", 0)
        };
        assert!(!fits(&busy, shape));
    }
}
