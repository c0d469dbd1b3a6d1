//! `/v1/admin`: operator endpoints (extension), for admin keys only: the key
//! of user `admin` of the org `default` made at first start. Any other key
//! gets 403 `FORBIDDEN`.
//!
//! `GET /v1/admin/workers` lists the worker hosts (a single-host server
//! lists its embedded worker `local`); `POST /v1/admin/workers/{id}/drain`
//! stops placement on one and moves its paused VMs away (cluster mode).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::vms::rfc3339;
use crate::store::WorkerRecord;
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use fastvm_types::ApiError as ErrorBody;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Code of the 403 answer to a non-admin key.
pub use crate::error::codes::FORBIDDEN;

/// A worker host as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerSummary {
    /// `local` for the embedded worker; `wk_<16 hex>` for worker hosts.
    pub id: String,
    /// Where the control plane reaches it (`embedded` for the local worker).
    pub address: String,
    /// `ready` | `unreachable` | `draining`.
    pub status: String,
    /// Live (not deleted) VMs placed on it.
    pub vm_count: u64,
    pub cpus: u64,
    #[serde(rename = "memoryMiB")]
    pub memory_mib: u64,
    /// RFC 3339 time of its last heartbeat.
    pub last_heartbeat_at: String,
}

async fn require_admin(state: &AppState, caller: &Caller) -> Result<(), ApiError> {
    if state
        .store()
        .is_admin_key(caller.key_id, crate::DEFAULT_ORG)
        .await?
    {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            FORBIDDEN,
            "this endpoint is for the admin key (user admin of the org default) only",
        ))
    }
}

fn summary(r: &WorkerRecord, vm_count: u64) -> WorkerSummary {
    WorkerSummary {
        id: r.id.clone(),
        address: r.address.clone(),
        status: r.status.as_str().to_owned(),
        vm_count,
        cpus: r.cpus,
        memory_mib: r.memory_mib,
        last_heartbeat_at: rfc3339(r.last_heartbeat_ms),
    }
}

/// The host's CPUs and memory (MiB), for the embedded worker's line.
fn host_capacity() -> (u64, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    (cpus, mem_kib / 1024)
}

/// List worker hosts (admin)
#[utoipa::path(
    get,
    path = "/v1/admin/workers",
    tag = "admin",
    operation_id = "listWorkers",
    summary = "List worker hosts (admin)",
    description = "Extension of this server. The worker hosts of this control plane with their status (`ready`: takes new VMs; `unreachable`: no heartbeat for 10 s, its VMs are `unknown`; `draining`: takes no new VMs), live VM count, capacity and last heartbeat. A single-host server lists its embedded worker `local`. Admin key only.",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The workers, by id", body = Vec<WorkerSummary>, example = json!(examples::workers())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "Not the admin key (`FORBIDDEN`)", body = ErrorBody),
    )
)]
pub async fn list_workers(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<WorkerSummary>>, ApiError> {
    require_admin(&state, &caller).await?;
    let counts = state.store().live_vm_counts().await?;
    let mut out: Vec<WorkerSummary> = state
        .store()
        .list_workers()
        .await?
        .iter()
        .map(|r| summary(r, counts.get(&r.id).copied().unwrap_or(0)))
        .collect();
    if let Some(local) = state.fleet().local() {
        if !out.iter().any(|w| w.id == local.id()) {
            let (cpus, memory_mib) = host_capacity();
            let ready = local.stats().await.is_ok();
            out.insert(
                0,
                WorkerSummary {
                    id: local.id().to_owned(),
                    address: "embedded".into(),
                    status: if ready { "ready" } else { "unreachable" }.into(),
                    vm_count: counts.get(local.id()).copied().unwrap_or(0),
                    cpus,
                    memory_mib,
                    last_heartbeat_at: rfc3339(crate::store::now_ms()),
                },
            );
        }
    }
    Ok(Json(out))
}

/// Drain a worker host (admin)
#[utoipa::path(
    post,
    path = "/v1/admin/workers/{id}/drain",
    tag = "admin",
    operation_id = "drainWorker",
    summary = "Drain a worker host (admin)",
    description = "Extension of this server (cluster mode). The worker becomes `draining`: no new VM is placed on it (it stays draining across its re-registrations). Its running VMs keep running there until deleted; its paused VMs are moved, in the background, to other compatible workers through the shared snapshot store (same VM id, still paused). Admin key only.",
    params(("id" = String, Path, description = "Worker id.")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The worker, now draining", body = WorkerSummary, example = json!(examples::worker_draining())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "Not the admin key (`FORBIDDEN`)", body = ErrorBody),
        (status = 404, description = "No such worker", body = ErrorBody),
        (status = 409, description = "A single-host server: nothing to drain to", body = ErrorBody),
    )
)]
pub async fn drain_worker(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<WorkerSummary>, ApiError> {
    require_admin(&state, &caller).await?;
    let row = state.drain_worker(&id).await?;
    let counts = state.store().live_vm_counts().await?;
    Ok(Json(summary(
        &row,
        counts.get(&row.id).copied().unwrap_or(0),
    )))
}
