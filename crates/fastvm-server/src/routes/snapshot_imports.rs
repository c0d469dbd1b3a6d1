//! `/v1/snapshot-imports`: build snapshots from OCI images. The state
//! machine and its rules live in [`crate::snapshot_imports`].

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::JsonBody;
use crate::store::SnapshotImportRecord;
use crate::AppState;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use fastvm_types::snapshot_import::{
    ContextPresignRequest, ContextPresignResponse, CreateSnapshotImportRequest,
    SnapshotImportResponse, SnapshotImportStatus,
};
use fastvm_types::{ApiError as ErrorBody, DeleteResponse, SnapshotImportId};

use super::vms::rfc3339;

/// The `{id}` of an import route; anything but a UUID is an import that does not exist.
pub struct ImportPath(pub SnapshotImportId);

impl<S: Send + Sync> FromRequestParts<S> for ImportPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::not_found(e.body_text()))?;
        raw.parse::<SnapshotImportId>()
            .map(ImportPath)
            .map_err(|_| {
                let shown: String = raw.chars().take(64).collect();
                ApiError::not_found(format!(
                    "no snapshot import with id {shown:?} (import ids are UUIDs)"
                ))
            })
    }
}

/// The API view of a stored import.
pub(crate) fn view(r: &SnapshotImportRecord) -> SnapshotImportResponse {
    SnapshotImportResponse {
        id: r.id,
        name: r.name.clone(),
        status: r.status,
        source: r.source.clone(),
        events: r.events.clone(),
        snapshot_id: r
            .snapshot_id
            .filter(|_| r.status == SnapshotImportStatus::Succeeded),
        error: r.error.clone(),
        machine_name: r.machine_name.clone(),
        cpu: r.cpu,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
        created_at: rfc3339(r.created_at_ms),
        started_at: r.started_at_ms.map(rfc3339),
        updated_at: rfc3339(r.updated_at_ms),
        finished_at: r.finished_at_ms.map(rfc3339),
    }
}

/// List the calling org's snapshot imports
#[utoipa::path(
    get,
    path = "/v1/snapshot-imports",
    tag = "snapshot-imports",
    operation_id = "listSnapshotImports",
    summary = "List the calling org's snapshot imports",
    description = "Every import of the org (in flight and terminal), oldest first.",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The org's imports, oldest first", body = [SnapshotImportResponse], example = json!(examples::snapshot_import_list())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<SnapshotImportResponse>>, ApiError> {
    Ok(Json(
        state
            .list_snapshot_imports(caller.org_id)
            .await?
            .iter()
            .map(view)
            .collect(),
    ))
}

/// Build a snapshot from a Docker / OCI image or a Dockerfile
#[utoipa::path(
    post,
    path = "/v1/snapshot-imports",
    tag = "snapshot-imports",
    operation_id = "createSnapshotImport",
    summary = "Build a snapshot from a Docker / OCI image or a Dockerfile",
    description = "Answers at once with the import `pending`; poll `GET /v1/snapshot-imports/{id}` until `succeeded` (then `snapshotId` is set) or `failed` (`error`). \
                   The image is pulled by the worker (linux/amd64 unless `platform` says otherwise; registries named by `fastvm serve --insecure-registry` over plain HTTP), \
                   its layers applied into a root disk of `diskGiB`, booted once with the Fast VM agent as PID 1 and captured. The image's Env, WorkingDir and User become \
                   the defaults of every exec. `type: dockerfile` builds the Dockerfile of the uploaded context (`contextRef` from `context-presign`) with buildah in a builder VM \
                   (never on the host): `FROM` images are pulled by the worker like `type: image` (credentials apply to `registryHost`), `buildArgs` and `target` go to the build, \
                   `RUN` steps have network egress; the result continues as an image import (phases preparing, fetch_context, pull, build, export, saving, warming).",
    request_body(content = CreateSnapshotImportRequest, example = json!(examples::create_snapshot_import_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 201, description = "The import, pending", body = SnapshotImportResponse, example = json!(examples::snapshot_import_pending())),
        (status = 400, description = "Malformed body, a bad source, machine type or diskGiB, or a contextRef with no upload or already used (`INVALID_CONTEXT_REF`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 429, description = "The org's quota has no room for the import's VM (`QUOTA_EXCEEDED_VCPU`, `_MEMORY_MIB`, `_DISK_GIB`: imports in flight count with their machine type and disk) or for its snapshot (`QUOTA_EXCEEDED_SNAPSHOT_COUNT`: imports in flight count as the snapshot they will add)", body = ErrorBody),
        (status = 503, description = "No worker can build it now", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateSnapshotImportRequest>,
) -> Result<(StatusCode, Json<SnapshotImportResponse>), ApiError> {
    let rec = state.create_snapshot_import(caller, req).await?;
    Ok((StatusCode::CREATED, Json(view(&rec))))
}

/// Mint a signed URL for uploading a Dockerfile build-context archive
#[utoipa::path(
    post,
    path = "/v1/snapshot-imports/context-presign",
    tag = "snapshot-imports",
    operation_id = "presignSnapshotImportContext",
    summary = "Mint a signed URL for uploading a Dockerfile build-context archive",
    description = "A signed PUT URL (`uploadUrl`, valid `expiresInSec`, at most `maxUploadBytes`) for the build-context ZIP of a Dockerfile import, and the single-use `contextRef` to pass as `source.contextRef` to `POST /v1/snapshot-imports`. `sizeBytes` over the cap answers 400. Unused contexts are deleted after about a day.",
    request_body(content = ContextPresignRequest, example = json!(examples::context_presign_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The upload handle", body = ContextPresignResponse, example = json!(examples::context_presign_response())),
        (status = 400, description = "Malformed body", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 501, description = "This server has no staging store for uploads", body = ErrorBody),
    )
)]
pub async fn presign_context(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<ContextPresignRequest>,
) -> Result<Json<ContextPresignResponse>, ApiError> {
    req.validate(crate::snapshot_imports::MAX_CONTEXT_BYTES)?;
    Ok(Json(state.presign_context(caller.org_id).await?))
}

/// Get a snapshot import's state
#[utoipa::path(
    get,
    path = "/v1/snapshot-imports/{id}",
    tag = "snapshot-imports",
    operation_id = "getSnapshotImport",
    summary = "Get a snapshot import's state",
    description = "Status, the per-phase events (preparing, pull, export, saving, warming, done) and, once terminal, `snapshotId` or `error`.",
    params(("id" = String, Path, description = "Snapshot import ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The import", body = SnapshotImportResponse, example = json!(examples::snapshot_import_succeeded())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such import in the caller's org", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ImportPath(id): ImportPath,
) -> Result<Json<SnapshotImportResponse>, ApiError> {
    Ok(Json(view(
        &state.find_snapshot_import(caller.org_id, id).await?,
    )))
}

/// The build log of a snapshot import
#[utoipa::path(
    get,
    path = "/v1/snapshot-imports/{id}/logs",
    tag = "snapshot-imports",
    operation_id = "getSnapshotImportLogs",
    summary = "The build log of a snapshot import",
    description = "Extension: the import's log as text (pull, layer and disk steps, boot), its last 256 KiB.",
    params(("id" = String, Path, description = "Snapshot import ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The log", body = String, content_type = "text/plain"),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such import in the caller's org", body = ErrorBody),
    )
)]
pub async fn logs(
    State(state): State<AppState>,
    caller: Caller,
    ImportPath(id): ImportPath,
) -> Result<impl IntoResponse, ApiError> {
    let rec = state.find_snapshot_import(caller.org_id, id).await?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        rec.logs,
    ))
}

/// Delete a terminal snapshot import (cascades to its snapshot)
#[utoipa::path(
    delete,
    path = "/v1/snapshot-imports/{id}",
    tag = "snapshot-imports",
    operation_id = "deleteSnapshotImport",
    summary = "Delete a terminal snapshot import (cascades to its snapshot)",
    description = "A succeeded import's snapshot is deleted with it (VMs restored from it keep running). An import in flight must be cancelled first.",
    params(("id" = String, Path, description = "Snapshot import ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "Deleted", body = DeleteResponse, example = json!(examples::snapshot_import_deleted())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such import in the caller's org", body = ErrorBody),
        (status = 409, description = "The import is still in flight", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ImportPath(id): ImportPath,
) -> Result<Json<DeleteResponse>, ApiError> {
    state.delete_snapshot_import(caller.org_id, id).await?;
    Ok(Json(DeleteResponse::new(id)))
}

/// Cancel an in-flight snapshot import
#[utoipa::path(
    post,
    path = "/v1/snapshot-imports/{id}/cancel",
    tag = "snapshot-imports",
    operation_id = "cancelSnapshotImport",
    summary = "Cancel an in-flight snapshot import",
    description = "Stops the pull, unpack or build VM and frees what it made; the import ends `cancelled`.",
    params(("id" = String, Path, description = "Snapshot import ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The import, cancelled", body = SnapshotImportResponse, example = json!(examples::snapshot_import_cancelled())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such import in the caller's org", body = ErrorBody),
        (status = 409, description = "The import is already terminal", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    ImportPath(id): ImportPath,
) -> Result<Json<SnapshotImportResponse>, ApiError> {
    Ok(Json(view(
        &state.cancel_snapshot_import(caller.org_id, id).await?,
    )))
}
