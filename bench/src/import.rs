//! `bench-import`: snapshot import of a ~200 MB Debian-based image, from
//! `create` to a ready snapshot, beside the raw cost of pulling and unpacking
//! the same image with skopeo + umoci on the same machine, in the same run.
//!
//! ```text
//!  set-up   mmdebstrap (minbase + python3 ...) -> rootfs.tar (cached in
//!           /var/tmp/fastvm-bench-import) -> umoci raw add-layer (gzip) ->
//!           skopeo copy -> docker-registry on 127.0.0.1 (plain HTTP)
//!  floor    skopeo copy docker://... oci:<dir>  +  umoci unpack (as root)
//!  ours     Runtime::import_image: pull (cold layer cache), unpack, mkfs.ext4,
//!           qcow2, boot once, capture; then again with the layer cached
//! ```
//!
//! Also printed: the bench process's peak RSS (it holds the runtime, as the
//! server does) before and after the imports: the pull and unpack stream, so
//! the growth must not follow the image size.
//!
//! `cargo run --release -p fastvm-bench --bin bench-import` (root; needs
//! mmdebstrap, docker-registry, skopeo, umoci: `scripts/install-deps`).

#[path = "common.rs"]
mod common;

use common::{bench_config, init_tracing, Cleanup};
use fastvm_worker::Runtime;
use fastvm_worker_api::{ImageImport, ImportNote, MachineType};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CACHE: &str = "/var/tmp/fastvm-bench-import";
const PACKAGES: &str = "python3,curl,ca-certificates,procps,iproute2,less";

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{shown} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The image's root filesystem as one tar (built once, cached).
fn rootfs_tar() -> anyhow::Result<PathBuf> {
    let dir = PathBuf::from(CACHE);
    std::fs::create_dir_all(&dir)?;
    let tar = dir.join("rootfs.tar");
    if !tar.is_file() {
        eprintln!("building {} with mmdebstrap (once)...", tar.display());
        // mmdebstrap picks its output format by the extension: keep `.tar`.
        let tmp = dir.join("rootfs.tmp.tar");
        run(Command::new("mmdebstrap")
            .args([
                "--variant=minbase",
                &format!("--include={PACKAGES}"),
                "bookworm",
            ])
            .arg(&tmp))?;
        std::fs::rename(&tmp, &tar)?;
    }
    Ok(tar)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// docker-registry on a free loopback port; killed on drop.
struct Registry {
    child: std::process::Child,
    host: String,
    _dir: PathBuf,
}

impl Registry {
    fn start(dir: &Path) -> anyhow::Result<Registry> {
        let port = free_port()?;
        std::fs::create_dir_all(dir.join("storage"))?;
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("storage").display()
            ),
        )?;
        let child = Command::new("docker-registry")
            .args(["serve"])
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let host = format!("127.0.0.1:{port}");
        let start = Instant::now();
        while std::net::TcpStream::connect(&host).is_err() {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(20),
                "docker-registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Registry {
            child,
            host,
            _dir: dir.to_path_buf(),
        })
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn du_mib(path: &Path) -> f64 {
    std::fs::metadata(path)
        .map(|m| m.len() as f64 / 1048576.0)
        .unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let work = std::env::temp_dir().join(format!("fastvm-bench-import-{}", std::process::id()));
    let _work_cleanup = Cleanup(work.clone());
    std::fs::create_dir_all(&work)?;
    let tar = rootfs_tar()?;
    let registry = Registry::start(&work.join("registry"))?;
    let layout = work.join("layout");
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout))?;
    run(Command::new("umoci")
        .args(["new", "--image"])
        .arg(format!("{}:base", layout.display())))?;
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image"])
        .arg(format!("{}:base", layout.display()))
        .arg(&tar))?;
    let reference = format!("{}/bench/debian:1", registry.host);
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:base", layout.display()))
        .arg(format!("docker://{reference}")))?;
    let layer_mib = std::fs::read_dir(layout.join("blobs/sha256"))?
        .flatten()
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .max()
        .unwrap_or(0) as f64
        / 1048576.0;
    println!(
        "bench-import: image of {:.0} MiB unpacked (rootfs tar), one gzip layer of {layer_mib:.0} MiB, registry on loopback",
        du_mib(&tar)
    );

    // Floor: skopeo pull + umoci unpack.
    let floor_dir = work.join("floor");
    std::fs::create_dir_all(&floor_dir)?;
    let t0 = Instant::now();
    run(Command::new("skopeo")
        .args(["copy", "--quiet", "--src-tls-verify=false"])
        .arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:1", floor_dir.join("oci").display())))?;
    let pulled = t0.elapsed();
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:1", floor_dir.join("oci").display()))
        .arg(floor_dir.join("bundle")))?;
    let floor = t0.elapsed();
    let _ = std::fs::remove_dir_all(&floor_dir);

    // Ours: the worker's import, cold then warm layer cache.
    let (data, mut cfg) = bench_config("import");
    let _cleanup = Cleanup(data);
    cfg.insecure_registries = vec![registry.host.clone()];
    let rt = Runtime::open(cfg).await?;
    rt.image().await?;
    let machine = MachineType::lookup("c1m2").map_err(|e| anyhow::anyhow!("{e}"))?;
    let rss_before = peak_rss_mib();
    let mut results = Vec::new();
    for round in ["cold layer cache", "warm layer cache"] {
        let events: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
        let ev = events.clone();
        let sink: fastvm_worker_api::ImportSink = Arc::new(move |note| {
            if let ImportNote::Event { phase, status, .. } = note {
                if let Ok(mut e) = ev.lock() {
                    e.push((Instant::now(), format!("{phase} {status}")));
                }
            }
        });
        let id = uuid::Uuid::new_v4().to_string();
        let job = ImageImport {
            import_id: id.clone(),
            snapshot: id.parse()?,
            image: reference.clone(),
            platform: None,
            registry_username: None,
            registry_password: None,
            machine,
            disk_gib: 10,
        };
        let t = Instant::now();
        rt.import_image(&job, sink).await?;
        let took = t.elapsed();
        let phases: Vec<String> = events
            .lock()
            .map(|e| {
                e.iter()
                    .filter(|(_, s)| s.ends_with("completed"))
                    .map(|(at, s)| {
                        format!(
                            "{} @{:.1}s",
                            s.trim_end_matches(" completed"),
                            (*at - t).as_secs_f64()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        eprintln!(
            "{round}: {:.1} s ({})",
            took.as_secs_f64(),
            phases.join(", ")
        );
        // Pull + unpack: what the floor does (skopeo copy + umoci unpack).
        let unpacked = events
            .lock()
            .ok()
            .and_then(|e| {
                e.iter()
                    .find(|(_, s)| s == "export completed")
                    .map(|(at, _)| *at - t)
            })
            .unwrap_or_default();
        results.push((round, took, unpacked, phases));
        rt.delete_snapshot(&id).await?;
    }
    let rss_after = peak_rss_mib();
    println!(
        "{:<44} {:>10} {:>12} {:>8}",
        "figure", "ours", "floor", "ratio"
    );
    println!(
        "{:<44} {:>10} {:>12} {:>8}",
        "skopeo copy (pull only)",
        "",
        format!("{:.1} s", pulled.as_secs_f64()),
        ""
    );
    for (round, took, unpacked, phases) in &results {
        println!(
            "{:<44} {:>10} {:>12} {:>7.2}x",
            format!("pull + unpack ({round})"),
            format!("{:.1} s", unpacked.as_secs_f64()),
            format!("{:.1} s", floor.as_secs_f64()),
            unpacked.as_secs_f64() / floor.as_secs_f64()
        );
        println!(
            "{:<44} {:>10} {:>12} {:>7.2}x",
            format!("create -> snapshot ready ({round})"),
            format!("{:.1} s", took.as_secs_f64()),
            format!("{:.1} s", floor.as_secs_f64()),
            took.as_secs_f64() / floor.as_secs_f64()
        );
        println!("    phases: {}", phases.join(", "));
    }
    println!(
        "peak RSS of the process holding the runtime: {rss_before:.0} MiB before the imports, {rss_after:.0} MiB after ({:+.0} MiB for a {:.0} MiB image)",
        rss_after - rss_before,
        du_mib(&tar)
    );
    drop(registry);
    Ok(())
}
