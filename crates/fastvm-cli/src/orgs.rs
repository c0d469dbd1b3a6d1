//! `fastvm orgs quota get|set`: an org's quota limits and usage, on the
//! store directly (like `fastvm keys`).

use crate::serve::StoreArgs;
use anyhow::Context;
use clap::{Args, Subcommand};
use fastvm_server::store::{QuotaPatch, Store};
use fastvm_types::OrgId;

#[derive(Subcommand)]
pub enum OrgsCommand {
    /// Quota limits of an org (defaults: vcpu 16, memory 32768 MiB, disk 200 GiB,
    /// 50 snapshots, 20 volumes, 500 volume GiB).
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
    },
}

#[derive(Subcommand)]
pub enum QuotaCommand {
    /// Print the org's limits and current usage.
    Get {
        #[command(flatten)]
        org: OrgArg,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Change some limits (the others keep their value) and print them.
    Set {
        #[command(flatten)]
        org: OrgArg,
        #[arg(long)]
        vcpu: Option<u64>,
        #[arg(long = "memory-mib")]
        memory_mib: Option<u64>,
        #[arg(long = "disk-gib")]
        disk_gib: Option<u64>,
        #[arg(long = "snapshot-count")]
        snapshot_count: Option<u64>,
        #[arg(long = "volume-count")]
        volume_count: Option<u64>,
        #[arg(long = "volume-gib")]
        volume_gib: Option<u64>,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
pub struct OrgArg {
    /// Org name or id (default: the org created at first start).
    #[arg(long)]
    pub org: Option<String>,
}

async fn resolve(st: &Store, org: &OrgArg) -> anyhow::Result<OrgId> {
    match org.org.as_deref() {
        None => fastvm_server::default_org(st)
            .await?
            .context("no default org in this store"),
        Some(s) => match st.org_by_name(s).await? {
            Some(id) => Ok(id),
            None => s
                .parse::<OrgId>()
                .with_context(|| format!("no org named {s:?}")),
        },
    }
}

async fn open(store: &StoreArgs) -> anyhow::Result<Store> {
    let dir = store
        .data_dir
        .clone()
        .unwrap_or_else(crate::default_data_dir);
    fastvm_server::open_store(&dir, store.database_url.as_deref()).await
}

async fn print(st: &Store, org: OrgId) -> anyhow::Result<()> {
    let limits = st.quota_limits(org).await?;
    let usage = st.quota_usage(org).await?;
    println!("org {org}");
    println!("{:<16}  {:>10}  {:>10}", "RESOURCE", "LIMIT", "USAGE");
    for (name, l, u) in [
        ("vcpu", limits.vcpu, usage.vcpu),
        ("memoryMiB", limits.memory_mib, usage.memory_mib),
        ("diskGiB", limits.disk_gib, usage.disk_gib),
        ("snapshotCount", limits.snapshot_count, usage.snapshot_count),
        ("volumeCount", limits.volume_count, usage.volume_count),
        ("volumeGiB", limits.volume_gib, usage.volume_gib),
    ] {
        println!("{name:<16}  {l:>10}  {u:>10}");
    }
    Ok(())
}

pub async fn run(cmd: OrgsCommand) -> anyhow::Result<()> {
    let OrgsCommand::Quota { command } = cmd;
    match command {
        QuotaCommand::Get { org, store } => {
            let st = open(&store).await?;
            let id = resolve(&st, &org).await?;
            print(&st, id).await
        }
        QuotaCommand::Set {
            org,
            vcpu,
            memory_mib,
            disk_gib,
            snapshot_count,
            volume_count,
            volume_gib,
            store,
        } => {
            let patch = QuotaPatch {
                vcpu,
                memory_mib,
                disk_gib,
                snapshot_count,
                volume_count,
                volume_gib,
            };
            anyhow::ensure!(!patch.is_empty(), "nothing to set; give at least one of --vcpu, --memory-mib, --disk-gib, --snapshot-count, --volume-count, --volume-gib");
            let st = open(&store).await?;
            let id = resolve(&st, &org).await?;
            st.set_quota(id, patch).await?;
            print(&st, id).await
        }
    }
}
