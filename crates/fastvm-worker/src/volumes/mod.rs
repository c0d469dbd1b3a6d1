//! Volumes on this host: persistent directories that outlive VMs, served to
//! guests over NFSv3 by the worker itself (no host NFS server, no kernel
//! module on the host).
//!
//! ```text
//!  <data>/volumes/handle.key          32 random bytes (0600): seals NFS file handles
//!  <data>/volumes/<vol_id>/meta.json  {"sizeBytes": .., "readOnly": ..}
//!  <data>/volumes/<vol_id>/data/      the volume's files
//!
//!  guest ──NFSv3/TCP──▶ <gateway>:2049 in the VM's namespace ──▶ that VM's ExportFs
//!                                                           /vol_<hex> per attached volume
//! ```
//!
//! Why NFS (docs/ARCHITECTURE.md "Volumes" has the whole argument): QEMU 7.2
//! cannot migrate virtio-fs (so no snapshots), the guest kernel has no 9p,
//! and a block device (virtio-scsi) cannot be written by two VMs at once.
//! NFSv3 is stateless, so a restored guest's mount keeps working, and one
//! server per VM namespace knows which VM is asking without trusting any
//! address. [`fs`] is the file system each VM sees, [`handle`] its file
//! handles, [`sys`] the system calls it makes.

pub mod export;
pub mod fs;
pub mod handle;
mod sys;

pub use export::VmExport;
pub use fs::{ExportFs, HostVolume};
pub use handle::{Sealer, VolHandle};

use nfs3_server::tcp::{NFSTcp, NFSTcpListener};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The NFS port guests mount from (NFS and MOUNT on one port, no portmapper).
pub const NFS_PORT: u16 = 2049;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    size_bytes: u64,
    read_only: bool,
}

/// The volumes of this host.
#[derive(Debug)]
pub struct VolumeStore {
    dir: PathBuf,
    sealer: Sealer,
    open: Mutex<HashMap<String, Arc<HostVolume>>>,
}

fn invalid(id: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{id:?} is not a volume id (vol_<22 lowercase hex>)"),
    )
}

impl VolumeStore {
    /// Opens `<data_dir>/volumes`, creating it and its handle key at first use.
    pub fn open(data_dir: &Path) -> io::Result<VolumeStore> {
        let dir = data_dir.join("volumes");
        std::fs::create_dir_all(&dir)?;
        // Volumes need file handles (name_to_handle_at): ext4, xfs, btrfs
        // and tmpfs give them, overlayfs without nfs_export does not.
        sys::kernel_handle(std::os::fd::AsFd::as_fd(&sys::open_dir_path(&dir)?)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} cannot hold volumes: its file system gives no usable file handles ({e}); \
                     put the data dir on ext4, xfs, btrfs or tmpfs",
                    dir.display()
                ),
            )
        })?;
        let key_path = dir.join("handle.key");
        let key = match std::fs::read(&key_path) {
            Ok(k) if k.len() == 32 => k,
            _ => {
                let k: [u8; 32] = rand::random();
                let tmp = dir.join("handle.key.tmp");
                {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create(true)
                        .truncate(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    f.write_all(&k)?;
                    f.sync_all()?;
                }
                std::fs::rename(&tmp, &key_path)?;
                k.to_vec()
            }
        };
        let mut k = [0u8; 32];
        k.copy_from_slice(&key);
        Ok(VolumeStore {
            dir,
            sealer: Sealer::new(k),
            open: Mutex::new(HashMap::new()),
        })
    }

    fn volume_dir(&self, id: &str) -> io::Result<PathBuf> {
        if !fastvm_types::volume::is_volume_id(id) {
            return Err(invalid(id));
        }
        Ok(self.dir.join(id))
    }

    fn write_meta(&self, id: &str, size_bytes: u64, read_only: bool) -> io::Result<()> {
        let dir = self.volume_dir(id)?;
        let meta = Meta {
            size_bytes,
            read_only,
        };
        let tmp = dir.join("meta.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&meta)?)?;
        std::fs::rename(tmp, dir.join("meta.json"))
    }

    /// Creates volume `id` (idempotent: an existing one keeps its files and
    /// takes the new size and mode).
    pub fn create(
        &self,
        id: &str,
        size_bytes: u64,
        read_only: bool,
    ) -> io::Result<Arc<HostVolume>> {
        let dir = self.volume_dir(id)?;
        std::fs::create_dir_all(dir.join("data"))?;
        if !dir.join("meta.json").exists() {
            self.write_meta(id, size_bytes, read_only)?;
        }
        self.update(id, size_bytes, read_only)
    }

    /// Volume `id` of this host (opened on first use); `NotFound` when it
    /// was never created here.
    pub fn get(&self, id: &str) -> io::Result<Arc<HostVolume>> {
        let dir = self.volume_dir(id)?;
        let mut open = self
            .open
            .lock()
            .map_err(|_| io::Error::other("volume table poisoned"))?;
        if let Some(v) = open.get(id) {
            return Ok(v.clone());
        }
        let meta: Meta =
            serde_json::from_slice(&std::fs::read(dir.join("meta.json"))?).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("{id} meta.json: {e}"))
            })?;
        let vol = Arc::new(HostVolume::open(
            id,
            &dir.join("data"),
            meta.size_bytes,
            meta.read_only,
        )?);
        open.insert(id.to_owned(), vol.clone());
        Ok(vol)
    }

    /// New size and mode of volume `id`, effective at once in every guest.
    pub fn update(
        &self,
        id: &str,
        size_bytes: u64,
        read_only: bool,
    ) -> io::Result<Arc<HostVolume>> {
        let vol = self.get(id)?;
        self.write_meta(id, size_bytes, read_only)?;
        vol.set_size_bytes(size_bytes);
        vol.set_read_only(read_only);
        Ok(vol)
    }

    /// Removes volume `id` and its files (gone already: fine).
    pub fn delete(&self, id: &str) -> io::Result<()> {
        let dir = self.volume_dir(id)?;
        if let Ok(mut open) = self.open.lock() {
            open.remove(id);
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// A new, empty export for one VM.
    pub fn export(&self) -> ExportFs {
        ExportFs::new(self.sealer.clone())
    }
}

/// A running NFS server for one VM's export; stops when dropped.
#[derive(Debug)]
pub struct NfsServer {
    task: tokio::task::JoinHandle<()>,
    addr: SocketAddr,
}

impl NfsServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for NfsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves `fs` on `addr` inside network namespace `netns` (`None`: this
/// process's own namespace, for tests).
pub async fn serve<F>(
    netns: Option<&str>,
    addr: SocketAddr,
    fs: F,
) -> crate::error::Result<NfsServer>
where
    F: nfs3_server::vfs::NfsFileSystem<Handle = VolHandle> + 'static,
{
    let rt = tokio::runtime::Handle::current();
    let bind = move || {
        // The socket is made by the thread that polls the bind: this one, in
        // the namespace; it is registered with the worker's runtime.
        rt.block_on(NFSTcpListener::bind(&addr.to_string(), fs))
    };
    let listener = match netns {
        Some(ns) => crate::net::netns::on_thread_in(ns, bind).await?,
        None => tokio::task::spawn_blocking(bind)
            .await
            .map_err(|e| crate::error::Error::Network(format!("NFS bind thread: {e}")))?
            .map_err(|e| crate::error::Error::Network(format!("NFS listener on {addr}: {e}")))?,
    };
    let addr = SocketAddr::new(listener.get_listen_ip(), listener.get_listen_port());
    let task = tokio::spawn(async move {
        if let Err(e) = listener.handle_forever().await {
            tracing::warn!(%addr, error = %e, "volume NFS server stopped");
        }
    });
    Ok(NfsServer { task, addr })
}

#[cfg(test)]
mod tests;
