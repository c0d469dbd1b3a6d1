//! Managed volumes (`/v1/volumes`) and their attachments to VMs
//! (`/v1/vms/{id}/volumes`): the rules; the files and the mounts are the
//! worker's (`Worker::put_volume`, `attach_volume`, ...; see
//! fastvm-worker/src/volumes and docs/ARCHITECTURE.md "Volumes").
//!
//! ```text
//!  volume:     POST -> creating (row reserves the quota) -> worker creates it -> ready
//!              PATCH size: pendingSizeGiB = new until the worker applied it
//!              DELETE (no attachment left) -> deleting -> worker removes files -> gone
//!  attachment: VM running -> pending -> worker mounts -> mounted | failed (statusMessage)
//!              VM paused  -> pending, mounted when the VM resumes
//!              DELETE     -> worker unmounts (warnings: busy, guest_unresponsive) -> gone
//! ```
//!
//! A volume lives on one worker (the one that created it, `worker_id`): it
//! attaches to VMs of that worker; elsewhere the attach is refused with a
//! message saying so.

use crate::error::{codes, ApiError};
use crate::store::{AttachmentRecord, VolumeRecord};
use crate::AppState;
use axum::http::StatusCode;
use fastvm_types::volume::{
    is_volume_id, new_volume_id, AccessMode, AttachVolumeRequest, CreateVolumeRequest,
    DetachVolumeResponse, DetachWarning, MountStatus, UpdateVolumeRequest, Volume,
    VolumeAttachmentItem, VolumeAttachmentItemWithVm, VolumeStatus,
};
use fastvm_types::{DeleteResponse, OrgId, SnapshotId, VmId, VmStatus};
use fastvm_worker_api::{DetachNote, Worker, WorkerError};
use std::sync::Arc;

const GIB: u64 = 1 << 30;

fn no_volume(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "no volume {id:?} in your org (volume ids look like vol_<22 lowercase hex>)"
    ))
}

fn in_use(msg: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, codes::VOLUME_IN_USE, msg)
}

impl AppState {
    /// The worker that holds new volumes: the embedded one, else any
    /// reachable worker of the cluster.
    async fn volume_worker_for_new(&self) -> Result<Arc<dyn Worker>, ApiError> {
        if let Some(w) = self.fleet().local() {
            return Ok(w.clone());
        }
        let w = self
            .fleet()
            .reachable()
            .await
            .into_iter()
            .next()
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::NO_CAPACITY,
                    "no worker is reachable to hold the volume; try again when one is",
                )
            })?;
        Ok(w)
    }

    async fn volume_worker(&self, v: &VolumeRecord) -> Result<Arc<dyn Worker>, ApiError> {
        let id = v.worker_id.as_deref().ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                codes::VOL_NOT_READY,
                format!("volume {} has no worker yet (status creating)", v.id),
            )
        })?;
        Ok(self.worker_for(id).await?)
    }

    async fn volume_record(&self, org: OrgId, id: &str) -> Result<VolumeRecord, ApiError> {
        if !is_volume_id(id) {
            return Err(no_volume(id));
        }
        self.store()
            .get_volume(org, id)
            .await?
            .ok_or_else(|| no_volume(id))
    }

    /// The API view: attachments of running VMs counted, used space asked of the worker.
    async fn volume_view(&self, v: VolumeRecord) -> Result<Volume, ApiError> {
        let mut mounted = 0u64;
        for a in self.store().attachments_of_volume(&v.id).await? {
            let running = self
                .store()
                .get_vm(v.org_id, a.vm_id)
                .await?
                .is_some_and(|vm| vm.status == VmStatus::Running);
            if running && a.mount_status == MountStatus::Mounted {
                mounted += 1;
            }
        }
        let used_gib = match v.worker_id.as_deref() {
            Some(w) => match self.worker_for(w).await {
                Ok(worker) => worker.volume_used_bytes(&v.id).await.ok().map(|b| b / GIB),
                Err(_) => None,
            },
            None => None,
        };
        Ok(Volume {
            id: v.id,
            name: v.name,
            org_id: v.org_id,
            access_mode: v.access_mode,
            size_gib: v.size_gib,
            status: v.status,
            pending_size_gib: v.pending_size_gib,
            mounted_count: mounted,
            used_gib,
            created_at: crate::routes::vms::rfc3339(v.created_at_ms),
        })
    }

    pub(crate) async fn list_volumes(&self, org: OrgId) -> Result<Vec<Volume>, ApiError> {
        let mut out = Vec::new();
        for v in self.store().list_volumes(org).await? {
            out.push(self.volume_view(v).await?);
        }
        Ok(out)
    }

    pub(crate) async fn get_volume(&self, org: OrgId, id: &str) -> Result<Volume, ApiError> {
        let v = self.volume_record(org, id).await?;
        self.volume_view(v).await
    }

    /// `POST /v1/volumes`: quota checked and the row inserted under the
    /// org's quota lock, then the worker creates it; a failure removes the row.
    pub(crate) async fn create_volume(
        &self,
        org: OrgId,
        req: CreateVolumeRequest,
    ) -> Result<Volume, ApiError> {
        let name = req.validate()?;
        let worker = self.volume_worker_for_new().await?;
        let record = {
            let lock = self.quota_lock(org);
            let _held = lock.lock().await;
            let limits = self.store().quota_limits(org).await?;
            let usage = self.store().quota_usage(org).await?;
            crate::quotas::check_volume_limits(
                org,
                "this volume",
                &limits,
                &usage,
                1,
                req.size_gib,
            )?;
            self.store()
                .insert_volume(&VolumeRecord {
                    id: new_volume_id(),
                    org_id: org,
                    name,
                    access_mode: req.access_mode,
                    size_gib: req.size_gib,
                    pending_size_gib: 0,
                    status: VolumeStatus::Creating,
                    worker_id: Some(worker.id().to_owned()),
                    created_at_ms: 0,
                })
                .await?
        };
        let size = req.size_gib.saturating_mul(GIB);
        if let Err(e) = worker
            .put_volume(&record.id, size, req.access_mode == AccessMode::Ro)
            .await
        {
            let _ = self.store().delete_volume_row(org, &record.id).await;
            return Err(e.into());
        }
        let ready = VolumeRecord {
            status: VolumeStatus::Ready,
            ..record
        };
        self.store().save_volume(&ready).await?;
        tracing::info!(org = %org, volume = %ready.id, size_gib = ready.size_gib, "volume created");
        self.volume_view(ready).await
    }

    /// `PATCH /v1/volumes/{id}`: rename, grow (quota checked), shrink when
    /// the files fit, change the access mode; the worker applies size and
    /// mode at once in every attached guest.
    pub(crate) async fn update_volume(
        &self,
        org: OrgId,
        id: &str,
        req: UpdateVolumeRequest,
    ) -> Result<Volume, ApiError> {
        let name = req.validate()?;
        let mut v = self.volume_record(org, id).await?;
        if v.status != VolumeStatus::Ready {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                codes::VOL_NOT_READY,
                format!("volume {id} is {:?}, not ready", v.status).to_lowercase(),
            ));
        }
        if let Some(name) = name {
            v.name = name;
        }
        let new_size = req.size_gib.unwrap_or(v.size_gib);
        let new_mode = req.access_mode.unwrap_or(v.access_mode);
        let worker_change = new_size != v.size_gib || new_mode != v.access_mode;
        if worker_change {
            let worker = self.volume_worker(&v).await?;
            if new_size < v.size_gib {
                let used = worker.volume_used_bytes(id).await?;
                if used > new_size.saturating_mul(GIB) {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        codes::VOLUME_ERROR,
                        format!(
                            "volume {id} holds {used} bytes, more than {new_size} GiB; delete files first or keep the size"
                        ),
                    ));
                }
            }
            {
                let lock = self.quota_lock(org);
                let _held = lock.lock().await;
                if new_size > v.size_gib {
                    let limits = self.store().quota_limits(org).await?;
                    let usage = self.store().quota_usage(org).await?;
                    crate::quotas::check_volume_limits(
                        org,
                        "this resize",
                        &limits,
                        &usage,
                        0,
                        new_size - v.size_gib,
                    )?;
                }
                v.pending_size_gib = if new_size != v.size_gib { new_size } else { 0 };
                self.store().save_volume(&v).await?;
            }
            let applied = worker
                .put_volume(id, new_size.saturating_mul(GIB), new_mode == AccessMode::Ro)
                .await;
            v.pending_size_gib = 0;
            if let Err(e) = applied {
                self.store().save_volume(&v).await?;
                return Err(e.into());
            }
            v.size_gib = new_size;
            v.access_mode = new_mode;
        }
        self.store().save_volume(&v).await?;
        self.volume_view(v).await
    }

    /// `DELETE /v1/volumes/{id}`: refused while attached anywhere.
    pub(crate) async fn delete_volume(
        &self,
        org: OrgId,
        id: &str,
    ) -> Result<DeleteResponse, ApiError> {
        let mut v = self.volume_record(org, id).await?;
        let attached = self.store().attachments_of_volume(id).await?;
        if let Some(a) = attached.first() {
            return Err(in_use(format!(
                "volume {id} is attached to VM {} at {} ({} attachment(s)); detach it first",
                a.vm_id,
                a.mount_path,
                attached.len()
            )));
        }
        v.status = VolumeStatus::Deleting;
        self.store().save_volume(&v).await?;
        if v.worker_id.is_some() {
            let worker = self.volume_worker(&v).await?;
            if let Err(e) = worker.delete_volume(id).await {
                v.status = VolumeStatus::Ready;
                self.store().save_volume(&v).await?;
                return Err(e.into());
            }
        }
        self.store().delete_volume_row(org, id).await?;
        tracing::info!(org = %org, volume = %id, "volume deleted");
        Ok(DeleteResponse {
            id: id.to_owned(),
            deleted: true,
        })
    }

    /// `GET /v1/volumes/{id}/attachments`.
    pub(crate) async fn volume_attachments(
        &self,
        org: OrgId,
        id: &str,
    ) -> Result<Vec<VolumeAttachmentItemWithVm>, ApiError> {
        self.volume_record(org, id).await?;
        Ok(self
            .store()
            .attachments_of_volume(id)
            .await?
            .into_iter()
            .map(|a| VolumeAttachmentItemWithVm::new(a.vm_id, item_of(a)))
            .collect())
    }

    /// The `volumes` of a VM's JSON.
    pub(crate) async fn vm_volume_items(
        &self,
        vm: VmId,
    ) -> Result<Vec<VolumeAttachmentItem>, ApiError> {
        Ok(self
            .store()
            .attachments_of_vm(vm)
            .await?
            .into_iter()
            .map(item_of)
            .collect())
    }

    /// `POST /v1/vms/{id}/volumes`.
    pub(crate) async fn attach_volume(
        &self,
        org: OrgId,
        vm_id: VmId,
        req: AttachVolumeRequest,
    ) -> Result<VolumeAttachmentItem, ApiError> {
        req.validate()?;
        let vm = self
            .store()
            .get_vm(org, vm_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no VM with id {vm_id} in your org")))?;
        let v = self.volume_record(org, &req.volume_id).await?;
        if v.status != VolumeStatus::Ready {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                codes::VOL_NOT_READY,
                format!(
                    "volume {} is {}; it can be attached once ready",
                    v.id,
                    crate::store::volume_status_str(v.status)
                ),
            ));
        }
        if v.worker_id.as_deref() != Some(vm.worker_id.as_str()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                codes::VOLUME_ERROR,
                format!(
                    "volume {} lives on worker {}, VM {vm_id} runs on worker {}: a volume attaches to VMs of its worker",
                    v.id,
                    v.worker_id.as_deref().unwrap_or("(none)"),
                    vm.worker_id
                ),
            ));
        }
        let read_only = req.read_only || v.access_mode == AccessMode::Ro;
        let pending = match vm.status {
            VmStatus::Running => false,
            VmStatus::Paused => true,
            other => {
                return Err(ApiError::invalid_state(format!(
                    "VM {vm_id} is {}; volumes attach to running or paused VMs",
                    other.as_str()
                )))
            }
        };
        let record = self
            .store()
            .insert_attachment(&AttachmentRecord {
                vm_id,
                volume_id: v.id.clone(),
                org_id: org,
                mount_path: req.mount_path.clone(),
                read_only,
                mount_status: MountStatus::Pending,
                status_message: pending
                    .then(|| "the VM is paused: mounted when it resumes".to_owned()),
                created_at_ms: 0,
            })
            .await
            .map_err(|e| match e {
                crate::store::StoreError::Conflict(m) => in_use(m),
                e => e.into(),
            })?;
        if pending {
            return Ok(item_of(record));
        }
        Ok(item_of(self.mount_attachment(record).await?))
    }

    /// Ask the VM's worker to mount a recorded attachment; the row takes
    /// the outcome (`mounted`, or `failed` with the reason).
    async fn mount_attachment(&self, a: AttachmentRecord) -> Result<AttachmentRecord, ApiError> {
        let worker = self.worker_of(a.vm_id).await?;
        let (status, message) = match worker
            .attach_volume(a.vm_id, &a.volume_id, &a.mount_path, a.read_only)
            .await
        {
            Ok(()) => (MountStatus::Mounted, None),
            Err(e @ (WorkerError::Volume(_) | WorkerError::AgentUnavailable(_))) => {
                (MountStatus::Failed, Some(e.to_string()))
            }
            Err(e) => {
                let _ = self.store().delete_attachment(a.vm_id, &a.volume_id).await;
                return Err(e.into());
            }
        };
        self.store()
            .set_attachment_status(a.vm_id, &a.volume_id, status, message.as_deref())
            .await?;
        Ok(AttachmentRecord {
            mount_status: status,
            status_message: message,
            ..a
        })
    }

    /// After a restore from snapshot `sid`: attach the volumes the source
    /// VM had mounted, at the same paths. One that cannot be (deleted since,
    /// not ready, on another worker) is recorded `failed` with the reason,
    /// so the VM's `volumes` says what is missing.
    pub(crate) async fn reattach_snapshot_volumes(&self, org: OrgId, vm: VmId, sid: SnapshotId) {
        let wanted = match self.store().get_snapshot(org, sid).await {
            Ok(Some(s)) => s.volumes,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%vm, snapshot = %sid, error = %e, "reading the snapshot's volumes failed");
                return;
            }
        };
        for w in wanted {
            let vm_rec = match self.store().get_vm(org, vm).await {
                Ok(Some(r)) => r,
                _ => return,
            };
            let why_not = match self.store().get_volume(org, &w.volume_id).await {
                Ok(None) => Some(format!(
                    "volume {} of the snapshot no longer exists; not attached",
                    w.volume_id
                )),
                Ok(Some(v)) if v.status != VolumeStatus::Ready => Some(format!(
                    "volume {} of the snapshot is {}; not attached",
                    v.id,
                    crate::store::volume_status_str(v.status)
                )),
                Ok(Some(v)) if v.worker_id.as_deref() != Some(vm_rec.worker_id.as_str()) => {
                    Some(format!(
                        "volume {} of the snapshot lives on worker {}, this VM runs on {}; not attached",
                        v.id,
                        v.worker_id.as_deref().unwrap_or("(none)"),
                        vm_rec.worker_id
                    ))
                }
                Ok(Some(_)) => None,
                Err(e) => Some(format!("volume {}: {e}", w.volume_id)),
            };
            let row = AttachmentRecord {
                vm_id: vm,
                volume_id: w.volume_id.clone(),
                org_id: org,
                mount_path: w.mount_path.clone(),
                read_only: w.read_only,
                mount_status: if why_not.is_some() {
                    MountStatus::Failed
                } else {
                    MountStatus::Pending
                },
                status_message: why_not.clone(),
                created_at_ms: 0,
            };
            match self.store().insert_attachment(&row).await {
                Ok(row) if why_not.is_none() => {
                    if let Err(e) = self.mount_attachment(row).await {
                        tracing::warn!(%vm, volume = %w.volume_id, error = %e.message, "re-attaching a snapshot's volume failed");
                    }
                }
                Ok(_) => {
                    tracing::info!(%vm, volume = %w.volume_id, reason = ?why_not, "snapshot's volume not re-attached")
                }
                Err(e) => {
                    tracing::warn!(%vm, volume = %w.volume_id, error = %e, "recording a snapshot's volume failed")
                }
            }
        }
    }

    /// Mount the attachments a VM got while paused (called after a resume).
    pub(crate) async fn mount_pending_volumes(&self, vm: VmId) {
        let pending = match self.store().attachments_of_vm(vm).await {
            Ok(all) => all
                .into_iter()
                .filter(|a| a.mount_status == MountStatus::Pending),
            Err(e) => {
                tracing::warn!(%vm, error = %e, "listing pending volume attachments failed");
                return;
            }
        };
        for a in pending {
            if let Err(e) = self.mount_attachment(a).await {
                tracing::warn!(%vm, error = %e.message, "mounting a pending volume failed");
            }
        }
    }

    /// `DELETE /v1/vms/{id}/volumes/{volumeId}`: the attachment is gone
    /// afterwards whatever the guest did; what went wrong is in `warnings`.
    pub(crate) async fn detach_volume(
        &self,
        org: OrgId,
        vm_id: VmId,
        volume_id: &str,
    ) -> Result<DetachVolumeResponse, ApiError> {
        let vm = self
            .store()
            .get_vm(org, vm_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("no VM with id {vm_id} in your org")))?;
        let attached = self
            .store()
            .attachments_of_vm(vm_id)
            .await?
            .into_iter()
            .find(|a| a.volume_id == volume_id)
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "volume {volume_id:?} is not attached to VM {vm_id}"
                ))
            })?;
        let mut warnings = Vec::new();
        let on_worker = attached.mount_status == MountStatus::Mounted
            || (attached.mount_status == MountStatus::Failed && vm.status == VmStatus::Running);
        if on_worker {
            let worker = self.worker_of(vm_id).await?;
            match worker.detach_volume(vm_id, volume_id).await {
                Ok(None) => {}
                Ok(Some(DetachNote::Busy(m))) => warnings.push(DetachWarning {
                    kind: "busy".into(),
                    message: format!(
                        "processes in the VM were using the volume: {m}; it was detached lazily"
                    ),
                }),
                Ok(Some(DetachNote::GuestUnresponsive(m))) => warnings.push(DetachWarning {
                    kind: "guest_unresponsive".into(),
                    message: m,
                }),
                // A failed mount left nothing on the worker.
                Err(WorkerError::Volume(_)) if attached.mount_status == MountStatus::Failed => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.store().delete_attachment(vm_id, volume_id).await?;
        Ok(DetachVolumeResponse {
            detached: true,
            warnings,
        })
    }
}

pub(crate) fn item_of(a: AttachmentRecord) -> VolumeAttachmentItem {
    VolumeAttachmentItem {
        volume_id: a.volume_id,
        mount_path: a.mount_path,
        read_only: a.read_only,
        mount_status: a.mount_status,
        status_message: a.status_message,
    }
}
