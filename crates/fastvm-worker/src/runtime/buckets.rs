//! Bucket mounts of the runtime: serve a customer's bucket to a running VM
//! (through the VM's NFS export, next to its volumes), rotate the
//! credentials, detach.
//!
//! ```text
//!  attach(vm, bm, uri, path, ro, creds):  VM running, has a network
//!     -> client of the bucket from creds; one listing proves they work
//!     -> the VM's export serves /bm_<hex> (server started at first use)
//!     -> agent: Mount <gateway>:/bm_<hex> at path (nfs)
//!        any step failed -> nothing stays served; the error says why
//!  rotate(vm, bm, creds):  new client, checked, swapped in (no remount)
//!  detach(vm, bm):  agent: Unmount path (busy -> lazily, with a note)
//!     -> the export stops serving it
//! ```

use super::Runtime;
use crate::buckets::{self, BucketFs};
use crate::error::{Error, Result};
use fastvm_types::bucket_mount::BucketMountCredentials;
use fastvm_worker_api::DetachNote;
use std::collections::BTreeMap;

fn bucket_err(msg: impl Into<String>) -> Error {
    Error::Volume(msg.into())
}

impl Runtime {
    /// Mounts bucket `uri` at `path` in running VM `id` as bucket mount
    /// `mount` (`bm_<hex>`).
    #[allow(clippy::too_many_arguments)]
    pub async fn attach_bucket(
        &self,
        id: &str,
        mount: &str,
        uri: &str,
        path: &str,
        read_only: bool,
        credentials: &BucketMountCredentials,
    ) -> Result<()> {
        let key = crate::volumes::handle::bucket_mount_key(mount)
            .ok_or_else(|| bucket_err(format!("{mount:?} is not a bucket-mount id")))?;
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        Self::require(
            &vm,
            fastvm_worker_api::VmState::Running,
            "attaching a bucket",
        )?;
        let (parsed, store) = buckets::open_uri(uri, credentials).map_err(bucket_err)?;
        buckets::check_access(store.as_ref(), &parsed)
            .await
            .map_err(bucket_err)?;
        let net = vm
            .net
            .lock()
            .ok()
            .and_then(|n| n.clone())
            .ok_or_else(|| bucket_err("the VM has no network to mount buckets over"))?;
        let staging = self.cfg.data_dir.join("buckets").join("staging");
        std::fs::create_dir_all(&staging)
            .map_err(|e| bucket_err(format!("bucket staging dir {}: {e}", staging.display())))?;
        let gw = net.addr.gateway4;
        let mut slot = vm.volumes.lock().await;
        let v = self.vm_export(&mut slot, &net).await?;
        if let Some(at) = v.buckets.get(mount) {
            return Err(bucket_err(format!(
                "bucket mount {mount} is already mounted in this VM at {at}"
            )));
        }
        let fs = BucketFs::new(
            key,
            buckets::epoch(),
            store,
            parsed.prefix.as_deref(),
            read_only,
            staging,
        );
        v.export.add_bucket(mount, fs);
        let mounted = match self.agent(&vm).await {
            Ok(agent) => {
                agent
                    .mount(
                        &format!("{gw}:/{mount}"),
                        path,
                        "nfs",
                        &super::volumes::mount_options(gw),
                        read_only,
                    )
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = mounted {
            v.export.remove_bucket(mount);
            return Err(e);
        }
        v.buckets.insert(mount.to_owned(), path.to_owned());
        tracing::info!(vm = %id, %mount, bucket = %parsed.bucket, %path, read_only, "bucket mounted");
        Ok(())
    }

    /// New credentials for bucket mount `mount` of VM `id`: checked against
    /// the bucket, then used for the next request (no remount).
    pub async fn rotate_bucket(
        &self,
        id: &str,
        mount: &str,
        uri: &str,
        credentials: &BucketMountCredentials,
    ) -> Result<()> {
        let vm = self.vm(id)?;
        let fs = {
            let slot = vm.volumes.lock().await;
            slot.as_ref()
                .and_then(|v| v.export.bucket(mount))
                .ok_or_else(|| {
                    bucket_err(format!("bucket mount {mount} is not mounted in VM {id}"))
                })?
        };
        let (parsed, store) = buckets::open_uri(uri, credentials).map_err(bucket_err)?;
        buckets::check_access(store.as_ref(), &parsed)
            .await
            .map_err(bucket_err)?;
        fs.set_store(store);
        tracing::info!(vm = %id, %mount, "bucket credentials rotated");
        Ok(())
    }

    /// Unmounts bucket mount `mount` from VM `id` and stops serving it; a
    /// note when processes still used it or the guest did not answer.
    pub async fn detach_bucket(&self, id: &str, mount: &str) -> Result<Option<DetachNote>> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        let mut slot = vm.volumes.lock().await;
        let not_mounted = || bucket_err(format!("bucket mount {mount} is not mounted in VM {id}"));
        let v = slot.as_mut().ok_or_else(not_mounted)?;
        let path = v.buckets.get(mount).cloned().ok_or_else(not_mounted)?;
        let note = self.unmount_in_guest(&vm, &path).await;
        v.export.remove_bucket(mount);
        v.buckets.remove(mount);
        tracing::info!(vm = %id, %mount, %path, note = ?note, "bucket mount detached");
        Ok(note)
    }

    /// Bucket mounts served to VM `id`: id -> the last error its bucket
    /// answered (None: no error since mounting or the last rotation).
    pub async fn bucket_health(&self, id: &str) -> Result<BTreeMap<String, Option<String>>> {
        let vm = self.vm(id)?;
        let slot = vm.volumes.lock().await;
        let Some(v) = slot.as_ref() else {
            return Ok(BTreeMap::new());
        };
        Ok(v.buckets
            .keys()
            .map(|m| (m.clone(), v.export.bucket(m).and_then(|b| b.last_error())))
            .collect())
    }
}
