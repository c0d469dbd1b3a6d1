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
    /// Build a Dockerfile (with DIR as its context) into a snapshot.
    Dockerfile {
        path: PathBuf,
        #[arg(long)]
        context: Option<PathBuf>,
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
            if no_wait {
                print(&[imp], conn.json)?;
                return Ok(0);
            }
            let done = follow(&client, imp, conn.json).await?;
            let ok = done.status == SnapshotImportStatus::Succeeded;
            if conn.json {
                print_json(&done)?;
            } else if ok {
                let snap = done.snapshot_id.map(|s| s.to_string()).unwrap_or_default();
                println!(
                    "snapshot {snap} ready; launch it with: fastvm vm launch --snapshot {snap}"
                );
            } else {
                eprintln!(
                    "import {} {}: {}",
                    done.id,
                    status_str(done.status),
                    done.error.clone().unwrap_or_default()
                );
            }
            Ok(if ok { 0 } else { 1 })
        }
        ImportCommand::Dockerfile {
            path,
            context,
            conn,
        } => {
            let _ = (context, conn);
            anyhow::bail!(
                "Dockerfile builds are not available yet ({}): build the image elsewhere, push it to a registry and run `fastvm import image REF`",
                path.display()
            )
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
