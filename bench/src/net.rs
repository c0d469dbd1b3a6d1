//! Network benchmark: TCP throughput and connection setup latency between a
//! VM and an outside namespace, with the firewall off and on (100 rules),
//! beside the raw floor measured in the same run.
//!
//! | path              | what packets cross                                           |
//! |-------------------|--------------------------------------------------------------|
//! | fw off            | guest -> tap0 -> VM netns (nft table, no rules) -> veth ->   |
//! |                   | host (forwarding) -> veth -> outside namespace `fvb-out`     |
//! | fw on (100 rules) | the same, 100 ingress and 100 egress rules before the match  |
//! | raw tap (floor)   | guest -> a tap in the host namespace, no namespace, no rules |
//!
//! All three run the same golden snapshot (same guest image and device set).
//! Throughput: the guest writes 64 MiB with bash `/dev/tcp` to a sink that
//! times first byte to EOF (median of 3). Setup latency: 200 `connect()`s
//! from the outside (the host for the raw floor) to a listener in the guest.
//!
//! Run: `cargo run --release -p fastvm-bench --bin bench-net`

mod floor;

use fastvm_agent_proto::{GuestConfig, NetworkConfig};
use fastvm_worker::agent::AgentClient;
use fastvm_worker::exec;
use fastvm_worker::hypervisor::{NetLaunch, VmPaths};
use fastvm_worker::net::netns;
use fastvm_worker::qemu::QemuMicrovm;
use fastvm_worker::qmp::Qmp;
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, Runtime, RuntimeConfig};
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const OUT_NS: &str = "fvb-out";
const RAW_TAP: &str = "fvb-tap0";
const MIB: usize = 64;
const CONNECTS: usize = 200;

fn quiet(args: &[&str]) {
    let _ = Command::new("ip")
        .args(args)
        .stderr(std::process::Stdio::null())
        .status();
}

fn sh(cmd: &str) -> anyhow::Result<()> {
    let st = Command::new("sh").arg("-c").arg(cmd).status()?;
    anyhow::ensure!(st.success(), "{cmd} failed");
    Ok(())
}

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for sub in ["vms", "raw"] {
            if let Ok(entries) = std::fs::read_dir(self.0.join(sub)) {
                for e in entries
                    .flatten()
                    .map(|e| e.path())
                    .chain([self.0.join(sub)])
                {
                    if let Some(pid) = std::fs::read_to_string(e.join("qemu.pid"))
                        .ok()
                        .and_then(|s| s.trim().parse::<i32>().ok())
                    {
                        // SAFETY: kill by the pid of a QEMU this benchmark started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    }
                }
            }
        }
        fastvm_worker::net::remove_owned_by(&self.0);
        quiet(&["link", "del", "fvbo-h"]);
        quiet(&["netns", "del", OUT_NS]);
        quiet(&["link", "del", RAW_TAP]);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A sink that reports (bytes, seconds from first byte to EOF) per connection.
fn sink(listener: TcpListener) -> mpsc::Receiver<(usize, f64)> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut buf = vec![0u8; 1 << 20];
            let mut total = 0usize;
            let mut first = None;
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                first.get_or_insert_with(Instant::now);
                total += n;
            }
            let secs = first.map(|f| f.elapsed().as_secs_f64()).unwrap_or(f64::NAN);
            let _ = tx.send((total, secs));
        }
    });
    rx
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

/// Runs a shell command in a guest.
trait Guest {
    async fn sh(&self, cmd: &str) -> anyhow::Result<String>;
}

struct RuntimeGuest<'a>(&'a Runtime, String);
struct RawGuest(AgentClient);

impl Guest for RuntimeGuest<'_> {
    async fn sh(&self, cmd: &str) -> anyhow::Result<String> {
        let out = self
            .0
            .exec_buffered(&self.1, &ExecRequest::shell(cmd), 1 << 20)
            .await?;
        anyhow::ensure!(
            out.exit_code == 0,
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Guest for RawGuest {
    async fn sh(&self, cmd: &str) -> anyhow::Result<String> {
        let out = exec::collect(
            self.0
                .exec(exec::to_spec(&ExecRequest::shell(cmd))?)
                .await?,
            1 << 20,
        )
        .await?;
        anyhow::ensure!(
            out.exit_code == 0,
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

const LISTENER: &str = "cat > /tmp/l.py <<'EOF'
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', 7000)); s.listen(1024)
while True:
    c, _ = s.accept(); c.close()
EOF
setsid nohup python3 /tmp/l.py >/dev/null 2>&1 &
for i in $(seq 100); do python3 -c \"import socket; socket.create_connection(('127.0.0.1', 7000), 1)\" 2>/dev/null && exit 0; sleep 0.1; done; exit 1";

/// Throughput MB/s (median of 3) from the guest to `sink_addr`, and connect
/// latencies (ms) to `guest:7000` made by `connect_from` (a namespace, or the host).
async fn measure(
    guest: &impl Guest,
    sink_addr: SocketAddr,
    rx: &mpsc::Receiver<(usize, f64)>,
    target: SocketAddr,
    connect_from: Option<&str>,
) -> anyhow::Result<(f64, Vec<f64>)> {
    let mut rates = Vec::new();
    for _ in 0..3 {
        guest
            .sh(&format!(
                "bash -c 'head -c {}M /dev/zero > /dev/tcp/{}/{}'",
                MIB,
                sink_addr.ip(),
                sink_addr.port()
            ))
            .await?;
        let (bytes, secs) = rx.recv_timeout(Duration::from_secs(30))?;
        anyhow::ensure!(bytes == MIB << 20, "sink got {bytes} bytes");
        rates.push(bytes as f64 / secs / 1e6);
    }
    let rate = percentile(&mut rates, 0.5);
    guest.sh(LISTENER).await?;
    let connects = move || -> std::io::Result<Vec<f64>> {
        let mut v = Vec::with_capacity(CONNECTS);
        for _ in 0..CONNECTS {
            let t = Instant::now();
            let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            v.push(t.elapsed().as_secs_f64() * 1e3);
            drop(s);
        }
        Ok(v)
    };
    let lat = match connect_from {
        Some(ns) => netns::on_thread_in(ns, connects).await?,
        None => tokio::task::spawn_blocking(connects).await??,
    };
    Ok((rate, lat))
}

fn firewall(rules: usize) -> anyhow::Result<fastvm_types::FirewallPolicy> {
    let mut ingress: Vec<serde_json::Value> = (0..rules.saturating_sub(1))
        .map(|i| serde_json::json!({"kind": "cidr", "value": format!("172.16.{}.0/24", i % 250), "protocol": "tcp", "ports": (1000 + i).to_string(), "action": "deny"}))
        .collect();
    let mut egress: Vec<serde_json::Value> = (0..rules.saturating_sub(1))
        .map(|i| serde_json::json!({"kind": "cidr", "value": format!("172.17.{}.0/24", i % 250), "protocol": "tcp", "ports": (1000 + i).to_string(), "action": "deny"}))
        .collect();
    if rules > 0 {
        ingress.push(serde_json::json!({"kind": "cidr", "value": "198.18.0.0/24", "protocol": "tcp", "ports": "7000", "action": "allow"}));
        egress.push(serde_json::json!({"kind": "cidr", "value": "198.18.0.0/24", "protocol": "tcp", "ports": "5001", "action": "allow"}));
    }
    let default = if rules > 0 { "deny" } else { "allow" };
    Ok(serde_json::from_value(serde_json::json!({
        "ingress": {"defaultAction": default, "rules": ingress},
        "egress": {"defaultAction": default, "rules": egress},
    }))?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let data = std::env::temp_dir().join(format!("fastvm-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&data)?;
    let _cleanup = Cleanup(data.clone());
    let mut cfg = RuntimeConfig::new(&data);
    cfg.image_dir = Some(
        std::env::var_os("FASTVM_TEST_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into()),
    );
    if let Some(net) = cfg.network.as_mut() {
        // Nothing here resolves names; never the host's resolver.
        net.dns_upstream = SocketAddr::from(([127, 0, 0, 1], 9));
    }
    let rt = Runtime::open(cfg).await?;

    // The outside namespace and its sink.
    quiet(&["link", "del", "fvbo-h"]);
    quiet(&["netns", "del", OUT_NS]);
    sh("ip netns add fvb-out && ip link add fvbo-h type veth peer name eth0 netns fvb-out && ip addr add 198.18.0.1/24 dev fvbo-h \
        && ip link set fvbo-h up && ip -n fvb-out addr add 198.18.0.2/24 dev eth0 && ip -n fvb-out link set eth0 up \
        && ip -n fvb-out link set lo up && ip -n fvb-out route add default via 198.18.0.1")?;
    let out_sink: SocketAddr = "198.18.0.2:5001".parse()?;
    let listener = netns::on_thread_in(OUT_NS, move || TcpListener::bind(out_sink)).await?;
    let out_rx = sink(listener);

    let info = rt
        .create(CreateVm {
            machine: "c1m2".into(),
            firewall: firewall(0)?,
            ..Default::default()
        })
        .await?;
    let guest4: std::net::IpAddr = info
        .private_ipv4
        .clone()
        .ok_or_else(|| anyhow::anyhow!("VM has no network"))?
        .parse()?;
    let g = RuntimeGuest(&rt, info.id.clone());
    let (off_rate, mut off_lat) = measure(
        &g,
        out_sink,
        &out_rx,
        SocketAddr::new(guest4, 7000),
        Some(OUT_NS),
    )
    .await?;
    rt.set_firewall(&info.id, &firewall(100)?).await?;
    let (on_rate, mut on_lat) = measure(
        &g,
        out_sink,
        &out_rx,
        SocketAddr::new(guest4, 7000),
        Some(OUT_NS),
    )
    .await?;
    let snap = rt.golden_snapshot("c1m2").await?;
    rt.delete(&info.id).await?;

    // The floor: the same golden state restored by raw QEMU onto a tap in the host namespace.
    quiet(&["link", "del", RAW_TAP]);
    sh("ip tuntap add dev fvb-tap0 mode tap && ip addr add 10.203.0.1/30 dev fvb-tap0 && ip link set fvb-tap0 up")?;
    let raw_sink: SocketAddr = "10.203.0.1:5001".parse()?;
    let raw_rx = sink(TcpListener::bind(raw_sink)?);
    let dir = data.join("raw");
    std::fs::create_dir_all(&dir)?;
    let paths = VmPaths::new(&dir);
    let mut spec = snap.launch.clone();
    spec.id = "bench-net-raw".into();
    spec.disk = dir.join("disk.qcow2");
    spec.ram = snap
        .ram
        .clone()
        .map(|path| fastvm_worker::hypervisor::RamFile {
            path,
            shared: false,
        });
    let mac = "02:00:00:00:fb:01".to_owned();
    spec.net = Some(NetLaunch {
        netns: String::new(),
        tap: RAW_TAP.into(),
        mac: mac.clone(),
    });
    overlay(&snap.layers[0], &spec.disk)?;
    let st = Command::new("qemu-system-x86_64")
        .args(QemuMicrovm::args(&spec, &paths, Some(&snap.memory)))
        .status()?;
    anyhow::ensure!(st.success(), "raw qemu failed");
    let qmp = Qmp::connect(&paths.qmp()).await?;
    floor::raw_incoming_and_cont(&qmp, &snap.memory).await?;
    let agent = AgentClient::connect(&paths.agent(), Duration::from_secs(60)).await?;
    let net = NetworkConfig {
        mac,
        ipv4: "10.203.0.2/30".into(),
        gateway4: "10.203.0.1".into(),
        ipv6: None,
        gateway6: None,
        dns: vec![],
    };
    agent
        .configure(GuestConfig {
            network: Some(net),
            ..Default::default()
        })
        .await?;
    let raw = RawGuest(agent);
    let (raw_rate, mut raw_lat) =
        measure(&raw, raw_sink, &raw_rx, "10.203.0.2:7000".parse()?, None).await?;

    println!(
        "bench-net: c1m2 guest, TCG, {MIB} MiB per transfer (median of 3), {CONNECTS} connects"
    );
    println!(
        "{:<34} {:>12} {:>12} {:>12} {:>10}",
        "path", "MB/s", "connect p50", "connect p99", "MB/s ratio"
    );
    for (name, rate, lat) in [
        ("raw tap, host netns, no rules", raw_rate, &mut raw_lat),
        ("netns + nft, firewall off", off_rate, &mut off_lat),
        ("netns + nft, 100+100 rules", on_rate, &mut on_lat),
    ] {
        let (p50, p99) = (percentile(lat, 0.5), percentile(lat, 0.99));
        println!(
            "{name:<34} {rate:>12.1} {:>9.3} ms {:>9.3} ms {:>9.2}x",
            p50,
            p99,
            rate / raw_rate
        );
    }
    let (r50, o50, n50) = (
        percentile(&mut raw_lat, 0.5),
        percentile(&mut off_lat, 0.5),
        percentile(&mut on_lat, 0.5),
    );
    println!(
        "connect p50 ratios vs raw: firewall off {:.2}x, 100 rules {:.2}x",
        o50 / r50,
        n50 / r50
    );
    Ok(())
}

fn overlay(backing: &Path, overlay: &Path) -> anyhow::Result<()> {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(backing)
        .arg(overlay)
        .status()?;
    anyhow::ensure!(st.success(), "qemu-img failed");
    Ok(())
}
