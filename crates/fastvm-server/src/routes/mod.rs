//! The HTTP API: the router, its layers, and the extractors that turn every
//! bad input into the API's one error shape.
//!
//! ```text
//!  request -> CatchPanic -> Trace -> body limit (1 MiB) -> route
//!     route: Caller (auth, 401) -> VmPath / SnapshotPath (UUID, 404) -> JsonBody (400/413/415) -> handler
//!     no route: 404 NOT_FOUND; wrong method: 405 METHOD_NOT_ALLOWED
//! ```
//!
//! `/v1/staging/{token}` (signed URLs of the local staging store) takes no
//! API key and no body limit: the token is the credential and carries the cap.
//! The console WebSocket (`/v1/vms/{id}/console`, `/v1/console`) takes a
//! one-shot console token instead of an API key; the page `/console` and its
//! assets are public (see `console.rs`), and so are `/openapi.json` and the
//! API reference `/docs` that renders it (see `docs.rs`). Request spans never carry query strings.
//!
//! Endpoints of the spec that are not implemented yet (bucket mounts,
//! snapshot imports) are not routed: they answer 404 with a message
//! saying this server does not serve them.

pub mod admin;
pub mod bucket_mounts;
pub mod console;
pub mod docs;
pub mod exec;
pub mod files;
pub mod fork;
pub mod health;
pub mod internal;
pub mod me;
pub mod org;
pub mod services;
pub mod snapshot_imports;
pub mod snapshots;
pub mod vms;
pub mod volumes;

use crate::error::{codes, ApiError};
use crate::AppState;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, Uri};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::Router;
use fastvm_types::{SnapshotId, VmId};
use serde::de::DeserializeOwned;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

/// A file built into the server (web pages and their scripts): its type, a
/// cache policy, and no sniffing or referrers.
pub(crate) fn static_asset(
    body: &'static [u8],
    content_type: &'static str,
    cache: &'static str,
) -> axum::response::Response {
    use axum::http::{header, HeaderValue};
    let mut res = (StatusCode::OK, body).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

/// How much of an oversized body is read (and dropped) before the 413 is
/// sent: a client still writing its body when the server answers and closes
/// sees a connection reset instead of the answer, so the rest is drained
/// first, within this many bytes and [`DRAIN_TIME`].
const DRAIN_MAX: usize = 16 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The body, at most [`MAX_JSON_BODY`] bytes; 413 over that (after a bounded
/// drain of the rest, see [`DRAIN_MAX`]).
async fn read_capped(body: axum::body::Body) -> Result<bytes::Bytes, ApiError> {
    use futures::StreamExt as _;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds {MAX_JSON_BODY} bytes"),
        )
    };
    let unreadable = |e: axum::Error| {
        ApiError::invalid(
            codes::INVALID_REQUEST,
            format!("the request body could not be read: {e}"),
        )
    };
    let mut stream = body.into_data_stream();
    let mut buf = bytes::BytesMut::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(unreadable)?;
        if buf.len() + chunk.len() > MAX_JSON_BODY {
            let mut seen = buf.len() + chunk.len();
            let drain = async {
                while let Some(Ok(more)) = stream.next().await {
                    seen += more.len();
                    if seen > DRAIN_MAX {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, drain).await;
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// Largest JSON request body accepted.
pub const MAX_JSON_BODY: usize = 1 << 20;

/// The whole API.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/openapi.json", get(health::openapi_json))
        .route("/docs", get(docs::page))
        .route(docs::REDOC_JS_PATH, get(docs::redoc_js))
        .route("/v1/vms", get(vms::list).post(vms::launch))
        .route(
            "/v1/vms/{id}",
            get(vms::get).patch(vms::update).delete(vms::delete),
        )
        .route("/v1/vms/{id}/pause", post(vms::pause))
        .route("/v1/vms/{id}/resume", post(vms::resume))
        .route("/v1/vms/{id}/fork", post(fork::fork))
        .route("/v1/vms/{id}/exec", post(exec::exec))
        .route("/v1/vms/{id}/ttl/refresh", post(vms::refresh_ttl))
        .route(
            "/v1/vms/{id}/firewall",
            put(vms::set_firewall).patch(vms::patch_firewall),
        )
        .route(
            "/v1/vms/{id}/services",
            get(services::list).post(services::register),
        )
        .route(
            "/v1/vms/{id}/services/{serviceName}",
            put(services::update).delete(services::delete),
        )
        .route(
            "/v1/vms/{id}/bucket-mounts",
            get(bucket_mounts::list).post(bucket_mounts::attach),
        )
        .route(
            "/v1/vms/{id}/bucket-mounts/{bucketMountId}",
            get(bucket_mounts::get_one)
                .patch(bucket_mounts::rotate)
                .delete(bucket_mounts::delete),
        )
        .route("/v1/vms/{id}/volumes", post(volumes::attach))
        .route(
            "/v1/vms/{id}/volumes/{volumeId}",
            axum::routing::delete(volumes::detach),
        )
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route(
            "/v1/volumes/{id}",
            get(volumes::get_one)
                .patch(volumes::update)
                .delete(volumes::delete),
        )
        .route("/v1/volumes/{id}/attachments", get(volumes::attachments))
        .route("/v1/vms/{id}/files/presign", post(files::presign))
        .route("/v1/vms/{id}/files/fetch", post(files::fetch))
        .route("/v1/vms/{id}/files/export", post(files::export))
        // Staged objects stream: no body limit (the token carries the cap).
        .route(
            "/v1/staging/{token}",
            get(files::staging_get)
                .put(files::staging_put)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/org/quotas", get(org::quotas))
        .route(
            "/v1/me/ssh-keys",
            get(me::list_ssh_keys).post(me::add_ssh_key),
        )
        .route(
            "/v1/me/ssh-keys/{fingerprint}",
            axum::routing::delete(me::delete_ssh_key),
        )
        .route("/v1/ssh-gateway", get(me::ssh_gateway))
        .route("/v1/admin/workers", get(admin::list_workers))
        .route("/v1/admin/workers/{id}/drain", post(admin::drain_worker))
        .route("/internal/v1/workers/register", post(internal::register))
        .route(
            "/internal/v1/workers/{id}/heartbeat",
            post(internal::heartbeat),
        )
        .route(
            "/v1/snapshots",
            get(snapshots::list).post(snapshots::create),
        )
        .route(
            "/v1/snapshots/{id}",
            get(snapshots::get)
                .patch(snapshots::update)
                .delete(snapshots::delete),
        )
        .route(
            "/v1/snapshot-imports",
            get(snapshot_imports::list).post(snapshot_imports::create),
        )
        .route(
            "/v1/snapshot-imports/context-presign",
            post(snapshot_imports::presign_context),
        )
        .route(
            "/v1/snapshot-imports/{id}",
            get(snapshot_imports::get).delete(snapshot_imports::delete),
        )
        .route(
            "/v1/snapshot-imports/{id}/cancel",
            post(snapshot_imports::cancel),
        )
        .route(
            "/v1/snapshot-imports/{id}/logs",
            get(snapshot_imports::logs),
        )
        .route("/v1/vms/{id}/console-token", post(console::console_token))
        .route("/v1/vms/{id}/console", get(console::open_vm_console))
        .route("/v1/console", get(console::open_console))
        .route("/console", get(console::page))
        .route("/console/console.js", get(console::page_js))
        .route("/console/console.css", get(console::page_css))
        .route("/console/xterm.js", get(console::xterm_js))
        .route("/console/xterm.css", get(console::xterm_css))
        .route("/console/addon-fit.js", get(console::fit_js))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(MAX_JSON_BODY))
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::metrics::track))
        // Spans name the path only: query strings carry credentials (console
        // tokens), and so does the path of a signed staging URL, which is
        // logged as its template. Every request gets an `x-request-id` (the client's, or a
        // new UUID), in its span (so in every log line) and in the response.
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
            tracing::info_span!("request", id = %id, method = %req.method(), path = %loggable_path(req.uri().path()))
        }))
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(tower_http::request_id::MakeRequestUuid))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("the server hit a bug while handling this request").into_response()
        }))
        .with_state(state)
}

/// A request path fit for logs: a signed staging URL's token is a live
/// credential, so its path is logged as the route template.
fn loggable_path(path: &str) -> &str {
    if path.starts_with(crate::staging::local::URL_PREFIX) {
        "/v1/staging/{token}"
    } else {
        path
    }
}

async fn no_route(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "no such endpoint: {method} {}; this server does not serve it",
        uri.path()
    ))
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        codes::METHOD_NOT_ALLOWED,
        format!("{} does not accept {method}", uri.path()),
    )
}

/// A JSON request body (`Content-Type: application/json`, at most
/// [`MAX_JSON_BODY`] bytes, a JSON object) decoded into `T`.
///
/// Every request body of the API is an object. serde would also decode a
/// struct from a JSON array (`[null, null]` as a firewall policy), so the
/// body's first token is checked too.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let bytes = read_capped(body).await?;
        let is_object = bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        match axum::Json::<T>::from_request(req, state).await {
            Ok(_) if !is_object => Err(ApiError::invalid(
                codes::INVALID_REQUEST,
                "the request body must be a JSON object",
            )),
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::JsonSyntaxError(e) => ApiError::invalid(codes::INVALID_JSON, e.body_text()),
        JsonRejection::JsonDataError(e) => ApiError::invalid(codes::INVALID_REQUEST, e.body_text()),
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            codes::UNSUPPORTED_MEDIA_TYPE,
            "send the request body as JSON with the header `Content-Type: application/json`",
        ),
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!("the request body exceeds {MAX_JSON_BODY} bytes"),
        ),
        other => ApiError::new(other.status(), codes::INVALID_REQUEST, other.body_text()),
    }
}

/// Query parameters decoded into `T`.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(QueryParams(v)),
            Err(e @ QueryRejection::FailedToDeserializeQueryString(_)) => {
                Err(ApiError::invalid(codes::INVALID_REQUEST, e.body_text()))
            }
            Err(e) => Err(ApiError::new(
                e.status(),
                codes::INVALID_REQUEST,
                e.body_text(),
            )),
        }
    }
}

/// The `{id}` of a VM route. Anything but a UUID is a VM that does not exist.
pub struct VmPath(pub VmId);

impl<S: Send + Sync> FromRequestParts<S> for VmPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::not_found(e.body_text()))?;
        raw.parse::<VmId>().map(VmPath).map_err(|_| {
            let shown: String = raw.chars().take(64).collect();
            ApiError::not_found(format!("no VM with id {shown:?} (VM ids are UUIDs)"))
        })
    }
}

/// The `{id}` and second segment of a VM sub-resource route
/// (`/v1/vms/{id}/services/{serviceName}`, `/v1/vms/{id}/volumes/{volumeId}`).
pub struct VmSubPath(pub VmId, pub String);

impl<S: Send + Sync> FromRequestParts<S> for VmSubPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path((raw, name)) = Path::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::not_found(e.body_text()))?;
        let id = raw.parse::<VmId>().map_err(|_| {
            let shown: String = raw.chars().take(64).collect();
            ApiError::not_found(format!("no VM with id {shown:?} (VM ids are UUIDs)"))
        })?;
        Ok(VmSubPath(id, name))
    }
}

/// The `{id}` of a snapshot route. Anything but a UUID is a snapshot that does not exist.
pub struct SnapshotPath(pub SnapshotId);

impl<S: Send + Sync> FromRequestParts<S> for SnapshotPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::not_found(e.body_text()))?;
        raw.parse::<SnapshotId>().map(SnapshotPath).map_err(|_| {
            let shown: String = raw.chars().take(64).collect();
            ApiError::not_found(format!(
                "no snapshot with id {shown:?} (snapshot ids are UUIDs)"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::loggable_path;

    #[test]
    fn staging_tokens_stay_out_of_logs() {
        assert_eq!(
            loggable_path("/v1/staging/eyJzZWNyZXQi.c2ln"),
            "/v1/staging/{token}"
        );
        assert_eq!(loggable_path("/v1/vms/abc/exec"), "/v1/vms/abc/exec");
    }
}
