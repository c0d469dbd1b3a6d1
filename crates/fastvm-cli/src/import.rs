//! `fastvm import ...`: build snapshots from OCI images through the REST API
//! (`client.snapshot_imports.*`), with the import's phases shown as they
//! happen. Launch the result with `fastvm vm launch --snapshot ID`.

use crate::client::{Client, ConnectArgs};
use crate::vm::print_json;
use clap::Subcommand;
use fastvm_types::snapshot_import::{
    CreateSnapshotImportRequest, SnapshotImportResponse, SnapshotImportSourceSpec,
    SnapshotImportSourceType, SnapshotImportStatus,
};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ImportCommand {
    /// Import an OCI / Docker image (e.g. 127.0.0.1:5000/app:1) as a snapshot; waits for it.
    Image {
        /// Image reference.
        image: String,
        /// `os/arch[/variant]` of a multi-platform image (default linux/amd64).
        #[arg(long)]
        platform: Option<String>,
        /// Machine type of the snapshot (default c1m2).
        #[arg(long)]
        machine: Option<String>,
        /// Disk size of the snapshot in GiB (default: the machine type's).
        #[arg(long = "disk-gib")]
        disk_gib: Option<u64>,
        #[arg(long)]
        name: Option<String>,
        /// Registry username (the password is read from FASTVM_REGISTRY_PASSWORD).
        #[arg(long = "registry-username")]
        registry_username: Option<String>,
        /// Answer with the import at once instead of waiting for it.
        #[arg(long = "no-wait")]
        no_wait: bool,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Build a Dockerfile into a snapshot (in a builder VM of the worker); waits for it.
    ///
    /// The context directory (default: the Dockerfile's directory) is zipped
    /// and uploaded; `FROM` images come from the registries the server can
    /// reach (`--insecure-registry` ones included).
    Dockerfile {
        /// The Dockerfile.
        path: PathBuf,
        /// The build context directory (default: the Dockerfile's directory).
        #[arg(long)]
        context: Option<PathBuf>,
        /// `KEY=VALUE` build argument (repeatable).
        #[arg(long = "build-arg")]
        build_args: Vec<String>,
        /// Build up to this stage of a multi-stage Dockerfile.
        #[arg(long)]
        target: Option<String>,
        /// Machine type of the builder and of the snapshot (default c1m2).
        #[arg(long)]
        machine: Option<String>,
        /// Disk size of the snapshot in GiB (default: the machine type's).
        #[arg(long = "disk-gib")]
        disk_gib: Option<u64>,
        #[arg(long)]
        name: Option<String>,
        /// Registry (HOST[:PORT]) the credentials are for.
        #[arg(long = "registry-host")]
        registry_host: Option<String>,
        /// Registry username (the password is read from FASTVM_REGISTRY_PASSWORD).
        #[arg(long = "registry-username")]
        registry_username: Option<String>,
        /// Answer with the import at once instead of waiting for it.
        #[arg(long = "no-wait")]
        no_wait: bool,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// List imports.
    List {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Show one import (with its events).
    Get {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Print an import's build log.
    Logs {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Cancel an import in flight.
    Cancel {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Delete a finished import (and its snapshot).
    Rm {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

fn status_str(s: SnapshotImportStatus) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn print(imports: &[SnapshotImportResponse], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(&imports);
    }
    println!(
        "{:<36}  {:<10}  {:<36}  {:<30}  ERROR",
        "ID", "STATUS", "SNAPSHOT", "IMAGE"
    );
    for i in imports {
        println!(
            "{:<36}  {:<10}  {:<36}  {:<30}  {}",
            i.id.to_string(),
            status_str(i.status),
            i.snapshot_id.map(|s| s.to_string()).unwrap_or_default(),
            i.source.image.clone().unwrap_or_default(),
            i.error.clone().unwrap_or_default()
        );
    }
    Ok(())
}

/// Poll the import until it is terminal, showing each new event.
async fn follow(
    client: &Client,
    mut imp: SnapshotImportResponse,
    quiet: bool,
) -> anyhow::Result<SnapshotImportResponse> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(
        "{spinner} {elapsed:>3} {msg}",
    )?);
    if !quiet {
        bar.enable_steady_tick(Duration::from_millis(100));
    }
    let mut shown = 0;
    loop {
        for e in imp.events.iter().skip(shown) {
            let line = format!(
                "{:<10} {:<10} {}",
                e.phase,
                e.status,
                e.message.clone().unwrap_or_default()
            );
            if !quiet {
                bar.println(line);
            }
        }
        shown = imp.events.len();
        if let Some(last) = imp.events.last() {
            bar.set_message(format!("{} ({})", last.phase, status_str(imp.status)));
        }
        if imp.status.is_terminal() {
            bar.finish_and_clear();
            return Ok(imp);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        imp = client
            .get_as(&format!("/v1/snapshot-imports/{}", imp.id))
            .await?;
    }
}

/// Print the new import (`no_wait`) or follow it to its end; the exit code.
async fn finish(
    client: &Client,
    imp: SnapshotImportResponse,
    no_wait: bool,
    json: bool,
) -> anyhow::Result<i32> {
    if no_wait {
        print(&[imp], json)?;
        return Ok(0);
    }
    let done = follow(client, imp, json).await?;
    let ok = done.status == SnapshotImportStatus::Succeeded;
    if json {
        print_json(&done)?;
    } else if ok {
        let snap = done.snapshot_id.map(|s| s.to_string()).unwrap_or_default();
        println!("snapshot {snap} ready; launch it with: fastvm vm launch --snapshot {snap}");
    } else {
        eprintln!(
            "import {} {}: {}",
            done.id,
            status_str(done.status),
            done.error.clone().unwrap_or_default()
        );
        eprintln!("its build log: fastvm import logs {}", done.id);
    }
    Ok(if ok { 0 } else { 1 })
}

/// ZIP `dir` (regular files and directories; symlinks are skipped with a
/// note) into a temp file. The Dockerfile's path in it: its path inside
/// `dir`, or `Dockerfile.fastvm` at the root when it lies outside.
fn zip_context(
    dir: &std::path::Path,
    dockerfile: &std::path::Path,
) -> anyhow::Result<(tempfile::NamedTempFile, String)> {
    use anyhow::Context as _;
    use std::io::Write as _;
    let tmp = tempfile::NamedTempFile::new()?;
    let mut zip = zip::ZipWriter::new(tmp.reopen()?);
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let root = dir
        .canonicalize()
        .with_context(|| format!("context directory {}", dir.display()))?;
    let df = dockerfile
        .canonicalize()
        .with_context(|| format!("Dockerfile {}", dockerfile.display()))?;
    let mut stack = vec![root.clone()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .with_context(|| format!("reading {}", d.display()))?
            .collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p
                .strip_prefix(&root)?
                .to_string_lossy()
                .replace(std::path::MAIN_SEPARATOR, "/");
            let ft = e.file_type()?;
            if ft.is_dir() {
                zip.add_directory(format!("{rel}/"), opts)?;
                stack.push(p);
            } else if ft.is_file() {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = e.metadata()?.permissions().mode();
                zip.start_file(rel, opts.unix_permissions(mode & 0o7777))?;
                let mut f =
                    std::fs::File::open(&p).with_context(|| format!("reading {}", p.display()))?;
                std::io::copy(&mut f, &mut zip)?;
            } else {
                eprintln!("skipping {} (not a regular file or directory)", p.display());
            }
        }
    }
    let path = match df.strip_prefix(&root) {
        Ok(rel) => rel
            .to_string_lossy()
            .replace(std::path::MAIN_SEPARATOR, "/"),
        Err(_) => {
            let name = "Dockerfile.fastvm".to_owned();
            zip.start_file(name.as_str(), opts)?;
            zip.write_all(&std::fs::read(&df)?)?;
            name
        }
    };
    zip.finish()?.flush()?;
    Ok((tmp, path))
}

pub async fn run(cmd: ImportCommand) -> anyhow::Result<i32> {
    match cmd {
        ImportCommand::Image {
            image,
            platform,
            machine,
            disk_gib,
            name,
            registry_username,
            no_wait,
            conn,
        } => {
            let registry_password = std::env::var("FASTVM_REGISTRY_PASSWORD").ok();
            let req = CreateSnapshotImportRequest {
                machine_type: machine,
                disk_gib,
                name,
                source: SnapshotImportSourceSpec {
                    source_type: SnapshotImportSourceType::Image,
                    image: Some(image),
                    platform,
                    registry_username,
                    registry_password,
                    registry_host: None,
                    context_ref: None,
                    dockerfile_path: None,
                    build_args: None,
                    target: None,
                },
            };
            let client = Client::new(&conn)?;
            let imp: SnapshotImportResponse = client
                .call(Method::POST, "/v1/snapshot-imports", Some(&req))
                .await?;
            finish(&client, imp, no_wait, conn.json).await
        }
        ImportCommand::Dockerfile {
            path,
            context,
            build_args,
            target,
            machine,
            disk_gib,
            name,
            registry_host,
            registry_username,
            no_wait,
            conn,
        } => {
            let mut args = std::collections::BTreeMap::new();
            for a in &build_args {
                let (k, v) = a
                    .split_once('=')
                    .ok_or_else(|| anyhow::anyhow!("--build-arg {a:?} is not KEY=VALUE"))?;
                args.insert(k.to_owned(), v.to_owned());
            }
            let dir = match context {
                Some(c) => c,
                None => path
                    .parent()
                    .map(|p| {
                        if p.as_os_str().is_empty() {
                            PathBuf::from(".")
                        } else {
                            p.to_owned()
                        }
                    })
                    .unwrap_or_else(|| PathBuf::from(".")),
            };
            let (zip, dockerfile_path) = {
                let (dir, path) = (dir.clone(), path.clone());
                tokio::task::spawn_blocking(move || zip_context(&dir, &path)).await??
            };
            let size = zip.as_file().metadata()?.len();
            let client = Client::new(&conn)?;
            let p: fastvm_types::snapshot_import::ContextPresignResponse = client
                .call(
                    Method::POST,
                    "/v1/snapshot-imports/context-presign",
                    Some(&serde_json::json!({"sizeBytes": size})),
                )
                .await?;
            let file = tokio::fs::File::open(zip.path()).await?;
            let put = client
                .http
                .put(&p.upload_url)
                .header(reqwest::header::CONTENT_TYPE, "application/zip")
                .header(reqwest::header::CONTENT_LENGTH, size)
                .body(reqwest::Body::wrap_stream(
                    tokio_util::io::ReaderStream::with_capacity(file, 256 << 10),
                ))
                .send()
                .await?;
            if !put.status().is_success() {
                crate::client::decode(put).await?;
                return Ok(1);
            }
            if !conn.json {
                eprintln!("context uploaded ({size} bytes, {})", dir.display());
            }
            let req = CreateSnapshotImportRequest {
                machine_type: machine,
                disk_gib,
                name,
                source: SnapshotImportSourceSpec {
                    source_type: SnapshotImportSourceType::Dockerfile,
                    image: None,
                    platform: None,
                    registry_username,
                    registry_password: std::env::var("FASTVM_REGISTRY_PASSWORD").ok(),
                    registry_host,
                    context_ref: Some(p.context_ref),
                    dockerfile_path: Some(dockerfile_path),
                    build_args: (!args.is_empty()).then_some(args),
                    target,
                },
            };
            let imp: SnapshotImportResponse = client
                .call(Method::POST, "/v1/snapshot-imports", Some(&req))
                .await?;
            finish(&client, imp, no_wait, conn.json).await
        }
        ImportCommand::List { conn } => {
            let all: Vec<SnapshotImportResponse> =
                Client::new(&conn)?.get_as("/v1/snapshot-imports").await?;
            print(&all, conn.json).map(|()| 0)
        }
        ImportCommand::Get { id, conn } => {
            let imp: SnapshotImportResponse = Client::new(&conn)?
                .get_as(&format!("/v1/snapshot-imports/{id}"))
                .await?;
            if conn.json {
                return print_json(&imp).map(|()| 0);
            }
            print(std::slice::from_ref(&imp), false)?;
            for e in &imp.events {
                println!(
                    "  {:<10} {:<10} {}",
                    e.phase,
                    e.status,
                    e.message.clone().unwrap_or_default()
                );
            }
            Ok(0)
        }
        ImportCommand::Logs { id, conn } => {
            let client = Client::new(&conn)?;
            let resp = client
                .request(Method::GET, &format!("/v1/snapshot-imports/{id}/logs"))
                .send()
                .await?;
            if !resp.status().is_success() {
                crate::client::decode(resp).await?;
                return Ok(1);
            }
            print!("{}", resp.text().await?);
            Ok(0)
        }
        ImportCommand::Cancel { id, conn } => {
            let imp: SnapshotImportResponse = Client::new(&conn)?
                .call(
                    Method::POST,
                    &format!("/v1/snapshot-imports/{id}/cancel"),
                    None::<&()>,
                )
                .await?;
            print(&[imp], conn.json).map(|()| 0)
        }
        ImportCommand::Rm { id, conn } => {
            let out: fastvm_types::DeleteResponse = Client::new(&conn)?
                .call(
                    Method::DELETE,
                    &format!("/v1/snapshot-imports/{id}"),
                    None::<&()>,
                )
                .await?;
            if conn.json {
                return print_json(&out).map(|()| 0);
            }
            println!("deleted {id}");
            Ok(0)
        }
    }
}
