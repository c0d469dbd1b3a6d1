//! bench-volumes: file I/O inside a guest on a volume (NFSv3 served by the
//! worker, crates/fastvm-worker/src/volumes) against the same I/O on the
//! VM's root disk (virtio-blk), in the same run.
//!
//! | figure (inside the guest)                 | floor (same run, same VM)         |
//! |-------------------------------------------|-----------------------------------|
//! | sequential write, 1 MiB blocks + fsync    | the same on the root disk         |
//! | sequential read, 1 MiB blocks, cold cache | the same on the root disk         |
//! | random 4 KiB reads, O_DIRECT (IOPS)       | the same on the root disk         |
//! | random 4 KiB writes, O_DIRECT+O_DSYNC     | the same on the root disk         |
//!
//! The guest runs a small Python program (fio is not in the image) on a
//! 64 MiB file; the guest's page cache is dropped before each read pass.
//! Each figure is the median of `RUNS` runs, volume and root disk
//! alternating.
//!
//! `cargo run --release -p fastvm-bench --bin bench-volumes -- [RUNS] [FILE_MIB]`
//! (default 3 runs, 64 MiB).

#[path = "common.rs"]
mod common;

use common::{bench_config, init_tracing, percentile, Cleanup};
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, Runtime};

const VOLUME: &str = "vol_bbbbbbbbbbbbbbbbbbbbbb";

/// The I/O program run in the guest: prints one JSON line of figures.
const PROGRAM: &str = r#"
import json, mmap, os, random, sys, time
d, mib = sys.argv[1], int(sys.argv[2])
os.makedirs(d, exist_ok=True)
path = os.path.join(d, "bench.dat")
block = os.urandom(1 << 20)
def drop():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f: f.write("3")
t = time.monotonic()
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
for _ in range(mib): os.write(fd, block)
os.fsync(fd); os.close(fd)
seq_w = mib / (time.monotonic() - t)
drop()
t = time.monotonic()
fd = os.open(path, os.O_RDONLY)
while os.read(fd, 1 << 20): pass
os.close(fd)
seq_r = mib / (time.monotonic() - t)
buf = mmap.mmap(-1, 4096)
pages = mib * 256
n = 500
drop()
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
t = time.monotonic()
for _ in range(n): os.preadv(fd, [buf], random.randrange(pages) * 4096)
rr = n / (time.monotonic() - t)
os.close(fd)
fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
t = time.monotonic()
for _ in range(n): os.pwritev(fd, [buf], random.randrange(pages) * 4096)
rw = n / (time.monotonic() - t)
os.close(fd)
os.unlink(path)
print(json.dumps({"seq_write_mibs": seq_w, "seq_read_mibs": seq_r, "rand_read_iops": rr, "rand_write_iops": rw}))
"#;

const FIGURES: [(&str, &str); 4] = [
    ("seq_write_mibs", "sequential write (MiB/s)"),
    ("seq_read_mibs", "sequential read, cold (MiB/s)"),
    ("rand_read_iops", "random 4 KiB read, O_DIRECT (IOPS)"),
    ("rand_write_iops", "random 4 KiB write, O_DSYNC (IOPS)"),
];

async fn measure(rt: &Runtime, vm: &str, dir: &str, mib: u64) -> anyhow::Result<serde_json::Value> {
    let cmd = format!("python3 -c \"$FASTVM_BENCH_PROGRAM\" {dir} {mib}");
    let mut req = ExecRequest::shell(&cmd);
    req.env
        .insert("FASTVM_BENCH_PROGRAM".into(), PROGRAM.to_owned());
    let out = rt.exec_buffered(vm, &req, 1 << 20).await?;
    anyhow::ensure!(
        out.exit_code == 0,
        "the I/O program failed in {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(3);
    let mib: u64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(64);
    let (data, cfg) = bench_config("volumes");
    let _cleanup = Cleanup(data);
    let rt = Runtime::open(cfg).await?;
    let vm = rt
        .create(CreateVm {
            machine: "c1m2".into(),
            ..Default::default()
        })
        .await?
        .id;
    rt.create_volume(VOLUME, (mib * 4) << 20, false)?;
    rt.attach_volume(&vm, VOLUME, "/mnt/bench", false).await?;
    let mut volume: Vec<serde_json::Value> = Vec::new();
    let mut root: Vec<serde_json::Value> = Vec::new();
    for run in 0..runs {
        volume.push(measure(&rt, &vm, "/mnt/bench", mib).await?);
        root.push(measure(&rt, &vm, "/root/bench", mib).await?);
        eprintln!("run {}: volume {} root {}", run + 1, volume[run], root[run]);
    }
    println!(
        "bench-volumes: {runs} runs, {mib} MiB file, c1m2 guest, medians (volume = NFSv3 from the worker; floor = the VM's root disk)"
    );
    println!(
        "{:<40} {:>10} {:>10} {:>8}",
        "figure", "volume", "root disk", "ratio"
    );
    for (key, label) in FIGURES {
        let mut v: Vec<f64> = volume.iter().filter_map(|j| j[key].as_f64()).collect();
        let mut r: Vec<f64> = root.iter().filter_map(|j| j[key].as_f64()).collect();
        let (v, r) = (percentile(&mut v, 0.5), percentile(&mut r, 0.5));
        println!("{label:<40} {v:>10.1} {r:>10.1} {:>7.2}x", v / r);
    }
    rt.detach_volume(&vm, VOLUME).await?;
    rt.delete(&vm).await?;
    rt.delete_volume(VOLUME).await?;
    Ok(())
}
