//! `fastvm service ...`: the HTTP services of a VM, exposed by the server's
//! proxy at `<name>--<vm id hex>.proxy.<domain>` (each row shows its URL).

use crate::client::{Client, ConnectArgs};
use clap::Subcommand;
use serde_json::{json, Value};

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// List a VM's services.
    Ls {
        vm: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Register a service, or change its port / transport (PUT: an upsert).
    Add {
        vm: String,
        /// 1-29 lowercase letters and digits, single internal hyphens.
        name: String,
        /// TCP port in the guest (1024-65535).
        port: u16,
        /// Speak HTTP/2 cleartext to the backend (gRPC).
        #[arg(long)]
        h2c: bool,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Deregister a service.
    Rm {
        vm: String,
        name: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

fn print(services: &[Value], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        println!("{}", serde_json::to_string_pretty(services)?);
        return Ok(());
    }
    println!("{:<29}  {:<5}  {:<5}  URL", "NAME", "PORT", "H2C");
    for s in services {
        println!(
            "{:<29}  {:<5}  {:<5}  {}",
            s["name"].as_str().unwrap_or(""),
            s["port"],
            s["h2c"],
            s["url"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Ls { vm, conn } => {
            let all = Client::new(&conn)?
                .get(&format!("/v1/vms/{vm}/services"))
                .await?;
            print(all.as_array().map(Vec::as_slice).unwrap_or(&[]), conn.json)
        }
        ServiceCommand::Add {
            vm,
            name,
            port,
            h2c,
            conn,
        } => {
            let svc = Client::new(&conn)?
                .put(
                    &format!("/v1/vms/{vm}/services/{name}"),
                    &json!({"port": port, "h2c": h2c}),
                )
                .await?;
            print(std::slice::from_ref(&svc), conn.json)
        }
        ServiceCommand::Rm { vm, name, conn } => {
            Client::new(&conn)?
                .delete(&format!("/v1/vms/{vm}/services/{name}"))
                .await?;
            if !conn.json {
                eprintln!("service {name} removed from VM {vm}");
            }
            Ok(())
        }
    }
}
