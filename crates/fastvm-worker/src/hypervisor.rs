//! The hypervisor abstraction. The runtime only speaks this trait; QEMU
//! `microvm` ([`crate::qemu`]) is the one driver today, and a Firecracker or
//! Cloud Hypervisor driver would slot in beside it.

use crate::accel::Accel;
use crate::catalog::MachineType;
use crate::error::Result;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Everything needed to start one VM process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub id: String,
    pub machine: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Image id (content hash of kernel, initrd and rootfs).
    pub image_id: String,
    /// The VM's writable disk layer (a qcow2 overlay in `<data>/layers/`).
    pub disk: PathBuf,
    /// Guest RAM backed by this file instead of anonymous memory.
    #[serde(default)]
    pub ram: Option<RamFile>,
    /// The VM's network device: QEMU runs in this namespace, where the
    /// worker opens its tap for it.
    #[serde(default)]
    pub net: Option<NetLaunch>,
    /// The uid (and gid) the VM's QEMU runs as (see [`crate::jail`]);
    /// `None`: as the worker's own user (a worker that is not root, or a
    /// record from before confinement).
    #[serde(default)]
    pub uid: Option<u32>,
    /// The machine has the legacy i8254 PIT. QEMU runs its reset-state
    /// square wave (a timer every 27 ms, ~36 main-loop wakeups/s) even when
    /// the guest never uses it, so VMs go without it where the guest does
    /// not need it ([`crate::qemu::pit_needed`]). Part of the device set: a
    /// snapshot restores with the value it was taken with (records from
    /// before this field had the PIT).
    #[serde(default = "with_pit")]
    pub pit: bool,
}

fn with_pit() -> bool {
    true
}

/// The virtio-net device of a VM and where its tap lives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetLaunch {
    /// Network namespace QEMU is started in.
    pub netns: String,
    /// Tap device inside that namespace.
    pub tap: String,
    pub mac: String,
}

/// File-backed guest RAM.
///
/// * `shared`: writes go to the file (a golden VM writes its RAM image).
/// * private: a copy-on-write mapping of the file (restored VMs share the
///   golden RAM pages through the page cache until they write to them).
///
/// Shared RAM is skipped by migration (`x-ignore-shared`), so a snapshot of a
/// VM with shared RAM carries only device state; its RAM is the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamFile {
    pub path: PathBuf,
    pub shared: bool,
}

impl LaunchSpec {
    pub fn new(
        id: &str,
        machine: MachineType,
        disk_gib: u32,
        accel: Accel,
        image: &crate::images::GuestImage,
        disk: PathBuf,
    ) -> Self {
        LaunchSpec {
            id: id.to_owned(),
            machine: machine.name.to_owned(),
            vcpus: machine.vcpus,
            memory_mib: machine.memory_mib,
            disk_gib,
            accel,
            kernel: image.kernel.clone(),
            initrd: image.initrd.clone(),
            image_id: image.id.clone(),
            disk,
            ram: None,
            net: None,
            uid: None,
            pit: crate::qemu::pit_needed(accel),
        }
    }
}

/// The files of one VM's state directory (root's; QEMU gets its sockets as
/// fds and may only connect to `migrate.sock` while a capture runs).
#[derive(Debug, Clone)]
pub struct VmPaths {
    pub dir: PathBuf,
}

impl VmPaths {
    pub fn new(dir: impl AsRef<Path>) -> Self {
        VmPaths {
            dir: dir.as_ref().to_path_buf(),
        }
    }
    pub fn spec(&self) -> PathBuf {
        self.dir.join("spec.json")
    }
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn agent(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    pub fn hypervisor_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
}

#[async_trait]
pub trait Hypervisor: Send + Sync {
    fn name(&self) -> &'static str;
    /// Start the VM process with its root disk at `spec.disk`; returns when
    /// the process runs and its control channel answers. The process must
    /// outlive the caller. With `incoming`, the VM's state is loaded from
    /// that memory file (written by [`VmProcess::snapshot`] of a VM with the
    /// same machine shape) and the VM is left paused.
    async fn start(
        &self,
        spec: &LaunchSpec,
        paths: &VmPaths,
        incoming: Option<&Path>,
    ) -> Result<Box<dyn VmProcess>>;
    /// Find the process of a VM started earlier; `None` when it is gone.
    async fn adopt(&self, spec: &LaunchSpec, paths: &VmPaths)
        -> Result<Option<Box<dyn VmProcess>>>;
    /// Make ready ahead of the first restore what restores mapping RAM file
    /// `path` (a [`RamFile`] with `shared: false`) need.
    async fn prepare_ram(&self, _path: &Path) -> Result<()> {
        Ok(())
    }
    /// RAM file `path` is going away (its snapshot was deleted): drop what
    /// was kept for it. VMs restored from it keep running.
    fn forget_ram(&self, _path: &Path) {}
}

/// Where a capture put the guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamCapture {
    /// In the memory stream (or nowhere: shared file-backed RAM is the file).
    InStream,
    /// In the RAM file given to [`VmProcess::snapshot`]; the stream has the rest.
    File,
}

/// A running VM process.
#[async_trait]
pub trait VmProcess: Send + Sync {
    fn pid(&self) -> u32;
    /// Stop the vCPUs; memory stays.
    async fn pause(&self) -> Result<()>;
    async fn resume(&self) -> Result<()>;
    async fn is_paused(&self) -> Result<bool>;
    /// Capture the VM: its disk layer is frozen (the VM goes on writing to
    /// the new overlay `new_layer`, backed by the frozen one) and its memory
    /// and device state are written to `memory`. The VM is paused meanwhile
    /// and resumed afterwards if it was running, unless `leave_paused`.
    ///
    /// With `ram`, an empty file as large as the guest RAM, the RAM block's
    /// pages go into that file instead of `memory` (see [`crate::migstream`])
    /// when the driver can: the answer says where they went.
    async fn snapshot(
        &self,
        memory: &Path,
        ram: Option<&Path>,
        new_layer: &Path,
        leave_paused: bool,
    ) -> Result<RamCapture>;
    /// Stop the process now (no guest shutdown).
    async fn kill(&self) -> Result<()>;
    /// Resolves when the process has exited.
    async fn wait_exit(&self);
    fn has_exited(&self) -> bool;
}
