//! API benchmark: the cost of the REST layer, beside the same operations
//! through the worker library, in one run.
//!
//! | figure                               | floor                                        |
//! |--------------------------------------|----------------------------------------------|
//! | launch via POST /v1/vms (201)        | `Runtime::create` on a runtime of its own    |
//! | exec `true` via POST .../exec (JSON) | `Runtime::exec_buffered` on that runtime     |
//! | GET /v1/vms with 50 VMs, under load  | GET /healthz under the same load (HTTP stack |
//! |                                      | only: no auth, no store)                     |
//!
//! Load: a bounded number of requests from CONCURRENCY keep-alive
//! connections on loopback; it stops by itself.
//!
//! Run: `cargo run --release -p fastvm-bench --bin bench-api -- [runs]`

use fastvm_server::ServerConfig;
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, Runtime, RuntimeConfig};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CONCURRENCY: usize = 16;
const LOAD_REQUESTS: usize = 4000;
const STORE_VMS: usize = 50;

fn percentiles(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    (at(0.5), at(0.99))
}

fn row(name: &str, ours: Vec<f64>, floor: Vec<f64>) {
    let ((o50, o99), (f50, f99)) = (percentiles(ours), percentiles(floor));
    println!(
        "{name:<26} p50 {o50:>8.2} ms  p99 {o99:>8.2} ms | floor p50 {f50:>8.2} ms  p99 {f99:>8.2} ms | ratio p50 {:.2}x  p99 {:.2}x",
        o50 / f50,
        o99 / f99
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Kills the QEMUs of a data dir (by pidfile) and removes it, also on failure.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for dir in &self.0 {
            if let Ok(entries) = std::fs::read_dir(dir.join("vms")) {
                for e in entries.flatten() {
                    if let Some(pid) = std::fs::read_to_string(e.path().join("qemu.pid"))
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok())
                    {
                        // SAFETY: kill by the pid of a QEMU this benchmark started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Fire LOAD_REQUESTS GETs at `url` from CONCURRENCY connections; returns
/// (requests per second, latencies in ms).
async fn load(client: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<(f64, Vec<f64>)> {
    let per_worker = LOAD_REQUESTS / CONCURRENCY;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, key) = (client.clone(), url.to_owned(), key.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_worker);
            for _ in 0..per_worker {
                let t = Instant::now();
                let resp = client.get(&url).bearer_auth(&key).send().await?;
                anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
                resp.bytes().await?;
                lat.push(ms(t.elapsed()));
            }
            Ok::<_, anyhow::Error>(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok((all.len() as f64 / start.elapsed().as_secs_f64(), all))
}

async fn wait_running(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
) -> anyhow::Result<()> {
    loop {
        let vm: Value = client
            .get(format!("{base}/v1/vms/{id}"))
            .bearer_auth(key)
            .send()
            .await?
            .json()
            .await?;
        match vm["status"].as_str() {
            Some("running") => return Ok(()),
            Some("provisioning") => tokio::time::sleep(Duration::from_millis(20)).await,
            other => anyhow::bail!("VM {id} ended in {other:?}"),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .try_init();
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let images: PathBuf = std::env::var_os("FASTVM_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into());
    let root = std::env::temp_dir().join(format!("fastvm-bench-api-{}", std::process::id()));
    let (server_dir, lib_dir) = (root.join("server"), root.join("lib"));
    let _cleanup = Cleanup(vec![server_dir.clone(), lib_dir.clone(), root.clone()]);

    let mut cfg = ServerConfig::new(&server_dir);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.runtime.image_dir = Some(images.clone());
    let server = fastvm_server::start(cfg).await?;
    let base = server.url();
    let key = std::fs::read_to_string(server_dir.join("admin-api-key"))?
        .trim()
        .to_owned();
    // 50 c1m2 VMs need more than the default org quota (16 vCPUs).
    let store = server.state().store();
    let org = fastvm_server::default_org(store)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no default org"))?;
    let big = fastvm_server::store::QuotaPatch {
        vcpu: Some(256),
        memory_mib: Some(1 << 20),
        disk_gib: Some(10_000),
        ..Default::default()
    };
    store.set_quota(org, big).await?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()?;

    let mut lib_cfg = RuntimeConfig::new(&lib_dir);
    lib_cfg.image_dir = Some(images);
    let rt: Arc<Runtime> = Runtime::open(lib_cfg).await?;
    println!("fast vm API bench: accel={} runs={runs} concurrency={CONCURRENCY} load={LOAD_REQUESTS} requests", rt.accel());

    // Warm both golden snapshots.
    let warm = client
        .post(format!("{base}/v1/vms"))
        .bearer_auth(&key)
        .json(&json!({"machineType": "c1m2"}))
        .send()
        .await?;
    let warm: Value = warm.json().await?;
    let warm_id = warm["id"].as_str().unwrap_or_default().to_owned();
    wait_running(&client, &base, &key, &warm_id).await?;
    let lib_vm = rt
        .create(CreateVm {
            machine: "c1m2".into(),
            ..Default::default()
        })
        .await?;

    // Launch: HTTP vs library, interleaved.
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        let resp = client
            .post(format!("{base}/v1/vms"))
            .bearer_auth(&key)
            .json(&json!({"machineType": "c1m2"}))
            .send()
            .await?;
        let status = resp.status();
        let vm: Value = resp.json().await?;
        let id = vm["id"].as_str().unwrap_or_default().to_owned();
        if status.as_u16() == 202 {
            wait_running(&client, &base, &key, &id).await?;
        }
        ours.push(ms(t.elapsed()));
        client
            .delete(format!("{base}/v1/vms/{id}"))
            .bearer_auth(&key)
            .send()
            .await?;
        let t = Instant::now();
        let vm = rt
            .create(CreateVm {
                machine: "c1m2".into(),
                ..Default::default()
            })
            .await?;
        floor.push(ms(t.elapsed()));
        rt.delete(&vm.id).await?;
    }
    row("launch (HTTP vs library)", ours, floor);

    // Exec `true`: HTTP JSON vs library.
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    let req = ExecRequest::argv(["true"]);
    for _ in 0..runs.max(50) {
        let t = Instant::now();
        let out: Value = client
            .post(format!("{base}/v1/vms/{warm_id}/exec"))
            .bearer_auth(&key)
            .json(&json!({"command": ["true"]}))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(out["exitCode"] == 0, "exec failed: {out}");
        ours.push(ms(t.elapsed()));
        let t = Instant::now();
        rt.exec_buffered(&lib_vm.id, &req, 1024).await?;
        floor.push(ms(t.elapsed()));
    }
    row("exec `true` (HTTP vs lib)", ours, floor);

    // GET /v1/vms with STORE_VMS real VMs in the store, under load.
    let mut ids = vec![warm_id];
    while ids.len() < STORE_VMS {
        let vm: Value = client
            .post(format!("{base}/v1/vms"))
            .bearer_auth(&key)
            .json(&json!({"machineType": "c1m2"}))
            .send()
            .await?
            .json()
            .await?;
        let id = vm["id"].as_str().unwrap_or_default().to_owned();
        wait_running(&client, &base, &key, &id).await?;
        ids.push(id);
    }
    let listed: Value = client
        .get(format!("{base}/v1/vms"))
        .bearer_auth(&key)
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(
        listed.as_array().map(Vec::len) == Some(STORE_VMS),
        "expected {STORE_VMS} VMs listed"
    );
    let (floor_rps, floor_lat) = load(&client, &format!("{base}/healthz"), &key).await?;
    let (rps, lat) = load(&client, &format!("{base}/v1/vms"), &key).await?;
    row(
        &format!("GET /v1/vms ({STORE_VMS} VMs) load"),
        lat,
        floor_lat,
    );
    println!("GET /v1/vms throughput     {rps:>8.0} req/s | floor (GET /healthz) {floor_rps:>8.0} req/s | ratio {:.2}x", rps / floor_rps);

    for id in ids {
        client
            .delete(format!("{base}/v1/vms/{id}"))
            .bearer_auth(&key)
            .send()
            .await?;
    }
    rt.delete(&lib_vm.id).await?;
    server.stop().await?;
    let _ = Path::new(&root);
    Ok(())
}
