//! The machine catalog: named sizes of VMs. It lives in fastvm-worker-api,
//! shared with the control plane.

pub use fastvm_worker_api::machines::{MachineType, CATALOG, DEFAULT_DISK_GIB};
