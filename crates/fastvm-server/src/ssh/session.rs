//! One SSH channel bridged to a VM: session channels (shell, exec, sftp;
//! with or without a PTY) and direct-tcpip channels (`ssh -L`). See the
//! parent module for the picture.

use super::{valid_env_name, Grant};
use crate::worker::{ExecEvent, ExecRequest};
use crate::worker::{PtyEvent, PtyInput, PtySpec};
use crate::AppState;
use bytes::Bytes;
use fastvm_types::VmStatus;
use futures::StreamExt as _;
use russh::server::Msg;
use russh::{Channel, ChannelMsg, Sig};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// OpenSSH's SFTP server in the guest image (Debian `openssh-sftp-server`).
pub const SFTP_SERVER: &str = "/usr/lib/openssh/sftp-server";
/// Largest terminal dimension passed on (bigger sizes are clamped).
const MAX_DIMENSION: u32 = 4096;
/// Most environment variables a client may set on one channel.
const MAX_ENV: usize = 64;
/// Chunks of stdin queued for the guest before the channel stops reading.
const STDIN_QUEUE: usize = 8;

/// What a channel acts for.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub state: AppState,
    pub grant: Grant,
}

/// A counted channel of a connection (see `MAX_CHANNELS`); released on drop.
pub(crate) struct ChannelSlot(pub Arc<AtomicUsize>);

impl Drop for ChannelSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ctx {
    /// Make sure the VM runs: a paused VM is resumed (one resume however
    /// many connections ask, shared with the services proxy and consoles).
    async fn ensure_running(&self) -> Result<(), String> {
        let Grant { org, vm } = self.grant;
        let rec = self
            .state
            .store()
            .get_vm(org, vm)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("VM {vm} no longer exists"))?;
        match rec.status {
            VmStatus::Running => Ok(()),
            VmStatus::Paused | VmStatus::Pausing | VmStatus::Resuming => {
                tracing::info!(%vm, "waking a paused VM for SSH");
                crate::proxy::wake(&self.state, org, vm).await
            }
            other => Err(format!("VM {vm} is {}", other.as_str())),
        }
    }
}

/// A terminal dimension from the client: 0 (unknown, e.g. no local
/// terminal) becomes `default`, anything else is clamped to 1..=4096.
fn dimension(n: u32, default: u16) -> u16 {
    if n == 0 {
        default
    } else {
        n.min(MAX_DIMENSION) as u16
    }
}

fn signal_number(sig: &Sig) -> Option<i32> {
    Some(match sig {
        Sig::ABRT => libc::SIGABRT,
        Sig::ALRM => libc::SIGALRM,
        Sig::FPE => libc::SIGFPE,
        Sig::HUP => libc::SIGHUP,
        Sig::ILL => libc::SIGILL,
        Sig::INT => libc::SIGINT,
        Sig::KILL => libc::SIGKILL,
        Sig::PIPE => libc::SIGPIPE,
        Sig::QUIT => libc::SIGQUIT,
        Sig::SEGV => libc::SIGSEGV,
        Sig::TERM => libc::SIGTERM,
        Sig::USR1 => libc::SIGUSR1,
        Sig::Custom(_) => return None,
    })
}

enum Run {
    Shell,
    Exec(String),
    Sftp,
}

/// A session channel: wait for its request, run it, report the exit.
pub(crate) async fn run_session(ctx: Ctx, channel: Channel<Msg>, _slot: ChannelSlot) {
    let (mut rd, wr) = channel.split();
    let mut pty: Option<(String, u16, u16)> = None;
    let mut env = BTreeMap::new();
    let run = loop {
        match rd.wait().await {
            None | Some(ChannelMsg::Close) => return,
            Some(ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                ..
            }) => {
                let term = if term.is_empty() || term.len() > 64 || term.contains('\0') {
                    "xterm".to_owned()
                } else {
                    term
                };
                pty = Some((term, dimension(col_width, 80), dimension(row_height, 24)));
            }
            Some(ChannelMsg::WindowChange {
                col_width,
                row_height,
                ..
            }) => {
                if let Some(p) = pty.as_mut() {
                    (p.1, p.2) = (dimension(col_width, p.1), dimension(row_height, p.2));
                }
            }
            Some(ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            }) => {
                if valid_env_name(&variable_name)
                    && env.len() < MAX_ENV
                    && variable_value.len() <= 4096
                    && !variable_value.contains('\0')
                {
                    env.insert(variable_name, variable_value);
                }
            }
            Some(ChannelMsg::RequestShell { .. }) => break Run::Shell,
            Some(ChannelMsg::Exec { command, .. }) => {
                break Run::Exec(String::from_utf8_lossy(&command).into_owned())
            }
            Some(ChannelMsg::RequestSubsystem { name, .. }) if name == "sftp" => break Run::Sftp,
            Some(_) => {}
        }
    };
    if let Err(e) = ctx.ensure_running().await {
        let _ = wr
            .extended_data_bytes(1, Bytes::from(format!("fastvm: {e}\r\n")))
            .await;
        return finish(&wr, 255).await;
    }
    let code = match (run, pty) {
        (Run::Sftp, _) => exec(&ctx, rd, &wr, vec![SFTP_SERVER.into()], env).await,
        (Run::Shell, Some((term, cols, rows))) => {
            terminal(&ctx, rd, &wr, Vec::new(), env, term, cols, rows).await
        }
        (Run::Exec(cmd), Some((term, cols, rows))) => {
            let argv = vec!["/bin/sh".into(), "-c".into(), cmd];
            terminal(&ctx, rd, &wr, argv, env, term, cols, rows).await
        }
        (Run::Shell, None) => exec(&ctx, rd, &wr, vec!["/bin/sh".into(), "-l".into()], env).await,
        (Run::Exec(cmd), None) => {
            let argv = vec!["/bin/sh".into(), "-c".into(), cmd];
            exec(&ctx, rd, &wr, argv, env).await
        }
    };
    if let Some(code) = code {
        finish(&wr, code).await;
    }
}

/// Exit status (before EOF and close, as OpenSSH expects).
async fn finish(wr: &russh::ChannelWriteHalf<Msg>, code: u32) {
    let _ = wr.exit_status(code).await;
    let _ = wr.eof().await;
    let _ = wr.close().await;
}

fn exit_code(code: i32) -> u32 {
    u32::try_from(code).unwrap_or(255)
}

/// A process on a PTY. `None`: the client went away (nothing to report).
#[allow(clippy::too_many_arguments)]
async fn terminal(
    ctx: &Ctx,
    mut rd: russh::ChannelReadHalf,
    wr: &russh::ChannelWriteHalf<Msg>,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    term: String,
    cols: u16,
    rows: u16,
) -> Option<u32> {
    let spec = PtySpec {
        argv,
        env,
        term,
        cols,
        rows,
    };
    let opened = match ctx.state.worker_of(ctx.grant.vm).await {
        Ok(worker) => worker.open_pty(ctx.grant.vm, spec).await,
        Err(e) => Err(e),
    };
    let session = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = wr
                .extended_data_bytes(1, Bytes::from(format!("fastvm: {e}\r\n")))
                .await;
            return Some(255);
        }
    };
    let input = session.input;
    let mut events = session.events;
    // Client -> guest, until the client closes the channel.
    let mut reader = tokio::spawn(async move {
        while let Some(msg) = rd.wait().await {
            let sent = match msg {
                ChannelMsg::Data { data } => input.send(PtyInput::Data(data)).await,
                ChannelMsg::WindowChange {
                    col_width,
                    row_height,
                    ..
                } => {
                    input
                        .send(PtyInput::Resize {
                            cols: dimension(col_width, 80),
                            rows: dimension(row_height, 24),
                        })
                        .await
                }
                ChannelMsg::Signal { signal } => match signal_number(&signal) {
                    Some(n) => input.send(PtyInput::Signal(n)).await,
                    None => Ok(()),
                },
                ChannelMsg::Close => return,
                // A terminal has no half-close: EOF changes nothing.
                _ => Ok(()),
            };
            if sent.is_err() {
                // The process is gone; keep draining until the close.
                continue;
            }
        }
    });
    loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(PtyEvent::Output(data))) => {
                    if wr.data_bytes(data).await.is_err() {
                        reader.abort();
                        return None;
                    }
                }
                Some(Ok(PtyEvent::Exit(exit))) => {
                    reader.abort();
                    return Some(exit_code(exit.code));
                }
                Some(Err(e)) => {
                    let _ = wr.extended_data_bytes(1, Bytes::from(format!("\r\nfastvm: {e}\r\n"))).await;
                    reader.abort();
                    return Some(255);
                }
                None => {
                    reader.abort();
                    return Some(255);
                }
            },
            _ = &mut reader => return None,
        }
    }
}

/// A process with stdin/stdout/stderr as the channel's data, its extended
/// data 1 and its EOF. `None`: the client went away.
///
/// Stdin is moved by its own task, so output keeps flowing while stdin
/// waits for the guest (`cat` of a large input: the process only reads more
/// once its output was taken).
async fn exec(
    ctx: &Ctx,
    mut rd: russh::ChannelReadHalf,
    wr: &russh::ChannelWriteHalf<Msg>,
    argv: Vec<String>,
    env: BTreeMap<String, String>,
) -> Option<u32> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(STDIN_QUEUE);
    let input =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
        );
    let req = ExecRequest {
        argv,
        env,
        ..Default::default()
    };
    let started = match ctx.state.worker_of(ctx.grant.vm).await {
        Ok(worker) => {
            worker
                .exec_with_input(ctx.grant.vm, req, Box::pin(input))
                .await
        }
        Err(e) => Err(e),
    };
    let mut events = match started {
        Ok(e) => e,
        Err(e) => {
            let _ = wr
                .extended_data_bytes(1, Bytes::from(format!("fastvm: {e}\n")))
                .await;
            return Some(255);
        }
    };
    // Client -> guest stdin, until the client closes the channel.
    let mut reader = tokio::spawn(async move {
        let mut stdin = Some(tx);
        while let Some(msg) = rd.wait().await {
            match msg {
                ChannelMsg::Data { data } => {
                    if let Some(tx) = &stdin {
                        // Waits while the guest does not take it (flow control).
                        if tx.send(data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                ChannelMsg::Eof => stdin = None,
                ChannelMsg::Close => return,
                _ => {}
            }
        }
    });
    let code = loop {
        tokio::select! {
            ev = events.next() => match ev {
                Some(Ok(ExecEvent::Stdout(d))) => {
                    if wr.data_bytes(d).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(ExecEvent::Stderr(d))) => {
                    if wr.extended_data_bytes(1, d).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(ExecEvent::Exit(st))) => {
                    if let Some(e) = st.error.filter(|_| st.code == 127) {
                        let _ = wr.extended_data_bytes(1, Bytes::from(format!("fastvm: {e}\n"))).await;
                    }
                    break Some(exit_code(st.code));
                }
                Some(Err(e)) => {
                    let _ = wr.extended_data_bytes(1, Bytes::from(format!("fastvm: {e}\n"))).await;
                    break Some(255);
                }
                None => break Some(255),
            },
            _ = &mut reader => return None,
        }
    };
    reader.abort();
    code
}

/// `ssh -L`: a connection dialed inside the guest, spliced to the channel.
pub(crate) async fn run_direct_tcpip(
    ctx: Ctx,
    channel: Channel<Msg>,
    reply: russh::server::ChannelOpenHandle,
    host: String,
    port: u16,
    _slot: ChannelSlot,
) {
    if let Err(e) = ctx.ensure_running().await {
        tracing::debug!(error = %e, "SSH forward refused");
        reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
        return;
    }
    let opened = match ctx.state.worker_of(ctx.grant.vm).await {
        Ok(worker) => worker.open_guest_tcp(ctx.grant.vm, &host, port).await,
        Err(e) => Err(e),
    };
    let mut guest = match opened {
        Ok(g) => g,
        Err(e) => {
            tracing::debug!(error = %e, vm = %ctx.grant.vm, "SSH forward: guest connect failed");
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return;
        }
    };
    reply.accept().await;
    let mut stream = channel.into_stream();
    if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut guest).await {
        tracing::debug!(error = %e, "SSH forward ended");
    }
}
