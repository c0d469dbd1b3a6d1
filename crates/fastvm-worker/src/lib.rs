//! The Fast VM worker: everything that runs on a VM host.
//!
//! ```text
//!  Runtime (runtime.rs)         VMs of this host: create, adopt, exec, pause, delete
//!    |-- Hypervisor (hypervisor.rs)   trait; QemuMicrovm (qemu.rs) over QMP (qmp.rs)
//!    |-- ImageStore (images.rs)       kernel + initramfs + rootfs, built from Debian
//!    |-- catalog.rs                   machine types (c1m2 ...)
//!    |-- AgentClient (agent.rs)       the guest agent over virtio-serial; exec.rs (PTYs too)
//!    |-- ConsoleFollower (console.rs) the read-only serial console (capped console.log)
//!    |-- SnapshotStore (snapshot_store.rs) user snapshots in S3, restorable on other workers
//!    |-- jail.rs, cgroup.rs           confinement of QEMU: uid, fds, files, cgroup limits
//!    |-- timeouts.rs                  budgets of QMP commands and child processes
//!    '-- LocalWorker (local.rs)       the Runtime behind fastvm-worker-api's Worker trait
//! ```
//!
//! Each VM is one QEMU process that outlives the worker: its state directory
//! (`<data>/vms/<id>/`) holds everything needed to find it again, and
//! [`runtime::Runtime::open`] re-adopts the live ones.

pub mod accel;
pub mod agent;
pub mod buckets;
pub mod catalog;
pub mod cgroup;
pub mod console;
pub mod disk;
pub mod error;
pub mod exec;
pub mod hypervisor;
pub mod images;
pub mod jail;
pub mod local;
pub mod migstream;
pub mod net;
pub mod oci;
pub mod qemu;
pub mod qmp;
pub mod ram_capture;
pub mod runtime;
pub mod snapshot_store;
pub mod timeouts;
pub mod volumes;

pub use accel::Accel;
pub use catalog::MachineType;
pub use error::{Error, Result};
pub use exec::{ExecEvent, ExecOutput, ExecRequest};
pub use local::LocalWorker;
pub use runtime::{Runtime, RuntimeConfig, VmInfo, VmState};
