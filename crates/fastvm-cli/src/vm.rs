//! `fastvm vm ...`: VM lifecycle through the REST API, with the API's own
//! types (`fastvm_types`): launch, list, get, update, rm, pause, resume,
//! `firewall get|set|patch` and `ttl refresh`. Named like the SDK's
//! `client.vms.*`.

use crate::client::{Client, ConnectArgs};
use anyhow::{bail, Context};
use clap::Subcommand;
use fastvm_types::{
    DeleteResponse, FirewallPolicy, LaunchVmRequest, Metadata, Patch, Ttl, TtlAction,
    UpdateVmRequest, Vm, VmStatus,
};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use std::collections::BTreeMap;
use std::path::PathBuf;
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
        /// Firewall policy: a JSON file (`-` for stdin), as in `vm firewall set`.
        #[arg(long)]
        firewall: Option<PathBuf>,
        /// TTL in seconds (with --ttl-action).
        #[arg(long)]
        ttl: Option<u64>,
        /// What the TTL does when it fires.
        #[arg(long, value_enum, default_value = "pause")]
        ttl_action: TtlActionArg,
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
    /// Rename a VM, replace its labels or change its TTL.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        /// Replace the labels with these, KEY=VALUE (repeatable).
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
        /// Remove every label.
        #[arg(long, conflicts_with = "labels")]
        clear_labels: bool,
        /// Set the TTL (seconds) and restart its cycle.
        #[arg(long, conflicts_with = "no_ttl")]
        ttl: Option<u64>,
        #[arg(long, value_enum, default_value = "pause")]
        ttl_action: TtlActionArg,
        /// Remove the TTL.
        #[arg(long)]
        no_ttl: bool,
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
    /// The VM's firewall: `get`, `set` (replace) or `patch` (the blocks given replace the stored ones).
    Firewall {
        #[command(subcommand)]
        command: FirewallCommand,
    },
    /// The VM's TTL: `refresh` starts a new full cycle.
    Ttl {
        #[command(subcommand)]
        command: TtlCommand,
    },
}

#[derive(Subcommand)]
pub enum FirewallCommand {
    /// Print the user policy and the effective one (with the services' rules).
    Get {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Replace the policy with the JSON in FILE (`-`: stdin).
    Set {
        id: String,
        file: PathBuf,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Replace only the blocks (ingress, egress, dns) present in FILE (`-`: stdin).
    Patch {
        id: String,
        file: PathBuf,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

#[derive(Subcommand)]
pub enum TtlCommand {
    /// Start a new full TTL cycle.
    Refresh {
        id: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TtlActionArg {
    Pause,
    Delete,
}

impl From<TtlActionArg> for TtlAction {
    fn from(a: TtlActionArg) -> TtlAction {
        match a {
            TtlActionArg::Pause => TtlAction::Pause,
            TtlActionArg::Delete => TtlAction::Delete,
        }
    }
}

fn pairs(items: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for item in items {
        let Some((k, v)) = item.split_once('=') else {
            bail!("{what} {item:?} is not KEY=VALUE")
        };
        m.insert(k.to_owned(), v.to_owned());
    }
    Ok(m)
}

/// A firewall policy from a JSON file, or stdin for `-`.
fn read_policy(file: &PathBuf) -> anyhow::Result<FirewallPolicy> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the policy from stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    serde_json::from_str(&text).with_context(|| format!("{} is not a firewall policy (JSON: {{\"ingress\": ..., \"egress\": ..., \"dns\": ...}})", file.display()))
}

fn print_table(vms: &[Vm]) {
    println!(
        "{:<36}  {:<20}  {:<12}  {:<7}  {:<24}  CREATED",
        "ID", "NAME", "STATUS", "MACHINE", "PUBLIC IPV6"
    );
    for vm in vms {
        println!(
            "{:<36}  {:<20}  {:<12}  {:<7}  {:<24}  {}",
            vm.id.to_string(),
            vm.name,
            vm.status.as_str(),
            vm.machine_name,
            vm.public_ipv6.as_deref().unwrap_or("-"),
            vm.created_at
        );
    }
}

pub(crate) fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn print_vm(vm: &Vm, as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(vm);
    }
    print_table(std::slice::from_ref(vm));
    Ok(())
}

/// Poll until the VM runs or fails, with a spinner.
pub async fn wait_running(client: &Client, id: &str, timeout: Duration) -> anyhow::Result<Vm> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(ProgressStyle::with_template(
        "{spinner} {elapsed:>3} {msg}",
    )?);
    bar.enable_steady_tick(Duration::from_millis(100));
    let start = Instant::now();
    let result = loop {
        let vm: Vm = client.get_as(&format!("/v1/vms/{id}")).await?;
        bar.set_message(format!("VM {id} is {}", vm.status.as_str()));
        match vm.status {
            VmStatus::Running => break Ok(vm),
            VmStatus::Error | VmStatus::Stopped | VmStatus::Deleting => {
                let why = vm.status.as_str();
                break Err(anyhow::anyhow!("VM {id} ended in status {why}"));
            }
            _ if start.elapsed() > timeout => {
                break Err(anyhow::anyhow!(
                    "VM {id} not running after {timeout:?} (status {})",
                    vm.status.as_str()
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
            firewall,
            ttl,
            ttl_action,
            no_wait,
            conn,
        } => {
            if machine.is_none() && snapshot.is_none() {
                bail!("give --machine (e.g. c1m2) or --snapshot");
            }
            let client = Client::new(&conn)?;
            let req = LaunchVmRequest {
                machine_type: machine,
                snapshot_id: snapshot
                    .map(|s| s.parse())
                    .transpose()
                    .context("--snapshot is not a snapshot id (a UUID)")?,
                name,
                env_vars: (!env.is_empty())
                    .then(|| pairs(&env, "--env"))
                    .transpose()?,
                metadata: (!labels.is_empty())
                    .then(|| pairs(&labels, "--label"))
                    .transpose()?,
                firewall: firewall.as_ref().map(read_policy).transpose()?,
                ttl: ttl.map(|seconds| Ttl {
                    seconds,
                    action: ttl_action.into(),
                }),
            };
            let vm: Vm = client.call(Method::POST, "/v1/vms", Some(&req)).await?;
            let vm = if no_wait || vm.status == VmStatus::Running {
                vm
            } else {
                wait_running(&client, &vm.id.to_string(), Duration::from_secs(300))
                    .await
                    .context("waiting for the VM")?
            };
            print_vm(&vm, conn.json)
        }
        VmCommand::List { status, conn } => {
            let client = Client::new(&conn)?;
            let path = match status {
                Some(st) => format!("/v1/vms?status={}", percent_encode(&st)),
                None => "/v1/vms".to_owned(),
            };
            let vms: Vec<Vm> = client.get_as(&path).await?;
            if conn.json {
                return print_json(&vms);
            }
            print_table(&vms);
            Ok(())
        }
        VmCommand::Get { id, conn } => print_vm(
            &Client::new(&conn)?.get_as(&format!("/v1/vms/{id}")).await?,
            conn.json,
        ),
        VmCommand::Update {
            id,
            name,
            labels,
            clear_labels,
            ttl,
            ttl_action,
            no_ttl,
            conn,
        } => {
            let req = UpdateVmRequest {
                name,
                metadata: if clear_labels {
                    Some(Metadata::default())
                } else {
                    (!labels.is_empty())
                        .then(|| pairs(&labels, "--label"))
                        .transpose()?
                },
                ttl: match (ttl, no_ttl) {
                    (_, true) => Patch::Null,
                    (Some(seconds), false) => Patch::Value(Ttl {
                        seconds,
                        action: ttl_action.into(),
                    }),
                    (None, false) => Patch::Absent,
                },
            };
            let vm: Vm = Client::new(&conn)?
                .call(Method::PATCH, &format!("/v1/vms/{id}"), Some(&req))
                .await?;
            print_vm(&vm, conn.json)
        }
        VmCommand::Rm { id, conn } => {
            let out: DeleteResponse = Client::new(&conn)?
                .call(Method::DELETE, &format!("/v1/vms/{id}"), None::<&()>)
                .await?;
            if conn.json {
                return print_json(&out);
            }
            println!("deleted {id}");
            Ok(())
        }
        VmCommand::Pause { id, conn } => print_vm(
            &Client::new(&conn)?
                .call(Method::POST, &format!("/v1/vms/{id}/pause"), None::<&()>)
                .await?,
            conn.json,
        ),
        VmCommand::Resume { id, conn } => print_vm(
            &Client::new(&conn)?
                .call(Method::POST, &format!("/v1/vms/{id}/resume"), None::<&()>)
                .await?,
            conn.json,
        ),
        VmCommand::Firewall { command } => firewall(command).await,
        VmCommand::Ttl {
            command: TtlCommand::Refresh { id, conn },
        } => {
            let vm: Vm = Client::new(&conn)?
                .call(
                    Method::POST,
                    &format!("/v1/vms/{id}/ttl/refresh"),
                    None::<&()>,
                )
                .await?;
            if conn.json {
                return print_json(&vm);
            }
            match (vm.expires_at_ms, vm.ttl_remaining_ms) {
                (Some(at), _) => println!(
                    "VM {id}: the TTL fires at {}",
                    humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + Duration::from_millis(at)
                    )
                ),
                (None, Some(left)) => {
                    println!("VM {id} is paused: {left} ms of TTL left once resumed")
                }
                _ => println!("VM {id}: TTL refreshed"),
            }
            Ok(())
        }
    }
}

async fn firewall(cmd: FirewallCommand) -> anyhow::Result<()> {
    let (id, conn, vm): (String, ConnectArgs, Vm) = match cmd {
        FirewallCommand::Get { id, conn } => {
            let vm = Client::new(&conn)?.get_as(&format!("/v1/vms/{id}")).await?;
            (id, conn, vm)
        }
        FirewallCommand::Set { id, file, conn } => {
            let policy = read_policy(&file)?;
            let vm = Client::new(&conn)?
                .call(
                    Method::PUT,
                    &format!("/v1/vms/{id}/firewall"),
                    Some(&policy),
                )
                .await?;
            (id, conn, vm)
        }
        FirewallCommand::Patch { id, file, conn } => {
            let policy = read_policy(&file)?;
            let vm = Client::new(&conn)?
                .call(
                    Method::PATCH,
                    &format!("/v1/vms/{id}/firewall"),
                    Some(&policy),
                )
                .await?;
            (id, conn, vm)
        }
    };
    let both = serde_json::json!({"id": id, "firewall": vm.firewall, "effectiveFirewall": vm.effective_firewall});
    if conn.json {
        return print_json(&both);
    }
    println!(
        "firewall (the user policy):\n{}",
        serde_json::to_string_pretty(&vm.firewall)?
    );
    println!(
        "effective (what the worker enforces, with the services' rules):\n{}",
        serde_json::to_string_pretty(&vm.effective_firewall)?
    );
    Ok(())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
