//! `POST /v1/vms/{id}/fork` (extension): N running copies of a VM in one
//! call. The logic lives in [`crate::fork`].

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::vms::view;
use crate::routes::{JsonBody, VmPath};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use fastvm_types::fork::ForkVmRequest;
use fastvm_types::{ApiError as ErrorBody, Vm};

/// Fork a VM (extension)
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/fork",
    tag = "vms",
    operation_id = "forkVm",
    summary = "Fork a VM (extension)",
    description = "Extension beyond the reference API. Clones a running or paused VM into `count` running copies in one call: \
                   the source is captured (it keeps running) and restored `count` times on its worker; each copy gets a fresh \
                   identity (id, hostname `vm-<id prefix>`, MAC and addresses, reseeded entropy) and shares the source's \
                   memory copy-on-write. Copies have the source's machine shape, env vars, metadata, firewall, services and TTL, \
                   and are named `<source name>-fork-<i>`. The answer lists the copies once every restore finished: a copy \
                   that failed to start is in status `error` with its `statusMessage`.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = ForkVmRequest, example = json!({"count": 3})),
    security(("bearerAuth" = [])),
    responses(
        (status = 201, description = "The copies", body = [Vm], example = json!([examples::vm()])),
        (status = 400, description = "Malformed body, or `count` outside 1..=32 (`INVALID_FORK_COUNT`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is neither running nor paused", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 429, description = "The copies would exceed an org quota (`QUOTA_EXCEEDED_VCPU`, `QUOTA_EXCEEDED_MEMORY_MIB`, `QUOTA_EXCEEDED_DISK_GIB`); nothing was created", body = ErrorBody),
    )
)]
pub async fn fork(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(req): JsonBody<ForkVmRequest>,
) -> Result<(StatusCode, Json<Vec<Vm>>), ApiError> {
    // In a task of its own: a client that goes away must not cut a fork in
    // half (rows provisioning, a hidden snapshot left behind).
    let copies = state
        .detached(move |s| async move { s.fork_vm(caller, id, req).await })
        .await?;
    Ok((StatusCode::CREATED, Json(copies.iter().map(view).collect())))
}
