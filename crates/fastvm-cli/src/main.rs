//! `fastvm`: one binary for the server and its clients.
//!
//! ```text
//!  fastvm serve               control plane + embedded worker (REST API)
//!  fastvm keys create|list|revoke
//!  fastvm orgs quota get|set  org quota limits (and usage)
//!  fastvm images build        build (or refresh) the guest image cache
//!  fastvm vm launch|list|get|rm|pause|resume
//!  fastvm exec VM -- CMD...   stream output live, exit with the command's code
//!  fastvm ssh VM [-- CMD...]  OpenSSH to the server's SSH gateway (its host key only)
//!  fastvm snapshot create|list|get|rm
//!  fastvm console [--web] VM   the VM's shell in this terminal (or a browser)
//! ```

mod api_misc;
mod client;
mod console;
mod cp;
mod exec;
mod images;
mod import;
mod orgs;
mod serve;
mod service;
mod sized_tar;
mod snapshot;
mod ssh;
mod vm;
mod worker;
mod workers;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "fastvm",
    version,
    about = "Fast VM: microVMs in a fraction of a boot"
)]
struct Cli {
    /// Log lines as text (default) or as JSON objects (one per line, with the
    /// request id of API requests).
    #[arg(
        long,
        global = true,
        env = "FASTVM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

// Parsed once per process: the size of its largest variant (`serve`'s flags)
// costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the server: REST API, store and the embedded worker.
    Serve(serve::ServeArgs),
    /// Run a worker host of a cluster: VMs of this host, driven by the control planes.
    Worker(worker::WorkerArgs),
    /// Manage API keys (works on the store directly).
    Keys {
        #[command(subcommand)]
        command: serve::KeysCommand,
    },
    /// Org administration: quota limits (works on the store directly).
    Orgs {
        #[command(subcommand)]
        command: orgs::OrgsCommand,
    },
    /// Guest images (kernel, initramfs, root filesystem).
    Images {
        #[command(subcommand)]
        command: images::ImagesCommand,
    },
    /// Manage VMs.
    Vm {
        #[command(subcommand)]
        command: vm::VmCommand,
    },
    /// Run a command in a VM.
    Exec(exec::ExecArgs),
    /// Copy files and directories into or out of a VM: `cp LOCAL VM:PATH`, `cp VM:PATH LOCAL`.
    Cp(cp::CpArgs),
    /// A shell in the VM in this terminal (`~.` quits), or `--web`: a browser console URL.
    Console(console::ConsoleArgs),
    /// Capture VMs and manage snapshots (restore: `fastvm vm launch --snapshot ID`).
    Snapshot {
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// Build snapshots from OCI images: `import image REF`, then `vm launch --snapshot ID`.
    Import {
        #[command(subcommand)]
        command: import::ImportCommand,
    },
    /// The org's quotas: limits and usage.
    Quota {
        #[command(flatten)]
        conn: client::ConnectArgs,
    },
    /// Signed file URLs and server-side copies: `files presign|fetch|export`.
    Files {
        #[command(subcommand)]
        command: api_misc::FilesCommand,
    },
    /// Your SSH keys for the gateway: `ssh-key ls|add|rm`.
    SshKey {
        #[command(subcommand)]
        command: api_misc::SshKeyCommand,
    },
    /// Print a shell completion script: `fastvm completions bash > /etc/bash_completion.d/fastvm`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Open a shell (or run CMD) in a VM over the SSH gateway with OpenSSH's `ssh`.
    Ssh(ssh::SshArgs),
    /// Worker hosts of a cluster (admin key): `workers ls`, `workers drain ID`.
    Workers {
        #[command(subcommand)]
        command: workers::WorkersCommand,
    },
    /// HTTP services of a VM behind the proxy: `service ls|add|rm VM ...`.
    Service {
        #[command(subcommand)]
        command: service::ServiceCommand,
    },
}

/// The per-user data dir: `FASTVM_DATA_DIR`, else `$XDG_DATA_HOME/fastvm`,
/// else `~/.local/share/fastvm`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FASTVM_DATA_DIR") {
        return PathBuf::from(d);
    }
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("fastvm");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib"));
    home.join(".local/share/fastvm")
}

fn init_tracing(format: LogFormat) {
    let mut filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    // The volume NFS library logs every guest connection (info) and every
    // refused write (error): a guest would choose how much we log. Silenced
    // unless RUST_LOG names it.
    if !filter.contains("nfs3_server") {
        filter.push_str(",nfs3_server=off");
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let code = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve::serve(args).await.map(|()| 0),
            Command::Worker(args) => worker::run(args).await.map(|()| 0),
            Command::Keys { command } => serve::keys(command).await.map(|()| 0),
            Command::Orgs { command } => orgs::run(command).await.map(|()| 0),
            Command::Images { command } => images::run(command).await.map(|()| 0),
            Command::Vm { command } => vm::run(command).await.map(|()| 0),
            Command::Exec(args) => exec::run(args).await,
            Command::Cp(args) => cp::run(args).await.map(|()| 0),
            Command::Console(args) => console::run(args).await,
            Command::Snapshot { command } => snapshot::run(command).await.map(|()| 0),
            Command::Import { command } => import::run(command).await,
            Command::Service { command } => service::run(command).await.map(|()| 0),
            Command::Quota { conn } => api_misc::quota(conn).await.map(|()| 0),
            Command::Files { command } => api_misc::files(command).await.map(|()| 0),
            Command::SshKey { command } => api_misc::ssh_keys(command).await.map(|()| 0),
            Command::Completions { shell } => {
                api_misc::completions(shell, &mut <Cli as clap::CommandFactory>::command())
                    .map(|()| 0)
            }
            Command::Ssh(args) => ssh::run(args).await,
            Command::Workers { command } => workers::run(command).await.map(|()| 0),
        }
    });
    // Do not wait for tasks still blocked in a read (the console's stdin
    // reader cannot be cancelled: a normal shutdown would wait for a keypress).
    rt.shutdown_background();
    match code {
        Ok(0) => Ok(()),
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1)
        }
    }
}
