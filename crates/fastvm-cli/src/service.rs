//! `fastvm service ...`: the HTTP services of a VM, exposed by the server's
//! proxy at `<name>--<vm id hex>.proxy.<domain>` (each row shows its URL).

use crate::client::{Client, ConnectArgs};
use crate::vm::print_json;
use clap::Subcommand;
use fastvm_types::service::{Service, UpdateServiceRequest};
use fastvm_types::DeleteResponse;
use reqwest::Method;

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

fn print(services: &[Service], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(&services);
    }
    println!("{:<29}  {:<5}  {:<5}  URL", "NAME", "PORT", "H2C");
    for s in services {
        println!(
            "{:<29}  {:<5}  {:<5}  {}",
            s.name,
            s.port,
            s.h2c,
            s.url.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

pub async fn run(cmd: ServiceCommand) -> anyhow::Result<()> {
    match cmd {
        ServiceCommand::Ls { vm, conn } => print(
            &Client::new(&conn)?
                .get_as::<Vec<Service>>(&format!("/v1/vms/{vm}/services"))
                .await?,
            conn.json,
        ),
        ServiceCommand::Add {
            vm,
            name,
            port,
            h2c,
            conn,
        } => {
            let req = UpdateServiceRequest {
                port: u32::from(port),
                h2c,
            };
            let svc: Service = Client::new(&conn)?
                .call(
                    Method::PUT,
                    &format!("/v1/vms/{vm}/services/{name}"),
                    Some(&req),
                )
                .await?;
            print(std::slice::from_ref(&svc), conn.json)
        }
        ServiceCommand::Rm { vm, name, conn } => {
            let out: DeleteResponse = Client::new(&conn)?
                .call(
                    Method::DELETE,
                    &format!("/v1/vms/{vm}/services/{name}"),
                    None::<&()>,
                )
                .await?;
            if conn.json {
                return print_json(&out);
            }
            eprintln!("service {name} removed from VM {vm}");
            Ok(())
        }
    }
}
