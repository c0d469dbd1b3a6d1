//! The cluster's control messages between a `fastvm worker` host and the
//! control planes: registration, heartbeats, and the per-worker token.
//!
//! ```text
//!  worker                                   control plane (PostgreSQL)
//!    |-- POST /internal/v1/workers/register ---->  upsert row, generation += 1,
//!    |   Bearer <cluster secret>                  reconcile the worker's VMs
//!    |<-- RegisterResponse {generation, ...} ---|
//!    |-- POST /internal/v1/workers/{id}/heartbeat every heartbeat_interval_ms
//!    |   Bearer worker_token(secret, id, generation); 409 = stale: register again
//!    |<== internal worker API calls (service.rs), Bearer worker_token(...)
//! ```
//!
//! The per-worker token is an HMAC of the cluster secret over the worker's id
//! and generation: nothing secret is stored per worker, and a request carrying
//! the token of an older generation (a control plane acting on a stale view
//! of a worker that has re-registered since) is refused by the worker: that
//! is the fencing.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Where a control plane takes worker registrations.
pub const REGISTER_PATH: &str = "/internal/v1/workers/register";

/// The heartbeat path of worker `id`.
pub fn heartbeat_path(id: &str) -> String {
    format!("/internal/v1/workers/{id}/heartbeat")
}

/// The bearer token of worker `id` at `generation`, derived from the cluster
/// secret (the text of the control plane's `worker-token` file, trimmed).
pub fn worker_token(secret: &str, id: &str, generation: i64) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret.trim().as_bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts keys of any length"),
    };
    mac.update(format!("fastvm-worker:{id}:{generation}").as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

/// Constant-time comparison of two tokens.
pub fn tokens_equal(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a worker host is: capacity and what its snapshots need to restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    /// Host CPUs (placement allows `cpus * 4` vCPUs).
    pub cpus: u64,
    pub memory_mib: u64,
    pub disk_free_gib: u64,
    /// QEMU's version line.
    pub qemu_build: String,
    /// `kvm` or `tcg`.
    pub accel: String,
    pub cpu_model: String,
    /// Equal keys: a snapshot of one worker restores on the other.
    pub compat_key: String,
}

/// Sent by a worker at start and whenever a heartbeat is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRegistration {
    /// Stable id (`wk_<16 hex>`, kept in the worker's data dir).
    pub id: String,
    /// Base URL the control planes dial, e.g. `http://10.0.0.5:7070`.
    pub address: String,
    pub info: WorkerInfo,
}

/// Where snapshots are shared between workers (S3-compatible).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotStoreSettings {
    /// `s3://bucket/prefix`.
    pub url: String,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
}

/// The control plane's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// This registration's generation: part of the worker's token.
    pub generation: i64,
    pub heartbeat_interval_ms: u64,
    #[serde(default)]
    pub snapshot_store: Option<SnapshotStoreSettings>,
}

/// A worker's periodic sign of life.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub generation: i64,
    pub vm_count: u64,
    #[serde(default)]
    pub free_memory_mib: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_depend_on_secret_id_and_generation() {
        let t = worker_token("s3cret\n", "wk_1", 3);
        assert_eq!(t, worker_token("s3cret", "wk_1", 3));
        assert_eq!(t.len(), 64);
        assert_ne!(t, worker_token("other", "wk_1", 3));
        assert_ne!(t, worker_token("s3cret", "wk_2", 3));
        assert_ne!(t, worker_token("s3cret", "wk_1", 4));
        assert!(tokens_equal(&t, &t.clone()));
        assert!(!tokens_equal(&t, &t[1..]));
    }
}
