//! The host <-> guest protocol of the Fast VM agent.
//!
//! The agent (PID 1 in the guest) and the worker (on the host) talk over one
//! virtio-serial port. That port is a plain byte pipe that survives neither a
//! host reconnect nor a snapshot restore cleanly: bytes of an old session may
//! still sit in the queue. So the protocol is built to *resynchronise*:
//!
//! ```text
//!  byte stream:  ... garbage ... | SYNC(nonce) | frame | frame | ... | SYNC(nonce') | frame ...
//!
//!  SYNC   = b"FVMSYNC1" ++ nonce (u64 LE)          16 bytes, no header
//!  frame  = magic 0xFA57 (u16 LE) | kind (u8) | stream (u32 LE) | len (u32 LE) | payload
//! ```
//!
//! Each side starts *unsynced* and drops bytes until it sees a SYNC marker.
//! The host opens every session with `SYNC(nonce)` + [`Control::Hello`]; the
//! agent answers `SYNC(nonce)` + [`Control::HelloAck`]. A frame with a bad
//! magic, an unknown kind or an oversized length drops the decoder back to
//! unsynced and is reported as [`Frame::Invalid`]: the decoder never panics,
//! never errors, and never buffers more than [`MAX_PAYLOAD`] + header bytes.
//!
//! Streams multiplex many concurrent operations: stream 0 is the session
//! itself, every other id is chosen by the host for one request (an exec, a
//! configure, a shutdown). Output data is flow-controlled per stream and fd:
//! the agent may have at most [`STREAM_WINDOW`] unacknowledged bytes in flight
//! and the host hands back [`Frame::Credit`] as its consumer drains them, so a
//! guest printing faster than the host reads blocks in the guest, exhausting
//! neither side's memory.
//!
//! Terminals (protocol v2): an [`ExecSpec`] with a [`PtySpec`] runs its
//! process on a pseudo-terminal in the guest (own session, the PTY as its
//! controlling terminal, so job control and Ctrl-C work). Its stdin is always
//! open: `Data{Stdin}` frames are keystrokes written to the PTY; everything
//! the terminal prints comes back as `Data{Stdout}` (a PTY has no separate
//! stderr), then `Eof{Stdout}` and the usual [`Control::Exit`].
//! [`Control::Resize`] changes the window size (the foreground process
//! group gets SIGWINCH). An empty argv with a PTY means the login shell
//! (`/bin/bash -l`, else `/bin/sh -l`; a guest with neither answers
//! `Exit{code: 127, error}`).
//!
//! ```text
//!  host: Exec{argv: [], pty: {term, cols, rows}} on s  -> agent: Started{pid}
//!  host: Data(s, stdin, keys)   -> written to the PTY master; Credit(s, stdin, n) back
//!  agent: Data(s, stdout, out)  <- read from the PTY master under the stdout window
//!  host: Resize{cols, rows} on s -> TIOCSWINSZ (no answer)
//!  agent: Eof(s, stdout), Exit{code, signal}
//! ```
//!
//! Guest-side TCP connections (protocol v3): [`Control::Connect`] asks the
//! agent to dial `host:port` *from inside the guest* (so `127.0.0.1` is the
//! guest's loopback, and the VM's firewall, which filters its network
//! interface, is not involved). The stream then carries the connection's
//! bytes like an exec's stdio: host-to-guest bytes are `Data{Stdin}` under the
//! stdin window (`Credit{Stdin}` as the agent writes them to the socket),
//! guest-to-host bytes are `Data{Stdout}` under the stdout window.
//! `Eof{Stdin}` half-closes the socket (shutdown of its write side);
//! `Eof{Stdout}` says the peer closed. The last message is
//! [`Control::Exit`] (code 0, or 1 with `error` set when the socket failed);
//! [`Control::Cancel`] closes the socket at once.
//!
//! ```text
//!  host: Connect{host, port} on s  -> agent: Ok (connected) | Error{message} (last)
//!  host: Data(s, stdin, b)   -> written to the socket; Credit(s, stdin, n) back
//!  agent: Data(s, stdout, b) <- read from the socket under the stdout window
//!  host: Eof(s, stdin)       -> shutdown(SHUT_WR)
//!  agent: Eof(s, stdout), Exit{code: 0}   once both directions are closed
//! ```
//!
//! Both ends enforce the windows against a peer that ignores them (no
//! version change: a correct peer never notices). The host cuts a stream
//! whose guest sends past its window, sends on stdin, or sends a message the
//! stream does not expect (see the worker's `agent` module); the agent drops
//! stdin bytes past the stdin window and closes that stream's stdin.
//!
//! Versions: v1 had no terminals, v2 no guest TCP connections. A v3 host
//! still drives a v1 agent (e.g. in a VM restored from an old snapshot) for
//! everything else ([`MIN_PROTOCOL_VERSION`]); it refuses PTY requests to a
//! v1 agent and connections to a v1/v2 agent.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tokio_util::codec::{Decoder, Encoder};

/// Version of this protocol; exchanged in [`Control::Hello`] / [`Control::HelloAck`].
pub const PROTOCOL_VERSION: u32 = 4;
/// Oldest agent protocol a host still talks to (v1: no PTYs).
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// First protocol version with [`PtySpec`] and [`Control::Resize`].
pub const PTY_PROTOCOL_VERSION: u32 = 2;
/// First protocol version with [`Control::Connect`].
pub const CONNECT_PROTOCOL_VERSION: u32 = 3;
/// First protocol version with [`Control::Mount`] and [`Control::Unmount`].
pub const MOUNT_PROTOCOL_VERSION: u32 = 4;
/// Longest host name a [`Control::Connect`] may carry (a DNS name's limit).
pub const MAX_CONNECT_HOST: usize = 253;
/// Start of the `Error` message of an [`Control::Unmount`] refused because
/// the file system is in use.
pub const UNMOUNT_BUSY: &str = "busy:";
/// Resynchronisation marker; followed by an 8-byte nonce.
pub const SYNC_MAGIC: [u8; 8] = *b"FVMSYNC1";
const SYNC_LEN: usize = SYNC_MAGIC.len() + 8;
/// First two bytes of every frame.
pub const FRAME_MAGIC: u16 = 0xFA57;
/// Bytes of a frame header: magic, kind, stream, length.
pub const HEADER_LEN: usize = 2 + 1 + 4 + 4;
/// Largest payload a frame may carry; larger lengths are refused unread.
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest data chunk a sender puts in one frame.
pub const DATA_CHUNK: usize = 64 << 10;
/// Unacknowledged output bytes allowed in flight per stream and fd.
pub const STREAM_WINDOW: u32 = 256 << 10;

/// The standard streams of a process, as carried in data frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fd {
    Stdin,
    Stdout,
    Stderr,
}

impl Fd {
    fn to_u8(self) -> u8 {
        match self {
            Fd::Stdin => 0,
            Fd::Stdout => 1,
            Fd::Stderr => 2,
        }
    }
    fn from_u8(b: u8) -> Option<Fd> {
        match b {
            0 => Some(Fd::Stdin),
            1 => Some(Fd::Stdout),
            2 => Some(Fd::Stderr),
            _ => None,
        }
    }
}

/// How a process should be run by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecSpec {
    /// argv; `argv[0]` is looked up in PATH.
    pub argv: Vec<String>,
    /// Extra environment, on top of the VM-wide env set by [`Control::Configure`].
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory; when absent, [`ExecDefaults::cwd`], else `/root`
    /// (`/` when the guest has no `/root`).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the whole process group after this many milliseconds.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Keep stdin open for [`Frame::Data`] with [`Fd::Stdin`]; otherwise stdin is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Run the process on a pseudo-terminal of this size (protocol v2); stdin is
    /// then always open. Absent on the wire when `None` (v1-compatible).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySpec>,
}

/// A pseudo-terminal for an exec: terminal type and window size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySpec {
    /// `TERM` of the process, e.g. `xterm-256color`.
    pub term: String,
    /// Columns of the window (at least 1).
    pub cols: u16,
    /// Rows of the window (at least 1).
    pub rows: u16,
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code; `128 + signal` when killed by a signal; 127 when it could not start.
    pub code: i32,
    /// The signal that killed it, if any.
    #[serde(default)]
    pub signal: Option<i32>,
    /// True when the agent killed it for exceeding `timeout_ms`.
    pub timed_out: bool,
    /// Wall time in the guest from spawn to exit.
    pub duration_ms: u64,
    /// Diagnostic, e.g. a spawn failure ("No such file or directory").
    #[serde(default)]
    pub error: Option<String>,
}

/// Control messages, JSON-encoded in [`Frame::Control`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Host -> guest, stream 0: opens a session.
    Hello { version: u32, nonce: u64 },
    /// Guest -> host, stream 0: accepts a session.
    HelloAck {
        version: u32,
        nonce: u64,
        agent_version: String,
        /// Random id chosen by the agent at boot; changes only on reboot.
        boot_id: String,
    },
    /// Host -> guest: identity and environment of this VM. Sent after every
    /// (re)connect, so a restored guest picks up its new identity.
    Configure(GuestConfig),
    /// Host -> guest: run a process on this stream.
    Exec(ExecSpec),
    /// Host -> guest: send a signal to the process group of this stream.
    Signal { signal: i32 },
    /// Host -> guest (v2): new window size of this stream's PTY. No answer;
    /// ignored for a stream without a PTY.
    Resize { cols: u16, rows: u16 },
    /// Host -> guest (v3): open a TCP connection from inside the guest to
    /// `host:port` (an IP address or a name the guest resolves) and carry its
    /// bytes on this stream; answered with `Ok` or `Error` (see the module docs).
    Connect { host: String, port: u16 },
    /// Host -> guest (v4): mount `source` (file system type `fstype`, kernel
    /// mount options `options`) at `target`, an absolute path the agent
    /// creates if missing; answered with `Ok` or `Error`.
    Mount {
        source: String,
        target: String,
        fstype: String,
        options: String,
        read_only: bool,
    },
    /// Host -> guest (v4): unmount `target`. Not `lazy`: a file system in
    /// use is refused with an `Error` whose message starts with
    /// [`UNMOUNT_BUSY`]; `lazy`: detached at once, freed when the last user
    /// is done. Nothing mounted there: `Ok`.
    Unmount { target: String, lazy: bool },
    /// Host -> guest: the host gave up on this stream (client went away):
    /// kill its process group and drop its remaining output. No Exit follows.
    Cancel,
    /// Host -> guest: liveness probe, answered with [`Control::Ok`].
    Ping,
    /// Host -> guest: sync disks and power off (or reboot).
    Shutdown { reboot: bool },
    /// Guest -> host: the request on this stream succeeded.
    Ok,
    /// Guest -> host: the request on this stream failed.
    Error { message: String },
    /// Guest -> host: the process of this stream started.
    Started { pid: u32 },
    /// Guest -> host: the process of this stream ended; last message of the stream.
    Exit(ExitStatus),
}

/// VM-wide settings the host pushes into the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestConfig {
    #[serde(default)]
    pub hostname: Option<String>,
    /// Environment visible to every exec (replaces the previous set).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Host wall clock, so a restored guest's clock is right.
    #[serde(default)]
    pub time_unix_ns: Option<u64>,
    /// Fresh entropy mixed into the guest RNG (important after a restore).
    #[serde(default)]
    pub entropy: Vec<u8>,
    /// The guest's network interface: applied after every restore so clones
    /// of one snapshot get their own MAC and addresses. Absent: untouched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkConfig>,
    /// Defaults of every exec (working directory, user), e.g. from an
    /// imported image's config; replaces the previous defaults. Absent on
    /// the wire when `None` (what older hosts send): execs run as root in
    /// `/root` (else `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec_defaults: Option<ExecDefaults>,
}

/// Defaults of every exec, from an imported image's config (WorkingDir, User).
///
/// The agent applies them when an [`ExecSpec`] says nothing: `cwd` when the
/// spec has no `cwd` (created if missing); `user` always (an exec has no
/// user of its own). The user is resolved in the guest's `/etc/passwd` and
/// `/etc/group` at each exec, as a container runtime does: `name` or `uid`
/// (its passwd entry's group, else gid 0; supplementary groups from
/// `/etc/group` membership), `name:group` or `uid:gid` (that group only).
/// HOME comes from passwd (else `/`), USER and LOGNAME are the name (else
/// the uid). A name the guest does not know fails the exec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecDefaults {
    /// Working directory when an exec names none (the image's WorkingDir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// User to run as: `name`, `uid`, `name:group`, `uid:gid` (the image's User).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Addressing of the guest's one network interface (the first that is not `lo`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// IPv4 address with prefix length, e.g. `10.200.0.2/30`.
    pub ipv4: String,
    /// IPv4 default gateway.
    pub gateway4: String,
    /// IPv6 address with prefix length, when the VM has one.
    #[serde(default)]
    pub ipv6: Option<String>,
    /// IPv6 default gateway.
    #[serde(default)]
    pub gateway6: Option<String>,
    /// Name servers written to `/etc/resolv.conf` (only these).
    #[serde(default)]
    pub dns: Vec<String>,
}

/// One unit on the wire.
// `Control` (a `Configure` holds a whole GuestConfig) dwarfs the data
// variants; a frame lives from decode to dispatch only, and boxing it would
// change every sender's and matcher's code for no measurable gain.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Session (re)start marker.
    Sync {
        nonce: u64,
    },
    Control {
        stream: u32,
        msg: Control,
    },
    /// Raw bytes of one fd of a stream.
    Data {
        stream: u32,
        fd: Fd,
        data: Bytes,
    },
    /// No more bytes on this fd of this stream.
    Eof {
        stream: u32,
        fd: Fd,
    },
    /// The receiver consumed `bytes` of this fd: the sender may send that many more.
    Credit {
        stream: u32,
        fd: Fd,
        bytes: u32,
    },
    /// Produced by the decoder only: the input was not a valid frame. After a
    /// framing error the decoder is unsynced until the next SYNC marker.
    Invalid {
        stream: Option<u32>,
        reason: String,
    },
}

const KIND_CONTROL: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_EOF: u8 = 3;
const KIND_CREDIT: u8 = 4;

/// Encoder and decoder of [`Frame`]s. See the module docs for the format.
#[derive(Debug, Default)]
pub struct FrameCodec {
    synced: bool,
}

impl FrameCodec {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once a SYNC marker was seen and no framing error happened since.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    fn desync(&mut self, reason: String) -> Option<Frame> {
        self.synced = false;
        Some(Frame::Invalid {
            stream: None,
            reason,
        })
    }
}

fn find_sync(hay: &[u8]) -> Option<usize> {
    hay.windows(SYNC_MAGIC.len()).position(|w| w == SYNC_MAGIC)
}

fn read_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, Self::Error> {
        if !self.synced {
            match find_sync(src) {
                Some(at) => src.advance(at),
                None => {
                    // Keep a tail that may be the start of a marker.
                    let keep = src.len().min(SYNC_MAGIC.len() - 1);
                    src.advance(src.len() - keep);
                    return Ok(None);
                }
            }
        }
        if src.len() >= SYNC_MAGIC.len() && src[..SYNC_MAGIC.len()] == SYNC_MAGIC {
            if src.len() < SYNC_LEN {
                return Ok(None);
            }
            let mut nonce = [0u8; 8];
            nonce.copy_from_slice(&src[SYNC_MAGIC.len()..SYNC_LEN]);
            src.advance(SYNC_LEN);
            self.synced = true;
            return Ok(Some(Frame::Sync {
                nonce: u64::from_le_bytes(nonce),
            }));
        }
        if src.len() < HEADER_LEN {
            // A partial SYNC marker may be arriving; wait for more.
            return Ok(None);
        }
        let magic = u16::from_le_bytes([src[0], src[1]]);
        if magic != FRAME_MAGIC {
            return Ok(self.desync(format!("bad frame magic {magic:#06x}")));
        }
        let kind = src[2];
        let stream = read_u32(&src[3..7]);
        let len = read_u32(&src[7..11]) as usize;
        if len > MAX_PAYLOAD {
            return Ok(self.desync(format!("frame of {len} bytes exceeds {MAX_PAYLOAD}")));
        }
        if src.len() < HEADER_LEN + len {
            src.reserve(HEADER_LEN + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER_LEN);
        let payload = src.split_to(len).freeze();
        let frame = match kind {
            KIND_CONTROL => match serde_json::from_slice::<Control>(&payload) {
                Ok(msg) => Frame::Control { stream, msg },
                // Frame boundaries are intact: stay synced, report the message.
                Err(e) => Frame::Invalid {
                    stream: Some(stream),
                    reason: format!("bad control message: {e}"),
                },
            },
            KIND_DATA | KIND_EOF | KIND_CREDIT => {
                let Some((&fd_byte, rest)) = payload.split_first() else {
                    return Ok(self.desync(format!("empty payload for frame kind {kind}")));
                };
                let Some(fd) = Fd::from_u8(fd_byte) else {
                    return Ok(self.desync(format!("bad fd {fd_byte}")));
                };
                match kind {
                    KIND_DATA => Frame::Data {
                        stream,
                        fd,
                        data: payload.slice(1..),
                    },
                    KIND_EOF => Frame::Eof { stream, fd },
                    _ => {
                        if rest.len() != 4 {
                            return Ok(self.desync("credit frame of wrong length".into()));
                        }
                        Frame::Credit {
                            stream,
                            fd,
                            bytes: read_u32(rest),
                        }
                    }
                }
            }
            other => return Ok(self.desync(format!("unknown frame kind {other}"))),
        };
        Ok(Some(frame))
    }
}

/// Errors of encoding a frame (the caller built something unsendable).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte frame limit")]
    TooLarge(usize),
    #[error("decoder-only frame cannot be sent")]
    NotSendable,
    #[error("control message does not serialize: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn put_header(dst: &mut BytesMut, kind: u8, stream: u32, len: usize) -> Result<(), EncodeError> {
    if len > MAX_PAYLOAD {
        return Err(EncodeError::TooLarge(len));
    }
    dst.reserve(HEADER_LEN + len);
    dst.put_u16_le(FRAME_MAGIC);
    dst.put_u8(kind);
    dst.put_u32_le(stream);
    dst.put_u32_le(len as u32);
    Ok(())
}

impl Encoder<Frame> for FrameCodec {
    type Error = EncodeError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), EncodeError> {
        match frame {
            Frame::Sync { nonce } => {
                dst.put_slice(&SYNC_MAGIC);
                dst.put_u64_le(nonce);
            }
            Frame::Control { stream, msg } => {
                let json = serde_json::to_vec(&msg)?;
                put_header(dst, KIND_CONTROL, stream, json.len())?;
                dst.put_slice(&json);
            }
            Frame::Data { stream, fd, data } => {
                put_header(dst, KIND_DATA, stream, data.len() + 1)?;
                dst.put_u8(fd.to_u8());
                dst.put_slice(&data);
            }
            Frame::Eof { stream, fd } => {
                put_header(dst, KIND_EOF, stream, 1)?;
                dst.put_u8(fd.to_u8());
            }
            Frame::Credit { stream, fd, bytes } => {
                put_header(dst, KIND_CREDIT, stream, 5)?;
                dst.put_u8(fd.to_u8());
                dst.put_u32_le(bytes);
            }
            Frame::Invalid { .. } => return Err(EncodeError::NotSendable),
        }
        Ok(())
    }
}

/// Encode one frame into a fresh buffer (convenience for writers without a `Framed`).
pub fn encode(frame: Frame) -> Result<BytesMut, EncodeError> {
    let mut buf = BytesMut::new();
    FrameCodec::new().encode(frame, &mut buf)?;
    Ok(buf)
}

#[cfg(test)]
mod tests;
