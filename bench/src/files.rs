//! bench-files: 1 GiB upload and download through the whole file-transfer
//! path (`fastvm cp` -> HTTP -> staging store -> agent channel -> guest disk,
//! and back), beside the raw floor measured in the same run: the same bytes
//! through the same guest channel without HTTP or staging (worker-level exec
//! with stdin `cat > file` for upload, exec stdout of `cat file` for download).
//! Also the peak RSS of the client (`fastvm cp`) and of the server (this
//! process, which embeds it: an upper bound) sampled every 50 ms.
//!
//! `cargo run --release -p fastvm-bench --bin bench-files -- [RUNS] [MIB]`
//! (needs `target/release/fastvm`, or FASTVM_BIN).

use fastvm_server::worker::ByteStream;
use fastvm_server::ServerConfig;
use fastvm_worker::{ExecEvent, ExecRequest};
use futures::StreamExt;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.0.join("data/vms")) {
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
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Samples the RSS of `pids` every 50 ms until stopped; returns the peaks (KiB).
struct RssSampler {
    stop: Arc<AtomicBool>,
    peaks: Vec<Arc<AtomicU64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peaks: Vec<_> = pids.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
        let (s, p) = (stop.clone(), peaks.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                for (pid, peak) in pids.iter().zip(&p) {
                    peak.fetch_max(rss_kib(*pid), Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        RssSampler {
            stop,
            peaks,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peaks
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .collect()
    }
}

fn write_random_file(path: &Path, bytes: u64) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = bytes;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            // xorshift64: incompressible, fast.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

fn file_stream(path: &Path) -> anyhow::Result<ByteStream> {
    let file = std::fs::File::open(path)?;
    let file = tokio::fs::File::from_std(file);
    Ok(Box::pin(tokio_util_like(file)))
}

fn tokio_util_like(
    file: tokio::fs::File,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 256 << 10];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}

async fn drain_exit(mut events: fastvm_server::worker::ExecEvents) -> anyhow::Result<u64> {
    let mut stdout = 0u64;
    while let Some(ev) = events.next().await {
        match ev? {
            ExecEvent::Stdout(d) => stdout += d.len() as u64,
            ExecEvent::Stderr(d) => eprint!("{}", String::from_utf8_lossy(&d)),
            ExecEvent::Exit(s) if s.code == 0 => return Ok(stdout),
            ExecEvent::Exit(s) => anyhow::bail!("guest command exited {}", s.code),
        }
    }
    anyhow::bail!("exec ended without exit")
}

/// Run `fastvm cp` and sample its RSS and ours; returns (seconds, client peak KiB, server peak KiB).
fn cp(bin: &Path, base: &str, key: &str, src: &str, dst: &str) -> anyhow::Result<(f64, u64, u64)> {
    let start = Instant::now();
    let mut child = std::process::Command::new(bin)
        .args(["cp", "-q", src, dst])
        .env("FASTVM_BASE_URL", base)
        .env("FASTVM_API_KEY", key)
        .stdout(Stdio::null())
        .spawn()?;
    let sampler = RssSampler::start(vec![child.id(), std::process::id()]);
    let status = child.wait()?;
    let secs = start.elapsed().as_secs_f64();
    let peaks = sampler.finish();
    anyhow::ensure!(status.success(), "fastvm cp {src} {dst} failed");
    Ok((secs, peaks[0], peaks[1]))
}

fn p50(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let mib: u64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;
    let bin = std::env::var_os("FASTVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/fastvm")
        });
    anyhow::ensure!(
        bin.is_file(),
        "{} missing: cargo build --release -p fastvm-cli (or set FASTVM_BIN)",
        bin.display()
    );
    let root = std::env::temp_dir().join(format!("fastvm-bench-files-{}", std::process::id()));
    let _cleanup = Cleanup(root.clone());
    std::fs::create_dir_all(&root)?;
    let data = root.join("data");
    let mut cfg = ServerConfig::new(&data);
    cfg.runtime.image_dir = Some(
        std::env::var_os("FASTVM_TEST_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into()),
    );
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.launch_wait = Duration::from_secs(600);
    let server = fastvm_server::start(cfg).await?;
    let key = std::fs::read_to_string(data.join("admin-api-key"))?
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let vm: Value = http
        .post(format!("{}/v1/vms", server.url()))
        .bearer_auth(&key)
        .json(&json!({"machineType": "c1m2"}))
        .send()
        .await?
        .json()
        .await?;
    let vm_id: fastvm_types::VmId = vm["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("launch failed: {vm}"))?
        .parse()?;
    let worker = server
        .state()
        .local_worker()
        .expect("embedded worker")
        .clone();

    let local = root.join("payload.bin");
    write_random_file(&local, size)?;
    let back = root.join("back.bin");
    let (mut fu, mut fd, mut ou, mut od) = (vec![], vec![], vec![], vec![]);
    let (mut client_peak, mut server_peak) = (0u64, 0u64);
    let base_rss = rss_kib(std::process::id());
    for run in 0..runs {
        // Floor: the same bytes through the same channel, no HTTP, no staging.
        let t = Instant::now();
        let up = ExecRequest::argv(["sh", "-c", "cat > /root/floor.bin"]);
        drain_exit(
            worker
                .exec_with_input(vm_id, up, file_stream(&local)?)
                .await?,
        )
        .await?;
        fu.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        let n = drain_exit(
            worker
                .exec(vm_id, ExecRequest::argv(["cat", "/root/floor.bin"]))
                .await?,
        )
        .await?;
        fd.push(t.elapsed().as_secs_f64());
        anyhow::ensure!(n == size, "floor download got {n} bytes");
        drain_exit(
            worker
                .exec(vm_id, ExecRequest::argv(["rm", "-f", "/root/floor.bin"]))
                .await?,
        )
        .await?;

        // Ours: fastvm cp both ways.
        let (secs, c, s) = cp(
            &bin,
            &server.url(),
            &key,
            &local.to_string_lossy(),
            &format!("{vm_id}:/root/up.bin"),
        )?;
        ou.push(secs);
        client_peak = client_peak.max(c);
        server_peak = server_peak.max(s);
        let (secs, c, s) = cp(
            &bin,
            &server.url(),
            &key,
            &format!("{vm_id}:/root/up.bin"),
            &back.to_string_lossy(),
        )?;
        od.push(secs);
        client_peak = client_peak.max(c);
        server_peak = server_peak.max(s);
        anyhow::ensure!(
            std::fs::metadata(&back)?.len() == size,
            "download size differs"
        );
        drain_exit(
            worker
                .exec(vm_id, ExecRequest::argv(["rm", "-f", "/root/up.bin"]))
                .await?,
        )
        .await?;
        std::fs::remove_file(&back)?;
        eprintln!(
            "run {run}: floor up {:.1} MB/s down {:.1} MB/s; cp up {:.1} MB/s down {:.1} MB/s",
            mbps(size, fu[run]),
            mbps(size, fd[run]),
            mbps(size, ou[run]),
            mbps(size, od[run])
        );
    }
    let (fu, fd, ou, od) = (
        mbps(size, p50(fu)),
        mbps(size, p50(fd)),
        mbps(size, p50(ou)),
        mbps(size, p50(od)),
    );
    println!("bench-files: {mib} MiB, {runs} run(s), p50");
    println!(
        "  upload    fastvm cp {ou:8.1} MB/s   floor (exec stdin cat) {fu:8.1} MB/s   ratio {:.2}",
        ou / fu
    );
    println!(
        "  download  fastvm cp {od:8.1} MB/s   floor (exec stdout cat) {fd:8.1} MB/s   ratio {:.2}",
        od / fd
    );
    println!("  peak RSS  client (fastvm cp) {:.1} MiB   server (bench process embedding it) {:.1} MiB (before transfers {:.1} MiB)", client_peak as f64 / 1024.0, server_peak as f64 / 1024.0, base_rss as f64 / 1024.0);
    let _ = http
        .delete(format!("{}/v1/vms/{vm_id}", server.url()))
        .bearer_auth(&key)
        .send()
        .await;
    server.stop().await?;
    Ok(())
}
