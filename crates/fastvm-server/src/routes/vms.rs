//! `/v1/vms`: launch, list, get, update, delete, pause and resume VMs.
//!
//! The status machine (the logic lives in [`crate::lifecycle`]):
//!
//! ```text
//!   POST /v1/vms
//!        |
//!        v         boot ok                 /pause                  (done)
//!   provisioning ----------> running ------------> pausing ------------> paused
//!        |                    ^  |                                       |  |
//!        | boot failed        |  | QEMU exited                   /resume |  | QEMU
//!        v                    |  v                                       v  | exited
//!      error                  |  stopped <----------------------------------'
//!                             |                     (done)
//!                             '--------------------------------- resuming
//!
//!   DELETE: any status but deleting -> deleting -> gone (404 from then on)
//!   A failed pause/resume settles in whatever the worker reports.
//!   Any other request for a transition is 409 INVALID_STATE, naming the status.
//! ```
//!
//! `201 Created` answers a launch whose VM is running within the server's
//! launch wait (`ServerConfig::launch_wait`); otherwise `202 Accepted` with the
//! VM still `provisioning` (or `error`), and the client polls `GET`.
//!
//! A launch with `snapshotId` restores that snapshot (of the caller's org,
//! `ready`; else 404 / 409): the new VM gets its own id and hostname and
//! `sourceName` = the snapshot's name; processes, files and memory are the
//! snapshot's. See [`crate::lifecycle`] for which fields come from where.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::{JsonBody, QueryParams, VmPath};
use crate::store::VmRecord;
use crate::vm_list;
use crate::AppState;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fastvm_types::vm::ListVmsQuery;
use fastvm_types::{
    ApiError as ErrorBody, DeleteResponse, FirewallPolicy, LaunchVmRequest, UpdateVmRequest, Vm,
    VmStatus,
};
use std::time::{Duration, UNIX_EPOCH};

/// RFC 3339 (UTC, milliseconds) of a Unix-ms time.
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_millis(t).to_string()
}

impl AppState {
    /// [`view`] with the VM's volume attachments and bucket mounts.
    pub(crate) async fn vm_json(&self, r: &VmRecord) -> Result<Json<Vm>, ApiError> {
        let mut vm = view(r);
        vm.volumes = self.vm_volume_items(r.id).await?;
        vm.bucket_mounts = self.vm_bucket_mount_items(r.id).await?;
        Ok(Json(vm))
    }
}

pub(crate) fn view(r: &VmRecord) -> Vm {
    let firewall = r.firewall.normalized();
    let effective_firewall = r.effective_firewall();
    let non_negative = |v: Option<i64>| v.and_then(|v| u64::try_from(v).ok());
    Vm {
        id: r.id,
        name: r.name.clone(),
        org_id: r.org_id,
        machine_name: r.machine_name.clone(),
        source_name: r.source_name.clone(),
        firewall,
        effective_firewall,
        metadata: r.metadata.clone(),
        env_vars: r.env_vars.clone(),
        public_ipv6: r.public_ipv6.clone(),
        cpu: r.cpu,
        memory_mib: r.memory_mib,
        disk_gib: r.disk_gib,
        status: r.status,
        status_message: if matches!(
            r.status,
            VmStatus::Error | VmStatus::Stopped | VmStatus::Unknown
        ) {
            r.status_message.clone()
        } else {
            None
        },
        created_at: rfc3339(r.created_at_ms),
        deleted_at: r.deleted_at_ms.map(rfc3339),
        ttl: r.ttl,
        expires_at_ms: if r.status == VmStatus::Running {
            non_negative(r.expires_at_ms)
        } else {
            None
        },
        ttl_remaining_ms: if r.status == VmStatus::Paused {
            non_negative(r.ttl_remaining_ms)
        } else {
            None
        },
        paused_at: r.paused_at_ms.map(rfc3339),
        volumes: vec![],
        bucket_mounts: vec![],
    }
}

/// List VMs
#[utoipa::path(
    get,
    path = "/v1/vms",
    tag = "vms",
    operation_id = "listVms",
    summary = "List VMs",
    description = "The caller's org's VMs, oldest first. Deleted VMs are left out. Filter by `status` (e.g. `?status=running`). \
                   Extension (not in the spec): `limit` (1 to 1000) answers one page of at most that many VMs, from `cursor` on; \
                   the body stays the plain array and the next page's cursor comes in the `X-Next-Cursor` response header \
                   (absent on the last page). Pages are keyset pages in the list's order: a VM that exists for the whole walk is on exactly one page, \
                   whatever is created or deleted meanwhile.",
    params(ListVmsQuery),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The org's VMs, oldest first (one page of them with `limit`)", body = [Vm],
            headers(("X-Next-Cursor" = String, description = "Extension: with `limit`, the `cursor` of the next page; absent on the last page")),
            example = json!(examples::vm_list())),
        (status = 400, description = "Malformed query: `INVALID_LIMIT` (`limit` is not 1 to 1000), `INVALID_CURSOR` (`cursor` is not one this server gave)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    headers: axum::http::HeaderMap,
    QueryParams(q): QueryParams<ListVmsQuery>,
) -> Result<Response, ApiError> {
    let limit = vm_list::parse_limit(q.limit.as_deref())?;
    let after = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(vm_list::decode_cursor(c)?),
    };
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => match VmStatus::parse(s) {
            Some(s) => Some(s),
            // An unknown status matches no VM.
            None => return Ok(Json(Vec::<Vm>::new()).into_response()),
        },
    };
    let page = state
        .list_vm_page(caller.org_id, status, after, limit)
        .await?;
    let gzip = match &page.cached {
        Some(list)
            if page.body.len() >= vm_list::GZIP_MIN_BYTES
                && headers
                    .get(header::ACCEPT_ENCODING)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(vm_list::accepts_gzip) =>
        {
            Some(list.gzip().await?)
        }
        _ => None,
    };
    let json = (
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let vary = (header::VARY, HeaderValue::from_static("accept-encoding"));
    let mut res = match gzip {
        Some(body) => (
            [
                json,
                vary,
                (header::CONTENT_ENCODING, HeaderValue::from_static("gzip")),
            ],
            body,
        )
            .into_response(),
        None => ([json, vary], page.body).into_response(),
    };
    if let Some(next) = page.next_cursor {
        let value = HeaderValue::from_str(&next)
            .map_err(|e| ApiError::internal(format!("cursor {next:?} as a header: {e}")))?;
        res.headers_mut().insert(vm_list::NEXT_CURSOR_HEADER, value);
    }
    Ok(res)
}

/// Launch a VM
#[utoipa::path(
    post,
    path = "/v1/vms",
    tag = "vms",
    operation_id = "launchVm",
    summary = "Launch a VM",
    description = "Boots a VM of `machineType`, or restores the snapshot `snapshotId` (machine shape, env vars and firewall from the snapshot \
                   unless the request gives env vars or a firewall; `machineType`, if given, must be the snapshot's).",
    request_body(content = LaunchVmRequest, example = json!(examples::launch_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 201, description = "The VM is running", body = Vm, example = json!(examples::vm())),
        (status = 202, description = "The VM is still provisioning (poll GET /v1/vms/{id}), or failed to start (status error)", body = Vm, example = json!(examples::vm_provisioning())),
        (status = 400, description = "Malformed body, or it breaks a rule: `INVALID_MACHINE_TYPE`, `MACHINE_TYPE_MISMATCH` (not the snapshot's), `INVALID_METADATA`, `INVALID_ENV_VARS`, `INVALID_CIDR`, `INVALID_PORTS`, `INVALID_FIREWALL`, `DEAD_FQDN_RULE`, `INVALID_TTL` (the same codes as the routes that change these values later)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such snapshot (snapshotId) in the caller's org", body = ErrorBody),
        (status = 409, description = "The snapshot is not ready", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 429, description = "An org quota would be exceeded (`QUOTA_EXCEEDED_VCPU`, `QUOTA_EXCEEDED_MEMORY_MIB`, `QUOTA_EXCEEDED_DISK_GIB`); nothing was created", body = ErrorBody),
    )
)]
pub async fn launch(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<LaunchVmRequest>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let rec = state.launch_vm(caller, req).await?;
    let status = if rec.status == VmStatus::Running {
        StatusCode::CREATED
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(view(&rec))))
}

/// Get a VM
#[utoipa::path(
    get,
    path = "/v1/vms/{id}",
    tag = "vms",
    operation_id = "getVm",
    summary = "Get a VM",
    description = "The VM with its current status, shape, firewall (as set and as enforced), TTL deadline and attachments.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM", body = Vm, example = json!(examples::vm())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
    )
)]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
) -> Result<Json<Vm>, ApiError> {
    state
        .vm_json(&state.find_vm(caller.org_id, id).await?)
        .await
}

/// Update a VM
#[utoipa::path(
    patch,
    path = "/v1/vms/{id}",
    tag = "vms",
    operation_id = "updateVm",
    summary = "Update a VM",
    description = "Changes the VM's name, metadata and/or TTL; fields not given are kept (at least one is required). A new TTL starts a new full cycle.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = UpdateVmRequest, example = json!(examples::update_vm_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The updated VM", body = Vm, example = json!(examples::vm_updated())),
        (status = 400, description = "Malformed body, or it breaks a rule: nothing to update (`INVALID_REQUEST`), `INVALID_METADATA`, `INVALID_TTL`", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(req): JsonBody<UpdateVmRequest>,
) -> Result<Json<Vm>, ApiError> {
    state
        .vm_json(&state.update_vm(caller.org_id, id, req).await?)
        .await
}

/// Delete a VM
#[utoipa::path(
    delete,
    path = "/v1/vms/{id}",
    tag = "vms",
    operation_id = "deleteVm",
    summary = "Delete a VM",
    description = "Kills the VM's process and removes its disk; its services and console sessions end. Snapshots taken from it are kept.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM is deleted: its process killed, its disk removed", body = DeleteResponse, example = json!(examples::vm_deleted())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is already being deleted", body = ErrorBody),
    )
)]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
) -> Result<Json<DeleteResponse>, ApiError> {
    state.delete_vm(caller.org_id, id).await?;
    Ok(Json(DeleteResponse::new(id)))
}

/// Pause a VM
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/pause",
    tag = "vms",
    operation_id = "pauseVm",
    summary = "Pause a VM",
    description = "Stops the VM's vCPUs and keeps its memory: it costs no CPU while paused, and `POST /v1/vms/{id}/resume` continues it where it was, processes and open files intact. A TTL countdown freezes (`ttlRemainingMs`). A request for one of its services through the proxy resumes it.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM is paused: memory kept, vCPUs stopped, TTL frozen", body = Vm, example = json!(examples::vm_paused())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is not running", body = ErrorBody),
    )
)]
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
) -> Result<Json<Vm>, ApiError> {
    state
        .vm_json(&state.pause_vm(caller.org_id, id).await?)
        .await
}

/// Resume a paused VM
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/resume",
    tag = "vms",
    operation_id = "resumeVm",
    summary = "Resume a paused VM",
    description = "Continues a paused VM where it stopped. The TTL countdown starts a new full cycle. The org's quotas are checked first (a VM paused before its org's limits were lowered may not fit).",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM is running again", body = Vm, example = json!(examples::vm())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is not paused", body = ErrorBody),
        (status = 429, description = "The org is over a VM quota (its limits were lowered below its usage); the VM stays paused", body = ErrorBody),
    )
)]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
) -> Result<Json<Vm>, ApiError> {
    let rec = state.resume_vm(caller.org_id, id).await?;
    // Attachments made while it was paused.
    state.mount_pending_volumes(id).await;
    state.vm_json(&rec).await
}

/// Reset the VM's TTL cycle
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/ttl/refresh",
    tag = "vms",
    operation_id = "refreshVmTtl",
    summary = "Reset the VM's TTL cycle",
    description = "Starts a new full TTL cycle: a running VM gets `expiresAtMs` = now + `ttl.seconds`; a paused VM gets \
                   `ttlRemainingMs` = `ttl.seconds` × 1000 (the countdown stays frozen until it is resumed). When the deadline passes, \
                   the server runs `ttl.action` within about a second: `pause` (running → pausing → paused; the next resume starts a \
                   full cycle) or `delete` (like DELETE /v1/vms/{id}).",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM with its new deadline", body = Vm, example = json!(examples::vm())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM has no TTL (`TTL_NOT_SET`), or is neither running nor paused (`INVALID_STATE`)", body = ErrorBody),
    )
)]
pub async fn refresh_ttl(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(view(&state.refresh_ttl(caller.org_id, id).await?)))
}

/// Replace firewall policy
#[utoipa::path(
    put,
    path = "/v1/vms/{id}/firewall",
    tag = "vms",
    operation_id = "setVmFirewall",
    summary = "Replace firewall policy",
    description = "Replaces the VM's firewall (missing blocks take the safe defaults: ingress deny, egress allow, dns mode=deny). \
                   A running VM enforces the new policy within a second, without a restart.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = FirewallPolicy, example = json!(examples::firewall())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM with its new firewall", body = Vm, example = json!(examples::vm_firewalled())),
        (status = 400, description = "Malformed body, or a rule breaks the spec (`INVALID_CIDR`, `INVALID_PORTS`, `INVALID_FIREWALL`, `DEAD_FQDN_RULE`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is being deleted", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn set_firewall(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(policy): JsonBody<FirewallPolicy>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(view(
        &state.set_firewall(caller.org_id, id, policy, false).await?,
    )))
}

/// Patch firewall policy
#[utoipa::path(
    patch,
    path = "/v1/vms/{id}/firewall",
    tag = "vms",
    operation_id = "patchVmFirewall",
    summary = "Patch firewall policy",
    description = "Each block given (ingress, egress, dns) replaces the VM's current one; blocks not given are kept. The result is \
                   validated as a whole (an fqdn rule made dead by the dns block is rejected) and enforced within a second.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = FirewallPolicy, example = json!(examples::firewall_patch())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The VM with its new firewall", body = Vm, example = json!(examples::vm_firewalled())),
        (status = 400, description = "Malformed body, or the merged policy breaks the spec (`INVALID_CIDR`, `INVALID_PORTS`, `INVALID_FIREWALL`, `DEAD_FQDN_RULE`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is being deleted", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn patch_firewall(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(policy): JsonBody<FirewallPolicy>,
) -> Result<Json<Vm>, ApiError> {
    Ok(Json(view(
        &state.set_firewall(caller.org_id, id, policy, true).await?,
    )))
}
