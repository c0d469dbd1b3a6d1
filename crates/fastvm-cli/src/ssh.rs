//! `fastvm ssh VM [-- CMD...]`: OpenSSH's `ssh` to the server's SSH gateway
//! as `<vm-id>@<API host>`, trusting exactly the gateway's host key.
//!
//! The port and host key come from `GET /v1/ssh-gateway`; the key goes to a
//! known_hosts file of fastvm's own (`DATA_DIR/ssh_known_hosts`), never to
//! `~/.ssh`. Authentication is OpenSSH's usual (agent, `~/.ssh/id_*`, or
//! `--identity`) with a key registered at `/v1/me/ssh-keys`.

use crate::client::{Client, ConnectArgs};
use anyhow::{bail, Context};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct SshArgs {
    /// VM id.
    pub vm: String,
    /// Private key file for `ssh -i`.
    #[arg(long, short = 'i')]
    pub identity: Option<PathBuf>,
    /// Extra option for ssh, e.g. `--ssh-option=-L8080:127.0.0.1:8080` (repeatable).
    #[arg(long = "ssh-option", allow_hyphen_values = true)]
    pub ssh_options: Vec<String>,
    /// Command to run instead of a login shell.
    #[arg(last = true)]
    pub command: Vec<String>,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// The `[host]:port` form known_hosts uses for a port other than 22.
fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_owned()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Replaces this process with `ssh`; returns only on failure.
pub async fn run(args: SshArgs) -> anyhow::Result<i32> {
    let vm: uuid::Uuid = args.vm.parse().with_context(|| {
        format!(
            "{:?} is not a VM id (a UUID; see `fastvm vm list`)",
            args.vm
        )
    })?;
    let client = Client::new(&args.conn)?;
    let info: fastvm_types::ssh_key::SshGatewayInfo = client.get_as("/v1/ssh-gateway").await?;
    let port = info.port;
    let keys: Vec<&str> = info.host_keys.iter().map(String::as_str).collect();
    if keys.is_empty() {
        bail!("the server published no SSH host key");
    }
    let url = reqwest::Url::parse(&client.base)
        .with_context(|| format!("bad API base URL {:?}", client.base))?;
    let host = url
        .host_str()
        .context("the API base URL has no host")?
        .trim_matches(['[', ']'])
        .to_owned();
    let name = known_hosts_name(&host, port);
    let mut known = String::new();
    for k in keys {
        if k.contains(['\n', '\r']) {
            bail!("the server sent a malformed host key");
        }
        known.push_str(&format!("{name} {k}\n"));
    }
    let dir = crate::default_data_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let known_file = dir.join("ssh_known_hosts");
    std::fs::write(&known_file, known)
        .with_context(|| format!("writing {}", known_file.display()))?;
    let mut cmd = std::process::Command::new("ssh");
    cmd.arg("-p")
        .arg(port.to_string())
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_file.display()))
        .arg("-o")
        .arg("StrictHostKeyChecking=yes")
        .arg("-o")
        .arg("ServerAliveInterval=30");
    if let Some(i) = &args.identity {
        cmd.arg("-i").arg(i).arg("-o").arg("IdentitiesOnly=yes");
    }
    cmd.args(&args.ssh_options);
    if args.command.is_empty() {
        cmd.arg("-t");
    }
    cmd.arg(format!("{vm}@{host}"));
    if !args.command.is_empty() {
        cmd.arg("--").args(&args.command);
    }
    let err = cmd.exec();
    bail!("cannot run ssh (install OpenSSH's client, Debian package openssh-client): {err}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_hosts_names() {
        assert_eq!(super::known_hosts_name("h", 22), "h");
        assert_eq!(
            super::known_hosts_name("127.0.0.1", 2222),
            "[127.0.0.1]:2222"
        );
        assert_eq!(super::known_hosts_name("::1", 2222), "[::1]:2222");
    }
}
