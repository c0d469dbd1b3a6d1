//! `/v1/me/ssh-keys`: the calling user's SSH public keys (list, add, delete
//! by fingerprint), which the SSH gateway (`crate::ssh`) accepts for the VMs
//! of the user's org.
//!
//! Keys belong to the user of the calling API key (the admin key's user
//! `admin` today). An org key without a user (`fastvm keys create`) has no
//! SSH keys: 403 `NO_USER`.

use crate::auth::Caller;
use crate::error::{codes, ApiError};
use crate::openapi::examples;
use crate::routes::JsonBody;
use crate::store::{AddSshKeyError, SshKeyRecord};
use crate::AppState;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use fastvm_types::ssh_key::{AddSshKeyRequest, SshGatewayInfo, SshKey, SshKeyListResponse};
use fastvm_types::{ApiError as ErrorBody, DeleteResponse};

fn user_of(caller: &Caller) -> Result<uuid::Uuid, ApiError> {
    caller.user_id.ok_or_else(|| {
        ApiError::new(
            StatusCode::FORBIDDEN,
            codes::NO_USER,
            "this API key belongs to the org, not to a user (made with `fastvm keys create`); SSH keys are per user: call with a user's key (e.g. the admin key)",
        )
    })
}

fn to_api(r: SshKeyRecord) -> SshKey {
    SshKey {
        name: r.name,
        public_key: r.public_key,
        fingerprint: r.fingerprint,
        created_at: crate::routes::vms::rfc3339(r.created_at_ms),
    }
}

/// List the calling user's authorized SSH keys
#[utoipa::path(
    get,
    path = "/v1/me/ssh-keys",
    tag = "me",
    operation_id = "listSshKeys",
    summary = "List the calling user's authorized SSH keys",
    description = "The keys that let the calling user (the API key's user) reach every VM of the org through the SSH gateway: `ssh -p <port> <vm-id>@<gateway host>`.",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The caller's keys, oldest first", body = SshKeyListResponse, example = json!(examples::ssh_key_list())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The API key belongs to no user (`NO_USER`)", body = ErrorBody),
    )
)]
pub async fn list_ssh_keys(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<SshKeyListResponse>, ApiError> {
    let user = user_of(&caller)?;
    let keys = state.store().list_ssh_keys(user).await?;
    Ok(Json(SshKeyListResponse {
        keys: keys.into_iter().map(to_api).collect(),
    }))
}

/// Register an SSH public key for the calling user
#[utoipa::path(
    post,
    path = "/v1/me/ssh-keys",
    tag = "me",
    operation_id = "addSshKey",
    summary = "Register an SSH public key for the calling user",
    description = "Then `ssh -p <port> <vm-id>@<gateway host>` reaches any VM of the caller's org. Types: ssh-ed25519, ssh-rsa (at least 2048 bits), ecdsa-sha2-nistp256/384/521, sk-ssh-ed25519@openssh.com, sk-ecdsa-sha2-nistp256@openssh.com. The comment is stripped; newlines are rejected. At most 100 keys per user.",
    request_body(content = AddSshKeyRequest, example = json!(examples::add_ssh_key())),
    security(("bearerAuth" = [])),
    responses(
        (status = 201, description = "The registered key", body = SshKey, example = json!(examples::ssh_key())),
        (status = 400, description = "Malformed body, or a key that cannot be used (`INVALID_SSH_KEY`: unsupported type, bad encoding, RSA under 2048 bits, several lines)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The API key belongs to no user (`NO_USER`)", body = ErrorBody),
        (status = 409, description = "The key is registered for this user already (`SSH_KEY_EXISTS`), or the user has 100 keys (`TOO_MANY_SSH_KEYS`)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn add_ssh_key(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(req): JsonBody<AddSshKeyRequest>,
) -> Result<(StatusCode, Json<SshKey>), ApiError> {
    let user = user_of(&caller)?;
    let (parsed, name) = req.validate()?;
    crate::ssh::keys::check_public_key(&parsed)?;
    let record = SshKeyRecord {
        user_id: user,
        org_id: caller.org_id,
        fingerprint: parsed.fingerprint,
        key_type: parsed.key_type,
        public_key: parsed.canonical,
        name,
        created_at_ms: 0,
    };
    match state.store().add_ssh_key(record).await {
        Ok(r) => Ok((StatusCode::CREATED, Json(to_api(r)))),
        Err(e @ AddSshKeyError::Exists(_)) => Err(ApiError::new(
            StatusCode::CONFLICT,
            codes::SSH_KEY_EXISTS,
            e.to_string(),
        )),
        Err(e @ AddSshKeyError::TooMany) => Err(ApiError::new(
            StatusCode::CONFLICT,
            codes::TOO_MANY_SSH_KEYS,
            e.to_string(),
        )),
        Err(AddSshKeyError::Store(e)) => Err(e.into()),
    }
}

/// Remove an authorized SSH key
#[utoipa::path(
    delete,
    path = "/v1/me/ssh-keys/{fingerprint}",
    tag = "me",
    operation_id = "deleteSshKey",
    summary = "Remove an authorized SSH key",
    description = "The key no longer authorizes new SSH connections; connections it opened stay open.",
    params(("fingerprint" = String, Path, description = "OpenSSH SHA256 fingerprint of the key to delete (e.g. SHA256:abc...), URL-encoded (`SHA256%3A...`, `+` as `%2B`, `/` as `%2F`).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The key is gone (`id` is its fingerprint); connections it opened stay open", body = DeleteResponse, example = json!(examples::ssh_key_deleted())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 403, description = "The API key belongs to no user (`NO_USER`)", body = ErrorBody),
        (status = 404, description = "The caller has no key with this fingerprint", body = ErrorBody),
    )
)]
pub async fn delete_ssh_key(
    State(state): State<AppState>,
    caller: Caller,
    Path(fingerprint): Path<String>,
) -> Result<Json<DeleteResponse>, ApiError> {
    let user = user_of(&caller)?;
    let shown: String = fingerprint.chars().take(80).collect();
    if !fingerprint.starts_with("SHA256:") || fingerprint.len() > 80 {
        return Err(ApiError::not_found(format!(
            "no SSH key with fingerprint {shown:?}; fingerprints look like SHA256:<43 base64 characters>, URL-encoded in the path"
        )));
    }
    if !state.store().delete_ssh_key(user, &fingerprint).await? {
        return Err(ApiError::not_found(format!(
            "you have no SSH key with fingerprint {shown:?}"
        )));
    }
    Ok(Json(DeleteResponse::new(fingerprint)))
}

/// How to reach the SSH gateway
#[utoipa::path(
    get,
    path = "/v1/ssh-gateway",
    tag = "me",
    operation_id = "getSshGateway",
    summary = "How to reach the SSH gateway",
    description = "An extension of this server: the gateway's port (on the API's host) and its public host keys, for a known_hosts entry (`fastvm ssh` uses it). 404 `NOT_FOUND` when the server runs without a gateway.",
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "Port and host keys", body = SshGatewayInfo, example = json!(examples::ssh_gateway())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No SSH gateway runs (`fastvm serve` without `--ssh-listen`)", body = ErrorBody),
    )
)]
pub async fn ssh_gateway(
    State(state): State<AppState>,
    _caller: Caller,
) -> Result<Json<SshGatewayInfo>, ApiError> {
    state.ssh_public().cloned().map(Json).ok_or_else(|| {
        ApiError::not_found(
            "this server runs no SSH gateway (start it with `fastvm serve --ssh-listen ADDR`)",
        )
    })
}
