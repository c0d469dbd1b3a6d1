//! Runtime benchmark: every figure beside its floor measured in the same run.
//!
//! | figure                          | floor                                                     |
//! |---------------------------------|-----------------------------------------------------------|
//! | fresh boot (`boot_fresh`)       | the same QEMU command line spawned raw, to the agent's    |
//! |                                 | first console line (guest init says hello, no host code)  |
//! | launch from machine type        | raw `qemu -incoming` of the same golden state + `cont`,   |
//! | (golden restore, `create`)      | to the agent answering its handshake                      |
//! | launch from a user snapshot     | raw `qemu -incoming` of that snapshot, likewise            |
//! | exec `true`                     | a protocol ping over the same virtio-serial channel        |
//! | 10 concurrent launches          | the single-launch p50 of this run                          |
//! | snapshot create, 256 MiB dirty  | (absolute; target < 3 s)                                   |
//! | host memory per idle restored VM| (absolute: RSS and PSS, shared pages counted once)        |
//!
//! Run: `cargo run --release -p fastvm-bench --bin bench-runtime -- [runs]`
//! (default 20 runs; the guest image cache is built on first use).

mod floor;

use fastvm_worker::agent::AgentClient;
use fastvm_worker::hypervisor::{LaunchSpec, VmPaths};
use fastvm_worker::qemu::QemuMicrovm;
use fastvm_worker::qmp::Qmp;
use fastvm_worker::runtime::{CreateVm, SnapshotRecord};
use fastvm_worker::{ExecRequest, MachineType, Runtime, RuntimeConfig};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Stats {
    p50: f64,
    p99: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |p: f64| {
        v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Stats {
        p50: at(0.5),
        p99: at(0.99),
    }
}

fn row(name: &str, ours: &Stats, floor: &Stats) {
    println!(
        "{name:<28} p50 {:>8.1} ms  p99 {:>8.1} ms | floor p50 {:>8.1} ms  p99 {:>8.1} ms | ratio p50 {:.2}x  p99 {:.2}x",
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

fn kill(pidfile: &Path) {
    if let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|s| s.trim().parse::<i32>().ok())
    {
        // SAFETY: kill by the pid of a QEMU this benchmark started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn overlay(backing: &Path, format: &str, disk: &Path, size_gib: Option<u32>) -> anyhow::Result<()> {
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.args(["create", "-q", "-f", "qcow2", "-F", format, "-b"])
        .arg(backing)
        .arg(disk);
    if let Some(g) = size_gib {
        cmd.arg(format!("{g}G"));
    }
    anyhow::ensure!(cmd.status()?.success(), "qemu-img failed");
    Ok(())
}

/// Spawn QEMU by hand with the runtime's command line and time it to the
/// agent's first console line.
async fn raw_boot(spec: &LaunchSpec, dir: &Path, rootfs: &Path) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let paths = VmPaths::new(dir);
    overlay(rootfs, "raw", &spec.disk, Some(spec.disk_gib))?;
    let start = Instant::now();
    let st = std::process::Command::new("qemu-system-x86_64")
        .args(QemuMicrovm::args(spec, &paths, None))
        .status()?;
    anyhow::ensure!(st.success(), "qemu failed");
    let elapsed = loop {
        let log = std::fs::read_to_string(paths.console_log()).unwrap_or_default();
        if log.contains("fastvm-agent: serving on") {
            break start.elapsed();
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(120),
            "raw boot timed out"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    kill(&paths.pidfile());
    let _ = std::fs::remove_dir_all(dir);
    Ok(ms(elapsed))
}

/// Spawn QEMU raw with `-incoming` of `snap`, `cont` it, and time it to the
/// agent's handshake answer.
async fn raw_restore(snap: &SnapshotRecord, dir: &Path) -> anyhow::Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let paths = VmPaths::new(dir);
    let mut spec = snap.launch.clone();
    spec.id = "bench-raw-restore".into();
    spec.disk = dir.join("disk.qcow2");
    spec.ram = snap
        .ram
        .clone()
        .map(|path| fastvm_worker::hypervisor::RamFile {
            path,
            shared: false,
        });
    overlay(&snap.layers[0], "qcow2", &spec.disk, None)?;
    let start = Instant::now();
    let st = std::process::Command::new("qemu-system-x86_64")
        .args(QemuMicrovm::args(&spec, &paths, Some(&snap.memory)))
        .status()?;
    anyhow::ensure!(st.success(), "qemu failed");
    let qmp = Qmp::connect(&paths.qmp()).await?;
    floor::raw_incoming_and_cont(&qmp, &snap.memory).await?;
    AgentClient::connect(&paths.agent(), Duration::from_secs(60)).await?;
    let elapsed = start.elapsed();
    kill(&paths.pidfile());
    let _ = std::fs::remove_dir_all(dir);
    Ok(ms(elapsed))
}

/// (RSS, PSS) in MiB of a process.
fn memory_of(pid: u32) -> (f64, f64) {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        rollup
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
            / 1024.0
    };
    (field("Rss:"), field("Pss:"))
}

/// Kills every QEMU this run started (by pidfile) and removes the data dir,
/// also when the benchmark fails half-way.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for sub in ["vms", "raw"] {
            let Ok(entries) = std::fs::read_dir(self.0.join(sub)) else {
                continue;
            };
            for e in entries.flatten() {
                kill(&e.path().join("qemu.pid"));
            }
            kill(&self.0.join(sub).join("qemu.pid"));
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let data: PathBuf = std::env::temp_dir().join(format!("fastvm-bench-{}", std::process::id()));
    let _cleanup = Cleanup(data.clone());
    let mut cfg = RuntimeConfig::new(&data);
    cfg.image_dir = Some(
        std::env::var_os("FASTVM_TEST_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into()),
    );
    let rt = Runtime::open(cfg).await?;
    let image = rt.image().await?.clone();
    println!(
        "fast vm runtime bench: accel={} runs={runs} image={} machine=c1m2",
        rt.accel(),
        image.id
    );
    let raw_dir = data.join("raw");

    // 1. Fresh boot vs raw boot, interleaved so both see the same machine state.
    let machine = MachineType::lookup("c1m2")?;
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    let boot_runs = if std::env::var_os("BENCH_SKIP_BOOT").is_some() {
        0
    } else {
        runs
    };
    for i in 0..boot_runs {
        let spec = LaunchSpec::new(
            &format!("bench-raw-{i}"),
            machine,
            machine.disk_gib,
            rt.accel(),
            &image,
            raw_dir.join("disk.qcow2"),
        );
        floor.push(raw_boot(&spec, &raw_dir, &image.rootfs).await?);
        let t = Instant::now();
        let vm = rt
            .boot_fresh(CreateVm {
                machine: "c1m2".into(),
                ..Default::default()
            })
            .await?;
        ours.push(ms(t.elapsed()));
        rt.delete(&vm.id).await?;
    }
    if boot_runs > 0 {
        row("fresh boot (to agent)", &stats(ours), &stats(floor));
    }

    // 2. Launch from machine type = golden restore.
    let golden = rt.golden_snapshot("c1m2").await?;
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        floor.push(raw_restore(&golden, &raw_dir).await?);
        let t = Instant::now();
        let vm = rt
            .create(CreateVm {
                machine: "c1m2".into(),
                ..Default::default()
            })
            .await?;
        ours.push(ms(t.elapsed()));
        rt.delete(&vm.id).await?;
    }
    let single_p50 = stats(ours.clone()).p50;
    row("launch from machine type", &stats(ours), &stats(floor));

    // 3. Launch from a user snapshot (of a VM that did some work).
    let src = rt
        .create(CreateVm {
            machine: "c1m2".into(),
            ..Default::default()
        })
        .await?;
    rt.exec_buffered(
        &src.id,
        &ExecRequest::shell("head -c 64M /dev/urandom > /root/data; sync"),
        1024,
    )
    .await?;
    let snap = rt.snapshot(&src.id, None).await?;
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        floor.push(raw_restore(&snap, &raw_dir).await?);
        let t = Instant::now();
        let vm = rt
            .create(CreateVm {
                snapshot: Some(snap.id.clone()),
                ..Default::default()
            })
            .await?;
        ours.push(ms(t.elapsed()));
        rt.delete(&vm.id).await?;
    }
    let user_p50 = stats(ours.clone()).p50;
    row("launch from user snapshot", &stats(ours), &stats(floor));
    let (ram_mib, stream_kib) = (
        snap.ram
            .as_ref()
            .and_then(|r| std::fs::metadata(r).ok())
            .map_or(0, |m| {
                (std::os::unix::fs::MetadataExt::blocks(&m) * 512) >> 20
            }),
        std::fs::metadata(&snap.memory).map_or(0, |m| m.len() >> 10),
    );
    println!(
        "user snapshot vs machine type: p50 {user_p50:.1} ms vs {single_p50:.1} ms | ratio {:.2}x (target <= 1.3x; RAM file {ram_mib} MiB data, stream {stream_kib} KiB)",
        user_p50 / single_p50
    );
    // The same source captured the old way (RAM in the migration stream,
    // loaded by every restore), for comparison in the same run.
    fastvm_worker::qemu::set_split_ram(false);
    let whole = rt.snapshot(&src.id, None).await?;
    fastvm_worker::qemu::set_split_ram(true);
    let mut before = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let vm = rt
            .create(CreateVm {
                snapshot: Some(whole.id.clone()),
                ..Default::default()
            })
            .await?;
        before.push(ms(t.elapsed()));
        rt.delete(&vm.id).await?;
    }
    let before_p50 = stats(before).p50;
    println!(
        "user snapshot, RAM in stream: p50 {before_p50:.1} ms (stream {} MiB) | RAM file p50 {user_p50:.1} ms | ratio {:.2}x",
        std::fs::metadata(&whole.memory).map_or(0, |m| m.len() >> 20),
        user_p50 / before_p50
    );
    rt.delete_snapshot(&whole.id).await?;

    // 4. Exec round trip vs protocol ping on one VM.
    let req = ExecRequest::argv(["true"]);
    for _ in 0..5 {
        rt.exec_buffered(&src.id, &req, 1024).await?;
        rt.ping(&src.id).await?;
    }
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(50) {
        let t = Instant::now();
        rt.ping(&src.id).await?;
        floor.push(ms(t.elapsed()));
        let t = Instant::now();
        let out = rt.exec_buffered(&src.id, &req, 1024).await?;
        ours.push(ms(t.elapsed()));
        anyhow::ensure!(out.exit_code == 0, "true failed");
    }
    row("exec `true`", &stats(ours), &stats(floor));

    // 5. Snapshot create of a VM with 256 MiB of freshly dirtied memory.
    let mut times = Vec::new();
    for i in 0..3 {
        let cmd = format!("rm -f /dev/shm/d*; head -c 256M /dev/urandom > /dev/shm/d{i}");
        rt.exec_buffered(&src.id, &ExecRequest::shell(&cmd), 1024)
            .await?;
        let t = Instant::now();
        let s = rt.snapshot(&src.id, None).await?;
        times.push(ms(t.elapsed()));
        let size = std::fs::metadata(&s.memory).map(|m| m.len()).unwrap_or(0) >> 20;
        let ram = s
            .ram
            .as_ref()
            .and_then(|r| std::fs::metadata(r).ok())
            .map_or(0, |m| {
                (std::os::unix::fs::MetadataExt::blocks(&m) * 512) >> 20
            });
        println!(
            "snapshot create, 256 MiB dirty: {:>8.1} ms (memory file {size} MiB, RAM file {ram} MiB data; target < 3000 ms)",
            times[i]
        );
        rt.delete_snapshot(&s.id).await?;
    }

    // 6. Ten concurrent launches from the machine type.
    let t = Instant::now();
    let launches = (0..10).map(|_| {
        rt.create(CreateVm {
            machine: "c1m2".into(),
            ..Default::default()
        })
    });
    let vms = futures_join_all(launches).await?;
    let all = ms(t.elapsed());
    println!("10 concurrent launches:      all running in {all:>8.1} ms | single p50 {single_p50:>8.1} ms | ratio {:.2}x (target <= 3x)", all / single_p50);

    // 7. Host memory per idle restored VM.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (mut rss, mut pss) = (0.0, 0.0);
    for vm in &vms {
        let pid = rt.get(&vm.id)?.pid.unwrap_or(0);
        let (r, p) = memory_of(pid);
        rss += r;
        pss += p;
    }
    let n = vms.len() as f64;
    println!(
        "idle restored VM (c1m2, 2 GiB): RSS {:>6.1} MiB  PSS {:>6.1} MiB per VM (mean of {n})",
        rss / n,
        pss / n
    );
    for vm in vms {
        rt.delete(&vm.id).await?;
    }
    rt.delete(&src.id).await?;
    rt.delete_snapshot(&snap.id).await?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> anyhow::Result<Vec<T>>
where
    F: std::future::Future<Output = fastvm_worker::Result<T>>,
{
    let mut set = Vec::new();
    for f in futs {
        set.push(f);
    }
    let results = futures::future::join_all(set).await;
    results
        .into_iter()
        .map(|r| r.map_err(anyhow::Error::from))
        .collect()
}
