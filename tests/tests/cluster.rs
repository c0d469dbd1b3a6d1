//! Scale-out end to end: one or two control planes (`fastvm serve
//! --database-url ... --snapshot-store s3://... --no-local-worker`) on a real
//! PostgreSQL, three `fastvm worker` processes, each in its own network
//! namespace standing for a host (own data dir, IPv4 pool and IPv6 prefix),
//! a real S3-compatible store (moto), real guests.
//!
//! Hosts: namespace i has a veth to the root namespace, 198.19.250.(4i+2)/30
//! inside and 198.19.250.(4i+1)/30 outside (198.18.0.0/15 is the benchmarking range;
//! not 192.0.2.0/24, which some of our machines use for their uplink), and a default route out.
//! The control planes call workers at their namespace address (a connection
//! out of the root namespace). Workers reach the control plane and moto at
//! `127.0.0.1:<port>` of their own namespace, relayed by this test to the same
//! port on the root namespace's loopback ([`LoopbackRelay`]): no connection
//! ever enters the root namespace from a veth, so a host firewall that drops
//! new inbound connections (as CI machines may have) or an HTTP proxy in the
//! environment (removed from every child's environment too) cannot cut the
//! cluster apart. The snapshot store's endpoint, which the control plane hands
//! to the workers, is therefore `http://127.0.0.1:<moto>` for all of them.
//!
//! Needs root, QEMU, `FASTVM_BIN` (the release `fastvm`), PostgreSQL
//! (`FASTVM_TEST_PG_URL`, scripts/start-postgres) and moto
//! (`FASTVM_TEST_MOTO`); under CI a missing piece fails.

use fastvm_e2e::{block_on, data_dir, image_cache, json_call, start_moto, Moto};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUCKET: &str = "fastvm-cluster";
/// One client for the whole test: building one loads the CA bundle, which
/// in a debug build costs a core for a good part of a second each time.
static CLIENT: std::sync::LazyLock<Client> = std::sync::LazyLock::new(Client::new);
/// Proxy settings a CI environment may carry: the cluster's own traffic is
/// local, so no child process gets them.
const PROXY_ENV: [&str; 6] = [
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
];
const SECRET_ENV: [(&str, &str); 2] = [
    ("FASTVM_S3_ACCESS_KEY_ID", "testing"),
    ("FASTVM_S3_SECRET_ACCESS_KEY", "testing-secret"),
];

fn needed(what: &str) -> Option<String> {
    match std::env::var(what) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{what} is not set under CI: the cluster test cannot run"
            );
            eprintln!("{what} is not set: skipping the cluster test");
            None
        }
    }
}

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace standing for a host; removed when dropped.
struct Host {
    ns: String,
    /// Address of the host inside its namespace.
    inside: String,
    /// Loopback ports of the root namespace (control plane, moto) reachable
    /// at the same port on the namespace's loopback.
    relays: Vec<LoopbackRelay>,
}

impl Host {
    fn new(i: u32) -> Host {
        let ns = format!("fvc{}-{i}", std::process::id());
        let (out, inside) = (
            format!("198.19.250.{}", 4 * i + 1),
            format!("198.19.250.{}", 4 * i + 2),
        );
        let (veth_out, veth_in) = (
            format!("fvco{i}-{}", std::process::id() % 10000),
            format!("fvci{i}"),
        );
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        sh(&format!(
            "ip netns add {ns} && ip link add {veth_out} type veth peer name {veth_in} && \
             ip link set {veth_in} netns {ns} && ip addr add {out}/30 dev {veth_out} && ip link set {veth_out} up && \
             ip -n {ns} addr add {inside}/30 dev {veth_in} && ip -n {ns} link set {veth_in} up && \
             ip -n {ns} link set lo up && ip -n {ns} route add default via {out}"
        ));
        Host {
            ns,
            inside,
            relays: Vec::new(),
        }
    }

    /// Makes `127.0.0.1:port` of the root namespace reachable at
    /// `127.0.0.1:port` inside this host's namespace.
    fn relay(&mut self, port: u16) {
        self.relays.push(LoopbackRelay::start(&self.ns, port));
    }
}

/// A TCP relay from `127.0.0.1:port` inside a network namespace to
/// `127.0.0.1:port` of the test's own namespace. The listening socket is
/// created by a thread that entered the namespace (a socket stays in the
/// namespace it was made in); the accept loop and the outgoing connections
/// run in threads of the root namespace. Stops accepting when dropped.
struct LoopbackRelay {
    stop: Arc<AtomicBool>,
}

impl LoopbackRelay {
    fn start(ns: &str, port: u16) -> LoopbackRelay {
        let target = std::fs::File::open(format!("/run/netns/{ns}")).expect("open the namespace");
        let listener = std::thread::spawn(move || {
            // SAFETY: setns on a valid, open namespace fd; it changes only the
            // network namespace of this short-lived thread, which ends right
            // after binding (no other code runs on it).
            let rc = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            TcpListener::bind(("127.0.0.1", port))
        })
        .join()
        .expect("relay bind thread")
        .unwrap_or_else(|e| panic!("relay listener on 127.0.0.1:{port} in {ns}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((inner, _)) => {
                        let _ = inner.set_nonblocking(false);
                        match TcpStream::connect(("127.0.0.1", port)) {
                            Ok(outer) => pipe(inner, outer),
                            Err(_) => drop(inner),
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        LoopbackRelay { stop }
    }
}

impl Drop for LoopbackRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies both directions between two connected sockets until each side ends.
fn pipe(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one_way = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Write);
        });
    };
    one_way(a, b2);
    one_way(b, a2);
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// A child process killed (by pid) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Proc {
        let file = std::fs::File::create(&log).expect("log");
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .env("RUST_LOG", "info");
        for var in PROXY_ENV {
            cmd.env_remove(var);
        }
        let child = cmd.spawn().expect("spawn");
        Proc { child, log }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        s.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

struct ControlPlane {
    _proc: Proc,
    url: String,
    key: String,
    dir: PathBuf,
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port()
}

fn start_control_plane(
    bin: &Path,
    name: &str,
    db_url: &str,
    moto: &Moto,
    dir: Option<PathBuf>,
) -> ControlPlane {
    let dir = dir.unwrap_or_else(|| data_dir(name));
    let port = free_port();
    let moto_port = moto.endpoint.rsplit(':').next().expect("port");
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--database-url",
        db_url,
    ])
    .args([
        "--snapshot-store",
        &format!("s3://{BUCKET}/snapshots"),
        "--no-local-worker",
    ])
    .args([
        "--s3-endpoint",
        &format!("http://127.0.0.1:{moto_port}"),
        "--s3-region",
        "us-east-1",
    ])
    .args(["--no-proxy", "--no-ssh", "--no-metrics"])
    .arg("--data-dir")
    .arg(&dir)
    .envs(SECRET_ENV);
    let proc = Proc::spawn(cmd, dir.join("server.log"));
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !block_on(CLIENT.get(format!("{url}/healthz")).send())
        .is_ok_and(|r| r.status().is_success())
    {
        assert!(
            Instant::now() < deadline,
            "control plane {name} did not start:\n{}",
            proc.tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Only the first control plane on a database makes the admin key.
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .unwrap_or_default()
        .trim()
        .to_owned();
    ControlPlane {
        _proc: proc,
        url,
        key,
        dir,
    }
}

struct WorkerHost {
    host: Host,
    proc: Option<Proc>,
    dir: PathBuf,
    index: u32,
}

fn start_worker(bin: &Path, cp: &ControlPlane, host: &Host, dir: &Path, i: u32) -> Proc {
    let cp_port = cp.url.rsplit(':').next().expect("port");
    // nsenter, not `ip netns exec`: only the network namespace changes (ip
    // netns exec also remounts /sys, hiding the cgroup hierarchies).
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", host.ns))
        .arg("--")
        .arg(bin)
        .args([
            "worker",
            "--control-url",
            &format!("http://127.0.0.1:{cp_port}"),
        ])
        .arg("--token-file")
        .arg(cp.dir.join("worker-token"))
        .arg("--data-dir")
        .arg(dir)
        .args(["--listen", &format!("{}:7070", host.inside)])
        .args(["--ipv4-pool", &format!("10.{}.0.0/16", 210 + i)])
        .args(["--ipv6-prefix", &format!("fd00:fa5c:{i}::/64")])
        .args(["--dns-upstream", "127.0.0.1:9"])
        .arg("--image-dir")
        .arg(image_cache());
    Proc::spawn(
        cmd,
        dir.join(format!(
            "worker-{}.log",
            Instant::now().elapsed().as_nanos()
        )),
    )
}

async fn call(
    cp: &ControlPlane,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    json_call(
        &CLIENT,
        format!("{}{path}", cp.url),
        Some(&cp.key),
        method,
        body,
    )
    .await
}

async fn workers(cp: &ControlPlane) -> Vec<Value> {
    let (s, v) = call(cp, Method::GET, "/v1/admin/workers", None).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

async fn vm_status(cp: &ControlPlane, id: &str) -> String {
    let (_, v) = call(cp, Method::GET, &format!("/v1/vms/{id}"), None).await;
    v["status"].as_str().unwrap_or("").to_owned()
}

async fn run_in(cp: &ControlPlane, id: &str, cmd: &str) -> (i64, String) {
    let (s, v) = call(
        cp,
        Method::POST,
        &format!("/v1/vms/{id}/exec"),
        Some(json!({"command": ["sh", "-c", cmd]})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "exec on {id}: {v}");
    (
        v["exitCode"].as_i64().unwrap_or(-1),
        v["stdout"].as_str().unwrap_or("").to_owned(),
    )
}

/// Launch; a 202 (still provisioning: a worker's first launch builds its
/// golden snapshot) is waited for. The answer is 201 once running.
async fn launch(cp: &ControlPlane, body: Value) -> (StatusCode, Value) {
    let (s, v) = call(cp, Method::POST, "/v1/vms", Some(body)).await;
    if s != StatusCode::ACCEPTED {
        return (s, v);
    }
    let id = v["id"].as_str().unwrap_or("").to_owned();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (s, v) = call(cp, Method::GET, &format!("/v1/vms/{id}"), None).await;
        if v["status"] != "provisioning" {
            let s = if v["status"] == "running" {
                StatusCode::CREATED
            } else {
                s
            };
            return (s, v);
        }
        assert!(
            Instant::now() < deadline,
            "VM {id} still provisioning after 300 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn vm_counts(w: &[Value]) -> BTreeMap<String, u64> {
    w.iter()
        .map(|w| {
            (
                w["id"].as_str().unwrap_or("").to_owned(),
                w["vmCount"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[test]
fn three_workers_one_control_plane_and_failures() {
    let Some(bin) = needed("FASTVM_BIN").map(PathBuf::from) else {
        return;
    };
    let Some(pg) = needed("FASTVM_TEST_PG_URL") else {
        return;
    };
    let Some(moto) = start_moto("127.0.0.1", &[BUCKET]) else {
        return;
    };
    // A database of its own.
    let db = format!("fastvm_cluster_{}", std::process::id());
    let _ = Command::new("psql")
        .args([
            pg.as_str(),
            "-qc",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        ])
        .status();
    sh(&format!("psql '{pg}' -qc 'CREATE DATABASE {db}'"));
    let db_url = match pg.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("odd PostgreSQL URL {pg}"),
    };

    let cp = start_control_plane(&bin, "cp1", &db_url, &moto, None);
    // A second control plane on the same database (stateless apart from it
    // and the cluster secret, which every control plane must share).
    let cp2_dir = data_dir("cp2");
    std::fs::copy(cp.dir.join("worker-token"), cp2_dir.join("worker-token"))
        .expect("share the worker token");
    let cp2 = start_control_plane(&bin, "cp2", &db_url, &moto, Some(cp2_dir));
    let mut hosts: Vec<WorkerHost> = (0..3)
        .map(|i| {
            let mut host = Host::new(i);
            host.relay(port_of(&cp.url));
            host.relay(port_of(&moto.endpoint));
            let dir = data_dir(&format!("worker{i}"));
            let proc = start_worker(&bin, &cp, &host, &dir, i);
            WorkerHost {
                host,
                proc: Some(proc),
                dir,
                index: i,
            }
        })
        .collect();
    block_on(async {
        let deadline = Instant::now() + Duration::from_secs(120);
        let w = loop {
            let w = workers(&cp).await;
            if w.len() == 3 && w.iter().all(|w| w["status"] == "ready") {
                break w;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = hosts
                    .iter()
                    .filter_map(|h| h.proc.as_ref().map(Proc::tail))
                    .collect();
                panic!(
                    "3 ready workers: {w:#?}\nworker logs:\n{}\ncontrol plane log:\n{}",
                    logs.join("\n-----\n"),
                    cp._proc.tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        eprintln!("workers: {w:#?}");
        assert_eq!(
            std::fs::metadata(cp.dir.join("worker-token"))
                .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
                .ok(),
            Some(0o600)
        );

        // 12 launches, spread over the 3 workers.
        let t = Instant::now();
        let launches = (0..12).map(|i| {
            launch(
                &cp,
                json!({"machineType": "c1m2", "name": format!("spread-{i}")}),
            )
        });
        let results = futures::future::join_all(launches).await;
        eprintln!(
            "12 concurrent launches through the control plane: {:?}",
            t.elapsed()
        );
        let mut vms = Vec::new();
        for (s, v) in &results {
            assert_eq!(*s, StatusCode::CREATED, "{v}");
            assert_eq!(v["status"], "running", "{v}");
            vms.push(v["id"].as_str().expect("id").to_owned());
        }
        let counts = vm_counts(&workers(&cp).await);
        eprintln!("VMs per worker: {counts:?}");
        assert_eq!(counts.values().sum::<u64>(), 12);
        assert!(
            counts.values().all(|c| *c >= 2),
            "placement must spread: {counts:?}"
        );
        // Every VM answers, wherever it runs.
        for id in &vms {
            let (code, out) = run_in(&cp, id, "hostname").await;
            assert_eq!(code, 0);
            assert!(!out.trim().is_empty());
        }
        // A few done with: delete 6 of them.
        for id in vms.drain(6..) {
            let (s, v) = call(&cp, Method::DELETE, &format!("/v1/vms/{id}"), None).await;
            assert!(s.is_success(), "{v}");
        }

        // A snapshot taken on one worker restores on another.
        let src = vms[0].clone();
        assert_eq!(
            run_in(&cp, &src, "echo moved-by-s3 > /root/mark && sync")
                .await
                .0,
            0
        );
        let (s, snap) = call(
            &cp,
            Method::POST,
            "/v1/snapshots",
            Some(json!({"vmId": src, "name": "cross"})),
        )
        .await;
        assert!(s.is_success(), "{snap}");
        let sid = snap["id"].as_str().expect("snapshot id").to_owned();
        let deadline = Instant::now() + Duration::from_secs(120);
        while call(&cp, Method::GET, &format!("/v1/snapshots/{sid}"), None)
            .await
            .1["status"]
            != "ready"
        {
            assert!(Instant::now() < deadline, "snapshot not ready");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // The source's worker drains: the restore must land elsewhere.
        let owner = find_owner(&hosts, &src);
        let owner_id = std::fs::read_to_string(hosts[owner].dir.join("worker-id"))
            .expect("worker id")
            .trim()
            .to_owned();
        let (s, v) = call(
            &cp,
            Method::POST,
            &format!("/v1/admin/workers/{owner_id}/drain"),
            None,
        )
        .await;
        assert!(s.is_success(), "drain: {v}");
        let t = Instant::now();
        let (s, restored) = launch(&cp, json!({"snapshotId": sid})).await;
        assert_eq!(s, StatusCode::CREATED, "{restored}");
        eprintln!(
            "restore on another worker (fetch from the store + restore): {:?}",
            t.elapsed()
        );
        let rid = restored["id"].as_str().expect("id").to_owned();
        assert_ne!(
            find_owner(&hosts, &rid),
            owner,
            "a draining worker got a VM"
        );
        assert_eq!(run_in(&cp, &rid, "cat /root/mark").await.1, "moved-by-s3\n");
        let w = workers(&cp).await;
        assert!(
            w.iter()
                .any(|w| w["id"] == owner_id.as_str() && w["status"] == "draining"),
            "{w:#?}"
        );
        vms.push(rid);

        // kill -9 of a worker with VMs: they become `unknown`, not deleted.
        let victim = (0..3)
            .find(|i| *i != owner && vms.iter().any(|v| find_owner(&hosts, v) == *i))
            .unwrap_or(owner);
        let victim_vms: Vec<String> = vms
            .iter()
            .filter(|v| find_owner(&hosts, v) == victim)
            .cloned()
            .collect();
        assert!(!victim_vms.is_empty());
        let victim_id = std::fs::read_to_string(hosts[victim].dir.join("worker-id"))
            .expect("worker id")
            .trim()
            .to_owned();
        if let Some(p) = hosts[victim].proc.as_mut() {
            p.kill9();
        }
        let t = Instant::now();
        loop {
            let statuses =
                futures::future::join_all(victim_vms.iter().map(|v| vm_status(&cp, v))).await;
            if statuses.iter().all(|s| s == "unknown") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "VMs of a dead worker: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "VMs of a killed worker were `unknown` after {:?}",
            t.elapsed()
        );
        let w = workers(&cp).await;
        assert!(
            w.iter()
                .any(|w| w["id"] == victim_id.as_str() && w["status"] == "unreachable"),
            "{w:#?}"
        );
        // New launches land elsewhere.
        for _ in 0..2 {
            let (s, v) = launch(&cp, json!({"machineType": "c1m2"})).await;
            assert_eq!(s, StatusCode::CREATED, "{v}");
            let id = v["id"].as_str().expect("id").to_owned();
            assert_ne!(find_owner(&hosts, &id), victim);
            vms.push(id);
        }
        // One of its VMs is deleted while it is away.
        let doomed = victim_vms[0].clone();
        let (s, v) = call(&cp, Method::DELETE, &format!("/v1/vms/{doomed}"), None).await;
        assert!(
            s.is_success() || s == StatusCode::ACCEPTED,
            "delete while unreachable: {v}"
        );
        // The worker comes back (same data dir: its QEMUs kept running).
        let host = &hosts[victim];
        let proc = start_worker(&bin, &cp, &host.host, &host.dir, host.index);
        hosts[victim].proc = Some(proc);
        let t = Instant::now();
        loop {
            let statuses =
                futures::future::join_all(victim_vms[1..].iter().map(|v| vm_status(&cp, v))).await;
            if statuses.iter().all(|s| s == "running") {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "after the worker returned: {statuses:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "reconciled {} VMs {:?} after the worker restarted",
            victim_vms.len() - 1,
            t.elapsed()
        );
        for v in &victim_vms[1..] {
            assert_eq!(run_in(&cp, v, "echo back").await.1, "back\n");
        }
        // The VM deleted meanwhile is gone from its host (fenced), and stays deleted.
        let deadline = Instant::now() + Duration::from_secs(30);
        while hosts[victim].dir.join("vms").join(&doomed).exists() {
            assert!(
                Instant::now() < deadline,
                "a VM deleted while its worker was away still runs on it"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let (s, _) = call(&cp, Method::GET, &format!("/v1/vms/{doomed}"), None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);

        // Two control planes race 50 launches against a quota of 4 vCPUs.
        for id in &vms {
            let _ = call(&cp, Method::DELETE, &format!("/v1/vms/{id}"), None).await;
        }
        let out = Command::new(&bin)
            .args([
                "orgs",
                "quota",
                "set",
                "--vcpu",
                "4",
                "--database-url",
                &db_url,
            ])
            .arg("--data-dir")
            .arg(&cp.dir)
            .output()
            .expect("quota set");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cp2 = ControlPlane {
            key: cp.key.clone(),
            ..cp2
        };
        let t = Instant::now();
        let racers = (0..50).map(|i| {
            let target = if i % 2 == 0 { &cp } else { &cp2 };
            launch(
                target,
                json!({"machineType": "c1m2", "name": format!("race-{i}")}),
            )
        });
        let results = futures::future::join_all(racers).await;
        let ok: Vec<&Value> = results
            .iter()
            .filter(|(s, _)| *s == StatusCode::CREATED)
            .map(|(_, v)| v)
            .collect();
        let refused = results
            .iter()
            .filter(|(s, v)| {
                *s == StatusCode::TOO_MANY_REQUESTS
                    && v["error"]["code"]
                        .as_str()
                        .is_some_and(|c| c.starts_with("QUOTA_EXCEEDED"))
            })
            .count();
        eprintln!(
            "50 racing launches on 2 control planes: {} created, {refused} refused by quota, {:?}",
            ok.len(),
            t.elapsed()
        );
        assert_eq!(ok.len(), 4, "{results:?}");
        assert_eq!(refused, 46);
        let (_, q) = call(&cp, Method::GET, "/v1/org/quotas", None).await;
        assert_eq!(q["usage"]["vcpu"], 4, "{q}");
        drop(cp2);
    });
    drop(hosts);
    let _ = Command::new("psql")
        .args([
            pg.as_str(),
            "-qc",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        ])
        .status();
}

/// Which host runs VM `id` (its directory is in that worker's data dir).
fn find_owner(hosts: &[WorkerHost], id: &str) -> usize {
    hosts
        .iter()
        .position(|h| h.dir.join("vms").join(id).exists())
        .unwrap_or_else(|| panic!("VM {id} is on no worker"))
}
