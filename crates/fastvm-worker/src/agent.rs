//! The host side of the agent channel: one [`AgentClient`] per VM, talking
//! over the unix socket behind the VM's virtio-serial port.
//!
//! ```text
//!  connect: SYNC(n) Hello{n}  --(repeat every 250 ms until)-->  HelloAck{n}
//!  reader task: frames -> per-stream queues (bounded by the flow-control
//!               window, which the host enforces: a guest exceeding it is cut off)
//!  ExecStream::next(): yields output, returns credit as it is consumed
//!  StdinWriter::write(): sends stdin Data frames within the window the agent
//!               grants (STREAM_WINDOW at start, Credit{Stdin} as it writes them
//!               to the process), then Eof on finish()
//!  connect_tcp(): Connect{host, port} -> Ok; then two tasks bridge the stream
//!               to an in-memory duplex pipe (guest bytes are credited as the
//!               pipe takes them, pipe bytes go out as stdin under the agent's
//!               window; EOF both ways is a half-close; dropping the pipe
//!               cancels the stream, which closes the socket in the guest)
//! ```
//!
//! Everything read from the guest is untrusted: frames are bounded by the
//! codec, unknown streams are ignored, window overruns end the stream.

use crate::error::{Error, Result};
use crate::exec::ExecEvent;
use bytes::Bytes;
pub use fastvm_agent_proto::PtySpec;
use fastvm_agent_proto::{
    Control, ExecSpec, Fd, Frame, FrameCodec, GuestConfig, CONNECT_PROTOCOL_VERSION, DATA_CHUNK,
    MAX_CONNECT_HOST, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, PTY_PROTOCOL_VERSION, STREAM_WINDOW,
};
use futures::{SinkExt, StreamExt};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::codec::{FramedRead, FramedWrite};

/// What the agent said about itself at connect.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub version: u32,
    pub agent_version: String,
    pub boot_id: String,
}

enum Incoming {
    Control(Control),
    Data(Fd, Bytes),
    Eof,
    Closed(String),
}

struct Route {
    tx: mpsc::UnboundedSender<Incoming>,
    /// Bytes received and not yet credited back, per output fd.
    unacked: [u32; 2],
    /// Send window of the stream's stdin, when it has one.
    stdin: Option<Arc<StdinCredit>>,
}

impl Drop for Route {
    /// A removed route (exit, cancel, connection loss) wakes a writer
    /// waiting for stdin credit that will never come.
    fn drop(&mut self) {
        if let Some(c) = &self.stdin {
            c.close();
        }
    }
}

/// How many stdin bytes the host may still send on one stream.
struct StdinCredit {
    avail: Mutex<u32>,
    notify: Notify,
    closed: std::sync::atomic::AtomicBool,
}

impl StdinCredit {
    fn new() -> Self {
        StdinCredit {
            avail: Mutex::new(STREAM_WINDOW),
            notify: Notify::new(),
            closed: Default::default(),
        }
    }

    fn give(&self, n: u32) {
        if let Ok(mut a) = self.avail.lock() {
            // A guest cannot talk us into sending more than one window ahead.
            *a = a.saturating_add(n).min(STREAM_WINDOW);
        }
        self.notify.notify_one();
    }

    fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Wait for credit and take up to `max` bytes of it; `None` once the stream is gone.
    async fn take(&self, max: usize) -> Option<usize> {
        loop {
            let notified = self.notify.notified();
            if self.closed.load(Ordering::SeqCst) {
                return None;
            }
            if let Ok(mut a) = self.avail.lock() {
                if *a > 0 {
                    let n = (*a as usize).min(max);
                    *a -= n as u32;
                    return Some(n);
                }
            }
            notified.await;
        }
    }
}

struct Inner {
    out: mpsc::Sender<Frame>,
    routes: Mutex<HashMap<u32, Route>>,
    next_stream: AtomicU32,
    closed: watch::Receiver<Option<String>>,
    info: AgentInfo,
}

#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

fn fd_index(fd: Fd) -> Option<usize> {
    match fd {
        Fd::Stdout => Some(0),
        Fd::Stderr => Some(1),
        Fd::Stdin => None,
    }
}

impl AgentClient {
    /// Connect to the agent socket and handshake, retrying until `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<AgentClient> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    tracing::trace!(error = %e, "agent socket not ready");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => {
                    return Err(Error::AgentUnavailable(format!(
                        "connect {}: {e}",
                        path.display()
                    )))
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut reader = FramedRead::new(read, FrameCodec::new());
        let mut writer = FramedWrite::new(write, FrameCodec::new());
        let nonce: u64 = rand::random();
        let info = loop {
            let hello = [
                Frame::Sync { nonce },
                Frame::Control {
                    stream: 0,
                    msg: Control::Hello {
                        version: PROTOCOL_VERSION,
                        nonce,
                    },
                },
            ];
            for f in hello {
                writer
                    .feed(f)
                    .await
                    .map_err(|e| Error::AgentUnavailable(format!("send hello: {e}")))?;
            }
            writer
                .flush()
                .await
                .map_err(|e| Error::AgentUnavailable(format!("send hello: {e}")))?;
            let attempt_end = (Instant::now() + Duration::from_millis(250)).min(deadline);
            if let Some(info) = wait_hello_ack(&mut reader, nonce, attempt_end).await? {
                break info;
            }
            if Instant::now() >= deadline {
                return Err(Error::AgentUnavailable(format!(
                    "no answer from the agent within {timeout:?}"
                )));
            }
        };
        // An older agent (e.g. in a VM restored from an old snapshot) is still
        // driven for what its version knows; see `exec` for PTYs.
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&info.version) {
            return Err(Error::Protocol(format!(
                "agent speaks protocol v{}, host v{MIN_PROTOCOL_VERSION}..v{PROTOCOL_VERSION}",
                info.version
            )));
        }
        let (out_tx, mut out_rx) = mpsc::channel::<Frame>(256);
        tokio::spawn(async move {
            while let Some(f) = out_rx.recv().await {
                if writer.send(f).await.is_err() {
                    break;
                }
            }
        });
        let (closed_tx, closed_rx) = watch::channel(None);
        let inner = Arc::new(Inner {
            out: out_tx,
            routes: Mutex::new(HashMap::new()),
            next_stream: AtomicU32::new(1),
            closed: closed_rx,
            info,
        });
        tokio::spawn(read_loop(reader, Arc::downgrade(&inner), closed_tx));
        Ok(AgentClient { inner })
    }

    pub fn info(&self) -> &AgentInfo {
        &self.inner.info
    }

    /// `Some(reason)` once the connection is gone.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.closed.borrow().clone()
    }

    fn open_stream(
        &self,
        stdin: Option<Arc<StdinCredit>>,
    ) -> Result<(u32, mpsc::UnboundedReceiver<Incoming>)> {
        if let Some(reason) = self.closed_reason() {
            return Err(Error::AgentUnavailable(reason));
        }
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner
            .routes
            .lock()
            .map_err(|_| Error::Protocol("poisoned".into()))?
            .insert(
                id,
                Route {
                    tx,
                    unacked: [0, 0],
                    stdin,
                },
            );
        Ok((id, rx))
    }

    fn close_stream(&self, id: u32) {
        if let Ok(mut r) = self.inner.routes.lock() {
            r.remove(&id);
        }
    }

    async fn send(&self, frame: Frame) -> Result<()> {
        self.inner
            .out
            .send(frame)
            .await
            .map_err(|_| Error::AgentUnavailable("connection closed".into()))
    }

    /// Send a one-shot request and wait for its Ok/Error answer.
    async fn request(&self, msg: Control, timeout: Duration) -> Result<()> {
        let (id, mut rx) = self.open_stream(None)?;
        let result = async {
            self.send(Frame::Control { stream: id, msg }).await?;
            match tokio::time::timeout(timeout, rx.recv()).await {
                Err(_) => Err(Error::AgentUnavailable(format!(
                    "no answer within {timeout:?}"
                ))),
                Ok(None) => Err(Error::AgentUnavailable("connection closed".into())),
                Ok(Some(Incoming::Control(Control::Ok))) => Ok(()),
                Ok(Some(Incoming::Control(Control::Error { message }))) => {
                    Err(Error::Protocol(format!("agent refused: {message}")))
                }
                Ok(Some(Incoming::Closed(reason))) => Err(Error::AgentUnavailable(reason)),
                Ok(Some(_)) => Err(Error::Protocol("unexpected answer".into())),
            }
        }
        .await;
        self.close_stream(id);
        result
    }

    pub async fn ping(&self) -> Result<()> {
        self.request(Control::Ping, Duration::from_secs(10)).await
    }

    pub async fn configure(&self, cfg: GuestConfig) -> Result<()> {
        self.request(Control::Configure(cfg), Duration::from_secs(30))
            .await
    }

    /// Send a configuration without waiting for the guest to apply it. The
    /// agent handles frames in order, so every later request on this
    /// connection sees the new configuration; a failure is logged.
    pub fn configure_in_background(&self, cfg: GuestConfig, vm: String) {
        let client = self.clone();
        tokio::spawn(async move {
            match client.configure(cfg).await {
                Ok(()) => {}
                // The VM went away (deleted right after launch): nothing to configure.
                Err(Error::AgentUnavailable(e)) => {
                    tracing::debug!(%vm, error = %e, "guest configuration not delivered")
                }
                Err(e) => tracing::warn!(%vm, error = %e, "guest configuration failed"),
            }
        });
    }

    /// Ask the guest to power off; its answer may be lost as it goes down.
    pub async fn shutdown(&self) -> Result<()> {
        match self
            .request(Control::Shutdown { reboot: false }, Duration::from_secs(5))
            .await
        {
            Ok(()) | Err(Error::AgentUnavailable(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Start a process; its output and exit come from the returned stream.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecStream> {
        if spec.pty.is_some() && self.inner.info.version < PTY_PROTOCOL_VERSION {
            return Err(Error::InvalidExec(format!(
                "the agent in this VM speaks protocol v{} and has no terminals (v{PTY_PROTOCOL_VERSION} has); a VM launched from a current image has",
                self.inner.info.version
            )));
        }
        let timeout = spec.timeout_ms.map(Duration::from_millis);
        let credit = spec.stdin.then(|| Arc::new(StdinCredit::new()));
        let (id, rx) = self.open_stream(credit.clone())?;
        let stream = ExecStream {
            id,
            rx,
            stdin: credit.map(|credit| StdinWriter {
                id,
                client: self.clone(),
                credit,
            }),
            client: self.clone(),
            finished: false,
            // The agent enforces the timeout; this guard only covers a guest that stops answering.
            deadline: timeout.map(|t| Instant::now() + t + Duration::from_secs(30)),
        };
        self.send(Frame::Control {
            stream: id,
            msg: Control::Exec(spec),
        })
        .await?;
        Ok(stream)
    }
}

/// Bytes buffered in the in-memory pipe of a guest TCP connection, per direction.
const TCP_PIPE_BUFFER: usize = 2 * DATA_CHUNK;
/// How long the agent may take to answer a `Connect` (it gives up dialing after 10 s).
const CONNECT_ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

impl AgentClient {
    /// Open a TCP connection to `host:port` *as seen from inside the guest*
    /// (its loopback included; no firewall is involved) and return its bytes
    /// as an in-memory pipe. See the module docs for the bridging.
    pub async fn connect_tcp(&self, host: &str, port: u16) -> Result<tokio::io::DuplexStream> {
        if self.inner.info.version < CONNECT_PROTOCOL_VERSION {
            return Err(Error::GuestConnect(format!(
                "the agent in this VM speaks protocol v{} and cannot open connections inside the guest (v{CONNECT_PROTOCOL_VERSION} can); a VM launched from a current image can",
                self.inner.info.version
            )));
        }
        if host.is_empty() || host.len() > MAX_CONNECT_HOST || host.contains(['\0', '\n']) {
            return Err(Error::GuestConnect(format!(
                "host {host:?} is not a valid address or name"
            )));
        }
        let credit = Arc::new(StdinCredit::new());
        let (id, mut rx) = self.open_stream(Some(credit.clone()))?;
        let guard = CancelGuard {
            id,
            client: self.clone(),
        };
        self.send(Frame::Control {
            stream: id,
            msg: Control::Connect {
                host: host.to_owned(),
                port,
            },
        })
        .await?;
        match tokio::time::timeout(CONNECT_ANSWER_TIMEOUT, rx.recv()).await {
            Err(_) => {
                return Err(Error::AgentUnavailable(format!(
                    "the agent did not answer a connect within {CONNECT_ANSWER_TIMEOUT:?}"
                )))
            }
            Ok(None) => return Err(Error::AgentUnavailable("connection closed".into())),
            Ok(Some(Incoming::Control(Control::Ok))) => {}
            Ok(Some(Incoming::Control(Control::Error { message }))) => {
                return Err(Error::GuestConnect(message))
            }
            Ok(Some(Incoming::Closed(reason))) => return Err(Error::AgentUnavailable(reason)),
            Ok(Some(_)) => {
                return Err(Error::Protocol(
                    "unexpected answer to a connect request".into(),
                ))
            }
        }
        let (ours, theirs) = tokio::io::duplex(TCP_PIPE_BUFFER);
        let (mut pipe_rd, mut pipe_wr) = tokio::io::split(ours);
        let guard = Arc::new(guard);
        // Guest -> pipe: credit what the pipe took.
        let up_guard = guard.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Some(item) = rx.recv().await {
                match item {
                    Incoming::Data(Fd::Stdout, data) => {
                        let n = data.len() as u32;
                        if pipe_wr.write_all(&data).await.is_err() {
                            return; // the user dropped the connection: cancel
                        }
                        up_guard.ack(Fd::Stdout, n).await;
                    }
                    Incoming::Eof => {
                        let _ = pipe_wr.shutdown().await;
                    }
                    Incoming::Control(Control::Exit(_)) => {
                        let _ = pipe_wr.shutdown().await;
                        // Keep the guard until the other direction is done too.
                        return;
                    }
                    Incoming::Data(..) | Incoming::Control(_) | Incoming::Closed(_) => {
                        let _ = pipe_wr.shutdown().await;
                        return;
                    }
                }
            }
        });
        // Pipe -> guest, under the agent's stdin window.
        let mut writer = StdinWriter {
            id,
            client: self.clone(),
            credit,
        };
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let _guard = guard;
            let mut buf = vec![0u8; DATA_CHUNK];
            loop {
                match pipe_rd.read(&mut buf).await {
                    Ok(0) => {
                        // Half-close; the stream lives on while the guest's
                        // side still sends (the other task holds the guard).
                        let _ = writer.finish().await;
                        return;
                    }
                    Ok(n) => {
                        if writer
                            .write(Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(theirs)
    }
}

/// Cancels a guest connection's stream once both bridging tasks are done
/// (a no-op in the guest when the stream already ended).
struct CancelGuard {
    id: u32,
    client: AgentClient,
}

impl CancelGuard {
    async fn ack(&self, fd: Fd, n: u32) {
        if let Some(i) = fd_index(fd) {
            if let Ok(mut routes) = self.client.inner.routes.lock() {
                if let Some(r) = routes.get_mut(&self.id) {
                    r.unacked[i] = r.unacked[i].saturating_sub(n);
                }
            }
        }
        let _ = self
            .client
            .send(Frame::Credit {
                stream: self.id,
                fd,
                bytes: n,
            })
            .await;
    }
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        let open = self
            .client
            .inner
            .routes
            .lock()
            .map(|r| r.contains_key(&self.id))
            .unwrap_or(false);
        self.client.close_stream(self.id);
        if open {
            let _ = self.client.inner.out.try_send(Frame::Control {
                stream: self.id,
                msg: Control::Cancel,
            });
        }
    }
}

async fn wait_hello_ack(
    reader: &mut FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec>,
    nonce: u64,
    until: Instant,
) -> Result<Option<AgentInfo>> {
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, reader.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => {
                return Err(Error::AgentUnavailable(
                    "agent socket closed during handshake".into(),
                ))
            }
            Ok(Some(Err(e))) => return Err(Error::AgentUnavailable(format!("read: {e}"))),
            Ok(Some(Ok(Frame::Control {
                stream: 0,
                msg:
                    Control::HelloAck {
                        version,
                        nonce: n,
                        agent_version,
                        boot_id,
                    },
            }))) if n == nonce => {
                return Ok(Some(AgentInfo {
                    version,
                    agent_version,
                    boot_id,
                }));
            }
            Ok(Some(Ok(_))) => {} // stale frames of an earlier session
        }
    }
}

async fn read_loop(
    mut reader: FramedRead<tokio::net::unix::OwnedReadHalf, FrameCodec>,
    inner: std::sync::Weak<Inner>,
    closed: watch::Sender<Option<String>>,
) {
    let reason = loop {
        let frame = match reader.next().await {
            None => break "agent connection closed".to_owned(),
            Some(Err(e)) => break format!("agent read error: {e}"),
            Some(Ok(f)) => f,
        };
        let Some(inner) = inner.upgrade() else { return };
        let (stream, item) = match frame {
            Frame::Control { stream, msg } => (stream, Incoming::Control(msg)),
            Frame::Data { stream, fd, data } => (stream, Incoming::Data(fd, data)),
            Frame::Eof { stream, .. } => (stream, Incoming::Eof),
            Frame::Credit {
                stream,
                fd: Fd::Stdin,
                bytes,
            } => {
                let credit = inner
                    .routes
                    .lock()
                    .ok()
                    .and_then(|r| r.get(&stream).and_then(|r| r.stdin.clone()));
                if let Some(c) = credit {
                    c.give(bytes);
                }
                continue;
            }
            Frame::Credit { .. } | Frame::Sync { .. } => continue,
            Frame::Invalid {
                stream: Some(stream),
                reason,
            } => (
                stream,
                Incoming::Control(Control::Error { message: reason }),
            ),
            Frame::Invalid {
                stream: None,
                reason,
            } => break format!("agent sent invalid data: {reason}"),
        };
        let Ok(mut routes) = inner.routes.lock() else {
            break "poisoned".to_owned();
        };
        let mut overrun = false;
        if let Some(route) = routes.get_mut(&stream) {
            if let Incoming::Data(fd, data) = &item {
                if let Some(i) = fd_index(*fd) {
                    route.unacked[i] = route.unacked[i].saturating_add(data.len() as u32);
                    overrun = route.unacked[i] > STREAM_WINDOW;
                }
            }
            let last = matches!(item, Incoming::Control(Control::Exit(_)));
            if overrun {
                let _ = route.tx.send(Incoming::Closed(
                    "guest exceeded its flow-control window".into(),
                ));
                routes.remove(&stream);
            } else if route.tx.send(item).is_err() || last {
                routes.remove(&stream);
            }
        }
        drop(routes);
        if overrun {
            let _ = inner.out.try_send(Frame::Control {
                stream,
                msg: Control::Cancel,
            });
        }
    };
    if let Some(inner) = inner.upgrade() {
        if let Ok(mut routes) = inner.routes.lock() {
            for (_, r) in routes.drain() {
                let _ = r.tx.send(Incoming::Closed(reason.clone()));
            }
        }
    }
    let _ = closed.send(Some(reason));
}

/// Output and exit of one process in the guest. Dropping it before the exit
/// event kills the process group in the guest.
pub struct ExecStream {
    id: u32,
    rx: mpsc::UnboundedReceiver<Incoming>,
    stdin: Option<StdinWriter>,
    client: AgentClient,
    finished: bool,
    deadline: Option<Instant>,
}

impl ExecStream {
    /// The writer of the process's stdin (once; `None` unless the exec was
    /// started with `stdin`).
    pub fn take_stdin(&mut self) -> Option<StdinWriter> {
        self.stdin.take()
    }

    /// A handle that resizes the process's terminal or signals it while
    /// another task reads the events.
    pub fn control(&self) -> StreamControl {
        StreamControl {
            id: self.id,
            client: self.client.clone(),
        }
    }

    /// The next event; `None` after the exit event.
    pub async fn next(&mut self) -> Option<Result<ExecEvent>> {
        if self.finished {
            return None;
        }
        loop {
            let item = match self.deadline {
                Some(d) => match tokio::time::timeout_at(d.into(), self.rx.recv()).await {
                    Ok(i) => i,
                    Err(_) => {
                        self.finished = true;
                        self.cancel();
                        return Some(Err(Error::AgentUnavailable(
                            "the guest stopped answering for this exec".into(),
                        )));
                    }
                },
                None => self.rx.recv().await,
            };
            let Some(item) = item else {
                self.finished = true;
                return Some(Err(Error::AgentUnavailable(
                    "agent connection closed".into(),
                )));
            };
            match item {
                Incoming::Data(fd, data) => {
                    let n = data.len() as u32;
                    self.ack(fd, n).await;
                    match fd {
                        Fd::Stdout => return Some(Ok(ExecEvent::Stdout(data))),
                        Fd::Stderr => return Some(Ok(ExecEvent::Stderr(data))),
                        Fd::Stdin => continue,
                    }
                }
                Incoming::Eof | Incoming::Control(Control::Started { .. }) => continue,
                Incoming::Control(Control::Exit(status)) => {
                    self.finished = true;
                    return Some(Ok(ExecEvent::Exit(status)));
                }
                Incoming::Control(Control::Error { message }) => {
                    self.finished = true;
                    return Some(Err(Error::InvalidExec(message)));
                }
                Incoming::Control(other) => {
                    tracing::debug!(?other, "ignored control message on exec stream");
                    continue;
                }
                Incoming::Closed(reason) => {
                    self.finished = true;
                    return Some(Err(Error::AgentUnavailable(reason)));
                }
            }
        }
    }

    async fn ack(&self, fd: Fd, n: u32) {
        if let Some(i) = fd_index(fd) {
            if let Ok(mut routes) = self.client.inner.routes.lock() {
                if let Some(r) = routes.get_mut(&self.id) {
                    r.unacked[i] = r.unacked[i].saturating_sub(n);
                }
            }
        }
        let _ = self
            .client
            .send(Frame::Credit {
                stream: self.id,
                fd,
                bytes: n,
            })
            .await;
    }

    fn cancel(&self) {
        self.client.close_stream(self.id);
        let _ = self.client.inner.out.try_send(Frame::Control {
            stream: self.id,
            msg: Control::Cancel,
        });
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel();
        }
    }
}

/// Out-of-band requests for a running exec (see [`ExecStream::control`]).
#[derive(Clone)]
pub struct StreamControl {
    id: u32,
    client: AgentClient,
}

impl StreamControl {
    /// New window size of the stream's terminal (no answer; a stream without
    /// a terminal ignores it).
    pub async fn resize(&self, cols: u16, rows: u16) -> Result<()> {
        if cols == 0
            || rows == 0
            || cols > crate::exec::MAX_PTY_DIMENSION
            || rows > crate::exec::MAX_PTY_DIMENSION
        {
            return Err(Error::InvalidExec(format!(
                "terminal size {cols}x{rows} is out of range 1..={}",
                crate::exec::MAX_PTY_DIMENSION
            )));
        }
        self.client
            .send(Frame::Control {
                stream: self.id,
                msg: Control::Resize { cols, rows },
            })
            .await
    }

    /// Send `signal` to the process group of the stream.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.client
            .send(Frame::Control {
                stream: self.id,
                msg: Control::Signal { signal },
            })
            .await
    }
}

/// The host's end of a process's stdin. Writes wait for the credit the
/// agent grants, so a slow process slows the writer and nothing piles up in
/// either side's memory. Dropping it without [`StdinWriter::finish`] leaves
/// stdin open (use [`StdinWriter::abort`] to kill the process instead).
pub struct StdinWriter {
    id: u32,
    client: AgentClient,
    credit: Arc<StdinCredit>,
}

impl StdinWriter {
    /// Send `data` to the process, in frames of at most [`DATA_CHUNK`] bytes.
    /// Fails once the process exited or the connection is gone.
    pub async fn write(&mut self, mut data: Bytes) -> Result<()> {
        while !data.is_empty() {
            let Some(n) = self.credit.take(data.len().min(DATA_CHUNK)).await else {
                return Err(Error::AgentUnavailable(
                    "the process no longer reads its stdin (it exited or was cancelled)".into(),
                ));
            };
            let chunk = data.split_to(n);
            self.client
                .send(Frame::Data {
                    stream: self.id,
                    fd: Fd::Stdin,
                    data: chunk,
                })
                .await?;
        }
        Ok(())
    }

    /// Close the process's stdin (it reads EOF after the bytes sent so far).
    pub async fn finish(self) -> Result<()> {
        self.client
            .send(Frame::Eof {
                stream: self.id,
                fd: Fd::Stdin,
            })
            .await
    }

    /// Kill the process (e.g. its input failed midway: a truncated file must
    /// not look like a complete one). Its exit still comes from the stream.
    pub async fn abort(self) -> Result<()> {
        self.client
            .send(Frame::Control {
                stream: self.id,
                msg: Control::Cancel,
            })
            .await
    }
}
