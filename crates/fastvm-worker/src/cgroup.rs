//! Resource limits of VM processes: one cgroup per QEMU, limits derived
//! from the machine type ([`Limits::for_vm`]).
//!
//! ```text
//!  cgroup v2 with memory, cpu, pids:  <cgroup2 mount>/fastvm.slice/vm-<id>/
//!      memory.max = guest RAM + overhead (+ guest RAM once more for restored
//!      VMs, see Limits::for_restored_vm), memory.swap.max = 0,
//!      cpu.max = "<vcpus x 100000> 100000", pids.max, io.weight and
//!      io.max (if io is there)
//!  else cgroup v1 (hybrid hosts):      <mount of ctrl>/<our own cgroup>/fastvm/vm-<id>/
//!      memory.limit_in_bytes, memory.memsw.limit_in_bytes (no swap when
//!      accounted), cpu.cfs_quota_us / cfs_period_us, pids.max, blkio.weight (if any,
//!      BFQ only), blkio.throttle.{read,write}_{bps,iops}_device
//!  else: no limits, one loud warning at start.
//! ```
//!
//! QEMU enters its cgroup between fork and exec (it writes `0` to the
//! `cgroup.procs` files the worker opened, see [`crate::jail::ChildSetup`]),
//! so none of its threads ever runs outside. The cgroup is named after the
//! VM id, so a restarted worker finds it again; it is removed when the VM's
//! process is gone. IO: a proportional weight of 100 per vCPU, and caps of
//! 200 MiB/s and 4000 operations/s per vCPU (read and write each) on the disk
//! that holds the data dir ([`IoDevice::of_dir`]); a data dir on no block
//! device (tmpfs, overlayfs, network storage) gets the weight only.

use crate::accel::Accel;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Host memory a QEMU process may use beyond guest RAM: heap, device and
/// I/O buffers (256 MiB), plus the TCG translation cache (`tb-size=128`).
pub fn overhead_mib(accel: Accel) -> u64 {
    match accel {
        Accel::Kvm => 256,
        Accel::Tcg => 256 + 128,
    }
}

/// CPU period of `cpu.max` / `cpu.cfs_period_us`.
pub const CPU_PERIOD_US: u64 = 100_000;

/// Disk bandwidth a VM may use per vCPU, each of read and write (bytes/s).
pub const IO_BPS_PER_VCPU: u64 = 200 << 20;
/// Disk operations a VM may issue per vCPU, each of read and write (per s).
pub const IO_IOPS_PER_VCPU: u64 = 4000;

/// The block device that holds the data dir (a whole disk: partitions are
/// throttled through their disk), the one VM disk I/O is throttled on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoDevice {
    pub major: u32,
    pub minor: u32,
}

impl IoDevice {
    /// The disk under `dir`; `None` when it is not on a block device the
    /// kernel names in /sys/dev/block (tmpfs, overlay, network filesystems).
    pub fn of_dir(dir: &Path) -> Option<IoDevice> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(dir).ok()?.dev();
        let sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(dev),
            libc::minor(dev)
        ));
        let sys = sys.canonicalize().ok()?;
        // A partition's sysfs directory sits inside its disk's.
        let disk = if sys.join("partition").exists() {
            sys.parent()?.to_path_buf()
        } else {
            sys
        };
        let text = std::fs::read_to_string(disk.join("dev")).ok()?;
        let (major, minor) = text.trim().split_once(':')?;
        Some(IoDevice {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

/// The limits of one VM process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub memory_max: u64,
    pub cpu_quota_us: u64,
    pub pids_max: u64,
    pub io_weight: u64,
    /// Read and write bandwidth caps, each (bytes/s).
    pub io_bps: u64,
    /// Read and write operation caps, each (per s).
    pub io_iops: u64,
    /// Where `io_bps`/`io_iops` apply; no throttle without it.
    pub io_device: Option<IoDevice>,
}

impl Limits {
    pub fn for_vm(vcpus: u32, memory_mib: u32, accel: Accel) -> Limits {
        Limits {
            memory_max: (u64::from(memory_mib) + overhead_mib(accel)) << 20,
            cpu_quota_us: u64::from(vcpus) * CPU_PERIOD_US,
            // Main loop, vCPU threads, RCU, migration, and QEMU's block I/O
            // thread pool (up to 64 workers).
            pids_max: 128 + u64::from(vcpus),
            io_weight: (100 * u64::from(vcpus)).clamp(1, 10_000),
            io_bps: IO_BPS_PER_VCPU * u64::from(vcpus.max(1)),
            io_iops: IO_IOPS_PER_VCPU * u64::from(vcpus.max(1)),
            io_device: None,
        }
    }

    /// The limits of a VM restored onto a sealed copy of a RAM image (every
    /// launch but a golden build): guest RAM counts twice. The guest's first
    /// write to a page that is a hole in the image (zero when captured)
    /// makes the kernel allocate a zero page in the shared memfd before
    /// copying it into the VM's private page (private mappings of shmem
    /// fault through the file; `qemu.rs`, `SealedRamCache`), and the memory
    /// cgroup charges both to the VM that touched the offset first. Those
    /// zero pages are shared with every VM on the copy and bounded by the
    /// RAM size; without room for them a guest using most of its RAM is
    /// killed by its cgroup (seen: a c1m2 guest holding a 1 GiB file in its
    /// page cache).
    pub fn for_restored_vm(vcpus: u32, memory_mib: u32, accel: Accel) -> Limits {
        let mut l = Limits::for_vm(vcpus, memory_mib, accel);
        l.memory_max += u64::from(memory_mib) << 20;
        l
    }
}

/// Where VM cgroups are created on this host.
#[derive(Debug, Clone)]
pub enum Cgroups {
    V2 {
        parent: PathBuf,
        io: bool,
    },
    /// (controller, parent dir) per v1 hierarchy.
    V1 {
        parents: Vec<(&'static str, PathBuf)>,
    },
    Off {
        reason: String,
    },
}

const V2_NEEDED: [&str; 3] = ["memory", "cpu", "pids"];
const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "blkio"];

/// Write a control file (never created: a missing file is `NotFound`).
fn write(path: &Path, value: &str) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("write {value:?} to {}: {e}", path.display()),
            )
        })
}

/// (mount point, fstype, super options) of every cgroup mount.
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mnt = left.split_whitespace().nth(4)?;
            let mut r = right.split_whitespace();
            let fstype = r.next()?;
            let opts = r.nth(1).unwrap_or("");
            fstype
                .starts_with("cgroup")
                .then(|| (PathBuf::from(mnt), fstype.to_owned(), opts.to_owned()))
        })
        .collect()
}

impl Cgroups {
    /// Find or create the parent cgroup(s), enabling controllers; logs a
    /// loud warning and returns `Off` when this host cannot limit VMs.
    pub fn setup() -> Cgroups {
        let mut why = Vec::new();
        match Self::setup_v2() {
            Ok(c) => return c,
            Err(e) => why.push(format!("cgroup v2: {e}")),
        }
        match Self::setup_v1() {
            Ok(c) => {
                tracing::warn!(reason = %why.join("; "), "VM resource limits use cgroup v1 (no usable cgroup v2 controllers)");
                return c;
            }
            Err(e) => why.push(format!("cgroup v1: {e}")),
        }
        let reason = why.join("; ");
        tracing::error!(%reason, "VM PROCESSES RUN WITHOUT RESOURCE LIMITS: no usable cgroup controllers on this host");
        Cgroups::Off { reason }
    }

    fn setup_v2() -> std::io::Result<Cgroups> {
        let root = cgroup_mounts()
            .into_iter()
            .find(|(_, t, _)| t == "cgroup2")
            .map(|(m, _, _)| m)
            .ok_or_else(|| std::io::Error::other("not mounted"))?;
        let available = std::fs::read_to_string(root.join("cgroup.controllers"))?;
        let have = |c: &str| available.split_whitespace().any(|x| x == c);
        if let Some(missing) = V2_NEEDED.iter().find(|c| !have(c)) {
            return Err(std::io::Error::other(format!(
                "controller {missing} not available at {} (has: {})",
                root.display(),
                available.trim()
            )));
        }
        let io = have("io");
        let enable: String = V2_NEEDED
            .iter()
            .chain(io.then_some(&"io"))
            .map(|c| format!("+{c} "))
            .collect();
        let enable = enable.trim();
        write(&root.join("cgroup.subtree_control"), enable)?;
        let parent = root.join("fastvm.slice");
        std::fs::create_dir_all(&parent)?;
        write(&parent.join("cgroup.subtree_control"), enable)?;
        Ok(Cgroups::V2 { parent, io })
    }

    fn setup_v1() -> std::io::Result<Cgroups> {
        let mounts = cgroup_mounts();
        let own = std::fs::read_to_string("/proc/self/cgroup")?;
        let mut parents = Vec::new();
        for ctrl in V1_CONTROLLERS {
            let Some((mnt, _, _)) = mounts
                .iter()
                .find(|(_, t, o)| t == "cgroup" && o.split(',').any(|x| x == ctrl))
            else {
                if ctrl == "blkio" {
                    continue;
                }
                return Err(std::io::Error::other(format!(
                    "no {ctrl} hierarchy mounted"
                )));
            };
            // Our own cgroup in that hierarchy ("4:memory:/a/b"): VM cgroups nest below it.
            let own_path = own
                .lines()
                .filter_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    parts.nth(1).zip(parts.next())
                })
                .find(|(ctrls, _)| ctrls.split(',').any(|c| c == ctrl))
                .map(|(_, p)| p.trim_start_matches('/').to_owned())
                .unwrap_or_default();
            let parent = mnt.join(own_path).join("fastvm");
            std::fs::create_dir_all(&parent)?;
            parents.push((ctrl, parent));
        }
        Ok(Cgroups::V1 { parents })
    }

    /// The cgroup directories of VM `id`.
    pub fn dirs(&self, id: &str) -> Vec<PathBuf> {
        let name = format!("vm-{id}");
        match self {
            Cgroups::V2 { parent, .. } => vec![parent.join(name)],
            Cgroups::V1 { parents } => parents.iter().map(|(_, p)| p.join(&name)).collect(),
            Cgroups::Off { .. } => Vec::new(),
        }
    }

    /// Create the cgroup(s) of VM `id` with `limits`; returns the
    /// `cgroup.procs` files (opened for writing) the process joins.
    pub fn create(&self, id: &str, limits: &Limits) -> std::io::Result<Vec<OwnedFd>> {
        let name = format!("vm-{id}");
        let mut procs = Vec::new();
        let open = |dir: &Path| -> std::io::Result<OwnedFd> {
            Ok(std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))?
                .into())
        };
        match self {
            Cgroups::V2 { parent, io } => {
                let dir = parent.join(&name);
                std::fs::create_dir_all(&dir)?;
                write(&dir.join("memory.max"), &limits.memory_max.to_string())?;
                write(&dir.join("memory.swap.max"), "0").or_else(ignore_missing)?;
                write(
                    &dir.join("cpu.max"),
                    &format!("{} {CPU_PERIOD_US}", limits.cpu_quota_us),
                )?;
                write(&dir.join("pids.max"), &limits.pids_max.to_string())?;
                if *io {
                    write(
                        &dir.join("io.weight"),
                        &format!("default {}", limits.io_weight),
                    )
                    .or_else(ignore_missing)?;
                    if let Some(d) = limits.io_device {
                        let line = format!(
                            "{}:{} rbps={} wbps={} riops={} wiops={}",
                            d.major,
                            d.minor,
                            limits.io_bps,
                            limits.io_bps,
                            limits.io_iops,
                            limits.io_iops
                        );
                        write(&dir.join("io.max"), &line).or_else(ignore_missing)?;
                    }
                }
                procs.push(open(&dir)?);
            }
            Cgroups::V1 { parents } => {
                for (ctrl, parent) in parents {
                    let dir = parent.join(&name);
                    std::fs::create_dir_all(&dir)?;
                    match *ctrl {
                        "memory" => {
                            let max = limits.memory_max.to_string();
                            write(&dir.join("memory.limit_in_bytes"), &max)?;
                            // Present only with swap accounting.
                            write(&dir.join("memory.memsw.limit_in_bytes"), &max)
                                .or_else(ignore_missing)?;
                        }
                        "cpu" => {
                            write(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
                            write(
                                &dir.join("cpu.cfs_quota_us"),
                                &limits.cpu_quota_us.to_string(),
                            )?;
                        }
                        "pids" => write(&dir.join("pids.max"), &limits.pids_max.to_string())?,
                        "blkio" => {
                            // Only with a proportional I/O scheduler (BFQ); else absent.
                            let w = limits.io_weight.clamp(10, 1000).to_string();
                            write(&dir.join("blkio.weight"), &w).or_else(ignore_missing)?;
                            // Throttling works with any scheduler.
                            if let Some(d) = limits.io_device {
                                for (file, v) in [
                                    ("blkio.throttle.read_bps_device", limits.io_bps),
                                    ("blkio.throttle.write_bps_device", limits.io_bps),
                                    ("blkio.throttle.read_iops_device", limits.io_iops),
                                    ("blkio.throttle.write_iops_device", limits.io_iops),
                                ] {
                                    write(&dir.join(file), &format!("{}:{} {v}", d.major, d.minor))
                                        .or_else(ignore_missing)?;
                                }
                            }
                        }
                        _ => {}
                    }
                    procs.push(open(&dir)?);
                }
            }
            Cgroups::Off { .. } => {}
        }
        Ok(procs)
    }

    /// Remove the cgroup(s) of VM `id` (its process must be gone); retries
    /// for a while as the kernel frees an exited process's cgroup lazily.
    pub async fn remove(&self, id: &str) {
        for dir in self.dirs(id) {
            for attempt in 0..100 {
                match std::fs::remove_dir(&dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) if attempt == 99 => {
                        tracing::warn!(dir = %dir.display(), error = %e, "VM cgroup not removed");
                    }
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
                }
            }
        }
    }
}

fn ignore_missing(e: std::io::Error) -> std::io::Result<()> {
    if e.kind() == std::io::ErrorKind::NotFound {
        Ok(())
    } else {
        Err(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_follow_the_machine_type() {
        let l = Limits::for_vm(2, 4096, Accel::Tcg);
        assert_eq!(l.memory_max, (4096 + 384) << 20);
        assert_eq!(l.cpu_quota_us, 200_000);
        assert_eq!(l.pids_max, 130);
        assert_eq!(l.io_weight, 200);
        assert_eq!(l.io_bps, 2 * IO_BPS_PER_VCPU);
        assert_eq!(l.io_iops, 2 * IO_IOPS_PER_VCPU);
        assert_eq!(
            Limits::for_vm(1, 2048, Accel::Kvm).memory_max,
            (2048 + 256) << 20
        );
        // Restored VMs: room for the zero pages their faults add to the copy.
        let r = Limits::for_restored_vm(2, 4096, Accel::Tcg);
        assert_eq!(r.memory_max, (2 * 4096 + 384) << 20);
        assert_eq!(r.cpu_quota_us, l.cpu_quota_us);
    }

    #[test]
    fn the_disk_of_a_dir_is_found() {
        // The root filesystem of a machine is usually on a disk; a tmpfs never is.
        if let Some(d) = IoDevice::of_dir(Path::new("/")) {
            let sys = format!("/sys/dev/block/{}:{}", d.major, d.minor);
            assert!(Path::new(&sys).exists(), "{sys}");
            assert!(
                !Path::new(&sys).join("partition").exists(),
                "{sys} is a partition"
            );
        }
        assert_eq!(IoDevice::of_dir(Path::new("/dev/shm")), None);
    }

    #[test]
    fn dirs_are_named_after_the_vm() {
        let c = Cgroups::V1 {
            parents: vec![("memory", "/m/fastvm".into()), ("pids", "/p/fastvm".into())],
        };
        assert_eq!(
            c.dirs("x"),
            vec![
                PathBuf::from("/m/fastvm/vm-x"),
                PathBuf::from("/p/fastvm/vm-x")
            ]
        );
        assert!(Cgroups::Off {
            reason: String::new()
        }
        .dirs("x")
        .is_empty());
    }
}
