//! `/v1/volumes` and `/v1/vms/{id}/volumes`: managed volumes and their
//! attachments (rules in [`crate::volumes`]).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::{JsonBody, VmPath, VmSubPath};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use fastvm_types::volume::{
    AttachVolumeRequest, CreateVolumeRequest, DetachVolumeResponse, UpdateVolumeRequest, Volume,
    VolumeAttachmentItem, VolumeAttachmentItemWithVm,
};
use fastvm_types::{ApiError as ErrorBody, DeleteResponse};

const VOLUME_DESCRIPTION: &str = "A volume is a directory of files that outlives VMs, served to guests over NFSv3 by the \
    worker that holds it. `sizeGiB` limits the bytes its files occupy (writes past it fail with ENOSPC); growing it takes \
    effect at once in every attached guest. Several VMs may attach one volume: they share its files.";

/// List volumes
#[utoipa::path(
    get,
    path = "/v1/volumes",
    tag = "volumes",
    operation_id = "listVolumes",
    summary = "List volumes",
    description = VOLUME_DESCRIPTION,
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The org's volumes, oldest first", body = [Volume], example = json!(examples::volume_list())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<Vec<Volume>>, ApiError> {
    Ok(Json(state.list_volumes(caller.org_id).await?))
}

/// Create a managed volume
#[utoipa::path(
    post,
    path = "/v1/volumes",
    tag = "volumes",
    operation_id = "createVolume",
    summary = "Create a managed volume",
    description = VOLUME_DESCRIPTION,
    request_body(content = CreateVolumeRequest, example = json!(examples::create_volume_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 201, description = "The new volume (`ready`)", body = Volume, example = json!(examples::volume())),
        (status = 400, description = "Malformed body, empty name (`INVALID_NAME`) or size below 1 GiB (`INVALID_SIZE`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 429, description = "The org's `volumeCount` or `volumeGiB` quota would be exceeded (`QUOTA_EXCEEDED_VOLUME_COUNT`, `QUOTA_EXCEEDED_VOLUME_GIB`); nothing was created", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<CreateVolumeRequest>,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.create_volume(caller.org_id, req).await?),
    ))
}

/// Get a volume
#[utoipa::path(
    get,
    path = "/v1/volumes/{id}",
    tag = "volumes",
    operation_id = "getVolume",
    summary = "Get a volume",
    description = "`mountedCount` counts running VMs with the volume mounted; `usedGiB` is asked of the worker that holds it (omitted when it cannot be reached).",
    params(("id" = String, Path, description = "Volume identifier (e.g. vol_<22-char-lowercase-hex>).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The volume", body = Volume, example = json!(examples::volume())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such volume in the caller's org", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(state.get_volume(caller.org_id, &id).await?))
}

/// Update a volume's name, sizeGiB (grow / shrink-if-not-overfull), or accessMode
#[utoipa::path(
    patch,
    path = "/v1/volumes/{id}",
    tag = "volumes",
    operation_id = "updateVolume",
    summary = "Update a volume's name, sizeGiB (grow / shrink-if-not-overfull), or accessMode",
    description = "Size and access mode apply at once in every guest the volume is attached to, without a remount.",
    params(("id" = String, Path, description = "Volume identifier (e.g. vol_<22-char-lowercase-hex>).")),
    request_body(content = UpdateVolumeRequest, example = json!(examples::update_volume_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The updated volume", body = Volume, example = json!(examples::volume_grown())),
        (status = 400, description = "Malformed body, nothing to update, empty name or size below 1 GiB", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such volume in the caller's org", body = ErrorBody),
        (status = 409, description = "The files do not fit the smaller size (`VOLUME_ERROR`), or the volume is not ready (`VOL_NOT_READY`)", body = ErrorBody),
        (status = 429, description = "Growing would exceed the org's `volumeGiB` quota (`QUOTA_EXCEEDED_VOLUME_GIB`); nothing changed", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UpdateVolumeRequest>,
) -> Result<Json<Volume>, ApiError> {
    Ok(Json(state.update_volume(caller.org_id, &id, req).await?))
}

/// Delete a volume
#[utoipa::path(
    delete,
    path = "/v1/volumes/{id}",
    tag = "volumes",
    operation_id = "deleteVolume",
    summary = "Delete a volume",
    description = "Deletes the volume and its files. Refused while it is attached to any VM.",
    params(("id" = String, Path, description = "Volume identifier (e.g. vol_<22-char-lowercase-hex>).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "Deleted", body = DeleteResponse, example = json!(examples::volume_deleted())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such volume in the caller's org", body = ErrorBody),
        (status = 409, description = "The volume is attached to a VM (`VOLUME_IN_USE`); detach it first", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeleteResponse>, ApiError> {
    Ok(Json(state.delete_volume(caller.org_id, &id).await?))
}

/// List VMs currently attached to this volume
#[utoipa::path(
    get,
    path = "/v1/volumes/{id}/attachments",
    tag = "volumes",
    operation_id = "listVolumeAttachments",
    summary = "List VMs currently attached to this volume",
    description = "Every attachment of the volume, with its VM and mount status (paused VMs included, `pending` until they resume).",
    params(("id" = String, Path, description = "Volume identifier (e.g. vol_<22-char-lowercase-hex>).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The volume's attachments", body = [VolumeAttachmentItemWithVm], example = json!(examples::volume_attachments())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such volume in the caller's org", body = ErrorBody),
    )
)]
pub async fn attachments(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<VolumeAttachmentItemWithVm>>, ApiError> {
    Ok(Json(state.volume_attachments(caller.org_id, &id).await?))
}

/// Attach a volume to a VM
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/volumes",
    tag = "volumes",
    operation_id = "attachVolume",
    summary = "Attach a volume to a VM",
    description = "Mounts the volume at `mountPath` in the running VM, without a restart (`mountStatus` `mounted`, or `failed` \
        with the reason in `statusMessage`). On a paused VM the attachment is `pending` and mounted when the VM resumes.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = AttachVolumeRequest, example = json!(examples::attach_volume_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The attachment", body = VolumeAttachmentItem, example = json!(examples::volume_attachment())),
        (status = 400, description = "Malformed body, a bad volume id, or a mount path outside /mnt/ and /data/ (`INVALID_MOUNT_PATH`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM or volume in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is neither running nor paused (`INVALID_STATE`), the volume is not ready (`VOL_NOT_READY`), already attached or the path taken (`VOLUME_IN_USE`), or on another worker (`VOLUME_ERROR`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn attach(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(req): JsonBody<AttachVolumeRequest>,
) -> Result<Json<VolumeAttachmentItem>, ApiError> {
    Ok(Json(state.attach_volume(caller.org_id, id, req).await?))
}

/// Detach a volume from a VM
#[utoipa::path(
    delete,
    path = "/v1/vms/{id}/volumes/{volumeId}",
    tag = "volumes",
    operation_id = "detachVolume",
    summary = "Detach a volume from a VM",
    description = "Unmounts the volume; the VM keeps running. Processes still using it get a warning of type `busy` (the \
        mount was detached lazily); a guest that does not answer, `guest_unresponsive`.",
    params(
        ("id" = String, Path, description = "VM ID (UUID)."),
        ("volumeId" = String, Path, description = "Volume identifier."),
    ),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "Detached", body = DetachVolumeResponse, example = json!(examples::detach_volume_response())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM, or the volume is not attached to it", body = ErrorBody),
    )
)]
pub async fn detach(
    State(state): State<AppState>,
    caller: Caller,
    VmSubPath(id, volume): VmSubPath,
) -> Result<Json<DetachVolumeResponse>, ApiError> {
    Ok(Json(state.detach_volume(caller.org_id, id, &volume).await?))
}
