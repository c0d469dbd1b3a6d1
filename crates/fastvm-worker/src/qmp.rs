//! A small QMP (QEMU Machine Protocol) client over a unix socket.
//!
//! QMP is JSON lines: a greeting, `qmp_capabilities`, then commands answered
//! by `{"return": ...}` or `{"error": ...}` in order, with asynchronous
//! `{"event": ...}` lines interleaved. We tag commands with an `id` and keep
//! the connection open for the VM's lifetime: its EOF is how the worker
//! learns that QEMU exited (QEMU is daemonized, not our child).

use crate::error::{Error, IoContext, Result};
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
        cap_rx
            .await
            .map_err(|_| Error::Qmp("QMP closed during negotiation".into()))??;
        Ok(qmp)
    }

    /// Run a command and return its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
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
