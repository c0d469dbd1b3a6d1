//! `POST /v1/vms/{id}/exec`: run an argv in a running VM.
//!
//! Two answers, chosen by the `Accept` header:
//!
//! - `application/json` (default): the output is buffered, each stream capped
//!   at 4 MiB (the rest is read, dropped and flagged `*Truncated`), and one
//!   `ExecVMResponse` is returned once the process exits. Output is decoded
//!   as UTF-8, invalid sequences replaced.
//! - `application/x-ndjson`: one `ExecEvent` line per chunk as the process
//!   produces it (`o`/`e` with base64 data), then exactly one `x` line. No cap.
//!
//! The stream is pulled end to end: the next chunk is read from the guest
//! only when hyper asks the body for more, i.e. when the previous bytes were
//! handed to the socket. A slow client therefore slows the guest process (the
//! agent's flow-control window fills) and the server's memory stays flat.
//! When the client goes away, hyper drops the body, which drops the worker's
//! stream, which cancels the process in the guest.

use crate::auth::Caller;
use crate::error::{codes, ApiError};
use crate::openapi::examples;
use crate::routes::{JsonBody, VmPath};
use crate::worker::ExecEvent as WorkerEvent;
use crate::worker::ExecEvents;
use crate::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use fastvm_types::exec::{ExecEvent, ExecVmRequest, ExecVmResponse, EXEC_OUTPUT_CAP_BYTES};
use fastvm_types::ApiError as ErrorBody;
use futures::StreamExt;
use std::convert::Infallible;

pub const NDJSON: &str = "application/x-ndjson";

/// True when the client asked for the NDJSON stream.
fn wants_ndjson(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|range| {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| p.trim().replace(' ', "").eq_ignore_ascii_case("q=0"));
            media.eq_ignore_ascii_case(NDJSON) && !refused
        })
}

/// Run a command
#[utoipa::path(
    post,
    path = "/v1/vms/{id}/exec",
    tag = "vms",
    operation_id = "execVm",
    summary = "Run a command in a VM",
    description = "Runs `command` (an argv array, no shell unless you call one) in the VM as root, with `cwd`, extra `env` and a `timeoutSec` (the command is killed when it passes, `timedOut: true`). With `Accept: application/json` (default) the answer is buffered: exit code, stdout and stderr (each truncated past its cap, flagged by `stdoutTruncated` / `stderrTruncated`). With `Accept: application/x-ndjson` the output streams as it is produced, one ExecEvent per line: `{\"t\":\"o\",\"d\":...}` stdout, `{\"t\":\"e\",\"d\":...}` stderr, and a final `{\"t\":\"x\",\"c\":0,\"ms\":12,\"to\":false}`.",
    params(("id" = String, Path, description = "VM ID (UUID).")),
    request_body(content = ExecVmRequest, example = json!(examples::exec_request())),
    security(("bearerAuth" = [])),
    responses(
        (status = 200, description = "`application/json`: the buffered result. `application/x-ndjson`: one ExecEvent per line, ending with an `x` event.",
            content(
                (ExecVmResponse = "application/json", example = json!(examples::exec_response())),
                (ExecEvent = "application/x-ndjson"),
            )
        ),
        (status = 400, description = "Malformed body, or the command, timeout, env or cwd breaks a rule (`INVALID_COMMAND`, `INVALID_TIMEOUT`, `INVALID_ENV_VARS`, `INVALID_PATH`)", body = ErrorBody),
        (status = 401, description = "Missing or invalid API key", body = ErrorBody),
        (status = 404, description = "No such VM in the caller's org", body = ErrorBody),
        (status = 409, description = "The VM is not running", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 429, description = "`TOO_MANY_EXECS`: the VM has 64 execs, terminals and guest connections open; retry when one ends", body = ErrorBody),
        (status = 503, description = "The VM's agent does not answer", body = ErrorBody),
    )
)]
pub async fn exec(
    State(state): State<AppState>,
    caller: Caller,
    VmPath(id): VmPath,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ExecVmRequest>,
) -> Result<Response, ApiError> {
    let events = state.start_exec(caller.org_id, id, &req).await?;
    if wants_ndjson(&headers) {
        Ok(ndjson(events))
    } else {
        Ok(Json(collect(events).await?).into_response())
    }
}

fn append_capped(buf: &mut Vec<u8>, data: &[u8], truncated: &mut bool) {
    let room = EXEC_OUTPUT_CAP_BYTES.saturating_sub(buf.len());
    if data.len() > room {
        *truncated = true;
    }
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

/// Drain the events into the buffered answer.
pub(crate) async fn collect(mut events: ExecEvents) -> Result<ExecVmResponse, ApiError> {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let (mut stdout_truncated, mut stderr_truncated) = (false, false);
    while let Some(event) = events.next().await {
        match event? {
            WorkerEvent::Stdout(d) => append_capped(&mut stdout, &d, &mut stdout_truncated),
            WorkerEvent::Stderr(d) => append_capped(&mut stderr, &d, &mut stderr_truncated),
            WorkerEvent::Exit(status) => {
                // A diagnostic (e.g. the program could not start) goes to stderr.
                if let Some(diag) = status.error.as_deref().filter(|d| !d.is_empty()) {
                    append_capped(
                        &mut stderr,
                        format!("{diag}\n").as_bytes(),
                        &mut stderr_truncated,
                    );
                }
                return Ok(ExecVmResponse {
                    exit_code: status.code,
                    stdout: String::from_utf8_lossy(&stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&stderr).into_owned(),
                    timed_out: status.timed_out,
                    stdout_truncated,
                    stderr_truncated,
                    duration_ms: status.duration_ms,
                });
            }
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        codes::AGENT_UNAVAILABLE,
        "the exec stream ended without an exit status",
    ))
}

fn line(event: &ExecEvent) -> Bytes {
    // Serializing this plain struct cannot fail.
    let mut v = serde_json::to_vec(event).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// The NDJSON body: one line per event, pulled from the worker on demand.
fn ndjson(events: ExecEvents) -> Response {
    let body = futures::stream::unfold(Some(events), |events| async move {
        let mut events = events?;
        let (event, more) = match events.next().await {
            Some(Ok(WorkerEvent::Stdout(d))) => (ExecEvent::stdout(&d), true),
            Some(Ok(WorkerEvent::Stderr(d))) => (ExecEvent::stderr(&d), true),
            Some(Ok(WorkerEvent::Exit(s))) => (
                ExecEvent::exit(
                    s.code,
                    s.timed_out,
                    s.duration_ms,
                    s.error.unwrap_or_default(),
                ),
                false,
            ),
            // The stream always ends with exactly one `x` event, even when the guest fails us.
            Some(Err(e)) => (
                ExecEvent::exit(-1, false, 0, format!("exec failed: {e}")),
                false,
            ),
            None => (
                ExecEvent::exit(-1, false, 0, "the exec stream ended without an exit status"),
                false,
            ),
        };
        Some((Ok::<_, Infallible>(line(&event)), more.then_some(events)))
    });
    let mut res = Response::new(Body::from_stream(body));
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(header::ACCEPT, v);
        }
        h
    }

    #[test]
    fn accept_header_picks_the_mode() {
        assert!(wants_ndjson(&accept("application/x-ndjson")));
        assert!(wants_ndjson(&accept(
            "application/json;q=0.5, application/x-ndjson"
        )));
        assert!(!wants_ndjson(&accept("application/json")));
        assert!(!wants_ndjson(&accept("*/*")));
        assert!(!wants_ndjson(&accept("application/x-ndjson;q=0")));
        assert!(!wants_ndjson(&HeaderMap::new()));
    }

    #[test]
    fn cap_truncates_exactly() {
        let mut buf = vec![0u8; EXEC_OUTPUT_CAP_BYTES - 2];
        let mut t = false;
        append_capped(&mut buf, b"ab", &mut t);
        assert!(!t);
        append_capped(&mut buf, b"c", &mut t);
        assert!(t);
        assert_eq!(buf.len(), EXEC_OUTPUT_CAP_BYTES);
    }
}
