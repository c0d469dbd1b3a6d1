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
//!
//! `bench-api list [vms] [real] [seconds]`: only the list under load, with
//! `vms` (default 1000) VMs in the store: `real` (default 2) real guests
//! (running: every list asks the worker for their state) and the rest rows
//! inserted through [`fastvm_server::store::Store::insert_vm`], copies of the
//! first real VM's row (same firewall, metadata, env vars; status `stopped`,
//! so no QEMU behind them and the worker is not asked). In one run, each for
//! `seconds` (default 5) from CONCURRENCY connections: `GET /healthz` (the
//! floor: HTTP stack only), the plain `GET /v1/vms` (every VM, one JSON
//! array), the same with `Accept-Encoding: gzip` (the client reads the
//! compressed bytes; what decompressing one costs is printed apart) and the
//! first page of `GET /v1/vms?limit=50`.
//!
//! `bench-api execs [vms] [per_vm]`: `vms` (default 10) real guests, then
//! `vms * per_vm` (default 10 each: 100) concurrent `POST .../exec` of
//! `true`, all at once; every one must answer exit code 0. Floor: one exec
//! at a time on the same VMs, in the same run.

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

/// Requests per second and latencies (ms) of GETs of `url` from
/// CONCURRENCY connections for `secs` seconds; every answer must be a 2xx
/// of at least `min_bytes` bytes.
async fn load_for(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    secs: f64,
    min_bytes: usize,
    gzip: bool,
) -> anyhow::Result<(f64, Vec<f64>, usize)> {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let (client, url, key) = (client.clone(), url.to_owned(), key.to_owned());
        tasks.push(tokio::spawn(async move {
            let (mut lat, mut bytes) = (Vec::new(), 0usize);
            while Instant::now() < deadline {
                let t = Instant::now();
                let mut req = client.get(&url).bearer_auth(&key);
                if gzip {
                    req = req.header("accept-encoding", "gzip");
                }
                let resp = req.send().await?;
                anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
                anyhow::ensure!(
                    !gzip
                        || resp
                            .headers()
                            .get("content-encoding")
                            .is_some_and(|v| v == "gzip"),
                    "GET {url}: not gzip-encoded"
                );
                let body = resp.bytes().await?;
                anyhow::ensure!(
                    body.len() >= min_bytes,
                    "GET {url}: {} bytes, expected at least {min_bytes}",
                    body.len()
                );
                bytes = body.len();
                lat.push(ms(t.elapsed()));
            }
            Ok::<_, anyhow::Error>((lat, bytes))
        }));
    }
    let (mut all, mut size) = (Vec::new(), 0);
    for t in tasks {
        let (lat, bytes) = t.await??;
        all.extend(lat);
        size = bytes;
    }
    Ok((all.len() as f64 / start.elapsed().as_secs_f64(), all, size))
}

/// `bench-api list [vms] [real] [seconds]` (see the module docs).
async fn list_bench(args: &[String]) -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| -> anyhow::Result<usize> {
        match args.get(i) {
            Some(s) => s
                .parse()
                .map_err(|_| anyhow::anyhow!("argument {i} ({s:?}) must be a number")),
            None => Ok(default),
        }
    };
    let (vms, real, secs) = (arg(0, 1000)?, arg(1, 2)?, arg(2, 5)? as f64);
    anyhow::ensure!(
        real >= 1 && real <= vms,
        "need 1 <= real ({real}) <= vms ({vms})"
    );
    let images: PathBuf = std::env::var_os("FASTVM_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into());
    let root = std::env::temp_dir().join(format!("fastvm-bench-api-list-{}", std::process::id()));
    let server_dir = root.join("server");
    let _cleanup = Cleanup(vec![server_dir.clone(), root.clone()]);
    let mut cfg = ServerConfig::new(&server_dir);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.runtime.image_dir = Some(images);
    let server = fastvm_server::start(cfg).await?;
    let base = server.url();
    let key = std::fs::read_to_string(server_dir.join("admin-api-key"))?
        .trim()
        .to_owned();
    let store = server.state().store();
    let org = fastvm_server::default_org(store)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no default org"))?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()?;
    println!("fast vm API list bench: {vms} VMs ({real} real guests, {} store rows), concurrency={CONCURRENCY}, {secs} s per shape", vms - real);

    let mut real_ids = Vec::new();
    for i in 0..real {
        let vm: Value = client
            .post(format!("{base}/v1/vms"))
            .bearer_auth(&key)
            .json(&json!({
                "machineType": "c1m2",
                "name": format!("bench-real-{i}"),
                "metadata": {"team": "bench", "purpose": "list-load"},
            }))
            .send()
            .await?
            .json()
            .await?;
        let id = vm["id"].as_str().unwrap_or_default().to_owned();
        wait_running(&client, &base, &key, &id).await?;
        real_ids.push(id);
    }
    let template = store
        .get_vm(org, real_ids[0].parse()?)
        .await?
        .ok_or_else(|| anyhow::anyhow!("VM {} has no row", real_ids[0]))?;
    let t = Instant::now();
    for i in real..vms {
        let mut row = template.clone();
        row.id = fastvm_types::VmId::new_v4();
        row.name = format!("bench-row-{i}");
        row.status = fastvm_types::VmStatus::Stopped;
        row.status_message = Some("QEMU exited".into());
        row.public_ipv6 = None;
        row.created_at_ms = template.created_at_ms + i as i64;
        row.version = 0;
        store.insert_vm(&row).await?;
    }
    println!("inserted {} rows in {:.0} ms", vms - real, ms(t.elapsed()));

    let listed: Value = client
        .get(format!("{base}/v1/vms"))
        .bearer_auth(&key)
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(
        listed.as_array().map(Vec::len) == Some(vms),
        "expected {vms} VMs listed"
    );
    let full_bytes = serde_json::to_vec(&listed)?.len();

    // Where one list's time goes, one request at a time (no load).
    let mean_ms = |t: Instant, n: usize| ms(t.elapsed()) / n as f64;
    let t = Instant::now();
    for _ in 0..2000 {
        store
            .authenticate(&key)
            .await?
            .ok_or_else(|| anyhow::anyhow!("the admin key does not authenticate"))?;
    }
    let auth_ms = mean_ms(t, 2000);
    let t = Instant::now();
    for _ in 0..20 {
        store.list_vms(org, None).await?;
    }
    let rows_ms = mean_ms(t, 20);
    let t = Instant::now();
    for _ in 0..20 {
        store.list_vm_entries(org, None, None, None).await?;
    }
    let entries_ms = mean_ms(t, 20);
    let t = Instant::now();
    for _ in 0..1000 {
        store.list_vm_entries(org, None, None, Some(51)).await?;
    }
    let page_entries_ms = mean_ms(t, 1000);
    let t = Instant::now();
    for _ in 0..20 {
        client
            .get(format!("{base}/v1/vms"))
            .bearer_auth(&key)
            .send()
            .await?
            .bytes()
            .await?;
    }
    let http_ms = mean_ms(t, 20);
    println!(
        "one at a time: key lookup {:.1} us | store.list_vms ({vms} full rows, decoded) {rows_ms:.2} ms | store.list_vm_entries (what a list reads) {entries_ms:.2} ms, 51 of them {page_entries_ms:.3} ms | GET /v1/vms {http_ms:.2} ms ({full_bytes} B)",
        auth_ms * 1000.0
    );

    // The gzip answer, and what decompressing it costs a client (not in
    // the load below: its client only reads the bytes, like the others).
    let zipped = client
        .get(format!("{base}/v1/vms"))
        .bearer_auth(&key)
        .header("accept-encoding", "gzip")
        .send()
        .await?
        .bytes()
        .await?;
    let t = Instant::now();
    let mut unzipped = Vec::new();
    for _ in 0..20 {
        unzipped.clear();
        std::io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(&zipped[..]),
            &mut unzipped,
        )?;
    }
    anyhow::ensure!(
        unzipped.len() == full_bytes,
        "the gzip answer is {} bytes once decompressed, the plain one {full_bytes}",
        unzipped.len()
    );
    println!(
        "gzip answer {} B for {full_bytes} B of JSON; a client decompresses it in {:.2} ms",
        zipped.len(),
        mean_ms(t, 20)
    );

    let shapes = [
        ("GET /healthz (floor)", format!("{base}/healthz"), 1, false),
        (
            "GET /v1/vms?limit=50",
            format!("{base}/v1/vms?limit=50"),
            full_bytes * 50 / vms / 2,
            false,
        ),
        (
            "GET /v1/vms (plain)",
            format!("{base}/v1/vms"),
            full_bytes / 2,
            false,
        ),
        (
            "GET /v1/vms (gzip)",
            format!("{base}/v1/vms"),
            zipped.len() / 2,
            true,
        ),
    ];
    let mut floor = (0.0, f64::NAN);
    for (name, url, min_bytes, gzip) in shapes {
        let (rps, lat, bytes) = load_for(&client, &url, &key, secs, min_bytes, gzip).await?;
        let (p50, p99) = percentiles(lat);
        if floor.0 == 0.0 {
            floor = (rps, p99);
        }
        println!(
            "{name:<22} {rps:>8.0} req/s  p50 {p50:>7.2} ms  p99 {p99:>7.2} ms  {bytes:>8} B/answer | vs floor: {:.2}x req/s, p99 {:.2}x",
            rps / floor.0,
            p99 / floor.1
        );
    }
    for id in real_ids {
        client
            .delete(format!("{base}/v1/vms/{id}"))
            .bearer_auth(&key)
            .send()
            .await?;
    }
    server.stop().await?;
    Ok(())
}

/// `bench-api execs [vms] [per_vm]` (see the module docs).
async fn execs_bench(args: &[String]) -> anyhow::Result<()> {
    let arg = |i: usize, default: usize| -> anyhow::Result<usize> {
        match args.get(i) {
            Some(s) => s
                .parse()
                .map_err(|_| anyhow::anyhow!("argument {i} ({s:?}) must be a number")),
            None => Ok(default),
        }
    };
    let (vms, per_vm) = (arg(0, 10)?, arg(1, 10)?);
    anyhow::ensure!(
        vms >= 1 && per_vm >= 1,
        "need at least 1 VM and 1 exec per VM"
    );
    let images: PathBuf = std::env::var_os("FASTVM_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into());
    let root = std::env::temp_dir().join(format!("fastvm-bench-api-execs-{}", std::process::id()));
    let server_dir = root.join("server");
    let _cleanup = Cleanup(vec![server_dir.clone(), root.clone()]);
    let mut cfg = ServerConfig::new(&server_dir);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.runtime.image_dir = Some(images);
    let server = fastvm_server::start(cfg).await?;
    let base = server.url();
    let key = std::fs::read_to_string(server_dir.join("admin-api-key"))?
        .trim()
        .to_owned();
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
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    let t = Instant::now();
    for _ in 0..vms {
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
    println!(
        "fast vm API execs bench: {vms} VMs running after {:.0} ms, {} concurrent execs of `true` ({per_vm} per VM)",
        ms(t.elapsed()),
        vms * per_vm
    );
    let exec = |id: String| {
        let (client, base, key) = (client.clone(), base.clone(), key.clone());
        async move {
            let t = Instant::now();
            let resp = client
                .post(format!("{base}/v1/vms/{id}/exec"))
                .bearer_auth(&key)
                .json(&json!({"command": ["true"]}))
                .send()
                .await?;
            let status = resp.status();
            let out: Value = resp.json().await?;
            anyhow::ensure!(
                status.is_success() && out["exitCode"] == 0,
                "exec on {id}: {status} {out}"
            );
            Ok::<_, anyhow::Error>(ms(t.elapsed()))
        }
    };
    // Floor: one at a time, each VM in turn.
    let mut floor = Vec::new();
    for _ in 0..2 {
        for id in &ids {
            floor.push(exec(id.clone()).await?);
        }
    }
    let t = Instant::now();
    let tasks: Vec<_> = ids
        .iter()
        .flat_map(|id| std::iter::repeat_n(id.clone(), per_vm))
        .map(|id| tokio::spawn(exec(id)))
        .collect();
    let (mut lat, mut errors) = (Vec::new(), Vec::new());
    for task in tasks {
        match task.await? {
            Ok(ms) => lat.push(ms),
            Err(e) => errors.push(e.to_string()),
        }
    }
    let wall = ms(t.elapsed());
    let n = lat.len();
    let ((o50, o99), (f50, f99)) = (percentiles(lat), percentiles(floor));
    println!(
        "{} concurrent execs: {n} ok, {} failed, all done in {wall:.0} ms | each p50 {o50:.1} ms p99 {o99:.1} ms | floor (one at a time) p50 {f50:.1} ms p99 {f99:.1} ms",
        vms * per_vm,
        errors.len()
    );
    for e in errors.iter().take(5) {
        println!("  error: {e}");
    }
    for id in ids {
        client
            .delete(format!("{base}/v1/vms/{id}"))
            .bearer_auth(&key)
            .send()
            .await?;
    }
    server.stop().await?;
    anyhow::ensure!(errors.is_empty(), "{} execs failed", errors.len());
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .try_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("list") => return list_bench(&args[1..]).await,
        Some("execs") => return execs_bench(&args[1..]).await,
        _ => {}
    }
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
