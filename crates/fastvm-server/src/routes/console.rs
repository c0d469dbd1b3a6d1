//! Console routes: `POST /v1/vms/{id}/console-token`, the WebSocket
//! `GET /v1/vms/{id}/console` (and `GET /v1/console`, the VM taken from the
//! token), and the web page `GET /console` with its assets. The rules and the
//! WebSocket protocol are in [`crate::console`].
//!
//! The page (`/console#session=<token>`) is a full-window xterm.js terminal.
//! The token travels in the URL fragment, which browsers never send to a
//! server; the page removes it from the address bar and spends it on the
//! WebSocket at once. No API key ever reaches the browser. Its scripts and
//! styles are vendored files served from the binary (`assets/console/`,
//! xterm.js from npm with its licence), under a Content-Security-Policy
//! that allows nothing else.

use crate::auth::Caller;
use crate::console::{
    self, check_size, error_codes, Source, DEFAULT_COLS, DEFAULT_ROWS, MAX_WS_MESSAGE,
};
use crate::error::{codes, ApiError};
use crate::openapi::examples;
use crate::routes::{QueryParams, VmPath};
use crate::AppState;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Json;
use fastvm_types::console::ConsoleTokenResponse;
use fastvm_types::ApiError as ErrorBody;
use fastvm_types::VmId;
use serde::Deserialize;

/// Query of a console connection.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// The console token (`fvc_...`).
    pub session: Option<String>,
    /// `pty` (default) or `serial`.
    #[serde(default)]
    pub source: Source,
    /// Initial window size (default 80x24).
    pub cols: Option<u16>,
    pub rows: Option<u16>,
}

/// Mint a console token
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/console-token",
    tag = "vms",
    operation_id = "consoleToken",
    summary = "Mint a console token",
    description = "A one-shot token for a console of the VM, bound to the VM and to the API key that minted it. \
Use it within `expiresInSec` (60 s), once: on the WebSocket `ws(s)://<host><websocketPath>?session=<token>` \
(`GET /v1/vms/{id}/console`, which documents the protocol), or open `/console#session=<token>` in a browser \
(a web terminal; no API key reaches the browser).",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "The token and where to use it", body = ConsoleTokenResponse, example = json!(examples::console_token())),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is being deleted", body = ErrorBody),
    )
)]
pub async fn console_token(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
) -> Result<Json<ConsoleTokenResponse>, ApiError> {
    Ok(Json(state.mint_console_token(caller, id).await?))
}

/// Open a console (WebSocket)
#[utoipa::path(
    get,
    path = "/v1/vms/{id}/console",
    tag = "vms",
    operation_id = "openConsole",
    summary = "Open a console (WebSocket)",
    description = "Upgrades to a WebSocket carrying a terminal. Authenticated by the one-shot token of \
`POST /v1/vms/{id}/console-token` in `session` (no API key). A paused VM is resumed first.\n\n\
Binary frames carry terminal bytes both ways (at most 64 KiB per client frame). Text frames carry JSON \
control messages: client -> server `{\"type\":\"resize\",\"cols\":C,\"rows\":R}` (1..=4096); server -> client \
`{\"type\":\"ready\",\"source\":\"pty\"|\"serial\",\"vmId\":...}` first, `{\"type\":\"exit\",\"code\":N,\"signal\":S|null}` \
when the shell ends, `{\"type\":\"error\",\"code\":...,\"message\":...}` before an error close. \
The server pings every 25 s; a client that does not take a frame within 30 s is dropped.\n\n\
Close codes: 1000 shell exited / serial console ended / client closed; 1002 WebSocket protocol error; \
1007 invalid control message; 1009 frame too large; 1011 worker or agent failure; 4000 idle \
(no input and no output for 15 minutes by default, `fastvm serve --console-idle-sec`). `GET /v1/console` is the same endpoint with the VM taken from the token.",
    params(
        ("id" = String, Path, description = "VM ID (UUID)."),
        ("session" = String, Query, description = "The console token."),
        ("source" = Option<String>, Query, description = "`pty` (default): the guest's login shell; `serial`: the read-only serial console (any VM state, agent not needed)."),
        ("cols" = Option<u16>, Query, description = "Initial columns (default 80)."),
        ("rows" = Option<u16>, Query, description = "Initial rows (default 24)."),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "Not a WebSocket upgrade (WEBSOCKET_REQUIRED; the token is not spent), or bad query", body = ErrorBody),
        (status = 401, description = "Token missing, unknown (CONSOLE_TOKEN_INVALID), already used (CONSOLE_TOKEN_USED), expired (CONSOLE_TOKEN_EXPIRED), or its API key was revoked", body = ErrorBody),
        (status = 403, description = "The token is for another VM (CONSOLE_TOKEN_WRONG_VM)", body = ErrorBody),
        (status = 404, description = "The VM was deleted", body = ErrorBody),
        (status = 409, description = "The VM is not running (a terminal needs it running)", body = ErrorBody),
        (status = 429, description = "`TOO_MANY_EXECS`: the VM has 64 execs, terminals and guest connections open", body = ErrorBody),
        (status = 503, description = "The VM's agent does not answer (try source=serial)", body = ErrorBody),
    )
)]
pub async fn open_vm_console(
    State(state): State<AppState>,
    VmPath(id): VmPath,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    QueryParams(q): QueryParams<ConsoleQuery>,
) -> Result<Response, ApiError> {
    upgrade(state, Some(id), ws, q).await
}

/// `GET /v1/console?session=...`: the console of the token's VM.
pub async fn open_console(
    State(state): State<AppState>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    QueryParams(q): QueryParams<ConsoleQuery>,
) -> Result<Response, ApiError> {
    upgrade(state, None, ws, q).await
}

async fn upgrade(
    state: AppState,
    path_vm: Option<VmId>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    q: ConsoleQuery,
) -> Result<Response, ApiError> {
    // Checked before the token is spent: a plain GET must not burn it.
    let ws = ws.map_err(|r| {
        ApiError::invalid(
            error_codes::WEBSOCKET_REQUIRED,
            format!("this is a WebSocket endpoint: connect with ws(s)://HOST/v1/vms/ID/console?session=TOKEN ({})", r.body_text()),
        )
    })?;
    let (cols, rows) = (
        q.cols.unwrap_or(DEFAULT_COLS),
        q.rows.unwrap_or(DEFAULT_ROWS),
    );
    check_size(cols, rows).map_err(|e| ApiError::invalid(codes::INVALID_REQUEST, e))?;
    let token = q.session.filter(|s| !s.is_empty()).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            error_codes::CONSOLE_TOKEN_INVALID,
            "missing ?session=<token>; mint one with POST /v1/vms/{id}/console-token",
        )
    })?;
    let grant = state.redeem_console_token(&token, path_vm).await?;
    let console = state.open_console(&grant, q.source, cols, rows).await?;
    let cfg = state.console().config.clone();
    Ok(ws
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .on_upgrade(move |socket| console::run(socket, console, cfg)))
}

const PAGE_HTML: &[u8] = include_bytes!("../../assets/console/index.html");
const PAGE_JS: &[u8] = include_bytes!("../../assets/console/console.js");
const PAGE_CSS: &[u8] = include_bytes!("../../assets/console/console.css");
const XTERM_JS: &[u8] = include_bytes!("../../assets/console/vendor/xterm.js");
const XTERM_CSS: &[u8] = include_bytes!("../../assets/console/vendor/xterm.css");
const FIT_JS: &[u8] = include_bytes!("../../assets/console/vendor/addon-fit.js");

/// Only this server's own scripts; WebSockets to this server. xterm.js's
/// renderer styles its rows with `<style>` elements it creates, hence
/// `'unsafe-inline'` for styles (never for scripts): without it the terminal
/// draws in a proportional font over a monospace grid.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /console`: the web terminal (the token comes in the URL fragment).
pub async fn page() -> Response {
    let mut res = super::static_asset(PAGE_HTML, "text/html; charset=utf-8", "no-store");
    res.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    res.headers_mut()
        .insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    res
}

const CACHE_ASSET: &str = "public, max-age=3600";

pub async fn page_js() -> Response {
    super::static_asset(PAGE_JS, "text/javascript; charset=utf-8", CACHE_ASSET)
}

pub async fn page_css() -> Response {
    super::static_asset(PAGE_CSS, "text/css; charset=utf-8", CACHE_ASSET)
}

pub async fn xterm_js() -> Response {
    super::static_asset(XTERM_JS, "text/javascript; charset=utf-8", CACHE_ASSET)
}

pub async fn xterm_css() -> Response {
    super::static_asset(XTERM_CSS, "text/css; charset=utf-8", CACHE_ASSET)
}

pub async fn fit_js() -> Response {
    super::static_asset(FIT_JS, "text/javascript; charset=utf-8", CACHE_ASSET)
}
