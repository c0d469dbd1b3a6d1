//! The SSH gateway (`fastvm serve --ssh-listen`): `ssh -p 2222 <vm-id>@host`
//! with a key registered at `/v1/me/ssh-keys` reaches any VM of the key
//! owner's org. SSH ends here, on the host (russh); each channel is bridged
//! to the guest agent through the [`Worker`](crate::worker::Worker) trait, so
//! no sshd runs in the guest and no guest port is opened (it works under a
//! deny-all firewall, and for VMs on another worker host).
//!
//! ```text
//!  TCP accept -> per source address: failed-auth budget (AuthLimiter)
//!  userauth publickey(user = <vm-id>, key)
//!     key fingerprint -> ssh_keys rows (one per user that registered it)
//!     -> is <vm-id> a live VM of one of those users' orgs?   (same rejection for
//!        an unknown VM, another org's VM, an unknown key: nothing to enumerate)
//!     signature verified by russh (all accepted types, FIDO sk-* included)
//!  channel "session"  (at most MAX_CHANNELS open per connection)
//!     pty-req, env, window-change, signal        -> remembered / forwarded
//!     shell | exec CMD with a pty  -> Worker::open_pty (login shell | sh -c CMD)
//!     shell | exec CMD without     -> Worker::exec_with_input (sh -l | sh -c CMD)
//!     subsystem sftp               -> Worker::exec_with_input(/usr/lib/openssh/sftp-server)
//!     exit-status, EOF, close when the process ends
//!  channel "direct-tcpip" (ssh -L) -> Worker::open_guest_tcp(host, port): dialed
//!     by the agent inside the guest (the guest's 127.0.0.1 included)
//!  a paused VM is resumed before its first channel runs (the proxy's
//!  single-flight wake-up, crate::proxy::wake)
//! ```
//!
//! Bounds: output flows only as fast as the client's SSH window allows (a
//! client that never reads stops the guest process, not the server);
//! keystrokes and stdin wait for the guest to take them; channels per
//! connection are capped; window sizes are clamped to 1..=4096; the
//! connection is dropped after keepalives go unanswered. The host key
//! (ed25519) is created once in the data dir (`ssh_host_ed25519_key`).

pub mod keys;
mod session;

use crate::store::StoreError;
use crate::AppState;
use anyhow::Context as _;
use fastvm_types::{OrgId, VmId, VmStatus};
use russh::keys::ssh_key::{private::Ed25519Keypair, HashAlg, LineEnding};
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, Server as _, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// File of the gateway's host key in the data dir (OpenSSH format, 0600).
pub const HOST_KEY_FILE: &str = "ssh_host_ed25519_key";
/// Most channels one connection may have open at once.
pub const MAX_CHANNELS: usize = 64;

/// How the gateway runs.
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// Where to listen (port 0: any free port).
    pub listen: SocketAddr,
    /// Send a keepalive after this much silence from the client...
    pub keepalive_interval: Duration,
    /// ...and drop the connection after this many go unanswered.
    pub keepalive_max: usize,
    /// Failed authentications allowed per source address per window.
    pub auth_failures_per_window: u32,
    /// The window of [`SshConfig::auth_failures_per_window`].
    pub auth_window: Duration,
}

impl SshConfig {
    pub fn new(listen: SocketAddr) -> Self {
        SshConfig {
            listen,
            keepalive_interval: Duration::from_secs(30),
            keepalive_max: 4,
            auth_failures_per_window: 20,
            auth_window: Duration::from_secs(60),
        }
    }
}

/// Load the host key from `data_dir`, creating it on first start.
pub fn load_or_create_host_key(data_dir: &Path) -> anyhow::Result<PrivateKey> {
    let path = data_dir.join(HOST_KEY_FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading the SSH host key {}", path.display()))?;
        return PrivateKey::from_openssh(text.as_bytes()).with_context(|| {
            format!(
                "the SSH host key {} is not an OpenSSH private key",
                path.display()
            )
        });
    }
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .context("encoding the new SSH host key")?;
    std::fs::create_dir_all(data_dir)?;
    crate::write_secret(&path, &text)
        .with_context(|| format!("writing the SSH host key {}", path.display()))?;
    let public = key
        .public_key()
        .to_openssh()
        .context("encoding the host key")?;
    std::fs::write(path.with_extension("pub"), format!("{public}\n"))?;
    Ok(key)
}

/// `<type> <base64>` of a public key.
pub fn public_line(key: &PublicKey) -> String {
    key.to_openssh().unwrap_or_default()
}

/// The running gateway.
pub struct SshTask {
    addr: SocketAddr,
    handle: russh::server::RunningServerHandle,
    task: tokio::task::JoinHandle<()>,
}

impl SshTask {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stop accepting and close every connection.
    pub fn stop(&self) {
        self.handle.shutdown("the server is shutting down".into());
        self.task.abort();
    }
}

/// Start the gateway on `listener`.
pub async fn spawn(
    listener: tokio::net::TcpListener,
    state: AppState,
    cfg: &SshConfig,
    host_key: PrivateKey,
) -> anyhow::Result<SshTask> {
    let addr = listener.local_addr()?;
    let config = russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-FastVM".into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        keys: vec![host_key],
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        max_auth_attempts: 6,
        inactivity_timeout: None,
        keepalive_interval: Some(cfg.keepalive_interval),
        keepalive_max: cfg.keepalive_max,
        nodelay: true,
        window_size: 2 << 20,
        maximum_packet_size: 32768,
        channel_buffer_size: 64,
        ..Default::default()
    };
    let mut server = Gateway {
        state,
        limiter: Arc::new(AuthLimiter::new(
            cfg.auth_failures_per_window,
            cfg.auth_window,
        )),
    };
    let (handle_tx, handle_rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let running = server.run_on_socket(Arc::new(config), &listener);
        let _ = handle_tx.send(running.handle());
        if let Err(e) = running.await {
            tracing::warn!(error = %e, "the SSH gateway stopped");
        }
    });
    let handle = handle_rx.await.context("the SSH gateway did not start")?;
    Ok(SshTask { addr, handle, task })
}

/// Failed authentications per source address, in fixed windows: past the
/// budget every attempt from that address is refused until the window ends.
/// Bounded: at most [`AuthLimiter::MAX_ADDRESSES`] addresses are tracked.
pub(crate) struct AuthLimiter {
    per_window: u32,
    window: Duration,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl AuthLimiter {
    const MAX_ADDRESSES: usize = 65536;

    fn new(per_window: u32, window: Duration) -> Self {
        AuthLimiter {
            per_window,
            window,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// True when `ip` may still try.
    fn allowed(&self, ip: IpAddr) -> bool {
        let Ok(seen) = self.seen.lock() else {
            return false;
        };
        match seen.get(&ip) {
            Some((start, n)) => start.elapsed() >= self.window || *n < self.per_window,
            None => true,
        }
    }

    fn failed(&self, ip: IpAddr) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        if seen.len() >= Self::MAX_ADDRESSES {
            let window = self.window;
            seen.retain(|_, (start, _)| start.elapsed() < window);
        }
        if seen.len() >= Self::MAX_ADDRESSES {
            return;
        }
        let entry = seen.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= self.window {
            *entry = (Instant::now(), 0);
        }
        entry.1 = entry.1.saturating_add(1);
        if entry.1 == self.per_window {
            tracing::warn!(%ip, "SSH: too many failed authentications; refusing this address for a while");
        }
    }
}

struct Gateway {
    state: AppState,
    limiter: Arc<AuthLimiter>,
}

impl russh::server::Server for Gateway {
    type Handler = Connection;

    fn new_client(&mut self, peer: Option<SocketAddr>) -> Connection {
        Connection {
            state: self.state.clone(),
            limiter: self.limiter.clone(),
            peer: peer.map(|p| p.ip()),
            grant: None,
            channels: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// What an authenticated connection may reach.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Grant {
    pub org: OrgId,
    pub vm: VmId,
}

/// One client connection.
pub(crate) struct Connection {
    state: AppState,
    limiter: Arc<AuthLimiter>,
    peer: Option<IpAddr>,
    grant: Option<Grant>,
    channels: Arc<AtomicUsize>,
}

fn reject() -> Auth {
    Auth::Reject {
        proceed_with_methods: None,
        partial_success: false,
    }
}

impl Connection {
    /// The VM `user` names, when `key` is registered by a user of its org.
    async fn authorize(&self, user: &str, key: &PublicKey) -> Result<Option<Grant>, StoreError> {
        let Ok(vm) = user.trim().parse::<VmId>() else {
            return Ok(None);
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        for owner in self.state.store().ssh_key_owners(&fingerprint).await? {
            if let Some(rec) = self.state.store().get_vm(owner.org_id, vm).await? {
                if !matches!(rec.status, VmStatus::Deleting) {
                    return Ok(Some(Grant {
                        org: owner.org_id,
                        vm,
                    }));
                }
            }
        }
        Ok(None)
    }

    async fn check(&mut self, user: &str, key: &PublicKey, final_step: bool) -> Auth {
        if let Some(ip) = self.peer {
            if !self.limiter.allowed(ip) {
                return reject();
            }
        }
        match self.authorize(user, key).await {
            Ok(Some(grant)) => {
                if final_step {
                    tracing::info!(vm = %grant.vm, peer = ?self.peer, "SSH session authenticated");
                    self.grant = Some(grant);
                }
                Auth::Accept
            }
            Ok(None) => {
                if let Some(ip) = self.peer {
                    self.limiter.failed(ip);
                }
                reject()
            }
            Err(e) => {
                tracing::warn!(error = %e, "SSH authentication could not read the store");
                reject()
            }
        }
    }

    fn context(&self) -> Option<session::Ctx> {
        self.grant.map(|grant| session::Ctx {
            state: self.state.clone(),
            grant,
        })
    }

    /// Count a new channel; `None` when the connection has too many.
    fn reserve_channel(&self) -> Option<session::ChannelSlot> {
        let n = self.channels.fetch_add(1, Ordering::SeqCst);
        if n >= MAX_CHANNELS {
            self.channels.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(session::ChannelSlot(self.channels.clone()))
    }
}

/// Environment variables a client may pass (`SendEnv`): names only of
/// letters, digits and `_`, not starting with a digit.
fn valid_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.check(user, offer.public_key, false).await)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.check(user, key.public_key, true).await)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(ctx), Some(slot)) = (self.context(), self.reserve_channel()) else {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        reply.accept().await;
        tokio::spawn(session::run_session(ctx, channel, slot));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (Some(ctx), Some(slot)) = (self.context(), self.reserve_channel()) else {
            reply
                .reject(russh::ChannelOpenFailure::ResourceShortage)
                .await;
            return Ok(());
        };
        let Ok(port) = u16::try_from(port) else {
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        tokio::spawn(session::run_direct_tcpip(
            ctx,
            channel,
            reply,
            host.to_owned(),
            port,
            slot,
        ));
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        _term: &str,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        _variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if valid_env_name(variable_name) {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        session.channel_success(channel)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    async fn window_change_request(
        &mut self,
        _channel: ChannelId,
        _col_width: u32,
        _row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// Where `fastvm serve` keeps the host key, for [`load_or_create_host_key`].
pub fn host_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join(HOST_KEY_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limiter_refuses_after_budget_and_forgives_after_window() {
        let l = AuthLimiter::new(3, Duration::from_millis(200));
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        for _ in 0..3 {
            assert!(l.allowed(ip));
            l.failed(ip);
        }
        assert!(!l.allowed(ip));
        assert!(l.allowed(other), "other addresses are unaffected");
        std::thread::sleep(Duration::from_millis(250));
        assert!(l.allowed(ip));
    }

    #[test]
    fn host_key_persists() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let a = load_or_create_host_key(dir.path())?;
        let b = load_or_create_host_key(dir.path())?;
        assert_eq!(a.public_key(), b.public_key());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(HOST_KEY_FILE))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        Ok(())
    }

    #[test]
    fn env_names() {
        assert!(valid_env_name("LANG"));
        assert!(valid_env_name("LC_ALL"));
        assert!(!valid_env_name("1A"));
        assert!(!valid_env_name("A=B"));
        assert!(!valid_env_name(""));
    }
}
