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
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
