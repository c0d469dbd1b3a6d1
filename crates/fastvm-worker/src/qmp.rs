//! A small QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! QMP is JSON lines: a greeting, `qmp_capabilities`, then commands answered
//! by `{"return": ...}` or `{"error": ...}` in order, with asynchronous
//! `{"event": ...}` lines interleaved. We tag commands with an `id` and keep
//! the connection open for the VM's lifetime: its EOF is how the worker
//! learns that QEMU exited (QEMU is daemonized, not our child).
//!
//! Every command has a time budget ([`crate::timeouts::qmp_budget`]): a QEMU
//! that stops answering (SIGSTOPped, deadlocked) yields [`Error::Timeout`]
//! instead of a caller waiting forever. A late answer to a timed-out command
//! is dropped; the connection stays usable.

use crate::error::{Error, IoContext, Result};
use crate::timeouts;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{oneshot, watch, Mutex as AsyncMutex};

/// Longest line we accept from QEMU (QMP replies are small).
const MAX_LINE: usize = 1 << 20;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value>>>>>;

pub struct Qmp {
    writer: AsyncMutex<tokio::net::unix::OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    closed: watch::Receiver<bool>,
}

impl Qmp {
    /// Connect, read the greeting and negotiate capabilities.
    pub async fn connect(path: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(path)
            .await
            .ctx(|| format!("connect QMP {}", path.display()))?;
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut greeting = String::new();
        tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut greeting))
            .await
            .map_err(|_| Error::Qmp("no QMP greeting within 10 s".into()))?
            .ctx(|| "read QMP greeting".into())?;
        if !greeting.contains("\"QMP\"") {
            return Err(Error::Qmp(format!("unexpected greeting {greeting:?}")));
        }
        write
            .write_all(b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n")
            .await
            .ctx(|| "QMP write".into())?;
        let pending: Pending = Arc::default();
        let (closed_tx, closed) = watch::channel(false);
        let (cap_tx, cap_rx) = oneshot::channel();
        pending
            .lock()
            .map_err(|_| Error::Qmp("poisoned".into()))?
            .insert(0, cap_tx);
        tokio::spawn(read_loop(reader, pending.clone(), closed_tx));
        let qmp = Qmp {
            writer: AsyncMutex::new(write),
            pending,
            next_id: AtomicU64::new(1),
            closed,
        };
        let budget = timeouts::qmp_budget("qmp_capabilities");
        tokio::time::timeout(budget, cap_rx)
            .await
            .map_err(|_| Error::Timeout {
                what: "QMP qmp_capabilities".into(),
                after: budget,
            })?
            .map_err(|_| Error::Qmp("QMP closed during negotiation".into()))??;
        Ok(qmp)
    }

    /// Run a command within its budget ([`timeouts::qmp_budget`]) and return
    /// its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_within(command, arguments, timeouts::qmp_budget(command))
            .await
    }

    /// [`Self::execute`] with an explicit budget: [`Error::Timeout`] when
    /// QEMU has not answered within `budget` (its late answer is dropped).
    pub async fn execute_within(
        &self,
        command: &str,
        arguments: Option<Value>,
        budget: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(budget, self.exchange(id, command, arguments)).await;
        match result {
            Ok(r) => r,
            Err(_) => {
                if let Ok(mut p) = self.pending.lock() {
                    p.remove(&id);
                }
                Err(Error::Timeout {
                    what: format!("QMP {command}"),
                    after: budget,
                })
            }
        }
    }

    async fn exchange(&self, id: u64, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .map_err(|_| Error::Qmp("poisoned".into()))?
            .insert(id, tx);
        if self.is_closed() {
            // The reader ended (QEMU exited) before this command was registered:
            // nothing would ever answer it.
            if let Ok(mut p) = self.pending.lock() {
                p.remove(&id);
            }
            return Err(Error::Qmp(format!("QEMU exited before {command}")));
        }
        let mut line = msg.to_string();
        line.push('\n');
        {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes())
                .await
                .ctx(|| format!("QMP {command}"))?;
        }
        rx.await
            .map_err(|_| Error::Qmp(format!("QEMU exited during {command}")))?
    }

    /// Resolves when the QMP connection ends, i.e. QEMU exited.
    pub async fn wait_closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|closed| *closed).await;
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

async fn read_loop(
    mut reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
    closed: watch::Sender<bool>,
) {
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader)
            .take(MAX_LINE as u64)
            .read_line(&mut line)
            .await
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!(line = %line.trim(), "unparseable QMP line");
            continue;
        };
        if let Some(event) = v.get("event").and_then(Value::as_str) {
            tracing::debug!(event, "QMP event");
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let result = if let Some(ret) = v.get("return") {
            Ok(ret.clone())
        } else {
            let desc = v
                .pointer("/error/desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            Err(Error::Qmp(desc.to_owned()))
        };
        if let Some(tx) = pending.lock().ok().and_then(|mut p| p.remove(&id)) {
            let _ = tx.send(result);
        }
    }
    // Closed first, then the waiters dropped: a command registered after the
    // clear sees `closed` (see `execute`), one registered before is dropped here.
    let _ = closed.send(true);
    if let Ok(mut p) = pending.lock() {
        p.clear();
    }
}

use tokio::io::AsyncReadExt as _;

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A fake QEMU: greets, accepts `qmp_capabilities`, then answers only
    /// the commands `answer` accepts (by name); the others never get a reply.
    async fn fake_qemu(
        dir: &Path,
        greet: bool,
        answer: fn(&str) -> bool,
    ) -> (std::path::PathBuf, tokio::task::JoinHandle<()>) {
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind");
        let task = tokio::spawn(async move {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (read, mut write) = stream.into_split();
            if greet {
                let _ = write
                    .write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                    .await;
            }
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let cmd = v["execute"].as_str().unwrap_or_default().to_owned();
                if !greet || !(cmd == "qmp_capabilities" || answer(&cmd)) {
                    continue;
                }
                let reply = json!({ "return": { "cmd": cmd }, "id": v["id"] });
                let _ = write.write_all(format!("{reply}\n").as_bytes()).await;
            }
        });
        (path, task)
    }

    #[tokio::test(start_paused = true)]
    async fn a_command_qemu_never_answers_times_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _server) = fake_qemu(dir.path(), true, |c| c == "query-status").await;
        let qmp = Qmp::connect(&path).await.expect("connect");
        let err = qmp.execute("stop", None).await.expect_err("no answer");
        match err {
            Error::Timeout { what, after } => {
                assert_eq!(what, "QMP stop");
                assert_eq!(after, timeouts::QMP_SHORT);
            }
            other => panic!("expected a timeout, got {other}"),
        }
        // The connection stays usable, and the timed-out command left nothing pending.
        let v = qmp.execute("query-status", None).await.expect("answered");
        assert_eq!(v["cmd"], "query-status");
        assert!(qmp.pending.lock().expect("lock").is_empty());
        assert!(!qmp.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn an_explicit_budget_is_honoured() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _server) = fake_qemu(dir.path(), true, |_| false).await;
        let qmp = Qmp::connect(&path).await.expect("connect");
        let t0 = tokio::time::Instant::now();
        let err = qmp
            .execute_within("blockdev-snapshot-sync", None, Duration::from_millis(250))
            .await
            .expect_err("no answer");
        assert!(matches!(err, Error::Timeout { after, .. } if after == Duration::from_millis(250)));
        // Paused clock: exactly the budget elapsed, not the command's default.
        assert_eq!(t0.elapsed(), Duration::from_millis(250));
    }

    #[tokio::test(start_paused = true)]
    async fn a_qemu_that_never_greets_fails_the_connect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, _server) = fake_qemu(dir.path(), false, |_| true).await;
        let err = Qmp::connect(&path).await.err().expect("no greeting");
        assert!(err.to_string().contains("no QMP greeting"), "{err}");
    }

    #[tokio::test]
    async fn a_closed_connection_fails_pending_commands_at_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (path, server) = fake_qemu(dir.path(), true, |_| false).await;
        let qmp = Qmp::connect(&path).await.expect("connect");
        let pending = qmp.execute("stop", None);
        tokio::pin!(pending);
        // Not answered yet...
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut pending)
                .await
                .is_err()
        );
        // ...then QEMU goes away: the command fails (it does not wait out its budget).
        server.abort();
        let err = tokio::time::timeout(Duration::from_secs(4), pending)
            .await
            .expect("fails before its budget")
            .expect_err("QEMU exited");
        assert!(matches!(err, Error::Qmp(_)), "{err}");
        qmp.wait_closed().await;
    }
}
