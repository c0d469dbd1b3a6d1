//! Client commands for the remaining endpoints, named like the SDK:
//! `fastvm quota` (`client.org.quotas`), `fastvm files presign|fetch|export`
//! (`client.vms.files.*`; `fastvm cp` is the everyday way to move files) and
//! `fastvm ssh-key ls|add|rm` (`client.me.ssh_keys.*`) and
//! `fastvm completions bash|zsh|fish`.

use crate::client::{Client, ConnectArgs};
use crate::vm::print_json;
use clap::Subcommand;
use fastvm_types::files::{
    FileExportRequest, FileExportResponse, FileFetchRequest, FilePresignRequest,
    FilePresignResponse,
};
use fastvm_types::quota::OrgQuotaUsage;
use fastvm_types::ssh_key::{AddSshKeyRequest, SshKey, SshKeyListResponse};
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

#[derive(Subcommand)]
pub enum SshKeyCommand {
    /// List your SSH keys (the API key's user).
    Ls {
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Register a public key: a `.pub` file (`-`: stdin).
    Add {
        file: std::path::PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        conn: ConnectArgs,
    },
    /// Remove a key by its fingerprint (`SHA256:...`, as `ssh-keygen -lf` prints it).
    Rm {
        fingerprint: String,
        #[command(flatten)]
        conn: ConnectArgs,
    },
}

fn print_keys(keys: &[SshKey], as_json: bool) -> anyhow::Result<()> {
    if as_json {
        return print_json(&keys);
    }
    println!("{:<52}  {:<20}  CREATED", "FINGERPRINT", "NAME");
    for k in keys {
        println!("{:<52}  {:<20}  {}", k.fingerprint, k.name, k.created_at);
    }
    Ok(())
}

pub async fn ssh_keys(cmd: SshKeyCommand) -> anyhow::Result<()> {
    match cmd {
        SshKeyCommand::Ls { conn } => {
            let list: SshKeyListResponse = Client::new(&conn)?.get_as("/v1/me/ssh-keys").await?;
            print_keys(&list.keys, conn.json)
        }
        SshKeyCommand::Add { file, name, conn } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                std::fs::read_to_string(&file)
                    .map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?
            };
            let req = AddSshKeyRequest {
                name,
                public_key: text.trim().to_owned(),
            };
            let key: SshKey = Client::new(&conn)?
                .call(Method::POST, "/v1/me/ssh-keys", Some(&req))
                .await?;
            print_keys(std::slice::from_ref(&key), conn.json)
        }
        SshKeyCommand::Rm { fingerprint, conn } => {
            let encoded: String = fingerprint
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            let out: fastvm_types::DeleteResponse = Client::new(&conn)?
                .call(
                    Method::DELETE,
                    &format!("/v1/me/ssh-keys/{encoded}"),
                    None::<&()>,
                )
                .await?;
            if conn.json {
                return print_json(&out);
            }
            println!("removed {fingerprint}");
            Ok(())
        }
    }
}

/// `fastvm completions SHELL`: the completion script on stdout (a reader that
/// stops early, e.g. `| head`, is not an error).
pub fn completions(shell: clap_complete::Shell, cmd: &mut clap::Command) -> anyhow::Result<()> {
    let script = completion_script(shell, cmd);
    match std::io::Write::write_all(&mut std::io::stdout(), &script) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn completion_script(shell: clap_complete::Shell, cmd: &mut clap::Command) -> Vec<u8> {
    let mut out = Vec::new();
    clap_complete::generate(shell, cmd, "fastvm", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_name_every_command() {
        let mut cmd = <crate::Cli as clap::CommandFactory>::command();
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let script = String::from_utf8(completion_script(shell, &mut cmd)).expect("utf-8");
            for sub in [
                "vm", "service", "snapshot", "ssh-key", "quota", "files", "console", "firewall",
            ] {
                assert!(script.contains(sub), "{shell:?} completion lacks {sub}");
            }
        }
    }
}
