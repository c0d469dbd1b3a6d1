//! `/v1/vms/{id}/bucket-mounts`: customer buckets mounted in VMs (rules in
//! [`crate::bucket_mounts`]).

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::{JsonBody, VmPath, VmSubPath};
use crate::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use fastvm_types::bucket_mount::{AttachBucketMountRequest, BucketMount, RotateBucketMountRequest};
use fastvm_types::ApiError as ErrorBody;

/// List bucket-mounts on a VM
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/bucket-mounts",
    tag = "bucket-mounts",
    operation_id = "listBucketMounts",
    summary = "List bucket-mounts on a VM",
    description = "The VM's bucket mounts, oldest first. A `mounted` one whose bucket answered errors since (deleted, \
        credentials revoked) says so in `statusMessage`; `pending` ones wait for credentials (after a snapshot restore).",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM's bucket mounts", body = [BucketMount], example = json!(examples::bucket_mount_list())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
) -> Result<Json<Vec<BucketMount>>, ApiError> {
    Ok(Json(state.list_bucket_mounts(caller.org_id, id).await?))
}

/// Attach a customer GCS / S3 bucket to a VM
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/bucket-mounts",
    tag = "bucket-mounts",
    operation_id = "attachBucketMount",
    summary = "Attach a customer GCS / S3 bucket to a VM",
    description = "Mounts `bucketUri` at `mountPath` in the running VM: its objects appear as files, writes become \
        objects when a file is closed or fsynced. The credentials stay with the worker, which signs the bucket \
        requests; they never enter the guest, are never returned and never land in a snapshot. Credentials the \
        bucket refuses give `mountStatus` `failed` with the reason in `statusMessage`. An `endpoint_url` on a \
        private, loopback or link-local address is refused unless the operator allowed it \
        (`fastvm serve --allow-bucket-endpoint`); so is a GCS key whose `token_uri` (or `gcs_base_url`) is. s3:// takes \
        `aws-credentials` (`endpoint_url` for S3-compatible stores); gs:// a service-account key (OAuth2 tokens from \
        its `token_uri`, then the GCS XML API).",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = AttachBucketMountRequest, example = json!(examples::attach_bucket_mount_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 201, description = "The bucket mount (`mounted` or `failed`)", body = BucketMount, example = json!(examples::bucket_mount())),
        (status = 400, description = "Malformed body, a bad bucket URI (`INVALID_BUCKET_URI`), mount path (`INVALID_MOUNT_PATH`) or credentials (`INVALID_CREDENTIALS`), or an endpoint not allowed (`BUCKET_ENDPOINT_NOT_ALLOWED`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is not running (`INVALID_STATE`) or the mount path is taken (`MOUNT_PATH_IN_USE`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn attach(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(req): JsonBody<AttachBucketMountRequest>,
) -> Result<(StatusCode, Json<BucketMount>), ApiError> {
    let m = state.attach_bucket_mount(caller.org_id, id, req).await?;
    Ok((StatusCode::CREATED, Json(m)))
}

/// Get a bucket-mount
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/bucket-mounts/{bucketMountId}",
    tag = "bucket-mounts",
    operation_id = "getBucketMount",
    summary = "Get a bucket-mount",
    description = "One bucket mount of the VM, with the last error its bucket answered in `statusMessage` if any.",
    params(
        ("id" = String, Path, description = "VM ID (UUID)."),
        ("bucketMountId" = String, Path, description = "BucketMount identifier (e.g. bm_<22-char-lowercase-hex>), unique per VM."),
    ),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The bucket mount", body = BucketMount, example = json!(examples::bucket_mount())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM, or no such bucket mount on it", body = ErrorBody),
    )
)]
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    VmSubPath(id, mount): VmSubPath,
) -> Result<Json<BucketMount>, ApiError> {
    Ok(Json(
        state.get_bucket_mount(caller.org_id, id, &mount).await?,
    ))
}

/// Rotate bucket-mount credentials in-place
#[utoipa::path(
    patch,
    path = "/v1/vms/{id}/bucket-mounts/{bucketMountId}",
    tag = "bucket-mounts",
    operation_id = "rotateBucketMount",
    summary = "Rotate bucket-mount credentials in-place",
    description = "Replaces the credentials of a `mounted` bucket mount without a remount: the worker checks them \
        against the bucket, then signs the next request with them (refused: `CREDENTIALS_REFUSED`, the old ones stay). \
        A `pending` (restored) or `failed` mount is mounted with them now.",
    params(
        ("id" = String, Path, description = "VM ID (UUID)."),
        ("bucketMountId" = String, Path, description = "BucketMount identifier (e.g. bm_<22-char-lowercase-hex>), unique per VM."),
    ),
    request_body(content = RotateBucketMountRequest, example = json!(examples::rotate_bucket_mount_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The bucket mount", body = BucketMount, example = json!(examples::bucket_mount())),
        (status = 400, description = "Malformed body, credentials of the wrong kind (`INVALID_CREDENTIALS`), refused by the bucket (`CREDENTIALS_REFUSED`), or an endpoint not allowed (`BUCKET_ENDPOINT_NOT_ALLOWED`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM, or no such bucket mount on it", body = ErrorBody),
        (status = 409, description = "A mount to make now on a VM that is not running (`INVALID_STATE`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    VmSubPath(id, mount): VmSubPath,
    JsonBody(req): JsonBody<RotateBucketMountRequest>,
) -> Result<Json<BucketMount>, ApiError> {
    Ok(Json(
        state
            .rotate_bucket_mount(caller.org_id, id, &mount, req)
            .await?,
    ))
}

/// Detach and delete a bucket-mount
#[utoipa::path(
    delete,
    path = "/v1/vms/{id}/bucket-mounts/{bucketMountId}",
    tag = "bucket-mounts",
    operation_id = "deleteBucketMount",
    summary = "Detach and delete a bucket-mount",
    description = "Unmounts the bucket in the guest (lazily when processes still use it) and forgets the mount and its \
        credentials. Writes not yet closed or fsynced in the guest are lost. The VM keeps running.",
    params(
        ("id" = String, Path, description = "VM ID (UUID)."),
        ("bucketMountId" = String, Path, description = "BucketMount identifier (e.g. bm_<22-char-lowercase-hex>), unique per VM."),
    ),
    security(("bearerAuth" = [])),
    responses(
        (status = 204, description = "Detached and deleted"),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM, or no such bucket mount on it", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    VmSubPath(id, mount): VmSubPath,
) -> Result<StatusCode, ApiError> {
    state.delete_bucket_mount(caller.org_id, id, &mount).await?;
    Ok(StatusCode::NO_CONTENT)
}
