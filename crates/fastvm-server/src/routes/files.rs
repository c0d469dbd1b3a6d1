//! File transfer: `POST /v1/vms/{id}/files/presign`, `/files/fetch`,
//! `/files/export` (an extension of this server) and the signed staging URLs
//! `PUT|GET /v1/staging/{token}` of the local backend.
//!
//! ```text
//!  fetch  {url: downloadUrl, path}: the object streams from the staging store
//!         into the stdin of `sh -c 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"' sh PATH`
//!  export {url: uploadUrl, path}:   classify PATH in the guest (file|dir|missing),
//!         then the stdout of `cat -- PATH` or `tar -C PATH -cf - .` streams into the object
//! ```
//!
//! Both move the bytes over the agent channel, pulled end to end (the agent's
//! credit window is the only buffer), so they work when the guest has no
//! network and memory stays flat whatever the size. The spec's download flow
//! (`curl -T -` from the VM to uploadUrl) needs guest egress; `export` does
//! not, which is why it exists.

use crate::auth::Caller;
use crate::error::ApiError;
use crate::openapi::examples;
use crate::routes::{exec::collect, JsonBody, VmPath};
use crate::staging::{
    local::key_of, Method, ObjectKey, StagingError, StagingStore as _, TokenError,
};
use crate::worker::{ExecEvent, ExecRequest};
use crate::AppState;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fastvm_types::exec::ExecVmResponse;
use fastvm_types::files::{
    FileExportRequest, FileExportResponse, FileFetchRequest, FileKind, FilePresignRequest,
    FilePresignResponse,
};
use fastvm_types::ApiError as ErrorBody;
use fastvm_types::{OrgId, VmId, VmStatus};
use futures::StreamExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Machine-readable codes of file transfer errors.
pub mod codes {
    /// The staging URL's signature does not match (403 on /v1/staging).
    pub const SIGNED_URL_INVALID: &str = "SIGNED_URL_INVALID";
    /// The staging URL expired (403 on /v1/staging, 400 on fetch/export).
    pub const SIGNED_URL_EXPIRED: &str = "SIGNED_URL_EXPIRED";
    /// uploadUrl used to GET or downloadUrl to PUT (403).
    pub const SIGNED_URL_WRONG_METHOD: &str = "SIGNED_URL_WRONG_METHOD";
    /// fetch got a URL that is not a downloadUrl of this org.
    pub const INVALID_FETCH_URL: &str = "INVALID_FETCH_URL";
    /// export got a URL that is not an uploadUrl of this VM.
    pub const INVALID_EXPORT_URL: &str = "INVALID_EXPORT_URL";
    /// Nothing was uploaded to the staging object.
    pub const STAGING_OBJECT_NOT_FOUND: &str = "STAGING_OBJECT_NOT_FOUND";
    /// The path does not exist in the guest (export).
    pub const FILE_NOT_FOUND: &str = "FILE_NOT_FOUND";
    /// Reading the path in the guest failed (export).
    pub const EXPORT_FAILED: &str = "EXPORT_FAILED";
    pub const STAGING_ERROR: &str = "STAGING_ERROR";
    pub const UPLOAD_INCOMPLETE: &str = "UPLOAD_INCOMPLETE";
    /// The uploadUrl stored its object already (409): upload URLs are single-use.
    pub const UPLOAD_URL_USED: &str = "UPLOAD_URL_USED";
}

/// Timeout of fetch/export when the request gives none.
const DEFAULT_TIMEOUT: Duration =
    Duration::from_secs(fastvm_types::files::FILE_TRANSFER_DEFAULT_TIMEOUT_SEC);
/// Writes the object to PATH, creating its parent directories.
const FETCH_SCRIPT: &str = r#"mkdir -p -- "$(dirname -- "$1")" && cat > "$1""#;
/// Prints what PATH is.
const CLASSIFY_SCRIPT: &str = r#"if [ -d "$1" ]; then echo directory; elif [ -e "$1" ]; then echo file; else echo missing; fi"#;
/// Stderr kept for an export's error message.
const STDERR_KEEP: usize = 4096;

impl From<StagingError> for ApiError {
    fn from(e: StagingError) -> Self {
        let msg = e.to_string();
        match e {
            StagingError::NotFound => {
                ApiError::new(StatusCode::NOT_FOUND, codes::STAGING_OBJECT_NOT_FOUND, msg)
            }
            StagingError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                crate::error::codes::PAYLOAD_TOO_LARGE,
                msg,
            ),
            StagingError::QuotaExceeded { .. } => ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                crate::error::codes::STAGING_QUOTA_EXCEEDED,
                msg,
            ),
            StagingError::AlreadyUploaded => {
                ApiError::new(StatusCode::CONFLICT, codes::UPLOAD_URL_USED, msg)
            }
            StagingError::Input(_) => ApiError::invalid(codes::UPLOAD_INCOMPLETE, msg),
            StagingError::Backend(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, codes::STAGING_ERROR, msg)
            }
        }
    }
}

/// A refused staging URL on `/v1/staging/{token}`: 403 with the reason.
fn token_error(e: TokenError) -> ApiError {
    let code = match e {
        TokenError::Invalid => codes::SIGNED_URL_INVALID,
        TokenError::Expired => codes::SIGNED_URL_EXPIRED,
        TokenError::WrongMethod(_) => codes::SIGNED_URL_WRONG_METHOD,
    };
    ApiError::new(StatusCode::FORBIDDEN, code, e.to_string())
}

/// A refused URL in a fetch/export body: 400.
fn body_url_error(e: TokenError, invalid_code: &str, what: &str) -> ApiError {
    match e {
        TokenError::Expired => ApiError::invalid(codes::SIGNED_URL_EXPIRED, format!("{what} expired; presign a new one")),
        other => ApiError::invalid(invalid_code, format!("{what} must come from POST /v1/vms/{{id}}/files/presign of this server and org: {other}")),
    }
}

fn timeout_of(sec: Option<u64>) -> Duration {
    sec.map(Duration::from_secs).unwrap_or(DEFAULT_TIMEOUT)
}

impl AppState {
    /// The VM (of `org`) and its upload cap, checking it runs.
    async fn running_vm_cap(&self, org: OrgId, id: VmId, what: &str) -> Result<u64, ApiError> {
        let rec = self.find_vm(org, id).await?;
        if rec.status != VmStatus::Running {
            return Err(ApiError::invalid_state(format!(
                "VM {id} is {}; {what} needs it running",
                rec.status.as_str()
            )));
        }
        Ok(self.upload_cap(&rec))
    }

    /// The most a staging object of this VM may hold: its disk size, or the
    /// configured cap when lower.
    fn upload_cap(&self, rec: &crate::store::VmRecord) -> u64 {
        let disk = rec.disk_gib.saturating_mul(1 << 30);
        self.staging_config()
            .max_upload_bytes
            .map_or(disk, |m| m.min(disk))
    }
}

/// Mint signed URLs for uploading a file to a VM
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/files/presign",
    tag = "files",
    operation_id = "presignFile",
    summary = "Mint signed URLs for uploading a file to a VM",
    description = "Mints a signed PUT URL (`uploadUrl`) and the matching GET URL (`downloadUrl`) of one new object in the staging store, valid for `expiresInSec`, for a file of at most `maxUploadBytes`. Upload the bytes with `PUT uploadUrl`, then write them into the VM with `POST /v1/vms/{id}/files/fetch`. The URLs carry their own credential: no API key on them.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = FilePresignRequest, example = json!(examples::presign_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "A PUT and a GET URL of one new staging object", body = FilePresignResponse, example = json!(examples::presign_response())),
        (status = 400, description = "Malformed body, or the path is not absolute (`INVALID_PATH`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
    )
)]
pub async fn presign(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(req): JsonBody<FilePresignRequest>,
) -> Result<Json<FilePresignResponse>, ApiError> {
    req.validate()?;
    let staging = state.staging()?;
    let cap = state.upload_cap(&state.find_vm(caller.org_id, id).await?);
    let key = ObjectKey {
        org: caller.org_id.to_string(),
        vm: id.to_string(),
        object: uuid::Uuid::new_v4().to_string(),
    };
    let ttl = state.staging_config().url_ttl;
    let urls = staging.presign(&key, cap, ttl).await?;
    Ok(Json(FilePresignResponse {
        upload_url: urls.upload_url,
        download_url: urls.download_url,
        expires_in_sec: ttl.as_secs(),
        max_upload_bytes: cap,
    }))
}

/// Fetch a file into a VM from a presigned URL
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/files/fetch",
    tag = "files",
    operation_id = "fetchFile",
    summary = "Fetch a file into a VM from a presigned URL",
    description = "Writes the staged object at `url` (a `downloadUrl` of `POST /v1/vms/{id}/files/presign`, of this org) to `path` in the VM, creating parent directories, through the agent (the VM needs no network). Answers like exec: exit code 0 when the file is written.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = FileFetchRequest, example = json!(examples::fetch_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The result of writing the object to the path (exit 0: done)", body = ExecVmResponse, example = json!(examples::fetch_response())),
        (status = 400, description = "Malformed body; the path or timeout breaks a rule (`INVALID_PATH`, `INVALID_TIMEOUT`); `INVALID_FETCH_URL`: not a downloadUrl of this org; `SIGNED_URL_EXPIRED`", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org; `STAGING_OBJECT_NOT_FOUND`: nothing uploaded yet", body = ErrorBody),
        (status = 409, description = "The VM is not running", body = ErrorBody),
        (status = 413, description = "The staged object is larger than the VM's upload cap (maxUploadBytes)", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 429, description = "`TOO_MANY_EXECS`: the VM has 64 execs, terminals and guest connections open", body = ErrorBody),
        (status = 503, description = "The VM's agent does not answer", body = ErrorBody),
    )
)]
pub async fn fetch(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(req): JsonBody<FileFetchRequest>,
) -> Result<Json<ExecVmResponse>, ApiError> {
    req.validate()?;
    let staging = state.staging()?;
    let cap = state.running_vm_cap(caller.org_id, id, "fetch").await?;
    let key = staging
        .resolve(&req.url, Method::Get)
        .map_err(|e| body_url_error(e, codes::INVALID_FETCH_URL, "url (a downloadUrl)"))?;
    if key.org != caller.org_id.to_string() {
        return Err(ApiError::invalid(
            codes::INVALID_FETCH_URL,
            "url was presigned for a VM of another org; presign one for a VM of yours",
        ));
    }
    // A presigned PUT to S3 cannot be capped: refuse an over-cap object
    // here, from its size, before a byte reaches the guest.
    let (size, body) = staging.get(&key).await?;
    if size > cap {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            crate::error::codes::PAYLOAD_TOO_LARGE,
            format!("the staged object is {size} bytes, over this VM's limit of {cap} bytes (maxUploadBytes of presign); upload less"),
        ));
    }
    let mut wreq = ExecRequest::argv(["sh", "-c", FETCH_SCRIPT, "sh", req.path.as_str()])
        .with_timeout(timeout_of(req.timeout_sec));
    wreq.stdin = true;
    let events = state
        .worker_of(id)
        .await?
        .exec_with_input(id, wreq, body)
        .await?;
    Ok(Json(collect(events).await?))
}

/// Stream a file or directory of a VM into a staging object (extension)
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/files/export",
    tag = "files",
    operation_id = "exportFile",
    summary = "Export a file or directory from a VM (extension)",
    description = "Extension of this server (not in the spec). The guest path is classified inside the VM; a file's bytes, or a tar archive of a directory rooted at `./`, stream over the agent channel into the staging object of `url` (an uploadUrl presigned for this VM), which the client then GETs from the matching downloadUrl. Unlike the spec's `curl -T -` from the VM, this works when the VM has no network or a deny-all egress firewall.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = FileExportRequest, example = json!(examples::export_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "What was found and how many bytes were staged", body = FileExportResponse, example = json!(examples::export_response())),
        (status = 400, description = "Malformed body; the path or timeout breaks a rule (`INVALID_PATH`, `INVALID_TIMEOUT`); `INVALID_EXPORT_URL`: not an uploadUrl of this VM; `SIGNED_URL_EXPIRED`", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org; `FILE_NOT_FOUND`: no such path in the guest", body = ErrorBody),
        (status = 409, description = "The VM is not running; `UPLOAD_URL_USED`: the uploadUrl stored its object already (presign a new one)", body = ErrorBody),
        (status = 413, description = "The file or archive exceeds the upload cap", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 429, description = "`TOO_MANY_EXECS`: the VM has 64 execs open; `STAGING_QUOTA_EXCEEDED`: the org's staged bytes would pass the server's cap (nothing stored)", body = ErrorBody),
        (status = 500, description = "`EXPORT_FAILED`: reading the path in the guest failed (message has its stderr)", body = ErrorBody),
        (status = 503, description = "The VM's agent does not answer", body = ErrorBody),
    )
)]
pub async fn export(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    JsonBody(req): JsonBody<FileExportRequest>,
) -> Result<Json<FileExportResponse>, ApiError> {
    req.validate()?;
    let staging = state.staging()?;
    let cap = state.running_vm_cap(caller.org_id, id, "export").await?;
    let key = staging
        .resolve(&req.url, Method::Put)
        .map_err(|e| body_url_error(e, codes::INVALID_EXPORT_URL, "url (an uploadUrl)"))?;
    if key.org != caller.org_id.to_string() || key.vm != id.to_string() {
        return Err(ApiError::invalid(
            codes::INVALID_EXPORT_URL,
            "url was presigned for another VM; presign one for this VM",
        ));
    }
    let deadline = Instant::now() + timeout_of(req.timeout_sec);
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };

    let classify = ExecRequest::argv(["sh", "-c", CLASSIFY_SCRIPT, "sh", req.path.as_str()])
        .with_timeout(left());
    let worker = state.worker_of(id).await?;
    let out = collect(worker.exec(id, classify).await?).await?;
    let kind = match out.stdout.trim() {
        "directory" => FileKind::Directory,
        "file" => FileKind::File,
        "missing" => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                codes::FILE_NOT_FOUND,
                format!("no file or directory {:?} in the VM", req.path),
            ))
        }
        _ => {
            return Err(export_failed(
                "classifying the path",
                out.exit_code,
                out.timed_out,
                &out.stderr,
            ))
        }
    };
    let argv: Vec<&str> = match kind {
        FileKind::File => vec!["cat", "--", req.path.as_str()],
        FileKind::Directory => vec!["tar", "-C", req.path.as_str(), "-cf", "-", "."],
    };
    let events = worker
        .exec(id, ExecRequest::argv(argv).with_timeout(left()))
        .await?;
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let stored = staging
        .put(&key, stdout_of(events, outcome.clone()), cap)
        .await;
    let outcome = outcome.lock().map(|o| o.clone()).unwrap_or_default();
    let size = match stored {
        Ok(size) => size,
        Err(StagingError::Input(_)) => {
            return Err(export_failed(
                "reading the path",
                outcome.code,
                outcome.timed_out,
                &outcome.stderr,
            ))
        }
        Err(e) => return Err(e.into()),
    };
    if outcome.code != 0 || outcome.timed_out {
        let _ = staging.delete(&key).await;
        return Err(export_failed(
            "reading the path",
            outcome.code,
            outcome.timed_out,
            &outcome.stderr,
        ));
    }
    Ok(Json(FileExportResponse {
        kind,
        size_bytes: size,
    }))
}

fn export_failed(step: &str, code: i32, timed_out: bool, stderr: &str) -> ApiError {
    let why = if timed_out {
        "timed out (raise timeoutSec)".to_owned()
    } else {
        format!("exited {code}")
    };
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        codes::EXPORT_FAILED,
        format!("{step} in the VM {why}: {}", stderr.trim()),
    )
}

/// How the exporting process ended.
#[derive(Clone, Debug, Default)]
struct Outcome {
    code: i32,
    timed_out: bool,
    stderr: String,
}

/// The stdout of an exec as a byte stream; stderr and the exit land in `outcome`.
fn stdout_of(
    events: crate::worker::ExecEvents,
    outcome: Arc<Mutex<Outcome>>,
) -> crate::worker::ByteStream {
    let stream = futures::stream::unfold(Some((events, outcome)), |state| async move {
        let (mut events, outcome) = state?;
        loop {
            match events.next().await {
                Some(Ok(ExecEvent::Stdout(d))) => return Some((Ok(d), Some((events, outcome)))),
                Some(Ok(ExecEvent::Stderr(d))) => {
                    if let Ok(mut o) = outcome.lock() {
                        if o.stderr.len() < STDERR_KEEP {
                            o.stderr.push_str(&String::from_utf8_lossy(&d));
                        }
                    }
                }
                Some(Ok(ExecEvent::Exit(s))) => {
                    if let Ok(mut o) = outcome.lock() {
                        o.code = s.code;
                        o.timed_out = s.timed_out;
                        if let Some(e) = s.error {
                            o.stderr.push_str(&e);
                        }
                    }
                    return None;
                }
                Some(Err(e)) => return Some((Err(std::io::Error::other(e.to_string())), None)),
                None => {
                    return Some((
                        Err(std::io::Error::other(
                            "the exec ended without an exit status",
                        )),
                        None,
                    ))
                }
            }
        }
    });
    Box::pin(stream)
}

/// `PUT /v1/staging/{token}`: store the body (an uploadUrl, single-use). No
/// API key: the token is the credential. A Content-Length over the cap or
/// over what the org may still stage is refused before any byte is read; a
/// body crossing either is cut off and discarded.
pub async fn staging_put(
    State(state): State<AppState>,
    Path(token): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let local = state.local_staging()?;
    let claims = local
        .verify_token(&token, Method::Put)
        .map_err(token_error)?;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > claims.cap) {
        return Err(StagingError::TooLarge { cap: claims.cap }.into());
    }
    // The capped store (the same objects as `local`, counted per org).
    let staging = state.staging()?;
    if declared.is_some_and(|n| staging.room(&claims.org).is_some_and(|room| n > room)) {
        return Err(StagingError::QuotaExceeded {
            cap: state.staging_config().org_cap_bytes,
        }
        .into());
    }
    let stream = body
        .into_data_stream()
        .map(|r| r.map_err(std::io::Error::other));
    let size = staging
        .put(&key_of(&claims), Box::pin(stream), claims.cap)
        .await?;
    Ok(Json(serde_json::json!({ "sizeBytes": size })).into_response())
}

/// `GET /v1/staging/{token}`: stream the object (a downloadUrl).
pub async fn staging_get(
    State(state): State<AppState>,
    Path(token): Path<String>,
) -> Result<Response, ApiError> {
    let local = state.local_staging()?;
    let claims = local
        .verify_token(&token, Method::Get)
        .map_err(token_error)?;
    let (size, stream) = local.get(&key_of(&claims)).await?;
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}
