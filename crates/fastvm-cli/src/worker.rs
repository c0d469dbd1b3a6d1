//! `fastvm worker`: a worker host of a cluster. It runs VMs with the same
//! runtime as the embedded worker of `fastvm serve`, serves them to the
//! control planes over the internal worker API
//! (`fastvm_worker_api::service`), registers itself with a control plane and
//! heartbeats (see `fastvm_worker_api::cluster` for the exchange).
//!
//! ```text
//!  start -> open runtime (re-adopts VMs) -> listen -> register --ok--> heartbeat every interval
//!                                              ^  (retry every 2 s)          | 409 (stale generation)
//!                                              '-----------------------------'  or a lost control plane
//! ```
//! Until it has registered, the internal API answers 503; after each
//! registration it accepts only the token of the new generation.

use anyhow::Context;
use clap::Args;
use fastvm_worker::{LocalWorker, Runtime, RuntimeConfig};
use fastvm_worker_api::cluster::{
    heartbeat_path, worker_token, Heartbeat, RegisterResponse, WorkerInfo, WorkerRegistration,
    REGISTER_PATH,
};
use fastvm_worker_api::service::{router, ExpectedToken};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct WorkerArgs {
    /// Base URL of a control plane, e.g. http://10.0.0.2:8080.
    #[arg(long, env = "FASTVM_CONTROL_URL")]
    pub control_url: String,
    /// File holding the cluster secret (the control plane's `<data>/worker-token`).
    #[arg(long, env = "FASTVM_WORKER_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Data directory of this worker (VMs, images, snapshots cache, worker id).
    #[arg(long, env = "FASTVM_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Address of the internal worker API.
    #[arg(long, env = "FASTVM_WORKER_LISTEN")]
    pub listen: SocketAddr,
    /// URL the control planes dial (default: http://<--listen>; set it when
    /// listening on 0.0.0.0).
    #[arg(long, env = "FASTVM_WORKER_ADVERTISE")]
    pub advertise: Option<String>,
    /// Accelerator, images and VM networking, as `fastvm serve` (give each
    /// worker host its own --ipv4-pool and routed --ipv6-prefix).
    #[command(flatten)]
    pub vms: crate::serve::RuntimeArgs,
}

pub async fn run(args: WorkerArgs) -> anyhow::Result<()> {
    let secret = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading the cluster secret {}", args.token_file.display()))?
        .trim()
        .to_owned();
    anyhow::ensure!(!secret.is_empty(), "{} is empty", args.token_file.display());
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let id = worker_id(&args.data_dir)?;
    let mut cfg = RuntimeConfig::new(&args.data_dir);
    args.vms.apply(&mut cfg)?;
    let runtime = Runtime::open(cfg)
        .await
        .context("opening the worker runtime")?;
    tracing::info!(worker = %id, accel = ?runtime.accel(), vms = runtime.list().len(), "worker runtime ready");
    let info = worker_info(&runtime, &args.data_dir).await?;
    let worker = Arc::new(LocalWorker::with_id(runtime.clone(), id.clone()));
    let expected = ExpectedToken::default();
    let app = router(worker, expected.clone());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let bound = listener.local_addr()?;
    let address = args
        .advertise
        .clone()
        .unwrap_or_else(|| format!("http://{bound}"));
    tracing::info!(worker = %id, %address, "internal worker API listening");
    let serve = axum::serve(listener, app);
    let registration = WorkerRegistration {
        id: id.clone(),
        address,
        info,
    };
    let control = Control {
        base: args.control_url.trim_end_matches('/').to_owned(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?,
        secret,
        registration,
        expected,
        runtime: runtime.clone(),
    };
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
    };
    tokio::select! {
        r = serve => r.context("the internal worker API failed")?,
        () = control.run() => {}
        () = shutdown => tracing::info!("worker shutting down; VMs keep running and are re-adopted at the next start"),
    }
    runtime.detach_all();
    Ok(())
}

/// This worker's id, made once and kept in `<data>/worker-id`.
fn worker_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("worker-id");
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    let id = format!("wk_{}", hex::encode(rand::random::<[u8; 8]>()));
    std::fs::write(&path, format!("{id}\n"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// Capacity and identity of this host.
async fn worker_info(runtime: &Runtime, data_dir: &Path) -> anyhow::Result<WorkerInfo> {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_mib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib / 1024)
        .unwrap_or(0);
    let disk_free_gib = disk_free_gib(data_dir);
    let compat = runtime
        .compat_info()
        .await
        .context("identifying the QEMU build")?;
    Ok(WorkerInfo {
        cpus,
        memory_mib,
        disk_free_gib,
        qemu_build: compat.qemu_build,
        accel: compat.accel,
        cpu_model: compat.cpu_model,
        compat_key: compat.key,
    })
}

fn disk_free_gib(dir: &Path) -> u64 {
    fastvm_worker::disk::free_bytes(dir).unwrap_or(0) >> 30
}

/// The worker's side of registration and heartbeats.
struct Control {
    base: String,
    http: reqwest::Client,
    secret: String,
    registration: WorkerRegistration,
    expected: ExpectedToken,
    runtime: Arc<Runtime>,
}

impl Control {
    /// Register, then heartbeat; register again whenever a heartbeat is refused.
    async fn run(self) {
        loop {
            let reg = self.register().await;
            self.expected.set(Some(worker_token(
                &self.secret,
                &self.registration.id,
                reg.generation,
            )));
            if let Some(store) = &reg.snapshot_store {
                self.apply_snapshot_store(store);
            }
            tracing::info!(worker = %self.registration.id, generation = reg.generation, "registered with the control plane");
            let interval = Duration::from_millis(reg.heartbeat_interval_ms.clamp(200, 60_000));
            self.heartbeat_until_refused(reg.generation, interval).await;
        }
    }

    async fn register(&self) -> RegisterResponse {
        let mut logged = false;
        loop {
            let sent = self
                .http
                .post(format!("{}{REGISTER_PATH}", self.base))
                .bearer_auth(&self.secret)
                .json(&self.registration)
                .send()
                .await;
            let outcome = match sent {
                Ok(r) if r.status().is_success() => match r.json::<RegisterResponse>().await {
                    Ok(reg) => return reg,
                    Err(e) => format!("bad registration answer: {e}"),
                },
                Ok(r) => {
                    let status = r.status();
                    format!("{status}: {}", r.text().await.unwrap_or_default())
                }
                // The whole chain: reqwest's own message hides the cause
                // (timed out, refused, no route).
                Err(e) => format!("{:#}", anyhow::Error::new(e)),
            };
            if !logged {
                tracing::warn!(control = %self.base, error = %outcome, "registration failed; retrying every 2 s");
                logged = true;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Heartbeat every `interval` until the control plane refuses this
    /// generation (409/401/404): then the caller registers again.
    async fn heartbeat_until_refused(&self, generation: i64, interval: Duration) {
        let token = worker_token(&self.secret, &self.registration.id, generation);
        let url = format!("{}{}", self.base, heartbeat_path(&self.registration.id));
        loop {
            tokio::time::sleep(interval).await;
            let beat = Heartbeat {
                generation,
                vm_count: self.runtime.list().len() as u64,
                free_memory_mib: None,
            };
            match self
                .http
                .post(&url)
                .bearer_auth(&token)
                .json(&beat)
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {}
                Ok(r) if matches!(r.status().as_u16(), 401 | 404 | 409) => {
                    tracing::warn!(status = %r.status(), "heartbeat refused; registering again");
                    return;
                }
                Ok(r) => tracing::warn!(status = %r.status(), "heartbeat failed"),
                Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
            }
        }
    }

    /// Use the snapshot store the control plane names (the same settings at
    /// every registration keep the store already built).
    fn apply_snapshot_store(&self, settings: &fastvm_worker_api::cluster::SnapshotStoreSettings) {
        use fastvm_worker::snapshot_store::{SnapshotStore, StoreSettings};
        if self
            .runtime
            .snapshot_store()
            .is_some_and(|s| s.url() == settings.url)
        {
            return;
        }
        let local = StoreSettings {
            url: settings.url.clone(),
            endpoint: settings.endpoint.clone(),
            region: settings.region.clone(),
            access_key_id: settings.access_key_id.clone(),
            secret_access_key: settings.secret_access_key.clone(),
        };
        match SnapshotStore::new(&local) {
            Ok(store) => {
                tracing::info!(url = %settings.url, "snapshots go to the cluster's snapshot store");
                self.runtime.set_snapshot_store(Some(Arc::new(store)));
            }
            Err(e) => {
                tracing::error!(url = %settings.url, error = %e, "the cluster's snapshot store is unusable; snapshots stay on this host")
            }
        }
    }
}
