//! Errors of the worker. Each variant's message is what a user or operator sees.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown machine type {0:?}; known types: c1m2, c2m4, c4m8, c8m16")]
    UnknownMachineType(String),
    #[error("no VM with id {0}")]
    NoSuchVm(String),
    #[error("no snapshot with id {0}")]
    NoSuchSnapshot(String),
    #[error("VM {id} is {state}, {action} needs it {need}")]
    WrongState {
        id: String,
        state: String,
        action: &'static str,
        need: &'static str,
    },
    #[error("the VM's agent is not reachable: {0}")]
    AgentUnavailable(String),
    #[error("guest agent protocol violation: {0}")]
    Protocol(String),
    /// A volume operation failed (no such volume on this host, the guest
    /// could not mount it, ...); the message says which and why.
    #[error("{0}")]
    Volume(String),
    #[error("invalid exec request: {0}")]
    InvalidExec(String),
    /// The VM has [`crate::agent::MAX_STREAMS`] execs and guest connections open.
    #[error("{0}")]
    TooManyStreams(String),
    /// A connection the agent was asked to dial inside the guest failed.
    #[error("{0}")]
    GuestConnect(String),
    /// The host cannot run VMs as configured (e.g. a data dir VM processes
    /// cannot reach); the message says what to change.
    #[error("{0}")]
    HostSetup(String),
    #[error("QEMU failed: {0}")]
    Qemu(String),
    #[error("QMP error: {0}")]
    Qmp(String),
    /// A QMP command or a child process did not finish within its budget
    /// (see [`crate::timeouts`]); a child process was killed.
    #[error("{what} did not finish within {after:?}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
    /// The VM's QEMU stopped answering (wedged): the VM is marked failed
    /// (`Error` state) and only `delete` helps.
    #[error("VM {id} is not responding: {detail}; it is marked failed, delete it")]
    Unresponsive { id: String, detail: String },
    #[error("building the guest image failed: {0}")]
    ImageBuild(String),
    #[error("the agent binary was not found (looked in {looked:?}); build it with `cargo build --release -p fastvm-agent --target x86_64-unknown-linux-musl` or set FASTVM_AGENT_BIN")]
    AgentBinaryMissing { looked: Vec<PathBuf> },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("VM networking failed: {0}")]
    Network(String),
    #[error("invalid firewall policy: {0}")]
    InvalidFirewall(String),
    /// The snapshot store (S3) failed: a transfer, a listing, a bad document.
    #[error("snapshot store: {0}")]
    SnapshotStore(String),
    /// A snapshot captured by a worker whose QEMU build, accelerator, CPU
    /// model or device set differs from this one's.
    #[error("snapshot {id} cannot be restored on this worker: it was captured with compat key {snapshot}, this worker has {worker} (QEMU build, accelerator, CPU model and device set must match)")]
    IncompatibleSnapshot {
        id: String,
        snapshot: String,
        worker: String,
    },
    /// An image import failed for a reason the user can act on (the
    /// message names no host paths and no credentials).
    #[error("{0}")]
    Import(String),
    #[error("corrupt state file {path}: {message}")]
    CorruptState { path: PathBuf, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach context to an io::Error.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| Error::Io {
            context: context(),
            source,
        })
    }
}

impl From<fastvm_worker_api::UnknownMachineType> for Error {
    fn from(e: fastvm_worker_api::UnknownMachineType) -> Self {
        Error::UnknownMachineType(e.0)
    }
}
