//! `fastvm snapshot ...`: capture VMs and manage snapshots through the REST
//! API (`client.snapshots.*`). Restore with `fastvm vm launch --snapshot ID`.

use crate::client::{Client, ConnectArgs};
use crate::vm::print_json;
use clap::Subcommand;
use fastvm_types::snapshot::{CreateSnapshotRequest, Snapshot, UpdateSnapshotRequest};
use fastvm_types::DeleteResponse;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use std::time::Duration;

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Capture a running or paused VM (it keeps running), with a spinner while it captures.
    Create {
        vm: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// List snapshots.
    List {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Show one snapshot.
    Get {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Rename a snapshot.
    Update {
        id: String,
        #[arg(long)]
        name: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Delete a snapshot (VMs restored from it keep working).
    Rm {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

fn print(snaps: &[Snapshot], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(&snaps);
    }
    println!(
        "{:<36}  {:<24}  {:<8}  {:<36}  CREATED",
        "ID", "NAME", "STATUS", "SOURCE VM"
    );
    for sn in snaps {
        let status = serde_json::to_value(sn.status)?;
        println!(
            "{:<36}  {:<24}  {:<8}  {:<36}  {}",
            sn.id.to_string(),
            sn.name,
            status.as_str().unwrap_or(""),
            sn.vm_id.to_string(),
            sn.created_at
        );
    }
    Ok(())
}

pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { vm, name, conn } => {
            let req = CreateSnapshotRequest {
                vm_id: vm
                    .parse()
                    .map_err(|_| anyhow::anyhow!("{vm:?} is not a VM id (a UUID)"))?,
                name,
            };
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template(
                "{spinner} {elapsed:>3} {msg}",
            )?);
            bar.set_message(format!("capturing VM {vm} (memory, device state, disk)"));
            if !conn.json {
                bar.enable_steady_tick(Duration::from_millis(100));
            }
            let snap: Result<Snapshot, _> = Client::new(&conn)?
                .call(Method::POST, "/v1/snapshots", Some(&req))
                .await;
            bar.finish_and_clear();
            print(std::slice::from_ref(&snap?), conn.json)
        }
        SnapshotCommand::List { conn } => print(
            &Client::new(&conn)?
                .get_as::<Vec<Snapshot>>("/v1/snapshots")
                .await?,
            conn.json,
        ),
        SnapshotCommand::Get { id, conn } => print(
            &[Client::new(&conn)?
                .get_as::<Snapshot>(&format!("/v1/snapshots/{id}"))
                .await?],
            conn.json,
        ),
        SnapshotCommand::Update { id, name, conn } => {
            let req = UpdateSnapshotRequest { name: Some(name) };
            let snap: Snapshot = Client::new(&conn)?
                .call(Method::PATCH, &format!("/v1/snapshots/{id}"), Some(&req))
                .await?;
            print(&[snap], conn.json)
        }
        SnapshotCommand::Rm { id, conn } => {
            let out: DeleteResponse = Client::new(&conn)?
                .call(Method::DELETE, &format!("/v1/snapshots/{id}"), None::<&()>)
                .await?;
            if conn.json {
                return print_json(&out);
            }
            println!("deleted {id}");
            Ok(())
        }
    }
}
