//! The one error type of every handler, rendered as the API's single error
//! shape `{"error": {"code": "...", "message": "..."}}` with the right status.
//!
//! | status | codes                                                              |
//! |--------|--------------------------------------------------------------------|
//! | 400    | `INVALID_JSON` (syntax), `INVALID_REQUEST` (shape: types, unknown or missing fields; or nothing to update), the [`fastvm_types::codes`] of validation (`INVALID_CIDR`, `INVALID_METADATA`, `INVALID_TIMEOUT`, `INVALID_SERVICE_NAME`, ...), `MACHINE_TYPE_MISMATCH` (restore with another machine type than the snapshot's), `BUCKET_ENDPOINT_NOT_ALLOWED` (a bucket mount's `endpoint_url` on a private, loopback or link-local address the operator did not allow), `CREDENTIALS_REFUSED` (a rotation's new credentials do not reach the bucket; the old ones stay), `INVALID_LIMIT` / `INVALID_CURSOR` (the list extension's `limit` / `cursor` of `GET /v1/vms`) |
//! | 401    | `UNAUTHENTICATED`                                                  |
//! | 403    | `NO_USER` (a per-user resource, SSH keys, asked for with an org key that has no user), `FORBIDDEN` (an admin endpoint, `/v1/admin/...`, with another key than the admin key) |
//! | 404    | `NOT_FOUND` (unknown route, bad UUID, another org's resource)      |
//! | 405    | `METHOD_NOT_ALLOWED`                                               |
//! | 409    | `INVALID_STATE` (illegal status transition, snapshot not ready), `TTL_NOT_SET` (TTL refresh of a VM without TTL), `SERVICE_EXISTS` (POST of a service name the VM has), `TOO_MANY_SERVICES` (more than 16 services on one VM), `SSH_KEY_EXISTS` (the user registered this key already), `TOO_MANY_SSH_KEYS` (100 keys per user), `STALE_GENERATION` (internal: a worker's heartbeat of a generation that is not current; it registers again), `VOL_NOT_READY` (attach of a volume that is not `ready`), `VOLUME_IN_USE` (delete of an attached volume, the same volume or mount path twice on one VM), `VOLUME_ATTACHED` (shrink or mode change refused while attached), `VOLUME_ERROR` (the worker or the guest refused a volume operation; the message says why), `MOUNT_PATH_IN_USE` (a bucket mount at a path where the VM has a volume or bucket mounted) |
//! | 413    | `PAYLOAD_TOO_LARGE`                                                |
//! | 415    | `UNSUPPORTED_MEDIA_TYPE`                                           |
//! | 429    | `QUOTA_EXCEEDED_VCPU`, `QUOTA_EXCEEDED_MEMORY_MIB`, `QUOTA_EXCEEDED_DISK_GIB`, `QUOTA_EXCEEDED_SNAPSHOT_COUNT`, `QUOTA_EXCEEDED_VOLUME_COUNT`, `QUOTA_EXCEEDED_VOLUME_GIB` (an org limit would be exceeded; nothing changed), `TOO_MANY_EXECS` (the VM has 64 execs, terminals and guest connections open), `STAGING_QUOTA_EXCEEDED` (the org's staged bytes would pass the server's cap; nothing was stored) |
//! | 500    | `INTERNAL`, `DATABASE_ERROR`, `WORKER_ERROR`                       |
//! | 501    | `NOT_IMPLEMENTED`                                                  |
//! | 502    | `UPSTREAM_REFUSED` (nothing listens on the port in the guest)      |
//! | 503    | `AGENT_UNAVAILABLE`, `UNAVAILABLE`, `WORKER_UNREACHABLE`, `NO_CAPACITY` (cluster: no ready worker, of the snapshot's compatibility where it matters, has room for the VM), `FIREWALL_NOT_ENFORCED` (the worker could not enforce a new firewall or service set; nothing changed) |
//! | 504    | `UPSTREAM_TIMEOUT`, `VM_UNRESPONSIVE` (the VM's hypervisor stopped answering; the VM is now `error`) |
//!
//! One error, one status, everywhere: a request the server refuses because of
//! what it says (its syntax, its shape, or a rule one of its values breaks) is
//! a 400, on every route that takes the value, with the rule's own code. The
//! spec has no error table, but where it names the status of a broken rule it
//! is 400 (a snapshot-import source mixing both variants, a context presign
//! over the size cap), so 400 it is; this server never answers 422. Build such
//! errors with [`ApiError::invalid`] or `?` on a [`ValidationError`].

use crate::store::StoreError;
use crate::worker::WorkerError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use fastvm_types::ValidationError;

/// Machine-readable codes of the server's own errors (validation codes come
/// from [`fastvm_types::codes`]).
pub mod codes {
    pub const INVALID_JSON: &str = "INVALID_JSON";
    pub const INVALID_REQUEST: &str = "INVALID_REQUEST";
    pub const UNAUTHENTICATED: &str = "UNAUTHENTICATED";
    pub const NOT_FOUND: &str = "NOT_FOUND";
    pub const METHOD_NOT_ALLOWED: &str = "METHOD_NOT_ALLOWED";
    pub const INVALID_STATE: &str = "INVALID_STATE";
    pub const PAYLOAD_TOO_LARGE: &str = "PAYLOAD_TOO_LARGE";
    pub const UNSUPPORTED_MEDIA_TYPE: &str = "UNSUPPORTED_MEDIA_TYPE";
    pub const MACHINE_TYPE_MISMATCH: &str = "MACHINE_TYPE_MISMATCH";
    pub const INVALID_LIMIT: &str = "INVALID_LIMIT";
    pub const INVALID_CURSOR: &str = "INVALID_CURSOR";
    pub const INTERNAL: &str = "INTERNAL";
    pub const DATABASE_ERROR: &str = "DATABASE_ERROR";
    pub const WORKER_ERROR: &str = "WORKER_ERROR";
    pub const AGENT_UNAVAILABLE: &str = "AGENT_UNAVAILABLE";
    pub const UNAVAILABLE: &str = "UNAVAILABLE";
    pub const NOT_IMPLEMENTED: &str = "NOT_IMPLEMENTED";
    pub const TTL_NOT_SET: &str = "TTL_NOT_SET";
    pub const UPSTREAM_REFUSED: &str = "UPSTREAM_REFUSED";
    pub const UPSTREAM_TIMEOUT: &str = "UPSTREAM_TIMEOUT";
    pub const WORKER_UNREACHABLE: &str = "WORKER_UNREACHABLE";
    pub const VM_UNRESPONSIVE: &str = "VM_UNRESPONSIVE";
    pub const FIREWALL_NOT_ENFORCED: &str = "FIREWALL_NOT_ENFORCED";
    pub const SERVICE_EXISTS: &str = "SERVICE_EXISTS";
    pub const TOO_MANY_SERVICES: &str = "TOO_MANY_SERVICES";
    pub const SSH_KEY_EXISTS: &str = "SSH_KEY_EXISTS";
    pub const TOO_MANY_SSH_KEYS: &str = "TOO_MANY_SSH_KEYS";
    pub const NO_USER: &str = "NO_USER";
    pub const QUOTA_EXCEEDED_VCPU: &str = "QUOTA_EXCEEDED_VCPU";
    pub const QUOTA_EXCEEDED_MEMORY_MIB: &str = "QUOTA_EXCEEDED_MEMORY_MIB";
    pub const QUOTA_EXCEEDED_DISK_GIB: &str = "QUOTA_EXCEEDED_DISK_GIB";
    pub const QUOTA_EXCEEDED_SNAPSHOT_COUNT: &str = "QUOTA_EXCEEDED_SNAPSHOT_COUNT";
    pub const QUOTA_EXCEEDED_VOLUME_COUNT: &str = "QUOTA_EXCEEDED_VOLUME_COUNT";
    pub const QUOTA_EXCEEDED_VOLUME_GIB: &str = "QUOTA_EXCEEDED_VOLUME_GIB";
    pub const TOO_MANY_EXECS: &str = "TOO_MANY_EXECS";
    pub const VOL_NOT_READY: &str = "VOL_NOT_READY";
    pub const VOLUME_IN_USE: &str = "VOLUME_IN_USE";
    pub const VOLUME_ERROR: &str = "VOLUME_ERROR";
    pub const VOLUME_ATTACHED: &str = "VOLUME_ATTACHED";
    pub const MOUNT_PATH_IN_USE: &str = "MOUNT_PATH_IN_USE";
    pub const BUCKET_ENDPOINT_NOT_ALLOWED: &str = "BUCKET_ENDPOINT_NOT_ALLOWED";
    pub const CREDENTIALS_REFUSED: &str = "CREDENTIALS_REFUSED";
    pub const STAGING_QUOTA_EXCEEDED: &str = "STAGING_QUOTA_EXCEEDED";
    pub const FORBIDDEN: &str = "FORBIDDEN";
    pub const NO_CAPACITY: &str = "NO_CAPACITY";
    pub const STALE_GENERATION: &str = "STALE_GENERATION";
}

/// An error answer: status, code and message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code: code.into(),
            message: message.into(),
        }
    }

    /// 400: the request is malformed or one of its values breaks a rule;
    /// `code` says which.
    pub fn invalid(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, codes::UNAUTHENTICATED, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, message)
    }

    /// 409: the resource's current status forbids the operation.
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, codes::INVALID_STATE, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, codes::INTERNAL, message)
    }

    /// The wire body.
    pub fn body(&self) -> fastvm_types::ApiError {
        fastvm_types::ApiError::new(self.code.clone(), self.message.clone())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = %self.code, message = %self.message, "request failed");
        }
        let mut res = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        res
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::invalid(e.code, e.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => ApiError::not_found(m),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "CONFLICT", m),
            StoreError::Db(sqlx::Error::PoolTimedOut) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::UNAVAILABLE,
                "the database is busy; retry",
            ),
            other => ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                codes::DATABASE_ERROR,
                other.to_string(),
            ),
        }
    }
}

impl From<WorkerError> for ApiError {
    fn from(e: WorkerError) -> Self {
        let msg = e.to_string();
        match e {
            WorkerError::NotFound(_) => {
                ApiError::invalid_state(format!("the VM is gone from its worker: {msg}"))
            }
            WorkerError::NoSuchSnapshot(_) => {
                ApiError::invalid_state(format!("the snapshot is gone from its worker: {msg}"))
            }
            WorkerError::WrongState(_) => ApiError::invalid_state(msg),
            WorkerError::Volume(_) => ApiError::new(StatusCode::CONFLICT, codes::VOLUME_ERROR, msg),
            WorkerError::UnknownMachineType(_) => {
                ApiError::invalid(fastvm_types::codes::INVALID_MACHINE_TYPE, msg)
            }
            WorkerError::InvalidExec(_) => {
                ApiError::invalid(fastvm_types::codes::INVALID_COMMAND, msg)
            }
            WorkerError::AgentUnavailable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::AGENT_UNAVAILABLE,
                msg,
            ),
            WorkerError::TooManyExecs(_) => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, codes::TOO_MANY_EXECS, msg)
            }
            WorkerError::ConnectRefused(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, codes::UPSTREAM_REFUSED, msg)
            }
            WorkerError::Timeout(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, codes::UPSTREAM_TIMEOUT, msg)
            }
            WorkerError::Unreachable(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                codes::WORKER_UNREACHABLE,
                msg,
            ),
            WorkerError::Unresponsive(_) => {
                ApiError::new(StatusCode::GATEWAY_TIMEOUT, codes::VM_UNRESPONSIVE, msg)
            }
            WorkerError::Failed(_) | WorkerError::Import(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, codes::WORKER_ERROR, msg)
            }
        }
    }
}
