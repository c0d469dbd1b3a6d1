//! Guest-side TCP connections for the host ([`Control::Connect`], protocol
//! v3): the agent dials `host:port` from inside the guest and carries the
//! connection's bytes on the stream, under the same flow control as an
//! exec's stdio (see `fastvm_agent_proto` for the frames).
//!
//! ```text
//!  Connect{host, port} -> dial (CONNECT_TIMEOUT) --fail--> Error{message}
//!                      -> Ok
//!     socket -> Data{Stdout} (within the stdout credit) ... Eof{Stdout}
//!     Data{Stdin} -> socket, Credit{Stdin}; Eof{Stdin} -> shutdown(write)
//!  both directions closed -> Exit{0}; a socket error -> Exit{1, error}
//!  Cancel / new SYNC (the stream's closer) -> socket closed, nothing sent
//! ```

use crate::exec::StreamParts;
use crate::session::Shared;
use bytes::Bytes;
use fastvm_agent_proto::{Control, ExitStatus, Fd, Frame, DATA_CHUNK};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long dialing may take before the host is told it failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Dial and carry one connection; see the module docs.
pub(crate) async fn run(
    shared: Arc<Shared>,
    stream: u32,
    host: String,
    port: u16,
    mut parts: StreamParts,
) {
    let start = Instant::now();
    let closer = parts.closer.clone();
    let dial = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)));
    let socket = tokio::select! {
        _ = closer.cancelled() => return shared.remove_stream(stream, &parts.detached),
        r = dial => r,
    };
    let socket = match socket {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return refuse(
                &shared,
                stream,
                &parts,
                format!("connect to {host}:{port} in the guest: {e}"),
            )
            .await
        }
        Err(_) => {
            let msg = format!(
                "connect to {host}:{port} in the guest: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            );
            return refuse(&shared, stream, &parts, msg).await;
        }
    };
    let _ = socket.set_nodelay(true);
    shared
        .out
        .send(Frame::Control {
            stream,
            msg: Control::Ok,
        })
        .await;
    let (mut rd, mut wr) = socket.into_split();
    let up = {
        let (shared, credit, detached) =
            (shared.clone(), parts.stdout.clone(), parts.detached.clone());
        async move {
            let mut buf = vec![0u8; DATA_CHUNK];
            let result = loop {
                let allowed = credit.take(DATA_CHUNK).await;
                match rd.read(&mut buf[..allowed]).await {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        credit.give((allowed - n) as u32);
                        if detached.load(Ordering::SeqCst) {
                            break Ok(());
                        }
                        let data = Bytes::copy_from_slice(&buf[..n]);
                        shared
                            .out
                            .send(Frame::Data {
                                stream,
                                fd: Fd::Stdout,
                                data,
                            })
                            .await;
                    }
                    Err(e) => break Err(format!("reading the connection: {e}")),
                }
            };
            if !detached.load(Ordering::SeqCst) {
                shared
                    .out
                    .send(Frame::Eof {
                        stream,
                        fd: Fd::Stdout,
                    })
                    .await;
            }
            result
        }
    };
    let stdin = parts.stdin.take();
    let down = {
        let shared = shared.clone();
        async move {
            let Some(mut rx) = stdin else { return Ok(()) };
            while let Some(item) = rx.recv().await {
                match item {
                    Some(data) => {
                        let n = data.len() as u32;
                        if let Err(e) = wr.write_all(&data).await {
                            return Err(format!("writing the connection: {e}"));
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
                    None => break,
                }
            }
            // EOF from the host (or the stream is gone): half-close.
            let _ = wr.shutdown().await;
            Ok(())
        }
    };
    let (up, down) = tokio::select! {
        _ = closer.cancelled() => return shared.remove_stream(stream, &parts.detached),
        r = async { tokio::join!(up, down) } => r,
    };
    let error = up.err().or(down.err());
    if !parts.detached.load(Ordering::SeqCst) {
        let status = ExitStatus {
            code: i32::from(error.is_some()),
            signal: None,
            timed_out: false,
            duration_ms: start.elapsed().as_millis().min(u64::MAX as u128) as u64,
            error,
        };
        shared
            .out
            .send(Frame::Control {
                stream,
                msg: Control::Exit(status),
            })
            .await;
    }
    shared.remove_stream(stream, &parts.detached);
}

async fn refuse(shared: &Shared, stream: u32, parts: &StreamParts, message: String) {
    if !parts.detached.load(Ordering::SeqCst) {
        shared
            .out
            .send(Frame::Control {
                stream,
                msg: Control::Error { message },
            })
            .await;
    }
    shared.remove_stream(stream, &parts.detached);
}
