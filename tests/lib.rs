//! Shared fixtures of the end-to-end tests.
//!
//! Booting a guest under TCG costs seconds, so tests share: one process-wide
//! tokio runtime (agent connections live on it across tests), one guest image
//! cache (`FASTVM_TEST_IMAGES`, default `/var/tmp/fastvm-test-images`), and
//! one booted VM for every test that cannot disturb the others. Every VM a
//! test boots is recorded and killed at process exit, so no QEMU outlives
//! the test binary.

use fastvm_worker::{Runtime, RuntimeConfig};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, Once};

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
});

/// Run a future on the shared runtime.
pub fn block_on<F: Future>(f: F) -> F::Output {
    RT.block_on(f)
}

pub fn image_cache() -> PathBuf {
    std::env::var_os("FASTVM_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/fastvm-test-images"))
}

static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static CLEANUP: Once = Once::new();

extern "C" fn cleanup_at_exit() {
    let dirs = DIRS.lock().map(|d| d.clone()).unwrap_or_default();
    for dir in dirs {
        kill_vms_in(&dir);
        fastvm_worker::net::remove_owned_by(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Kill (by pid, from their pidfiles) the QEMU processes of VMs under `data_dir`.
pub fn kill_vms_in(data_dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(data_dir.join("vms")) else {
        return;
    };
    for e in entries.flatten() {
        if let Some(pid) = std::fs::read_to_string(e.path().join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains("fastvm-") {
                // SAFETY: kill has no memory preconditions; the pid is a QEMU of ours (checked above).
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A fresh data dir, removed (with its VMs killed) when the process exits.
pub fn data_dir(name: &str) -> PathBuf {
    CLEANUP.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .with_test_writer()
            .try_init();
        // SAFETY: registering a plain extern "C" fn with atexit.
        unsafe { libc::atexit(cleanup_at_exit) };
    });
    let dir = std::env::temp_dir().join(format!("fastvm-e2e-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create data dir");
    if let Ok(mut d) = DIRS.lock() {
        d.push(dir.clone());
    }
    dir
}

pub fn config(dir: &std::path::Path) -> RuntimeConfig {
    let mut cfg = RuntimeConfig::new(dir);
    cfg.image_dir = Some(image_cache());
    // Tests never use the host's resolver: guests' allowed queries go to a
    // local port where nothing answers (network tests point it at their own DNS).
    if let Some(net) = cfg.network.as_mut() {
        net.dns_upstream = std::net::SocketAddr::from(([127, 0, 0, 1], 9));
    }
    cfg
}

/// A runtime on a fresh data dir, on the shared tokio runtime.
pub fn runtime(name: &str) -> Arc<Runtime> {
    let dir = data_dir(name);
    block_on(Runtime::open(config(&dir))).expect("open runtime")
}

/// Resident set size of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// True when `pid` no longer runs (absent, or a zombie not yet reaped by
/// whoever adopted the daemonized QEMU).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s == "Z" || s == "X"),
    }
}

/// One HTTP exchange with a test server: the status and the JSON body
/// (`Null` when empty or not JSON).
pub async fn json_call(
    client: &Client,
    url: String,
    key: Option<&str>,
    method: Method,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = client.request(method, url);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    if let Some(body) = body {
        req = req.json(&body);
    }
    let res = req.send().await.expect("send");
    let status = res.status();
    let bytes = res.bytes().await.expect("body");
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// An API error answer: this status, this machine-readable code, a message.
pub fn assert_api_error(res: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(res.0, status, "{:?}", res.1);
    assert_eq!(res.1["error"]["code"], json!(code), "{:?}", res.1);
    assert!(
        res.1["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{:?}",
        res.1
    );
}
