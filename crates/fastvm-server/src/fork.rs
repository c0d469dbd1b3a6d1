//! Fork (extension): `POST /v1/vms/{id}/fork {"count": N}` clones a running
//! (or paused) VM into N running copies in one call.
//!
//! ```text
//!  source (running|paused)
//!     │ 1. quota for N VMs of its shape, N rows `provisioning` (one transaction
//!     │    per row in cluster mode, all pinned to the source's worker)
//!     │ 2. worker: capture the source into a hidden snapshot (the source
//!     │    keeps running; its RAM goes into a file, see fastvm_worker::migstream)
//!     │ 3. worker: N restores of it at once, each a new identity (hostname,
//!     │    MAC and addresses, entropy reseeded), RAM mapped copy-on-write
//!     │    from one sealed copy: the copies share untouched memory
//!     │ 4. the hidden snapshot is deleted (the copies keep their mappings)
//!     v
//!  N VMs: running (or error, each with its statusMessage)
//! ```
//!
//! The copies are ordinary VMs from then on: same machine shape, env vars,
//! metadata, firewall, services and TTL as the source, named
//! `<source name>-fork-<i>`. The answer is 201 with the list of the copies
//! as they are once every restore finished.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::fleet::Affinity;
use crate::quotas::VmShape;
use crate::store::{now_ms, VmRecord};
use crate::worker::{MachineType, VmSpec};
use crate::AppState;
use fastvm_types::fork::ForkVmRequest;
use fastvm_types::vm::normalize_vm_name;
use fastvm_types::{SnapshotId, VmId, VmStatus};

impl AppState {
    /// Fork VM `id` of the caller's org into `req.count` copies.
    pub(crate) async fn fork_vm(
        &self,
        caller: Caller,
        id: VmId,
        req: ForkVmRequest,
    ) -> Result<Vec<VmRecord>, ApiError> {
        req.validate()?;
        let source = self.find_vm(caller.org_id, id).await?;
        if !matches!(source.status, VmStatus::Running | VmStatus::Paused) {
            return Err(ApiError::invalid_state(format!(
                "VM {id} is {}; only a running or paused VM can be forked",
                source.status.as_str()
            )));
        }
        let machine = MachineType::lookup(&source.machine_name)
            .map_err(|e| ApiError::internal(format!("VM {id} has an unknown machine type: {e}")))?;
        let copies: Vec<VmRecord> = (1..=req.count).map(|i| copy_of(&source, i)).collect();
        self.reserve(&caller, &source, &copies).await?;
        tracing::info!(vm = %id, org = %caller.org_id, count = req.count, "forking VM");

        let worker = match self.worker_for(&source.worker_id).await {
            Ok(w) => w,
            Err(e) => return Err(self.abandon(&copies, e.into()).await),
        };
        let hidden = SnapshotId::new_v4();
        let t0 = std::time::Instant::now();
        if let Err(e) = worker.snapshot(source.id, hidden).await {
            return Err(self.abandon(&copies, e.into()).await);
        }
        tracing::debug!(vm = %id, ms = t0.elapsed().as_millis() as u64, "fork: source captured");
        let launches = copies.iter().map(|c| {
            let spec = VmSpec {
                id: c.id,
                machine,
                hostname: format!("vm-{}", c.id.short()),
                env: c.env_vars.clone(),
                snapshot: Some(hidden),
                firewall: c.effective_firewall(),
            };
            self.provision(spec, &source.worker_id)
        });
        futures::future::join_all(launches).await;
        if let Err(e) = worker.delete_snapshot(hidden).await {
            tracing::warn!(vm = %id, snapshot = %hidden, error = %e, "deleting a fork's hidden snapshot failed");
        }
        let mut out = Vec::with_capacity(copies.len());
        for c in &copies {
            if let Some(r) = self.store().get_vm(caller.org_id, c.id).await? {
                out.push(r);
            }
        }
        tracing::info!(vm = %id, count = out.len(), ms = t0.elapsed().as_millis() as u64, "fork finished");
        Ok(out)
    }

    /// Check the org's quota for every copy at once and store them as
    /// `provisioning` (cluster mode: placed on the source's worker, one
    /// transaction each; the ones placed are given up if one fails).
    async fn reserve(
        &self,
        caller: &Caller,
        source: &VmRecord,
        copies: &[VmRecord],
    ) -> Result<(), ApiError> {
        let lock = self.quota_lock(caller.org_id);
        let _held = lock.lock().await;
        if self.fleet().is_cluster() {
            let affinity = Affinity::Only(source.worker_id.clone());
            for (i, c) in copies.iter().enumerate() {
                let mut c = c.clone();
                if let Err(e) = self
                    .fleet()
                    .place(&mut c, &affinity, "forking this VM")
                    .await
                {
                    return Err(self.abandon(&copies[..i], e).await);
                }
            }
            return Ok(());
        }
        let n = copies.len() as u64;
        let shape = VmShape {
            cpu: u64::from(source.cpu) * n,
            memory_mib: source.memory_mib * n,
            disk_gib: source.disk_gib * n,
        };
        self.check_vm_quota(caller.org_id, "forking this VM", shape)
            .await?;
        for c in copies {
            self.store().insert_vm(c).await?;
        }
        Ok(())
    }

    /// Remove the rows of copies that will never run; returns `why`.
    async fn abandon(&self, copies: &[VmRecord], why: ApiError) -> ApiError {
        for c in copies {
            let gone = self
                .modify(Some(c.org_id), c.id, |r| {
                    r.deleted_at_ms = Some(now_ms());
                    Ok(())
                })
                .await;
            if let Err(e) = gone {
                tracing::warn!(vm = %c.id, error = %e.message, "removing an abandoned fork copy failed");
            }
        }
        why
    }
}

/// The row of copy `i` of `source`: a new VM of the same shape, labels,
/// env vars, firewall, services and TTL, `provisioning`.
fn copy_of(source: &VmRecord, i: u32) -> VmRecord {
    let id = VmId::new_v4();
    VmRecord {
        id,
        org_id: source.org_id,
        worker_id: source.worker_id.clone(),
        name: normalize_vm_name(Some(&format!("{}-fork-{i}", source.name)), &id),
        machine_name: source.machine_name.clone(),
        source_name: source.source_name.clone(),
        cpu: source.cpu,
        memory_mib: source.memory_mib,
        disk_gib: source.disk_gib,
        status: VmStatus::Provisioning,
        status_message: None,
        firewall: source.firewall.clone(),
        metadata: source.metadata.clone(),
        env_vars: source.env_vars.clone(),
        ttl: source.ttl,
        expires_at_ms: None,
        ttl_remaining_ms: None,
        created_at_ms: now_ms(),
        paused_at_ms: None,
        deleted_at_ms: None,
        version: 0,
        public_ipv6: None,
        services: source.services.clone(),
    }
}
