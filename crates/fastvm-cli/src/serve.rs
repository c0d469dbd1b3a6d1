//! `fastvm serve` (control plane + embedded worker) and `fastvm keys ...`.

use anyhow::Context;
use clap::{Args, Subcommand};
use fastvm_server::ServerConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct ServeArgs {
    /// Data directory (database, API key, VMs, images).
    #[arg(long, env = "FASTVM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// `postgres://...` to keep state in PostgreSQL instead of SQLite.
    #[arg(long, env = "FASTVM_DATABASE_URL")]
    pub database_url: Option<String>,
    #[command(flatten)]
    pub vms: RuntimeArgs,
    /// Address of the services proxy (HTTP, routes by Host to the VMs' services).
    #[arg(long, env = "FASTVM_PROXY_LISTEN", default_value = "127.0.0.1:8081")]
    pub proxy_listen: SocketAddr,
    /// Service hosts are <name>--<vm id hex>.proxy.<DOMAIN> (`localhost`: no DNS set-up in a browser).
    #[arg(long, env = "FASTVM_PROXY_DOMAIN", default_value = "localhost")]
    pub proxy_domain: String,
    /// Run no services proxy.
    #[arg(long, env = "FASTVM_NO_PROXY")]
    pub no_proxy: bool,
    /// Let bucket mounts use this endpoint URL (an `endpoint_url` of their
    /// credentials) although it is on a private, loopback or link-local
    /// address (repeatable; scheme, host and port must match).
    #[arg(long = "allow-bucket-endpoint", value_name = "URL", value_parser = parse_endpoint_url)]
    pub allow_bucket_endpoint: Vec<String>,
    /// Address of the Prometheus metrics (`GET /metrics`), apart from the API.
    #[arg(long, env = "FASTVM_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    pub metrics_listen: SocketAddr,
    /// Serve no metrics.
    #[arg(long, env = "FASTVM_NO_METRICS")]
    pub no_metrics: bool,
    /// Address of the SSH gateway (`ssh -p PORT <vm-id>@HOST` with a key of /v1/me/ssh-keys).
    #[arg(long, env = "FASTVM_SSH_LISTEN", default_value = "127.0.0.1:2222")]
    pub ssh_listen: SocketAddr,
    /// Run no SSH gateway.
    #[arg(long, env = "FASTVM_NO_SSH")]
    pub no_ssh: bool,
    #[command(flatten)]
    pub s3: S3Args,
    /// Cluster mode: snapshots go to this S3-compatible store
    /// (`s3://bucket/prefix`; --s3-endpoint, --s3-region and the
    /// FASTVM_S3_* keys apply) so any worker restores any snapshot.
    #[arg(long, env = "FASTVM_SNAPSHOT_STORE", value_name = "s3://BUCKET/PREFIX")]
    pub snapshot_store: Option<String>,
    /// Cluster mode without an embedded worker: VMs run on `fastvm worker`
    /// hosts that register with this control plane (secret: DATA_DIR/worker-token).
    #[arg(long, env = "FASTVM_NO_LOCAL_WORKER")]
    pub no_local_worker: bool,
    /// Most bytes one org may have staged for file transfers at once
    /// (uploads past it get 429 STAGING_QUOTA_EXCEEDED).
    #[arg(long, env = "FASTVM_STAGING_ORG_CAP_BYTES", default_value_t = fastvm_server::staging::DEFAULT_ORG_CAP_BYTES, value_parser = clap::value_parser!(u64).range(1..))]
    pub staging_org_cap_bytes: u64,
    /// Close a console after this many seconds without input or output.
    #[arg(long, env = "FASTVM_CONSOLE_IDLE_SEC", default_value_t = 900, value_parser = clap::value_parser!(u64).range(1..))]
    pub console_idle_sec: u64,
}

/// How this host runs VMs: accelerator, images, networking (`fastvm serve`
/// and `fastvm worker` take the same flags).
#[derive(Args)]
pub struct RuntimeArgs {
    /// Accelerator: auto (KVM only with vmx/svm and /dev/kvm), kvm or tcg.
    #[arg(long, default_value = "auto")]
    pub accel: String,
    /// Where guest images are cached (default: DATA_DIR/images).
    #[arg(long, env = "FASTVM_IMAGE_DIR")]
    pub image_dir: Option<PathBuf>,
    /// IPv6 prefix routed to this host; each VM's publicIpv6 comes from it.
    #[arg(long, env = "FASTVM_IPV6_PREFIX", default_value = "fd00:fa57::/64")]
    pub ipv6_prefix: ipnet::Ipv6Net,
    /// IPv4 pool of the VMs' private addresses (a /29 per VM, NATed for egress).
    #[arg(long, env = "FASTVM_IPV4_POOL", default_value = "10.200.0.0/16")]
    pub ipv4_pool: ipnet::Ipv4Net,
    /// Upstream DNS server of the VMs' resolvers (default: the host's first nameserver).
    #[arg(long, env = "FASTVM_DNS_UPSTREAM")]
    pub dns_upstream: Option<SocketAddr>,
    /// Internal range guests may never reach, whatever their firewall (repeatable;
    /// replaces the default 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, 100.64.0.0/10,
    /// fc00::/7; `none`: no range beyond the fixed ones: link-local, metadata, other VMs).
    #[arg(
        long = "deny-egress-cidr",
        value_name = "CIDR",
        env = "FASTVM_DENY_EGRESS_CIDR",
        value_delimiter = ','
    )]
    pub deny_egress_cidr: Vec<String>,
    /// No VM networking at all (hosts without nftables or network namespaces).
    #[arg(long, env = "FASTVM_NO_NETWORK")]
    pub no_network: bool,
    /// Speak plain HTTP to this image registry (HOST:PORT) in snapshot
    /// imports (repeatable; every other registry is spoken to over HTTPS).
    #[arg(long = "insecure-registry", value_name = "HOST:PORT", value_parser = parse_registry_host)]
    pub insecure_registry: Vec<String>,
    /// Cap of the snapshot imports' layer cache (DATA_DIR/oci), in GiB; the
    /// least recently used layers are evicted after an import.
    #[arg(
        long = "layer-cache-gib",
        env = "FASTVM_LAYER_CACHE_GIB",
        default_value_t = 10
    )]
    pub layer_cache_gib: u64,
}

/// `--insecure-registry`: a registry host with an optional port, no scheme or path.
fn parse_registry_host(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 255
        && !s.contains("://")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a registry host: give HOST or HOST:PORT, e.g. 127.0.0.1:5000 (no scheme, no path)"
        ))
    }
}

impl RuntimeArgs {
    /// Apply the flags to `cfg`.
    pub fn apply(&self, cfg: &mut fastvm_worker::RuntimeConfig) -> anyhow::Result<()> {
        cfg.accel = self.accel.parse().map_err(|e: String| anyhow::anyhow!(e))?;
        cfg.image_dir = self.image_dir.clone();
        cfg.insecure_registries = self.insecure_registry.clone();
        cfg.layer_cache_bytes = self.layer_cache_gib.saturating_mul(1 << 30);
        if self.no_network {
            cfg.network = None;
        } else if let Some(net) = cfg.network.as_mut() {
            net.ipv6_prefix = self.ipv6_prefix;
            net.ipv4_pool = self.ipv4_pool;
            if let Some(up) = self.dns_upstream {
                net.dns_upstream = up;
            }
            net.guard.deny_egress =
                fastvm_worker::net::guard::parse_deny_egress(&self.deny_egress_cidr)
                    .map_err(|e| anyhow::anyhow!(e))?;
        }
        Ok(())
    }
}

/// Stage file transfers in an S3-compatible bucket (default: the data dir).
#[derive(Args)]
pub struct S3Args {
    /// Bucket for file-transfer staging; setting it turns the S3 backend on.
    #[arg(long, env = "FASTVM_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3 API endpoint, e.g. http://127.0.0.1:9000 (default: AWS in --s3-region).
    #[arg(long, env = "FASTVM_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "FASTVM_S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Object keys start with PREFIX/ (then org/vm/uuid).
    #[arg(long, env = "FASTVM_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    #[arg(long, env = "FASTVM_S3_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    /// Prefer the environment variable: flags show in `ps`.
    #[arg(long, env = "FASTVM_S3_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
}

impl S3Args {
    /// The S3 staging config, if a bucket is set.
    fn config(self) -> anyhow::Result<Option<fastvm_server::staging::s3::S3Config>> {
        let Some(bucket) = self.s3_bucket else {
            return Ok(None);
        };
        let access_key_id = self
            .s3_access_key_id
            .context("--s3-bucket needs --s3-access-key-id (or FASTVM_S3_ACCESS_KEY_ID)")?;
        let secret_access_key = self
            .s3_secret_access_key
            .context("--s3-bucket needs FASTVM_S3_SECRET_ACCESS_KEY (or --s3-secret-access-key)")?;
        Ok(Some(fastvm_server::staging::s3::S3Config {
            endpoint: self.s3_endpoint,
            region: self.s3_region,
            bucket,
            access_key_id,
            secret_access_key,
            prefix: self.s3_prefix,
        }))
    }
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let data_dir = args.data_dir.unwrap_or_else(crate::default_data_dir);
    let mut cfg = ServerConfig::new(&data_dir);
    cfg.listen = args.listen;
    cfg.database_url = args.database_url;
    args.vms.apply(&mut cfg.runtime)?;
    if args.no_local_worker || args.snapshot_store.is_some() {
        let snapshot_store = match &args.snapshot_store {
            Some(url) => {
                anyhow::ensure!(
                    url.starts_with("s3://") && url.len() > 5,
                    "--snapshot-store must be s3://BUCKET[/PREFIX], got {url:?}"
                );
                Some(fastvm_server::routes::internal::SnapshotStoreSettings {
                    url: url.clone(),
                    endpoint: args.s3.s3_endpoint.clone(),
                    region: Some(args.s3.s3_region.clone()),
                    access_key_id: args.s3.s3_access_key_id.clone(),
                    secret_access_key: args.s3.s3_secret_access_key.clone(),
                })
            }
            None => None,
        };
        if cfg
            .database_url
            .as_deref()
            .is_none_or(|u| !u.starts_with("postgres"))
        {
            tracing::warn!("cluster mode on SQLite: only one control plane may run (use --database-url postgres://... for several)");
        }
        cfg.cluster = Some(fastvm_server::ClusterConfig {
            secret_file: None,
            local_worker: !args.no_local_worker,
            snapshot_store,
            local_registration: None,
            connector: std::sync::Arc::new(fastvm_worker_api::connect),
        });
    }
    cfg.staging.s3 = args.s3.config()?;
    cfg.staging.org_cap_bytes = args.staging_org_cap_bytes;
    cfg.allow_bucket_endpoints = args.allow_bucket_endpoint.clone();
    if !args.no_metrics {
        cfg.metrics_listen = Some(args.metrics_listen);
    }
    cfg.console.idle_timeout = std::time::Duration::from_secs(args.console_idle_sec);
    if !args.no_ssh {
        cfg.ssh = Some(fastvm_server::ssh::SshConfig::new(args.ssh_listen));
    }
    if !args.no_proxy {
        let mut proxy = fastvm_server::proxy::ProxyConfig::new(args.proxy_listen);
        proxy.domain = args.proxy_domain.trim_matches('.').to_ascii_lowercase();
        anyhow::ensure!(!proxy.domain.is_empty(), "--proxy-domain must not be empty");
        cfg.proxy = Some(proxy);
    }
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down; VMs keep running and are re-adopted at the next start");
    };
    fastvm_server::serve(cfg, shutdown).await
}

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create an API key for the default org (printed once).
    Create {
        #[arg(long, default_value = "cli")]
        name: String,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List API keys (never the secrets).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a key by id or prefix.
    Revoke {
        key: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
pub struct StoreArgs {
    #[arg(long, env = "FASTVM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[arg(long, env = "FASTVM_DATABASE_URL")]
    pub database_url: Option<String>,
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    let open = |s: &StoreArgs| {
        (
            s.data_dir.clone().unwrap_or_else(crate::default_data_dir),
            s.database_url.clone(),
        )
    };
    match cmd {
        KeysCommand::Create { name, store } => {
            let (dir, url) = open(&store);
            let st = fastvm_server::open_store(&dir, url.as_deref()).await?;
            let org = fastvm_server::default_org(&st)
                .await?
                .context("no default org in this store")?;
            let key = st.create_key(org, &name).await?;
            println!("{}", key.token);
            eprintln!(
                "key {} created for org {org}; it is shown only now",
                key.info.id
            );
        }
        KeysCommand::List { store } => {
            let (dir, url) = open(&store);
            let st = fastvm_server::open_store(&dir, url.as_deref()).await?;
            println!("{:<36}  {:<16}  {:<12}  REVOKED", "ID", "NAME", "PREFIX");
            for k in st.list_keys(None).await? {
                println!(
                    "{:<36}  {:<16}  {:<12}  {}",
                    k.id,
                    k.name,
                    k.prefix,
                    if k.revoked_at_ms.is_some() {
                        "yes"
                    } else {
                        "no"
                    }
                );
            }
        }
        KeysCommand::Revoke { key, store } => {
            let (dir, url) = open(&store);
            let st = fastvm_server::open_store(&dir, url.as_deref()).await?;
            let k = st.revoke_key(&key).await?;
            println!("revoked {}", k.id);
        }
    }
    Ok(())
}

/// `--allow-bucket-endpoint`: an absolute http(s) URL with a host.
fn parse_endpoint_url(s: &str) -> Result<String, String> {
    let u = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host_str().is_none() {
        return Err(format!(
            "{s:?} must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:9000"
        ));
    }
    Ok(s.to_owned())
}
