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

/// A moto server (a local S3-compatible server, from PyPI); killed by pid
/// when dropped, and at process exit (statics are never dropped).
pub struct Moto {
    child: std::process::Child,
    /// `http://HOST:PORT`.
    pub endpoint: String,
}

static MOTO_PIDS: Mutex<Vec<i32>> = Mutex::new(Vec::new());
static MOTO_CLEANUP: Once = Once::new();

extern "C" fn kill_motos_at_exit() {
    for pid in MOTO_PIDS.lock().map(|p| p.clone()).unwrap_or_default() {
        // SAFETY: kill has no memory preconditions; the pid is a moto we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let pid = self.child.id() as i32;
        if let Ok(mut pids) = MOTO_PIDS.lock() {
            pids.retain(|p| *p != pid);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `moto_server` from `FASTVM_TEST_MOTO` or PATH.
pub fn moto_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FASTVM_TEST_MOTO").map(PathBuf::from) {
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("moto_server"))
            .find(|p| p.is_file())
    })
}

/// Start moto listening on `host` (a free port) with `buckets` created;
/// `None` (a skip) without moto, a panic under CI.
pub fn start_moto(host: &str, buckets: &[&str]) -> Option<Moto> {
    let Some(bin) = moto_binary() else {
        let why = "moto_server not found (set FASTVM_TEST_MOTO or pip install 'moto[server]')";
        if std::env::var_os("CI").is_some() {
            panic!("{why}; CI is set, so this is a failure");
        }
        eprintln!("skipping S3 tests: {why}");
        return None;
    };
    let port = std::net::TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // In a data dir of the harness: removed at exit with the rest.
    let log = std::fs::File::create(data_dir(&format!("moto-{port}")).join("moto.log"))
        .expect("moto log");
    let child = std::process::Command::new(&bin)
        .args(["-H", host, "-p", &port.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
    if let Ok(mut pids) = MOTO_PIDS.lock() {
        pids.push(child.id() as i32);
    }
    // SAFETY: registering a plain extern "C" fn with atexit.
    MOTO_CLEANUP.call_once(|| unsafe {
        libc::atexit(kill_motos_at_exit);
    });
    let shown = if host == "0.0.0.0" { "127.0.0.1" } else { host };
    let moto = Moto {
        child,
        endpoint: format!("http://{shown}:{port}"),
    };
    let client = Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let up = block_on(client.get(format!("{}/moto-api/", moto.endpoint)).send())
            .is_ok_and(|r| r.status().is_success());
        if up {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "moto did not answer on {} within 60 s",
            moto.endpoint
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    // moto accepts unsigned requests: create the buckets.
    for bucket in buckets {
        let res = block_on(client.put(format!("{}/{bucket}", moto.endpoint)).send())
            .expect("create bucket");
        assert!(res.status().is_success(), "create bucket: {}", res.status());
    }
    Some(moto)
}
