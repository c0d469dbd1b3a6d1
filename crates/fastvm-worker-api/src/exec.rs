//! What to run in a guest ([`ExecRequest`]) and what comes back
//! ([`ExecEvent`]): the same types in the embedded worker, on the internal
//! worker API and in the control plane. The guest agent's own wire types
//! ([`ExitStatus`], [`PtySpec`]) are reused as they are.

use bytes::Bytes;
pub use fastvm_agent_proto::{ExitStatus, PtySpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// What to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    #[serde(default)]
    pub timeout: Option<Duration>,
    /// Keep the process's stdin open for the host to write; otherwise stdin
    /// is /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Run on a pseudo-terminal (stdin then always open, output on stdout);
    /// an empty argv then means the guest's login shell. Needs a v2 agent.
    #[serde(default)]
    pub pty: Option<PtySpec>,
}

impl ExecRequest {
    /// Run `argv` as is.
    pub fn argv<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> Self {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Run a shell string as `sh -c <cmd>`.
    pub fn shell(cmd: &str) -> Self {
        Self::argv(["sh", "-c", cmd])
    }

    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(t);
        self
    }

    /// Open stdin for the host to write.
    pub fn with_stdin(mut self) -> Self {
        self.stdin = true;
        self
    }

    /// The guest's login shell on a terminal of `term` and `cols` x `rows`.
    pub fn login_shell(term: &str, cols: u16, rows: u16) -> Self {
        ExecRequest {
            stdin: true,
            pty: Some(PtySpec {
                term: term.to_owned(),
                cols,
                rows,
            }),
            ..Default::default()
        }
    }
}

/// One event of a streaming exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// Always the last event.
    Exit(ExitStatus),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_wraps() {
        assert_eq!(
            ExecRequest::shell("ls -la").argv,
            vec!["sh", "-c", "ls -la"]
        );
    }

    #[test]
    fn round_trips_as_json() {
        let mut r =
            ExecRequest::login_shell("xterm", 80, 24).with_timeout(Duration::from_millis(1500));
        r.env.insert("A".into(), "b".into());
        let back: ExecRequest =
            serde_json::from_slice(&serde_json::to_vec(&r).expect("encode")).expect("decode");
        assert_eq!(back, r);
    }
}
