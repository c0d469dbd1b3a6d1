//! Volumes of the runtime: create, resize and delete them on this host,
//! attach them to running VMs (the VM's NFS server, then a mount by the
//! guest agent) and detach them.
//!
//! ```text
//!  attach(vm, vol, path, ro):  VM running, has a network, volume exists here
//!     -> the VM's export server (started at the first attach: <gateway>:2049
//!        in the VM's namespace) serves /vol_<hex>
//!     -> agent: Mount <gateway>:/vol_<hex> at path (nfs, vers=3, ...)
//!        failed -> the export stops serving it again; the error says why
//!  detach(vm, vol):  agent: Unmount path (in use -> lazily, with a warning)
//!     -> the export stops serving it (handles the guest still holds: stale)
//! ```

use super::{Runtime, Vm};
use crate::error::{Error, Result};
use crate::volumes::{handle, NfsServer, VmExport, VolumeStore, NFS_PORT};
use fastvm_worker_api::DetachNote;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

/// A VM's export (volumes and bucket mounts) and where each is mounted.
#[derive(Debug)]
pub(super) struct VmVolumes {
    pub(super) export: VmExport,
    _server: NfsServer,
    /// volume id -> mount path in the guest.
    mounts: BTreeMap<String, String>,
    /// bucket-mount id -> mount path in the guest (buckets.rs).
    pub(super) buckets: BTreeMap<String, String>,
}

impl VmVolumes {
    /// Volume and bucket-mount id -> mount path.
    pub(super) fn mounts(&self) -> BTreeMap<String, String> {
        let mut all = self.mounts.clone();
        all.extend(self.buckets.clone());
        all
    }
}

/// Kernel NFS options of a volume mount: NFSv3 over TCP to the worker's
/// server at `gw` (MOUNT on the same port, no portmapper), no lock manager,
/// attributes cached for at most 1 s (writes of other VMs show up within a
/// second; close-to-open consistency on top), hard (a worker restart only
/// delays I/O).
pub(super) fn mount_options(gw: Ipv4Addr) -> String {
    format!(
        "vers=3,proto=tcp,port={NFS_PORT},mountport={NFS_PORT},mountproto=tcp,nolock,hard,\
         timeo=50,retrans=3,actimeo=1,addr={gw},mountaddr={gw}"
    )
}

impl Runtime {
    fn volume_store(&self) -> Result<&Arc<VolumeStore>> {
        self.volumes
            .as_ref()
            .map_err(|why| Error::Volume(format!("volumes are not available on this host: {why}")))
    }

    fn volume_io(id: &str, what: &str, e: std::io::Error) -> Error {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Volume(format!("no volume {id} on this host"))
        } else {
            Error::Volume(format!("{what} volume {id}: {e}"))
        }
    }

    /// Creates volume `id` on this host (idempotent).
    pub fn create_volume(&self, id: &str, size_bytes: u64, read_only: bool) -> Result<()> {
        self.volume_store()?
            .create(id, size_bytes, read_only)
            .map(drop)
            .map_err(|e| Self::volume_io(id, "create", e))
    }

    /// New size limit and mode of volume `id`, at once in every attached guest.
    pub fn update_volume(&self, id: &str, size_bytes: u64, read_only: bool) -> Result<()> {
        self.volume_store()?
            .update(id, size_bytes, read_only)
            .map(drop)
            .map_err(|e| Self::volume_io(id, "update", e))
    }

    /// Bytes the files of volume `id` occupy.
    pub fn volume_used_bytes(&self, id: &str) -> Result<u64> {
        self.volume_store()?
            .get(id)
            .map(|v| v.used_bytes())
            .map_err(|e| Self::volume_io(id, "read", e))
    }

    /// Removes volume `id` and its files; refused while a VM of this host
    /// has it attached.
    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        let store = self.volume_store()?;
        for vm in self.all_vms() {
            if let Some(v) = vm.volumes.lock().await.as_ref() {
                if v.mounts.contains_key(id) {
                    return Err(Error::Volume(format!(
                        "volume {id} is attached to VM {}; detach it first",
                        vm.record.launch.id
                    )));
                }
            }
        }
        store
            .delete(id)
            .map_err(|e| Self::volume_io(id, "delete", e))
    }

    /// The VM's export, its NFS server started at first use (at
    /// `<gateway>:2049` in the VM's namespace).
    pub(super) async fn vm_export<'a>(
        &self,
        slot: &'a mut Option<VmVolumes>,
        net: &crate::net::VmNet,
    ) -> Result<&'a mut VmVolumes> {
        if slot.is_none() {
            let volumes = match &self.volumes {
                Ok(store) => store.export(),
                // No volume store on this host: bucket mounts still work;
                // volume handles are sealed with a key of this process.
                Err(_) => crate::volumes::ExportFs::new(handle::Sealer::new(rand::random())),
            };
            let export = VmExport::new(volumes);
            let gw = net.addr.gateway4;
            let server = crate::volumes::serve(
                Some(&net.addr.netns),
                SocketAddr::new(gw.into(), NFS_PORT),
                export.clone(),
            )
            .await?;
            *slot = Some(VmVolumes {
                export,
                _server: server,
                mounts: BTreeMap::new(),
                buckets: BTreeMap::new(),
            });
        }
        slot.as_mut()
            .ok_or_else(|| Error::Volume("volume server missing".into()))
    }

    fn all_vms(&self) -> Vec<Arc<Vm>> {
        self.vms
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Mounts volume `volume` at `path` in running VM `id`, read-only when
    /// `read_only` (or when the volume is `ro`).
    pub async fn attach_volume(
        &self,
        id: &str,
        volume: &str,
        path: &str,
        read_only: bool,
    ) -> Result<()> {
        let store = self.volume_store()?;
        let key = handle::volume_key(volume)
            .ok_or_else(|| Error::Volume(format!("{volume:?} is not a volume id")))?;
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        Self::require(
            &vm,
            fastvm_worker_api::VmState::Running,
            "attaching a volume",
        )?;
        let host_volume = store
            .get(volume)
            .map_err(|e| Self::volume_io(volume, "open", e))?;
        let net =
            vm.net.lock().ok().and_then(|n| n.clone()).ok_or_else(|| {
                Error::Volume("the VM has no network to mount volumes over".into())
            })?;
        let gw = net.addr.gateway4;
        let mut slot = vm.volumes.lock().await;
        let v = self.vm_export(&mut slot, &net).await?;
        if let Some(at) = v.mounts.get(volume) {
            return Err(Error::Volume(format!(
                "volume {volume} is already attached to this VM at {at}"
            )));
        }
        if let Some((other, _)) = v.mounts.iter().find(|(_, p)| p.as_str() == path) {
            return Err(Error::Volume(format!(
                "{path} already holds volume {other} in this VM"
            )));
        }
        v.export.volumes().attach(host_volume, read_only);
        let agent = match self.agent(&vm).await {
            Ok(a) => a,
            Err(e) => {
                v.export.volumes().detach(&key);
                return Err(e);
            }
        };
        let source = format!("{gw}:/{volume}");
        if let Err(e) = agent
            .mount(&source, path, "nfs", &mount_options(gw), read_only)
            .await
        {
            v.export.volumes().detach(&key);
            return Err(e);
        }
        v.mounts.insert(volume.to_owned(), path.to_owned());
        tracing::info!(vm = %id, %volume, %path, read_only, "volume attached");
        Ok(())
    }

    /// Unmounts volume `volume` from VM `id` and stops serving it there,
    /// whatever the guest says: a note when processes still used it (it was
    /// detached lazily) or the guest did not answer; the VM keeps running.
    pub async fn detach_volume(&self, id: &str, volume: &str) -> Result<Option<DetachNote>> {
        let key = handle::volume_key(volume)
            .ok_or_else(|| Error::Volume(format!("{volume:?} is not a volume id")))?;
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        let mut slot = vm.volumes.lock().await;
        let not_attached = || Error::Volume(format!("volume {volume} is not attached to VM {id}"));
        let v = slot.as_mut().ok_or_else(not_attached)?;
        let path = v.mounts.get(volume).cloned().ok_or_else(not_attached)?;
        let note = self.unmount_in_guest(&vm, &path).await;
        v.export.volumes().detach(&key);
        v.mounts.remove(volume);
        tracing::info!(vm = %id, %volume, %path, note = ?note, "volume detached");
        Ok(note)
    }

    /// Unmount `path` in the guest of `vm` (volume or bucket): a note when
    /// processes still used it (detached lazily) or the guest did not answer.
    pub(super) async fn unmount_in_guest(&self, vm: &Vm, path: &str) -> Option<DetachNote> {
        match vm.state() {
            fastvm_worker_api::VmState::Running => {
                let unmounted = match self.agent(vm).await {
                    Ok(agent) => agent.unmount(path).await,
                    Err(e) => Err(e),
                };
                match unmounted {
                    Ok(None) => None,
                    Ok(Some(busy)) => Some(DetachNote::Busy(busy)),
                    Err(e) => Some(DetachNote::GuestUnresponsive(format!(
                        "the guest did not unmount {path} ({e}); its mount now answers errors"
                    ))),
                }
            }
            other => Some(DetachNote::GuestUnresponsive(format!(
                "the VM was {other}: the guest did not unmount {path}; its mount answers errors"
            ))),
        }
    }

    /// After a restore: detach (lazily) the guest's mounts of the volumes it
    /// had at capture. They point at the source VM's server, which this VM
    /// does not have: a process touching them would wait forever (hard
    /// mounts). Failures are logged; the VM is usable either way.
    pub(super) async fn drop_stale_mounts(&self, vm: &Vm, mounts: &BTreeMap<String, String>) {
        if mounts.is_empty() {
            return;
        }
        let agent = match self.agent(vm).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(vm = %vm.record.launch.id, error = %e, "could not detach the snapshot's volume mounts");
                return;
            }
        };
        for (volume, path) in mounts {
            match agent.unmount_lazy(path).await {
                Ok(()) => {
                    tracing::info!(vm = %vm.record.launch.id, %volume, %path, "snapshot's volume mount detached in the restored guest")
                }
                Err(e) => {
                    tracing::warn!(vm = %vm.record.launch.id, %volume, %path, error = %e, "detaching a snapshot's volume mount failed")
                }
            }
        }
    }

    /// Volume id -> mount path of VM `id`'s attached volumes.
    pub async fn volume_mounts(&self, id: &str) -> Result<BTreeMap<String, String>> {
        let vm = self.vm(id)?;
        let slot = vm.volumes.lock().await;
        Ok(slot.as_ref().map(|v| v.mounts.clone()).unwrap_or_default())
    }
}
