//! One host session over the port: decode frames, dispatch them, answer.
//!
//! ```text
//!  host: SYNC(n) Hello{n}         -> agent: detaches old streams,
//!                                    answers SYNC(n) HelloAck{n}
//!  host: Configure / Exec / Connect / Ping / Shutdown on stream s (Resize: no answer)
//!                                 -> agent: Ok | Error | Started, Data*, Eof, Exit on s
//!  host: Credit(s, fd, n)         -> the stream's pump may send n more bytes
//! ```
//!
//! A new SYNC (host reconnect, runtime restart, restore from a snapshot)
//! detaches every running stream: its process keeps running, its output is
//! drained and dropped, since no host is waiting for it any more.

use crate::exec::{self, Credit, StreamHandle};
use crate::reaper::Reaper;
use bytes::{Bytes, BytesMut};
use fastvm_agent_proto::{encode, Control, Fd, Frame, FrameCodec, PROTOCOL_VERSION};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::mpsc;
use tokio_util::codec::Decoder;

/// Frames to the host; cheap to clone.
#[derive(Clone)]
pub(crate) struct Out {
    tx: mpsc::Sender<Bytes>,
}

impl Out {
    pub(crate) async fn send(&self, frame: Frame) {
        match encode(frame) {
            Ok(buf) => {
                let _ = self.tx.send(buf.freeze()).await;
            }
            Err(e) => crate::log(&format!("cannot encode frame: {e}")),
        }
    }
}

/// State shared by all streams of the agent.
pub(crate) struct Shared {
    pub(crate) env: RwLock<BTreeMap<String, String>>,
    /// Working directory and user of execs that name none (see
    /// [`fastvm_agent_proto::ExecDefaults`]); replaced by every Configure.
    pub(crate) exec_defaults: RwLock<Option<fastvm_agent_proto::ExecDefaults>>,
    pub(crate) reaper: Reaper,
    pub(crate) out: Out,
    streams: Mutex<HashMap<u32, StreamHandle>>,
    boot_id: String,
}

impl Shared {
    /// Forget stream `id` if it is still the one owning `token` (after a
    /// session reset a new stream may reuse the id).
    pub(crate) fn remove_stream(&self, id: u32, token: &Arc<std::sync::atomic::AtomicBool>) {
        if let Ok(mut s) = self.streams.lock() {
            if s.get(&id).is_some_and(|h| h.owns(token)) {
                s.remove(&id);
            }
        }
    }

    fn with_stream<R>(&self, id: u32, f: impl FnOnce(&StreamHandle) -> R) -> Option<R> {
        self.streams.lock().ok()?.get(&id).map(f)
    }

    fn detach_all(&self) {
        if let Ok(mut streams) = self.streams.lock() {
            for (_, s) in streams.drain() {
                s.detach();
            }
        }
    }
}

pub(crate) async fn serve(path: &Path, reaper: Reaper) -> std::io::Result<()> {
    let mut port = crate::port::open(path)?;
    let shared = Arc::new(Shared {
        env: RwLock::new(BTreeMap::new()),
        exec_defaults: RwLock::new(None),
        reaper,
        out: Out {
            tx: port.tx.clone(),
        },
        streams: Mutex::new(HashMap::new()),
        boot_id: format!("{:016x}", rand::random::<u64>()),
    });
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    while let Some(chunk) = port.rx.recv().await {
        buf.extend_from_slice(&chunk);
        while let Ok(Some(frame)) = codec.decode(&mut buf) {
            handle(&shared, frame).await;
        }
    }
    Ok(())
}

async fn reply(shared: &Shared, stream: u32, msg: Control) {
    shared.out.send(Frame::Control { stream, msg }).await;
}

async fn handle(shared: &Arc<Shared>, frame: Frame) {
    match frame {
        Frame::Sync { .. } => shared.detach_all(),
        Frame::Control { stream, msg } => handle_control(shared, stream, msg).await,
        Frame::Data {
            stream,
            fd: Fd::Stdin,
            data,
        } => {
            let tx = shared.with_stream(stream, |s| s.stdin.clone()).flatten();
            if let Some(tx) = tx {
                if !tx.send(data) {
                    crate::log(&format!(
                        "stream {stream}: the host sent stdin past its window; input dropped, stdin closed"
                    ));
                }
            }
        }
        Frame::Eof {
            stream,
            fd: Fd::Stdin,
        } => {
            let tx = shared.with_stream(stream, |s| s.stdin.clone()).flatten();
            if let Some(tx) = tx {
                tx.finish();
            }
        }
        Frame::Credit { stream, fd, bytes } => {
            let credit: Option<Arc<Credit>> =
                shared.with_stream(stream, |s| s.credit(fd)).flatten();
            if let Some(c) = credit {
                c.give(bytes);
            }
        }
        Frame::Invalid {
            stream: Some(stream),
            reason,
        } => reply(shared, stream, Control::Error { message: reason }).await,
        Frame::Invalid {
            stream: None,
            reason,
        } => crate::log(&format!("ignored invalid input: {reason}")),
        Frame::Data { .. } | Frame::Eof { .. } => {
            crate::log("ignored output-direction frame from host")
        }
    }
}

/// Enter a new stream in the table; a busy id is answered with an error.
async fn register(shared: &Arc<Shared>, stream: u32, handle: StreamHandle) -> bool {
    let duplicate = match shared.streams.lock() {
        Ok(mut streams) => match streams.entry(stream) {
            std::collections::hash_map::Entry::Occupied(_) => true,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(handle);
                false
            }
        },
        Err(_) => true,
    };
    if duplicate {
        reply(
            shared,
            stream,
            Control::Error {
                message: format!("stream {stream} is busy"),
            },
        )
        .await;
    }
    !duplicate
}

/// `Ok`, or `Error` with the message.
async fn answer(shared: &Arc<Shared>, stream: u32, done: Result<(), String>) {
    let msg = match done {
        Ok(()) => Control::Ok,
        Err(message) => Control::Error { message },
    };
    reply(shared, stream, msg).await;
}

async fn handle_control(shared: &Arc<Shared>, stream: u32, msg: Control) {
    match msg {
        Control::Hello { version, nonce } => {
            shared.out.send(Frame::Sync { nonce }).await;
            let ack = Control::HelloAck {
                version: PROTOCOL_VERSION,
                nonce,
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                boot_id: shared.boot_id.clone(),
            };
            reply(shared, 0, ack).await;
            if version != PROTOCOL_VERSION {
                crate::log(&format!(
                    "host speaks protocol v{version}, agent v{PROTOCOL_VERSION}"
                ));
            }
        }
        Control::Configure(cfg) => {
            let answer = match crate::config::apply(shared, cfg).await {
                Ok(()) => Control::Ok,
                Err(e) => Control::Error {
                    message: e.to_string(),
                },
            };
            reply(shared, stream, answer).await;
        }
        Control::Exec(spec) => {
            if stream == 0 {
                return reply(
                    shared,
                    stream,
                    Control::Error {
                        message: "stream 0 is reserved".into(),
                    },
                )
                .await;
            }
            let pty = match &spec.pty {
                Some(p) => match crate::pty::open(p.cols, p.rows) {
                    Ok(pty) => Some(pty),
                    Err(e) => {
                        let error = Some(format!("cannot open a pseudo-terminal: {e}"));
                        let status = fastvm_agent_proto::ExitStatus {
                            code: 127,
                            signal: None,
                            timed_out: false,
                            duration_ms: 0,
                            error,
                        };
                        return reply(shared, stream, Control::Exit(status)).await;
                    }
                },
                None => None,
            };
            let (handle, parts) = StreamHandle::new(spec.stdin, pty);
            if !register(shared, stream, handle).await {
                return;
            }
            tokio::spawn(exec::run(shared.clone(), stream, spec, parts));
        }
        Control::Connect { host, port } => {
            if stream == 0 || host.is_empty() || host.len() > fastvm_agent_proto::MAX_CONNECT_HOST {
                let message = if stream == 0 {
                    "stream 0 is reserved".to_owned()
                } else {
                    format!(
                        "host must be 1..={} bytes",
                        fastvm_agent_proto::MAX_CONNECT_HOST
                    )
                };
                return reply(shared, stream, Control::Error { message }).await;
            }
            let (handle, parts) = StreamHandle::new(true, None);
            if register(shared, stream, handle).await {
                tokio::spawn(crate::tcp::run(shared.clone(), stream, host, port, parts));
            }
        }
        Control::Signal { signal } => {
            let pid = shared.with_stream(stream, |s| s.pid()).flatten();
            match pid {
                Some(pid) => {
                    exec::kill_group(pid, signal);
                    reply(shared, stream, Control::Ok).await;
                }
                None => {
                    reply(
                        shared,
                        stream,
                        Control::Error {
                            message: "no such process".into(),
                        },
                    )
                    .await
                }
            }
        }
        Control::Resize { cols, rows } => {
            // No answer: a resize is fire-and-forget (an Error would end the host's stream).
            if shared.with_stream(stream, |s| s.resize(cols, rows)) != Some(true) {
                crate::log(&format!(
                    "ignored resize of stream {stream}: no such terminal"
                ));
            }
        }
        Control::Cancel => {
            let handle = shared
                .streams
                .lock()
                .ok()
                .and_then(|mut s| s.remove(&stream));
            if let Some(pid) = handle.and_then(|h| h.cancel()) {
                exec::kill_group(pid, libc::SIGKILL);
            }
        }
        Control::Ping => reply(shared, stream, Control::Ok).await,
        Control::Mount {
            source,
            target,
            fstype,
            options,
            read_only,
        } => {
            // mount(2) of a network file system can block for seconds: off
            // the session loop, answered when done.
            let shared = shared.clone();
            tokio::spawn(async move {
                let done = tokio::task::spawn_blocking(move || {
                    crate::mount::mount(&source, &target, &fstype, &options, read_only)
                })
                .await
                .unwrap_or_else(|e| Err(format!("mount task: {e}")));
                answer(&shared, stream, done).await;
            });
        }
        Control::Unmount { target, lazy } => {
            let shared = shared.clone();
            tokio::spawn(async move {
                let done =
                    tokio::task::spawn_blocking(move || crate::mount::unmount(&target, lazy))
                        .await
                        .unwrap_or_else(|e| Err(format!("unmount task: {e}")));
                answer(&shared, stream, done).await;
            });
        }
        Control::Shutdown { reboot } => {
            reply(shared, stream, Control::Ok).await;
            // Give the writer thread a moment to flush the answer.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            if reboot {
                crate::init::reboot();
            }
            crate::init::power_off();
        }
        other => crate::log(&format!("ignored unexpected message from host: {other:?}")),
    }
}
