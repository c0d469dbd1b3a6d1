//! `fastvm exec VM -- CMD...`: run a command in a VM, streaming its output
//! live (NDJSON exec stream), and exit with its exit code. Ctrl-C drops the
//! request, which cancels the process group in the guest.

use crate::client::{decode, Client, ConnectArgs};
use anyhow::{bail, Context};
use base64::Engine;
use futures::StreamExt;
use serde_json::{json, Value};
use std::io::Write;

#[derive(clap::Args)]
pub struct ExecArgs {
    /// VM id.
    pub vm: String,
    /// Kill the command after this many seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// The command (argv; use `sh -c '...'` for shell syntax).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// Returns the command's exit code.
pub async fn run(args: ExecArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.conn)?;
    let mut body = json!({ "command": args.command });
    if let Some(t) = args.timeout {
        body["timeoutSec"] = json!(t);
    }
    let req = client
        .request(reqwest::Method::POST, &format!("/v1/vms/{}/exec", args.vm))
        .header(reqwest::header::ACCEPT, "application/x-ndjson")
        .json(&body);
    let resp = req
        .send()
        .await
        .with_context(|| format!("cannot reach the Fast VM API at {}", client.base))?;
    if !resp.status().is_success() {
        decode(resp).await?;
        bail!("exec failed");
    }
    let mut stream = resp.bytes_stream();
    let mut buf: Vec<u8> = Vec::new();
    let b64 = base64::engine::general_purpose::STANDARD;
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let chunk = tokio::select! {
            c = stream.next() => c,
            _ = &mut interrupted => {
                eprintln!("\ninterrupted: cancelling the command in the VM");
                return Ok(130);
            }
        };
        let Some(chunk) = chunk else {
            bail!("the exec stream ended without an exit event")
        };
        buf.extend_from_slice(&chunk.context("reading the exec stream")?);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let ev: Value = serde_json::from_slice(&line).context("bad exec event")?;
            let data = || {
                b64.decode(ev.get("d").and_then(Value::as_str).unwrap_or(""))
                    .unwrap_or_default()
            };
            match ev.get("t").and_then(Value::as_str) {
                Some("o") => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&data())?;
                    out.flush()?;
                }
                Some("e") => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&data())?;
                    err.flush()?;
                }
                Some("x") => {
                    let diag = ev.get("d").and_then(Value::as_str).unwrap_or("");
                    if !diag.is_empty() {
                        eprintln!("fastvm: {diag}");
                    }
                    if ev.get("to").and_then(Value::as_bool) == Some(true) {
                        eprintln!("fastvm: timed out");
                    }
                    return Ok(ev.get("c").and_then(Value::as_i64).unwrap_or(255) as i32);
                }
                _ => {}
            }
        }
    }
}
