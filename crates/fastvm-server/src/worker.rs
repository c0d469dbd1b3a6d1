//! The control plane's view of a VM host: the [`Worker`] trait.
//!
//! Placement and lifecycle logic talk to workers only through this trait, never
//! to QEMU. Today there is one implementation, [`LocalWorker`], over the
//! in-process [`fastvm_worker::Runtime`] (single-host mode); remote workers
//! (HTTP) will implement the same trait.
//!
//! Workers know nothing of orgs, names or API statuses: they run VM processes
//! by id and report each one's [`VmState`], and keep snapshots (memory,
//! device state and frozen disk layers) by id. A snapshot lives on the worker
//! that captured it; VMs restored from it run there too.

use async_trait::async_trait;
use fastvm_types::{FirewallPolicy, SnapshotId, VmId};
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecEvent, ExecRequest, MachineType, Runtime};
use futures::stream::BoxStream;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A VM process's state as a worker reports it.
pub use fastvm_worker::VmState;

/// Errors of a worker operation; each message says what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkerError {
    /// The worker has no such VM.
    #[error("{0}")]
    NotFound(String),
    /// The worker has no such snapshot.
    #[error("{0}")]
    NoSuchSnapshot(String),
    /// The VM's process state forbids the operation.
    #[error("{0}")]
    WrongState(String),
    #[error("{0}")]
    UnknownMachineType(String),
    /// The exec request was refused (by the worker or the guest agent).
    #[error("{0}")]
    InvalidExec(String),
    /// The guest agent cannot be reached (or broke the protocol).
    #[error("{0}")]
    AgentUnavailable(String),
    /// The VM has as many execs and guest connections open as it may have.
    #[error("{0}")]
    TooManyExecs(String),
    /// Nothing accepted the connection to a port in the guest (nothing
    /// listens there, or the VM has no network).
    #[error("{0}")]
    ConnectRefused(String),
    /// The worker or the guest did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// The worker itself cannot be reached (a remote worker that is down).
    #[error("{0}")]
    Unreachable(String),
    /// The VM's hypervisor stopped answering: the VM is marked failed
    /// (`error` with a message) and only a delete helps.
    #[error("{0}")]
    Unresponsive(String),
    /// Anything else (QEMU, disks, images).
    #[error("{0}")]
    Failed(String),
}

impl From<fastvm_worker::Error> for WorkerError {
    fn from(e: fastvm_worker::Error) -> Self {
        use fastvm_worker::Error as E;
        let msg = e.to_string();
        match e {
            E::NoSuchVm(_) => WorkerError::NotFound(msg),
            E::NoSuchSnapshot(_) => WorkerError::NoSuchSnapshot(msg),
            E::WrongState { .. } => WorkerError::WrongState(msg),
            E::UnknownMachineType(_) => WorkerError::UnknownMachineType(msg),
            E::InvalidExec(_) => WorkerError::InvalidExec(msg),
            E::AgentUnavailable(_) | E::Protocol(_) => WorkerError::AgentUnavailable(msg),
            E::TooManyStreams(_) => WorkerError::TooManyExecs(msg),
            E::GuestConnect(_) => WorkerError::ConnectRefused(msg),
            E::Unresponsive { .. } => WorkerError::Unresponsive(msg),
            _ => WorkerError::Failed(msg),
        }
    }
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub id: VmId,
    /// The machine shape (for a restore: the snapshot's).
    pub machine: MachineType,
    pub hostname: String,
    /// The guest's environment. On a restore an empty map keeps the
    /// snapshot's environment.
    pub env: BTreeMap<String, String>,
    /// Restore this snapshot (of this worker) instead of launching the
    /// machine type's fresh state.
    pub snapshot: Option<SnapshotId>,
    /// The VM's firewall (validated), enforced from its first packet.
    pub firewall: FirewallPolicy,
}

/// Events of one exec, ending with `Exit`. Dropping the stream before the
/// exit cancels the process. The stream is pulled: output is only read
/// from the guest as the consumer polls, so a slow consumer slows the guest.
pub type ExecEvents = BoxStream<'static, Result<ExecEvent, WorkerError>>;

/// Bytes fed to a process's stdin (or read from a staging object).
pub type ByteStream = BoxStream<'static, Result<bytes::Bytes, std::io::Error>>;

/// Counters a worker reports (metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerStats {
    /// Guest agent connections re-established since the worker started.
    pub agent_reconnects: u64,
}

/// A byte stream both ways, e.g. a TCP connection to a port in a guest.
pub trait GuestIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> GuestIo for T {}

/// A connection into a guest, opened by [`Worker::connect`]. Whatever the
/// transport (a socket in the VM's network namespace for the embedded
/// worker, a tunnel for a remote one), callers see bytes both ways.
pub type GuestStream = Box<dyn GuestIo>;

/// A host that runs VMs.
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    /// Stable id of this worker (stored with each VM it runs).
    fn id(&self) -> &str;
    /// Boot a VM and wait until its guest agent answers.
    async fn create(&self, spec: VmSpec) -> Result<(), WorkerError>;
    /// The process state of `id`; `None` when the worker does not know it.
    /// An error means the worker could not say (callers keep what they knew).
    async fn state(&self, id: VmId) -> Result<Option<VmState>, WorkerError>;
    /// Every VM the worker knows, with its state.
    async fn list(&self) -> Result<Vec<(VmId, VmState)>, WorkerError>;
    /// Stop the vCPUs, keeping memory.
    async fn pause(&self, id: VmId) -> Result<(), WorkerError>;
    async fn resume(&self, id: VmId) -> Result<(), WorkerError>;
    /// Kill the VM and remove its files; a VM the worker does not know is
    /// already deleted (`Ok`).
    async fn delete(&self, id: VmId) -> Result<(), WorkerError>;
    /// Start a process in the running VM.
    async fn exec(&self, id: VmId, req: ExecRequest) -> Result<ExecEvents, WorkerError>;
    /// Start a process whose stdin is `input` (then EOF), pulled only as the
    /// guest consumes it. When `input` fails, the process is killed and the
    /// events end with that error (a partial input never looks complete).
    /// The default refuses (a worker without stdin support).
    async fn exec_with_input(
        &self,
        id: VmId,
        req: ExecRequest,
        input: ByteStream,
    ) -> Result<ExecEvents, WorkerError> {
        let _ = (id, req, input);
        Err(WorkerError::Failed(
            "this worker cannot feed a process's stdin".into(),
        ))
    }
    /// Capture the running or paused VM `vm` as snapshot `snapshot`: memory,
    /// device state and disk. The VM keeps running (a paused VM stays
    /// paused). On failure nothing of the snapshot is left behind.
    async fn snapshot(&self, vm: VmId, snapshot: SnapshotId) -> Result<(), WorkerError>;
    /// Remove a snapshot. VMs restored from it keep working (their disk
    /// layers are reference-collected). An unknown snapshot is already
    /// deleted (`Ok`).
    async fn delete_snapshot(&self, snapshot: SnapshotId) -> Result<(), WorkerError>;
    /// Replace the firewall of a VM; a running VM enforces it within a
    /// second, without a restart.
    async fn set_firewall(&self, id: VmId, policy: &FirewallPolicy) -> Result<(), WorkerError>;
    /// The firewall policy the worker knows VM `id` enforces; `Ok(None)`
    /// when it enforces nothing known (a push failed half-way, or the VM has
    /// no network): the control plane's reconciler then pushes the stored
    /// one. The default cannot tell (an error: the reconciler skips it).
    async fn enforced_firewall(&self, id: VmId) -> Result<Option<FirewallPolicy>, WorkerError> {
        let _ = id;
        Err(WorkerError::Failed(
            "this worker does not report enforced firewalls".into(),
        ))
    }
    /// The VM's public IPv6 address, when it has a network.
    async fn public_ipv6(&self, _id: VmId) -> Result<Option<String>, WorkerError> {
        Ok(None)
    }
    /// The worker's counters; an error means it cannot be reached.
    async fn stats(&self) -> Result<WorkerStats, WorkerError> {
        Ok(WorkerStats::default())
    }
    /// Open a TCP connection to `port` inside the running VM `id` (the
    /// services proxy, port forwards). The connection reaches the guest the
    /// way outside traffic does, so the VM's enforced firewall (user policy
    /// plus the services' auto rules) applies to it.
    async fn connect(&self, id: VmId, port: u16) -> Result<GuestStream, WorkerError> {
        let _ = (id, port);
        Err(WorkerError::Failed(
            "this worker cannot open connections into its VMs".into(),
        ))
    }
    /// Let go of every VM without stopping them (server shutdown).
    fn detach(&self) {}
    /// Open an interactive terminal in the running VM: `spec.argv` (the
    /// guest's login shell when empty) on a pseudo-terminal of the given
    /// size, in its own session (job control, Ctrl-C). See [`PtySession`].
    /// The default refuses (a worker without terminals).
    async fn open_pty(&self, id: VmId, spec: PtySpec) -> Result<PtySession, WorkerError> {
        let _ = (id, spec);
        Err(WorkerError::Failed(
            "this worker cannot open terminals".into(),
        ))
    }
    /// Follow the VM's serial console (read-only): the last `tail_bytes` of
    /// what the guest wrote to it, then new output as it comes. Works in
    /// any state, also when the guest agent does not answer; the stream ends
    /// when the VM is deleted. The default refuses.
    async fn open_serial(&self, id: VmId, tail_bytes: u64) -> Result<ByteStream, WorkerError> {
        let _ = (id, tail_bytes);
        Err(WorkerError::Failed(
            "this worker cannot show serial consoles".into(),
        ))
    }
    /// Open a TCP connection to `host:port` *as seen from inside* the
    /// running VM `id` (e.g. a service bound to the guest's 127.0.0.1), dialed
    /// by the guest agent and carried over the agent channel: unlike
    /// [`Worker::connect`] it needs no guest network and no firewall opening
    /// (SSH `-L` forwarding). Flow-controlled both ways; EOF is a half-close;
    /// dropping the stream closes the connection in the guest.
    /// `ConnectRefused` when the guest could not dial. The default refuses.
    async fn open_guest_tcp(
        &self,
        id: VmId,
        host: &str,
        port: u16,
    ) -> Result<GuestStream, WorkerError> {
        let _ = (id, host, port);
        Err(WorkerError::Failed(
            "this worker cannot open connections inside its VMs".into(),
        ))
    }
}

/// How long [`LocalWorker::connect`] waits for the guest to accept.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The worker of this process, over [`fastvm_worker::Runtime`].
pub struct LocalWorker {
    id: String,
    runtime: Arc<Runtime>,
}

impl LocalWorker {
    pub fn new(runtime: Arc<Runtime>) -> Self {
        LocalWorker {
            id: "local".into(),
            runtime,
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }
}

#[async_trait]
impl Worker for LocalWorker {
    fn id(&self) -> &str {
        &self.id
    }

    async fn create(&self, spec: VmSpec) -> Result<(), WorkerError> {
        let req = CreateVm {
            id: Some(spec.id.to_string()),
            machine: spec.machine.name.to_owned(),
            hostname: Some(spec.hostname),
            env: spec.env,
            snapshot: spec.snapshot.map(|s| s.to_string()),
            firewall: spec.firewall,
            ..Default::default()
        };
        self.runtime.create(req).await?;
        Ok(())
    }

    async fn state(&self, id: VmId) -> Result<Option<VmState>, WorkerError> {
        Ok(self.runtime.get(&id.to_string()).ok().map(|i| i.state))
    }

    async fn list(&self) -> Result<Vec<(VmId, VmState)>, WorkerError> {
        // Directories that are not VM ids are not VMs of this control plane.
        Ok(self
            .runtime
            .list()
            .into_iter()
            .filter_map(|i| Some((i.id.parse().ok()?, i.state)))
            .collect())
    }

    async fn pause(&self, id: VmId) -> Result<(), WorkerError> {
        self.runtime.pause(&id.to_string()).await?;
        Ok(())
    }

    async fn resume(&self, id: VmId) -> Result<(), WorkerError> {
        self.runtime.resume(&id.to_string()).await?;
        Ok(())
    }

    async fn delete(&self, id: VmId) -> Result<(), WorkerError> {
        match self.runtime.delete(&id.to_string()).await {
            Ok(()) | Err(fastvm_worker::Error::NoSuchVm(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn exec(&self, id: VmId, req: ExecRequest) -> Result<ExecEvents, WorkerError> {
        let stream = self.runtime.exec(&id.to_string(), &req).await?;
        // `unfold` calls `next()` only when polled: no read-ahead.
        let events = futures::stream::unfold(stream, |mut s| async move {
            let item = s.next().await?;
            Some((item.map_err(WorkerError::from), s))
        });
        Ok(Box::pin(events))
    }

    async fn exec_with_input(
        &self,
        id: VmId,
        req: ExecRequest,
        input: ByteStream,
    ) -> Result<ExecEvents, WorkerError> {
        let mut stream = self
            .runtime
            .exec(&id.to_string(), &req.with_stdin())
            .await?;
        let writer = stream
            .take_stdin()
            .ok_or_else(|| WorkerError::Failed("the exec has no stdin".into()))?;
        let (fail_tx, fail_rx) = tokio::sync::mpsc::channel::<String>(1);
        let pump = AbortOnDrop(tokio::spawn(pump_stdin(writer, input, fail_tx)));
        let events = futures::stream::unfold(Some((stream, fail_rx, pump)), |state| async move {
            let (mut s, mut fail_rx, pump) = state?;
            tokio::select! {
                biased;
                Some(msg) = fail_rx.recv() => Some((Err(WorkerError::Failed(msg)), None)),
                item = s.next() => {
                    let item = item?.map_err(WorkerError::from);
                    let last = matches!(item, Ok(ExecEvent::Exit(_)) | Err(_));
                    Some((item, (!last).then_some((s, fail_rx, pump))))
                }
            }
        });
        Ok(Box::pin(events))
    }

    async fn snapshot(&self, vm: VmId, snapshot: SnapshotId) -> Result<(), WorkerError> {
        self.runtime
            .snapshot(&vm.to_string(), Some(snapshot.to_string()))
            .await?;
        Ok(())
    }

    async fn delete_snapshot(&self, snapshot: SnapshotId) -> Result<(), WorkerError> {
        match self.runtime.delete_snapshot(&snapshot.to_string()).await {
            Ok(()) | Err(fastvm_worker::Error::NoSuchSnapshot(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn set_firewall(&self, id: VmId, policy: &FirewallPolicy) -> Result<(), WorkerError> {
        self.runtime.set_firewall(&id.to_string(), policy).await?;
        Ok(())
    }

    async fn enforced_firewall(&self, id: VmId) -> Result<Option<FirewallPolicy>, WorkerError> {
        Ok(self.runtime.enforced_firewall(&id.to_string())?)
    }

    async fn public_ipv6(&self, id: VmId) -> Result<Option<String>, WorkerError> {
        Ok(self
            .runtime
            .get(&id.to_string())
            .ok()
            .and_then(|i| i.public_ipv6))
    }

    /// From the host to the guest's IPv6 address: through the host route
    /// into the VM's namespace and its firewall's ingress chain, like any
    /// outside client.
    async fn connect(&self, id: VmId, port: u16) -> Result<GuestStream, WorkerError> {
        let info = self.runtime.get(&id.to_string())?;
        if info.state != VmState::Running {
            return Err(WorkerError::WrongState(format!("VM {id} is not running")));
        }
        let Some(addr) = info
            .public_ipv6
            .as_deref()
            .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
        else {
            return Err(WorkerError::ConnectRefused(format!(
                "VM {id} has no network (the worker runs with --no-network)"
            )));
        };
        let target = std::net::SocketAddr::from((addr, port));
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err(
                WorkerError::ConnectRefused(format!("nothing listens on port {port} in VM {id}")),
            ),
            Ok(Err(e)) => Err(WorkerError::ConnectRefused(format!(
                "connecting to port {port} in VM {id} failed: {e}"
            ))),
            Err(_) => Err(WorkerError::Timeout(format!(
                "port {port} of VM {id} did not accept within {} s (a firewall rule may drop it)",
                CONNECT_TIMEOUT.as_secs()
            ))),
        }
    }

    fn detach(&self) {
        self.runtime.detach_all();
    }

    async fn open_pty(&self, id: VmId, spec: PtySpec) -> Result<PtySession, WorkerError> {
        let req = ExecRequest {
            argv: spec.argv,
            env: spec.env,
            stdin: true,
            pty: Some(fastvm_worker::agent::PtySpec {
                term: spec.term,
                cols: spec.cols,
                rows: spec.rows,
            }),
            ..Default::default()
        };
        let mut stream = self.runtime.exec(&id.to_string(), &req).await?;
        let writer = stream
            .take_stdin()
            .ok_or_else(|| WorkerError::Failed("the terminal has no input".into()))?;
        let (input, inputs) = tokio::sync::mpsc::channel(PTY_INPUT_QUEUE);
        let pump = AbortOnDrop(tokio::spawn(pump_pty_input(
            writer,
            stream.control(),
            inputs,
        )));
        let events = futures::stream::unfold(Some((stream, pump)), |state| async move {
            let (mut s, pump) = state?;
            match s.next().await? {
                Ok(ExecEvent::Stdout(d) | ExecEvent::Stderr(d)) => {
                    Some((Ok(PtyEvent::Output(d)), Some((s, pump))))
                }
                Ok(ExecEvent::Exit(st)) => Some((
                    Ok(PtyEvent::Exit(PtyExit {
                        code: st.code,
                        signal: st.signal,
                        error: st.error,
                    })),
                    None,
                )),
                Err(e) => Some((Err(WorkerError::from(e)), None)),
            }
        });
        Ok(PtySession {
            input,
            events: Box::pin(events),
        })
    }

    async fn open_serial(&self, id: VmId, tail_bytes: u64) -> Result<ByteStream, WorkerError> {
        let follower = self
            .runtime
            .follow_console(&id.to_string(), tail_bytes)
            .await?;
        let stream = futures::stream::unfold(follower, |mut f| async move {
            let item = f.next().await?;
            Some((item, f))
        });
        Ok(Box::pin(stream))
    }

    async fn open_guest_tcp(
        &self,
        id: VmId,
        host: &str,
        port: u16,
    ) -> Result<GuestStream, WorkerError> {
        let stream = self
            .runtime
            .connect_in_guest(&id.to_string(), host, port)
            .await?;
        Ok(Box::new(stream))
    }
}

/// Aborts its task when dropped (the exec's consumer went away).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Feed `input` to the process, then EOF. A failing input kills the process
/// and is reported through `fail`; a process that stops reading ends the
/// pump quietly (its exit status says why).
async fn pump_stdin(
    mut writer: fastvm_worker::agent::StdinWriter,
    mut input: ByteStream,
    fail: tokio::sync::mpsc::Sender<String>,
) {
    use futures::StreamExt as _;
    while let Some(chunk) = input.next().await {
        match chunk {
            Ok(data) => {
                if writer.write(data).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = writer.abort().await;
                let _ = fail
                    .send(format!("reading the input for the guest failed: {e}"))
                    .await;
                return;
            }
        }
    }
    let _ = writer.finish().await;
}

// --- terminals (Worker::open_pty, Worker::open_serial) ------------------------

/// Keystrokes and control requests queued for one terminal before `send` waits.
pub const PTY_INPUT_QUEUE: usize = 16;

/// What terminal to open (see [`Worker::open_pty`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtySpec {
    /// Program and arguments; empty: the guest's login shell
    /// (`/bin/bash -l`, else `/bin/sh -l`).
    pub argv: Vec<String>,
    /// Extra environment, on top of the VM's.
    pub env: BTreeMap<String, String>,
    /// `TERM`, e.g. `xterm-256color`.
    pub term: String,
    /// Window size (1..=4096 each).
    pub cols: u16,
    pub rows: u16,
}

/// Input to a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyInput {
    /// Bytes typed (written to the terminal as is: `\x03` is Ctrl-C).
    Data(bytes::Bytes),
    /// New window size (the foreground process gets SIGWINCH).
    Resize { cols: u16, rows: u16 },
    /// A signal to the terminal's process group.
    Signal(i32),
}

/// How a terminal's process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PtyExit {
    /// Exit code; `128 + signal` when killed by a signal; 127 when it could not start.
    pub code: i32,
    pub signal: Option<i32>,
    /// Diagnostic, e.g. why it could not start.
    pub error: Option<String>,
}

/// Output of a terminal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// What the terminal printed (raw bytes, possibly cut mid UTF-8 sequence).
    Output(bytes::Bytes),
    /// The process ended; always the last event.
    Exit(PtyExit),
}

/// A running terminal, independent of how the worker is reached (in
/// process today; a remote worker carries the same over its connection).
///
/// Both halves are flow-controlled end to end: `input.send` waits while the
/// guest does not take keystrokes, and output is read from the guest only as
/// `events` is polled, so a consumer that stops reading stops the guest's
/// process (its terminal blocks) and no buffer grows. Dropping `events`
/// hangs up: the process group in the guest is killed.
pub struct PtySession {
    /// Keystrokes, resizes and signals, in order.
    pub input: tokio::sync::mpsc::Sender<PtyInput>,
    /// What the terminal prints, then exactly one [`PtyEvent::Exit`] (or an error).
    pub events: BoxStream<'static, Result<PtyEvent, WorkerError>>,
}

/// Move a terminal's input into the guest, in order; ends when the session
/// is dropped or the guest stops taking input (the process exited).
async fn pump_pty_input(
    mut writer: fastvm_worker::agent::StdinWriter,
    control: fastvm_worker::agent::StreamControl,
    mut inputs: tokio::sync::mpsc::Receiver<PtyInput>,
) {
    while let Some(input) = inputs.recv().await {
        let sent = match input {
            PtyInput::Data(data) => writer.write(data).await,
            PtyInput::Resize { cols, rows } => control.resize(cols, rows).await,
            PtyInput::Signal(signal) => control.signal(signal).await,
        };
        match sent {
            Ok(()) => {}
            // A size out of range changes nothing; the terminal goes on.
            Err(fastvm_worker::Error::InvalidExec(e)) => {
                tracing::debug!(error = %e, "terminal request refused")
            }
            Err(e) => {
                tracing::debug!(error = %e, "terminal input stopped");
                return;
            }
        }
    }
}
