//! The internal worker API, client side: [`RemoteWorker`] implements
//! [`Worker`] over HTTP/1.1 to a `fastvm worker` host (see `service.rs`).
//!
//! Each call opens its own TCP connection (no pool): a stream's lifetime is
//! its connection's, so dropping an exec, a terminal or a tunnel closes the
//! connection and the worker cancels what it carried. Connection failures are
//! [`WorkerError::Unreachable`]; a unary call that outlives its budget is
//! [`WorkerError::Timeout`].

use crate::exec::{ExecEvent, ExecRequest, ExitStatus};
use crate::service::{ListedVm, OpenExec, Resize, SnapshotBody};
use crate::terminal::{PtyEvent, PtyExit, PtyInput, PtySession, PtySpec, PTY_INPUT_QUEUE};
use crate::wire::{read_frame, write_data, write_frame, Kind, UPGRADE_PROTOCOL};
use crate::worker::{
    ByteStream, DetachNote, ExecEvents, GuestStream, VmSpec, VmState, Worker, WorkerError,
    WorkerStats,
};
use async_trait::async_trait;
use bytes::Bytes;
use fastvm_types::{FirewallPolicy, SnapshotId, VmId};
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::header;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Duration;
use tokio::io::{ReadHalf, WriteHalf};

/// How long a TCP connection to a worker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Budget of quick calls (state, list, pause, firewall, ...).
const SHORT: Duration = Duration::from_secs(60);
/// Budget of calls that boot or capture a VM (a first launch builds images).
const LONG: Duration = Duration::from_secs(20 * 60);

/// Where and how to reach one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerEndpoint {
    pub id: String,
    /// `http://host:port`.
    pub address: String,
    /// Bearer token of the worker's current generation.
    pub token: String,
    pub generation: i64,
}

/// A worker on another host (or process), reached over its internal API.
pub struct RemoteWorker {
    endpoint: WorkerEndpoint,
    /// `host:port` of `endpoint.address`.
    authority: String,
}

type Upgraded = TokioIo<hyper::upgrade::Upgraded>;

impl RemoteWorker {
    /// A client of the worker at `endpoint`; fails only on an address that is
    /// not `http://host:port` (TLS is not supported yet).
    pub fn new(endpoint: WorkerEndpoint) -> Result<RemoteWorker, WorkerError> {
        let url = url::Url::parse(&endpoint.address).map_err(|e| {
            WorkerError::Failed(format!(
                "worker address {:?} is not a URL: {e}",
                endpoint.address
            ))
        })?;
        if url.scheme() != "http" {
            return Err(WorkerError::Failed(format!(
                "worker address {:?}: only http:// is supported",
                endpoint.address
            )));
        }
        let host = url.host_str().ok_or_else(|| {
            WorkerError::Failed(format!("worker address {:?} has no host", endpoint.address))
        })?;
        let port = url.port().unwrap_or(80);
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(RemoteWorker {
            endpoint,
            authority,
        })
    }

    pub fn endpoint(&self) -> &WorkerEndpoint {
        &self.endpoint
    }

    async fn dial(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, WorkerError> {
        let unreachable = |e: String| {
            WorkerError::Unreachable(format!(
                "worker {} at {}: {e}",
                self.endpoint.id, self.endpoint.address
            ))
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| {
            unreachable(format!(
                "no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Request<Full<Bytes>>, WorkerError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.endpoint.token),
            );
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        b.body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| WorkerError::Failed(format!("building a worker request: {e}")))
    }

    /// A JSON call; an error status carries a [`WorkerError`].
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        budget: Duration,
    ) -> Result<T, WorkerError> {
        let fut = async {
            let mut sender = self.dial().await?;
            let req = self.request(method, path, body)?;
            let resp = sender.send_request(req).await.map_err(|e| self.lost(e))?;
            let status = resp.status();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.lost(e))?
                .to_bytes();
            if status.is_success() {
                serde_json::from_slice(&bytes).map_err(|e| {
                    WorkerError::Failed(format!(
                        "worker {} answered {path} with bad JSON: {e}",
                        self.endpoint.id
                    ))
                })
            } else {
                Err(decode_error(status, &bytes))
            }
        };
        tokio::time::timeout(budget, fut).await.unwrap_or_else(|_| {
            Err(WorkerError::Timeout(format!(
                "worker {} did not answer {path} within {} s",
                self.endpoint.id,
                budget.as_secs()
            )))
        })
    }

    fn lost(&self, e: impl std::fmt::Display) -> WorkerError {
        WorkerError::Unreachable(format!(
            "worker {} connection failed: {e}",
            self.endpoint.id
        ))
    }

    /// Upgrade a GET of `path` to a stream.
    async fn upgrade(&self, path: &str) -> Result<Upgraded, WorkerError> {
        let fut = async {
            let mut sender = self.dial().await?;
            let mut req = self.request(Method::GET, path, None)?;
            let h = req.headers_mut();
            h.insert(
                header::CONNECTION,
                header::HeaderValue::from_static("upgrade"),
            );
            h.insert(
                header::UPGRADE,
                header::HeaderValue::from_static(UPGRADE_PROTOCOL),
            );
            let resp = sender.send_request(req).await.map_err(|e| self.lost(e))?;
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                let status = resp.status();
                let bytes = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| self.lost(e))?
                    .to_bytes();
                return Err(decode_error(status, &bytes));
            }
            let io = hyper::upgrade::on(resp).await.map_err(|e| self.lost(e))?;
            Ok(TokioIo::new(io))
        };
        // Opening a tunnel includes the worker's connect into the guest (5 s).
        tokio::time::timeout(SHORT, fut).await.unwrap_or_else(|_| {
            Err(WorkerError::Timeout(format!(
                "worker {} did not open {path} in time",
                self.endpoint.id
            )))
        })
    }

    /// Upgrade, send OPEN, and wait for OPENED (or the worker's error).
    async fn open_stream<T: Serialize>(
        &self,
        path: &str,
        open: &T,
    ) -> Result<(ReadHalf<Upgraded>, WriteHalf<Upgraded>), WorkerError> {
        let io = self.upgrade(path).await?;
        let (mut rd, mut wr) = tokio::io::split(io);
        let body = serde_json::to_vec(open).map_err(|e| WorkerError::Failed(e.to_string()))?;
        write_frame(&mut wr, Kind::Open, &body)
            .await
            .map_err(|e| self.lost(e))?;
        match read_frame(&mut rd).await {
            Ok(Some((Kind::Opened, _))) => Ok((rd, wr)),
            Ok(Some((Kind::Error, body))) => Err(decode_error(StatusCode::OK, &body)),
            Ok(_) => Err(WorkerError::Failed(format!(
                "worker {} broke the stream protocol",
                self.endpoint.id
            ))),
            Err(e) => Err(self.lost(e)),
        }
    }
}

/// A worker's error answer; a body that is not a [`WorkerError`] (a proxy, a
/// 401) becomes one that says what came back.
fn decode_error(status: StatusCode, body: &[u8]) -> WorkerError {
    serde_json::from_slice(body).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
        WorkerError::Failed(format!("worker answered {status}: {text}"))
    })
}

fn json<T: Serialize>(v: &T) -> Result<Option<Vec<u8>>, WorkerError> {
    serde_json::to_vec(v)
        .map(Some)
        .map_err(|e| WorkerError::Failed(format!("encoding a worker request: {e}")))
}

/// What one frame means to a stream's consumer: an item and whether more
/// follow; `None` for a kind this stream does not carry.
type Decode<T> = fn(Kind, Bytes) -> Option<(Result<T, WorkerError>, bool)>;

/// The frames read from `rd` as a stream of `T` (see [`Decode`]); an ERROR
/// frame, an unexpected kind or the end of the connection end it with an
/// error. `keep` (the write half, a pump) lives as long as the stream.
fn frame_stream<T: Send + 'static>(
    rd: ReadHalf<Upgraded>,
    keep: impl Send + 'static,
    what: &'static str,
    decode: Decode<T>,
) -> futures::stream::BoxStream<'static, Result<T, WorkerError>> {
    let items = futures::stream::unfold(Some((rd, keep)), move |state| async move {
        let (mut rd, keep) = state?;
        let (item, more) = match read_frame(&mut rd).await {
            Ok(Some((Kind::Error, body))) => (Err(decode_error(StatusCode::OK, &body)), false),
            Ok(Some((k, d))) => decode(k, d).unwrap_or_else(|| {
                let e = format!("unexpected {k:?} frame from the worker");
                (Err(WorkerError::Failed(e)), false)
            }),
            Ok(None) => {
                let e = format!("the worker closed the {what} before its exit");
                (Err(WorkerError::Unreachable(e)), false)
            }
            Err(e) => {
                let e = format!("the {what}'s connection to the worker failed: {e}");
                (Err(WorkerError::Unreachable(e)), false)
            }
        };
        Some((item, more.then_some((rd, keep))))
    });
    Box::pin(items)
}

/// Send `input` as STDIN frames (STDIN_ABORT on a read error), then
/// STDIN_EOF; the returned guard keeps the write half (the connection) open
/// until the stream's reader is done with it.
fn send_input(mut wr: WriteHalf<Upgraded>, mut input: ByteStream) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        while let Some(chunk) = input.next().await {
            let sent = match chunk {
                Ok(data) => write_data(&mut wr, Kind::Stdin, &data).await,
                Err(e) => {
                    let _ = write_frame(&mut wr, Kind::StdinAbort, e.to_string().as_bytes()).await;
                    break;
                }
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = write_frame(&mut wr, Kind::StdinEof, b"").await;
        std::future::pending::<()>().await;
    }))
}

/// The JSON body of a stream's last frame.
fn last<T: DeserializeOwned>(body: &[u8], what: &str) -> Result<T, WorkerError> {
    serde_json::from_slice(body)
        .map_err(|e| WorkerError::Failed(format!("bad {what} from the worker: {e}")))
}

/// The frames of an exec as events (the last is `Exit` or an error).
fn exec_events(rd: ReadHalf<Upgraded>, keep: impl Send + 'static) -> ExecEvents {
    frame_stream(rd, keep, "exec", |k, d| match k {
        Kind::Stdout => Some((Ok(ExecEvent::Stdout(d)), true)),
        Kind::Stderr => Some((Ok(ExecEvent::Stderr(d)), true)),
        Kind::Exit => Some((
            last::<ExitStatus>(&d, "exit status").map(ExecEvent::Exit),
            false,
        )),
        _ => None,
    })
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl RemoteWorker {
    /// Follow an import's stream: notes to `progress`, then its result.
    /// `keep` holds the connection's write side until the end.
    async fn follow_import(
        &self,
        rd: ReadHalf<Upgraded>,
        keep: impl Send + 'static,
        progress: crate::worker::ImportSink,
    ) -> Result<crate::worker::ImportedImage, WorkerError> {
        use crate::worker::{ImportNote, ImportedImage};
        enum Item {
            Note(ImportNote),
            Done(ImportedImage),
        }
        let mut items = frame_stream(rd, keep, "import", |k, d| match k {
            Kind::Stdout => Some((last::<ImportNote>(&d, "import note").map(Item::Note), true)),
            Kind::Exit => Some((
                last::<ImportedImage>(&d, "import result").map(Item::Done),
                false,
            )),
            _ => None,
        });
        while let Some(item) = items.next().await {
            match item? {
                Item::Note(n) => progress(n),
                Item::Done(done) => return Ok(done),
            }
        }
        Err(WorkerError::Unreachable(format!(
            "worker {} ended the import without a result",
            self.endpoint.id
        )))
    }
}

#[async_trait]
impl Worker for RemoteWorker {
    fn id(&self) -> &str {
        &self.endpoint.id
    }

    async fn create(&self, spec: VmSpec) -> Result<(), WorkerError> {
        self.call(Method::POST, "/w/v1/vms", json(&spec)?, LONG)
            .await
    }

    async fn state(&self, id: VmId) -> Result<Option<VmState>, WorkerError> {
        self.call(Method::GET, &format!("/w/v1/vms/{id}/state"), None, SHORT)
            .await
    }

    async fn list(&self) -> Result<Vec<(VmId, VmState)>, WorkerError> {
        let l: Vec<ListedVm> = self.call(Method::GET, "/w/v1/vms", None, SHORT).await?;
        Ok(l.into_iter().map(|v| (v.id, v.state)).collect())
    }

    async fn pause(&self, id: VmId) -> Result<(), WorkerError> {
        self.call(Method::POST, &format!("/w/v1/vms/{id}/pause"), None, SHORT)
            .await
    }

    async fn resume(&self, id: VmId) -> Result<(), WorkerError> {
        self.call(Method::POST, &format!("/w/v1/vms/{id}/resume"), None, SHORT)
            .await
    }

    async fn delete(&self, id: VmId) -> Result<(), WorkerError> {
        self.call(Method::DELETE, &format!("/w/v1/vms/{id}"), None, SHORT)
            .await
    }

    async fn import_image(
        &self,
        job: crate::worker::ImageImport,
        progress: crate::worker::ImportSink,
    ) -> Result<crate::worker::ImportedImage, WorkerError> {
        let (rd, wr) = self.open_stream("/w/v1/imports", &job).await?;
        // Dropping the stream (a cancelled import) closes the connection:
        // the worker drops its import and cleans up.
        self.follow_import(rd, wr, progress).await
    }

    async fn build_dockerfile(
        &self,
        job: crate::worker::DockerfileImport,
        context: ByteStream,
        progress: crate::worker::ImportSink,
    ) -> Result<crate::worker::ImportedImage, WorkerError> {
        let (rd, wr) = self.open_stream("/w/v1/builds", &job).await?;
        // The context follows the OPEN frame as STDIN frames.
        let pump = send_input(wr, context);
        self.follow_import(rd, pump, progress).await
    }

    async fn exec(&self, id: VmId, req: ExecRequest) -> Result<ExecEvents, WorkerError> {
        let open = OpenExec {
            request: req,
            input: false,
        };
        let (rd, wr) = self
            .open_stream(&format!("/w/v1/vms/{id}/exec"), &open)
            .await?;
        Ok(exec_events(rd, wr))
    }

    async fn exec_with_input(
        &self,
        id: VmId,
        req: ExecRequest,
        input: ByteStream,
    ) -> Result<ExecEvents, WorkerError> {
        let open = OpenExec {
            request: req,
            input: true,
        };
        let (rd, wr) = self
            .open_stream(&format!("/w/v1/vms/{id}/exec"), &open)
            .await?;
        Ok(exec_events(rd, send_input(wr, input)))
    }

    async fn snapshot(&self, vm: VmId, snapshot: SnapshotId) -> Result<(), WorkerError> {
        let body = SnapshotBody { vm, snapshot };
        self.call(Method::POST, "/w/v1/snapshots", json(&body)?, LONG)
            .await
    }

    async fn delete_snapshot(&self, snapshot: SnapshotId) -> Result<(), WorkerError> {
        self.call(
            Method::DELETE,
            &format!("/w/v1/snapshots/{snapshot}"),
            None,
            LONG,
        )
        .await
    }

    async fn set_firewall(&self, id: VmId, policy: &FirewallPolicy) -> Result<(), WorkerError> {
        self.call(
            Method::PUT,
            &format!("/w/v1/vms/{id}/firewall"),
            json(policy)?,
            SHORT,
        )
        .await
    }

    async fn enforced_firewall(&self, id: VmId) -> Result<Option<FirewallPolicy>, WorkerError> {
        self.call(
            Method::GET,
            &format!("/w/v1/vms/{id}/firewall"),
            None,
            SHORT,
        )
        .await
    }

    async fn public_ipv6(&self, id: VmId) -> Result<Option<String>, WorkerError> {
        self.call(Method::GET, &format!("/w/v1/vms/{id}/ipv6"), None, SHORT)
            .await
    }

    async fn stats(&self) -> Result<WorkerStats, WorkerError> {
        self.call(Method::GET, "/w/v1/stats", None, SHORT).await
    }

    async fn put_volume(
        &self,
        volume: &str,
        size_bytes: u64,
        read_only: bool,
    ) -> Result<(), WorkerError> {
        let body = crate::service::PutVolumeBody {
            size_bytes,
            read_only,
        };
        self.call(
            Method::PUT,
            &format!("/w/v1/volumes/{}", segment(volume)?),
            json(&body)?,
            SHORT,
        )
        .await
    }

    async fn delete_volume(&self, volume: &str) -> Result<(), WorkerError> {
        self.call(
            Method::DELETE,
            &format!("/w/v1/volumes/{}", segment(volume)?),
            None,
            LONG,
        )
        .await
    }

    async fn volume_used_bytes(&self, volume: &str) -> Result<u64, WorkerError> {
        self.call(
            Method::GET,
            &format!("/w/v1/volumes/{}/used", segment(volume)?),
            None,
            SHORT,
        )
        .await
    }

    async fn attach_volume(
        &self,
        id: VmId,
        volume: &str,
        mount_path: &str,
        read_only: bool,
    ) -> Result<(), WorkerError> {
        let body = crate::service::AttachVolumeBody {
            volume: volume.to_owned(),
            mount_path: mount_path.to_owned(),
            read_only,
        };
        self.call(
            Method::POST,
            &format!("/w/v1/vms/{id}/volumes"),
            json(&body)?,
            LONG,
        )
        .await
    }

    async fn detach_volume(
        &self,
        id: VmId,
        volume: &str,
    ) -> Result<Option<DetachNote>, WorkerError> {
        self.call(
            Method::DELETE,
            &format!("/w/v1/vms/{id}/volumes/{}", segment(volume)?),
            None,
            LONG,
        )
        .await
    }

    async fn attach_bucket(
        &self,
        id: VmId,
        bucket: &crate::BucketAttach,
    ) -> Result<(), WorkerError> {
        self.call(
            Method::POST,
            &format!("/w/v1/vms/{id}/buckets"),
            json(bucket)?,
            LONG,
        )
        .await
    }

    async fn rotate_bucket(
        &self,
        id: VmId,
        mount: &str,
        bucket_uri: &str,
        credentials: &fastvm_types::bucket_mount::BucketMountCredentials,
    ) -> Result<(), WorkerError> {
        let body = crate::service::RotateBucketBody {
            bucket_uri: bucket_uri.to_owned(),
            credentials: credentials.clone(),
        };
        self.call(
            Method::PUT,
            &format!("/w/v1/vms/{id}/buckets/{}", segment(mount)?),
            json(&body)?,
            LONG,
        )
        .await
    }

    async fn detach_bucket(
        &self,
        id: VmId,
        mount: &str,
    ) -> Result<Option<DetachNote>, WorkerError> {
        self.call(
            Method::DELETE,
            &format!("/w/v1/vms/{id}/buckets/{}", segment(mount)?),
            None,
            LONG,
        )
        .await
    }

    async fn bucket_health(
        &self,
        id: VmId,
    ) -> Result<std::collections::BTreeMap<String, Option<String>>, WorkerError> {
        self.call(Method::GET, &format!("/w/v1/vms/{id}/buckets"), None, SHORT)
            .await
    }

    async fn connect(&self, id: VmId, port: u16) -> Result<GuestStream, WorkerError> {
        let io = self
            .upgrade(&format!("/w/v1/vms/{id}/connect?port={port}"))
            .await?;
        Ok(Box::new(io))
    }

    async fn open_pty(&self, id: VmId, spec: PtySpec) -> Result<PtySession, WorkerError> {
        let (rd, mut wr) = self
            .open_stream(&format!("/w/v1/vms/{id}/pty"), &spec)
            .await?;
        let (input, mut inputs) = tokio::sync::mpsc::channel::<PtyInput>(PTY_INPUT_QUEUE);
        let pump = AbortOnDrop(tokio::spawn(async move {
            while let Some(item) = inputs.recv().await {
                let sent = match item {
                    PtyInput::Data(d) => write_data(&mut wr, Kind::Stdin, &d).await,
                    PtyInput::Resize { cols, rows } => {
                        let body = serde_json::to_vec(&Resize { cols, rows }).unwrap_or_default();
                        write_frame(&mut wr, Kind::Resize, &body).await
                    }
                    PtyInput::Signal(s) => {
                        write_frame(&mut wr, Kind::Signal, &s.to_be_bytes()).await
                    }
                };
                if sent.is_err() {
                    break;
                }
            }
            std::future::pending::<()>().await;
        }));
        let events = frame_stream(rd, pump, "terminal", |k, d| match k {
            Kind::Stdout => Some((Ok(PtyEvent::Output(d)), true)),
            Kind::PtyExit => Some((
                last::<PtyExit>(&d, "terminal exit").map(PtyEvent::Exit),
                false,
            )),
            _ => None,
        });
        Ok(PtySession { input, events })
    }

    async fn open_serial(&self, id: VmId, tail_bytes: u64) -> Result<ByteStream, WorkerError> {
        let path = format!("/w/v1/vms/{id}/serial?tail={tail_bytes}");
        let resp = tokio::time::timeout(SHORT, async {
            let mut sender = self.dial().await?;
            let req = self.request(Method::GET, &path, None)?;
            sender.send_request(req).await.map_err(|e| self.lost(e))
        })
        .await
        .unwrap_or_else(|_| {
            Err(WorkerError::Timeout(format!(
                "worker {} did not open {path} in time",
                self.endpoint.id
            )))
        })?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| self.lost(e))?
                .to_bytes();
            return Err(decode_error(status, &bytes));
        }
        let body = http_body_util::BodyStream::new(resp.into_body());
        let stream = body.filter_map(|frame| async move {
            match frame {
                Ok(f) => f.into_data().ok().map(Ok),
                Err(e) => Some(Err(std::io::Error::other(format!(
                    "serial console stream from the worker failed: {e}"
                )))),
            }
        });
        Ok(Box::pin(stream))
    }

    async fn open_guest_tcp(
        &self,
        id: VmId,
        host: &str,
        port: u16,
    ) -> Result<GuestStream, WorkerError> {
        let host = percent_encoding::utf8_percent_encode(host, percent_encoding::NON_ALPHANUMERIC);
        let io = self
            .upgrade(&format!("/w/v1/vms/{id}/guest-tcp?host={host}&port={port}"))
            .await?;
        Ok(Box::new(io))
    }
}

/// A handle on the worker at `endpoint`: a [`RemoteWorker`], or, when the
/// address cannot be used (not `http://host:port`), a worker whose every
/// call fails with `Unreachable` saying why.
pub fn connect(endpoint: WorkerEndpoint) -> std::sync::Arc<dyn Worker> {
    let id = endpoint.id.clone();
    match RemoteWorker::new(endpoint) {
        Ok(w) => std::sync::Arc::new(w),
        Err(e) => std::sync::Arc::new(Unusable {
            id,
            why: e.to_string(),
        }),
    }
}

/// See [`connect`].
struct Unusable {
    id: String,
    why: String,
}

impl Unusable {
    fn err<T>(&self) -> Result<T, WorkerError> {
        Err(WorkerError::Unreachable(format!(
            "worker {}: {}",
            self.id, self.why
        )))
    }
}

#[async_trait]
impl Worker for Unusable {
    fn id(&self) -> &str {
        &self.id
    }
    async fn create(&self, _: VmSpec) -> Result<(), WorkerError> {
        self.err()
    }
    async fn state(&self, _: VmId) -> Result<Option<VmState>, WorkerError> {
        self.err()
    }
    async fn list(&self) -> Result<Vec<(VmId, VmState)>, WorkerError> {
        self.err()
    }
    async fn pause(&self, _: VmId) -> Result<(), WorkerError> {
        self.err()
    }
    async fn resume(&self, _: VmId) -> Result<(), WorkerError> {
        self.err()
    }
    async fn delete(&self, _: VmId) -> Result<(), WorkerError> {
        self.err()
    }
    async fn exec(&self, _: VmId, _: ExecRequest) -> Result<ExecEvents, WorkerError> {
        self.err()
    }
    async fn snapshot(&self, _: VmId, _: SnapshotId) -> Result<(), WorkerError> {
        self.err()
    }
    async fn delete_snapshot(&self, _: SnapshotId) -> Result<(), WorkerError> {
        self.err()
    }
    async fn set_firewall(&self, _: VmId, _: &FirewallPolicy) -> Result<(), WorkerError> {
        self.err()
    }
}

/// A volume id as one URL path segment (ids are `vol_<hex>`; anything
/// that would change the path is refused here).
fn segment(volume: &str) -> Result<&str, WorkerError> {
    if volume.is_empty()
        || !volume
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(WorkerError::Volume(format!(
            "{volume:?} is not a volume id"
        )));
    }
    Ok(volume)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_addresses_give_a_worker_that_says_why() {
        let ep = |address: &str| WorkerEndpoint {
            id: "wk_x".into(),
            address: address.into(),
            token: "t".into(),
            generation: 1,
        };
        for bad in ["https://10.0.0.1:7070", "not a url", "http://"] {
            let w = connect(ep(bad));
            assert_eq!(w.id(), "wk_x");
            assert!(
                matches!(w.list().await, Err(WorkerError::Unreachable(_))),
                "{bad}"
            );
        }
        let v6 = RemoteWorker::new(ep("http://[fd00::1]:7070")).expect("v6");
        assert_eq!(v6.authority, "[fd00::1]:7070");
        let v4 = RemoteWorker::new(ep("http://192.0.2.2:7070")).expect("v4");
        assert_eq!(v4.authority, "192.0.2.2:7070");
    }
}
