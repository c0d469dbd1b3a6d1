//! Running one process for one stream: spawn, pump output under flow
//! control, feed stdin, enforce the timeout, report the exit.
//!
//! ```text
//!  Exec -> spawn (own session + process group) --fail--> Exit{127, error}
//!            |
//!            +-> Started{pid}
//!            +-> pump stdout / pump stderr: Data frames, at most the credit
//!            |   the host granted (STREAM_WINDOW at start), then Eof
//!            +-> timeout: SIGKILL to the whole process group, timed_out
//!            +-> exit status from the reaper; pipes drained (bounded by
//!                EXIT_DRAIN when a background child keeps them open)
//!          -> Exit{code, signal, timed_out, duration_ms}
//! ```
//!
//! With a PTY (see [`crate::pty`]) the process's stdio is the terminal's
//! slave, opened by the session before the task starts (so a Resize that
//! follows the Exec never finds the stream without its terminal); the one
//! output pump reads the master as `Fd::Stdout`, stdin frames are written to
//! the master, and an empty argv runs the login shell.

use crate::pty::{self, Master, Pty};
use crate::session::Shared;
use bytes::Bytes;
use fastvm_agent_proto::{Control, ExecSpec, ExitStatus, Fd, Frame, DATA_CHUNK, STREAM_WINDOW};
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, watch, Notify};

pub(crate) const DEFAULT_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// After the process exits, keep reading its pipes until EOF, a pause this
/// long, or [`EXIT_DRAIN`] in all: a background child may hold them open.
const EXIT_IDLE: Duration = Duration::from_millis(100);
const EXIT_DRAIN: Duration = Duration::from_secs(1);

/// The pid slot of a stream cancelled before its process started.
const CANCELLED: i32 = -1;

/// Send window of one output fd.
pub(crate) struct Credit {
    avail: Mutex<u32>,
    notify: Notify,
    detached: AtomicBool,
}

impl Credit {
    fn new() -> Credit {
        Credit {
            avail: Mutex::new(STREAM_WINDOW),
            notify: Notify::new(),
            detached: AtomicBool::new(false),
        }
    }

    pub(crate) fn give(&self, n: u32) {
        if let Ok(mut a) = self.avail.lock() {
            // A hostile or buggy host cannot make us buffer more: the window
            // only bounds what we send, never what we hold.
            *a = a.saturating_add(n).min(STREAM_WINDOW.saturating_mul(4));
        }
        self.notify.notify_one();
    }

    fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        self.notify.notify_one();
    }

    /// Wait for credit; take up to `max` bytes of it. Detached streams have unlimited credit.
    pub(crate) async fn take(&self, max: usize) -> usize {
        loop {
            if self.detached.load(Ordering::SeqCst) {
                return max;
            }
            if let Ok(mut a) = self.avail.lock() {
                if *a > 0 {
                    let n = (*a as usize).min(max);
                    *a -= n as u32;
                    return n;
                }
            }
            self.notify.notified().await;
        }
    }
}

/// The session's end of a stream's stdin queue. Bounded by the stdin
/// window: the host sends at most [`STREAM_WINDOW`] bytes ahead of the
/// `Credit{Stdin}` the stream returns as it writes them, so more queued bytes
/// mean a broken host; its input is then dropped and stdin closed rather than
/// held (a process that does not read its stdin must not grow the agent).
pub(crate) struct StdinTx {
    tx: mpsc::UnboundedSender<Option<Bytes>>,
    queued: Arc<AtomicUsize>,
    cut: AtomicBool,
}

/// The stream task's end of the same queue.
pub(crate) struct StdinRx {
    rx: mpsc::UnboundedReceiver<Option<Bytes>>,
    queued: Arc<AtomicUsize>,
}

fn stdin_queue() -> (StdinTx, StdinRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    (
        StdinTx {
            tx,
            queued: queued.clone(),
            cut: AtomicBool::new(false),
        },
        StdinRx { rx, queued },
    )
}

impl StdinTx {
    /// Queue bytes for the process. False when these bytes took the host
    /// past its window: they are dropped and stdin closed (later bytes are
    /// dropped silently).
    pub(crate) fn send(&self, data: Bytes) -> bool {
        if self.cut.load(Ordering::SeqCst) {
            return true;
        }
        let after = self.queued.fetch_add(data.len(), Ordering::SeqCst) + data.len();
        if after > STREAM_WINDOW as usize {
            self.queued.fetch_sub(data.len(), Ordering::SeqCst);
            self.cut.store(true, Ordering::SeqCst);
            let _ = self.tx.send(None);
            return false;
        }
        let _ = self.tx.send(Some(data));
        true
    }

    /// End of input.
    pub(crate) fn finish(&self) {
        let _ = self.tx.send(None);
    }

    /// Bytes queued and not yet taken by the writer.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

impl StdinRx {
    /// The next bytes (`Some(None)` at end of input).
    pub(crate) async fn recv(&mut self) -> Option<Option<Bytes>> {
        let item = self.rx.recv().await?;
        if let Some(data) = &item {
            self.queued.fetch_sub(data.len(), Ordering::SeqCst);
        }
        Some(item)
    }
}

/// The session's view of a running stream.
pub(crate) struct StreamHandle {
    stdout: Arc<Credit>,
    stderr: Arc<Credit>,
    pub(crate) stdin: Option<Arc<StdinTx>>,
    pid: Arc<AtomicI32>,
    detached: Arc<AtomicBool>,
    /// The terminal's master, for resize requests.
    pty: Option<Master>,
    /// Closes a guest TCP connection's stream (see `crate::tcp`) when the
    /// stream is cancelled or detached: no process would notice otherwise.
    closer: tokio_util::sync::CancellationToken,
}

/// The exec task's side of the same stream.
pub(crate) struct StreamParts {
    pub(crate) stdout: Arc<Credit>,
    stderr: Arc<Credit>,
    pub(crate) stdin: Option<StdinRx>,
    pid: Arc<AtomicI32>,
    pub(crate) detached: Arc<AtomicBool>,
    pty: Option<Pty>,
    pub(crate) closer: tokio_util::sync::CancellationToken,
}

impl StreamHandle {
    /// A stream; a PTY stream always has stdin (keystrokes).
    pub(crate) fn new(with_stdin: bool, pty: Option<Pty>) -> (StreamHandle, StreamParts) {
        let (stdout, stderr) = (Arc::new(Credit::new()), Arc::new(Credit::new()));
        let (pid, detached) = (
            Arc::new(AtomicI32::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let (tx, rx) = if with_stdin || pty.is_some() {
            // Never blocks the session loop (a process that does not read
            // its stdin must not stall every other stream); bounded by the
            // stdin window (see StdinTx).
            let (tx, rx) = stdin_queue();
            (Some(Arc::new(tx)), Some(rx))
        } else {
            (None, None)
        };
        let master = pty.as_ref().map(|p| p.master.clone());
        let closer = tokio_util::sync::CancellationToken::new();
        let handle = StreamHandle {
            closer: closer.clone(),
            stdout: stdout.clone(),
            stderr: stderr.clone(),
            stdin: tx,
            pid: pid.clone(),
            detached: detached.clone(),
            pty: master,
        };
        (
            handle,
            StreamParts {
                stdout,
                stderr,
                stdin: rx,
                pid,
                detached,
                pty,
                closer,
            },
        )
    }

    /// Resize the stream's terminal; false when it has none.
    pub(crate) fn resize(&self, cols: u16, rows: u16) -> bool {
        match &self.pty {
            Some(master) => {
                if let Err(e) = pty::set_size(master.get_ref(), cols, rows) {
                    crate::log(&format!("resize failed: {e}"));
                }
                true
            }
            None => false,
        }
    }

    pub(crate) fn credit(&self, fd: Fd) -> Option<Arc<Credit>> {
        match fd {
            Fd::Stdout => Some(self.stdout.clone()),
            Fd::Stderr => Some(self.stderr.clone()),
            Fd::Stdin => None,
        }
    }

    pub(crate) fn pid(&self) -> Option<i32> {
        let pid = self.pid.load(Ordering::SeqCst);
        (pid > 0).then_some(pid)
    }

    /// The host cancelled the stream: detach it and return the pid to
    /// kill; a process not spawned yet is killed by its task as it starts.
    pub(crate) fn cancel(&self) -> Option<i32> {
        self.detach();
        let pid = self.pid.swap(CANCELLED, Ordering::SeqCst);
        (pid > 0).then_some(pid)
    }

    pub(crate) fn owns(&self, token: &Arc<AtomicBool>) -> bool {
        Arc::ptr_eq(&self.detached, token)
    }

    pub(crate) fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        self.stdout.detach();
        self.stderr.detach();
        self.closer.cancel();
    }
}

/// Send `signal` to the process group led by `pid`.
pub(crate) fn kill_group(pid: i32, signal: i32) {
    // SAFETY: kill has no memory preconditions; a negative pid targets the group.
    unsafe { libc::kill(-pid, signal) };
}

fn command(
    shared: &Shared,
    spec: &ExecSpec,
    argv: &[String],
    pty: Option<&Pty>,
) -> std::io::Result<std::process::Command> {
    let defaults = shared
        .exec_defaults
        .read()
        .ok()
        .and_then(|d| d.clone())
        .unwrap_or_default();
    // The image's user, resolved in the guest at each exec (an exec may have
    // added users since); none: root, as ever.
    let identity = match defaults.user.as_deref().filter(|u| !u.trim().is_empty()) {
        Some(spec) => Some(
            crate::user::resolve_in_guest(spec)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::NotFound, e))?,
        ),
        None => None,
    };
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]).env_clear();
    let (home, user) = match &identity {
        Some(id) => (id.home.as_str(), id.name.as_str()),
        None => ("/root", "root"),
    };
    cmd.env("PATH", DEFAULT_PATH)
        .env("HOME", home)
        .env("USER", user)
        .env("LANG", "C.UTF-8")
        .env("TERM", "xterm");
    if identity.is_some() {
        cmd.env("LOGNAME", user);
    }
    if let Some(p) = &spec.pty {
        cmd.env("TERM", &p.term)
            .env("LOGNAME", user)
            .env("SHELL", &argv[0]);
    }
    if let Ok(env) = shared.env.read() {
        cmd.envs(env.iter());
    }
    cmd.envs(spec.env.iter());
    let as_root = identity.as_ref().is_none_or(|id| id.uid == 0);
    cmd.current_dir(working_dir(
        spec.cwd.as_deref(),
        defaults.cwd.as_deref(),
        as_root,
    ));
    match pty {
        Some(pty) => {
            cmd.stdin(pty.slave.try_clone()?)
                .stdout(pty.slave.try_clone()?)
                .stderr(pty.slave.try_clone()?);
            // SAFETY: runs between fork and exec, after stdio became the slave;
            // it only makes async-signal-safe calls.
            unsafe {
                cmd.pre_exec(pty::make_controlling_terminal);
            }
            if let Some(id) = &identity {
                // SAFETY: after the terminal is ours (TIOCSCTTY needs no
                // privilege for a new session, but is done as root anyway);
                // raw system calls only, no allocation.
                unsafe {
                    cmd.pre_exec(crate::user::switch_to(id, true));
                }
            }
        }
        None => {
            cmd.stdin(if spec.stdin {
                std::process::Stdio::piped()
            } else {
                std::process::Stdio::null()
            });
            cmd.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped());
            // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
            if let Some(id) = &identity {
                // SAFETY: raw system calls only, no allocation (see switch_to).
                unsafe {
                    cmd.pre_exec(crate::user::switch_to(id, false));
                }
            }
        }
    }
    Ok(cmd)
}

/// The exec's own `cwd`, else the image's (made if missing, as container
/// runtimes do), else `/root` when the guest has one and the exec runs as
/// root, else `/` (where a container runtime starts an image's other users).
fn working_dir(spec: Option<&str>, default: Option<&str>, as_root: bool) -> String {
    if let Some(cwd) = spec {
        return cwd.to_owned();
    }
    if let Some(cwd) = default.filter(|c| !c.is_empty()) {
        if !std::path::Path::new(cwd).is_dir() {
            let _ = std::fs::create_dir_all(cwd);
        }
        return cwd.to_owned();
    }
    if as_root && std::path::Path::new("/root").is_dir() {
        "/root".to_owned()
    } else {
        "/".to_owned()
    }
}

fn decode_status(status: libc::c_int) -> (i32, Option<i32>) {
    if libc::WIFEXITED(status) {
        (libc::WEXITSTATUS(status), None)
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        (128 + sig, Some(sig))
    } else {
        (255, None)
    }
}

async fn finish(shared: &Shared, stream: u32, detached: &Arc<AtomicBool>, status: ExitStatus) {
    if !detached.load(Ordering::SeqCst) {
        shared
            .out
            .send(Frame::Control {
                stream,
                msg: Control::Exit(status),
            })
            .await;
    }
    shared.remove_stream(stream, detached);
}

pub(crate) async fn run(shared: Arc<Shared>, stream: u32, spec: ExecSpec, mut parts: StreamParts) {
    let start = Instant::now();
    let argv = if spec.argv.is_empty() && parts.pty.is_some() {
        pty::login_shell()
    } else {
        Ok(spec.argv.clone())
    };
    let argv = match argv {
        Ok(argv) if !argv.is_empty() && !argv[0].is_empty() => argv,
        bad => {
            let error = bad.err().unwrap_or_else(|| "empty command".into());
            let status = ExitStatus {
                code: 127,
                signal: None,
                timed_out: false,
                duration_ms: 0,
                error: Some(error),
            };
            return finish(&shared, stream, &parts.detached, status).await;
        }
    };
    // The slave is only needed until the child has its copies: dropping ours
    // lets the master see EOF (EIO) once the child and its jobs are gone.
    let pty = parts.pty.take();
    let spawned = command(&shared, &spec, &argv, pty.as_ref())
        .and_then(|mut cmd| shared.reaper.spawn(&mut cmd));
    let master = pty.map(|p| p.master);
    let (mut child, exit_rx) = match spawned {
        Ok(c) => c,
        Err(e) => {
            let error = Some(format!("cannot start {:?}: {e}", argv[0]));
            let status = ExitStatus {
                code: 127,
                signal: None,
                timed_out: false,
                duration_ms: elapsed_ms(start),
                error,
            };
            return finish(&shared, stream, &parts.detached, status).await;
        }
    };
    let pid = child.id() as i32;
    // A Cancel that came before the spawn left CANCELLED here: the host
    // gave up on this stream, so the process must not outlive it.
    if parts.pid.swap(pid, Ordering::SeqCst) == CANCELLED {
        kill_group(pid, libc::SIGKILL);
    }
    shared
        .out
        .send(Frame::Control {
            stream,
            msg: Control::Started { pid: pid as u32 },
        })
        .await;

    let (exited_tx, exited_rx) = watch::channel(false);
    let mut pumps = Vec::new();
    if let Some(master) = &master {
        let source = Source::Pty(master.clone());
        pumps.push(tokio::spawn(pump(
            shared.clone(),
            stream,
            Fd::Stdout,
            source,
            parts.stdout.clone(),
            parts.detached.clone(),
            exited_rx.clone(),
        )));
        if let Some(rx) = parts.stdin.take() {
            tokio::spawn(feed_stdin(
                shared.clone(),
                stream,
                Sink::Pty(master.clone()),
                rx,
            ));
        }
    }
    let outputs = [
        (
            Fd::Stdout,
            child.stdout.take().map(OwnedFd::from),
            parts.stdout.clone(),
        ),
        (
            Fd::Stderr,
            child.stderr.take().map(OwnedFd::from),
            parts.stderr.clone(),
        ),
    ];
    for (fd, pipe_fd, credit) in outputs {
        let Some(pipe_fd) = pipe_fd else { continue };
        match pipe::Receiver::from_owned_fd(pipe_fd) {
            Ok(rx) => pumps.push(tokio::spawn(pump(
                shared.clone(),
                stream,
                fd,
                Source::Pipe(rx),
                credit,
                parts.detached.clone(),
                exited_rx.clone(),
            ))),
            Err(e) => crate::log(&format!("stream {stream}: cannot read {fd:?}: {e}")),
        }
    }
    if let (Some(stdin), Some(rx)) = (child.stdin.take(), parts.stdin) {
        match pipe::Sender::from_owned_fd(OwnedFd::from(stdin)) {
            Ok(tx) => {
                tokio::spawn(feed_stdin(shared.clone(), stream, Sink::Pipe(tx), rx));
            }
            Err(e) => crate::log(&format!("stream {stream}: cannot write stdin: {e}")),
        }
    }
    drop(master);

    let mut timed_out = false;
    let raw = match spec.timeout_ms {
        Some(ms) => {
            tokio::pin!(exit_rx);
            tokio::select! {
                s = &mut exit_rx => s.ok(),
                _ = tokio::time::sleep(Duration::from_millis(ms)) => {
                    timed_out = true;
                    kill_group(pid, libc::SIGKILL);
                    exit_rx.await.ok()
                }
            }
        }
        None => exit_rx.await.ok(),
    };
    let (code, signal) = raw.map(decode_status).unwrap_or((255, None));
    let _ = exited_tx.send(true);
    for p in pumps {
        let _ = p.await;
    }
    let status = ExitStatus {
        code,
        signal,
        timed_out,
        duration_ms: elapsed_ms(start),
        error: None,
    };
    finish(&shared, stream, &parts.detached, status).await;
}

fn elapsed_ms(start: Instant) -> u64 {
    start.elapsed().as_millis().min(u64::MAX as u128) as u64
}

/// Where a stream's output comes from.
enum Source {
    Pipe(pipe::Receiver),
    Pty(Master),
}

impl Source {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Source::Pipe(rx) => rx.read(buf).await,
            Source::Pty(master) => pty::read(master, buf).await,
        }
    }
}

/// Where a stream's stdin goes.
enum Sink {
    Pipe(pipe::Sender),
    Pty(Master),
}

impl Sink {
    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Pipe(tx) => tx.write_all(data).await,
            Sink::Pty(master) => pty::write_all(master, data).await,
        }
    }
}

async fn pump(
    shared: Arc<Shared>,
    stream: u32,
    fd: Fd,
    mut rx: Source,
    credit: Arc<Credit>,
    detached: Arc<AtomicBool>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let allowed = credit.take(DATA_CHUNK).await;
        let read = if let Some(deadline) = drain_deadline {
            let idle = EXIT_IDLE.min(deadline.saturating_duration_since(Instant::now()));
            match tokio::time::timeout(idle, rx.read(&mut buf[..allowed])).await {
                Ok(r) => r,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                r = rx.read(&mut buf[..allowed]) => r,
                _ = exited.changed() => {
                    drain_deadline = Some(Instant::now() + EXIT_DRAIN);
                    credit.give(allowed as u32);
                    continue;
                }
            }
        };
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                credit.give((allowed - n) as u32);
                if !detached.load(Ordering::SeqCst) {
                    let data = Bytes::copy_from_slice(&buf[..n]);
                    shared.out.send(Frame::Data { stream, fd, data }).await;
                }
            }
        }
    }
    if !detached.load(Ordering::SeqCst) {
        shared.out.send(Frame::Eof { stream, fd }).await;
    }
}

async fn feed_stdin(shared: Arc<Shared>, stream: u32, mut tx: Sink, mut rx: StdinRx) {
    while let Some(Some(data)) = rx.recv().await {
        let n = data.len() as u32;
        if tx.write_all(&data).await.is_err() {
            break;
        }
        shared
            .out
            .send(Frame::Credit {
                stream,
                fd: Fd::Stdin,
                bytes: n,
            })
            .await;
    }
    // Dropping tx closes the child's stdin (for a PTY: our reference to the master).
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_dir_spec_then_image_then_root_home_then_slash() {
        let made =
            std::env::temp_dir().join(format!("fastvm-agent-cwd-{}/a/b", std::process::id()));
        let made_s = made.to_str().expect("utf-8");
        assert_eq!(working_dir(Some("/x"), Some(made_s), true), "/x");
        // The image's WorkingDir is made when missing (as runc does).
        assert_eq!(working_dir(None, Some(made_s), false), made_s);
        assert!(made.is_dir());
        let _ = std::fs::remove_dir_all(made.parent().and_then(|p| p.parent()).expect("parent"));
        let root_home = if std::path::Path::new("/root").is_dir() {
            "/root"
        } else {
            "/"
        };
        assert_eq!(working_dir(None, None, true), root_home);
        assert_eq!(working_dir(None, Some(""), true), root_home);
        // Another user of the image starts in /, never in root's home.
        assert_eq!(working_dir(None, None, false), "/");
    }

    #[tokio::test]
    async fn stdin_past_the_window_is_dropped_and_closes_stdin() {
        let (tx, mut rx) = stdin_queue();
        let chunk = Bytes::from(vec![b'x'; DATA_CHUNK]);
        let fits = STREAM_WINDOW as usize / DATA_CHUNK;
        for _ in 0..fits {
            assert!(tx.send(chunk.clone()));
        }
        assert_eq!(tx.queued(), STREAM_WINDOW as usize);
        // One byte more than the window: refused, not queued.
        assert!(!tx.send(Bytes::from_static(b"y")));
        assert_eq!(tx.queued(), STREAM_WINDOW as usize);
        // Later bytes are dropped too, silently.
        assert!(tx.send(chunk.clone()));
        assert_eq!(tx.queued(), STREAM_WINDOW as usize);
        // The writer sees the window's bytes, then end of input.
        for _ in 0..fits {
            assert_eq!(rx.recv().await, Some(Some(chunk.clone())));
        }
        assert_eq!(rx.recv().await, Some(None));
        assert_eq!(tx.queued(), 0);
    }

    #[tokio::test]
    async fn stdin_within_the_window_flows_as_it_is_written() {
        let (tx, mut rx) = stdin_queue();
        let chunk = Bytes::from(vec![b'x'; DATA_CHUNK]);
        // A host sending under credit: the writer takes each chunk (and
        // returns its credit) before the window is used up, forever.
        for _ in 0..64 {
            assert!(tx.send(chunk.clone()));
            assert_eq!(rx.recv().await, Some(Some(chunk.clone())));
        }
        tx.finish();
        assert_eq!(rx.recv().await, Some(None));
    }
}
