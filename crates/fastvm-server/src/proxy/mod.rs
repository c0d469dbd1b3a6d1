//! The services proxy: HTTP in front of every VM's registered services.
//!
//! `fastvm serve --proxy-listen ADDR --proxy-domain D` serves every host
//! `<name>--<vmIdHex>.proxy.D` (see [`host`]); with the default domain
//! `localhost`, `http://web--<hex>.proxy.localhost:8081/` works in a browser
//! with no DNS set-up.
//!
//! ```text
//!  client --HTTP/1.1 | h2 (prior knowledge)--> proxy listener (hyper-util auto)
//!     Host -> (vm, service)            404 page: no such VM / service
//!     VM paused? -> wake: one resume per VM (shared by all waiting requests)
//!     VM stopped/error -> 502; still starting after 30 s -> 503
//!     upstream client (HTTP/1.1, or h2c when the service says h2c)
//!        pool key = (VM, row version, port): a pause, resume, restore or
//!        delete bumps the row version, so old pooled connections are never
//!        reused (idle ones close after 4 s)
//!        connector = Worker::connect(vm, port): the worker opens the TCP
//!        connection into the guest (embedded worker: to the guest's IPv6
//!        through the VM's namespace and its ingress firewall, where each
//!        service has an auto rule)
//!     refused -> 502, no answer head within 120 s of the request body's
//!     last byte -> 504, garbage -> 502
//!     101 Switching Protocols (WebSocket): both upgraded sides spliced
//! ```
//!
//! Bodies stream both ways with no buffering and no size limit (Server-Sent
//! Events reach the client as the guest flushes them). Request heads are
//! bounded (64 KiB; larger is 431) and must arrive within 15 s (slowloris);
//! each connection is its own task, so a slow client or a guest that never
//! answers holds only its own connection.

mod host;

use crate::error::codes;
use crate::store::VmRecord;
use crate::worker::{GuestStream, WorkerError};
use crate::AppState;
use bytes::Bytes;
use fastvm_types::service::Service;
use fastvm_types::{OrgId, VmId, VmStatus};
use futures::future::{BoxFuture, FutureExt, Shared};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Where and for which domain the proxy serves.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Listen address (`--proxy-listen`, default 127.0.0.1:8081).
    pub listen: SocketAddr,
    /// Service hosts are `<name>--<vmIdHex>.proxy.<domain>` (`--proxy-domain`, default `localhost`).
    pub domain: String,
    /// The guest must send a response head within this time after the last
    /// byte of the request body it was sent, else 504 (default 120 s).
    pub response_timeout: Duration,
}

impl ProxyConfig {
    /// The defaults of `fastvm serve`.
    pub fn new(listen: SocketAddr) -> Self {
        ProxyConfig {
            listen,
            domain: "localhost".into(),
            response_timeout: RESPONSE_TIMEOUT,
        }
    }
}

/// Wake-ups in flight, one per VM (see [`wake`]).
pub type Wakes = std::sync::Mutex<HashMap<VmId, Shared<BoxFuture<'static, Result<(), String>>>>>;

/// Largest request head (request line + headers) a client may send.
const MAX_HEAD_BYTES: usize = 64 << 10;
/// A client must send its request head within this time.
const HEAD_TIMEOUT: Duration = Duration::from_secs(15);
/// The guest must send the response head within this time (the body then
/// streams for as long as it lasts).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a request waits for its VM to wake up or finish starting.
const WAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle upstream connections are closed after this (below Node's 5 s keep-alive).
const POOL_IDLE: Duration = Duration::from_secs(4);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ProxyBody = BoxBody<Bytes, BoxError>;

/// The running proxy; dropping it (or [`ProxyTask::stop`]) stops the
/// listener and every open connection.
pub struct ProxyTask {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyTask {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for ProxyTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serve the proxy on `listener` until the returned task is stopped.
pub fn spawn(
    listener: tokio::net::TcpListener,
    state: AppState,
    cfg: &ProxyConfig,
) -> std::io::Result<ProxyTask> {
    let domain = cfg.domain.as_str();
    let addr = listener.local_addr()?;
    let connector = GuestConnector {
        state: state.clone(),
    };
    let mut http1 = Client::builder(TokioExecutor::new());
    http1
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .set_host(false);
    let mut h2c = Client::builder(TokioExecutor::new());
    h2c.pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .http2_only(true)
        .timer(TokioTimer::new());
    let ctx = Arc::new(Ctx {
        state,
        domain: domain.trim_matches('.').to_ascii_lowercase(),
        response_timeout: cfg.response_timeout,
        http1: http1.build(connector.clone()),
        h2c: h2c.build(connector),
    });
    let task = tokio::spawn(accept_loop(listener, ctx));
    tracing::info!(%addr, domain, "services proxy listening");
    Ok(ProxyTask { addr, task })
}

struct Ctx {
    state: AppState,
    domain: String,
    response_timeout: Duration,
    http1: Client<GuestConnector, Progress<Incoming>>,
    h2c: Client<GuestConnector, Progress<Incoming>>,
}

/// A request body that records when its last frame went to the guest: the
/// proxy's answer timeout counts from then, so an upload that takes longer
/// than the timeout is not cut while it still moves.
struct Progress<B> {
    inner: B,
    last: Arc<std::sync::Mutex<Instant>>,
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for Progress<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() {
            if let Ok(mut last) = self.last.lock() {
                *last = Instant::now();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

async fn accept_loop(listener: tokio::net::TcpListener, ctx: Arc<Ctx>) {
    // Aborting this task drops the set, which aborts every connection.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    conns.spawn(serve_connection(ctx.clone(), stream, peer));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_connection(ctx: Arc<Ctx>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let state = ctx.state.clone();
    let _open = state.metrics().proxy_connection();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let service = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(handle(&ctx, peer, req).await) }
    });
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(%peer, error = %e, "proxy connection ended with an error");
    }
}

/// An answer of the proxy itself (not of the guest).
#[derive(Debug)]
struct ProxyError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ProxyError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ProxyError {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, codes::NOT_FOUND, message)
    }

    /// JSON in the API's error shape, or a small HTML page for browsers.
    fn response(&self, html: bool) -> Response<ProxyBody> {
        let (content_type, body) = if html {
            let title = self.status.canonical_reason().unwrap_or("Error");
            let page = format!(
                "<!doctype html><html><head><meta charset=\"utf-8\"><title>{} {title}</title></head>\
                 <body style=\"font-family:sans-serif;margin:3em\"><h1>{} {title}</h1><p>{}</p><p><small>Fast VM proxy ({})</small></p></body></html>\n",
                self.status.as_u16(),
                self.status.as_u16(),
                escape_html(&self.message),
                self.code
            );
            ("text/html; charset=utf-8", page)
        } else {
            let json = serde_json::json!({"error": {"code": self.code, "message": self.message}});
            ("application/json", format!("{json}\n"))
        };
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.status;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn full(body: String) -> ProxyBody {
    Full::new(Bytes::from(body))
        .map_err(|never| match never {})
        .boxed()
}

fn wants_html(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

async fn handle(ctx: &Ctx, peer: SocketAddr, req: Request<Incoming>) -> Response<ProxyBody> {
    let html = wants_html(req.headers());
    match route(ctx, peer, req).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::debug!(%peer, status = e.status.as_u16(), code = e.code, message = %e.message, "proxy answered an error");
            e.response(html)
        }
    }
}

/// The host a request is for: HTTP/2's `:authority` (or an absolute-form
/// URI), else the Host header.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_owned());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

async fn route(
    ctx: &Ctx,
    peer: SocketAddr,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let host = request_host(&req);
    let (vm, name) = match host::parse(host.as_deref(), &ctx.domain) {
        Ok(host::Target::Service { vm, name }) => (vm, name),
        Ok(host::Target::NotAService(h)) => {
            return Err(ProxyError::not_found(format!(
                "{h} is not a service of this proxy; service hosts are <name>--<vm id without hyphens>.proxy.{}",
                ctx.domain
            )))
        }
        Err(e) => return Err(ProxyError::new(StatusCode::BAD_REQUEST, codes::INVALID_REQUEST, e.to_string())),
    };
    let (rec, service, woke) = ready_target(&ctx.state, vm, &name).await?;
    let mut resp = forward(ctx, &rec, &service, host.unwrap_or_default(), peer, req).await?;
    if let Some(ms) = woke {
        // How long this request waited for the VM to resume (wake-on-traffic).
        if let Ok(v) = HeaderValue::from_str(&format!("{:.1}", ms)) {
            resp.headers_mut()
                .insert(HeaderName::from_static("x-fastvm-woke-ms"), v);
        }
    }
    Ok(resp)
}

/// The VM's row and the service, once the VM runs. A paused VM is woken
/// (the returned milliseconds say how long that took).
async fn ready_target(
    state: &AppState,
    vm: VmId,
    name: &str,
) -> Result<(VmRecord, Service, Option<f64>), ProxyError> {
    let started = Instant::now();
    // Set once the request had to wait for the VM (waking or starting).
    let mut waited = false;
    loop {
        let rec = state
            .store()
            .get_vm_unscoped(vm)
            .await
            .map_err(|e| {
                ProxyError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::UNAVAILABLE,
                    format!("looking the VM up failed: {e}"),
                )
            })?
            .filter(|r| r.deleted_at_ms.is_none())
            .ok_or_else(|| ProxyError::not_found(format!("there is no VM {vm}")))?;
        let Some(service) = rec.services.iter().find(|s| s.name == name).cloned() else {
            return Err(ProxyError::not_found(format!(
                "VM {vm} has no service named {name:?}"
            )));
        };
        match rec.status {
            VmStatus::Running => {
                return Ok((
                    rec,
                    service,
                    waited.then(|| started.elapsed().as_secs_f64() * 1e3),
                ))
            }
            VmStatus::Paused | VmStatus::Pausing => {
                waited = true;
                wake(state, rec.org_id, vm).await.map_err(|m| {
                    ProxyError::new(StatusCode::BAD_GATEWAY, codes::INVALID_STATE, m)
                })?;
            }
            VmStatus::Provisioning | VmStatus::Resuming => {
                waited = true;
                if started.elapsed() > WAKE_TIMEOUT {
                    return Err(ProxyError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        codes::UNAVAILABLE,
                        format!(
                            "VM {vm} is still {} after {} s; retry",
                            rec.status.as_str(),
                            WAKE_TIMEOUT.as_secs()
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            VmStatus::Stopped | VmStatus::Error => {
                let why = rec
                    .status_message
                    .as_deref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default();
                return Err(ProxyError::new(
                    StatusCode::BAD_GATEWAY,
                    codes::INVALID_STATE,
                    format!("VM {vm} is {}{why}", rec.status.as_str()),
                ));
            }
            VmStatus::Deleting => {
                return Err(ProxyError::not_found(format!("VM {vm} is being deleted")))
            }
            VmStatus::Unknown => {
                return Err(ProxyError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::WORKER_UNREACHABLE,
                    format!("VM {vm} is unknown: its worker does not answer; retry later"),
                ))
            }
        }
    }
}

/// Resume the paused VM `vm` once, however many requests ask at the same
/// time: the first starts the resume in its own task (so it completes even
/// if every waiting client hangs up) and the others wait for the same result.
pub(crate) async fn wake(state: &AppState, org: OrgId, vm: VmId) -> Result<(), String> {
    let shared = {
        let mut wakes = state
            .wakes()
            .lock()
            .map_err(|_| "the wake-up table is poisoned".to_owned())?;
        wakes.retain(|_, w| w.peek().is_none());
        wakes
            .entry(vm)
            .or_insert_with(|| {
                let state = state.clone();
                let task = tokio::spawn(async move { resume_until_running(&state, org, vm).await });
                async move {
                    task.await
                        .unwrap_or_else(|e| Err(format!("the wake-up of VM {vm} failed: {e}")))
                }
                .boxed()
                .shared()
            })
            .clone()
    };
    shared.await
}

async fn resume_until_running(state: &AppState, org: OrgId, vm: VmId) -> Result<(), String> {
    let started = Instant::now();
    loop {
        let rec = state
            .store()
            .get_vm(org, vm)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("VM {vm} was deleted"))?;
        match rec.status {
            VmStatus::Running => return Ok(()),
            VmStatus::Paused => match state.resume_vm(org, vm).await {
                Ok(_) => {
                    state.metrics().proxy_wakeup();
                    tracing::info!(%vm, ms = started.elapsed().as_secs_f64() * 1e3, "VM woken by proxy traffic");
                    return Ok(());
                }
                // Someone else moved it meanwhile: look again.
                Err(e) if e.code == codes::INVALID_STATE => {}
                Err(e) => return Err(format!("VM {vm} could not be resumed: {}", e.message)),
            },
            VmStatus::Pausing | VmStatus::Resuming => {}
            other => return Err(format!("VM {vm} is {}", other.as_str())),
        }
        if started.elapsed() > WAKE_TIMEOUT {
            return Err(format!(
                "VM {vm} did not resume within {} s",
                WAKE_TIMEOUT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Headers of one hop only (RFC 9110 7.6.1), never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// A WebSocket (or other HTTP/1.1) upgrade request.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Drop hop-by-hop headers, and those the Connection header names; keep
/// `Connection: upgrade` + `Upgrade` of an upgrade, and `TE: trailers` (gRPC).
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| {
            v.split(',')
                .map(|t| t.trim().to_ascii_lowercase())
                .collect::<Vec<_>>()
        })
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    let upgrade_to = headers.get(header::UPGRADE).cloned();
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    if upgrade {
        if let Some(to) = upgrade_to {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, to);
        }
    }
    if trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

async fn forward(
    ctx: &Ctx,
    rec: &VmRecord,
    service: &Service,
    host: String,
    peer: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let forwarded_for = match parts
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prev) => format!("{prev}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
        parts.headers.insert("x-forwarded-for", v);
    }
    parts
        .headers
        .insert("x-forwarded-proto", HeaderValue::from_static("http"));
    if let Ok(v) = HeaderValue::from_str(&host) {
        parts.headers.insert("x-forwarded-host", v.clone());
        if !service.h2c {
            parts.headers.insert(header::HOST, v);
        }
    }
    // The pool key: this VM, this version of its row, this port.
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let upstream = format!(
        "http://{}.v{}.guest:{}{path}",
        rec.id.as_uuid().as_simple(),
        rec.version,
        service.port
    );
    parts.uri = upstream.parse::<Uri>().map_err(|e| {
        ProxyError::new(
            StatusCode::BAD_REQUEST,
            codes::INVALID_REQUEST,
            format!("the request target is not valid: {e}"),
        )
    })?;
    let client = if service.h2c {
        parts.version = Version::HTTP_2;
        parts.headers.remove(header::HOST);
        &ctx.h2c
    } else {
        parts.version = Version::HTTP_11;
        &ctx.http1
    };
    // The guest has `response_timeout` to answer after the last request body
    // byte it was sent (a body still moving keeps the request alive).
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let body = Progress {
        inner: body,
        last: last.clone(),
    };
    let request = client.request(Request::from_parts(parts, body));
    tokio::pin!(request);
    let sent = loop {
        let since = last.lock().map(|l| *l).unwrap_or_else(|_| Instant::now());
        let deadline = tokio::time::Instant::from_std(since + ctx.response_timeout);
        match tokio::time::timeout_at(deadline, &mut request).await {
            Ok(r) => break Ok(r),
            Err(elapsed) => {
                let moved = last.lock().map(|l| *l > since).unwrap_or(false);
                if !moved {
                    break Err(elapsed);
                }
            }
        }
    };
    let mut resp = match sent {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => return Err(upstream_error(rec.id, service, &e)),
        Err(_) => {
            return Err(ProxyError::new(
                StatusCode::GATEWAY_TIMEOUT,
                codes::UPSTREAM_TIMEOUT,
                format!(
                    "service {:?} of VM {} sent no answer within {:?}",
                    service.name, rec.id, ctx.response_timeout
                ),
            ))
        }
    };
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switched {
        if let Some(client_side) = client_upgrade {
            let guest_side = hyper::upgrade::on(&mut resp);
            tokio::spawn(splice(client_side, guest_side));
        }
    }
    strip_hop_by_hop(resp.headers_mut(), switched);
    Ok(resp.map(|b| b.map_err(BoxError::from).boxed()))
}

/// Copy bytes both ways between the two upgraded connections until either closes.
async fn splice(client: hyper::upgrade::OnUpgrade, guest: hyper::upgrade::OnUpgrade) {
    match tokio::join!(client, guest) {
        (Ok(c), Ok(g)) => {
            let (mut c, mut g) = (TokioIo::new(c), TokioIo::new(g));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut g).await {
                tracing::debug!(error = %e, "proxied upgraded connection ended");
            }
        }
        (c, g) => tracing::debug!(
            client = c.is_ok(),
            guest = g.is_ok(),
            "an upgrade did not complete"
        ),
    }
}

/// 502 / 504 with a reason for a failed upstream exchange.
fn upstream_error(
    vm: VmId,
    service: &Service,
    e: &hyper_util::client::legacy::Error,
) -> ProxyError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(w) = s.downcast_ref::<WorkerError>() {
            let message = format!("service {:?}: {w}", service.name);
            return match w {
                WorkerError::Timeout(_) => ProxyError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    codes::UPSTREAM_TIMEOUT,
                    message,
                ),
                WorkerError::ConnectRefused(_) => {
                    ProxyError::new(StatusCode::BAD_GATEWAY, codes::UPSTREAM_REFUSED, message)
                }
                WorkerError::WrongState(_) | WorkerError::NotFound(_) => {
                    ProxyError::new(StatusCode::BAD_GATEWAY, codes::INVALID_STATE, message)
                }
                _ => ProxyError::new(StatusCode::BAD_GATEWAY, codes::WORKER_ERROR, message),
            };
        }
        source = s.source();
    }
    let detail = std::error::Error::source(e)
        .map(|s| s.to_string())
        .unwrap_or_else(|| e.to_string());
    ProxyError::new(
        StatusCode::BAD_GATEWAY,
        codes::UPSTREAM_REFUSED,
        format!(
            "service {:?} of VM {vm} (port {}) did not answer with valid HTTP: {detail}",
            service.name, service.port
        ),
    )
}

/// Opens upstream connections through the VM's worker. The URI's host is
/// `<vmIdHex>.v<version>.guest`, its port the service port.
#[derive(Clone)]
struct GuestConnector {
    /// Finds each VM's worker (embedded: the one worker, without a query).
    state: AppState,
}

impl tower::Service<Uri> for GuestConnector {
    type Response = GuestConn;
    type Error = WorkerError;
    type Future = BoxFuture<'static, Result<GuestConn, WorkerError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let state = self.state.clone();
        Box::pin(async move {
            let vm = uri
                .host()
                .and_then(|h| h.split('.').next())
                .and_then(|h| h.parse::<VmId>().ok());
            let (Some(vm), Some(port)) = (vm, uri.port_u16()) else {
                return Err(WorkerError::Failed(format!("bad upstream address {uri}")));
            };
            let worker = state.worker_of(vm).await?;
            Ok(GuestConn(TokioIo::new(worker.connect(vm, port).await?)))
        })
    }
}

/// A connection into a guest, as hyper's client wants it.
struct GuestConn(TokioIo<GuestStream>);

impl Connection for GuestConn {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for GuestConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for GuestConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h.get("x-kept").map(|v| v.as_bytes()), Some(&b"yes"[..]));
        assert_eq!(
            h.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );

        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(
            h.get(header::CONNECTION).map(|v| v.as_bytes()),
            Some(&b"upgrade"[..])
        );
        assert_eq!(
            h.get(header::UPGRADE).map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
    }

    #[test]
    fn error_pages() {
        let e = ProxyError::not_found("VM <x> has no service named \"web\"");
        let html = e.response(true);
        assert_eq!(html.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            html.headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"text/html; charset=utf-8"[..])
        );
        let json = e.response(false);
        assert_eq!(
            json.headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.as_bytes()),
            Some(&b"application/json"[..])
        );
        assert_eq!(
            escape_html("<a href=\"x\">&"),
            "&lt;a href=&quot;x&quot;&gt;&amp;"
        );
    }
}
