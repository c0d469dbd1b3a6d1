//! VM lifecycle: the status machine of [`crate::routes::vms`] applied to the
//! store and the worker, independent of HTTP.
//!
//! The store is the source of truth for API statuses. Every change is a
//! read-modify-write guarded by the row's version ([`AppState::modify`]), so
//! two requests racing on one VM cannot both win: the loser re-reads and is
//! judged against the new status (409 when it no longer applies).
//!
//! A transition that needs the worker first moves the row to the
//! transitional status (`pausing`, `resuming`, `deleting`), which no other
//! transition accepts, then calls the worker, then settles the row: to the
//! target status on success, or to what the worker reports on failure.
//!
//! `running` and `paused` rows are reconciled with the worker's view of the
//! process whenever they are read: a VM whose QEMU died is `stopped`, one
//! whose QEMU stopped answering is `error` with a `statusMessage`.
//!
//! Pause, resume, delete (and the TTL reaper's) run in a task of their own
//! ([`AppState::detached`]): axum drops a handler's future when its client
//! disconnects, and a transition cut in half would leave the row in
//! `pausing`/`deleting` or the VM half-changed. The handler only awaits it.
//!
//! Firewall and service changes ([`AppState::change_policy`]) are stored and
//! then pushed to the worker before the API answers, one change per VM at a
//! time. If the worker cannot enforce the result, the change is rolled back
//! and the answer is 503 `FIREWALL_NOT_ENFORCED`: a stored policy never
//! claims something the worker refused. A reconciler
//! ([`spawn_firewall_reconciler`], and once at start) compares, for every
//! running or paused VM, the stored effective policy with the one the worker
//! reports enforcing, and pushes the stored one where they differ (after a
//! worker restart, a push that failed half-way, or a roll-back that could not
//! be written).

use crate::auth::Caller;
use crate::error::{codes, ApiError};
use crate::fleet::Affinity;
use crate::quotas::VmShape;
use crate::store::{now_ms, VmRecord};
use crate::worker::{ExecEvents, VmSpec, WorkerError};
use crate::worker::{ExecRequest, MachineType, VmState};
use crate::AppState;
use axum::http::StatusCode;
use fastvm_types::exec::ExecVmRequest;
use fastvm_types::service::Service;
use fastvm_types::snapshot::SnapshotStatus;
use fastvm_types::vm::normalize_vm_name;
use fastvm_types::{
    FirewallPolicy, LaunchVmRequest, OrgId, Patch, TtlAction, UpdateVmRequest, VmId, VmStatus,
};
use std::time::Duration;

/// How often a read-modify-write is retried when the row keeps changing.
const MAX_ATTEMPTS: usize = 16;

/// How often the firewall reconciler compares stored and enforced policies
/// (an in-process comparison per running VM; a push only where they differ).
const FIREWALL_RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// The periodic firewall reconciler (see the module docs); stops when dropped.
pub(crate) struct FirewallReconciler(tokio::task::JoinHandle<()>);

impl Drop for FirewallReconciler {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Start the periodic firewall reconciler of `state` (the start-up round is
/// part of [`AppState::reconcile_on_start`]).
pub(crate) fn spawn_firewall_reconciler(state: &AppState) -> FirewallReconciler {
    let state = state.clone();
    FirewallReconciler(tokio::spawn(async move {
        let mut tick = tokio::time::interval(FIREWALL_RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is immediate; the start-up round already ran.
        tick.tick().await;
        loop {
            tick.tick().await;
            state.reconcile_firewalls().await;
        }
    }))
}

fn no_such_vm(id: VmId) -> ApiError {
    ApiError::not_found(format!("no VM with id {id}"))
}

/// The API status matching a worker's view of a process (`None`: the worker
/// does not know the VM), and why when it is a failure.
pub(crate) fn observed(state: Option<VmState>) -> (VmStatus, Option<String>) {
    match state {
        Some(VmState::Running) => (VmStatus::Running, None),
        Some(VmState::Paused) => (VmStatus::Paused, None),
        Some(VmState::Stopped) => (VmStatus::Stopped, Some("the VM process exited".into())),
        Some(VmState::Error(m)) => (VmStatus::Error, Some(m)),
        None => (
            VmStatus::Stopped,
            Some("the worker no longer knows this VM".into()),
        ),
    }
}

/// What a worker boots to restore VM `rec` from `snapshot` with the same id
/// (a move between workers, see crate::fleet): its shape, hostname, the
/// snapshot's env and its effective firewall.
pub(crate) fn move_spec(
    rec: &VmRecord,
    snapshot: fastvm_types::SnapshotId,
) -> Result<VmSpec, ApiError> {
    let machine = MachineType::lookup(&rec.machine_name).map_err(|e| {
        ApiError::internal(format!("VM {} has an unknown machine type: {e}", rec.id))
    })?;
    Ok(VmSpec {
        id: rec.id,
        machine,
        hostname: format!("vm-{}", rec.id.short()),
        env: Default::default(),
        snapshot: Some(snapshot),
        firewall: rec.effective_firewall(),
    })
}

/// Move `r` to `to`, keeping the TTL bookkeeping of the spec: while running
/// `expiresAtMs` is the deadline; while paused the remaining budget is frozen
/// in `ttlRemainingMs`.
pub(crate) fn set_status(r: &mut VmRecord, to: VmStatus, now: i64) {
    let cycle = r.ttl.map(|t| i64::try_from(t.millis()).unwrap_or(i64::MAX));
    match to {
        VmStatus::Running => {
            r.paused_at_ms = None;
            if let Some(cycle) = cycle {
                let deadline = match r.ttl_remaining_ms.take() {
                    Some(rem) => now.saturating_add(rem),
                    None => r.expires_at_ms.unwrap_or_else(|| now.saturating_add(cycle)),
                };
                r.expires_at_ms = Some(deadline);
            }
        }
        VmStatus::Paused => {
            r.paused_at_ms = Some(now);
            if let Some(cycle) = cycle {
                let remaining = r
                    .expires_at_ms
                    .map(|e| e.saturating_sub(now).max(0))
                    .or(r.ttl_remaining_ms)
                    .unwrap_or(cycle);
                r.ttl_remaining_ms = Some(remaining);
                r.expires_at_ms = None;
            }
        }
        _ => {}
    }
    r.status = to;
}

/// Restart the TTL cycle of `r` (a new TTL was set).
fn restart_ttl(r: &mut VmRecord, now: i64) {
    r.expires_at_ms = None;
    r.ttl_remaining_ms = None;
    let Some(cycle) = r.ttl.map(|t| i64::try_from(t.millis()).unwrap_or(i64::MAX)) else {
        return;
    };
    match r.status {
        VmStatus::Running | VmStatus::Pausing => r.expires_at_ms = Some(now.saturating_add(cycle)),
        VmStatus::Paused | VmStatus::Resuming => r.ttl_remaining_ms = Some(cycle),
        _ => {}
    }
}

/// Ok when `r` is running with a TTL of `action` whose deadline is at or before `now`.
fn ttl_due(r: &VmRecord, action: TtlAction, now: i64) -> Result<(), ApiError> {
    let due = r.status == VmStatus::Running
        && r.ttl.is_some_and(|t| t.action == action)
        && r.expires_at_ms.is_some_and(|e| e <= now);
    if due {
        Ok(())
    } else {
        Err(ApiError::invalid_state(format!(
            "VM {} is no longer due for its TTL {action:?}",
            r.id
        )))
    }
}

/// A transition through a transitional status, done by the worker.
#[derive(Clone, Copy)]
struct Transition {
    action: &'static str,
    from: VmStatus,
    via: VmStatus,
    to: VmStatus,
}

const PAUSE: Transition = Transition {
    action: "pause",
    from: VmStatus::Running,
    via: VmStatus::Pausing,
    to: VmStatus::Paused,
};
const RESUME: Transition = Transition {
    action: "resume",
    from: VmStatus::Paused,
    via: VmStatus::Resuming,
    to: VmStatus::Running,
};

impl AppState {
    /// Read-modify-write the live VM `id` (of `org` when given) until the
    /// write lands on an unchanged row. `f` may refuse with an error.
    pub(crate) async fn modify<F>(
        &self,
        org: Option<OrgId>,
        id: VmId,
        mut f: F,
    ) -> Result<VmRecord, ApiError>
    where
        F: FnMut(&mut VmRecord) -> Result<(), ApiError>,
    {
        for _ in 0..MAX_ATTEMPTS {
            let found = match org {
                Some(org) => self.store().get_vm(org, id).await?,
                None => self
                    .store()
                    .get_vm_unscoped(id)
                    .await?
                    .filter(|r| r.deleted_at_ms.is_none()),
            };
            let mut rec = found.ok_or_else(|| no_such_vm(id))?;
            f(&mut rec)?;
            if self.store().update_vm(&mut rec).await? {
                if rec.expires_at_ms.is_some() {
                    self.ttl_changed();
                }
                return Ok(rec);
            }
        }
        Err(ApiError::new(
            StatusCode::CONFLICT,
            codes::INVALID_STATE,
            format!("VM {id} is changing too often; retry"),
        ))
    }

    /// `rec` with its status brought in line with the worker (running and paused rows only).
    pub(crate) async fn reconciled(&self, rec: VmRecord) -> Result<VmRecord, ApiError> {
        if !matches!(rec.status, VmStatus::Running | VmStatus::Paused) {
            return Ok(rec);
        }
        let reported = match self.worker_for(&rec.worker_id).await {
            Ok(worker) => worker.state(rec.id).await,
            Err(e) => Err(e),
        };
        self.reconciled_with(rec, reported).await
    }

    /// [`Self::reconciled`] with what the worker `reported` about the VM
    /// (already asked, e.g. once for a whole list).
    pub(crate) async fn reconciled_with(
        &self,
        rec: VmRecord,
        reported: Result<Option<VmState>, WorkerError>,
    ) -> Result<VmRecord, ApiError> {
        if !matches!(rec.status, VmStatus::Running | VmStatus::Paused) {
            return Ok(rec);
        }
        let state = match reported {
            Ok(state) => state,
            Err(e) => {
                // The worker cannot say: keep what the store knows.
                tracing::warn!(vm = %rec.id, error = %e, "the VM's worker did not report its state");
                return Ok(rec);
            }
        };
        let (status, message) = observed(state);
        if status == rec.status {
            return Ok(rec);
        }
        tracing::info!(vm = %rec.id, from = rec.status.as_str(), to = status.as_str(), reason = message.as_deref().unwrap_or(""), "VM status reconciled with its worker");
        let mut new = rec.clone();
        set_status(&mut new, status, now_ms());
        new.status_message = message;
        if self.store().update_vm(&mut new).await? {
            if new.expires_at_ms.is_some() {
                self.ttl_changed();
            }
            return Ok(new);
        }
        // Someone else changed it meanwhile: theirs is newer.
        self.store()
            .get_vm(rec.org_id, rec.id)
            .await?
            .ok_or_else(|| no_such_vm(rec.id))
    }

    /// The live VM `id` of `org`, reconciled.
    pub(crate) async fn find_vm(&self, org: OrgId, id: VmId) -> Result<VmRecord, ApiError> {
        let rec = self
            .store()
            .get_vm(org, id)
            .await?
            .ok_or_else(|| no_such_vm(id))?;
        self.reconciled(rec).await
    }

    /// `POST /v1/vms`: store the VM as `provisioning`, boot (or restore) it
    /// in the background, and wait up to `launch_wait` for it to run.
    /// Returns the VM as it is when the wait ends.
    ///
    /// With `snapshotId` the VM is a restore of that snapshot (of the
    /// caller's org, `ready`): its shape and `sourceName` come from the
    /// snapshot, its env vars too unless the request gives some, its
    /// firewall unless the request gives one; name, metadata and TTL come
    /// from the request. `machineType` may be given but must be the
    /// snapshot's (400 `MACHINE_TYPE_MISMATCH`).
    pub(crate) async fn launch_vm(
        &self,
        caller: Caller,
        req: LaunchVmRequest,
    ) -> Result<VmRecord, ApiError> {
        req.validate()?;
        let requested = match req
            .machine_type
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
        {
            Some(name) => Some(MachineType::lookup(name).map_err(|e| {
                ApiError::invalid(fastvm_types::codes::INVALID_MACHINE_TYPE, e.to_string())
            })?),
            None => None,
        };
        let id = VmId::new_v4();
        let mut rec = VmRecord {
            id,
            org_id: caller.org_id,
            // Embedded: the one worker; cluster: set by placement.
            worker_id: self
                .fleet()
                .local()
                .map(|w| w.id().to_owned())
                .unwrap_or_default(),
            name: normalize_vm_name(req.name.as_deref(), &id),
            machine_name: String::new(),
            source_name: String::new(),
            cpu: 0,
            memory_mib: 0,
            disk_gib: 0,
            status: VmStatus::Provisioning,
            status_message: None,
            firewall: req.firewall.clone().unwrap_or_default(),
            metadata: req.metadata.clone().unwrap_or_default(),
            env_vars: req.env_vars.clone().unwrap_or_default(),
            ttl: req.ttl,
            expires_at_ms: None,
            ttl_remaining_ms: None,
            created_at_ms: now_ms(),
            paused_at_ms: None,
            deleted_at_ms: None,
            version: 0,
            public_ipv6: None,
            services: vec![],
        };
        // A restore keeps the snapshot in use until its VM runs (see crate::snapshots).
        let mut in_use = None;
        let mut affinity = Affinity::Any;
        let machine = match req.snapshot_id {
            None => {
                let machine = requested.ok_or_else(|| {
                    ApiError::invalid(
                        fastvm_types::codes::INVALID_MACHINE_TYPE,
                        "machineType is required unless snapshotId is set",
                    )
                })?;
                rec.machine_name = machine.name.to_owned();
                rec.cpu = machine.vcpus;
                rec.memory_mib = u64::from(machine.memory_mib);
                rec.disk_gib = u64::from(machine.disk_gib);
                machine
            }
            Some(sid) => {
                in_use = Some(self.snapshot_use().clone().read_owned().await);
                let snap = self.find_snapshot(caller.org_id, sid).await?;
                if snap.status != SnapshotStatus::Ready {
                    let status = crate::store::snapshot_status_str(snap.status);
                    return Err(ApiError::invalid_state(format!(
                        "snapshot {sid} is {status}; only a ready snapshot can be restored"
                    )));
                }
                affinity = match (&snap.compat_key, snap.stored) {
                    (Some(key), true) => Affinity::Compatible(key.clone()),
                    _ => Affinity::Only(snap.worker_id.clone()),
                };
                if !self.fleet().is_cluster() && snap.worker_id != rec.worker_id {
                    return Err(ApiError::invalid_state(format!(
                        "snapshot {sid} lives on worker {:?}, which this server does not drive",
                        snap.worker_id
                    )));
                }
                let machine = MachineType::lookup(&snap.machine_name).map_err(|e| {
                    ApiError::internal(format!("snapshot {sid} has an unknown machine type: {e}"))
                })?;
                if let Some(m) = requested.filter(|m| m.name != machine.name) {
                    return Err(ApiError::invalid(
                        codes::MACHINE_TYPE_MISMATCH,
                        format!("snapshot {sid} was captured on machine type {}; it cannot be restored as {} (omit machineType)", machine.name, m.name),
                    ));
                }
                rec.machine_name = snap.machine_name.clone();
                rec.source_name = snap.name.clone();
                rec.cpu = snap.cpu;
                rec.memory_mib = snap.memory_mib;
                rec.disk_gib = snap.disk_gib;
                if req.firewall.is_none() {
                    rec.firewall = snap.firewall.clone();
                }
                // The restored VM serves what the source VM served.
                rec.services = snap
                    .services
                    .iter()
                    .map(|s| Service {
                        name: s.name.clone(),
                        port: s.port,
                        h2c: s.h2c,
                        url: None,
                    })
                    .collect();
                // No env vars (or an empty map) keep the snapshot's: the
                // worker restores those when given none.
                if rec.env_vars.is_empty() {
                    rec.env_vars = snap.env_vars.clone();
                }
                machine
            }
        };
        {
            // Check and reserve (the provisioning row) atomically per org.
            let lock = self.quota_lock(caller.org_id);
            let _held = lock.lock().await;
            let shape = VmShape {
                cpu: u64::from(rec.cpu),
                memory_mib: rec.memory_mib,
                disk_gib: rec.disk_gib,
            };
            if self.fleet().is_cluster() {
                // Quota, worker choice and insert in one transaction (crate::fleet).
                self.fleet()
                    .place(&mut rec, &affinity, "launching this VM")
                    .await?;
            } else {
                self.check_vm_quota(caller.org_id, "launching this VM", shape)
                    .await?;
                self.store().insert_vm(&rec).await?;
            }
        }
        match req.snapshot_id {
            Some(sid) => {
                tracing::info!(vm = %id, org = %caller.org_id, snapshot = %sid, machine = machine.name, "restoring VM from snapshot")
            }
            None => {
                tracing::info!(vm = %id, org = %caller.org_id, machine = machine.name, "launching VM")
            }
        }
        let spec = VmSpec {
            id,
            machine,
            hostname: format!("vm-{}", id.short()),
            env: rec.env_vars.clone(),
            snapshot: req.snapshot_id,
            firewall: rec.effective_firewall(),
        };
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let state = self.clone();
        let worker_id = rec.worker_id.clone();
        tokio::spawn(async move {
            state.provision(spec, &worker_id).await;
            drop(in_use);
            let _ = done_tx.send(());
        });
        // The boot goes on in the background if the wait ends first.
        let _ = tokio::time::timeout(self.launch_wait(), done_rx).await;
        Ok(self.store().get_vm(caller.org_id, id).await?.unwrap_or(rec))
    }

    /// Boot the VM of `spec` and settle its row: running, or error.
    pub(crate) async fn provision(&self, spec: VmSpec, worker_id: &str) {
        let id = spec.id;
        let started = std::time::Instant::now();
        let launched_with = spec.firewall.clone();
        let from_snapshot = spec.snapshot.is_some();
        let snapshot = spec.snapshot;
        let worker = self.worker_for(worker_id).await;
        let result = match &worker {
            Ok(w) => w.create(spec).await,
            Err(e) => Err(e.clone()),
        };
        self.metrics().launch_finished(
            from_snapshot,
            result.is_ok(),
            started.elapsed().as_secs_f64(),
        );
        if let (Ok(()), Ok(worker)) = (&result, &worker) {
            let ipv6 = worker.public_ipv6(id).await.unwrap_or_else(|e| {
                tracing::warn!(vm = %id, error = %e, "the worker did not report the VM's public IPv6");
                None
            });
            if let Err(e) = self.store().set_vm_public_ipv6(id, ipv6.as_deref()).await {
                tracing::warn!(vm = %id, error = %e, "recording the VM's public IPv6 failed");
            }
        }
        let settle = match &result {
            Ok(()) => {
                tracing::info!(vm = %id, elapsed_ms = started.elapsed().as_millis() as u64, "VM running");
                self.modify(None, id, |r| {
                    if r.status != VmStatus::Provisioning {
                        return Err(ApiError::invalid_state(format!(
                            "VM {id} is {}",
                            r.status.as_str()
                        )));
                    }
                    set_status(r, VmStatus::Running, now_ms());
                    Ok(())
                })
                .await
            }
            Err(e) => {
                tracing::warn!(vm = %id, error = %e, "VM failed to start");
                let message = format!("the VM failed to start: {e}");
                self.modify(None, id, |r| {
                    if r.status != VmStatus::Provisioning {
                        return Err(ApiError::invalid_state(format!(
                            "VM {id} is {}",
                            r.status.as_str()
                        )));
                    }
                    r.status = VmStatus::Error;
                    r.status_message = Some(message.clone());
                    Ok(())
                })
                .await
            }
        };
        // The snapshot's volumes are attached again (or say why not).
        if let (Ok(rec), Some(sid)) = (&settle, snapshot) {
            self.reattach_snapshot_volumes(rec.org_id, id, sid).await;
            self.restore_snapshot_bucket_mounts(rec.org_id, id, sid)
                .await;
        }
        // A firewall set while the VM booted is pushed now.
        if let (Ok(rec), Ok(worker)) = (&settle, &worker) {
            if rec.effective_firewall() != launched_with {
                if let Err(e) = worker.set_firewall(id, &rec.effective_firewall()).await {
                    tracing::warn!(vm = %id, error = %e, "applying the firewall set during boot failed");
                }
            }
        }
        if let (Err(e), Ok(worker)) = (settle, &worker) {
            // Deleted (or being deleted) while it booted: make sure it is gone.
            tracing::info!(vm = %id, reason = %e.message, "VM left provisioning meanwhile; removing it from its worker");
            if let Err(e) = worker.delete(id).await {
                tracing::warn!(vm = %id, error = %e, "cleanup of a VM deleted during boot failed");
            }
        }
    }

    /// `PUT /v1/vms/{id}/firewall` (`patch` false: replace) and `PATCH`
    /// (`patch` true: the blocks given replace the stored ones). The result is
    /// validated (400 with the rule's code), stored, and enforced by the
    /// worker of a running or paused VM before the answer
    /// ([`Self::change_policy`]).
    pub(crate) async fn set_firewall(
        &self,
        org: OrgId,
        id: VmId,
        policy: FirewallPolicy,
        patch: bool,
    ) -> Result<VmRecord, ApiError> {
        self.find_vm(org, id).await?;
        self.change_policy(org, id, |r| {
            if r.status == VmStatus::Deleting {
                return Err(ApiError::invalid_state(format!("VM {id} is being deleted")));
            }
            let new = if patch {
                r.firewall.merge_patch(policy.clone())
            } else {
                policy.clone()
            };
            new.validate()
                .map_err(|e| ApiError::invalid(e.code, e.message))?;
            r.firewall = new;
            Ok(())
        })
        .await
    }

    /// The mutex serialising policy changes (firewall, services) of VM `id`
    /// with their push, and with the reconciler.
    fn policy_lock(&self, id: VmId) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut map = self
            .inner
            .policy_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        map.entry(id).or_default().clone()
    }

    fn forget_policy_lock(&self, id: VmId) {
        if let Ok(mut map) = self.inner.policy_locks.lock() {
            map.remove(&id);
        }
    }

    /// Change what decides VM `id`'s effective firewall (its `firewall` or
    /// `services`; `change` runs in the compare-and-set and may refuse), then
    /// have the worker of a running or paused VM enforce the result before
    /// answering. One change per VM at a time (its policy lock). If the
    /// worker cannot enforce it, the change is rolled back and the answer is
    /// 503 `FIREWALL_NOT_ENFORCED`; should the roll-back itself fail, the
    /// answer says the stored policy is pending and the reconciler enforces it.
    pub(crate) async fn change_policy<F>(
        &self,
        org: OrgId,
        id: VmId,
        mut change: F,
    ) -> Result<VmRecord, ApiError>
    where
        F: FnMut(&mut VmRecord) -> Result<(), ApiError>,
    {
        let lock = self.policy_lock(id);
        let _held = lock.lock().await;
        let mut before = None;
        let rec = self
            .modify(Some(org), id, |r| {
                before = Some((r.firewall.clone(), r.services.clone()));
                change(r)
            })
            .await?;
        if !matches!(rec.status, VmStatus::Running | VmStatus::Paused) {
            // A booting VM gets it when it runs (see `provision`).
            return Ok(rec);
        }
        let pushed = match self.worker_for(&rec.worker_id).await {
            Ok(worker) => worker.set_firewall(id, &rec.effective_firewall()).await,
            Err(e) => Err(e),
        };
        let Err(e) = pushed else {
            return Ok(rec);
        };
        tracing::warn!(vm = %id, error = %e, "the worker could not enforce a firewall change; rolling it back");
        let Some((firewall, services)) = before else {
            return Err(ApiError::internal("policy change without a previous row"));
        };
        let undone = self
            .modify(Some(org), id, |r| {
                r.firewall = firewall.clone();
                r.services = services.clone();
                Ok(())
            })
            .await;
        let message = match undone {
            Ok(_) => format!(
                "the VM's worker could not enforce the new firewall ({e}); nothing was changed and the previous policy stays in force"
            ),
            Err(undo) => format!(
                "the VM's worker could not enforce the new firewall ({e}) and the change could not be rolled back ({}); the stored policy is pending and will be enforced by the reconciler",
                undo.message
            ),
        };
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            codes::FIREWALL_NOT_ENFORCED,
            message,
        ))
    }

    /// Push the stored effective firewall of every running or paused VM of
    /// this server's workers (every reachable one in cluster mode) whose
    /// enforced policy (as the worker reports it) differs. Cheap when nothing
    /// differs: one lookup per VM.
    pub(crate) async fn reconcile_firewalls(&self) {
        for worker in self.fleet().reachable().await {
            self.reconcile_firewalls_of(worker).await;
        }
    }

    async fn reconcile_firewalls_of(&self, worker: std::sync::Arc<dyn crate::worker::Worker>) {
        let recs = match self.store().list_live_vms_on(worker.id()).await {
            Ok(recs) => recs,
            Err(e) => {
                tracing::warn!(error = %e, "firewall reconciler: listing VMs failed");
                return;
            }
        };
        for rec in recs {
            if !matches!(rec.status, VmStatus::Running | VmStatus::Paused) {
                continue;
            }
            let id = rec.id;
            let lock = self.policy_lock(id);
            let _held = lock.lock().await;
            // Re-read under the lock: a change may have landed meanwhile.
            let rec = match self.store().get_vm_unscoped(id).await {
                Ok(Some(r))
                    if r.deleted_at_ms.is_none()
                        && r.worker_id == worker.id()
                        && matches!(r.status, VmStatus::Running | VmStatus::Paused) =>
                {
                    r
                }
                _ => continue,
            };
            let want = rec.effective_firewall();
            match worker.enforced_firewall(id).await {
                Ok(Some(have)) if have == want => continue,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(vm = %id, error = %e, "firewall reconciler: enforced policy unknown");
                    continue;
                }
            }
            match worker.set_firewall(id, &want).await {
                Ok(()) => tracing::info!(vm = %id, "firewall reconciler: stored policy enforced"),
                Err(e) => {
                    tracing::warn!(vm = %id, error = %e, "firewall reconciler: enforcing the stored policy failed")
                }
            }
        }
    }

    /// `PATCH /v1/vms/{id}`.
    pub(crate) async fn update_vm(
        &self,
        org: OrgId,
        id: VmId,
        req: UpdateVmRequest,
    ) -> Result<VmRecord, ApiError> {
        req.validate()?;
        let rec = self
            .modify(Some(org), id, |r| {
                if let Some(name) = &req.name {
                    r.name = normalize_vm_name(Some(name), &id);
                }
                if let Some(m) = &req.metadata {
                    r.metadata = m.clone();
                }
                match &req.ttl {
                    Patch::Absent => {}
                    Patch::Null => {
                        r.ttl = None;
                        r.expires_at_ms = None;
                        r.ttl_remaining_ms = None;
                    }
                    Patch::Value(t) => {
                        r.ttl = Some(*t);
                        restart_ttl(r, now_ms());
                    }
                }
                Ok(())
            })
            .await?;
        self.reconciled(rec).await
    }

    /// Move a VM from `t.from` to the transitional `t.via`, run `op` on the
    /// worker, then settle in `t.to` (or in what the worker reports, on failure).
    async fn transition<Fut>(
        &self,
        org: OrgId,
        id: VmId,
        t: Transition,
        op: Fut,
    ) -> Result<VmRecord, ApiError>
    where
        Fut: std::future::Future<Output = Result<(), WorkerError>>,
    {
        self.transition_if(org, id, t, op, |_| Ok(()), None).await
    }

    /// [`Self::transition`], entered only when `guard` accepts the row
    /// (checked, and allowed to adjust it, in the same compare-and-set that
    /// moves it to `t.via`).
    async fn transition_if<Fut, G>(
        &self,
        org: OrgId,
        id: VmId,
        t: Transition,
        op: Fut,
        mut guard: G,
        held: Option<tokio::sync::OwnedMutexGuard<()>>,
    ) -> Result<VmRecord, ApiError>
    where
        Fut: std::future::Future<Output = Result<(), WorkerError>>,
        G: FnMut(&mut VmRecord) -> Result<(), ApiError>,
    {
        let Transition {
            action,
            from,
            via,
            to,
        } = t;
        self.find_vm(org, id).await?;
        self.modify(Some(org), id, |r| {
            if r.status != from {
                return Err(ApiError::invalid_state(format!(
                    "VM {id} is {}; {action} needs it {}",
                    r.status.as_str(),
                    from.as_str()
                )));
            }
            guard(r)?;
            r.status = via;
            Ok(())
        })
        .await?;
        // What `held` protected (a quota check) is settled by the row now
        // in `via`: the worker's part runs without it.
        drop(held);
        let result = op.await;
        let (target, message) = match &result {
            Ok(()) => (to, None),
            Err(e) => {
                tracing::warn!(vm = %id, action, error = %e, "VM transition failed");
                let reported = match self.worker_of(id).await {
                    Ok(worker) => worker.state(id).await,
                    Err(e) => Err(e),
                };
                match reported {
                    Ok(state) => observed(state),
                    // Unknown: back where it was, with the reason.
                    Err(report) => (
                        from,
                        Some(format!(
                            "{action} failed ({e}); the worker's state is unknown: {report}"
                        )),
                    ),
                }
            }
        };
        let rec = self
            .modify(Some(org), id, |r| {
                if r.status == via {
                    set_status(r, target, now_ms());
                    if message.is_some() {
                        r.status_message = message.clone();
                    }
                }
                Ok(())
            })
            .await?;
        result?;
        Ok(rec)
    }

    /// Run `f` on a clone of the state in a task of its own and wait for it.
    /// A handler's future is dropped when its client disconnects; the task
    /// is not, so the operation always runs to completion.
    pub(crate) async fn detached<T, F, Fut>(&self, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(AppState) -> Fut,
        Fut: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
        T: Send + 'static,
    {
        tokio::spawn(f(self.clone()))
            .await
            .map_err(|e| ApiError::internal(format!("the operation's task failed: {e}")))?
    }

    /// `POST /v1/vms/{id}/pause`: running -> pausing -> paused (to
    /// completion even if the client goes away).
    pub(crate) async fn pause_vm(&self, org: OrgId, id: VmId) -> Result<VmRecord, ApiError> {
        self.detached(move |s| async move {
            let worker = s.worker_of(id).await?;
            s.transition(org, id, PAUSE, worker.pause(id)).await
        })
        .await
    }

    /// `POST /v1/vms/{id}/resume`: paused -> resuming -> running; 429 when
    /// the org is over a VM limit (only after the limits were lowered:
    /// paused VMs already count).
    pub(crate) async fn resume_vm(&self, org: OrgId, id: VmId) -> Result<VmRecord, ApiError> {
        self.detached(move |s| async move {
            // Held until the row is `resuming` (then it counts), not while
            // the worker resumes: a wedged VM must not block its org.
            let held = s.quota_lock(org).lock_owned().await;
            let rec = s.find_vm(org, id).await?;
            if rec.status == VmStatus::Paused {
                s.check_resume_quota(
                    org,
                    VmShape {
                        cpu: u64::from(rec.cpu),
                        memory_mib: rec.memory_mib,
                        disk_gib: rec.disk_gib,
                    },
                )
                .await?;
            }
            let worker = s.worker_for(&rec.worker_id).await?;
            s.transition_if(org, id, RESUME, worker.resume(id), |_| Ok(()), Some(held))
                .await
        })
        .await
    }

    /// The TTL reaper's pause: like [`Self::pause_vm`], only if the VM is
    /// still running, still due and its action still `pause`. The cycle
    /// ends: the paused VM keeps a full TTL for its next resume.
    pub(crate) async fn ttl_pause(&self, org: OrgId, id: VmId) -> Result<VmRecord, ApiError> {
        self.detached(move |s| async move {
            let guard = |r: &mut VmRecord| {
                let now = now_ms();
                ttl_due(r, TtlAction::Pause, now)?;
                // Pre-freeze a full cycle: set_status keeps it when the VM
                // settles paused, and turns it into a fresh deadline should the
                // pause fail and the VM settle running.
                r.expires_at_ms = None;
                r.ttl_remaining_ms = r.ttl.map(|t| i64::try_from(t.millis()).unwrap_or(i64::MAX));
                Ok(())
            };
            let worker = s.worker_of(id).await?;
            s.transition_if(org, id, PAUSE, worker.pause(id), guard, None)
                .await
        })
        .await
    }

    /// The TTL reaper's delete: the DELETE path, only if the VM is still
    /// running, still due and its action still `delete`.
    pub(crate) async fn ttl_delete(&self, org: OrgId, id: VmId) -> Result<(), ApiError> {
        self.detached(move |s| async move {
            s.delete_vm_if(org, id, |r| ttl_due(r, TtlAction::Delete, now_ms()))
                .await
        })
        .await
    }

    /// `POST /v1/vms/{id}/ttl/refresh`: start a new full cycle (running:
    /// `expiresAtMs` = now + seconds; paused: `ttlRemainingMs` = seconds).
    /// 409 `TTL_NOT_SET` without a TTL, 409 `INVALID_STATE` unless running or paused.
    pub(crate) async fn refresh_ttl(&self, org: OrgId, id: VmId) -> Result<VmRecord, ApiError> {
        self.find_vm(org, id).await?;
        let rec = self
            .modify(Some(org), id, |r| {
                if r.ttl.is_none() {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        codes::TTL_NOT_SET,
                        format!("VM {id} has no TTL to refresh; set one with PATCH /v1/vms/{id}"),
                    ));
                }
                if !matches!(r.status, VmStatus::Running | VmStatus::Paused) {
                    return Err(ApiError::invalid_state(format!(
                        "VM {id} is {}; a TTL refresh needs it running or paused",
                        r.status.as_str()
                    )));
                }
                restart_ttl(r, now_ms());
                Ok(())
            })
            .await?;
        tracing::info!(vm = %id, expires_at_ms = ?rec.expires_at_ms, ttl_remaining_ms = ?rec.ttl_remaining_ms, "TTL refreshed");
        Ok(rec)
    }

    /// `DELETE /v1/vms/{id}`: any status but deleting -> deleting -> gone
    /// (`deleted_at_ms` set); the VM process is killed and its files removed.
    pub(crate) async fn delete_vm(&self, org: OrgId, id: VmId) -> Result<(), ApiError> {
        self.detached(move |s| async move { s.delete_vm_if(org, id, |_| Ok(())).await })
            .await
    }

    /// [`Self::delete_vm`], only when `guard` accepts the row.
    async fn delete_vm_if<G>(&self, org: OrgId, id: VmId, guard: G) -> Result<(), ApiError>
    where
        G: Fn(&VmRecord) -> Result<(), ApiError>,
    {
        self.modify(Some(org), id, |r| {
            if r.status == VmStatus::Deleting {
                return Err(ApiError::invalid_state(format!(
                    "VM {id} is already being deleted"
                )));
            }
            guard(r)?;
            r.status = VmStatus::Deleting;
            Ok(())
        })
        .await?;
        tracing::info!(vm = %id, "deleting VM");
        let deleted = match self.worker_of(id).await {
            Ok(worker) => worker.delete(id).await,
            Err(e) => Err(e),
        };
        let deleted = match deleted {
            // Cluster: a VM of a lost worker is deleted in the store now; the
            // worker deletes it when it registers again (fencing, crate::fleet).
            Err(WorkerError::Unreachable(m)) if self.fleet().is_cluster() => {
                tracing::warn!(vm = %id, reason = %m, "deleting a VM of an unreachable worker; it is removed there when the worker returns");
                Ok(())
            }
            other => other,
        };
        match deleted {
            Ok(()) => {
                self.modify(Some(org), id, |r| {
                    r.deleted_at_ms = Some(now_ms());
                    Ok(())
                })
                .await?;
                self.forget_policy_lock(id);
                // Its volumes stay; only the attachments go with the VM.
                self.store().delete_attachments_of_vm(id).await?;
                self.store().delete_bucket_mounts_of_vm(id).await?;
                Ok(())
            }
            Err(e) => {
                let message = format!("delete failed: {e}");
                self.modify(Some(org), id, |r| {
                    r.status = VmStatus::Error;
                    r.status_message = Some(message.clone());
                    Ok(())
                })
                .await?;
                Err(e.into())
            }
        }
    }

    /// `POST /v1/vms/{id}/exec`: start `req` in the running VM.
    pub(crate) async fn start_exec(
        &self,
        org: OrgId,
        id: VmId,
        req: &ExecVmRequest,
    ) -> Result<ExecEvents, ApiError> {
        req.validate()?;
        let rec = self.find_vm(org, id).await?;
        if rec.status != VmStatus::Running {
            return Err(ApiError::invalid_state(format!(
                "VM {id} is {}; exec needs it running",
                rec.status.as_str()
            )));
        }
        let wreq = ExecRequest {
            argv: req.command.clone(),
            env: req.env.clone().unwrap_or_default(),
            cwd: req.cwd.clone(),
            timeout: req.timeout_sec.map(Duration::from_secs),
            stdin: false,
            pty: None,
        };
        let started = match self.worker_for(&rec.worker_id).await {
            Ok(worker) => worker.exec(id, wreq).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(events) => Ok(events),
            Err(e) => {
                if matches!(
                    e,
                    WorkerError::WrongState(_)
                        | WorkerError::NotFound(_)
                        | WorkerError::Unresponsive(_)
                ) {
                    // The process changed under us: record what the worker sees.
                    let _ = self.find_vm(org, id).await;
                }
                Err(e.into())
            }
        }
    }

    /// At startup: settle rows left in flight by the previous run and align
    /// every live row with what the worker re-adopted.
    pub(crate) async fn reconcile_all(&self) -> Result<(), ApiError> {
        if self.fleet().is_cluster() {
            // Each worker is reconciled when it registers; those already
            // registered are reconciled now.
            for worker in self.fleet().reachable().await {
                if let Err(e) = self.reconcile_worker(worker.id()).await {
                    tracing::warn!(worker = worker.id(), error = %e.message, "reconciling a worker at startup failed");
                }
            }
            self.reconcile_imports().await?;
            return self.reconcile_snapshots().await;
        }
        let Some(worker) = self.fleet().local().cloned() else {
            return Ok(());
        };
        for rec in self.store().list_live_vms_on(worker.id()).await? {
            let id = rec.id;
            match rec.status {
                VmStatus::Deleting => {
                    tracing::info!(vm = %id, "finishing a delete interrupted by the last shutdown");
                    if let Err(e) = self.delete_interrupted(rec).await {
                        tracing::warn!(vm = %id, error = %e, "could not finish the delete");
                    }
                }
                VmStatus::Stopped | VmStatus::Error => {}
                from => {
                    let (mut status, mut message) = match worker.state(id).await {
                        Ok(state) => observed(state),
                        Err(e) => {
                            tracing::warn!(vm = %id, error = %e, "the VM's worker did not report its state; left as stored");
                            continue;
                        }
                    };
                    if from == VmStatus::Provisioning && status != VmStatus::Running {
                        status = VmStatus::Error;
                        message = Some("the server stopped while the VM was provisioning".into());
                    }
                    if status != from {
                        tracing::info!(vm = %id, from = from.as_str(), to = status.as_str(), "VM status reconciled at startup");
                        self.modify(None, id, |r| {
                            if r.status == from {
                                set_status(r, status, now_ms());
                                r.status_message = message.clone();
                            }
                            Ok(())
                        })
                        .await?;
                    } else {
                        tracing::info!(vm = %id, status = status.as_str(), "VM re-adopted");
                    }
                }
            }
        }
        // VMs the worker still runs although their row is deleted.
        for (vm_id, _) in worker.list().await? {
            let id = vm_id;
            match self.store().get_vm_unscoped(vm_id).await? {
                Some(r) if r.deleted_at_ms.is_some() => {
                    tracing::info!(vm = %id, "removing a VM whose row is deleted");
                    if let Err(e) = worker.delete(vm_id).await {
                        tracing::warn!(vm = %id, error = %e, "could not remove it");
                    }
                }
                Some(_) => {}
                None => {
                    tracing::warn!(vm = %id, "the worker runs a VM the store does not know; leaving it alone")
                }
            }
        }
        self.reconcile_imports().await?;
        self.reconcile_snapshots().await
    }

    async fn delete_interrupted(&self, rec: VmRecord) -> Result<(), ApiError> {
        self.worker_for(&rec.worker_id)
            .await?
            .delete(rec.id)
            .await?;
        self.modify(Some(rec.org_id), rec.id, |r| {
            r.deleted_at_ms = Some(now_ms());
            Ok(())
        })
        .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fastvm_types::{Ttl, TtlAction};

    fn rec(status: VmStatus, ttl: Option<u64>) -> VmRecord {
        VmRecord {
            id: VmId::new_v4(),
            org_id: OrgId::new_v4(),
            worker_id: "local".into(),
            name: "x".into(),
            machine_name: "c1m2".into(),
            source_name: String::new(),
            cpu: 1,
            memory_mib: 2048,
            disk_gib: 10,
            status,
            status_message: None,
            firewall: Default::default(),
            metadata: Default::default(),
            env_vars: Default::default(),
            ttl: ttl.map(|seconds| Ttl {
                seconds,
                action: TtlAction::Pause,
            }),
            expires_at_ms: None,
            ttl_remaining_ms: None,
            created_at_ms: 0,
            paused_at_ms: None,
            deleted_at_ms: None,
            version: 0,
            public_ipv6: None,
            services: vec![],
        }
    }

    #[test]
    fn ttl_freezes_while_paused() {
        let mut r = rec(VmStatus::Provisioning, Some(60));
        set_status(&mut r, VmStatus::Running, 1_000);
        assert_eq!(r.expires_at_ms, Some(61_000));
        set_status(&mut r, VmStatus::Paused, 11_000);
        assert_eq!(
            (r.expires_at_ms, r.ttl_remaining_ms, r.paused_at_ms),
            (None, Some(50_000), Some(11_000))
        );
        set_status(&mut r, VmStatus::Running, 100_000);
        assert_eq!(
            (r.expires_at_ms, r.ttl_remaining_ms, r.paused_at_ms),
            (Some(150_000), None, None)
        );
    }

    #[test]
    fn no_ttl_no_deadline() {
        let mut r = rec(VmStatus::Provisioning, None);
        set_status(&mut r, VmStatus::Running, 1_000);
        set_status(&mut r, VmStatus::Paused, 2_000);
        assert_eq!(
            (r.expires_at_ms, r.ttl_remaining_ms, r.paused_at_ms),
            (None, None, Some(2_000))
        );
    }

    #[test]
    fn new_ttl_restarts_the_cycle() {
        let mut r = rec(VmStatus::Running, Some(10));
        restart_ttl(&mut r, 5_000);
        assert_eq!(r.expires_at_ms, Some(15_000));
        let mut p = rec(VmStatus::Paused, Some(10));
        restart_ttl(&mut p, 5_000);
        assert_eq!((p.expires_at_ms, p.ttl_remaining_ms), (None, Some(10_000)));
    }

    #[test]
    fn worker_states_map_to_statuses() {
        assert_eq!(observed(Some(VmState::Running)).0, VmStatus::Running);
        assert_eq!(observed(Some(VmState::Paused)).0, VmStatus::Paused);
        assert_eq!(observed(Some(VmState::Stopped)).0, VmStatus::Stopped);
        assert_eq!(
            observed(Some(VmState::Error("x".into()))),
            (VmStatus::Error, Some("x".into()))
        );
        assert_eq!(observed(None).0, VmStatus::Stopped);
    }
}
