//! Everything one VM's NFS server serves: its volumes ([`ExportFs`]) and its
//! bucket mounts ([`BucketFs`]), side by side under one export root.
//!
//! ```text
//!  /                 the export root (ExportFs: lists the volumes)
//!  /vol_<hex>/...    a volume            handles: kinds 0 and 1 (handle.rs)
//!  /bm_<hex>/...     a bucket mount      handles: kind 2, routed to its BucketFs
//! ```

use super::fs::{DirListing, ExportFs};
use super::handle::{bucket_mount_key, open_bucket_handle, Sealer, VolHandle, VolumeKey};
use crate::buckets::BucketFs;
use nfs3_server::nfs3_types::nfs3::{
    createverf3, fattr3, filename3, nfspath3, nfsstat3, sattr3, stable_how,
};
use nfs3_server::vfs::{NfsFileSystem, NfsReadFileSystem};
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// One VM's export; cheap to clone, clones share their contents.
#[derive(Debug, Clone)]
pub struct VmExport {
    volumes: ExportFs,
    buckets: Arc<RwLock<BTreeMap<VolumeKey, BucketFs>>>,
}

enum Routed {
    Volumes,
    Bucket(BucketFs),
}

impl VmExport {
    pub fn new(volumes: ExportFs) -> VmExport {
        VmExport {
            volumes,
            buckets: Arc::default(),
        }
    }

    /// The volumes part.
    pub fn volumes(&self) -> &ExportFs {
        &self.volumes
    }

    /// Serve bucket mount `id` as `/<id>`.
    pub fn add_bucket(&self, id: &str, fs: BucketFs) -> bool {
        let Some(key) = bucket_mount_key(id) else {
            return false;
        };
        if let Ok(mut b) = self.buckets.write() {
            b.insert(key, fs);
            return true;
        }
        false
    }

    /// Stop serving bucket mount `id` (handles the guest holds go stale).
    pub fn remove_bucket(&self, id: &str) -> Option<BucketFs> {
        let key = bucket_mount_key(id)?;
        self.buckets.write().ok()?.remove(&key)
    }

    /// Bucket mount `id`'s file system, when served.
    pub fn bucket(&self, id: &str) -> Option<BucketFs> {
        let key = bucket_mount_key(id)?;
        self.buckets.read().ok()?.get(&key).cloned()
    }

    fn route(&self, h: &VolHandle) -> Result<Routed, nfsstat3> {
        match open_bucket_handle(h) {
            None => Ok(Routed::Volumes),
            Some((key, _, _)) => self
                .buckets
                .read()
                .ok()
                .and_then(|b| b.get(&key).cloned())
                .map(Routed::Bucket)
                .ok_or(nfsstat3::NFS3ERR_STALE),
        }
    }
}

impl NfsReadFileSystem for VmExport {
    type Handle = VolHandle;

    fn root_dir(&self) -> VolHandle {
        Sealer::export_root()
    }

    async fn lookup(&self, dir: &VolHandle, name: &filename3<'_>) -> Result<VolHandle, nfsstat3> {
        match self.route(dir)? {
            Routed::Bucket(b) => {
                // `..` of a bucket mount's root is the export root.
                if name.as_ref() == b".." && *dir == b.root() {
                    return Ok(Sealer::export_root());
                }
                b.lookup(dir, name.as_ref()).await
            }
            Routed::Volumes => {
                if *dir == Sealer::export_root() {
                    if let Some(b) = std::str::from_utf8(name.as_ref())
                        .ok()
                        .and_then(|n| self.bucket(n))
                    {
                        return Ok(b.root());
                    }
                }
                self.volumes.lookup(dir, name).await
            }
        }
    }

    async fn getattr(&self, id: &VolHandle) -> Result<fattr3, nfsstat3> {
        match self.route(id)? {
            Routed::Bucket(b) => b.getattr(id).await,
            Routed::Volumes => self.volumes.getattr(id).await,
        }
    }

    async fn read(
        &self,
        id: &VolHandle,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        match self.route(id)? {
            Routed::Bucket(b) => b.read(id, offset, count).await,
            Routed::Volumes => self.volumes.read(id, offset, count).await,
        }
    }

    #[allow(refining_impl_trait)]
    async fn readdirplus(&self, dir: &VolHandle, cookie: u64) -> Result<DirListing, nfsstat3> {
        match self.route(dir)? {
            Routed::Bucket(b) => b.readdirplus(dir, cookie).await,
            Routed::Volumes => self.volumes.readdirplus(dir, cookie).await,
        }
    }

    async fn readlink(&self, id: &VolHandle) -> Result<nfspath3<'_>, nfsstat3> {
        match self.route(id)? {
            Routed::Bucket(_) => Err(nfsstat3::NFS3ERR_INVAL),
            Routed::Volumes => self.volumes.readlink(id).await,
        }
    }
}

impl NfsFileSystem for VmExport {
    async fn setattr(&self, id: &VolHandle, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        match self.route(id)? {
            Routed::Bucket(b) => b.setattr(id, &setattr).await,
            Routed::Volumes => self.volumes.setattr(id, setattr).await,
        }
    }

    async fn write(
        &self,
        id: &VolHandle,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        match self.route(id)? {
            Routed::Bucket(b) => b.write(id, offset, data, stable).await,
            Routed::Volumes => self.volumes.write(id, offset, data, stable).await,
        }
    }

    async fn create(
        &self,
        dir: &VolHandle,
        name: &filename3<'_>,
        attr: sattr3,
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        match self.route(dir)? {
            Routed::Bucket(b) => b.create(dir, name.as_ref(), false).await,
            Routed::Volumes => self.volumes.create(dir, name, attr).await,
        }
    }

    async fn create_exclusive(
        &self,
        dir: &VolHandle,
        name: &filename3<'_>,
        verf: createverf3,
    ) -> Result<VolHandle, nfsstat3> {
        match self.route(dir)? {
            Routed::Bucket(b) => b.create(dir, name.as_ref(), true).await.map(|(h, _)| h),
            Routed::Volumes => self.volumes.create_exclusive(dir, name, verf).await,
        }
    }

    async fn mkdir(
        &self,
        dir: &VolHandle,
        name: &filename3<'_>,
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        match self.route(dir)? {
            Routed::Bucket(b) => b.mkdir(dir, name.as_ref()).await,
            Routed::Volumes => self.volumes.mkdir(dir, name).await,
        }
    }

    async fn remove(&self, dir: &VolHandle, name: &filename3<'_>) -> Result<(), nfsstat3> {
        match self.route(dir)? {
            Routed::Bucket(b) => b.remove(dir, name.as_ref()).await,
            Routed::Volumes => self.volumes.remove(dir, name).await,
        }
    }

    async fn rename<'a>(
        &self,
        from_dir: &VolHandle,
        from_name: &filename3<'a>,
        to_dir: &VolHandle,
        to_name: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        match (self.route(from_dir)?, self.route(to_dir)?) {
            (Routed::Bucket(a), Routed::Bucket(b)) if a.owns(to_dir) && b.owns(from_dir) => {
                a.rename(from_dir, from_name.as_ref(), to_dir, to_name.as_ref())
                    .await
            }
            (Routed::Volumes, Routed::Volumes) => {
                self.volumes
                    .rename(from_dir, from_name, to_dir, to_name)
                    .await
            }
            _ => Err(nfsstat3::NFS3ERR_XDEV),
        }
    }

    async fn symlink<'a>(
        &self,
        dir: &VolHandle,
        name: &filename3<'a>,
        target: &nfspath3<'a>,
        attr: &sattr3,
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        match self.route(dir)? {
            Routed::Bucket(_) => Err(nfsstat3::NFS3ERR_NOTSUPP),
            Routed::Volumes => self.volumes.symlink(dir, name, target, attr).await,
        }
    }

    async fn commit(&self, id: &VolHandle, offset: u64, count: u32) -> Result<(), nfsstat3> {
        match self.route(id)? {
            Routed::Bucket(b) => b.commit(id).await,
            Routed::Volumes => self.volumes.commit(id, offset, count).await,
        }
    }
}
