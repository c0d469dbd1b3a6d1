//! Helpers shared by the bench binaries that include it
//! (`#[path = "common.rs"] mod common;`).

use std::path::PathBuf;
use std::time::Duration;

/// Kills the QEMUs of a bench data dir (by their pidfiles) and removes it.
pub struct Cleanup(pub PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.0.join("vms")) {
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
        fastvm_worker::net::remove_owned_by(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `p` quantile (0..=1) of `v` (sorted in place).
#[allow(dead_code)] // Not every bench binary that includes this module calls it.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

#[allow(dead_code)] // Not every bench binary that includes this module calls it.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Log to stderr at `RUST_LOG` (default `warn`).
#[allow(dead_code)] // Not every bench binary that includes this module calls it.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
}

/// A runtime config on a fresh data dir `<tmp>/fastvm-bench-<name>-<pid>`
/// (to be removed by [`Cleanup`]) using the shared guest image cache
/// (`FASTVM_TEST_IMAGES`, default `/var/tmp/fastvm-test-images`).
#[allow(dead_code)] // Not every bench binary that includes this module calls it.
pub fn bench_config(name: &str) -> (PathBuf, fastvm_worker::RuntimeConfig) {
    let data = std::env::temp_dir().join(format!("fastvm-bench-{name}-{}", std::process::id()));
    let mut cfg = fastvm_worker::RuntimeConfig::new(&data);
    cfg.image_dir = Some(
        std::env::var_os("FASTVM_TEST_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into()),
    );
    (data, cfg)
}

/// A field of `/proc/<pid>/smaps_rollup` (e.g. `"Pss:"`) in MiB.
#[allow(dead_code)] // Not every bench binary that includes this module calls it.
pub fn rollup_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
}

/// A field of the host's `/proc/meminfo` (e.g. `MemAvailable`, `Shmem`), MiB;
/// 0 when it cannot be read.
#[allow(dead_code)] // Not every bench binary that includes this module calls it.
pub fn meminfo_mib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
