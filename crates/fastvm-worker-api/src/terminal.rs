//! Terminals: what [`crate::Worker::open_pty`] opens and carries.

use crate::worker::WorkerError;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Largest terminal window accepted, in columns and in rows.
pub const MAX_PTY_DIMENSION: u16 = 4096;

/// Keystrokes and control requests queued for one terminal before `send` waits.
pub const PTY_INPUT_QUEUE: usize = 16;

/// What terminal to open (see [`Worker::open_pty`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
