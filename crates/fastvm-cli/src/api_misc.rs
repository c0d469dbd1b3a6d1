//! Client commands for the remaining endpoints, named like the SDK:
//! `fastvm quota` (`client.org.quotas`), `fastvm files presign|fetch|export`
//! (`client.vms.files.*`; `fastvm cp` is the everyday way to move files) and
//! `fastvm completions bash|zsh|fish`.

use crate::client::{Client, ConnectArgs};
use crate::vm::print_json;
use clap::Subcommand;
use fastvm_types::files::{
    FileExportRequest, FileExportResponse, FileFetchRequest, FilePresignRequest,
    FilePresignResponse,
};
use fastvm_types::quota::OrgQuotaUsage;
use reqwest::Method;

/// `fastvm quota`: the org's limits and usage, through the API.
pub async fn quota(conn: ConnectArgs) -> anyhow::Result<()> {
    let q: OrgQuotaUsage = Client::new(&conn)?.get_as("/v1/org/quotas").await?;
    if conn.json {
        return print_json(&q);
    }
    println!("org {}", q.org_id);
    println!("{:<14}  {:>10}  {:>10}", "QUOTA", "USED", "LIMIT");
    let rows = [
        ("vcpu", q.usage.vcpu, q.limits.vcpu),
        ("memoryMiB", q.usage.memory_mib, q.limits.memory_mib),
        ("diskGiB", q.usage.disk_gib, q.limits.disk_gib),
        (
            "snapshotCount",
            q.usage.snapshot_count,
            q.limits.snapshot_count,
        ),
        ("volumeCount", q.usage.volume_count, q.limits.volume_count),
        ("volumeGiB", q.usage.volume_gib, q.limits.volume_gib),
    ];
    for (name, used, limit) in rows {
        println!("{name:<14}  {used:>10}  {limit:>10}");
    }
    Ok(())
}

#[derive(Subcommand)]
pub enum FilesCommand {
    /// Signed upload and download URLs for PATH in the VM.
    Presign {
        vm: String,
        path: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Copy the object at URL (a downloadUrl) to PATH in the VM.
    Fetch {
        vm: String,
        #[arg(long)]
        url: String,
        #[arg(long)]
        path: String,
        #[arg(long)]
        timeout_sec: Option<u64>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Copy PATH of the VM (a file, or a directory as tar) to URL (an uploadUrl). An extension of this server.
    Export {
        vm: String,
        #[arg(long)]
        path: String,
        #[arg(long)]
        url: String,
        #[arg(long)]
        timeout_sec: Option<u64>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

pub async fn files(cmd: FilesCommand) -> anyhow::Result<()> {
    match cmd {
        FilesCommand::Presign { vm, path, conn } => {
            let r: FilePresignResponse = Client::new(&conn)?
                .call(
                    Method::POST,
                    &format!("/v1/vms/{vm}/files/presign"),
                    Some(&FilePresignRequest { path }),
                )
                .await?;
            if conn.json {
                return print_json(&r);
            }
            println!(
                "upload:   {}\ndownload: {}\nexpires in {} s; uploads up to {} bytes",
                r.upload_url, r.download_url, r.expires_in_sec, r.max_upload_bytes
            );
            Ok(())
        }
        FilesCommand::Fetch {
            vm,
            url,
            path,
            timeout_sec,
            conn,
        } => {
            let req = FileFetchRequest {
                url,
                path: path.clone(),
                timeout_sec,
            };
            let r: serde_json::Value = Client::new(&conn)?
                .call(
                    Method::POST,
                    &format!("/v1/vms/{vm}/files/fetch"),
                    Some(&req),
                )
                .await?;
            if conn.json {
                return print_json(&r);
            }
            println!("fetched into {vm}:{path}");
            Ok(())
        }
        FilesCommand::Export {
            vm,
            path,
            url,
            timeout_sec,
            conn,
        } => {
            let req = FileExportRequest {
                path: path.clone(),
                url,
                timeout_sec,
            };
            let r: FileExportResponse = Client::new(&conn)?
                .call(
                    Method::POST,
                    &format!("/v1/vms/{vm}/files/export"),
                    Some(&req),
                )
                .await?;
            if conn.json {
                return print_json(&r);
            }
            println!("exported {vm}:{path} ({} bytes)", r.size_bytes);
            Ok(())
        }
    }
}

/// `fastvm completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell, cmd: &mut clap::Command) {
    clap_complete::generate(shell, cmd, "fastvm", &mut std::io::stdout());
}
