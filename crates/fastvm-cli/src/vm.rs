//! `fastvm vm ...`: VM lifecycle through the REST API.

use crate::client::{Client, ConnectArgs};
use anyhow::{bail, Context};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Launch a VM (from a machine type or a snapshot) and wait until it runs.
    Launch {
        /// Machine type (c1m2, c2m4, c4m8, c8m16); required unless --snapshot.
        #[arg(long, short = 'm')]
        machine: Option<String>,
        /// Restore this snapshot instead.
        #[arg(long)]
        snapshot: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// Environment variable for every exec, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        /// Metadata label, KEY=VALUE (repeatable).
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
        /// Return at once instead of waiting for `running`.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// List VMs.
    List {
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Show one VM.
    Get {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Delete a VM.
    Rm {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Pause a running VM (vCPUs stop, memory stays).
    Pause {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Resume a paused VM.
    Resume {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

fn pairs(items: &[String], what: &str) -> anyhow::Result<Map<String, Value>> {
    let mut m = Map::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            bail!("{what} {item:?} is not KEY=VALUE")
        };
        m.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    Ok(m)
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn print_table(vms: &[Value]) {
    println!(
        "{:<36}  {:<20}  {:<12}  {:<7}  CREATED",
        "ID", "NAME", "STATUS", "MACHINE"
    );
    for vm in vms {
        println!(
            "{:<36}  {:<20}  {:<12}  {:<7}  {}",
            s(vm, "id"),
            s(vm, "name"),
            s(vm, "status"),
            s(vm, "machineName"),
            s(vm, "createdAt")
        );
    }
}

fn print_vm(vm: &Value, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(vm)?);
    } else {
        print_table(std::slice::from_ref(vm));
    }
    Ok(())
}

/// Poll until the VM runs or fails, with a spinner.
pub async fn wait_running(client: &Client, id: &str, timeout: Duration) -> anyhow::Result<Value> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(
        "{spinner} {elapsed:>3} {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(100));
    let start = Instant::now();
    let result = loop {
        let vm = client.get(&format!("/v1/vms/{id}")).await?;
        let status = s(&vm, "status").to_owned();
        bar.set_message(format!("VM {id} is {status}"));
        match status.as_str() {
            "running" => break Ok(vm),
            "error" | "stopped" | "deleting" => {
                break Err(anyhow::anyhow!("VM {id} ended in status {status}"))
            }
            _ if start.elapsed() > timeout => {
                break Err(anyhow::anyhow!(
                    "VM {id} not running after {timeout:?} (status {status})"
                ))
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    };
    bar.finish_and_clear();
    result
}

pub async fn run(cmd: VmCommand) -> anyhow::Result<()> {
    match cmd {
        VmCommand::Launch {
            machine,
            snapshot,
            name,
            env,
            labels,
            no_wait,
            conn,
        } => {
            if machine.is_none() && snapshot.is_none() {
                bail!("give --machine (e.g. c1m2) or --snapshot");
            }
            let client = Client::new(&conn)?;
            let mut body = json!({});
            if let Some(m) = machine {
                body["machineType"] = json!(m);
            }
            if let Some(sn) = snapshot {
                body["snapshotId"] = json!(sn);
            }
            if let Some(n) = name {
                body["name"] = json!(n);
            }
            if !env.is_empty() {
                body["envVars"] = Value::Object(pairs(&env, "--env")?);
            }
            if !labels.is_empty() {
                body["metadata"] = Value::Object(pairs(&labels, "--label")?);
            }
            let vm = client.post("/v1/vms", &body).await?;
            let vm = if no_wait || s(&vm, "status") == "running" {
                vm
            } else {
                let id = s(&vm, "id").to_owned();
                wait_running(&client, &id, Duration::from_secs(300))
                    .await
                    .context("waiting for the VM")?
            };
            print_vm(&vm, conn.json)
        }
        VmCommand::List { status, conn } => {
            let client = Client::new(&conn)?;
            let mut req = client.request(reqwest::Method::GET, "/v1/vms");
            if let Some(st) = status {
                req = req.query(&[("status", st)]);
            }
            let vms = client.send(req).await?;
            if conn.json {
                println!("{}", serde_json::to_string_pretty(&vms)?);
            } else {
                print_table(vms.as_array().map(Vec::as_slice).unwrap_or(&[]));
            }
            Ok(())
        }
        VmCommand::Get { id, conn } => print_vm(
            &Client::new(&conn)?.get(&format!("/v1/vms/{id}")).await?,
            conn.json,
        ),
        VmCommand::Rm { id, conn } => {
            let out = Client::new(&conn)?.delete(&format!("/v1/vms/{id}")).await?;
            if conn.json {
                println!("{out}");
            } else {
                println!("deleted {id}");
            }
            Ok(())
        }
        VmCommand::Pause { id, conn } => print_vm(
            &Client::new(&conn)?
                .post(&format!("/v1/vms/{id}/pause"), &json!({}))
                .await?,
            conn.json,
        ),
        VmCommand::Resume { id, conn } => print_vm(
            &Client::new(&conn)?
                .post(&format!("/v1/vms/{id}/resume"), &json!({}))
                .await?,
            conn.json,
        ),
    }
}
