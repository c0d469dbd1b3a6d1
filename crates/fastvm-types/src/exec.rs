//! `POST /v1/vms/{id}/exec`: run an argv in the guest.
//!
//! Under `Accept: application/json` the server buffers output (4 MiB cap per
//! stream) and answers one [`ExecVmResponse`]. Under `Accept:
//! application/x-ndjson` it streams one [`ExecEvent`] per line: `o`/`e` chunks
//! with base64 data, then exactly one terminal `x` event.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{codes, validate_guest_path, validate_timeout, ValidationError};
use crate::metadata::{schema, validate_env_vars_field, EnvVars};

/// Per-stream cap of the buffered exec response, in bytes.
pub const EXEC_OUTPUT_CAP_BYTES: usize = 4 * 1024 * 1024;

/// Body of `POST /v1/vms/{id}/exec`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecVmRequest {
    /// Argv; the first element must be non-empty. For a shell string send
    /// `["sh", "-c", "<string>"]`.
    pub command: Vec<String>,
    /// Server-side timeout in seconds (positive); omit for the server default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 2592000)]
    pub timeout_sec: Option<u64>,
    /// Extra environment for this command (EnvVars rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<schema::EnvVars>)]
    pub env: Option<EnvVars>,
    /// Absolute working directory in the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
}

impl ExecVmRequest {
    /// Checks the argv (non-empty, first element non-empty, no NUL bytes), the
    /// timeout, env and cwd.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self.command.first() {
            None => {
                return Err(ValidationError::new(
                    codes::INVALID_COMMAND,
                    "command is empty; pass an argv like [\"ls\", \"-la\"] or [\"sh\", \"-c\", \"...\"]",
                ))
            }
            Some(first) if first.is_empty() => {
                return Err(ValidationError::new(
                    codes::INVALID_COMMAND,
                    "command[0] is empty; it must name the program to run",
                ))
            }
            Some(_) => {}
        }
        if let Some(i) = self.command.iter().position(|a| a.contains('\0')) {
            return Err(ValidationError::new(
                codes::INVALID_COMMAND,
                format!("command[{i}] contains a NUL byte, which cannot be passed to a program"),
            ));
        }
        validate_timeout("timeoutSec", self.timeout_sec)?;
        if let Some(env) = &self.env {
            validate_env_vars_field("env", env)?;
        }
        if let Some(cwd) = &self.cwd {
            validate_guest_path("cwd", cwd)?;
        }
        Ok(())
    }
}

/// Buffered exec result (`Accept: application/json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ExecVMResponse)]
pub struct ExecVmResponse {
    /// Exit code of the command (`-1` when it did not start or was killed).
    pub exit_code: i32,
    /// Stdout, decoded as UTF-8 (invalid sequences replaced).
    pub stdout: String,
    /// Stderr, decoded as UTF-8 (invalid sequences replaced).
    pub stderr: String,
    /// True if the command was killed by the timeout.
    pub timed_out: bool,
    /// True if stdout bytes past the 4 MiB cap were dropped.
    pub stdout_truncated: bool,
    /// True if stderr bytes past the 4 MiB cap were dropped.
    pub stderr_truncated: bool,
    /// Guest-reported duration in milliseconds.
    pub duration_ms: u64,
}

/// Kind of an [`ExecEvent`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum ExecEventType {
    /// Stdout chunk.
    #[serde(rename = "o")]
    Stdout,
    /// Stderr chunk.
    #[serde(rename = "e")]
    Stderr,
    /// Terminal exit event.
    #[serde(rename = "x")]
    Exit,
}

/// One line of the NDJSON exec stream. Short names keep per-chunk overhead small.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecEvent {
    /// `o` stdout, `e` stderr, `x` exit.
    pub t: ExecEventType,
    /// For `o`/`e`: base64 of the raw bytes. For `x`: optional diagnostic
    /// (e.g. spawn failure), empty when none.
    #[serde(default)]
    pub d: String,
    /// Exit code; `x` events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c: Option<i32>,
    /// True if killed by the timeout; `x` events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<bool>,
    /// Guest-reported duration in ms; `x` events only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ms: Option<u64>,
}

impl ExecEvent {
    fn chunk(t: ExecEventType, bytes: &[u8]) -> Self {
        Self {
            t,
            d: BASE64.encode(bytes),
            c: None,
            to: None,
            ms: None,
        }
    }

    /// A stdout chunk.
    pub fn stdout(bytes: &[u8]) -> Self {
        Self::chunk(ExecEventType::Stdout, bytes)
    }

    /// A stderr chunk.
    pub fn stderr(bytes: &[u8]) -> Self {
        Self::chunk(ExecEventType::Stderr, bytes)
    }

    /// The terminal event.
    pub fn exit(
        exit_code: i32,
        timed_out: bool,
        duration_ms: u64,
        diagnostic: impl Into<String>,
    ) -> Self {
        Self {
            t: ExecEventType::Exit,
            d: diagnostic.into(),
            c: Some(exit_code),
            to: Some(timed_out),
            ms: Some(duration_ms),
        }
    }

    /// The raw bytes of an `o`/`e` chunk.
    pub fn chunk_bytes(&self) -> Result<Vec<u8>, base64::DecodeError> {
        BASE64.decode(&self.d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn req(cmd: &[&str]) -> ExecVmRequest {
        ExecVmRequest {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn command_rules() {
        assert_eq!(req(&["ls"]).validate(), Ok(()));
        assert_eq!(req(&["ls", ""]).validate(), Ok(()));
        assert_eq!(
            req(&[]).validate().err().map(|e| e.code),
            Some(codes::INVALID_COMMAND)
        );
        assert_eq!(
            req(&["", "x"]).validate().err().map(|e| e.code),
            Some(codes::INVALID_COMMAND)
        );
        let e = req(&["echo", "a\0b"]).validate().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::INVALID_COMMAND));
        assert!(e
            .map(|e| e.message)
            .unwrap_or_default()
            .contains("command[1]"));
    }

    #[test]
    fn timeout_env_cwd_rules() {
        let mut r = req(&["ls"]);
        r.timeout_sec = Some(0);
        assert_eq!(
            r.validate().err().map(|e| e.code),
            Some(codes::INVALID_TIMEOUT)
        );
        r.timeout_sec = Some(crate::common::MAX_TIMEOUT_SEC + 1);
        assert_eq!(
            r.validate().err().map(|e| e.code),
            Some(codes::INVALID_TIMEOUT)
        );
        r.timeout_sec = Some(u64::MAX);
        assert_eq!(
            r.validate().err().map(|e| e.code),
            Some(codes::INVALID_TIMEOUT)
        );
        r.timeout_sec = Some(1);
        assert_eq!(r.validate(), Ok(()));
        r.env = Some(BTreeMap::from([("A".into(), "x\ny".into())]));
        assert_eq!(
            r.validate().err().map(|e| e.code),
            Some(codes::INVALID_ENV_VARS)
        );
        r.env = Some(BTreeMap::from([("A".into(), "xy".into())]));
        r.cwd = Some("tmp".into());
        assert_eq!(
            r.validate().err().map(|e| e.code),
            Some(codes::INVALID_PATH)
        );
        r.cwd = Some("/tmp".into());
        assert_eq!(r.validate(), Ok(()));
    }

    #[test]
    fn request_wire_names() -> Result<(), serde_json::Error> {
        let r: ExecVmRequest = serde_json::from_value(json!({
            "command": ["sh", "-c", "echo hi"], "timeoutSec": 5, "env": {"A": "1"}, "cwd": "/root"
        }))?;
        assert_eq!(r.timeout_sec, Some(5));
        assert!(serde_json::from_value::<ExecVmRequest>(
            json!({"command": ["ls"], "timeout_sec": 5})
        )
        .is_err());
        assert!(serde_json::from_value::<ExecVmRequest>(json!({"command": "ls"})).is_err());
        assert!(serde_json::from_value::<ExecVmRequest>(json!({})).is_err());
        Ok(())
    }

    #[test]
    fn response_wire_names() -> Result<(), serde_json::Error> {
        let v = serde_json::to_value(ExecVmResponse {
            exit_code: 3,
            stdout: "out".into(),
            stderr: String::new(),
            timed_out: false,
            stdout_truncated: true,
            stderr_truncated: false,
            duration_ms: 12,
        })?;
        assert_eq!(
            v,
            json!({"exitCode": 3, "stdout": "out", "stderr": "", "timedOut": false,
                   "stdoutTruncated": true, "stderrTruncated": false, "durationMs": 12})
        );
        Ok(())
    }

    #[test]
    fn event_wire_form() -> Result<(), Box<dyn std::error::Error>> {
        let o = ExecEvent::stdout(b"hi\n");
        assert_eq!(serde_json::to_value(&o)?, json!({"t": "o", "d": "aGkK"}));
        assert_eq!(o.chunk_bytes()?, b"hi\n");
        assert_eq!(
            serde_json::to_value(ExecEvent::stderr(b""))?,
            json!({"t": "e", "d": ""})
        );
        assert_eq!(
            serde_json::to_value(ExecEvent::exit(0, false, 42, ""))?,
            json!({"t": "x", "d": "", "c": 0, "to": false, "ms": 42})
        );
        let x: ExecEvent = serde_json::from_value(json!({"t": "x", "c": 1, "to": true, "ms": 9}))?;
        assert_eq!(x, ExecEvent::exit(1, true, 9, ""));
        assert!(serde_json::from_value::<ExecEvent>(json!({"t": "z", "d": ""})).is_err());
        Ok(())
    }
}
