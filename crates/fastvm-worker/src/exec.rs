//! Exec requests and their two result modes: streaming events, or a buffered
//! [`ExecOutput`] with each stream capped at [`BUFFERED_CAP`].

use crate::agent::ExecStream;
use crate::error::{Error, Result};
use fastvm_agent_proto::{ExecSpec, PtySpec};

/// Per-stream cap of buffered exec output (the spec's 4 MiB).
pub const BUFFERED_CAP: usize = 4 << 20;
/// Largest terminal window accepted, in columns and in rows.
pub use fastvm_worker_api::terminal::MAX_PTY_DIMENSION;
/// Longest `TERM` value accepted.
pub const MAX_TERM_LEN: usize = 64;

pub use fastvm_worker_api::exec::{ExecEvent, ExecRequest};

/// Check what the guest could not run, and build the agent's wire spec.
pub fn to_spec(req: &ExecRequest) -> Result<ExecSpec> {
    if let Some(p) = &req.pty {
        check_pty(p)?;
    }
    let login_shell = req.pty.is_some() && req.argv.is_empty();
    if !login_shell && req.argv.first().is_none_or(|a| a.is_empty()) {
        return Err(Error::InvalidExec(
            "command must be a non-empty argv whose first element names a program".into(),
        ));
    }
    if let Some(i) = req.argv.iter().position(|a| a.contains('\0')) {
        return Err(Error::InvalidExec(format!(
            "command[{i}] contains a NUL byte"
        )));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Error::InvalidExec(format!(
                "env var {k:?} is not a valid NAME=value pair"
            )));
        }
    }
    if req
        .cwd
        .as_deref()
        .is_some_and(|c| c.contains('\0') || !c.starts_with('/'))
    {
        return Err(Error::InvalidExec("cwd must be an absolute path".into()));
    }
    Ok(ExecSpec {
        argv: req.argv.clone(),
        env: req.env.clone(),
        cwd: req.cwd.clone(),
        timeout_ms: req
            .timeout
            .map(|t| t.as_millis().min(u64::MAX as u128) as u64),
        stdin: req.stdin || req.pty.is_some(),
        pty: req.pty.clone(),
    })
}

/// A window size the terminal can have and a `TERM` a shell can use.
pub fn check_pty(p: &PtySpec) -> Result<()> {
    for (what, v) in [("cols", p.cols), ("rows", p.rows)] {
        if v == 0 || v > MAX_PTY_DIMENSION {
            return Err(Error::InvalidExec(format!(
                "terminal {what} must be between 1 and {MAX_PTY_DIMENSION}, got {v}"
            )));
        }
    }
    let term_ok = !p.term.is_empty()
        && p.term.len() <= MAX_TERM_LEN
        && p.term
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if !term_ok {
        return Err(Error::InvalidExec(format!(
            "TERM must be 1 to {MAX_TERM_LEN} characters of [A-Za-z0-9._+-], e.g. xterm-256color"
        )));
    }
    Ok(())
}

/// The buffered result of an exec.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Diagnostic of the agent (e.g. the program could not be started).
    pub error: Option<String>,
}

fn append_capped(buf: &mut Vec<u8>, data: &[u8], cap: usize, truncated: &mut bool) {
    let room = cap.saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

/// Drain a stream into an [`ExecOutput`], keeping at most `cap` bytes per
/// stream (the rest is read, dropped and flagged).
pub async fn collect(mut stream: ExecStream, cap: usize) -> Result<ExecOutput> {
    let mut out = ExecOutput::default();
    while let Some(ev) = stream.next().await {
        match ev? {
            ExecEvent::Stdout(d) => {
                append_capped(&mut out.stdout, &d, cap, &mut out.stdout_truncated)
            }
            ExecEvent::Stderr(d) => {
                append_capped(&mut out.stderr, &d, cap, &mut out.stderr_truncated)
            }
            ExecEvent::Exit(s) => {
                out.exit_code = s.code;
                out.timed_out = s.timed_out;
                out.duration_ms = s.duration_ms;
                out.error = s.error;
                return Ok(out);
            }
        }
    }
    Err(Error::AgentUnavailable(
        "exec stream ended without an exit status".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rejects_bad_requests() {
        assert!(to_spec(&ExecRequest::argv(Vec::<String>::new())).is_err());
        assert!(to_spec(&ExecRequest::argv([""])).is_err());
        assert!(to_spec(&ExecRequest::argv(["a\0b"])).is_err());
        let mut r = ExecRequest::argv(["true"]);
        r.cwd = Some("relative".into());
        assert!(to_spec(&r).is_err());
        let mut r = ExecRequest::argv(["true"]);
        r.env.insert("A=B".into(), "x".into());
        assert!(to_spec(&r).is_err());
        assert!(
            to_spec(&ExecRequest::argv(["true"]).with_timeout(Duration::from_secs(2)))
                .is_ok_and(|s| s.timeout_ms == Some(2000))
        );
    }

    #[test]
    fn pty_requests() {
        let shell = to_spec(&ExecRequest::login_shell("xterm-256color", 80, 24));
        assert!(
            shell.as_ref().is_ok_and(|s| s.argv.is_empty()
                && s.stdin
                && s.pty.as_ref().is_some_and(|p| (p.cols, p.rows) == (80, 24))),
            "{shell:?}"
        );
        assert!(to_spec(&ExecRequest::login_shell("xterm", 0, 24)).is_err());
        assert!(to_spec(&ExecRequest::login_shell(
            "xterm",
            80,
            MAX_PTY_DIMENSION + 1
        ))
        .is_err());
        assert!(to_spec(&ExecRequest::login_shell("", 80, 24)).is_err());
        assert!(to_spec(&ExecRequest::login_shell("xterm\n", 80, 24)).is_err());
        assert!(to_spec(&ExecRequest::login_shell(
            &"x".repeat(MAX_TERM_LEN + 1),
            80,
            24
        ))
        .is_err());
        let mut top = ExecRequest::login_shell("screen.xterm-256color", 80, 24);
        top.argv = vec!["top".into()];
        assert!(to_spec(&top).is_ok());
    }

    #[test]
    fn cap_truncates_exactly() {
        let mut buf = Vec::new();
        let mut t = false;
        append_capped(&mut buf, b"abcd", 6, &mut t);
        assert!(!t);
        append_capped(&mut buf, b"ef", 6, &mut t);
        assert!(!t);
        append_capped(&mut buf, b"g", 6, &mut t);
        assert!(t);
        assert_eq!(buf, b"abcdef");
    }
}
