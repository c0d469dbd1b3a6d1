//! `fastvm snapshot ...`: capture VMs and manage snapshots through the REST API.
//! Restore with `fastvm vm launch --snapshot ID`.

use crate::client::{Client, ConnectArgs};
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Capture a running or paused VM (it keeps running).
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
    /// Delete a snapshot (VMs restored from it keep working).
    Rm {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn print(snaps: &[Value], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(snaps)?);
        return Ok(());
    }
    println!(
        "{:<36}  {:<24}  {:<8}  {:<36}  CREATED",
        "ID", "NAME", "STATUS", "SOURCE VM"
    );
    for sn in snaps {
        println!(
            "{:<36}  {:<24}  {:<8}  {:<36}  {}",
            s(sn, "id"),
            s(sn, "name"),
            s(sn, "status"),
            s(sn, "vmId"),
            s(sn, "createdAt")
        );
    }
    Ok(())
}

pub async fn run(cmd: SnapshotCommand) -> anyhow::Result<()> {
    match cmd {
        SnapshotCommand::Create { vm, name, conn } => {
            let mut body = json!({ "vmId": vm });
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            let snap = Client::new(&conn)?.post("/v1/snapshots", &body).await?;
            print(std::slice::from_ref(&snap), conn.json)
        }
        SnapshotCommand::List { conn } => {
            let all = Client::new(&conn)?.get("/v1/snapshots").await?;
            print(all.as_array().map(Vec::as_slice).unwrap_or(&[]), conn.json)
        }
        SnapshotCommand::Get { id, conn } => {
            let snap = Client::new(&conn)?
                .get(&format!("/v1/snapshots/{id}"))
                .await?;
            print(std::slice::from_ref(&snap), conn.json)
        }
        SnapshotCommand::Rm { id, conn } => {
            Client::new(&conn)?
                .delete(&format!("/v1/snapshots/{id}"))
                .await?;
            println!("deleted {id}");
            Ok(())
        }
    }
}
