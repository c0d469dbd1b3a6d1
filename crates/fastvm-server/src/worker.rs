//! The control plane's view of a VM host: the [`Worker`] trait and the types
//! that cross it, from fastvm-worker-api (re-exported here so the control
//! plane's modules name them in one place). Implementations:
//! `fastvm_worker::LocalWorker` (the embedded worker of a single-host
//! server) and [`fastvm_worker_api::RemoteWorker`] (a `fastvm worker` host).

pub use fastvm_worker_api::exec::{ExecEvent, ExecRequest};
pub use fastvm_worker_api::machines::MachineType;
pub use fastvm_worker_api::terminal::*;
pub use fastvm_worker_api::worker::*;
