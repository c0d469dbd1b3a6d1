//! The internal worker API, server side: an axum router that exposes any
//! [`Worker`] (in practice a `fastvm worker` host's `LocalWorker`) to the
//! control planes, who reach it through [`crate::RemoteWorker`].
//!
//! Every request carries `Authorization: Bearer <worker token>`
//! ([`crate::cluster::worker_token`] of the current generation); anything
//! else is 401, and before the worker has registered everything is 503.
//! Unary operations are JSON in, JSON out; a failure answers an error status
//! with the [`WorkerError`] as JSON. Exec and terminals upgrade the
//! connection to the framing of [`crate::wire`]; `connect` and `guest-tcp`
//! upgrade to a raw byte tunnel; the serial console is a streamed body.

use crate::cluster::tokens_equal;
use crate::exec::{ExecEvent, ExecRequest};
use crate::terminal::{PtyEvent, PtyInput, PtySpec};
use crate::wire::{read_frame, write_data, write_frame, Kind, UPGRADE_PROTOCOL};
use crate::worker::{DetachNote, VmSpec, VmState, Worker, WorkerError, WorkerStats};
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;
use fastvm_types::{FirewallPolicy, SnapshotId, VmId};
use futures::StreamExt;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, RwLock};
use tokio::io::AsyncWriteExt;

/// The token the worker currently accepts (`None` until registered).
#[derive(Clone, Default)]
pub struct ExpectedToken(Arc<RwLock<Option<String>>>);

impl ExpectedToken {
    pub fn set(&self, token: Option<String>) {
        if let Ok(mut t) = self.0.write() {
            *t = token;
        }
    }

    fn check(&self, presented: Option<&str>) -> Result<(), (StatusCode, &'static str)> {
        let guard = self
            .0
            .read()
            .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "token lock poisoned"))?;
        let Some(expected) = guard.as_deref() else {
            return Err((
                StatusCode::SERVICE_UNAVAILABLE,
                "the worker has not registered yet",
            ));
        };
        match presented {
            Some(p) if tokens_equal(p, expected) => Ok(()),
            _ => Err((StatusCode::UNAUTHORIZED, "bad or stale worker token")),
        }
    }
}

#[derive(Clone)]
struct Ctx {
    worker: Arc<dyn Worker>,
    token: ExpectedToken,
}

/// The router of the internal worker API over `worker`.
pub fn router(worker: Arc<dyn Worker>, token: ExpectedToken) -> Router {
    let ctx = Ctx { worker, token };
    Router::new()
        .route("/w/v1/vms", post(create).get(list))
        .route("/w/v1/vms/{id}", axum::routing::delete(delete_vm))
        .route("/w/v1/vms/{id}/state", get(state))
        .route("/w/v1/vms/{id}/pause", post(pause))
        .route("/w/v1/vms/{id}/resume", post(resume))
        .route(
            "/w/v1/vms/{id}/firewall",
            put(set_firewall).get(enforced_firewall),
        )
        .route("/w/v1/vms/{id}/ipv6", get(public_ipv6))
        .route("/w/v1/vms/{id}/exec", get(exec))
        .route("/w/v1/vms/{id}/pty", get(pty))
        .route("/w/v1/vms/{id}/connect", get(connect))
        .route("/w/v1/vms/{id}/guest-tcp", get(guest_tcp))
        .route("/w/v1/vms/{id}/serial", get(serial))
        .route("/w/v1/snapshots", post(snapshot))
        .route("/w/v1/imports", get(import_image))
        .route("/w/v1/builds", get(build_dockerfile))
        .route(
            "/w/v1/snapshots/{id}",
            axum::routing::delete(delete_snapshot),
        )
        .route("/w/v1/volumes/{id}", put(put_volume).delete(delete_volume))
        .route("/w/v1/volumes/{id}/used", get(volume_used))
        .route("/w/v1/vms/{id}/volumes", post(attach_volume))
        .route(
            "/w/v1/vms/{id}/volumes/{volume}",
            axum::routing::delete(detach_volume),
        )
        .route(
            "/w/v1/vms/{id}/buckets",
            post(attach_bucket).get(bucket_health),
        )
        .route(
            "/w/v1/vms/{id}/buckets/{mount}",
            put(rotate_bucket).delete(detach_bucket),
        )
        .route("/w/v1/stats", get(stats))
        .layer(axum::middleware::from_fn_with_state(
            ctx.clone(),
            authenticate,
        ))
        .with_state(ctx)
}

async fn authenticate(
    State(ctx): State<Ctx>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match ctx.token.check(presented) {
        Ok(()) => next.run(req).await,
        Err((status, msg)) => (status, Json(WorkerError::Unreachable(msg.into()))).into_response(),
    }
}

/// A worker error as an HTTP answer.
pub(crate) fn status_of(e: &WorkerError) -> StatusCode {
    match e {
        WorkerError::NotFound(_) | WorkerError::NoSuchSnapshot(_) => StatusCode::NOT_FOUND,
        WorkerError::WrongState(_) | WorkerError::Volume(_) => StatusCode::CONFLICT,
        WorkerError::UnknownMachineType(_)
        | WorkerError::InvalidExec(_)
        | WorkerError::Import(_) => StatusCode::BAD_REQUEST,
        WorkerError::TooManyExecs(_) => StatusCode::TOO_MANY_REQUESTS,
        WorkerError::ConnectRefused(_) => StatusCode::BAD_GATEWAY,
        WorkerError::Timeout(_) | WorkerError::Unresponsive(_) => StatusCode::GATEWAY_TIMEOUT,
        WorkerError::Unreachable(_) | WorkerError::AgentUnavailable(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        WorkerError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

struct Answer<T>(Result<T, WorkerError>);

impl<T: Serialize> IntoResponse for Answer<T> {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(v) => Json(v).into_response(),
            Err(e) => (status_of(&e), Json(e)).into_response(),
        }
    }
}

fn vm_id(raw: &str) -> Result<VmId, WorkerError> {
    raw.parse()
        .map_err(|_| WorkerError::NotFound(format!("{raw:?} is not a VM id")))
}

async fn create(State(c): State<Ctx>, Json(spec): Json<VmSpec>) -> Answer<()> {
    Answer(c.worker.create(spec).await)
}

/// One VM of [`Worker::list`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ListedVm {
    pub id: VmId,
    pub state: VmState,
}

async fn list(State(c): State<Ctx>) -> Answer<Vec<ListedVm>> {
    Answer(c.worker.list().await.map(|l| {
        l.into_iter()
            .map(|(id, state)| ListedVm { id, state })
            .collect()
    }))
}

async fn state(State(c): State<Ctx>, Path(id): Path<String>) -> Answer<Option<VmState>> {
    Answer(async { c.worker.state(vm_id(&id)?).await }.await)
}

async fn pause(State(c): State<Ctx>, Path(id): Path<String>) -> Answer<()> {
    Answer(async { c.worker.pause(vm_id(&id)?).await }.await)
}

async fn resume(State(c): State<Ctx>, Path(id): Path<String>) -> Answer<()> {
    Answer(async { c.worker.resume(vm_id(&id)?).await }.await)
}

async fn delete_vm(State(c): State<Ctx>, Path(id): Path<String>) -> Answer<()> {
    Answer(async { c.worker.delete(vm_id(&id)?).await }.await)
}

async fn set_firewall(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    Json(policy): Json<FirewallPolicy>,
) -> Answer<()> {
    Answer(async { c.worker.set_firewall(vm_id(&id)?, &policy).await }.await)
}

async fn enforced_firewall(
    State(c): State<Ctx>,
    Path(id): Path<String>,
) -> Answer<Option<FirewallPolicy>> {
    Answer(async { c.worker.enforced_firewall(vm_id(&id)?).await }.await)
}

async fn public_ipv6(State(c): State<Ctx>, Path(id): Path<String>) -> Answer<Option<String>> {
    Answer(async { c.worker.public_ipv6(vm_id(&id)?).await }.await)
}

/// `POST /w/v1/snapshots` body.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SnapshotBody {
    pub vm: VmId,
    pub snapshot: SnapshotId,
}

async fn snapshot(State(c): State<Ctx>, Json(b): Json<SnapshotBody>) -> Answer<()> {
    Answer(c.worker.snapshot(b.vm, b.snapshot).await)
}

async fn delete_snapshot(State(c): State<Ctx>, Path(id): Path<String>) -> Answer<()> {
    Answer(
        async {
            let sid = id
                .parse()
                .map_err(|_| WorkerError::NoSuchSnapshot(format!("{id:?} is not a snapshot id")))?;
            c.worker.delete_snapshot(sid).await
        }
        .await,
    )
}

/// `PUT /w/v1/volumes/{id}` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PutVolumeBody {
    pub size_bytes: u64,
    pub read_only: bool,
}

async fn put_volume(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    Json(b): Json<PutVolumeBody>,
) -> Answer<()> {
    Answer(c.worker.put_volume(&id, b.size_bytes, b.read_only).await)
}

async fn delete_volume(State(c): State<Ctx>, Path(id): Path<String>) -> Answer<()> {
    Answer(c.worker.delete_volume(&id).await)
}

async fn volume_used(State(c): State<Ctx>, Path(id): Path<String>) -> Answer<u64> {
    Answer(c.worker.volume_used_bytes(&id).await)
}

/// `POST /w/v1/vms/{id}/volumes` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AttachVolumeBody {
    pub volume: String,
    pub mount_path: String,
    pub read_only: bool,
}

async fn attach_volume(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    Json(b): Json<AttachVolumeBody>,
) -> Answer<()> {
    Answer(
        async {
            c.worker
                .attach_volume(vm_id(&id)?, &b.volume, &b.mount_path, b.read_only)
                .await
        }
        .await,
    )
}

async fn detach_volume(
    State(c): State<Ctx>,
    Path((id, volume)): Path<(String, String)>,
) -> Answer<Option<DetachNote>> {
    Answer(async { c.worker.detach_volume(vm_id(&id)?, &volume).await }.await)
}

async fn attach_bucket(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    Json(b): Json<crate::BucketAttach>,
) -> Answer<()> {
    Answer(async { c.worker.attach_bucket(vm_id(&id)?, &b).await }.await)
}

/// `PUT /w/v1/vms/{id}/buckets/{mount}` body: new credentials.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RotateBucketBody {
    pub bucket_uri: String,
    pub credentials: fastvm_types::bucket_mount::BucketMountCredentials,
}

async fn rotate_bucket(
    State(c): State<Ctx>,
    Path((id, mount)): Path<(String, String)>,
    Json(b): Json<RotateBucketBody>,
) -> Answer<()> {
    Answer(
        async {
            c.worker
                .rotate_bucket(vm_id(&id)?, &mount, &b.bucket_uri, &b.credentials)
                .await
        }
        .await,
    )
}

async fn detach_bucket(
    State(c): State<Ctx>,
    Path((id, mount)): Path<(String, String)>,
) -> Answer<Option<DetachNote>> {
    Answer(async { c.worker.detach_bucket(vm_id(&id)?, &mount).await }.await)
}

async fn bucket_health(
    State(c): State<Ctx>,
    Path(id): Path<String>,
) -> Answer<std::collections::BTreeMap<String, Option<String>>> {
    Answer(async { c.worker.bucket_health(vm_id(&id)?).await }.await)
}

async fn stats(State(c): State<Ctx>) -> Answer<WorkerStats> {
    Answer(c.worker.stats().await)
}

// --- streams -------------------------------------------------------------------

/// Accept the upgrade of `req`; the 101 answer is sent when the handler
/// returns, `then` runs on the upgraded connection.
fn upgrade<F, Fut>(mut req: Request, then: F) -> Response
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let wants = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(UPGRADE_PROTOCOL));
    let Some(on_upgrade) = wants
        .then(|| req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>())
        .flatten()
    else {
        let e = WorkerError::Failed(format!("this route needs `Upgrade: {UPGRADE_PROTOCOL}`"));
        return (StatusCode::BAD_REQUEST, Json(e)).into_response();
    };
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(io) => then(TokioIo::new(io)).await,
            Err(e) => tracing::debug!(error = %e, "worker API upgrade failed"),
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("upgrade"),
    );
    h.insert(
        header::UPGRADE,
        header::HeaderValue::from_static(UPGRADE_PROTOCOL),
    );
    resp
}

/// The OPEN frame of an exec.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct OpenExec {
    pub request: ExecRequest,
    /// Stdin comes in STDIN frames (`exec_with_input`).
    pub input: bool,
}

/// The RESIZE frame of a terminal.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Resize {
    pub cols: u16,
    pub rows: u16,
}

async fn write_error<W: tokio::io::AsyncWrite + Unpin>(w: &mut W, e: &WorkerError) {
    let body = serde_json::to_vec(e).unwrap_or_default();
    let _ = write_frame(w, Kind::Error, &body).await;
}

/// Read the OPEN frame and decode it.
async fn read_open<T: serde::de::DeserializeOwned, R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
) -> Result<T, WorkerError> {
    match read_frame(r).await {
        Ok(Some((Kind::Open, body))) => serde_json::from_slice(&body)
            .map_err(|e| WorkerError::InvalidExec(format!("bad OPEN frame: {e}"))),
        Ok(_) => Err(WorkerError::Failed("expected an OPEN frame".into())),
        Err(e) => Err(WorkerError::Failed(format!("reading the OPEN frame: {e}"))),
    }
}

/// An image import over an upgraded stream: OPEN carries the
/// [`crate::worker::ImageImport`], every progress note is a STDOUT frame
/// (JSON), EXIT carries the [`crate::worker::ImportedImage`]. The client
/// closing the connection drops the import (the worker cleans up).
async fn import_image(State(c): State<Ctx>, req: Request) -> Response {
    upgrade(req, move |io| serve_import(c.worker, io))
}

async fn serve_import(worker: Arc<dyn Worker>, io: TokioIo<hyper::upgrade::Upgraded>) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let job: crate::worker::ImageImport = match read_open(&mut rd).await {
        Ok(j) => j,
        Err(e) => return write_error(&mut wr, &e).await,
    };
    if write_frame(&mut wr, Kind::Opened, b"").await.is_err() {
        return;
    }
    let (gone_tx, gone) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(watch_close(rd, gone_tx));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let sink: crate::worker::ImportSink = Arc::new(move |note| {
        let _ = tx.send(note);
    });
    let work = worker.import_image(job, sink);
    drive_import(work, rx, gone, wr).await
}

/// A Dockerfile build over an upgraded stream: OPEN carries the
/// [`crate::worker::DockerfileImport`], STDIN frames the context archive
/// (then STDIN_EOF); notes and result as for [`import_image`].
async fn build_dockerfile(State(c): State<Ctx>, req: Request) -> Response {
    upgrade(req, move |io| serve_build(c.worker, io))
}

async fn serve_build(worker: Arc<dyn Worker>, io: TokioIo<hyper::upgrade::Upgraded>) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let job: crate::worker::DockerfileImport = match read_open(&mut rd).await {
        Ok(j) => j,
        Err(e) => return write_error(&mut wr, &e).await,
    };
    if write_frame(&mut wr, Kind::Opened, b"").await.is_err() {
        return;
    }
    let (gone_tx, gone) = tokio::sync::oneshot::channel::<()>();
    let (ctx_tx, ctx_rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(read_stdin(rd, ctx_tx, gone_tx));
    let context: crate::worker::ByteStream =
        Box::pin(futures::stream::unfold(ctx_rx, |mut rx| async move {
            let item = rx.recv().await?;
            Some((item, rx))
        }));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let sink: crate::worker::ImportSink = Arc::new(move |note| {
        let _ = tx.send(note);
    });
    let work = worker.build_dockerfile(job, context, sink);
    drive_import(work, rx, gone, wr).await
}

/// Forward an import's notes as STDOUT frames while it runs, then its
/// result (EXIT) or error; drop it when the client goes away.
async fn drive_import<W: tokio::io::AsyncWrite + Unpin>(
    work: impl std::future::Future<Output = Result<crate::worker::ImportedImage, WorkerError>>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<crate::worker::ImportNote>,
    mut gone: tokio::sync::oneshot::Receiver<()>,
    mut wr: W,
) {
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            Some(note) = rx.recv() => {
                if !write_note(&mut wr, &note).await {
                    return; // the client is gone: dropping `work` cancels it
                }
            }
            _ = &mut gone => return,
        }
    };
    while let Ok(note) = rx.try_recv() {
        if !write_note(&mut wr, &note).await {
            return;
        }
    }
    match result {
        Ok(done) => {
            let body = serde_json::to_vec(&done).unwrap_or_default();
            let _ = write_frame(&mut wr, Kind::Exit, &body).await;
        }
        Err(e) => write_error(&mut wr, &e).await,
    }
    let _ = wr.shutdown().await;
}

/// One import note as a STDOUT frame; false when the client is gone.
async fn write_note<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    note: &crate::worker::ImportNote,
) -> bool {
    let body = serde_json::to_vec(note).unwrap_or_default();
    write_frame(w, Kind::Stdout, &body).await.is_ok()
}

async fn exec(State(c): State<Ctx>, Path(id): Path<String>, req: Request) -> Response {
    upgrade(req, move |io| serve_exec(c.worker, id, io))
}

async fn serve_exec(worker: Arc<dyn Worker>, id: String, io: TokioIo<hyper::upgrade::Upgraded>) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let open: Result<OpenExec, _> = read_open(&mut rd).await;
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let opened = async {
        let open = open?;
        let id = vm_id(&id)?;
        if open.input {
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
            tokio::spawn(read_stdin(rd, tx, gone_tx));
            let input = futures::stream::unfold(rx, |mut rx| async move {
                let item = rx.recv().await?;
                Some((item, rx))
            });
            worker
                .exec_with_input(id, open.request, Box::pin(input))
                .await
        } else {
            tokio::spawn(watch_close(rd, gone_tx));
            worker.exec(id, open.request).await
        }
    }
    .await;
    let mut events = match opened {
        Ok(ev) => ev,
        Err(e) => return write_error(&mut wr, &e).await,
    };
    if write_frame(&mut wr, Kind::Opened, b"").await.is_err() {
        return;
    }
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = &mut gone => return, // the client went away: dropping `events` cancels
        };
        let sent = match ev {
            Some(Ok(ExecEvent::Stdout(d))) => write_data(&mut wr, Kind::Stdout, &d).await,
            Some(Ok(ExecEvent::Stderr(d))) => write_data(&mut wr, Kind::Stderr, &d).await,
            Some(Ok(ExecEvent::Exit(st))) => {
                let body = serde_json::to_vec(&st).unwrap_or_default();
                let _ = write_frame(&mut wr, Kind::Exit, &body).await;
                break;
            }
            Some(Err(e)) => return write_error(&mut wr, &e).await,
            None => {
                return write_error(
                    &mut wr,
                    &WorkerError::AgentUnavailable("the exec ended without an exit status".into()),
                )
                .await
            }
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Until the client closes: nothing but its end is expected.
async fn watch_close<R: tokio::io::AsyncRead + Unpin>(
    mut rd: R,
    gone: tokio::sync::oneshot::Sender<()>,
) {
    while let Ok(Some(_)) = read_frame(&mut rd).await {}
    let _ = gone.send(());
}

/// STDIN frames into the exec's input; the client's close ends everything.
async fn read_stdin<R: tokio::io::AsyncRead + Unpin>(
    mut rd: R,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    gone: tokio::sync::oneshot::Sender<()>,
) {
    let mut tx = Some(tx);
    loop {
        match read_frame(&mut rd).await {
            Ok(Some((Kind::Stdin, data))) => {
                if let Some(t) = &tx {
                    if t.send(Ok(data)).await.is_err() {
                        tx = None; // the process stopped reading; keep watching for the close
                    }
                }
            }
            Ok(Some((Kind::StdinEof, _))) => tx = None,
            Ok(Some((Kind::StdinAbort, msg))) => {
                if let Some(t) = tx.take() {
                    let msg = String::from_utf8_lossy(&msg).into_owned();
                    let _ = t.send(Err(std::io::Error::other(msg))).await;
                }
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    if let Some(t) = tx.take() {
        // The client went away mid-input: a partial input never looks complete.
        let _ = t
            .send(Err(std::io::Error::other(
                "the control plane closed the input",
            )))
            .await;
    }
    let _ = gone.send(());
}

async fn pty(State(c): State<Ctx>, Path(id): Path<String>, req: Request) -> Response {
    upgrade(req, move |io| serve_pty(c.worker, id, io))
}

async fn serve_pty(worker: Arc<dyn Worker>, id: String, io: TokioIo<hyper::upgrade::Upgraded>) {
    let (mut rd, mut wr) = tokio::io::split(io);
    let opened = async {
        let spec: PtySpec = read_open(&mut rd).await?;
        worker.open_pty(vm_id(&id)?, spec).await
    }
    .await;
    let session = match opened {
        Ok(s) => s,
        Err(e) => return write_error(&mut wr, &e).await,
    };
    if write_frame(&mut wr, Kind::Opened, b"").await.is_err() {
        return;
    }
    let (gone_tx, mut gone) = tokio::sync::oneshot::channel::<()>();
    let input = session.input;
    tokio::spawn(async move {
        loop {
            let item = match read_frame(&mut rd).await {
                Ok(Some((Kind::Stdin, data))) => PtyInput::Data(data),
                Ok(Some((Kind::Resize, body))) => match serde_json::from_slice::<Resize>(&body) {
                    Ok(r) => PtyInput::Resize {
                        cols: r.cols,
                        rows: r.rows,
                    },
                    Err(_) => continue,
                },
                Ok(Some((Kind::Signal, body))) if body.len() == 4 => {
                    PtyInput::Signal(i32::from_be_bytes([body[0], body[1], body[2], body[3]]))
                }
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            };
            if input.send(item).await.is_err() {
                // The terminal ended; keep watching for the close.
                while let Ok(Some(_)) = read_frame(&mut rd).await {}
                break;
            }
        }
        let _ = gone_tx.send(());
    });
    let mut events = session.events;
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = &mut gone => return,
        };
        let sent = match ev {
            Some(Ok(PtyEvent::Output(d))) => write_data(&mut wr, Kind::Stdout, &d).await,
            Some(Ok(PtyEvent::Exit(x))) => {
                let body = serde_json::to_vec(&x).unwrap_or_default();
                let _ = write_frame(&mut wr, Kind::PtyExit, &body).await;
                break;
            }
            Some(Err(e)) => return write_error(&mut wr, &e).await,
            None => return,
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = wr.shutdown().await;
}

#[derive(Debug, Deserialize)]
struct PortQuery {
    port: u16,
    #[serde(default)]
    host: Option<String>,
}

async fn connect(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    Query(q): Query<PortQuery>,
    req: Request,
) -> Response {
    let stream = async { c.worker.connect(vm_id(&id)?, q.port).await }.await;
    tunnel(stream, req)
}

async fn guest_tcp(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    Query(q): Query<PortQuery>,
    req: Request,
) -> Response {
    let host = q.host.unwrap_or_else(|| "127.0.0.1".into());
    let stream = async { c.worker.open_guest_tcp(vm_id(&id)?, &host, q.port).await }.await;
    tunnel(stream, req)
}

/// Answer the connection's outcome; on success the upgraded connection is
/// spliced to the guest connection (half-closes pass through).
fn tunnel(stream: Result<crate::worker::GuestStream, WorkerError>, req: Request) -> Response {
    match stream {
        Ok(mut guest) => upgrade(req, move |mut io| async move {
            let _ = tokio::io::copy_bidirectional(&mut io, &mut guest).await;
        }),
        Err(e) => (status_of(&e), Json(e)).into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct TailQuery {
    #[serde(default)]
    tail: u64,
}

async fn serial(
    State(c): State<Ctx>,
    Path(id): Path<String>,
    Query(q): Query<TailQuery>,
    _headers: HeaderMap,
) -> Response {
    match async { c.worker.open_serial(vm_id(&id)?, q.tail).await }.await {
        Ok(stream) => Body::from_stream(stream).into_response(),
        Err(e) => (status_of(&e), Json(e)).into_response(),
    }
}
