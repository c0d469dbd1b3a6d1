//! Snapshots: capture, rename, delete, and the startup clean-up, applied to
//! the store and the worker, independent of HTTP (the routes are in
//! [`crate::routes::snapshots`]; restores are launches, in [`crate::lifecycle`]).
//!
//! ```text
//!   POST /v1/snapshots                 worker capture ok
//!        |  (VM running or paused) ---> creating ----------------> ready
//!        |                                 |
//!        |                                 | capture failed / server stopped
//!        v                                 v                     meanwhile
//!   404 (no such VM) / 409 (other status)  error (row kept, with its message)
//!
//!   DELETE: ready or error -> gone (404 from then on); creating -> 409
//! ```
//!
//! The capture runs while the request waits (it takes well under 2 s: the
//! disk is frozen, not copied, and the memory is written once), in a task of
//! its own, so a client hanging up mid-capture never leaves a row in
//! `creating`. The source VM keeps running (or stays paused) and its status
//! does not change.
//!
//! A restore holds [`AppState::snapshot_use`] shared from the moment it finds
//! the snapshot's row until its VM runs; a delete holds it exclusively while
//! it removes the worker's files, so the two never interleave. VMs restored
//! earlier keep working after the delete (the worker reference-collects the
//! disk layers).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::store::{now_ms, SnapshotRecord};
use crate::AppState;
use fastvm_types::snapshot::{
    normalize_snapshot_name, CreateSnapshotRequest, SnapshotService, SnapshotStatus,
    UpdateSnapshotRequest,
};
use fastvm_types::{codes as vcodes, OrgId, SnapshotId, VmStatus};

pub(crate) fn no_such_snapshot(id: SnapshotId) -> ApiError {
    ApiError::not_found(format!("no snapshot with id {id}"))
}

impl AppState {
    /// The live snapshot `id` of `org`.
    pub(crate) async fn find_snapshot(
        &self,
        org: OrgId,
        id: SnapshotId,
    ) -> Result<SnapshotRecord, ApiError> {
        self.store()
            .get_snapshot(org, id)
            .await?
            .ok_or_else(|| no_such_snapshot(id))
    }

    /// The live snapshots of `org`, oldest first.
    pub(crate) async fn list_snapshots(&self, org: OrgId) -> Result<Vec<SnapshotRecord>, ApiError> {
        Ok(self.store().list_snapshots(org).await?)
    }

    /// `POST /v1/snapshots`: capture the caller's running or paused VM.
    /// Returns the snapshot `ready`; when the worker fails, the row is kept
    /// in `error` with the worker's message and the error is returned.
    pub(crate) async fn create_snapshot(
        &self,
        caller: Caller,
        req: CreateSnapshotRequest,
    ) -> Result<SnapshotRecord, ApiError> {
        let vm = self.find_vm(caller.org_id, req.vm_id).await?;
        if !matches!(vm.status, VmStatus::Running | VmStatus::Paused) {
            return Err(ApiError::invalid_state(format!(
                "VM {} is {}; a snapshot needs it running or paused",
                vm.id,
                vm.status.as_str()
            )));
        }
        let mut rec = SnapshotRecord {
            id: SnapshotId::new_v4(),
            org_id: caller.org_id,
            vm_id: vm.id,
            worker_id: vm.worker_id.clone(),
            name: req.normalized_name(),
            status: SnapshotStatus::Creating,
            status_message: None,
            machine_name: vm.machine_name.clone(),
            cpu: vm.cpu,
            memory_mib: vm.memory_mib,
            disk_gib: vm.disk_gib,
            metadata: vm.metadata.clone(),
            env_vars: vm.env_vars.clone(),
            firewall: vm.firewall.clone(),
            services: vm
                .services
                .iter()
                .map(|s| SnapshotService {
                    name: s.name.clone(),
                    port: s.port,
                    h2c: s.h2c,
                })
                .collect(),
            // The mounted volumes (their files are not in the snapshot: a
            // restore attaches the volumes again).
            volumes: self
                .store()
                .attachments_of_vm(vm.id)
                .await?
                .into_iter()
                .filter(|a| a.mount_status == fastvm_types::volume::MountStatus::Mounted)
                .map(|a| fastvm_types::snapshot::SnapshotVolumeAttachment {
                    volume_id: a.volume_id,
                    mount_path: a.mount_path,
                    read_only: a.read_only,
                })
                .collect(),
            // The mounted buckets, without credentials (a restore leaves
            // them `pending` until credentials are given again).
            bucket_mounts: self
                .store()
                .bucket_mounts_of_vm(vm.id)
                .await?
                .into_iter()
                .filter(|m| m.mount_status == fastvm_types::volume::MountStatus::Mounted)
                .map(|m| fastvm_types::snapshot::SnapshotBucketMountAttachment {
                    bucket_uri: m.bucket_uri,
                    mount_path: m.mount_path,
                    read_only: m.read_only,
                })
                .collect(),
            created_at_ms: now_ms(),
            deleted_at_ms: None,
            compat_key: None,
            stored: false,
        };
        let worker = self.worker_for(&rec.worker_id).await?;
        (rec.compat_key, rec.stored) = self.fleet().snapshot_traits(&rec.worker_id).await;
        {
            // Check and reserve (the creating row) atomically per org.
            let lock = self.quota_lock(caller.org_id);
            let _held = lock.lock().await;
            match self.fleet().reserve_snapshot(&rec).await {
                Some(reserved) => reserved?,
                None => {
                    self.check_snapshot_quota(caller.org_id).await?;
                    self.store().insert_snapshot(&rec).await?;
                }
            }
        }
        let (id, vm_id) = (rec.id, vm.id);
        tracing::info!(snapshot = %id, vm = %vm_id, org = %caller.org_id, "capturing snapshot");
        let state = self.clone();
        // In its own task: a client hanging up does not abandon the capture half-way.
        let capture = tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = worker.snapshot(vm_id, id).await;
            state
                .metrics()
                .snapshot_finished(result.is_ok(), started.elapsed().as_secs_f64());
            let settled = match &result {
                Ok(()) => {
                    tracing::info!(snapshot = %id, vm = %vm_id, elapsed_ms = started.elapsed().as_millis() as u64, "snapshot ready");
                    state
                        .store()
                        .set_snapshot_status(
                            id,
                            SnapshotStatus::Creating,
                            SnapshotStatus::Ready,
                            None,
                        )
                        .await
                }
                Err(e) => {
                    tracing::warn!(snapshot = %id, vm = %vm_id, error = %e, "snapshot capture failed");
                    if matches!(e, crate::worker::WorkerError::Unresponsive(_)) {
                        // The worker marked the VM failed: the row says so too.
                        let _ = state.find_vm(caller.org_id, vm_id).await;
                    }
                    let message = format!("the capture failed: {e}");
                    state
                        .store()
                        .set_snapshot_status(
                            id,
                            SnapshotStatus::Creating,
                            SnapshotStatus::Error,
                            Some(&message),
                        )
                        .await
                }
            };
            (result, settled)
        });
        let (result, settled) = capture.await.map_err(|e| {
            ApiError::internal(format!("the capture of snapshot {id} was interrupted: {e}"))
        })?;
        settled?;
        match result {
            Ok(()) => {
                rec.status = SnapshotStatus::Ready;
                Ok(rec)
            }
            Err(e) => {
                let mut err = ApiError::from(e);
                err.message = format!("capturing snapshot {id} of VM {vm_id} failed: {}; the snapshot is kept with status error (delete it)", err.message);
                Err(err)
            }
        }
    }

    /// `PATCH /v1/snapshots/{id}`: rename (an empty name gives the default name).
    pub(crate) async fn update_snapshot(
        &self,
        org: OrgId,
        id: SnapshotId,
        req: UpdateSnapshotRequest,
    ) -> Result<SnapshotRecord, ApiError> {
        let Some(name) = req.name.as_deref() else {
            return Err(ApiError::invalid(
                vcodes::INVALID_REQUEST,
                "nothing to update; give name",
            ));
        };
        let mut rec = self.find_snapshot(org, id).await?;
        rec.name = normalize_snapshot_name(Some(name), &rec.vm_id);
        if !self.store().rename_snapshot(org, id, &rec.name).await? {
            return Err(no_such_snapshot(id));
        }
        Ok(rec)
    }

    /// `DELETE /v1/snapshots/{id}`: remove the worker's files, then the row.
    /// VMs restored from it keep running.
    pub(crate) async fn delete_snapshot(&self, org: OrgId, id: SnapshotId) -> Result<(), ApiError> {
        let rec = self.find_snapshot(org, id).await?;
        if rec.status == SnapshotStatus::Creating {
            return Err(ApiError::invalid_state(format!(
                "snapshot {id} is still being captured; delete it when it is ready"
            )));
        }
        // Waits for restores in flight (they hold it shared).
        let _exclusive = self.snapshot_use().write().await;
        self.worker_for(&rec.worker_id)
            .await?
            .delete_snapshot(id)
            .await?;
        if !self
            .store()
            .mark_snapshot_deleted(org, id, now_ms())
            .await?
        {
            return Err(no_such_snapshot(id));
        }
        tracing::info!(snapshot = %id, org = %org, "snapshot deleted");
        Ok(())
    }

    /// At startup: a capture interrupted by the last shutdown is an error
    /// (its partial files are removed).
    pub(crate) async fn reconcile_snapshots(&self) -> Result<(), ApiError> {
        for rec in self
            .store()
            .list_snapshots_in(SnapshotStatus::Creating)
            .await?
        {
            // Cluster: another control plane may be capturing it right now.
            if self.fleet().is_cluster() {
                continue;
            }
            let Ok(worker) = self.worker_for(&rec.worker_id).await else {
                continue;
            };
            tracing::info!(snapshot = %rec.id, "a capture was interrupted by the last shutdown; marking it error");
            if let Err(e) = worker.delete_snapshot(rec.id).await {
                tracing::warn!(snapshot = %rec.id, error = %e, "could not remove the interrupted capture's files");
            }
            let message = "the server stopped while the snapshot was being captured";
            self.store()
                .set_snapshot_status(
                    rec.id,
                    SnapshotStatus::Creating,
                    SnapshotStatus::Error,
                    Some(message),
                )
                .await?;
        }
        Ok(())
    }
}
