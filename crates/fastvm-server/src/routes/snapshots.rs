//! `/v1/snapshots`: capture a VM, list, get, rename and delete snapshots.
//! Restoring one is `POST /v1/vms` with `snapshotId` ([`super::vms`]).
//!
//! `POST /v1/snapshots` answers when the capture is done (it takes well under
//! 2 s): `201` with the snapshot `ready`. A failed capture answers the
//! worker's error (409 / 500 / 503) and keeps the snapshot, in `error`, in
//! the list until it is deleted. The status machine and the rules live in
//! [`crate::snapshots`].

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::{JsonBody, SnapshotPath};
use crate::store::SnapshotRecord;
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use fastvm_types::snapshot::{CreateSnapshotRequest, Snapshot, UpdateSnapshotRequest};
use fastvm_types::{ApiError as ErrorBody, DeleteResponse};

use super::vms::rfc3339;

/// The API view of a stored snapshot.
pub(crate) fn view(r: &SnapshotRecord) -> Snapshot {
    Snapshot {
        id: r.id,
        name: r.name.clone(),
        org_id: r.org_id,
        vm_id: r.vm_id,
        status: r.status,
        machine_name: r.machine_name.clone(),
        firewall: r.firewall.normalized(),
        metadata: r.metadata.clone(),
        env_vars: r.env_vars.clone(),
        services: r.services.clone(),
        volumes: r.volumes.clone(),
        bucket_mounts: r.bucket_mounts.clone(),
        created_at: rfc3339(r.created_at_ms),
    }
}

/// List snapshots
#[utoipa::path(
    get,
    path = "/v1/snapshots",
    tag = "snapshots",
    operation_id = "listSnapshots",
    summary = "List snapshots",
    description = "The org's snapshots, oldest first: ready ones, and failed captures (status `error`, which can only be deleted). Restore one with `POST /v1/vms` and its `snapshotId`.",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The org's snapshots (ready, and failed captures in status error), oldest first", body = [Snapshot], example = json!(examples::snapshot_list())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Snapshot>>, ApiError> {
    Ok(Json(
        state
            .list_snapshots(caller.org_id)
            .await?
            .iter()
            .map(view)
            .collect(),
    ))
}

/// Create a snapshot from a VM
#[utoipa::path(
    post,
    path = "/v1/snapshots",
    tag = "snapshots",
    operation_id = "createSnapshot",
    summary = "Create a snapshot from a VM",
    description = "Captures the memory, device state and disk of a running or paused VM; the VM keeps running (a paused VM stays paused). \
                   Answers when the capture is done. The name is trimmed, whitespace-collapsed and truncated to 64 runes; \
                   `snapshot-<first 8 chars of vmId>` when empty. A failed capture answers an error and leaves the snapshot listed with status `error`.",
    request_body(content = CreateSnapshotRequest, example = json!(examples::create_snapshot_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 201, description = "The snapshot, ready to restore", body = Snapshot, example = json!(examples::snapshot())),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is neither running nor paused (or vanished during the capture)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 429, description = "The org's snapshotCount quota would be exceeded (`QUOTA_EXCEEDED_SNAPSHOT_COUNT`); nothing was created", body = ErrorBody),
        (status = 500, description = "The capture failed; the snapshot is kept with status error", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateSnapshotRequest>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let rec = state.create_snapshot(caller, req).await?;
    Ok((StatusCode::CREATED, Json(view(&rec))))
}

/// Get a snapshot
#[utoipa::path(
    get,
    path = "/v1/snapshots/{id}",
    tag = "snapshots",
    operation_id = "getSnapshot",
    summary = "Get a snapshot",
    description = "The snapshot: its status, the VM it was taken from, and the shape, env vars, firewall and services a VM restored from it gets.",
    params(("id" = String, Path, description = "Snapshot ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The snapshot", body = Snapshot, example = json!(examples::snapshot())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such snapshot in the caller's org", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    SnapshotPath(id): SnapshotPath,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(view(&state.find_snapshot(caller.org_id, id).await?)))
}

/// Rename a snapshot
#[utoipa::path(
    patch,
    path = "/v1/snapshots/{id}",
    tag = "snapshots",
    operation_id = "updateSnapshot",
    summary = "Rename a snapshot",
    description = "The name follows the rules of creation (an empty name gives the default name).",
    params(("id" = String, Path, description = "Snapshot ID (UUID).")),
    request_body(content = UpdateSnapshotRequest, example = json!(examples::update_snapshot_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The renamed snapshot", body = Snapshot, example = json!(examples::snapshot_renamed())),
        (status = 400, description = "Malformed body, or nothing to update (`INVALID_REQUEST`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such snapshot in the caller's org", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    SnapshotPath(id): SnapshotPath,
    JsonBody(req): JsonBody<UpdateSnapshotRequest>,
) -> Result<Json<Snapshot>, ApiError> {
    Ok(Json(view(
        &state.update_snapshot(caller.org_id, id, req).await?,
    )))
}

/// Delete a snapshot
#[utoipa::path(
    delete,
    path = "/v1/snapshots/{id}",
    tag = "snapshots",
    operation_id = "deleteSnapshot",
    summary = "Delete a snapshot",
    description = "VMs restored from the snapshot keep running; its disk layers are freed once nothing uses them.",
    params(("id" = String, Path, description = "Snapshot ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The snapshot is deleted", body = DeleteResponse, example = json!(examples::snapshot_deleted())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such snapshot in the caller's org", body = ErrorBody),
        (status = 409, description = "The snapshot is still being captured", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    SnapshotPath(id): SnapshotPath,
) -> Result<Json<DeleteResponse>, ApiError> {
    state.delete_snapshot(caller.org_id, id).await?;
    Ok(Json(DeleteResponse::new(id)))
}
