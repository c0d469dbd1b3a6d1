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
//! Everything read from the guest is untrusted. The reader task never waits
//! on a consumer: it checks each frame against what its stream may receive
//! and appends it to that stream's [`Inbox`], so a stream nobody reads
//! stalls only its own guest process (which runs out of credit), never the
//! other streams of the VM. What a stream may receive:
//!
//! ```text
//!  request (ping, configure, shutdown): one Ok or Error, the last message
//!  exec:    Started (once), Data/Eof on stdout and stderr, Ok/Error answers
//!           to the Signals sent, then Exit (or an Error), the last message
//!  connect: Ok or Error first; after Ok: Data/Eof on stdout, then Exit
//!  any:     output Data within the flow-control window (STREAM_WINDOW
//!           unacknowledged bytes per fd), nothing after an fd's Eof,
//!           never Data or Eof on stdin
//! ```
//!
//! Anything else is a protocol violation: the stream ends with
//! [`Error::Protocol`] for its consumer and is cancelled in the guest; after
//! [`MAX_VIOLATIONS`] the whole connection is dropped (the runtime reconnects
//! on the next request). Memory per stream is therefore bounded: at most
//! [`STREAM_WINDOW`] bytes per output fd (consecutive data of an fd is merged
//! into one buffer) plus [`MAX_QUEUED`] messages whose text is cut to
//! [`MAX_GUEST_MESSAGE`] bytes; and a VM has at most [`MAX_STREAMS`] exec
//! streams and guest connections open at once ([`Error::TooManyStreams`]
//! beyond), so one VM's agent channel holds at most about
//! `MAX_STREAMS * 2 * STREAM_WINDOW` = 32 MiB of guest output.

use crate::error::{Error, Result};
use crate::exec::ExecEvent;
use bytes::{Bytes, BytesMut};
pub use fastvm_agent_proto::PtySpec;
use fastvm_agent_proto::{
    Control, ExecSpec, Fd, Frame, FrameCodec, GuestConfig, CONNECT_PROTOCOL_VERSION, DATA_CHUNK,
    MAX_CONNECT_HOST, MIN_PROTOCOL_VERSION, MOUNT_PROTOCOL_VERSION, PROTOCOL_VERSION,
    PTY_PROTOCOL_VERSION, STREAM_WINDOW, UNMOUNT_BUSY,
};
use futures::{SinkExt, StreamExt};
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::codec::{FramedRead, FramedWrite};

/// Most exec streams and guest connections one VM may have open at once
/// (requests such as ping and configure are not counted).
pub const MAX_STREAMS: usize = 64;
/// Protocol violations after which the agent connection is dropped.
pub const MAX_VIOLATIONS: u32 = 16;
/// Most messages a stream's inbox holds; the per-stream rules keep a
/// well-behaved or hostile guest below it (at most 6 for an exec), so
/// reaching it is itself a violation.
pub const MAX_QUEUED: usize = 8;
/// Longest text kept from a guest's error message (the rest is cut).
pub const MAX_GUEST_MESSAGE: usize = 4096;

/// What the agent said about itself at connect.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub version: u32,
    pub agent_version: String,
    pub boot_id: String,
}

/// What a stream's consumer receives.
// A `Control` is large (a guest config with its network and exec defaults) and
// rare next to data frames; boxing it would cost an allocation per control frame.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum Incoming {
    Control(Control),
    Data(Fd, Bytes),
    /// An output fd ended.
    Eof,
    /// The connection is gone.
    Closed(String),
    /// The guest broke the protocol on this stream; the last item.
    Violation(String),
}

/// What the guest sent on a stream, before it is admitted.
// A `Control` is large (a guest config with its network and exec defaults) and
// rare next to data frames; boxing it would cost an allocation per control frame.
#[allow(clippy::large_enum_variant)]
enum FromGuest {
    Control(Control),
    Data(Fd, Bytes),
    Eof(Fd),
    /// A frame of this stream the codec could not read (bad JSON).
    Invalid(String),
}

/// One item of an [`Inbox`]; output data is owned by the inbox (copied out
/// of the reader's buffer) so small frames pin no larger allocation.
// A `Control` is large (a guest config with its network and exec defaults) and
// rare next to data frames; boxing it would cost an allocation per control frame.
#[allow(clippy::large_enum_variant)]
enum Queued {
    Data(Fd, BytesMut),
    Other(Incoming),
}

#[derive(Default)]
struct InboxState {
    items: VecDeque<Queued>,
    /// Bytes of output data held.
    bytes: usize,
    /// No more items will come (the route is gone).
    done: bool,
}

/// A stream's queue from the reader task to its consumer. Pushing never
/// waits; its size is bounded by the route's rules (see the module docs).
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    notify: Notify,
}

impl Inbox {
    /// Append output data, merged into the last data of the same fd when
    /// only data follows it (stdout and stderr are separate pipes in the
    /// guest: their relative order carries no meaning). False when the
    /// inbox is full.
    fn push_data(&self, fd: Fd, data: &[u8]) -> bool {
        let Ok(mut guard) = self.state.lock() else {
            return false;
        };
        let st = &mut *guard;
        let mut merged = false;
        for item in st.items.iter_mut().rev() {
            match item {
                Queued::Data(f, buf) if *f == fd => {
                    buf.extend_from_slice(data);
                    merged = true;
                    break;
                }
                Queued::Data(..) => continue,
                Queued::Other(_) => break,
            }
        }
        if !merged {
            if st.items.len() >= MAX_QUEUED {
                return false;
            }
            st.items.push_back(Queued::Data(fd, BytesMut::from(data)));
        }
        st.bytes += data.len();
        drop(guard);
        self.notify.notify_one();
        true
    }

    /// Append a message; `force` for the last item of a stream (closed,
    /// violation), which may exceed [`MAX_QUEUED`] by one. False when full.
    fn push(&self, item: Incoming, force: bool) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        if !force && st.items.len() >= MAX_QUEUED {
            return false;
        }
        st.items.push_back(Queued::Other(item));
        drop(st);
        self.notify.notify_one();
        true
    }

    /// No more items will come: the consumer's `recv` returns `None` once
    /// it took what is queued.
    fn finish(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.done = true;
        }
        self.notify.notify_one();
    }

    fn try_recv(&self) -> std::result::Result<Incoming, bool> {
        let Ok(mut st) = self.state.lock() else {
            return Err(true);
        };
        match st.items.pop_front() {
            Some(Queued::Data(fd, buf)) => {
                st.bytes -= buf.len();
                Ok(Incoming::Data(fd, buf.freeze()))
            }
            Some(Queued::Other(item)) => Ok(item),
            None => Err(st.done),
        }
    }

    /// The next item; `None` once the route is gone and the queue drained.
    async fn recv(&self) -> Option<Incoming> {
        loop {
            let notified = self.notify.notified();
            match self.try_recv() {
                Ok(item) => return Some(item),
                Err(true) => return None,
                Err(false) => notified.await,
            }
        }
    }

    /// Items and data bytes held.
    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        self.state
            .lock()
            .map(|s| (s.items.len(), s.bytes))
            .unwrap_or_default()
    }
}

/// The consumer's end of a stream: its inbox and, for an exec or a guest
/// connection, its place among the VM's [`MAX_STREAMS`].
struct Receiver {
    inbox: Arc<Inbox>,
    _slot: Option<Slot>,
}

impl Receiver {
    async fn recv(&mut self) -> Option<Incoming> {
        self.inbox.recv().await
    }
}

/// One of a VM's [`MAX_STREAMS`] places; given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(open: &Arc<AtomicUsize>) -> Option<Slot> {
        open.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < MAX_STREAMS).then_some(n + 1)
        })
        .ok()?;
        Some(Slot(open.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a stream was opened for: it decides what the guest may send on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Request,
    Exec,
    Connect,
}

/// What to do with a frame from the guest.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Queue it; `last`: the stream ends with it.
    Deliver { last: bool },
    /// Expected, but nothing for the consumer (Started, answers to signals).
    Drop,
    /// Cut the stream.
    Violation(String),
}

struct Route {
    inbox: Arc<Inbox>,
    kind: Kind,
    /// Bytes received and not yet credited back, per output fd.
    unacked: [u32; 2],
    /// Eof received, per output fd.
    eof: [bool; 2],
    /// Exec: Started received. Connect: Ok received.
    started: bool,
    /// Answers (Ok or Error) owed for the Signals sent on this stream.
    owed_answers: u32,
    /// Send window of the stream's stdin, when it has one.
    stdin: Option<Arc<StdinCredit>>,
}

impl Drop for Route {
    /// A removed route (exit, cancel, violation, connection loss) ends its
    /// inbox and wakes a writer waiting for stdin credit that will never come.
    fn drop(&mut self) {
        self.inbox.finish();
        if let Some(c) = &self.stdin {
            c.close();
        }
    }
}

impl Route {
    fn new(kind: Kind, stdin: Option<Arc<StdinCredit>>) -> (Route, Arc<Inbox>) {
        let inbox = Arc::new(Inbox::default());
        let route = Route {
            inbox: inbox.clone(),
            kind,
            unacked: [0, 0],
            eof: [false, false],
            started: false,
            owed_answers: 0,
            stdin,
        };
        (route, inbox)
    }

    /// Check what the guest sent against what this stream may receive (see
    /// the module docs), updating the stream's state.
    fn admit(&mut self, item: &FromGuest) -> Verdict {
        use Verdict::{Deliver, Drop, Violation};
        let kind = self.kind;
        match item {
            FromGuest::Invalid(reason) => Violation(format!("unreadable message: {reason}")),
            FromGuest::Data(Fd::Stdin, _) | FromGuest::Eof(Fd::Stdin) => {
                Violation("the guest sent on the stdin of a stream".into())
            }
            FromGuest::Data(fd, data) => {
                let i = output_index(*fd);
                if kind == Kind::Request
                    || (kind == Kind::Connect && (!self.started || *fd == Fd::Stderr))
                {
                    return Violation(format!("unexpected {fd:?} data on a {kind:?} stream"));
                }
                if self.eof[i] {
                    return Violation(format!("{fd:?} data after its end"));
                }
                let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
                self.unacked[i] = self.unacked[i].saturating_add(len);
                if self.unacked[i] > STREAM_WINDOW {
                    return Violation("the guest exceeded its flow-control window".into());
                }
                Deliver { last: false }
            }
            FromGuest::Eof(fd) => {
                let i = output_index(*fd);
                if kind == Kind::Request
                    || (kind == Kind::Connect && (!self.started || *fd == Fd::Stderr))
                    || self.eof[i]
                {
                    return Violation(format!("unexpected end of {fd:?}"));
                }
                self.eof[i] = true;
                Deliver { last: false }
            }
            FromGuest::Control(msg) => match (kind, msg) {
                (Kind::Request, Control::Ok | Control::Error { .. }) => Deliver { last: true },
                (Kind::Exec, Control::Started { .. }) if !self.started => {
                    self.started = true;
                    Drop
                }
                (Kind::Exec, Control::Ok | Control::Error { .. }) if self.owed_answers > 0 => {
                    self.owed_answers -= 1;
                    Drop
                }
                (Kind::Exec, Control::Exit(_) | Control::Error { .. }) => Deliver { last: true },
                (Kind::Connect, Control::Ok) if !self.started => {
                    self.started = true;
                    Deliver { last: false }
                }
                (Kind::Connect, Control::Error { .. }) => Deliver { last: true },
                (Kind::Connect, Control::Exit(_)) if self.started => Deliver { last: true },
                (_, other) => Violation(format!(
                    "unexpected {} message on a {kind:?} stream",
                    control_name(other)
                )),
            },
        }
    }
}

/// The name of a control message, for errors (without its contents).
fn control_name(msg: &Control) -> String {
    serde_json::to_value(msg)
        .ok()
        .and_then(|v| v.get("type").and_then(|t| t.as_str().map(str::to_owned)))
        .unwrap_or_else(|| "unknown".into())
}

/// Cut a text from the guest to [`MAX_GUEST_MESSAGE`] bytes.
fn cut(s: &mut String) {
    if s.len() > MAX_GUEST_MESSAGE {
        let mut end = MAX_GUEST_MESSAGE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Cut the guest's free text in a message to [`MAX_GUEST_MESSAGE`] bytes.
fn bound_message(mut msg: Control) -> Control {
    match &mut msg {
        Control::Error { message } => cut(message),
        Control::Exit(status) => {
            if let Some(e) = status.error.as_mut() {
                cut(e);
            }
        }
        _ => {}
    }
    msg
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
    /// Exec streams and guest connections open (see [`MAX_STREAMS`]).
    open: Arc<AtomicUsize>,
    closed: watch::Receiver<Option<String>>,
    info: AgentInfo,
}

impl Inner {
    /// Route one frame of the guest to its stream. True when it broke the
    /// protocol (the stream is then cut and cancelled in the guest).
    fn route(&self, stream: u32, item: FromGuest) -> bool {
        let Ok(mut routes) = self.routes.lock() else {
            return false;
        };
        // Frames of a stream that ended (or never was) are dropped: the
        // guest may still be sending when a cancel crosses its output.
        let Some(route) = routes.get_mut(&stream) else {
            return false;
        };
        let verdict = route.admit(&item);
        let fault = match verdict {
            Verdict::Drop => return false,
            Verdict::Violation(why) => why,
            Verdict::Deliver { last } => {
                let pushed = match item {
                    FromGuest::Data(fd, data) => route.inbox.push_data(fd, &data),
                    FromGuest::Eof(_) => route.inbox.push(Incoming::Eof, false),
                    FromGuest::Control(msg) => route.inbox.push(Incoming::Control(msg), last),
                    FromGuest::Invalid(_) => false,
                };
                if pushed {
                    if last {
                        routes.remove(&stream);
                    }
                    return false;
                }
                "the guest sent more messages than the stream holds".to_owned()
            }
        };
        tracing::warn!(stream, error = %fault, "guest agent protocol violation; stream cut");
        if let Some(route) = routes.remove(&stream) {
            route.inbox.push(
                Incoming::Violation(format!("guest agent protocol violation: {fault}")),
                true,
            );
        }
        drop(routes);
        let _ = self.out.try_send(Frame::Control {
            stream,
            msg: Control::Cancel,
        });
        true
    }

    /// Output bytes the consumer took: the guest may send that many more.
    async fn ack(&self, id: u32, fd: Fd, n: u32) {
        if let Ok(mut routes) = self.routes.lock() {
            if let Some(r) = routes.get_mut(&id) {
                let i = output_index(fd);
                r.unacked[i] = r.unacked[i].saturating_sub(n);
            }
        }
        let _ = self
            .out
            .send(Frame::Credit {
                stream: id,
                fd,
                bytes: n,
            })
            .await;
    }
}

#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

/// Index of an output fd in a route's per-fd state (stdin, which the
/// admission rules refuse first, shares stdout's).
fn output_index(fd: Fd) -> usize {
    match fd {
        Fd::Stderr => 1,
        Fd::Stdout | Fd::Stdin => 0,
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
            open: Arc::new(AtomicUsize::new(0)),
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

    fn open_stream(&self, kind: Kind, stdin: Option<Arc<StdinCredit>>) -> Result<(u32, Receiver)> {
        if let Some(reason) = self.closed_reason() {
            return Err(Error::AgentUnavailable(reason));
        }
        let slot = match kind {
            Kind::Request => None,
            Kind::Exec | Kind::Connect => Some(Slot::take(&self.inner.open).ok_or_else(|| {
                Error::TooManyStreams(format!(
                    "this VM already has {MAX_STREAMS} execs and guest connections open, the most it may have; wait for one to end"
                ))
            })?),
        };
        let id = self.inner.next_stream.fetch_add(1, Ordering::Relaxed);
        let (route, inbox) = Route::new(kind, stdin);
        self.inner
            .routes
            .lock()
            .map_err(|_| Error::Protocol("poisoned".into()))?
            .insert(id, route);
        Ok((id, Receiver { inbox, _slot: slot }))
    }

    /// Exec streams and guest connections open now.
    pub fn open_streams(&self) -> usize {
        self.inner.open.load(Ordering::SeqCst)
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
        self.request_answer(msg, timeout)
            .await?
            .map_err(|message| Error::Protocol(format!("agent refused: {message}")))
    }

    /// Like [`AgentClient::request`], with the agent's refusal (its `Error`
    /// message) as the inner `Err`.
    async fn request_answer(
        &self,
        msg: Control,
        timeout: Duration,
    ) -> Result<std::result::Result<(), String>> {
        let (id, mut rx) = self.open_stream(Kind::Request, None)?;
        let result = async {
            self.send(Frame::Control { stream: id, msg }).await?;
            match tokio::time::timeout(timeout, rx.recv()).await {
                Err(_) => Err(Error::AgentUnavailable(format!(
                    "no answer within {timeout:?}"
                ))),
                Ok(None) => Err(Error::AgentUnavailable("connection closed".into())),
                Ok(Some(Incoming::Control(Control::Ok))) => Ok(Ok(())),
                Ok(Some(Incoming::Control(Control::Error { message }))) => Ok(Err(message)),
                Ok(Some(Incoming::Closed(reason))) => Err(Error::AgentUnavailable(reason)),
                Ok(Some(Incoming::Violation(reason))) => Err(Error::Protocol(reason)),
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

    /// Mount `source` at `target` in the guest (see [`Control::Mount`]).
    pub async fn mount(
        &self,
        source: &str,
        target: &str,
        fstype: &str,
        options: &str,
        read_only: bool,
    ) -> Result<()> {
        self.mount_supported()?;
        let msg = Control::Mount {
            source: source.to_owned(),
            target: target.to_owned(),
            fstype: fstype.to_owned(),
            options: options.to_owned(),
            read_only,
        };
        self.request_answer(msg, MOUNT_TIMEOUT)
            .await?
            .map_err(|m| Error::Volume(format!("the guest could not mount it: {m}")))
    }

    /// Unmount `target` in the guest. In use: detached lazily (the processes
    /// using it keep it until they let go) and `Ok(Some(why))`.
    pub async fn unmount(&self, target: &str) -> Result<Option<String>> {
        self.mount_supported()?;
        let first = Control::Unmount {
            target: target.to_owned(),
            lazy: false,
        };
        match self.request_answer(first, MOUNT_TIMEOUT).await? {
            Ok(()) => Ok(None),
            Err(m) if m.starts_with(UNMOUNT_BUSY) => {
                let lazy = Control::Unmount {
                    target: target.to_owned(),
                    lazy: true,
                };
                self.request_answer(lazy, MOUNT_TIMEOUT)
                    .await?
                    .map_err(|m| Error::Volume(format!("the guest could not unmount it: {m}")))?;
                Ok(Some(m[UNMOUNT_BUSY.len()..].trim().to_owned()))
            }
            Err(m) => Err(Error::Volume(format!(
                "the guest could not unmount it: {m}"
            ))),
        }
    }

    /// Detach the mount at `target` at once (`umount -l`), in use or not.
    pub async fn unmount_lazy(&self, target: &str) -> Result<()> {
        self.mount_supported()?;
        let msg = Control::Unmount {
            target: target.to_owned(),
            lazy: true,
        };
        self.request_answer(msg, MOUNT_TIMEOUT)
            .await?
            .map_err(|m| Error::Volume(format!("the guest could not unmount it: {m}")))
    }

    fn mount_supported(&self) -> Result<()> {
        if self.inner.info.version < MOUNT_PROTOCOL_VERSION {
            return Err(Error::Volume(format!(
                "the agent in this VM speaks protocol v{} and cannot mount volumes (v{MOUNT_PROTOCOL_VERSION} can); a VM launched from a current image can",
                self.inner.info.version
            )));
        }
        Ok(())
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
        let (id, rx) = self.open_stream(Kind::Exec, credit.clone())?;
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

/// How long the guest may take to mount or unmount a volume (an NFS mount
/// that cannot reach its server gives up well before).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);

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
        let (id, mut rx) = self.open_stream(Kind::Connect, Some(credit.clone()))?;
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
            Ok(Some(Incoming::Violation(reason))) => return Err(Error::Protocol(reason)),
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
                    Incoming::Data(..)
                    | Incoming::Control(_)
                    | Incoming::Closed(_)
                    | Incoming::Violation(_) => {
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
        self.client.inner.ack(self.id, fd, n).await;
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
    let mut violations = 0u32;
    let reason = loop {
        let frame = match reader.next().await {
            None => break "agent connection closed".to_owned(),
            Some(Err(e)) => break format!("agent read error: {e}"),
            Some(Ok(f)) => f,
        };
        let Some(inner) = inner.upgrade() else { return };
        let (stream, item) = match frame {
            Frame::Control { stream, msg } => (stream, FromGuest::Control(bound_message(msg))),
            Frame::Data { stream, fd, data } => (stream, FromGuest::Data(fd, data)),
            Frame::Eof { stream, fd } => (stream, FromGuest::Eof(fd)),
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
                mut reason,
            } => {
                cut(&mut reason);
                (stream, FromGuest::Invalid(reason))
            }
            Frame::Invalid {
                stream: None,
                reason,
            } => break format!("agent sent invalid data: {reason}"),
        };
        if inner.route(stream, item) {
            violations += 1;
            if violations >= MAX_VIOLATIONS {
                break format!(
                    "guest agent protocol violation: {violations} broken streams; connection dropped"
                );
            }
        }
    };
    if let Some(inner) = inner.upgrade() {
        if let Ok(mut routes) = inner.routes.lock() {
            for (_, r) in routes.drain() {
                r.inbox.push(Incoming::Closed(reason.clone()), true);
            }
        }
    }
    let _ = closed.send(Some(reason));
}

/// Output and exit of one process in the guest. Dropping it before the exit
/// event kills the process group in the guest.
pub struct ExecStream {
    id: u32,
    rx: Receiver,
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
                    let n = u32::try_from(data.len()).unwrap_or(u32::MAX);
                    self.client.inner.ack(self.id, fd, n).await;
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
                Incoming::Violation(reason) => {
                    self.finished = true;
                    return Some(Err(Error::Protocol(reason)));
                }
            }
        }
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
        // The agent answers Ok or Error on the stream: expect it.
        if let Ok(mut routes) = self.client.inner.routes.lock() {
            if let Some(r) = routes.get_mut(&self.id) {
                r.owed_answers = r.owed_answers.saturating_add(1);
            }
        }
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

#[cfg(test)]
mod tests {
    //! The host side against a fake agent on a unix socket that sends what
    //! a hostile guest would.
    use super::*;
    use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
    use tokio::net::UnixListener;

    struct FakeAgent {
        rd: FramedRead<OwnedReadHalf, FrameCodec>,
        wr: FramedWrite<OwnedWriteHalf, FrameCodec>,
        /// Frames from the host seen while waiting for something else.
        seen: Vec<Frame>,
    }

    impl FakeAgent {
        async fn send(&mut self, f: Frame) {
            self.wr.send(f).await.expect("send to host");
        }

        async fn data(&mut self, stream: u32, fd: Fd, bytes: &[u8]) {
            self.send(Frame::Data {
                stream,
                fd,
                data: Bytes::copy_from_slice(bytes),
            })
            .await;
        }

        async fn control(&mut self, stream: u32, msg: Control) {
            self.send(Frame::Control { stream, msg }).await;
        }

        /// Read host frames until one matches `want`.
        async fn wait_for(&mut self, want: impl Fn(&Frame) -> bool) -> Frame {
            loop {
                let f = tokio::time::timeout(Duration::from_secs(10), self.rd.next())
                    .await
                    .expect("a frame from the host")
                    .expect("host connection open")
                    .expect("a valid frame");
                if want(&f) {
                    return f;
                }
                self.seen.push(f);
            }
        }

        /// The stream id of the next Exec.
        async fn exec(&mut self) -> u32 {
            match self
                .wait_for(|f| {
                    matches!(
                        f,
                        Frame::Control {
                            msg: Control::Exec(_),
                            ..
                        }
                    )
                })
                .await
            {
                Frame::Control { stream, .. } => stream,
                _ => unreachable!(),
            }
        }

        /// Wait for the host's Cancel of stream `id` (it may come after
        /// frames the fake already answered).
        async fn cancelled(&mut self, id: u32) -> bool {
            let is_cancel = |f: &Frame| matches!(f, Frame::Control { stream, msg: Control::Cancel } if *stream == id);
            if !self.seen.iter().any(is_cancel) {
                let f = self.wait_for(is_cancel).await;
                self.seen.push(f);
            }
            true
        }

        fn credited(&self, id: u32, fd: Fd) -> u64 {
            self.seen
                .iter()
                .map(|f| match f {
                    Frame::Credit {
                        stream,
                        fd: f,
                        bytes,
                    } if *stream == id && *f == fd => u64::from(*bytes),
                    _ => 0,
                })
                .sum()
        }
    }

    async fn pair() -> (AgentClient, FakeAgent, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let agent = tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, w) = s.into_split();
            let mut fake = FakeAgent {
                rd: FramedRead::new(r, FrameCodec::new()),
                wr: FramedWrite::new(w, FrameCodec::new()),
                seen: Vec::new(),
            };
            let hello = fake
                .wait_for(|f| {
                    matches!(
                        f,
                        Frame::Control {
                            msg: Control::Hello { .. },
                            ..
                        }
                    )
                })
                .await;
            let Frame::Control {
                msg: Control::Hello { nonce, .. },
                ..
            } = hello
            else {
                unreachable!()
            };
            fake.send(Frame::Sync { nonce }).await;
            fake.control(
                0,
                Control::HelloAck {
                    version: PROTOCOL_VERSION,
                    nonce,
                    agent_version: "fake".into(),
                    boot_id: "boot".into(),
                },
            )
            .await;
            fake.seen.clear();
            fake
        });
        let client = AgentClient::connect(&path, Duration::from_secs(10))
            .await
            .expect("connect");
        let fake = agent.await.expect("fake agent");
        (client, fake, dir)
    }

    /// Wait until the host routed everything the fake sent so far: a ping
    /// answered after those frames comes back after them.
    async fn sync(client: &AgentClient, fake: &mut FakeAgent) {
        let c = client.clone();
        let ping = tokio::spawn(async move { c.ping().await });
        let f = fake
            .wait_for(|f| {
                matches!(
                    f,
                    Frame::Control {
                        msg: Control::Ping,
                        ..
                    }
                )
            })
            .await;
        let Frame::Control { stream, .. } = f else {
            unreachable!()
        };
        fake.control(stream, Control::Ok).await;
        ping.await.expect("ping task").expect("ping answered");
    }

    fn exit(code: i32) -> Control {
        Control::Exit(fastvm_agent_proto::ExitStatus {
            code,
            signal: None,
            timed_out: false,
            duration_ms: 1,
            error: None,
        })
    }

    async fn start(client: &AgentClient, fake: &mut FakeAgent) -> (ExecStream, u32) {
        let stream = client
            .exec(ExecSpec {
                argv: vec!["true".into()],
                env: Default::default(),
                cwd: None,
                timeout_ms: None,
                stdin: false,
                pty: None,
            })
            .await
            .expect("exec");
        let id = fake.exec().await;
        fake.control(id, Control::Started { pid: 7 }).await;
        (stream, id)
    }

    fn routed(client: &AgentClient, id: u32) -> bool {
        client
            .inner
            .routes
            .lock()
            .map(|r| r.contains_key(&id))
            .unwrap_or(false)
    }

    async fn expect_violation(stream: &mut ExecStream, what: &str) {
        match stream.next().await {
            Some(Err(Error::Protocol(m))) => assert!(m.contains(what), "{m}"),
            other => panic!("expected a protocol violation ({what}), got {other:?}"),
        }
        assert!(stream.next().await.is_none(), "the stream ends");
    }

    #[tokio::test]
    async fn guest_stdin_data_cuts_the_stream() {
        let (client, mut fake, _dir) = pair().await;
        let (mut stream, id) = start(&client, &mut fake).await;
        fake.data(id, Fd::Stdout, b"fine").await;
        fake.data(id, Fd::Stdin, &[0u8; 1 << 16]).await;
        sync(&client, &mut fake).await;
        assert!(!routed(&client, id), "the route is gone");
        assert!(
            fake.cancelled(id).await,
            "the process is cancelled in the guest"
        );
        // What came before the violation is still delivered, then the error.
        assert!(matches!(stream.next().await, Some(Ok(ExecEvent::Stdout(d))) if &d[..] == b"fine"));
        expect_violation(&mut stream, "stdin").await;
        // Further frames of the cut stream go nowhere; the connection lives.
        fake.data(id, Fd::Stdin, &[0u8; 1 << 16]).await;
        sync(&client, &mut fake).await;
        assert!(client.closed_reason().is_none());
    }

    #[tokio::test]
    async fn extra_control_messages_cut_the_stream() {
        let (client, mut fake, _dir) = pair().await;
        // A second Started.
        let (mut a, ida) = start(&client, &mut fake).await;
        fake.control(ida, Control::Started { pid: 8 }).await;
        // A host-only message from the guest.
        let (mut b, idb) = start(&client, &mut fake).await;
        fake.control(idb, Control::Ping).await;
        // An Ok nobody asked for.
        let (mut c, idc) = start(&client, &mut fake).await;
        fake.control(idc, Control::Ok).await;
        // Eof twice.
        let (mut d, idd) = start(&client, &mut fake).await;
        fake.send(Frame::Eof {
            stream: idd,
            fd: Fd::Stdout,
        })
        .await;
        fake.send(Frame::Eof {
            stream: idd,
            fd: Fd::Stdout,
        })
        .await;
        sync(&client, &mut fake).await;
        expect_violation(&mut a, "started").await;
        expect_violation(&mut b, "ping").await;
        expect_violation(&mut c, "ok").await;
        expect_violation(&mut d, "end of Stdout").await;
        for id in [ida, idb, idc, idd] {
            assert!(!routed(&client, id));
            assert!(fake.cancelled(id).await);
        }
        assert!(
            client.closed_reason().is_none(),
            "4 violations keep the connection"
        );
    }

    #[tokio::test]
    async fn answers_to_signals_are_expected() {
        let (client, mut fake, _dir) = pair().await;
        let (mut s, id) = start(&client, &mut fake).await;
        let control = s.control();
        control.signal(15).await.expect("signal");
        control.signal(9).await.expect("signal");
        fake.control(id, Control::Ok).await;
        fake.control(
            id,
            Control::Error {
                message: "no such process".into(),
            },
        )
        .await;
        fake.data(id, Fd::Stderr, b"bye").await;
        fake.control(id, exit(0)).await;
        assert!(matches!(s.next().await, Some(Ok(ExecEvent::Stderr(d))) if &d[..] == b"bye"));
        assert!(matches!(s.next().await, Some(Ok(ExecEvent::Exit(e))) if e.code == 0));
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn exceeding_credit_cuts_the_stream_and_holds_at_most_the_window() {
        let (client, mut fake, _dir) = pair().await;
        let (mut s, id) = start(&client, &mut fake).await;
        // The whole window, in frames the consumer does not read: it is all
        // held, in one merged buffer.
        let chunk = vec![b'o'; DATA_CHUNK];
        for _ in 0..(STREAM_WINDOW as usize / DATA_CHUNK) {
            fake.data(id, Fd::Stdout, &chunk).await;
        }
        sync(&client, &mut fake).await;
        assert_eq!(s.rx.inbox.len(), (1, STREAM_WINDOW as usize));
        assert!(routed(&client, id));
        // One byte past the window: cut, nothing more held.
        fake.data(id, Fd::Stdout, b"!").await;
        sync(&client, &mut fake).await;
        assert!(!routed(&client, id));
        assert!(fake.cancelled(id).await);
        assert_eq!(s.rx.inbox.len(), (2, STREAM_WINDOW as usize));
        let Some(Ok(ExecEvent::Stdout(all))) = s.next().await else {
            panic!("the window's bytes first")
        };
        assert_eq!(all.len(), STREAM_WINDOW as usize);
        expect_violation(&mut s, "window").await;
    }

    #[tokio::test]
    async fn consumed_output_is_credited_back_and_keeps_flowing() {
        let (client, mut fake, _dir) = pair().await;
        let (mut s, id) = start(&client, &mut fake).await;
        // Eight windows through one stream: the guest sends only what it
        // was credited.
        let chunk = vec![b'o'; DATA_CHUNK];
        let mut sent = 0u64;
        let mut got = 0u64;
        while sent < 8 * u64::from(STREAM_WINDOW) {
            let credit = u64::from(STREAM_WINDOW) + fake.credited(id, Fd::Stdout);
            while sent < credit {
                fake.data(id, Fd::Stdout, &chunk).await;
                sent += DATA_CHUNK as u64;
            }
            while got < sent {
                let Some(Ok(ExecEvent::Stdout(d))) = s.next().await else {
                    panic!("output")
                };
                got += d.len() as u64;
            }
            sync(&client, &mut fake).await;
        }
        assert_eq!(fake.credited(id, Fd::Stdout), sent);
        fake.control(id, exit(0)).await;
        assert!(matches!(s.next().await, Some(Ok(ExecEvent::Exit(_)))));
    }

    #[tokio::test]
    async fn an_unread_stream_does_not_stall_another_of_the_same_vm() {
        let (client, mut fake, _dir) = pair().await;
        let (stuck, ids) = start(&client, &mut fake).await;
        let (mut live, idl) = start(&client, &mut fake).await;
        let chunk = vec![b's'; DATA_CHUNK];
        for _ in 0..(STREAM_WINDOW as usize / DATA_CHUNK) {
            fake.data(ids, Fd::Stdout, &chunk).await;
        }
        // The other stream moves 16 windows while the first is full.
        let mut moved = 0u64;
        for round in 0..(16 * STREAM_WINDOW as usize / DATA_CHUNK) {
            fake.data(idl, Fd::Stdout, &chunk).await;
            let Some(Ok(ExecEvent::Stdout(d))) = live.next().await else {
                panic!("output of the live stream in round {round}")
            };
            moved += d.len() as u64;
            // Its credit comes back (waiting for it also proves the writer
            // task is not stuck behind the full stream).
            let want = moved;
            let mut credited = fake.credited(idl, Fd::Stdout);
            while credited < want {
                let f = fake
                    .wait_for(|f| matches!(f, Frame::Credit { stream, .. } if *stream == idl))
                    .await;
                fake.seen.push(f);
                credited = fake.credited(idl, Fd::Stdout);
            }
        }
        fake.control(idl, exit(0)).await;
        assert!(matches!(live.next().await, Some(Ok(ExecEvent::Exit(_)))));
        assert_eq!(moved, 16 * u64::from(STREAM_WINDOW));
        // The unread one holds its window and no more, and is still open.
        assert_eq!(stuck.rx.inbox.len(), (1, STREAM_WINDOW as usize));
        assert!(routed(&client, ids));
        assert_eq!(fake.credited(ids, Fd::Stdout), 0);
    }

    #[tokio::test]
    async fn small_frames_of_both_outputs_are_merged() {
        let (client, mut fake, _dir) = pair().await;
        let (mut s, id) = start(&client, &mut fake).await;
        for i in 0..5000 {
            let fd = if i % 2 == 0 { Fd::Stdout } else { Fd::Stderr };
            fake.data(id, fd, b"x").await;
        }
        sync(&client, &mut fake).await;
        assert_eq!(s.rx.inbox.len(), (2, 5000));
        fake.send(Frame::Eof {
            stream: id,
            fd: Fd::Stdout,
        })
        .await;
        fake.data(id, Fd::Stderr, b"yz").await;
        fake.control(id, exit(3)).await;
        sync(&client, &mut fake).await;
        // Data after the Eof cannot join the stderr before it: 5 items.
        assert_eq!(s.rx.inbox.len(), (5, 5002));
        let mut out = 0;
        let mut err = 0;
        loop {
            match s.next().await {
                Some(Ok(ExecEvent::Stdout(d))) => out += d.len(),
                Some(Ok(ExecEvent::Stderr(d))) => err += d.len(),
                Some(Ok(ExecEvent::Exit(e))) => {
                    assert_eq!(e.code, 3);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!((out, err), (2500, 2502));
    }

    #[tokio::test]
    async fn guest_text_is_cut() {
        let (client, mut fake, _dir) = pair().await;
        let (mut s, id) = start(&client, &mut fake).await;
        let mut status = fastvm_agent_proto::ExitStatus {
            code: 1,
            signal: None,
            timed_out: false,
            duration_ms: 1,
            error: Some("é".repeat(100_000)),
        };
        fake.control(id, Control::Exit(status.clone())).await;
        let Some(Ok(ExecEvent::Exit(got))) = s.next().await else {
            panic!("exit")
        };
        let error = got.error.expect("error text");
        assert!(error.len() <= MAX_GUEST_MESSAGE && error.len() > MAX_GUEST_MESSAGE - 2);
        status.error = Some(error);
        assert_eq!(got.code, status.code);
    }

    #[tokio::test]
    async fn too_many_streams_are_refused_until_one_ends() {
        let (client, mut fake, _dir) = pair().await;
        let mut streams = Vec::new();
        for _ in 0..MAX_STREAMS {
            streams.push(start(&client, &mut fake).await);
        }
        assert_eq!(client.open_streams(), MAX_STREAMS);
        let spec = ExecSpec {
            argv: vec!["true".into()],
            env: Default::default(),
            cwd: None,
            timeout_ms: None,
            stdin: false,
            pty: None,
        };
        match client.exec(spec.clone()).await {
            Err(Error::TooManyStreams(m)) => assert!(m.contains("64"), "{m}"),
            Err(e) => panic!("expected TooManyStreams, got {e}"),
            Ok(_) => panic!("expected TooManyStreams, got a stream"),
        }
        assert!(matches!(
            client.connect_tcp("127.0.0.1", 80).await,
            Err(Error::TooManyStreams(_))
        ));
        // Requests are not counted.
        sync(&client, &mut fake).await;
        // One ends (its exit is read): a new one fits.
        let (mut s, id) = streams.pop().expect("a stream");
        fake.control(id, exit(0)).await;
        assert!(matches!(s.next().await, Some(Ok(ExecEvent::Exit(_)))));
        drop(s);
        assert_eq!(client.open_streams(), MAX_STREAMS - 1);
        assert!(client.exec(spec).await.is_ok());
    }

    #[tokio::test]
    async fn repeated_violations_drop_the_connection() {
        let (client, mut fake, _dir) = pair().await;
        let mut streams = Vec::new();
        for _ in 0..MAX_VIOLATIONS {
            streams.push(start(&client, &mut fake).await);
        }
        let (mut bystander, _) = start(&client, &mut fake).await;
        for (_, id) in &streams {
            fake.data(*id, Fd::Stdin, b"nope").await;
        }
        match bystander.next().await {
            Some(Err(Error::AgentUnavailable(m))) => assert!(m.contains("violation"), "{m}"),
            other => panic!("expected the connection to drop, got {other:?}"),
        }
        assert!(client
            .closed_reason()
            .is_some_and(|r| r.contains("connection dropped")));
        assert!(matches!(
            client.ping().await,
            Err(Error::AgentUnavailable(_))
        ));
    }
}
