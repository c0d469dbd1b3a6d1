//! Image imports of the runtime: an OCI image becomes a user snapshot.
//!
//! ```text
//!  pull      registry -> <data>/oci/blobs (layers cached by digest)
//!  export    layers applied in order into <data>/imports/<id>/root
//!            (crate::oci::layer: never writes outside that directory)
//!  saving    mkfs.ext4 -d root (at the snapshot's full disk size, so no
//!            tool of the image is needed to grow it) -> qemu-img convert
//!            -> <data>/layers/<uuid>.qcow2, the frozen base of the disk
//!  warming   boot VM import-<id> over that base (our kernel, our
//!            initramfs: the agent is PID 1, the image needs nothing of
//!            ours), wait for the agent, capture it as the snapshot,
//!            delete the VM
//! ```
//!
//! Every step cleans up after itself when it fails or when the future is
//! dropped (a cancelled import): the scratch directory goes with its guard,
//! the build VM with [`BuildVm`], child processes are killed on drop.

use super::{CreateVm, GuestDefaults, Runtime};
use crate::error::{Error, IoContext, Result};
use crate::oci::layer::{self, ApplyStats, Limits};
use crate::oci::registry::{PullRequest, PulledImage, Puller};
use crate::timeouts;
use fastvm_worker_api::{ImageImport, ImportNote, ImportSink, ImportedImage};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Budget of `mkfs.ext4 -d` and `qemu-img convert` of one imported disk.
const DISK_TOOL: Duration = Duration::from_secs(20 * 60);
/// Imports one worker runs at once; more wait (their event log says so).
pub(super) const CONCURRENT_IMPORTS: usize = 2;
/// Most tar entries of one image (all layers).
const MAX_ENTRIES: u64 = 4_000_000;

pub(super) fn import_err(msg: impl Into<String>) -> Error {
    Error::Import(msg.into())
}

/// What an import produces: its id, the snapshot, the snapshot's shape.
pub(super) struct Target<'a> {
    pub import_id: &'a str,
    pub snapshot_id: String,
    pub machine: &'static str,
    pub disk_gib: u32,
}

/// Import ids name VMs and directories: UUID characters only.
pub(super) fn check_import_id(id: &str) -> Result<()> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(import_err(format!("import id {id:?} is not usable")));
    }
    Ok(())
}

/// Sends phase events and log lines to the caller.
pub(super) struct Progress {
    pub sink: ImportSink,
}

impl Progress {
    pub fn event(&self, phase: &str, status: &str, message: Option<String>) {
        (self.sink)(ImportNote::Event {
            phase: phase.into(),
            status: status.into(),
            message,
        });
    }
    pub fn log(&self, line: impl Into<String>) {
        (self.sink)(ImportNote::Log { line: line.into() });
    }
}

/// The build VM: deleted when dropped (also when the import is cancelled).
pub(super) struct BuildVm {
    pub runtime: Arc<Runtime>,
    pub id: String,
}

impl Drop for BuildVm {
    fn drop(&mut self) {
        let (rt, id) = (self.runtime.clone(), self.id.clone());
        tokio::spawn(async move {
            match rt.delete(&id).await {
                Ok(()) | Err(Error::NoSuchVm(_)) => {}
                Err(e) => {
                    tracing::warn!(vm = %id, error = %e, "removing an import's build VM failed")
                }
            }
        });
    }
}

/// The import's scratch directory: removed when dropped. The flag tells an
/// unpack still running on a blocking thread to stop (and remove what it
/// wrote after this removal).
pub(super) struct Scratch(pub PathBuf, pub Arc<AtomicBool>);

impl Drop for Scratch {
    fn drop(&mut self) {
        self.1.store(true, Ordering::SeqCst);
        let dir = self.0.clone();
        // Blocking removal of a large tree: off the async threads.
        std::thread::spawn(move || {
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}

/// `-E`/`-O` of `mkfs.ext4 -d`: no journal-init or inode-table writes now
/// (the guest kernel finishes them lazily), so a 10 GiB file costs what its
/// contents cost.
const MKFS_EXTENDED: &str = "lazy_itable_init=1,lazy_journal_init=1";

impl Runtime {
    /// See [`fastvm_worker_api::Worker::import_image`].
    pub async fn import_image(
        self: &Arc<Self>,
        job: &ImageImport,
        sink: ImportSink,
    ) -> Result<ImportedImage> {
        let result = {
            let _cache = self.layer_cache.read().await;
            self.import_image_now(job, sink).await
        };
        self.prune_layer_cache();
        result
    }

    /// Prune the layer cache to its cap, unless an import is running.
    pub(super) fn prune_layer_cache(&self) {
        let Ok(guard) = self.layer_cache.clone().try_write_owned() else {
            return;
        };
        let (root, cap) = (self.cfg.data_dir.join("oci"), self.cfg.layer_cache_bytes);
        tokio::task::spawn_blocking(move || {
            let _guard = guard;
            match crate::oci::cache::prune(&root, cap) {
                Ok(p) if p.removed > 0 => tracing::info!(
                    removed = p.removed,
                    removed_bytes = p.removed_bytes,
                    kept_bytes = p.kept_bytes,
                    "layer cache pruned"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning the layer cache failed"),
            }
        });
    }

    async fn import_image_now(
        self: &Arc<Self>,
        job: &ImageImport,
        sink: ImportSink,
    ) -> Result<ImportedImage> {
        let progress = Progress { sink };
        check_import_id(&job.import_id)?;
        let _slot = self.import_slot(&progress).await?;
        // A kernel and initramfs to boot with (built on first use).
        self.image().await?;

        progress.event("pull", "started", Some(format!("pulling {}", job.image)));
        let puller = Puller::new(
            self.cfg.data_dir.join("oci"),
            self.cfg.insecure_registries.clone(),
        );
        let req = PullRequest {
            image: &job.image,
            platform: job.platform.as_deref(),
            username: job.registry_username.as_deref(),
            password: job.registry_password.as_deref(),
        };
        let log = |line: String| progress.log(line);
        let pulled = match puller.pull(&req, &log).await {
            Ok(p) => p,
            Err(e) => {
                progress.event("pull", "failed", Some(e.to_string()));
                return Err(import_err(e.to_string()));
            }
        };
        progress.event(
            "pull",
            "completed",
            Some(format!(
                "{} layers ({} from the cache), {} bytes downloaded, manifest {}",
                pulled.layers.len(),
                pulled.cached_layers,
                pulled.downloaded_bytes,
                pulled.manifest_digest
            )),
        );
        let target = Target {
            import_id: &job.import_id,
            snapshot_id: job.snapshot.to_string(),
            machine: job.machine.name,
            disk_gib: job.disk_gib,
        };
        self.snapshot_of(&target, pulled, &progress).await
    }

    /// One of the worker's import slots, waiting (and saying so) when all
    /// are taken.
    pub(super) async fn import_slot(
        &self,
        progress: &Progress,
    ) -> Result<tokio::sync::SemaphorePermit<'_>> {
        match self.import_slots.try_acquire() {
            Ok(slot) => Ok(slot),
            Err(_) => {
                progress.log(format!(
                    "waiting for one of the {CONCURRENT_IMPORTS} import slots of this worker"
                ));
                self.import_slots
                    .acquire()
                    .await
                    .map_err(|_| import_err("the worker is shutting down"))
            }
        }
    }

    /// The common tail of image imports and Dockerfile builds: an image in
    /// the blob cache becomes the snapshot (export, saving, warming).
    pub(super) async fn snapshot_of(
        self: &Arc<Self>,
        job: &Target<'_>,
        pulled: PulledImage,
        progress: &Progress,
    ) -> Result<ImportedImage> {
        let id = job.import_id;
        let snapshot_id = job.snapshot_id.clone();
        // export: layers -> directory tree
        progress.event("export", "started", None);
        let work = self.cfg.data_dir.join("imports").join(id);
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).ctx(|| "create the import's scratch directory".into())?;
        // Root's only: an image's setuid files and device nodes sit there until
        // they are in the disk image.
        if let Some(imports) = work.parent() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(imports, std::fs::Permissions::from_mode(0o700))
                .ctx(|| "restrict the imports directory".into())?;
        }
        let gone = Arc::new(AtomicBool::new(false));
        let scratch = Scratch(work.clone(), gone.clone());
        let work2 = work.clone();
        let root = work.join("root");
        // Unpacking needs room for the tree, the ext4 image and the qcow2
        // layer at once: at most a third of the free space, and the disk.
        let disk_bytes = u64::from(job.disk_gib) << 30;
        let free = crate::disk::free_bytes(&self.cfg.data_dir);
        let space_bound = free.filter(|f| f / 3 < disk_bytes);
        let disk_bytes = space_bound.map_or(disk_bytes, |f| f / 3);
        let layers = pulled.layers.clone();
        let root2 = root.clone();
        let sink2 = progress.sink.clone();
        let applied =
            tokio::task::spawn_blocking(move || -> std::result::Result<ApplyStats, String> {
                std::fs::create_dir_all(&root2)
                    .map_err(|e| format!("cannot create the root directory: {e}"))?;
                let limits = Limits {
                    max_bytes: disk_bytes,
                    max_entries: MAX_ENTRIES,
                };
                let mut total = ApplyStats::default();
                let n = layers.len();
                for (i, l) in layers.iter().enumerate() {
                    if gone.load(Ordering::SeqCst) {
                        let _ = std::fs::remove_dir_all(&work2);
                        return Err("cancelled".into());
                    }
                    let f = std::fs::File::open(&l.path).map_err(|e| {
                        format!("layer {} is missing from the cache: {e}", l.digest)
                    })?;
                    let mut stats = ApplyStats::default();
                    let remaining = Limits {
                        max_bytes: limits.max_bytes.saturating_sub(total.bytes),
                        max_entries: limits.max_entries.saturating_sub(total.entries),
                    };
                    layer::apply_layer(
                        &root2,
                        std::io::BufReader::with_capacity(1 << 20, f),
                        l.compression,
                        &remaining,
                        &mut stats,
                    )
                    .map_err(|e| match (&e, space_bound) {
                        (layer::LayerError::TooLarge { .. }, Some(free)) => format!(
                            "the image does not fit in this worker's free disk space ({} MiB free; unpacking needs about 3 times the image's size)",
                            free >> 20
                        ),
                        _ => format!("layer {}/{n} ({}): {e}", i + 1, l.digest),
                    })?;
                    sink2(ImportNote::Log {
                        line: format!(
                            "layer {}/{n}: {} entries, {} bytes{}",
                            i + 1,
                            stats.entries,
                            stats.bytes,
                            if stats.skipped.is_empty() {
                                String::new()
                            } else {
                                format!(", skipped: {}", stats.skipped.join("; "))
                            }
                        ),
                    });
                    total.entries += stats.entries;
                    total.bytes += stats.bytes;
                    total.skipped.extend(stats.skipped);
                }
                layer::ensure_mount_points(&root2)
                    .map_err(|e| format!("cannot prepare the root directory: {e}"))?;
                Ok(total)
            })
            .await
            .map_err(|e| import_err(format!("unpacking stopped: {e}")))?;
        let stats = match applied {
            Ok(s) => s,
            Err(e) => {
                progress.event("export", "failed", Some(e.clone()));
                return Err(import_err(e));
            }
        };
        progress.event(
            "export",
            "completed",
            Some(format!("{} entries, {} bytes", stats.entries, stats.bytes)),
        );

        // saving: tree -> ext4 -> qcow2 base layer
        progress.event("saving", "started", None);
        let base = self.layer_path();
        let _pinned = self.pin_layers(vec![base.clone()]).await;
        if let Err(e) = make_disk(
            &root,
            &work.join("disk.ext4"),
            &base,
            job.disk_gib,
            progress,
        )
        .await
        {
            let _ = std::fs::remove_file(&base);
            progress.event("saving", "failed", Some(e.to_string()));
            return Err(e);
        }
        drop(scratch);
        progress.event(
            "saving",
            "completed",
            Some(format!("root disk of {} GiB", job.disk_gib)),
        );

        // warming: boot once, capture
        progress.event("warming", "started", None);
        let defaults = GuestDefaults {
            env: pulled.defaults.env.clone(),
            working_dir: pulled.defaults.working_dir.clone(),
            user: pulled.defaults.user.clone(),
        };
        // The build VM is named after the import (a UUID, like every VM id).
        let vm_id = id.to_owned();
        let build_vm = BuildVm {
            runtime: self.clone(),
            id: vm_id.clone(),
        };
        let create = CreateVm {
            id: Some(vm_id.clone()),
            machine: job.machine.to_owned(),
            disk_gib: Some(job.disk_gib),
            ..Default::default()
        };
        let t0 = std::time::Instant::now();
        let booted = self
            .boot_fresh_with(create, None, super::RootDisk::Layer(&base), &defaults)
            .await;
        if let Err(e) = booted {
            let msg = format!("the image did not boot: {e}");
            progress.event("warming", "failed", Some(msg.clone()));
            drop(build_vm);
            return Err(import_err(msg));
        }
        progress.log(format!("booted in {} ms", t0.elapsed().as_millis()));
        let captured = self.snapshot(&vm_id, Some(snapshot_id)).await;
        drop(build_vm);
        if let Err(e) = captured {
            let msg = format!("capturing the booted image failed: {e}");
            progress.event("warming", "failed", Some(msg.clone()));
            return Err(import_err(msg));
        }
        progress.event("warming", "completed", None);
        Ok(ImportedImage {
            manifest_digest: pulled.manifest_digest,
            env: defaults.env,
            working_dir: defaults.working_dir,
            user: defaults.user,
        })
    }
}

/// `mkfs.ext4 -d root` into `ext4` (sparse, `disk_gib` large), then convert
/// it to the qcow2 layer `base` (only the written blocks).
async fn make_disk(
    root: &Path,
    ext4: &Path,
    base: &Path,
    disk_gib: u32,
    progress: &Progress,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let mut mkfs = tokio::process::Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-L", "fastvm-root", "-E", MKFS_EXTENDED, "-d"])
        .arg(root)
        .arg(ext4)
        .arg(format!("{disk_gib}G"))
        .stdin(std::process::Stdio::null());
    let out = timeouts::output_within(&mut mkfs, DISK_TOOL, "mkfs.ext4").await?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        // mkfs names host paths: keep only its last line, without them.
        let last = err
            .lines()
            .last()
            .unwrap_or("")
            .replace(&root.display().to_string(), "<root>");
        return Err(import_err(format!(
            "making the root filesystem failed: {last}"
        )));
    }
    progress.log(format!("mkfs.ext4: {} ms", t0.elapsed().as_millis()));
    let t1 = std::time::Instant::now();
    let mut convert = tokio::process::Command::new("qemu-img");
    convert
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(ext4)
        .arg(base)
        .stdin(std::process::Stdio::null());
    let out = timeouts::output_within(&mut convert, DISK_TOOL, "qemu-img convert").await?;
    let _ = std::fs::remove_file(ext4);
    if !out.status.success() {
        return Err(import_err(format!(
            "converting the root disk failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    progress.log(format!("qemu-img convert: {} ms", t1.elapsed().as_millis()));
    Ok(())
}
