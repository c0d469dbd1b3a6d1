//! `fastvm cp LOCAL VM:PATH` and `fastvm cp VM:PATH LOCAL`: files and
//! directories, streamed both ways with a progress bar.
//!
//! ```text
//!  upload   presign(PATH) -> PUT uploadUrl with a Content-Length (file bytes, or a
//!           tar of the directory written on the fly, sized beforehand: `sized_tar`)
//!           -> files/fetch(downloadUrl) [-> tar -x in the VM]
//!  download presign(PATH) -> files/export(uploadUrl) -> GET downloadUrl -> the
//!           file, or a checked tar extraction into LOCAL
//! ```
//!
//! Nothing is staged on the client: tar runs in a thread that feeds (or is
//! fed by) a small bounded channel, so memory stays flat whatever the size.
//! Extraction refuses what would land outside LOCAL: absolute names, `..`,
//! symlinks pointing out, writes through symlinks, device files and FIFOs.

use crate::client::{decode, Client, ConnectArgs};
use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use fastvm_cli::untar::safe_unpack;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;

/// Chunk size of the tar pipes.
const CHUNK: usize = 256 << 10;
/// Chunks in flight between the tar thread and the HTTP body.
const DEPTH: usize = 8;

#[derive(clap::Args)]
pub struct CpArgs {
    /// Source: a local path or VM:PATH.
    pub src: String,
    /// Destination: VM:PATH or a local path.
    pub dst: String,
    /// Timeout in seconds of the VM-side steps (fetch, export, tar -x).
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// `VM:PATH` (a VM id without `/`, then an absolute path).
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (vm, path) = arg.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/') && path.starts_with('/')).then_some((vm, path))
}

pub async fn run(args: CpArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.conn)?;
    match (remote(&args.src), remote(&args.dst)) {
        (None, Some((vm, path))) => upload(&client, &args, Path::new(&args.src), vm, path).await,
        (Some((vm, path)), None) => download(&client, &args, vm, path, Path::new(&args.dst)).await,
        _ => bail!("give exactly one side as VM:PATH (an absolute path in the VM), e.g. `fastvm cp ./src VM:/root/src`"),
    }
}

fn progress(quiet: bool, len: Option<u64>, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::new_spinner(),
    };
    let template = if len.is_some() {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}"
    } else {
        "{msg} {spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

async fn presign(client: &Client, vm: &str, path: &str) -> anyhow::Result<(String, String)> {
    let p = client
        .post(
            &format!("/v1/vms/{vm}/files/presign"),
            &json!({ "path": path }),
        )
        .await?;
    let url = |k: &str| {
        p[k].as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("presign answered without {k}"))
    };
    Ok((url("uploadUrl")?, url("downloadUrl")?))
}

fn check_exec(out: &Value, what: &str) -> anyhow::Result<()> {
    if out["exitCode"].as_i64() == Some(0) && out["timedOut"].as_bool() != Some(true) {
        return Ok(());
    }
    let why = if out["timedOut"].as_bool() == Some(true) {
        "timed out (raise --timeout)".to_owned()
    } else {
        format!("exited {}", out["exitCode"])
    };
    bail!(
        "{what} in the VM {why}: {}",
        out["stderr"].as_str().unwrap_or("").trim()
    )
}

async fn upload(
    client: &Client,
    args: &CpArgs,
    local: &Path,
    vm: &str,
    path: &str,
) -> anyhow::Result<()> {
    let meta =
        std::fs::metadata(local).with_context(|| format!("cannot read {}", local.display()))?;
    let is_dir = meta.is_dir();
    // Pass 1 of the directory tar (lstat only): its exact size, sent as Content-Length.
    let plan = if is_dir {
        let dir = local.to_owned();
        Some(
            tokio::task::spawn_blocking(move || crate::sized_tar::plan(&dir))
                .await?
                .with_context(|| format!("reading {}", local.display()))?,
        )
    } else {
        None
    };
    let target = if is_dir {
        format!(
            "/var/tmp/.fastvm-upload-{}.tar",
            uuid::Uuid::new_v4().simple()
        )
    } else {
        path.to_owned()
    };
    let (up, down) = presign(client, vm, &target).await?;
    let put = client
        .http
        .put(&up)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
    let bar;
    let put = if let Some(plan) = plan {
        let size = plan.size;
        bar = progress(args.quiet, Some(size), "tar+upload");
        let (rx, tar_thread) = tar_directory(plan);
        let b = bar.clone();
        let body =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) })
                .map(move |c: std::io::Result<Bytes>| {
                    if let Ok(c) = &c {
                        b.inc(c.len() as u64);
                    }
                    c
                });
        let res = put
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await;
        tar_thread
            .join()
            .map_err(|_| anyhow!("the tar thread panicked"))??;
        res
    } else {
        bar = progress(args.quiet, Some(meta.len()), "upload");
        let file = tokio::fs::File::open(local)
            .await
            .with_context(|| format!("cannot open {}", local.display()))?;
        let b = bar.clone();
        let body = tokio_util_reader(file).map(move |c| {
            if let Ok(c) = &c {
                b.inc(c.len() as u64);
            }
            c
        });
        put.header(reqwest::header::CONTENT_LENGTH, meta.len())
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
    };
    let res = put.with_context(|| format!("uploading to {}", client.base))?;
    decode(res).await?;
    bar.finish_and_clear();
    let out = client
        .post(
            &format!("/v1/vms/{vm}/files/fetch"),
            &json!({ "url": down, "path": target, "timeoutSec": args.timeout }),
        )
        .await?;
    check_exec(&out, "writing the file")?;
    if is_dir {
        let (t, d) = (shell_quote(&target), shell_quote(path));
        let cmd = format!("mkdir -p {d} && tar -xf {t} -C {d}; rc=$?; rm -f {t}; exit $rc");
        let out = client
            .post(
                &format!("/v1/vms/{vm}/exec"),
                &json!({ "command": ["sh", "-c", cmd], "timeoutSec": args.timeout }),
            )
            .await?;
        check_exec(&out, "extracting the archive")?;
    }
    Ok(())
}

/// A file as a stream of chunks.
fn tokio_util_reader(file: tokio::fs::File) -> impl futures::Stream<Item = std::io::Result<Bytes>> {
    futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Writes into a bounded channel of chunks (the tar thread's output).
struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buf));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the upload stopped"))
    }
}

/// Pass 2 of the directory tar in a thread (`plan.size` bytes, rooted at `./`,
/// an error if the tree changed since the plan); its chunks come from the receiver.
fn tar_directory(
    plan: crate::sized_tar::Plan,
) -> (
    tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    std::thread::JoinHandle<anyhow::Result<()>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(DEPTH);
    let thread = std::thread::spawn(move || {
        let err_tx = tx.clone();
        let result = (|| -> anyhow::Result<()> {
            let mut w = crate::sized_tar::write(
                &plan,
                ChannelWriter {
                    tx,
                    buf: Vec::with_capacity(CHUNK),
                },
            )?;
            w.flush()?;
            Ok(())
        })();
        if let Err(e) = &result {
            // Fail the HTTP body too, so no complete-looking object is stored.
            let _ = err_tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
        result
    });
    (rx, thread)
}

async fn download(
    client: &Client,
    args: &CpArgs,
    vm: &str,
    path: &str,
    local: &Path,
) -> anyhow::Result<()> {
    let (up, down) = presign(client, vm, path).await?;
    let res = client
        .request(reqwest::Method::POST, &format!("/v1/vms/{vm}/files/export"))
        .json(&json!({ "path": path, "url": up, "timeoutSec": args.timeout }))
        .send()
        .await
        .with_context(|| format!("cannot reach the Fast VM API at {}", client.base))?;
    let exported = decode(res).await.map_err(|e| {
        if e.to_string().starts_with("FILE_NOT_FOUND") {
            anyhow!("{vm}:{path}: no such file or directory in the VM")
        } else {
            e
        }
    })?;
    let size = exported["sizeBytes"].as_u64();
    let res = client
        .http
        .get(&down)
        .send()
        .await
        .with_context(|| format!("downloading from {}", client.base))?;
    if !res.status().is_success() {
        decode(res).await?;
        bail!("download failed");
    }
    let bar = progress(args.quiet, size, "download");
    let mut body = res.bytes_stream();
    match exported["kind"].as_str() {
        Some("file") => {
            let dest = if local.is_dir() {
                local.join(Path::new(path).file_name().unwrap_or_default())
            } else {
                local.to_owned()
            };
            if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            let mut file = tokio::fs::File::create(&dest)
                .await
                .with_context(|| format!("creating {}", dest.display()))?;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.context("download interrupted")?;
                tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                    .await
                    .with_context(|| format!("writing {}", dest.display()))?;
                bar.inc(chunk.len() as u64);
            }
            tokio::io::AsyncWriteExt::flush(&mut file).await?;
        }
        Some("directory") => {
            let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(DEPTH);
            let dest = local.to_owned();
            let extract = tokio::task::spawn_blocking(move || {
                safe_unpack(
                    ChannelReader {
                        rx,
                        cur: Bytes::new(),
                    },
                    &dest,
                )
            });
            while let Some(chunk) = body.next().await {
                let chunk = chunk.context("download interrupted")?;
                bar.inc(chunk.len() as u64);
                if tx.send(chunk).is_err() {
                    break; // extraction stopped: its error says why
                }
            }
            drop(tx);
            extract
                .await
                .map_err(|e| anyhow!("extraction thread: {e}"))??;
        }
        other => bail!("export answered an unknown kind {other:?}"),
    }
    bar.finish_and_clear();
    Ok(())
}

/// Reads the chunks of a channel (the HTTP body) as one byte stream.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(c) => self.cur = c,
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len());
        out[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_args() {
        assert_eq!(remote("abc:/root/x"), Some(("abc", "/root/x")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("abc:rel"), None);
        assert_eq!(remote("/local/path"), None);
    }
}
