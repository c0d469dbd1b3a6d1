//! VM consoles: one-shot tokens, waking a paused VM, and the WebSocket
//! session that carries a terminal (the guest's login shell on a PTY, run by
//! its agent) or the read-only serial console (`console.log`).
//!
//! ```text
//!  POST /v1/vms/{id}/console-token (API key)  -> token (fvc_ + 64 hex), 60 s, one use;
//!                                                the store keeps its SHA-256, VM, org, key
//!  GET  /v1/vms/{id}/console?session=T[&source=pty|serial][&cols=C&rows=R]   (WebSocket)
//!  GET  /v1/console?session=T[...]   the same, VM taken from the token (the web page's path)
//!     not a WebSocket upgrade -> 400 (the token is not spent)
//!     redeem T (compare-and-set): unknown 401 CONSOLE_TOKEN_INVALID, used 401 CONSOLE_TOKEN_USED,
//!       expired 401 CONSOLE_TOKEN_EXPIRED, minting key revoked 401 UNAUTHENTICATED,
//!       path names another VM 403 CONSOLE_TOKEN_WRONG_VM, VM deleted 404
//!     paused VM -> resumed (single flight per VM, shared with the services proxy's wake-ups)
//!     pty: VM must be running (409), open_pty on the worker (503 when the agent is away)
//!     serial: any state; open_serial (tail 64 KiB, then follow)
//!     -> 101, then the session below
//! ```
//!
//! The WebSocket protocol: binary frames are terminal bytes, both ways; text
//! frames are JSON control messages. Client -> server: `{"type":"resize",
//! "cols":C,"rows":R}` (1..=4096 each). Server -> client: `{"type":"ready",
//! "source":"pty"|"serial","vmId":...}` first, `{"type":"exit","code":N,
//! "signal":S|null}` when the shell ends, `{"type":"error","code":...,
//! "message":...}` before an error close. The server pings every
//! [`ConsoleConfig::ping_interval`]. Close codes:
//!
//! | code | meaning |
//! |------|---------|
//! | 1000 | the shell exited (after `exit`), the serial console ended (VM deleted), or the client closed |
//! | 1002 | the client broke the WebSocket protocol |
//! | 1007 | a text frame is not a valid control message (reason says why) |
//! | 1009 | a frame is larger than [`MAX_INPUT_FRAME`] (binary) or [`MAX_CONTROL_FRAME`] (text) |
//! | 1011 | the worker or the guest agent failed mid-session |
//! | 4000 | idle: no input and no output for [`ConsoleConfig::idle_timeout`] |
//!
//! Flow control end to end: output is read from the guest only when the
//! previous frame was handed to the socket, and keystrokes are taken from
//! the socket only when the guest took the previous ones, so a client that
//! never reads stalls its own shell (whose terminal blocks) and nothing else;
//! after [`ConsoleConfig::send_timeout`] without progress its connection is
//! dropped and the shell hung up. Each console is its own agent stream with
//! its own window: other consoles of the VM go on.
//!
//! Tokens live in the database (`console_tokens`, migration 0006), so any
//! control plane sharing it can redeem a token another one minted, and the
//! single use holds across them (the redeem is one conditional UPDATE).

use crate::auth::Caller;
use crate::error::{codes, ApiError};
use crate::store::{now_ms, Redeemed, VmRecord};
use crate::worker::{PtyEvent, PtyInput, PtySession, PtySpec};
use crate::AppState;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use axum::http::StatusCode;
use bytes::Bytes;
use fastvm_types::console::ConsoleTokenResponse;
use fastvm_types::{OrgId, VmId, VmStatus};
use futures::stream::BoxStream;
use futures::{SinkExt, StreamExt};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::time::Instant;

/// Machine-readable codes of refused console upgrades.
pub mod error_codes {
    /// No such token (never minted, or long forgotten).
    pub const CONSOLE_TOKEN_INVALID: &str = "CONSOLE_TOKEN_INVALID";
    /// The token was already used by another connection.
    pub const CONSOLE_TOKEN_USED: &str = "CONSOLE_TOKEN_USED";
    /// The token is older than its lifetime.
    pub const CONSOLE_TOKEN_EXPIRED: &str = "CONSOLE_TOKEN_EXPIRED";
    /// The token was minted for another VM than the one in the path.
    pub const CONSOLE_TOKEN_WRONG_VM: &str = "CONSOLE_TOKEN_WRONG_VM";
    /// The request is not a WebSocket upgrade.
    pub const WEBSOCKET_REQUIRED: &str = "WEBSOCKET_REQUIRED";
}

/// Prefix of console tokens (API keys start with `fvm_`).
pub const TOKEN_PREFIX: &str = "fvc_";
/// Largest binary frame (keystrokes, pasted text) a client may send.
pub const MAX_INPUT_FRAME: usize = 64 << 10;
/// Largest text frame (control message) a client may send.
pub const MAX_CONTROL_FRAME: usize = 4 << 10;
/// Largest message the WebSocket layer reads at all (bigger: the connection
/// fails with 1009 before the message is buffered).
pub const MAX_WS_MESSAGE: usize = 1 << 20;
/// How much of `console.log` a serial console shows first.
pub const SERIAL_TAIL_BYTES: u64 = 64 << 10;
/// Terminal size when the client gives none.
pub const DEFAULT_COLS: u16 = 80;
pub const DEFAULT_ROWS: u16 = 24;
/// Largest window dimension accepted (same as the worker's).
pub const MAX_DIMENSION: u16 = crate::worker::MAX_PTY_DIMENSION;
/// `TERM` of console shells (xterm.js and most terminals understand it).
pub const CONSOLE_TERM: &str = "xterm-256color";

pub mod close_codes {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL_ERROR: u16 = 1011;
    pub const IDLE_TIMEOUT: u16 = 4000;
}

/// Timing of consoles (defaults: token 60 s, idle 15 min, ping 25 s, send 30 s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// How long a token may wait before its connection.
    pub token_ttl: Duration,
    /// A console with no input and no output for this long is closed (4000).
    pub idle_timeout: Duration,
    /// The server pings the client this often (keeps proxies from closing it).
    pub ping_interval: Duration,
    /// A frame the client does not take within this time ends the connection.
    pub send_timeout: Duration,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            token_ttl: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(15 * 60),
            ping_interval: Duration::from_secs(25),
            send_timeout: Duration::from_secs(30),
        }
    }
}

/// Console state of the server: its configuration.
#[derive(Debug, Default)]
pub struct ConsoleState {
    pub(crate) config: ConsoleConfig,
}

impl ConsoleState {
    pub fn new(config: ConsoleConfig) -> Self {
        ConsoleState { config }
    }
}

/// A fresh console token.
fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// Which console a connection wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The guest's login shell on a PTY (needs the agent).
    #[default]
    Pty,
    /// The read-only kernel serial console (works when the agent does not).
    Serial,
}

/// What a redeemed token grants.
pub(crate) struct Grant {
    pub(crate) vm: VmRecord,
}

/// Messages of the server to the client (text frames).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerMessage<'a> {
    Ready {
        source: &'a str,
        #[serde(rename = "vmId")]
        vm_id: String,
    },
    Exit {
        code: i32,
        signal: Option<i32>,
    },
    Error {
        code: &'a str,
        message: &'a str,
    },
}

/// Messages of the client to the server (text frames).
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
enum ClientMessage {
    Resize { cols: u16, rows: u16 },
}

/// Why a size is refused, if it is.
pub(crate) fn check_size(cols: u16, rows: u16) -> Result<(), String> {
    if cols == 0 || rows == 0 || cols > MAX_DIMENSION || rows > MAX_DIMENSION {
        return Err(format!("terminal size {cols}x{rows} is out of range: cols and rows must be 1..={MAX_DIMENSION}"));
    }
    Ok(())
}

impl AppState {
    /// `POST /v1/vms/{id}/console-token`: a one-shot token for the caller's VM.
    pub(crate) async fn mint_console_token(
        &self,
        caller: Caller,
        id: VmId,
    ) -> Result<ConsoleTokenResponse, ApiError> {
        let vm = self.find_vm(caller.org_id, id).await?;
        if vm.status == VmStatus::Deleting {
            return Err(ApiError::invalid_state(format!("VM {id} is being deleted")));
        }
        let ttl = self.console().config.token_ttl;
        let token = new_token();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.store()
            .insert_console_token(
                &token,
                id,
                caller.org_id,
                caller.key_id,
                now_ms().saturating_add(ttl_ms),
            )
            .await?;
        tracing::info!(vm = %id, org = %caller.org_id, "console token minted");
        Ok(ConsoleTokenResponse {
            token,
            expires_in_sec: ttl.as_secs(),
            websocket_path: format!("/v1/vms/{id}/console"),
        })
    }

    /// Spend `token` for a console of `path_vm` (when the path names one).
    pub(crate) async fn redeem_console_token(
        &self,
        token: &str,
        path_vm: Option<VmId>,
    ) -> Result<Grant, ApiError> {
        use error_codes::*;
        let unauthorized =
            |code: &str, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
        let mint_hint = "mint a new one with POST /v1/vms/{id}/console-token (`fastvm console VM`)";
        if !token.starts_with(TOKEN_PREFIX) || token.len() > 256 {
            return Err(unauthorized(
                CONSOLE_TOKEN_INVALID,
                &format!("the session is not a console token; {mint_hint}"),
            ));
        }
        let rec = match self.store().redeem_console_token(token).await? {
            Redeemed::Fresh(rec) => rec,
            Redeemed::AlreadyUsed(_) => {
                return Err(unauthorized(
                    CONSOLE_TOKEN_USED,
                    &format!(
                        "this console token was already used (tokens are single use); {mint_hint}"
                    ),
                ))
            }
            Redeemed::Unknown => {
                return Err(unauthorized(
                    CONSOLE_TOKEN_INVALID,
                    &format!("unknown console token; {mint_hint}"),
                ))
            }
        };
        if rec.expires_at_ms <= now_ms() {
            let secs = self.console().config.token_ttl.as_secs();
            return Err(unauthorized(
                CONSOLE_TOKEN_EXPIRED,
                &format!(
                    "this console token expired (tokens must be used within {secs} s); {mint_hint}"
                ),
            ));
        }
        if let Some(vm) = path_vm.filter(|vm| *vm != rec.vm_id) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                CONSOLE_TOKEN_WRONG_VM,
                format!("this console token is for another VM than {vm}; mint one for {vm}"),
            ));
        }
        if !self.store().key_is_active(rec.key_id).await? {
            return Err(ApiError::unauthenticated(
                "the API key that minted this console token was revoked",
            ));
        }
        let vm = self.find_vm(rec.org_id, rec.vm_id).await?;
        Ok(Grant { vm })
    }

    /// Make sure the VM runs: a paused VM is resumed through the normal
    /// lifecycle path, once, however many consoles (and proxied requests)
    /// ask at the same time (the wake-up table of `crate::proxy`).
    pub(crate) async fn wake_for_console(
        &self,
        org: OrgId,
        id: VmId,
    ) -> Result<VmRecord, ApiError> {
        let rec = self.find_vm(org, id).await?;
        if !matches!(
            rec.status,
            VmStatus::Paused | VmStatus::Pausing | VmStatus::Resuming
        ) {
            return Ok(rec);
        }
        tracing::info!(vm = %id, "waking a paused VM for a console");
        crate::proxy::wake(self, org, id).await.map_err(|e| {
            ApiError::invalid_state(format!("the console could not resume the VM: {e}"))
        })?;
        self.find_vm(org, id).await
    }

    /// Open the console a granted connection asked for.
    pub(crate) async fn open_console(
        &self,
        grant: &Grant,
        source: Source,
        cols: u16,
        rows: u16,
    ) -> Result<Console, ApiError> {
        let (org, id) = (grant.vm.org_id, grant.vm.id);
        let vm = self.wake_for_console(org, id).await?;
        match source {
            Source::Pty => {
                if vm.status != VmStatus::Running {
                    return Err(ApiError::invalid_state(format!(
                        "VM {id} is {}; a terminal needs it running (the serial console, ?source=serial, works in any state)",
                        vm.status.as_str()
                    )));
                }
                let spec = PtySpec {
                    argv: Vec::new(),
                    env: Default::default(),
                    term: CONSOLE_TERM.to_owned(),
                    cols,
                    rows,
                };
                let session = self
                    .worker_for(&vm.worker_id)
                    .await?
                    .open_pty(id, spec)
                    .await?;
                tracing::info!(vm = %id, cols, rows, "console opened");
                Ok(Console {
                    vm: id,
                    body: ConsoleBody::Pty(session),
                })
            }
            Source::Serial => {
                let stream = self
                    .worker_for(&vm.worker_id)
                    .await?
                    .open_serial(id, SERIAL_TAIL_BYTES)
                    .await?;
                tracing::info!(vm = %id, "serial console opened");
                Ok(Console {
                    vm: id,
                    body: ConsoleBody::Serial(stream),
                })
            }
        }
    }

    pub(crate) fn console(&self) -> &ConsoleState {
        &self.inner.console
    }
}

/// An opened console, ready to be attached to a WebSocket.
pub(crate) struct Console {
    vm: VmId,
    body: ConsoleBody,
}

enum ConsoleBody {
    Pty(PtySession),
    Serial(BoxStream<'static, Result<Bytes, std::io::Error>>),
}

/// What the session loop does next, after a branch.
enum Step {
    Go,
    /// Send a last error message (if any), close with code and reason, end.
    Close(u16, String, Option<(&'static str, String)>),
    /// End without a close frame (the client is gone or stuck).
    Drop,
}

fn close_frame(code: u16, reason: &str) -> Message {
    // A close reason is at most 123 bytes; cut on a character boundary.
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from(&reason[..end]),
    }))
}

fn text(msg: &ServerMessage<'_>) -> Message {
    // Serializing these plain enums cannot fail.
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(msg).unwrap_or_default(),
    ))
}

/// Send one message within the send timeout; false when the client did not take it.
async fn send(
    ws: &mut futures::stream::SplitSink<WebSocket, Message>,
    msg: Message,
    within: Duration,
) -> bool {
    matches!(tokio::time::timeout(within, ws.send(msg)).await, Ok(Ok(())))
}

/// Serve `console` over `socket` until the shell exits, the client leaves,
/// the console idles out, or either side breaks the protocol.
pub(crate) async fn run(socket: WebSocket, console: Console, cfg: ConsoleConfig) {
    let vm = console.vm;
    let (mut tx, mut rx) = socket.split();
    let (source, mut input, mut events, mut serial) = match console.body {
        ConsoleBody::Pty(s) => ("pty", Some(s.input), Some(s.events), None),
        ConsoleBody::Serial(s) => ("serial", None, None, Some(s)),
    };
    if !send(
        &mut tx,
        text(&ServerMessage::Ready {
            source,
            vm_id: vm.to_string(),
        }),
        cfg.send_timeout,
    )
    .await
    {
        return;
    }
    let mut last_activity = Instant::now();
    let mut ping = tokio::time::interval_at(Instant::now() + cfg.ping_interval, cfg.ping_interval);
    // Input waiting for room in the terminal's queue (the socket is not read meanwhile).
    let mut pending: Option<PtyInput> = None;
    let mut told_read_only = false;
    let end = loop {
        let idle_at = last_activity + cfg.idle_timeout;
        let step = tokio::select! {
            permit = async { input.clone()?.reserve_owned().await.ok() }, if pending.is_some() => {
                match (permit, pending.take()) {
                    (Some(permit), Some(item)) => {
                        permit.send(item);
                        Step::Go
                    }
                    // The terminal no longer takes input: its exit follows on `events`.
                    _ => {
                        input = None;
                        Step::Go
                    }
                }
            }
            msg = rx.next(), if pending.is_none() => match msg {
                None => Step::Drop,
                Some(Err(e)) => {
                    let reason = e.to_string();
                    if reason.contains("too long") || reason.contains("Space limit") {
                        Step::Close(close_codes::TOO_BIG, format!("frame larger than {MAX_WS_MESSAGE} bytes"), None)
                    } else {
                        Step::Close(close_codes::PROTOCOL_ERROR, format!("WebSocket protocol error: {reason}"), None)
                    }
                }
                Some(Ok(Message::Binary(data))) => {
                    last_activity = Instant::now();
                    if data.len() > MAX_INPUT_FRAME {
                        Step::Close(close_codes::TOO_BIG, format!("binary frame of {} bytes exceeds {MAX_INPUT_FRAME}", data.len()), None)
                    } else if input.is_some() {
                        pending = Some(PtyInput::Data(data));
                        Step::Go
                    } else if source == "serial" && !told_read_only {
                        told_read_only = true;
                        let msg = text(&ServerMessage::Error { code: "READ_ONLY", message: "the serial console is read-only; input is ignored" });
                        if send(&mut tx, msg, cfg.send_timeout).await { Step::Go } else { Step::Drop }
                    } else {
                        Step::Go
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    last_activity = Instant::now();
                    if t.len() > MAX_CONTROL_FRAME {
                        Step::Close(close_codes::TOO_BIG, format!("text frame of {} bytes exceeds {MAX_CONTROL_FRAME}", t.len()), None)
                    } else {
                        match serde_json::from_str::<ClientMessage>(t.as_str()) {
                            Ok(ClientMessage::Resize { cols, rows }) => match check_size(cols, rows) {
                                Ok(()) => {
                                    if input.is_some() {
                                        pending = Some(PtyInput::Resize { cols, rows });
                                    }
                                    Step::Go
                                }
                                Err(e) => Step::Close(close_codes::INVALID_PAYLOAD, e, None),
                            },
                            Err(e) => Step::Close(
                                close_codes::INVALID_PAYLOAD,
                                format!("invalid control message (want {{\"type\":\"resize\",\"cols\":C,\"rows\":R}}): {e}"),
                                None,
                            ),
                        }
                    }
                }
                Some(Ok(Message::Close(_))) => Step::Close(close_codes::NORMAL, "client closed".into(), None),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => Step::Go,
            },
            ev = async { events.as_mut()?.next().await }, if events.is_some() => match ev {
                Some(Ok(PtyEvent::Output(data))) => {
                    last_activity = Instant::now();
                    if send(&mut tx, Message::Binary(data), cfg.send_timeout).await { Step::Go } else { Step::Drop }
                }
                Some(Ok(PtyEvent::Exit(exit))) => {
                    let _ = send(&mut tx, text(&ServerMessage::Exit { code: exit.code, signal: exit.signal }), cfg.send_timeout).await;
                    Step::Close(close_codes::NORMAL, format!("the shell exited with code {}", exit.code), None)
                }
                Some(Err(e)) => Step::Close(close_codes::INTERNAL_ERROR, "the terminal failed".into(), Some((codes::AGENT_UNAVAILABLE, e.to_string()))),
                None => Step::Close(close_codes::INTERNAL_ERROR, "the terminal ended without an exit status".into(), None),
            },
            chunk = async { serial.as_mut()?.next().await }, if serial.is_some() => match chunk {
                Some(Ok(data)) => {
                    last_activity = Instant::now();
                    if send(&mut tx, Message::Binary(data), cfg.send_timeout).await { Step::Go } else { Step::Drop }
                }
                Some(Err(e)) => Step::Close(close_codes::INTERNAL_ERROR, "reading the serial console failed".into(), Some((codes::WORKER_ERROR, e.to_string()))),
                None => Step::Close(close_codes::NORMAL, "the serial console ended: the VM was deleted".into(), None),
            },
            _ = ping.tick() => {
                if send(&mut tx, Message::Ping(Bytes::new()), cfg.send_timeout).await { Step::Go } else { Step::Drop }
            }
            _ = tokio::time::sleep_until(idle_at) => {
                let secs = cfg.idle_timeout.as_secs();
                Step::Close(close_codes::IDLE_TIMEOUT, format!("idle for {secs} s"), Some(("IDLE_TIMEOUT", format!("closed after {secs} s without input or output"))))
            }
        };
        match step {
            Step::Go => continue,
            other => break other,
        }
    };
    match end {
        Step::Close(code, reason, message) => {
            tracing::info!(%vm, source, code, %reason, "console closed");
            if let Some((code, message)) = &message {
                let _ = send(
                    &mut tx,
                    text(&ServerMessage::Error { code, message }),
                    cfg.send_timeout,
                )
                .await;
            }
            let _ = send(&mut tx, close_frame(code, &reason), cfg.send_timeout).await;
        }
        _ => tracing::info!(%vm, source, "console dropped (client gone or not reading)"),
    }
    // Dropping the events hangs up the terminal (its process group is killed).
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_prefixed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
    }

    #[test]
    fn client_messages() {
        assert!(matches!(
            serde_json::from_str::<ClientMessage>(r#"{"type":"resize","cols":80,"rows":24}"#),
            Ok(ClientMessage::Resize { cols: 80, rows: 24 })
        ));
        for bad in [
            r#"{"type":"resize","cols":-1,"rows":24}"#,
            r#"{"type":"resize","cols":80}"#,
            r#"{"type":"nope"}"#,
            "garbage",
            r#"{"type":"resize","cols":1,"rows":1,"x":1}"#,
        ] {
            assert!(serde_json::from_str::<ClientMessage>(bad).is_err(), "{bad}");
        }
        assert!(check_size(80, 24).is_ok());
        assert!(check_size(0, 24).is_err() && check_size(80, MAX_DIMENSION + 1).is_err());
    }

    #[test]
    fn server_messages_and_close_reasons() {
        let ready = serde_json::to_string(&ServerMessage::Ready {
            source: "pty",
            vm_id: "v".into(),
        })
        .unwrap_or_default();
        assert_eq!(ready, r#"{"type":"ready","source":"pty","vmId":"v"}"#);
        let exit = serde_json::to_string(&ServerMessage::Exit {
            code: 130,
            signal: None,
        })
        .unwrap_or_default();
        assert_eq!(exit, r#"{"type":"exit","code":130,"signal":null}"#);
        let long = "é".repeat(100);
        match close_frame(1000, &long) {
            Message::Close(Some(f)) => {
                assert!(f.reason.len() <= 123 && long.starts_with(f.reason.as_str()))
            }
            other => panic!("not a close frame: {other:?}"),
        }
    }
}
