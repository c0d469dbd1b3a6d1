//! Runtime benchmark: launch time and exec round trip, each beside its floor
//! measured in the same run.
//!
//! * launch: `Runtime::create` (request to agent ready, incl. overlay creation,
//!   QMP and handshake) vs the floor: the same QEMU command line spawned raw,
//!   timed to the agent's first console line ("serving on ..."), i.e. the
//!   guest's init saying hello with none of our host code involved.
//! * exec: `exec_buffered(["true"])` vs the floor: a protocol ping over the
//!   same virtio-serial channel (no process spawned in the guest).
//!
//! Run: `cargo run --release -p fastvm-bench --bin bench-runtime -- [runs]`
//! (default 20 runs; needs the guest image cache, built on first use).

use fastvm_worker::hypervisor::{LaunchSpec, VmPaths};
use fastvm_worker::qemu::QemuMicrovm;
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, MachineType, Runtime, RuntimeConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Stats {
    p50: f64,
    p99: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    Stats { p50: percentile(&v, 0.5), p99: percentile(&v, 0.99) }
}

fn row(name: &str, ours: &Stats, floor: &Stats, unit: &str) {
    println!(
        "{name:<22} p50 {:>9.2} {unit}  p99 {:>9.2} {unit} | floor p50 {:>9.2} {unit}  p99 {:>9.2} {unit} | ratio p50 {:.2}x  p99 {:.2}x",
        ours.p50,
        ours.p99,
        floor.p50,
        floor.p99,
        ours.p50 / floor.p50,
        ours.p99 / floor.p99
    );
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Spawn QEMU by hand with the runtime's command line and time it to the
/// agent's first console line.
async fn raw_boot(spec: &LaunchSpec, dir: &Path, rootfs: &Path) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let paths = VmPaths::new(dir);
    let st = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(rootfs)
        .arg(&spec.disk)
        .arg(format!("{}G", spec.disk_gib))
        .status()?;
    anyhow::ensure!(st.success(), "qemu-img failed");
    let start = Instant::now();
    let st = std::process::Command::new("qemu-system-x86_64").args(QemuMicrovm::args(spec, &paths, None)).status()?;
    anyhow::ensure!(st.success(), "qemu failed");
    let elapsed = loop {
        let log = std::fs::read_to_string(paths.console_log()).unwrap_or_default();
        if log.contains("fastvm-agent: serving on") {
            break start.elapsed();
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(120), "raw boot timed out");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    if let Some(pid) = std::fs::read_to_string(paths.pidfile()).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
        // SAFETY: kill by the pid of the QEMU this benchmark just started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(ms(elapsed))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt().with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into())).try_init();
    let runs: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let data: PathBuf = std::env::temp_dir().join(format!("fastvm-bench-{}", std::process::id()));
    let mut cfg = RuntimeConfig::new(&data);
    cfg.image_dir = Some(std::env::var_os("FASTVM_TEST_IMAGES").map(PathBuf::from).unwrap_or_else(|| "/var/tmp/fastvm-test-images".into()));
    let rt = Runtime::open(cfg).await?;
    let image = rt.image().await?.clone();
    println!("fast vm runtime bench: accel={} runs={runs} image={}", rt.accel(), image.id);

    // Launch vs raw boot, interleaved so both see the same machine state.
    let machine = MachineType::lookup("c1m2")?;
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let raw_dir = data.join("raw");
        let spec = LaunchSpec::new(&format!("bench-raw-{i}"), machine, machine.disk_gib, rt.accel(), &image, raw_dir.join("disk.qcow2"));
        floor.push(raw_boot(&spec, &raw_dir, &image.rootfs).await?);
        let t = Instant::now();
        let vm = rt.create(CreateVm { machine: "c1m2".into(), ..Default::default() }).await?;
        ours.push(ms(t.elapsed()));
        rt.delete(&vm.id).await?;
    }
    row("launch (to agent)", &stats(ours), &stats(floor), "ms");

    // Exec round trip vs protocol ping on one VM.
    let vm = rt.create(CreateVm { machine: "c1m2".into(), ..Default::default() }).await?;
    let req = ExecRequest::argv(["true"]);
    for _ in 0..5 {
        rt.exec_buffered(&vm.id, &req, 1024).await?;
        rt.ping(&vm.id).await?;
    }
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(50) {
        let t = Instant::now();
        rt.ping(&vm.id).await?;
        floor.push(ms(t.elapsed()));
        let t = Instant::now();
        let out = rt.exec_buffered(&vm.id, &req, 1024).await?;
        ours.push(ms(t.elapsed()));
        anyhow::ensure!(out.exit_code == 0, "true failed");
    }
    row("exec `true`", &stats(ours), &stats(floor), "ms");
    rt.delete(&vm.id).await?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
