//! `fastvm workers ls|drain`: the worker hosts of a cluster, through the
//! admin API (`GET /v1/admin/workers`, `POST /v1/admin/workers/{id}/drain`;
//! an admin API key).

use crate::client::{Client, ConnectArgs};
use crate::vm::print_json;
use clap::Subcommand;
use reqwest::Method;
use serde_json::Value;

#[derive(Subcommand)]
pub enum WorkersCommand {
    /// List the workers: status (ready, unreachable, draining), VMs, capacity, last heartbeat.
    Ls {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Stop placing VMs on worker ID and move its paused VMs elsewhere.
    Drain {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

pub async fn run(cmd: WorkersCommand) -> anyhow::Result<()> {
    match cmd {
        WorkersCommand::Ls { conn } => {
            let workers = Client::new(&conn)?
                .get_as::<Value>("/v1/admin/workers")
                .await?;
            if conn.json {
                return print_json(&workers);
            }
            println!(
                "{:<20}  {:<28}  {:<11}  {:>4}  {:>4}  {:>9}  LAST HEARTBEAT",
                "ID", "ADDRESS", "STATUS", "VMS", "CPUS", "MEM MIB"
            );
            for w in workers.as_array().into_iter().flatten() {
                let s = |k: &str| w[k].as_str().unwrap_or("-").to_owned();
                let n = |k: &str| w[k].as_u64().map_or("-".to_owned(), |v| v.to_string());
                println!(
                    "{:<20}  {:<28}  {:<11}  {:>4}  {:>4}  {:>9}  {}",
                    s("id"),
                    s("address"),
                    s("status"),
                    n("vmCount"),
                    n("cpus"),
                    n("memoryMiB"),
                    s("lastHeartbeatAt")
                );
            }
            Ok(())
        }
        WorkersCommand::Drain { id, conn } => {
            let client = Client::new(&conn)?;
            let path = format!("/v1/admin/workers/{id}/drain");
            let answer = client.send(client.request(Method::POST, &path)).await?;
            if conn.json {
                return print_json(&answer);
            }
            println!("worker {id} is draining");
            Ok(())
        }
    }
}
