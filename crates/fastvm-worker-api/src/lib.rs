//! The boundary between the Fast VM control plane and the hosts that run VMs.
//!
//! ```text
//!  control plane (fastvm-server)           worker host (fastvm worker)
//!    lifecycle, proxy, SSH, console          service::router(LocalWorker)
//!        |  dyn Worker                           ^   internal worker API
//!        |-- LocalWorker (same process)          |   (HTTP/1.1, bearer token,
//!        '-- RemoteWorker (client.rs) -----------'    upgrades for streams: wire.rs)
//!  cluster.rs: registration, heartbeats, per-worker tokens (fencing)
//! ```
//!
//! This crate holds the [`Worker`] trait and every type that crosses it, so
//! the control plane never sees the worker crate's types, and both ends of
//! the remote protocol. It knows nothing of QEMU.

pub mod client;
pub mod cluster;
pub mod exec;
pub mod machines;
pub mod service;
pub mod terminal;
pub mod wire;
pub mod worker;

pub use client::{connect, RemoteWorker, WorkerEndpoint};
pub use exec::{ExecEvent, ExecRequest, ExitStatus};
pub use machines::{MachineType, UnknownMachineType};
pub use terminal::{PtyEvent, PtyExit, PtyInput, PtySession, PtySpec, PTY_INPUT_QUEUE};
pub use worker::{
    builder_vm_id, BucketAttach, ByteStream, DetachNote, DockerfileImport, ExecEvents, GuestIo,
    GuestStream, ImageImport, ImportNote, ImportSink, ImportedImage, VmSpec, VmState, Worker,
    WorkerError, WorkerStats,
};
