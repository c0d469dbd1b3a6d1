//! The Fast VM control plane: the REST API of the spec over a store (SQLite or
//! PostgreSQL) and workers: the embedded one of this process, or, in cluster
//! mode, worker hosts that register over HTTP (`fleet.rs`: placement,
//! heartbeats, fencing, drain; `routes/internal.rs`: their side of the wire).
//!
//! ```text
//!  client --HTTP--> routes/ (axum: auth.rs, error.rs, one module per resource)
//!                      |
//!                  lifecycle.rs (status machine, TTL bookkeeping, reconciliation)
//!                  vm_list.rs (GET /v1/vms: views cached by row version, pages)
//!                  snapshots.rs (capture, restore guard, delete)
//!                  ttl.rs (TTL reaper)  quotas.rs (org limits on launch/resume/snapshot)
//!                  console.rs (console tokens, wake, WebSocket terminal sessions)
//!  ssh client --SSH--> ssh/ (russh gateway: keys of /v1/me/ssh-keys, channels -> Worker)
//!                    |                         |
//!                  store/ (sqlx Any:          worker.rs: Worker trait
//!                  SQLite | PostgreSQL)         '-- LocalWorker -> fastvm_worker::Runtime -> QEMU
//! ```
//!
//! Entry points: [`serve`] (what `fastvm serve` runs), [`start`] (serve in the
//! background, e.g. on an ephemeral port in tests), [`build_app`] (the router
//! and its state without a listener), and [`open_store`] with
//! [`store::Store::create_key`] / [`store::Store::list_keys`] /
//! [`store::Store::revoke_key`] for `fastvm keys` (a server notices a
//! revocation made by that separate process within [`store::KEY_CACHE_TTL`]).
//!
//! On first start (an empty store) the server creates the org `default`, a
//! user `admin` and an API key, written to `DATA_DIR/admin-api-key` (mode 0600).
//!
//! [`serve`] and [`start`] run the TTL reaper ([`spawn_ttl_reaper`]) while
//! they serve; it rebuilds its deadlines from the store, so a TTL that
//! expired while the server was down fires right after the next start.
//! Quotas: [`store::Store::set_quota`] changes an org's limits.
//!
//! Shutdown leaves every VM running; the next start re-adopts them (the
//! worker finds their QEMU processes again) and reconciles the stored statuses.

pub mod auth;
mod bucket_mounts;
pub mod console;
pub mod error;
pub mod fleet;
mod fork;
mod lifecycle;
pub mod metrics;
pub mod openapi;
pub mod proxy;
mod quotas;
pub mod routes;
pub mod services;
mod snapshot_imports;
mod snapshots;
pub mod ssh;
pub mod staging;
pub mod store;
mod ttl;
pub mod vm_list;
mod volumes;
pub mod worker;

pub use ttl::{spawn_ttl_reaper, TtlReaper};

use anyhow::Context as _;
use fastvm_types::{OrgId, VmId};
use fastvm_worker::LocalWorker;
use fastvm_worker::{Runtime, RuntimeConfig};
use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use store::Store;
use worker::Worker;

/// Name of the org created on first start.
pub const DEFAULT_ORG: &str = "default";
/// File (in the data dir) holding the admin API key created on first start.
pub const ADMIN_KEY_FILE: &str = "admin-api-key";

/// Everything `fastvm serve` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// State of the server: `fastvm.db` (SQLite), `admin-api-key`, and the
    /// embedded worker's `vms/` and `images/` (unless `runtime` says otherwise).
    pub data_dir: PathBuf,
    /// Where to listen (port 0: any free port, see [`RunningServer::addr`]).
    pub listen: SocketAddr,
    /// `postgres://...` to use PostgreSQL; SQLite in the data dir when `None`.
    pub database_url: Option<String>,
    /// The embedded worker (accelerator, QEMU binary, image cache, ...).
    pub runtime: RuntimeConfig,
    /// How long `POST /v1/vms` waits for the VM to run before answering 202.
    pub launch_wait: Duration,
    /// After shutdown is requested, how long open requests (e.g. exec
    /// streams) may go on before the server stops anyway.
    pub shutdown_grace: Duration,
    /// Base of the absolute URLs this server hands out (signed staging
    /// URLs), e.g. `https://vms.example.com`. Default: `http://` + the
    /// listen address (127.0.0.1 when listening on every address).
    pub public_url: Option<String>,
    /// URL lifetime, object max age, upload cap of the staging store.
    pub staging: staging::StagingConfig,
    /// Console token lifetime, idle timeout, ping and send timeouts.
    pub console: console::ConsoleConfig,
    /// The services proxy (`fastvm serve --proxy-listen`); none: no proxy.
    pub proxy: Option<proxy::ProxyConfig>,
    /// Where `GET /metrics` is served (`--metrics-listen`); none: nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The SSH gateway (`fastvm serve --ssh-listen`); none: no gateway.
    pub ssh: Option<ssh::SshConfig>,
    /// Cluster mode (workers register over HTTP); none: the single-host
    /// server of one embedded worker.
    pub cluster: Option<ClusterConfig>,
    /// Bucket endpoints on private, loopback or link-local addresses that
    /// bucket mounts may use anyway (`--allow-bucket-endpoint URL`).
    pub allow_bucket_endpoints: Vec<String>,
}

/// File (in the data dir) holding the cluster secret workers present.
pub const WORKER_TOKEN_FILE: &str = "worker-token";

/// How a cluster control plane runs (see [`fleet`]).
#[derive(Clone)]
pub struct ClusterConfig {
    /// The cluster secret's file; default `<data>/worker-token`. Written
    /// (0600, 32 random bytes as hex) at first start when absent.
    pub secret_file: Option<PathBuf>,
    /// Run an embedded worker beside the remote ones (false:
    /// `--no-local-worker`). It serves the VMs it has; it takes new ones
    /// only if it has a `workers` row.
    pub local_worker: bool,
    /// The shared snapshot store handed to workers at registration.
    pub snapshot_store: Option<routes::internal::SnapshotStoreSettings>,
    /// With `local_worker`: the embedded worker's capacity and build, to
    /// give it a `workers` row (heartbeated by the monitor) so it takes new
    /// VMs like any worker; none: it only serves the VMs it has.
    pub local_registration: Option<store::WorkerRegistrationRow>,
    /// Makes a handle on a remote worker (the HTTP client in production).
    pub connector: fleet::Connector,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("secret_file", &self.secret_file)
            .field("local_worker", &self.local_worker)
            .field(
                "snapshot_store",
                &self.snapshot_store.as_ref().map(|s| s.url.as_str()),
            )
            .finish_non_exhaustive()
    }
}

/// The cluster secret of `path`, created (0600, 32 random bytes as hex) when absent.
pub fn load_or_create_worker_token(path: &Path) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let mut bytes = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    let secret = hex::encode(bytes);
    write_secret(path, &format!("{secret}\n"))
        .with_context(|| format!("writing the cluster secret to {}", path.display()))?;
    tracing::info!(path = %path.display(), "first start in cluster mode: wrote the worker token (give it to workers with --token-file)");
    Ok(secret)
}

impl ServerConfig {
    /// Defaults: listen on 127.0.0.1:8080, SQLite, 5 s launch wait.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        ServerConfig {
            runtime: RuntimeConfig::new(&data_dir),
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database_url: None,
            launch_wait: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(10),
            public_url: None,
            staging: staging::StagingConfig::default(),
            console: console::ConsoleConfig::default(),
            proxy: None,
            metrics_listen: None,
            ssh: None,
            cluster: None,
            allow_bucket_endpoints: Vec::new(),
        }
    }

    /// [`ServerConfig::public_url`] or its default from the listen address.
    pub fn public_base_url(&self) -> String {
        if let Some(u) = &self.public_url {
            return u.trim_end_matches('/').to_owned();
        }
        let mut addr = self.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{addr}")
    }
}

/// Shared state of every handler (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// The workers this control plane drives (embedded: the one of this process).
    fleet: fleet::Fleet,
    launch_wait: Duration,
    /// Restores hold it shared until their VM runs (or failed); deleting a
    /// snapshot holds it exclusively, so a snapshot's files never vanish
    /// under a restore that already found its row.
    snapshot_use: Arc<tokio::sync::RwLock<()>>,
    /// One mutex per org around quota check + reservation (see quotas.rs).
    quota_locks: std::sync::Mutex<std::collections::HashMap<OrgId, Arc<tokio::sync::Mutex<()>>>>,
    /// Wakes the TTL reaper when a deadline may have moved (see ttl.rs).
    ttl_wake: tokio::sync::Notify,
    /// One mutex per VM around a firewall change and its push to the
    /// worker (see lifecycle.rs, `change_policy`).
    policy_locks: std::sync::Mutex<std::collections::HashMap<VmId, Arc<tokio::sync::Mutex<()>>>>,
    /// The staging store of file transfers (none: those routes answer 501).
    staging: Option<Arc<dyn staging::StagingStore>>,
    /// The same store when it is the local one (it serves /v1/staging).
    local_staging: Option<Arc<staging::local::LocalStaging>>,
    staging_config: staging::StagingConfig,
    /// How clients reach the services proxy (for the services' `url`).
    proxy_public: Option<services::ProxyPublic>,
    /// One wake-up (resume) in flight per paused VM, shared by every proxy
    /// request that needs it (see proxy::wake).
    wakes: proxy::Wakes,
    /// Console configuration (see console.rs).
    console: console::ConsoleState,
    /// Prometheus metrics (see metrics.rs).
    metrics: metrics::Metrics,
    /// The SSH gateway's public host key and port, when it runs.
    ssh_public: Option<fastvm_types::ssh_key::SshGatewayInfo>,
    /// The shared snapshot store told to registering workers (cluster mode).
    snapshot_store: Option<routes::internal::SnapshotStoreSettings>,
    /// Serialised VM views of `GET /v1/vms`, by row version (see vm_list.rs).
    views: vm_list::ViewCache,
    /// Whole answers of `GET /v1/vms`, by list generation (see vm_list.rs).
    lists: vm_list::ListCache,
    /// Bucket endpoints allowed on private addresses (bucket_mounts.rs).
    allow_bucket_endpoints: Vec<String>,
    /// Tasks of the snapshot imports this process runs (snapshot_imports.rs).
    imports: snapshot_imports::ImportTasks,
}

impl AppState {
    /// A single-host state: `worker` runs every VM.
    pub fn new(store: Store, worker: Arc<dyn Worker>, launch_wait: Duration) -> Self {
        AppState::with_fleet(store, fleet::Fleet::embedded(worker), launch_wait)
    }

    /// A state over `fleet` (a cluster control plane, see [`fleet::Fleet::cluster`]).
    pub fn with_fleet(store: Store, fleet: fleet::Fleet, launch_wait: Duration) -> Self {
        AppState {
            inner: Arc::new(Inner {
                store,
                fleet,
                launch_wait,
                snapshot_use: Default::default(),
                quota_locks: Default::default(),
                ttl_wake: Default::default(),
                policy_locks: Default::default(),
                staging: None,
                local_staging: None,
                staging_config: Default::default(),
                proxy_public: None,
                wakes: Default::default(),
                console: Default::default(),
                metrics: Default::default(),
                ssh_public: None,
                snapshot_store: None,
                views: Default::default(),
                lists: Default::default(),
                allow_bucket_endpoints: Vec::new(),
                imports: Default::default(),
            }),
        }
    }

    /// Tell the state where the services proxy is reached (call right after
    /// [`AppState::new`]).
    pub fn with_proxy_public(mut self, public: services::ProxyPublic) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.proxy_public = Some(public);
        }
        self
    }

    pub(crate) fn proxy_public(&self) -> Option<&services::ProxyPublic> {
        self.inner.proxy_public.as_ref()
    }

    /// Tell the state how clients reach the SSH gateway (call right after
    /// [`AppState::new`]).
    pub fn with_ssh_public(mut self, info: fastvm_types::ssh_key::SshGatewayInfo) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.ssh_public = Some(info);
        }
        self
    }

    /// Tell the state which snapshot store registering workers use (call
    /// right after [`AppState::with_fleet`]).
    pub fn with_snapshot_store_settings(
        mut self,
        settings: Option<routes::internal::SnapshotStoreSettings>,
    ) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.snapshot_store = settings;
        }
        self
    }

    /// Allow bucket endpoints on private addresses (call right after
    /// [`AppState::with_fleet`]); see [`ServerConfig::allow_bucket_endpoints`].
    pub fn with_allowed_bucket_endpoints(mut self, urls: Vec<String>) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.allow_bucket_endpoints = urls;
        }
        self
    }

    pub(crate) fn import_tasks(&self) -> &snapshot_imports::ImportTasks {
        &self.inner.imports
    }

    pub(crate) fn allowed_bucket_endpoints(&self) -> &[String] {
        &self.inner.allow_bucket_endpoints
    }

    pub(crate) fn snapshot_store_settings(
        &self,
    ) -> Option<&routes::internal::SnapshotStoreSettings> {
        self.inner.snapshot_store.as_ref()
    }

    pub(crate) fn ssh_public(&self) -> Option<&fastvm_types::ssh_key::SshGatewayInfo> {
        self.inner.ssh_public.as_ref()
    }

    pub(crate) fn wakes(&self) -> &proxy::Wakes {
        &self.inner.wakes
    }

    pub(crate) fn inner_views(&self) -> &vm_list::ViewCache {
        &self.inner.views
    }

    pub(crate) fn inner_lists(&self) -> &vm_list::ListCache {
        &self.inner.lists
    }

    pub(crate) fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    /// Give the state its console configuration (call right after [`AppState::new`]).
    pub fn with_console(mut self, cfg: console::ConsoleConfig) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.console = console::ConsoleState::new(cfg);
        }
        self
    }

    /// Give the state a staging store that is not the local one (S3).
    pub fn with_staging(
        mut self,
        store: Arc<dyn staging::StagingStore>,
        cfg: staging::StagingConfig,
    ) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            let capped = staging::capped::CappedStaging::new(store, cfg.org_cap_bytes, Vec::new());
            inner.staging = Some(Arc::new(capped));
            inner.local_staging = None;
            inner.staging_config = cfg;
        }
        self
    }

    /// Give the state a local staging store (call right after [`AppState::new`]).
    pub fn with_local_staging(
        mut self,
        store: Arc<staging::local::LocalStaging>,
        cfg: staging::StagingConfig,
    ) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            let existing = store.existing();
            let capped =
                staging::capped::CappedStaging::new(store.clone(), cfg.org_cap_bytes, existing);
            inner.staging = Some(Arc::new(capped));
            inner.local_staging = Some(store);
            inner.staging_config = cfg;
        }
        self
    }

    pub(crate) fn staging(&self) -> Result<&Arc<dyn staging::StagingStore>, error::ApiError> {
        self.inner.staging.as_ref().ok_or_else(no_staging)
    }

    pub(crate) fn local_staging(
        &self,
    ) -> Result<&Arc<staging::local::LocalStaging>, error::ApiError> {
        match (&self.inner.local_staging, &self.inner.staging) {
            (Some(local), _) => Ok(local),
            (None, Some(_)) => Err(error::ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                error::codes::NOT_FOUND,
                "this server stages files in S3: its presigned URLs point at the bucket, not at /v1/staging",
            )),
            (None, None) => Err(no_staging()),
        }
    }

    pub(crate) fn staging_config(&self) -> &staging::StagingConfig {
        &self.inner.staging_config
    }

    /// The staging store and its max object age, for [`staging::spawn_gc`].
    pub fn staging_gc(&self) -> Option<staging::GcTask> {
        let store = self.inner.staging.clone()?;
        Some(staging::spawn_gc(store, self.inner.staging_config.max_age))
    }

    pub(crate) fn snapshot_use(&self) -> &Arc<tokio::sync::RwLock<()>> {
        &self.inner.snapshot_use
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The workers of this control plane.
    pub fn fleet(&self) -> &fleet::Fleet {
        &self.inner.fleet
    }

    /// The embedded worker of this process (a single-host server; tests and
    /// benches reach its VMs directly); `None` on a control plane without one.
    pub fn local_worker(&self) -> Option<&Arc<dyn Worker>> {
        self.inner.fleet.local()
    }

    pub fn launch_wait(&self) -> Duration {
        self.inner.launch_wait
    }

    /// Align stored statuses with what the worker re-adopted (done by
    /// [`build_app`]; public for servers assembled by hand).
    pub async fn reconcile_on_start(&self) -> anyhow::Result<()> {
        self.reconcile_all()
            .await
            .map_err(|e| anyhow::anyhow!("reconciling VM statuses: {}", e.message))?;
        self.reconcile_firewalls().await;
        Ok(())
    }
}

fn no_staging() -> error::ApiError {
    error::ApiError::new(
        axum::http::StatusCode::NOT_IMPLEMENTED,
        error::codes::NOT_IMPLEMENTED,
        "file transfer needs a staging store; this server was built without one",
    )
}

/// Open the store of a data dir, creating, migrating and (on first use, see
/// [`bootstrap`]) populating it: what `fastvm serve` and `fastvm keys` use.
/// It may run beside a serving server (SQLite WAL allows it).
pub async fn open_store(data_dir: &Path, database_url: Option<&str>) -> anyhow::Result<Store> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating the data dir {}", data_dir.display()))?;
    let store = Store::open(data_dir, database_url)
        .await
        .with_context(|| match database_url {
            Some(_) => "opening the PostgreSQL store".to_owned(),
            None => format!("opening the store in {}", data_dir.display()),
        })?;
    bootstrap(&store, data_dir).await?;
    Ok(store)
}

/// The default org (created on first start), if any.
pub async fn default_org(store: &Store) -> anyhow::Result<Option<OrgId>> {
    Ok(store.org_by_name(DEFAULT_ORG).await?)
}

/// On an empty store: create the default org, user `admin` and an admin API
/// key, and write the key to `DATA_DIR/admin-api-key` (mode 0600). Returns
/// the file's path when it did so.
pub async fn bootstrap(store: &Store, data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    if store.org_count().await? > 0 {
        return Ok(None);
    }
    let org = store.create_org(DEFAULT_ORG).await?;
    let user = store.create_user(org, "admin").await?;
    let key = store.create_key_for(org, Some(user), "admin").await?;
    let path = data_dir.join(ADMIN_KEY_FILE);
    write_secret(&path, &format!("{}\n", key.token))
        .with_context(|| format!("writing the admin API key to {}", path.display()))?;
    tracing::info!(path = %path.display(), org = %org, "first start: created org {DEFAULT_ORG:?}, user \"admin\" and an admin API key");
    Ok(Some(path))
}

/// Write `contents` to a new file readable by its owner only.
pub(crate) fn write_secret(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// The router and its state: opens the store (bootstrapping it on first
/// start), opens the embedded worker (re-adopting its VMs) and reconciles.
pub async fn build_app(cfg: &ServerConfig) -> anyhow::Result<(axum::Router, AppState)> {
    let (router, state, _) = build_app_with_host_key(cfg).await?;
    Ok((router, state))
}

/// [`build_app`], plus the SSH gateway's host key when `cfg.ssh` is set.
async fn build_app_with_host_key(
    cfg: &ServerConfig,
) -> anyhow::Result<(axum::Router, AppState, Option<russh::keys::PrivateKey>)> {
    let store = open_store(&cfg.data_dir, cfg.database_url.as_deref()).await?;
    let key_file = cfg.data_dir.join(ADMIN_KEY_FILE);
    if key_file.exists() {
        tracing::info!(path = %key_file.display(), "admin API key");
    }
    let local: Option<Arc<dyn Worker>> = if cfg.cluster.as_ref().is_none_or(|c| c.local_worker) {
        let runtime = Runtime::open(cfg.runtime.clone())
            .await
            .context("opening the embedded worker")?;
        tracing::info!(accel = ?runtime.accel(), vms = runtime.list().len(), "embedded worker ready");
        Some(Arc::new(LocalWorker::new(runtime)))
    } else {
        None
    };
    let fleet = match (&cfg.cluster, local) {
        (None, Some(worker)) => fleet::Fleet::embedded(worker),
        (None, None) => anyhow::bail!("a single-host server needs its embedded worker"),
        (Some(c), local) => {
            let path = c
                .secret_file
                .clone()
                .unwrap_or_else(|| cfg.data_dir.join(WORKER_TOKEN_FILE));
            let secret = load_or_create_worker_token(&path)?;
            let mut f = fleet::Fleet::cluster(store.clone(), secret, c.connector.clone())
                .with_snapshot_store(c.snapshot_store.is_some());
            if let Some(w) = local {
                f = f.with_local(w);
                if let Some(reg) = &c.local_registration {
                    f = f.with_local_registration(reg.clone());
                }
            }
            tracing::info!(secret = %path.display(), "cluster control plane: workers register at /internal/v1/workers/register");
            f
        }
    };
    if let Some(id) = fleet.register_local().await? {
        tracing::info!(worker = %id, "the embedded worker takes new VMs of the cluster");
    }
    let mut state = AppState::with_fleet(store, fleet, cfg.launch_wait)
        .with_snapshot_store_settings(cfg.cluster.as_ref().and_then(|c| c.snapshot_store.clone()))
        .with_allowed_bucket_endpoints(cfg.allow_bucket_endpoints.clone())
        .with_console(cfg.console.clone());
    if let Some(proxy) = &cfg.proxy {
        let public = services::ProxyPublic {
            scheme: "http".into(),
            domain: proxy.domain.clone(),
            port: proxy.listen.port(),
        };
        state = state.with_proxy_public(public);
    }
    let host_key = match &cfg.ssh {
        Some(ssh_cfg) => {
            let key = ssh::load_or_create_host_key(&cfg.data_dir)?;
            let public = key.public_key();
            tracing::info!(
                fingerprint = %public.fingerprint(russh::keys::HashAlg::Sha256),
                path = %ssh::host_key_path(&cfg.data_dir).display(),
                "SSH gateway host key"
            );
            state = state.with_ssh_public(fastvm_types::ssh_key::SshGatewayInfo {
                host_keys: vec![ssh::public_line(public)],
                port: ssh_cfg.listen.port(),
            });
            Some(key)
        }
        None => None,
    };
    let state = match &cfg.staging.s3 {
        Some(s3) => {
            let staging = staging::s3::S3Staging::new(s3)?;
            tracing::info!(endpoint = ?s3.endpoint, bucket = %s3.bucket, prefix = %s3.prefix, "staging in S3");
            state.with_staging(Arc::new(staging), cfg.staging.clone())
        }
        None => {
            let staging = staging::local::LocalStaging::open(&cfg.data_dir, &cfg.public_base_url())
                .context("opening the staging store")?;
            state.with_local_staging(Arc::new(staging), cfg.staging.clone())
        }
    };
    state.reconcile_on_start().await?;
    Ok((routes::router(state.clone()), state, host_key))
}

/// Serve the API on `cfg.listen` until `shutdown` completes. VMs keep
/// running after it returns.
pub async fn serve(
    mut cfg: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    cfg.listen = listener.local_addr()?;
    let side = bind_side(&mut cfg).await?;
    let (router, state, host_key) = build_app_with_host_key(&cfg).await?;
    tracing::info!(addr = %listener.local_addr()?, data_dir = %cfg.data_dir.display(), "Fast VM API listening");
    let side = start_side(side, &state, &cfg, host_key).await?;
    serve_on(listener, router, state, shutdown, cfg.shutdown_grace, side).await
}

/// The listeners beside the API's: the services proxy, the SSH gateway and
/// the metrics.
struct SideListeners {
    proxy: Option<tokio::net::TcpListener>,
    ssh: Option<tokio::net::TcpListener>,
    metrics: Option<tokio::net::TcpListener>,
}

/// What serves on them; dropping it stops them all.
struct SideTasks {
    proxy: Option<proxy::ProxyTask>,
    ssh: Option<ssh::SshTask>,
    metrics: Option<tokio::task::JoinHandle<()>>,
    /// Cluster mode: the worker monitor (and LISTEN task); stops when dropped.
    _monitor: fleet::Monitor,
}

impl Drop for SideTasks {
    fn drop(&mut self) {
        if let Some(s) = &self.ssh {
            s.stop();
        }
        if let Some(m) = &self.metrics {
            m.abort();
        }
    }
}

/// Bind the proxy's and the metrics' listeners (when configured) and record
/// their real addresses (a port 0 becomes the one the kernel chose).
async fn bind_side(cfg: &mut ServerConfig) -> anyhow::Result<SideListeners> {
    let mut side = SideListeners {
        proxy: None,
        ssh: None,
        metrics: None,
    };
    if let Some(proxy) = cfg.proxy.as_mut() {
        let listener = tokio::net::TcpListener::bind(proxy.listen)
            .await
            .with_context(|| {
                format!(
                    "listening on {} (the services proxy, --proxy-listen)",
                    proxy.listen
                )
            })?;
        proxy.listen = listener.local_addr()?;
        side.proxy = Some(listener);
    }
    if let Some(ssh) = cfg.ssh.as_mut() {
        let listener = tokio::net::TcpListener::bind(ssh.listen)
            .await
            .with_context(|| {
                format!(
                    "listening on {} (the SSH gateway, --ssh-listen)",
                    ssh.listen
                )
            })?;
        ssh.listen = listener.local_addr()?;
        side.ssh = Some(listener);
    }
    if let Some(addr) = cfg.metrics_listen.as_mut() {
        let listener = tokio::net::TcpListener::bind(*addr)
            .await
            .with_context(|| format!("listening on {addr} (metrics, --metrics-listen)"))?;
        *addr = listener.local_addr()?;
        side.metrics = Some(listener);
    }
    Ok(side)
}

async fn start_side(
    listeners: SideListeners,
    state: &AppState,
    cfg: &ServerConfig,
    host_key: Option<russh::keys::PrivateKey>,
) -> anyhow::Result<SideTasks> {
    let proxy = match (listeners.proxy, &cfg.proxy) {
        (Some(listener), Some(p)) => Some(proxy::spawn(listener, state.clone(), p)?),
        _ => None,
    };
    let ssh = match (listeners.ssh, &cfg.ssh, host_key) {
        (Some(listener), Some(c), Some(key)) => {
            let task = ssh::spawn(listener, state.clone(), c, key).await?;
            tracing::info!(addr = %task.addr(), "SSH gateway listening (ssh -p PORT <vm-id>@HOST)");
            Some(task)
        }
        _ => None,
    };
    let metrics = listeners.metrics.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics at /metrics");
        }
        let router = metrics::router(state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, router).await {
                tracing::warn!(error = %e, "the metrics listener stopped");
            }
        })
    });
    let _monitor = fleet::spawn_monitor(state, cfg.database_url.as_deref());
    Ok(SideTasks {
        proxy,
        ssh,
        metrics,
        _monitor,
    })
}

async fn serve_on(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
    side: SideTasks,
) -> anyhow::Result<()> {
    let reaper = spawn_ttl_reaper(&state);
    let _firewalls = lifecycle::spawn_firewall_reconciler(&state);
    let _staging_gc = state.staging_gc();
    let requested = Arc::new(tokio::sync::Notify::new());
    let notify = requested.clone();
    let server = axum::serve(listener, router).with_graceful_shutdown(async move {
        shutdown.await;
        tracing::info!("shutting down: no new connections; VMs keep running");
        notify.notify_one();
    });
    let result = tokio::select! {
        r = server.into_future() => r.context("serving HTTP"),
        _ = async { requested.notified().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "requests still open after the shutdown grace period; closing them");
            Ok(())
        }
    };
    drop(side);
    reaper.stop().await;
    state.fleet().detach();
    state.store().close().await;
    result
}

/// A server serving in the background (see [`start`]).
pub struct RunningServer {
    addr: SocketAddr,
    proxy_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    ssh_addr: Option<SocketAddr>,
    state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The services proxy's address, when it runs.
    pub fn proxy_addr(&self) -> Option<SocketAddr> {
        self.proxy_addr
    }

    /// The metrics listener's address, when it runs.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The SSH gateway's address, when it runs.
    pub fn ssh_addr(&self) -> Option<SocketAddr> {
        self.ssh_addr
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Shut down gracefully (VMs keep running) and wait until it is done.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("server task")?
    }
}

/// Build the app and serve it in the background on `cfg.listen` (which may
/// have port 0).
pub async fn start(mut cfg: ServerConfig) -> anyhow::Result<RunningServer> {
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("listening on {}", cfg.listen))?;
    let addr = listener.local_addr()?;
    cfg.listen = addr;
    let side = bind_side(&mut cfg).await?;
    let (router, state, host_key) = build_app_with_host_key(&cfg).await?;
    tracing::info!(%addr, data_dir = %cfg.data_dir.display(), "Fast VM API listening");
    let side = start_side(side, &state, &cfg, host_key).await?;
    let proxy_addr = side.proxy.as_ref().map(|p| p.addr());
    let ssh_addr = side.ssh.as_ref().map(|s| s.addr());
    let metrics_addr = side
        .metrics
        .is_some()
        .then_some(cfg.metrics_listen)
        .flatten();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_on(
        listener,
        router,
        state.clone(),
        async move {
            let _ = stopped.await;
        },
        cfg.shutdown_grace,
        side,
    ));
    Ok(RunningServer {
        addr,
        proxy_addr,
        metrics_addr,
        ssh_addr,
        state,
        stop: Some(stop),
        task,
    })
}
