//! The QEMU `microvm` driver.
//!
//! One `qemu-system-x86_64 -M microvm` process per VM, confined (see
//! [`crate::jail`] and [`crate::cgroup`]): its own uid, no capabilities,
//! `-sandbox` seccomp ([`SANDBOX`]: no fork, so no `-daemonize` and no
//! `exec:` migration), its own cgroup. It is spawned in its own session and
//! outlives the worker (re-parented to init). Devices: a virtio-blk root
//! disk (qcow2 overlay), a virtio-serial port `fastvm.agent` on a
//! unix-socket chardev (the agent channel), virtio-rng, the serial console
//! into a ring buffer (drained into the capped `console.log`, see
//! [`crate::console::CappedLog`]), and QMP. Both sockets are bound by the
//! worker at `agent.sock`/`qmp.sock` and inherited by QEMU as fds.
//!
//! State moves through fds and sockets, never a shell: a restore reads the
//! memory file from an inherited fd (`migrate-incoming fd:6`); a capture
//! migrates to `unix:<vm dir>/migrate.sock`, where the worker writes the
//! stream to the snapshot's memory file.

use crate::accel::Accel;
use crate::cgroup::{Cgroups, Limits};
use crate::error::{Error, IoContext, Result};
use crate::hypervisor::{Hypervisor, LaunchSpec, RamCapture, VmPaths, VmProcess};
use crate::jail::{self, ChildSetup, FD_AGENT, FD_INCOMING, FD_QMP, FD_RAM, FD_TAP};
use crate::migstream;
use crate::qmp::Qmp;
use async_trait::async_trait;
use serde_json::json;
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Kernel command line of every guest. `quiet` keeps the (slow, emulated)
/// serial console short; the agent logs its own lines at error level.
///
/// The rest keeps an idle guest asleep (each guest wakeup costs host CPU,
/// under TCG ~40 µs of emulation; see "Idle cost" in docs/ARCHITECTURE.md):
/// `nowatchdog` drops the soft-lockup detector's 4 s hrtimer;
/// `vm.compaction_proactiveness=0` stops kcompactd waking every 500 ms to
/// check fragmentation (compaction on demand still runs);
/// `vm.stat_interval=10` folds the per-CPU VM statistics every 10 s instead
/// of every second. Measured together on an idle guest: vCPU wakeups 6.0/s
/// -> 0.8/s, QEMU CPU 0.30 % -> 0.06 % of a core.
pub const KERNEL_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet rw fastvm.root=/dev/vda i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd nowatchdog sysctl.vm.compaction_proactiveness=0 sysctl.vm.stat_interval=10";

/// The command line for `accel`. Under TCG the guest TSC ticks at the host
/// TSC rate, but the kernel cannot calibrate it (no HPET/PM timer on
/// microvm) and, on a loaded host, then hangs in early boot waiting for
/// timer ticks. Telling it the frequency (`tsc_early_khz`) skips every
/// calibration loop; the local APIC timer is then calibrated against the
/// TSC too, so the machine needs no PIT ([`pit_needed`]), and
/// `no_timer_check` skips the boot check that IRQ 0 (the PIT) ticks.
pub fn kernel_cmdline(accel: Accel) -> String {
    match (accel, host_tsc_khz()) {
        (Accel::Tcg, Some(khz)) => {
            format!("{KERNEL_CMDLINE} tsc_early_khz={khz} tsc=reliable no_timer_check")
        }
        _ => KERNEL_CMDLINE.to_owned(),
    }
}

/// Whether a new VM under `accel` gets the i8254 PIT. Under TCG with a known
/// TSC frequency the guest never uses it (TSC clocksource, local APIC timer
/// calibrated against the TSC); QEMU would still run its reset-state 18.2 Hz
/// square wave, a main-loop wakeup every 27 ms (measured: main thread 0.40 %
/// -> 0.06 % of a core without it). Under KVM the PIT is kept: untested
/// here (no usable KVM), see docs/ARCHITECTURE.md for why it should go too.
pub fn pit_needed(accel: Accel) -> bool {
    !(accel == Accel::Tcg && host_tsc_khz().is_some())
}

/// The `-M` argument of a VM.
fn machine_arg(pit: bool) -> &'static str {
    if pit {
        "microvm"
    } else {
        "microvm,pit=off"
    }
}

/// A short tag of what a fresh boot under `accel` makes of the guest beyond
/// image and machine type: the machine options and the kernel command line
/// (the measured TSC frequency left out: it varies by a few kHz between
/// measurements and a restored guest does not depend on it). Part of the
/// golden snapshot key, so a change of either builds new golden snapshots.
pub fn guest_abi_tag(accel: Accel) -> String {
    use sha2::Digest;
    let cmdline: Vec<String> = kernel_cmdline(accel)
        .split(' ')
        .map(|w| match w.split_once('=') {
            Some(("tsc_early_khz", _)) => "tsc_early_khz=*".to_owned(),
            _ => w.to_owned(),
        })
        .collect();
    let abi = format!("{} {}", machine_arg(pit_needed(accel)), cmdline.join(" "));
    let hash = sha2::Sha256::digest(abi.as_bytes());
    hash.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

/// The host TSC frequency, measured once against CLOCK_MONOTONIC_RAW.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    let now = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into a valid timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_RAW, &mut ts) };
        ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
    };
    // SAFETY: rdtsc has no preconditions on x86_64.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() } as u128;
    let (t0, c0) = (now(), tsc());
    std::thread::sleep(Duration::from_millis(100));
    let (t1, c1) = (now(), tsc());
    let ns = t1.checked_sub(t0)?;
    let khz = (c1.checked_sub(c0)? * 1_000_000 / ns.max(1)) as u64;
    tracing::info!(tsc_khz = khz, "measured host TSC frequency");
    (khz > 100_000).then_some(khz)
}

#[cfg(not(target_arch = "x86_64"))]
fn measure_tsc_khz() -> Option<u64> {
    None
}

/// Sealed memfd copies of RAM files (golden RAM images and the RAM files
/// of user snapshots) handed to restored VMs. Each costs its RAM's data
/// bytes in shared memory when made, and grows afterwards: a fault on one
/// of its holes through a VM's private mapping (the guest's first write to
/// a page, or QEMU reading every page during a capture) makes shmem
/// allocate a zero page there, which the seals keep until the copy is
/// dropped. Past [`SealedRamCache::budget`], counted with that growth
/// ([`SealedRam::resident`]), the least recently used go (VMs that mapped
/// one keep their mapping: the next restore makes a new, lean copy).
struct SealedRamCache {
    entries: HashMap<PathBuf, Slot>,
    budget: u64,
    clock: u64,
}

/// One RAM file's copy; its own lock makes first uses single-flight
/// without holding up restores of other files.
#[derive(Default)]
struct Slot {
    used: u64,
    copy: Arc<Mutex<Option<SealedRam>>>,
}

struct SealedRam {
    /// The file when copied: a changed file is copied again.
    stamp: FileStamp,
    fd: Arc<OwnedFd>,
    /// The memfd as `/proc/<pid>/maps` names it (captures find its mappings).
    memfd: crate::ram_capture::FileIdentity,
    /// Shared memory the copy held when made (the file's data extents).
    bytes: u64,
}

impl SealedRam {
    /// Shared memory the copy holds now: its data plus the zero pages that
    /// faults on its holes have allocated since it was made.
    fn resident(&self) -> u64 {
        allocated_bytes(&self.fd).unwrap_or(self.bytes)
    }
}

/// A sealed copy as a restore gets it: the fd to pass, and which file it is
/// a copy of and under which identity QEMU will map it ([`RestoredFrom`]).
struct SealedRamFd {
    fd: Arc<OwnedFd>,
    base: FileStamp,
    memfd: crate::ram_capture::FileIdentity,
}

/// Bytes a file descriptor's file has allocated (`st_blocks`).
fn allocated_bytes(fd: &OwnedFd) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let file = std::fs::File::from(fd.try_clone().ok()?);
    file.metadata().ok().map(|m| m.blocks() * 512)
}

/// A quarter of the host's memory (4 GiB when unknown).
fn default_sealed_budget() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(4 << 30, |kb| kb * 1024 / 4)
}

impl SealedRamCache {
    /// The sealed memfd copy of RAM file `path` (made on first use, again
    /// when the file changed; concurrent first uses make one copy).
    fn get(cache: &Mutex<SealedRamCache>, path: &Path) -> Result<SealedRamFd> {
        fn poisoned<T>(_: T) -> Error {
            Error::Qemu("sealed RAM cache poisoned".into())
        }
        let meta = std::fs::metadata(path).ctx(|| format!("stat {}", path.display()))?;
        let stamp = FileStamp::of(&meta);
        let slot = {
            let mut c = cache.lock().map_err(poisoned)?;
            c.clock += 1;
            let now = c.clock;
            let slot = c.entries.entry(path.to_owned()).or_default();
            slot.used = now;
            slot.copy.clone()
        };
        let mut copy = slot.lock().map_err(poisoned)?;
        let sealed = match copy.as_ref().filter(|e| e.stamp == stamp) {
            Some(e) => SealedRamFd {
                fd: e.fd.clone(),
                base: e.stamp,
                memfd: e.memfd,
            },
            None => {
                let t0 = std::time::Instant::now();
                let fd = Arc::new(
                    jail::sealed_copy(path)
                        .ctx(|| format!("copy {} into a sealed memfd", path.display()))?,
                );
                let meta =
                    std::fs::File::from(fd.try_clone().ctx(|| "dup the sealed copy".into())?)
                        .metadata()
                        .ctx(|| "stat the sealed copy".into())?;
                let bytes = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
                let memfd = crate::ram_capture::FileIdentity::of(&meta);
                tracing::info!(ram = %path.display(), ms = t0.elapsed().as_millis() as u64, mib = bytes >> 20, "sealed copy of a RAM file made");
                *copy = Some(SealedRam {
                    stamp,
                    fd: fd.clone(),
                    memfd,
                    bytes,
                });
                SealedRamFd {
                    fd,
                    base: stamp,
                    memfd,
                }
            }
        };
        drop(copy);
        let mut c = cache.lock().map_err(poisoned)?;
        // Deleted while it was copied (`forget_ram` came first): keep nothing.
        if !path.exists() {
            c.entries.remove(path);
        }
        // On every use, not only when a copy is made: copies grow while
        // they are mapped (see above).
        c.evict_over_budget(path);
        Ok(sealed)
    }

    /// Drop the least recently used copies (never `keep`) until what they
    /// hold now fits the budget. Copies being made count as nothing.
    fn evict_over_budget(&mut self, keep: &Path) {
        let bytes = |s: &Slot| {
            s.copy
                .try_lock()
                .ok()
                .and_then(|c| c.as_ref().map(SealedRam::resident))
                .unwrap_or(0)
        };
        let mut total: u64 = self.entries.values().map(bytes).sum();
        while total > self.budget {
            let oldest = self
                .entries
                .iter()
                .filter(|(p, s)| p.as_path() != keep && bytes(s) > 0)
                .min_by_key(|(_, s)| s.used)
                .map(|(p, _)| p.clone());
            let Some(p) = oldest else { return };
            if let Some(s) = self.entries.remove(&p) {
                let held = bytes(&s);
                tracing::info!(ram = %p.display(), mib = held >> 20, "sealed RAM copy dropped (over budget)");
                total = total.saturating_sub(held);
            }
        }
    }
}

/// The QEMU driver. Holds the host's cgroup setup and the sealed copies of
/// RAM files handed to restored VMs (see [`crate::jail`]).
pub struct QemuMicrovm {
    pub binary: PathBuf,
    cgroups: Arc<Cgroups>,
    /// The disk VM I/O is throttled on (see [`crate::cgroup::Limits`]).
    io_device: Option<crate::cgroup::IoDevice>,
    sealed_ram: Arc<Mutex<SealedRamCache>>,
}

impl QemuMicrovm {
    pub fn new(binary: PathBuf, cgroups: Cgroups) -> Self {
        QemuMicrovm {
            binary,
            cgroups: Arc::new(cgroups),
            io_device: None,
            sealed_ram: Arc::new(Mutex::new(SealedRamCache {
                entries: HashMap::new(),
                budget: default_sealed_budget(),
                clock: 0,
            })),
        }
    }

    /// Throttle VM disk I/O on `device` (the disk of the data dir).
    pub fn with_io_device(mut self, device: Option<crate::cgroup::IoDevice>) -> Self {
        self.io_device = device;
        self
    }
}

/// The process name QEMU is given, used to recognise our VMs' processes.
fn process_name(id: &str) -> String {
    format!("fastvm-{id}")
}

/// The seccomp filter of every confined QEMU.
pub const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Size of the in-QEMU ring buffer of the serial console (a power of two).
pub const CONSOLE_RING: usize = 1 << 20;

impl QemuMicrovm {
    /// Machine, kernel, disk and devices: the part every command line shares.
    fn base_args(spec: &LaunchSpec) -> Vec<String> {
        let p = |x: &Path| x.to_string_lossy().into_owned();
        let (accel, cpu) = match spec.accel {
            Accel::Kvm => ("kvm", "host,arch-capabilities=off"),
            // A bounded translation cache keeps per-VM host memory in check.
            Accel::Tcg => ("tcg,thread=multi,tb-size=128", "max"),
        };
        vec![
            "-name".into(),
            process_name(&spec.id),
            "-M".into(),
            machine_arg(spec.pit).into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            p(&spec.kernel),
            "-initrd".into(),
            p(&spec.initrd),
            "-append".into(),
            kernel_cmdline(spec.accel),
            "-drive".into(),
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap",
                p(&spec.disk)
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-device".into(),
            "virtserialport,chardev=agent,name=fastvm.agent".into(),
            "-object".into(),
            "rng-random,id=rng,filename=/dev/urandom".into(),
            "-device".into(),
            "virtio-rng-device,rng=rng".into(),
            "-serial".into(),
            "chardev:con".into(),
        ]
    }

    /// Guest RAM is always the backend object `ram`, so that every snapshot
    /// stream names the same RAM block whichever backend a VM had.
    fn ram_args(spec: &LaunchSpec, mem_path: Option<String>) -> [String; 4] {
        let backend = match (&spec.ram, mem_path) {
            (Some(ram), path) => {
                let share = if ram.shared { "on" } else { "off" };
                let path = path.unwrap_or_else(|| ram.path.to_string_lossy().into_owned());
                format!(
                    "memory-backend-file,id=ram,size={}M,mem-path={path},share={share}",
                    spec.memory_mib
                )
            }
            (None, _) => format!("memory-backend-ram,id=ram,size={}M", spec.memory_mib),
        };
        [
            "-object".into(),
            backend,
            "-machine".into(),
            "memory-backend=ram".into(),
        ]
    }

    /// An unconfined command line (sockets and console at their paths,
    /// `-daemonize`, the tap opened by name): what the benchmarks' raw
    /// floors run. The runtime uses [`Self::confined_args`].
    pub fn args(spec: &LaunchSpec, paths: &VmPaths, incoming: Option<&Path>) -> Vec<String> {
        let p = |x: PathBuf| x.to_string_lossy().into_owned();
        let mut a = Self::base_args(spec);
        a.extend([
            "-chardev".into(),
            format!("file,id=con,path={}", p(paths.console_log())),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                p(paths.agent())
            ),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p(paths.qmp())),
            "-pidfile".into(),
            p(paths.pidfile()),
            "-daemonize".into(),
        ]);
        if let Some(net) = &spec.net {
            a.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", net.mac),
            ]);
        }
        a.extend(Self::ram_args(spec, None));
        if incoming.is_some() {
            a.push("-incoming".into());
            a.push("defer".into());
        }
        a
    }

    /// The command line of a confined VM process: every socket and the tap
    /// are inherited fds (see [`crate::jail`]), the console is a ring
    /// buffer the worker drains, and seccomp is on. With `ram_fd`, private
    /// RAM is the sealed memfd at [`FD_RAM`].
    pub fn confined_args(spec: &LaunchSpec, incoming: bool, ram_fd: bool) -> Vec<String> {
        let mut a = Self::base_args(spec);
        a.extend([
            "-sandbox".into(),
            SANDBOX.into(),
            "-chardev".into(),
            format!("ringbuf,id=con,size={CONSOLE_RING}"),
            "-chardev".into(),
            format!("socket,id=agent,fd={FD_AGENT},server=on,wait=off"),
            "-chardev".into(),
            format!("socket,id=qmp,fd={FD_QMP},server=on,wait=off"),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]);
        if let Some(net) = &spec.net {
            a.extend([
                "-netdev".into(),
                format!("tap,id=net0,fd={FD_TAP}"),
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", net.mac),
            ]);
        }
        let mem_path = ram_fd.then(|| format!("/proc/self/fd/{FD_RAM}"));
        a.extend(Self::ram_args(spec, mem_path));
        if incoming {
            // The stream is fed after the capabilities are set over QMP.
            a.push("-incoming".into());
            a.push("defer".into());
            // Paused once loaded, whatever run state the stream recorded
            // (device state saved alone records "running"): the worker
            // lets the guest run once its network is in place.
            a.push("-S".into());
        }
        a
    }
}

/// Give QEMU pristine signal state: dispositions (ignored ones survive
/// exec) and the mask are inherited from whatever thread spawns it, and a
/// QEMU started with some real-time signals ignored spins without ever
/// running its guest.
fn reset_signals() -> std::io::Result<()> {
    // The kernel's struct sigaction: handler, flags, restorer, mask. All
    // zeroes is SIG_DFL with no flags.
    let default_action = [0u64; 4];
    for sig in 1..=64 {
        if sig == libc::SIGKILL || sig == libc::SIGSTOP {
            continue;
        }
        // SAFETY: raw rt_sigaction with a valid, zeroed kernel sigaction; async-signal-safe.
        unsafe {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default_action.as_ptr(),
                std::ptr::null_mut::<u64>(),
                8usize,
            )
        };
    }
    let empty = 0u64;
    // SAFETY: raw rt_sigprocmask with a valid empty set; async-signal-safe.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK,
            &empty as *const u64,
            std::ptr::null_mut::<u64>(),
            8usize,
        )
    };
    Ok(())
}

fn read_pid(paths: &VmPaths) -> Option<u32> {
    std::fs::read_to_string(paths.pidfile())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// True when `pid` is alive and is the QEMU of VM `id` (not a recycled pid).
fn is_our_process(pid: u32, id: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let want = process_name(id);
    cmdline.split(|b| *b == 0).any(|arg| arg == want.as_bytes())
}

/// True while `pid` exists and is not a zombie.
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|s| s != "Z" && s != "X"),
    }
}

/// The last `max` bytes of a log file (read no further back).
fn tail(path: &Path, max: u64) -> String {
    String::from_utf8_lossy(&crate::console::read_tail(path, max))
        .trim()
        .to_owned()
}

/// A listening unix socket at `path` (root's, 0600), replacing a stale one.
fn listen(path: &Path) -> Result<std::os::unix::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let l = std::os::unix::net::UnixListener::bind(path)
        .ctx(|| format!("listen on {}", path.display()))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .ctx(|| format!("chmod {}", path.display()))?;
    Ok(l)
}

#[async_trait]
impl Hypervisor for QemuMicrovm {
    async fn prepare_ram(&self, path: &Path) -> Result<()> {
        let (cache, path) = (self.sealed_ram.clone(), path.to_owned());
        tokio::task::spawn_blocking(move || {
            match SealedRamCache::get(&cache, &path) {
                // Its snapshot was deleted meanwhile: nothing to prepare.
                Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    Ok(())
                }
                r => r.map(|_| ()),
            }
        })
        .await
        .map_err(|e| Error::Qemu(format!("sealed RAM copy: {e}")))?
    }

    fn forget_ram(&self, path: &Path) {
        if let Ok(mut c) = self.sealed_ram.lock() {
            c.entries.remove(path);
        }
    }

    fn name(&self) -> &'static str {
        "qemu-microvm"
    }

    async fn start(
        &self,
        spec: &LaunchSpec,
        paths: &VmPaths,
        incoming: Option<&Path>,
    ) -> Result<Box<dyn VmProcess>> {
        let _ = std::fs::remove_file(paths.pidfile());
        // Everything QEMU reaches by path is given to its uid first.
        if let Some(uid) = spec.uid {
            jail::secure_vm_dir(&paths.dir, uid)
                .ctx(|| format!("secure {}", paths.dir.display()))?;
            jail::give_to_vm(&spec.disk, uid).ctx(|| format!("chown {}", spec.disk.display()))?;
            if let Some(ram) = spec.ram.as_ref().filter(|r| r.shared) {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&ram.path)
                    .ctx(|| format!("create {}", ram.path.display()))?;
                f.set_len(u64::from(spec.memory_mib) << 20)
                    .ctx(|| format!("size {}", ram.path.display()))?;
                jail::give_to_vm(&ram.path, uid).ctx(|| format!("chown {}", ram.path.display()))?;
            }
        }
        let qmp_listener = listen(&paths.qmp())?;
        let agent_listener = listen(&paths.agent())?;
        let log = jail::create_private(&paths.hypervisor_log()).ctx(|| "create qemu.log".into())?;
        // A new process starts a new console log.
        jail::create_private(&paths.console_log()).ctx(|| "create console.log".into())?;
        let memory = incoming
            .map(|m| std::fs::File::open(m).ctx(|| format!("open {}", m.display())))
            .transpose()?;
        let ram_fd = match spec.ram.as_ref().filter(|r| !r.shared) {
            Some(ram) => Some(SealedRamCache::get(&self.sealed_ram, &ram.path)?),
            None => None,
        };
        // What captures of a restored VM need to know of its restore.
        let restored = match (&ram_fd, incoming, &memory, &spec.ram) {
            (Some(sealed), Some(stream), Some(file), Some(ram)) => {
                let ram_len = u64::from(spec.memory_mib) << 20;
                RestoredFrom::new(sealed, &ram.path, stream, file, ram_len)
                    .map_err(|e| tracing::warn!(vm = %spec.id, error = %e, "captures of this VM will migrate its RAM"))
                    .ok()
            }
            _ => None,
        };
        let netns = spec
            .net
            .as_ref()
            .map(|n| crate::net::netns::open(&n.netns))
            .transpose()?;
        let mut limits = if ram_fd.is_some() {
            Limits::for_restored_vm(spec.vcpus, spec.memory_mib, spec.accel)
        } else {
            Limits::for_vm(spec.vcpus, spec.memory_mib, spec.accel)
        };
        limits.io_device = self.io_device;
        let cgroup_procs = self
            .cgroups
            .create(&spec.id, &limits)
            .ctx(|| format!("create the cgroup of VM {}", spec.id))?;

        let mut setup = ChildSetup::new(spec.uid);
        let io = |e: std::io::Error| Error::Qemu(e.to_string());
        setup
            .pass_fd(qmp_listener.as_raw_fd(), FD_QMP)
            .map_err(io)?;
        setup
            .pass_fd(agent_listener.as_raw_fd(), FD_AGENT)
            .map_err(io)?;
        if let Some(m) = &memory {
            setup.pass_fd(m.as_raw_fd(), FD_INCOMING).map_err(io)?;
        }
        if let Some(sealed) = &ram_fd {
            setup.pass_fd(sealed.fd.as_raw_fd(), FD_RAM).map_err(io)?;
        }
        if let (Some(ns), Some(net)) = (&netns, &spec.net) {
            setup.tap_in_netns(ns.as_raw_fd(), &net.tap).map_err(io)?;
        }
        for fd in &cgroup_procs {
            setup.join_cgroup(fd.as_raw_fd()).map_err(io)?;
        }
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(Self::confined_args(
            spec,
            incoming.is_some(),
            ram_fd.is_some(),
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
        // SAFETY: the closure only makes async-signal-safe syscalls on data
        // prepared above (sigaction, sigprocmask, setsid, write, fcntl, dup2,
        // setns, open, ioctl, set*id, prctl); every fd it names stays open
        // until the spawn returned.
        unsafe {
            cmd.pre_exec(move || {
                reset_signals()?;
                setup.run_in_child()
            })
        };
        let mut child = cmd
            .spawn()
            .ctx(|| format!("run {}", self.binary.display()))?;
        drop((qmp_listener, agent_listener, memory, netns, cgroup_procs));
        let pid = child
            .id()
            .ok_or_else(|| Error::Qemu("QEMU exited at once".into()))?;
        // Reaped here while this worker lives; re-parented to init after.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let cleanup = |e: Error| {
            // SAFETY: kill has no memory preconditions; `pid` is our child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            e
        };
        write_pidfile(paths, pid).map_err(cleanup)?;
        let qmp = match Qmp::connect(&paths.qmp()).await {
            Ok(q) => q,
            Err(e) => {
                let what = if incoming.is_some() {
                    "restore failed"
                } else {
                    "QEMU failed to start"
                };
                let e = cleanup(e);
                tokio::time::sleep(Duration::from_millis(50)).await;
                return Err(Error::Qemu(format!(
                    "{what}: {e}: {}",
                    tail(&paths.hypervisor_log(), 500)
                )));
            }
        };
        let mut process = QemuProcess::new(pid, qmp, spec, paths, self.cgroups.clone());
        process.restored = restored;
        if incoming.is_some() {
            let uri = format!("fd:{FD_INCOMING}");
            let started = async {
                process.set_capabilities().await?;
                process
                    .qmp
                    .execute("migrate-incoming", Some(json!({ "uri": uri })))
                    .await?;
                process.wait_incoming().await
            };
            if let Err(e) = started.await {
                let _ = process.kill().await;
                let log = tail(&paths.hypervisor_log(), 500);
                return Err(if log.is_empty() {
                    e
                } else {
                    Error::Qemu(format!("{e}: {log}"))
                });
            }
        }
        tracing::info!(vm = %spec.id, pid, uid = ?spec.uid, accel = %spec.accel, restored = incoming.is_some(), "QEMU started");
        Ok(Box::new(process))
    }

    async fn adopt(
        &self,
        spec: &LaunchSpec,
        paths: &VmPaths,
    ) -> Result<Option<Box<dyn VmProcess>>> {
        let Some(pid) = read_pid(paths) else {
            return Ok(None);
        };
        if !is_our_process(pid, &spec.id) {
            // Gone while the worker was down: its cgroup goes too.
            self.cgroups.remove(&spec.id).await;
            return Ok(None);
        }
        match Qmp::connect(&paths.qmp()).await {
            Ok(qmp) => Ok(Some(Box::new(QemuProcess::new(
                pid,
                qmp,
                spec,
                paths,
                self.cgroups.clone(),
            )))),
            Err(e) => {
                tracing::warn!(vm = %spec.id, pid, error = %e, "QEMU alive but QMP unreachable; treating as dead");
                Ok(None)
            }
        }
    }
}

/// The content of `path`, refused past `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut out))
        .ctx(|| format!("read {}", path.display()))?;
    if out.len() as u64 > max {
        return Err(Error::Qemu(format!(
            "{} is over {max} bytes",
            path.display()
        )));
    }
    Ok(out)
}

/// Copy a migration stream to its file with 1 MiB reads and writes.
fn copy_stream(
    mut from: std::os::unix::net::UnixStream,
    mut to: std::fs::File,
) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return to.flush(),
            Ok(n) => to.write_all(&buf[..n])?,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// `qemu.pid`, written by the worker (QEMU has no write access to the VM dir).
fn write_pidfile(paths: &VmPaths, pid: u32) -> Result<()> {
    let tmp = paths.dir.join("qemu.pid.tmp");
    std::io::Write::write_all(
        &mut jail::create_private(&tmp).ctx(|| format!("create {}", tmp.display()))?,
        format!("{pid}\n").as_bytes(),
    )
    .ctx(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, paths.pidfile()).ctx(|| "commit qemu.pid".into())
}

pub struct QemuProcess {
    pid: u32,
    qmp: Arc<Qmp>,
    uid: Option<u32>,
    paths: VmPaths,
    /// Set when this worker restored the VM with its RAM mapped from a
    /// sealed copy: captures then take the RAM from the process.
    restored: Option<RestoredFrom>,
}

/// What a restored VM was restored from. A capture of it reads the pages
/// the guest wrote from the process and the others from `base`
/// ([`crate::ram_capture`]), and reuses the part of `stream` before the
/// device state ([`migstream::state_prefix`]).
#[derive(Debug, Clone)]
struct RestoredFrom {
    /// The RAM file the sealed copy was made of.
    base: PathBuf,
    base_stamp: FileStamp,
    /// The state stream the restore loaded.
    stream: PathBuf,
    stream_stamp: FileStamp,
    /// The sealed memfd QEMU maps, as `/proc/<pid>/maps` names it.
    memfd: crate::ram_capture::FileIdentity,
    ram_len: u64,
}

/// Who a file is: a file replaced at the same path (a rebuilt golden
/// snapshot) is another file, and a capture must not read it as the base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }

    /// `path` opened, if it is still the file of this stamp.
    fn open_same(&self, path: &Path) -> Result<std::fs::File> {
        let f = std::fs::File::open(path).ctx(|| format!("open {}", path.display()))?;
        let meta = f.metadata().ctx(|| format!("stat {}", path.display()))?;
        if FileStamp::of(&meta) != *self {
            return Err(Error::Qemu(format!(
                "{} changed since the VM was restored from it",
                path.display()
            )));
        }
        Ok(f)
    }
}

impl RestoredFrom {
    /// From what the restore already has: the sealed copy (made of `base`)
    /// and the stream it opened (`stream_file`, at `stream`).
    fn new(
        sealed: &SealedRamFd,
        base: &Path,
        stream: &Path,
        stream_file: &std::fs::File,
        ram_len: u64,
    ) -> Result<Self> {
        let stream_meta = stream_file
            .metadata()
            .ctx(|| format!("stat {}", stream.display()))?;
        Ok(RestoredFrom {
            base: base.to_owned(),
            base_stamp: sealed.base,
            stream: stream.to_owned(),
            stream_stamp: FileStamp::of(&stream_meta),
            memfd: sealed.memfd,
            ram_len,
        })
    }
}

/// Largest device state a capture accepts from QEMU (a few hundred KiB
/// normally; QEMU is not trusted to keep it small).
const MAX_DEVICE_STATE: u64 = 64 << 20;

impl QemuProcess {
    /// The handle of a running QEMU; starts the task that drains its
    /// console into `console.log` and, once the process is gone, removes
    /// its cgroup.
    fn new(pid: u32, qmp: Qmp, spec: &LaunchSpec, paths: &VmPaths, cgroups: Arc<Cgroups>) -> Self {
        let qmp = Arc::new(qmp);
        let (q, log, id) = (qmp.clone(), paths.console_log(), spec.id.clone());
        tokio::spawn(async move {
            drain_console(&q, &log).await;
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while process_alive(pid) && std::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            cgroups.remove(&id).await;
        });
        QemuProcess {
            pid,
            qmp,
            uid: spec.uid,
            paths: paths.clone(),
            restored: None,
        }
    }
}

/// Longest wait between two reads of a quiet console ring buffer. Each
/// read is a QMP round trip that wakes QEMU's main loop and the worker;
/// polling every [`crate::console::FOLLOW_POLL`] (200 ms) for every VM
/// cost an idle VM 0.2-0.3 % of a core (QEMU main loop + worker).
pub const DRAIN_IDLE_MAX: Duration = Duration::from_secs(1);

/// The wait before the next read of the console ring buffer: back to
/// [`crate::console::FOLLOW_POLL`] when the last read found output, else
/// doubled up to [`DRAIN_IDLE_MAX`]. A guest that starts writing is drained
/// within 1 s, then at the fast rate while it keeps writing; the 1 MiB
/// ring holds what a console can carry meanwhile. The price: what a quiet
/// guest writes in its last second before QEMU exits (a panic) can be lost
/// with the ring (was: its last 200 ms).
pub fn next_drain_wait(current: Duration, got_output: bool) -> Duration {
    if got_output {
        crate::console::FOLLOW_POLL
    } else {
        (current * 2).min(DRAIN_IDLE_MAX)
    }
}

/// Move what the guest wrote to its serial console from QEMU's ring buffer
/// into the capped `console.log` until QEMU exits (reads paced by
/// [`next_drain_wait`]).
async fn drain_console(qmp: &Qmp, path: &Path) {
    use base64::Engine;
    const READ: usize = 256 << 10;
    let mut log = crate::console::CappedLog::open(path);
    let mut wait = crate::console::FOLLOW_POLL;
    // Not during the start's own QMP exchange (a restore is on the latency path).
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = qmp.wait_closed() => return,
    }
    loop {
        let args = json!({ "device": "con", "size": READ, "format": "base64" });
        let got = match qmp.execute("ringbuf-read", Some(args)).await {
            Ok(v) => v,
            Err(_) if qmp.is_closed() => return,
            Err(e) => {
                tracing::debug!(error = %e, "console ringbuf-read failed");
                tokio::time::sleep(crate::console::FOLLOW_POLL).await;
                continue;
            }
        };
        let bytes = got
            .as_str()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .unwrap_or_default();
        if !bytes.is_empty() {
            if let Err(e) = log.append(&bytes) {
                tracing::warn!(log = %path.display(), error = %e, "console log write failed");
            }
        }
        if bytes.len() < READ {
            wait = next_drain_wait(wait, !bytes.is_empty());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = qmp.wait_closed() => return,
            }
        }
    }
}

/// Migration capabilities of every capture and restore (both ends must agree):
/// `x-ignore-shared` skips file-backed shared RAM (the golden VM's RAM image),
/// so such a snapshot carries only device state and a private mapping of the
/// file is restored without loading any RAM.
const CAPABILITIES: &[&str] = &["x-ignore-shared"];

/// Captures split the RAM into its own file ([`migstream`]) until a stream
/// turns out not to be splittable (then never again in this process).
static SPLIT_RAM: AtomicBool = AtomicBool::new(true);

/// Turn the RAM split of captures on or off for this process (benchmarks
/// compare both; a worker never needs it).
pub fn set_split_ram(on: bool) {
    SPLIT_RAM.store(on, Ordering::Relaxed);
}

/// Captures of restored VMs take the RAM from the process
/// ([`crate::ram_capture`]) rather than from a migration.
static RAM_FROM_PROCESS: AtomicBool = AtomicBool::new(true);

/// Captures that took the RAM from the process, in this process (tests and
/// benchmarks check which way a capture went).
static RAM_FROM_PROCESS_DONE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many captures took the RAM from the process so far.
pub fn ram_captures_from_process() -> u64 {
    RAM_FROM_PROCESS_DONE.load(Ordering::Relaxed)
}

/// Turn RAM capture from the process on or off for this process
/// (benchmarks compare it with the migration; a worker never needs it).
pub fn set_ram_from_process(on: bool) {
    RAM_FROM_PROCESS.store(on, Ordering::Relaxed);
}

impl QemuProcess {
    /// Freeze the current top layer: the worker creates `new_layer` over it
    /// (QEMU cannot create files), gives it to the VM's uid and QEMU opens
    /// it (`mode: existing`); the frozen layer becomes root's, read-only.
    async fn switch_layer(&self, new_layer: &Path) -> Result<()> {
        let blocks = self.qmp.execute("query-block", None).await?;
        let top = blocks
            .as_array()
            .and_then(|b| {
                b.iter()
                    .find(|d| d.get("device").and_then(serde_json::Value::as_str) == Some("root"))
            })
            .and_then(|d| d.pointer("/inserted/file"))
            .and_then(serde_json::Value::as_str)
            .map(PathBuf::from)
            .ok_or_else(|| Error::Qemu("query-block: no root disk".into()))?;
        let out = crate::timeouts::output_within(
            tokio::process::Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&top)
                .arg(new_layer),
            crate::timeouts::QEMU_IMG,
            "qemu-img create",
        )
        .await?;
        if !out.status.success() {
            return Err(Error::Qemu(format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        if let Some(uid) = self.uid {
            jail::give_to_vm(new_layer, uid).ctx(|| format!("chown {}", new_layer.display()))?;
        }
        self.qmp
            .execute(
                "blockdev-snapshot-sync",
                Some(json!({ "device": "root", "snapshot-file": new_layer.to_string_lossy(), "format": "qcow2", "mode": "existing" })),
            )
            .await?;
        if self.uid.is_some() {
            jail::make_shared_readonly(&top).ctx(|| format!("chown {}", top.display()))?;
        }
        Ok(())
    }

    /// Capture a restored VM without migrating its RAM: QEMU saves the
    /// device state alone (`xen-save-devices-state`, into a file the worker
    /// made for its uid), `memory` becomes the restore stream's part before
    /// the device state followed by it, and `ram` gets the base RAM file
    /// overlaid with the pages the guest wrote ([`crate::ram_capture`]).
    /// The VM is paused.
    async fn save_state_from_process(
        &self,
        memory: &Path,
        ram: &Path,
        from: &RestoredFrom,
    ) -> Result<()> {
        let t0 = std::time::Instant::now();
        let devstate = self.paths.dir.join("devstate");
        let _ = std::fs::remove_file(&devstate);
        jail::create_private(&devstate).ctx(|| format!("create {}", devstate.display()))?;
        if let Some(uid) = self.uid {
            jail::give_to_vm(&devstate, uid).ctx(|| format!("chown {}", devstate.display()))?;
        }
        let saved = self
            .qmp
            .execute(
                "xen-save-devices-state",
                Some(json!({ "filename": devstate.to_string_lossy(), "live": false })),
            )
            .await;
        let devices = read_bounded(&devstate, MAX_DEVICE_STATE);
        let _ = std::fs::remove_file(&devstate);
        saved?;
        let devices = devices?;
        let t_devices = t0.elapsed();
        let (from, memory, ram, pid) = (from.clone(), memory.to_owned(), ram.to_owned(), self.pid);
        let stats = tokio::task::spawn_blocking(move || -> Result<crate::ram_capture::Stats> {
            let stream = from.stream_stamp.open_same(&from.stream)?;
            let prefix = migstream::state_prefix(stream, from.ram_len)
                .map_err(|e| Error::Qemu(format!("{}: {e}", from.stream.display())))?;
            let whole = migstream::join_device_state(prefix, &devices)
                .map_err(|e| Error::Qemu(format!("the saved device state: {e}")))?;
            std::io::Write::write_all(
                &mut jail::create_private(&memory)
                    .ctx(|| format!("create {}", memory.display()))?,
                &whole,
            )
            .ctx(|| format!("write {}", memory.display()))?;
            let base = from.base_stamp.open_same(&from.base)?;
            let maps_path = format!("/proc/{pid}/maps");
            let maps = std::fs::read_to_string(&maps_path).ctx(|| format!("read {maps_path}"))?;
            let maps = crate::ram_capture::parse_maps(&maps, from.memfd);
            let out = std::fs::OpenOptions::new()
                .write(true)
                .open(&ram)
                .ctx(|| format!("open {}", ram.display()))?;
            crate::ram_capture::capture(pid, &maps, &base, &out, from.ram_len)
                .ctx(|| format!("RAM of QEMU {pid} into {}", ram.display()))
        })
        .await
        .map_err(|e| Error::Qemu(format!("RAM capture: {e}")))??;
        tracing::debug!(
            ?stats,
            devices_ms = t_devices.as_millis() as u64,
            ms = t0.elapsed().as_millis() as u64,
            "capture: RAM taken from the process"
        );
        Ok(())
    }

    /// Migrate the VM's state into `memory`: QEMU connects to a socket the
    /// worker listens on (the only file QEMU may open in its VM dir) and
    /// the worker writes the stream to the file. With `ram`, the RAM
    /// block's pages go into that file instead ([`migstream::split`]).
    async fn save_state(&self, memory: &Path, ram: Option<&Path>) -> Result<()> {
        let sock = self.paths.dir.join("migrate.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = tokio::net::UnixListener::bind(&sock)
            .ctx(|| format!("listen on {}", sock.display()))?;
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(&sock, mode).ctx(|| format!("chmod {}", sock.display()))?;
        if let Some(uid) = self.uid {
            std::os::unix::fs::chown(&sock, Some(uid), Some(uid))
                .ctx(|| format!("chown {}", sock.display()))?;
        }
        let file = jail::create_private(memory).ctx(|| format!("create {}", memory.display()))?;
        let receive = async {
            let (conn, _) = listener
                .accept()
                .await
                .ctx(|| "accept the migration stream".into())?;
            let conn = conn
                .into_std()
                .and_then(|c| c.set_nonblocking(false).map(|()| c))
                .ctx(|| "the migration stream".into())?;
            let ram_file = match ram {
                Some(path) => Some(
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .ctx(|| format!("open {}", path.display()))?,
                ),
                None => None,
            };
            // Large blocking reads and writes on a thread (like `cat` did).
            tokio::task::spawn_blocking(move || match ram_file {
                None => copy_stream(conn, file).map_err(migstream::SplitError::Io),
                Some(ram_file) => {
                    let len = ram_file.metadata()?.len();
                    let t0 = std::time::Instant::now();
                    let stats = migstream::split(conn, file, &ram_file, len)?;
                    tracing::debug!(
                        ?stats,
                        ms = t0.elapsed().as_millis() as u64,
                        "capture: RAM split into its file"
                    );
                    Ok(())
                }
            })
            .await
            .map_err(|e| Error::Qemu(format!("migration writer: {e}")))?
            .map_err(|e| match e {
                migstream::SplitError::Io(e) => Error::Io {
                    context: format!("write {}", memory.display()),
                    source: e,
                },
                e @ migstream::SplitError::Unsupported(_) => Error::Qemu(e.to_string()),
            })
        };
        let uri = format!("unix:{}", sock.to_string_lossy());
        let send = async {
            self.qmp
                .execute("migrate", Some(json!({ "uri": uri })))
                .await?;
            loop {
                let info = self.qmp.execute("query-migrate", None).await?;
                match info.get("status").and_then(serde_json::Value::as_str) {
                    Some("completed") => return Ok(()),
                    Some("failed") | Some("cancelled") => {
                        let why = info
                            .get("error-desc")
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or("unknown");
                        return Err(Error::Qemu(format!("memory snapshot failed: {why}")));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
        };
        // A failed migration never connects: the receiver is dropped with it.
        let result = tokio::try_join!(send, receive).map(|_| ());
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        result
    }

    /// After a migration whose receiver gave up: wait until QEMU has
    /// noticed (status failed), so that another one can start.
    async fn wait_migration_over(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let info = self.qmp.execute("query-migrate", None).await?;
            let status = info.get("status").and_then(serde_json::Value::as_str);
            if !matches!(
                status,
                Some("active" | "setup" | "device" | "pre-switchover")
            ) {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Qemu(
                    "the abandoned migration did not end within 30 s".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn set_capabilities(&self) -> Result<()> {
        let caps: Vec<serde_json::Value> = CAPABILITIES
            .iter()
            .map(|c| json!({ "capability": c, "state": true }))
            .collect();
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": caps })),
            )
            .await
            .map(|_| ())
    }

    async fn status(&self) -> Result<String> {
        let st = self.qmp.execute("query-status", None).await?;
        Ok(st
            .get("status")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("unknown")
            .to_owned())
    }

    /// Wait until an incoming migration has been loaded (the VM is then paused).
    async fn wait_incoming(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.status().await.map_err(|e| {
                Error::Qemu(format!(
                    "restore failed: QEMU exited while loading the state ({e})"
                ))
            })?;
            match status.as_str() {
                "inmigrate" | "prelaunch" => {}
                "paused" | "postmigrate" => return Ok(()),
                "running" => return Ok(()),
                other => {
                    let info = self
                        .qmp
                        .execute("query-migrate", None)
                        .await
                        .unwrap_or_default();
                    return Err(Error::Qemu(format!(
                        "restore failed (status {other}): {info}"
                    )));
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(Error::Qemu("restore did not finish within 120 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[async_trait]
impl VmProcess for QemuProcess {
    async fn snapshot(
        &self,
        memory: &Path,
        ram: Option<&Path>,
        new_layer: &Path,
        leave_paused: bool,
    ) -> Result<RamCapture> {
        let was_running = !self.is_paused().await?;
        if was_running {
            self.pause().await?;
        }
        let result = async {
            // Paused: nothing writes to the disk between the layer switch and the memory dump.
            self.switch_layer(new_layer).await?;
            self.set_capabilities().await?;
            self.qmp
                .execute(
                    "migrate-set-parameters",
                    Some(json!({ "max-bandwidth": 64u64 << 30 })),
                )
                .await?;
            let Some(ram) = ram.filter(|_| SPLIT_RAM.load(Ordering::Relaxed)) else {
                return self
                    .save_state(memory, None)
                    .await
                    .map(|()| RamCapture::InStream);
            };
            if let Some(from) = self
                .restored
                .as_ref()
                .filter(|_| RAM_FROM_PROCESS.load(Ordering::Relaxed))
            {
                match self.save_state_from_process(memory, ram, from).await {
                    Ok(()) => {
                        RAM_FROM_PROCESS_DONE.fetch_add(1, Ordering::Relaxed);
                        return Ok(RamCapture::File);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "capture: RAM from the process failed; migrating it instead");
                        std::fs::File::create(ram)
                            .and_then(|f| f.set_len(from.ram_len))
                            .ctx(|| format!("empty {}", ram.display()))?;
                    }
                }
            }
            match self.save_state(memory, Some(ram)).await {
                Ok(()) => Ok(RamCapture::File),
                Err(Error::Qemu(why)) if why.starts_with(migstream::NOT_SPLITTABLE) => {
                    // A stream this worker cannot split (another QEMU build):
                    // keep whole streams from now on.
                    tracing::warn!(%why, "capture: RAM kept in the migration stream from now on");
                    SPLIT_RAM.store(false, Ordering::Relaxed);
                    self.wait_migration_over().await?;
                    std::fs::File::create(ram)
                        .and_then(|f| f.set_len(0))
                        .ctx(|| format!("truncate {}", ram.display()))?;
                    self.save_state(memory, None)
                        .await
                        .map(|()| RamCapture::InStream)
                }
                Err(e) => Err(e),
            }
        }
        .await;
        // `cont` also takes the disks back from the finished migration.
        if was_running && !leave_paused {
            self.resume().await?;
        }
        result
    }

    fn pid(&self) -> u32 {
        self.pid
    }

    async fn pause(&self) -> Result<()> {
        self.qmp.execute("stop", None).await.map(|_| ())
    }

    async fn resume(&self) -> Result<()> {
        self.qmp.execute("cont", None).await.map(|_| ())
    }

    async fn is_paused(&self) -> Result<bool> {
        let status = self.qmp.execute("query-status", None).await?;
        Ok(status.get("running").and_then(serde_json::Value::as_bool) == Some(false))
    }

    async fn kill(&self) -> Result<()> {
        if self.qmp.is_closed() {
            return Ok(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.qmp.execute("quit", None)).await;
        if tokio::time::timeout(Duration::from_secs(3), self.qmp.wait_closed())
            .await
            .is_err()
        {
            // SAFETY: kill has no memory preconditions; the pid is the QEMU we started
            // (its QMP socket is still open, so the pid cannot have been recycled).
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            self.qmp.wait_closed().await;
        }
        // QMP closes before the process is gone (RAM teardown takes a moment).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while process_alive(self.pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    async fn wait_exit(&self) {
        self.qmp.wait_closed().await;
    }

    fn has_exited(&self) -> bool {
        self.qmp.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{NetLaunch, RamFile};

    /// A sparse RAM file of `len` bytes with one page of data at 0.
    fn sparse_ram(dir: &Path, name: &str, len: u64) -> PathBuf {
        use std::os::unix::fs::FileExt;
        let path = dir.join(name);
        let f = std::fs::File::create(&path).expect("create");
        f.set_len(len).expect("size");
        f.write_at(&[7u8; 4096], 0).expect("write");
        path
    }

    /// Read one byte of every page of `fd` through a private mapping, as
    /// QEMU does during a capture (and a guest's first writes do).
    fn fault_every_page(fd: &OwnedFd, len: usize) -> u64 {
        // SAFETY: a fresh private read-only mapping of a memfd of `len`
        // bytes; only read within it, then unmapped.
        unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                fd.as_raw_fd(),
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            let mut sum = 0u64;
            for off in (0..len).step_by(4096) {
                sum += u64::from(std::ptr::read_volatile((p as *const u8).add(off)));
            }
            libc::munmap(p, len);
            sum
        }
    }

    #[test]
    fn faults_on_holes_grow_a_sealed_copy_and_the_budget_counts_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let len = 32 << 20;
        let golden = sparse_ram(dir.path(), "golden", len);
        let other = sparse_ram(dir.path(), "other", len);
        let cache = Mutex::new(SealedRamCache {
            entries: HashMap::new(),
            budget: 16 << 20,
            clock: 0,
        });
        let fd = SealedRamCache::get(&cache, &golden).expect("copy").fd;
        let _ = SealedRamCache::get(&cache, &other).expect("copy");
        // Both copies hold one page each: they fit the budget.
        assert!(cache.lock().expect("lock").entries.contains_key(&golden));
        assert!(allocated_bytes(&fd).expect("fstat") < 1 << 20);

        // Reading every page of the copy fills its holes with zero pages.
        assert_eq!(fault_every_page(&fd, len as usize), 7);
        let grown = allocated_bytes(&fd).expect("fstat");
        assert!(grown >= len, "{grown} bytes after faulting {len}");

        // The next restore's eviction sees what the copy holds now.
        let _ = SealedRamCache::get(&cache, &other).expect("copy");
        let c = cache.lock().expect("lock");
        assert!(
            !c.entries.contains_key(&golden),
            "the grown copy is dropped"
        );
        assert!(c.entries.contains_key(&other));
    }

    fn spec() -> LaunchSpec {
        LaunchSpec {
            id: "vm1".into(),
            machine: "c1m2".into(),
            vcpus: 1,
            memory_mib: 2048,
            disk_gib: 10,
            accel: Accel::Tcg,
            kernel: "/img/vmlinuz".into(),
            initrd: "/img/initrd".into(),
            image_id: "img".into(),
            disk: "/data/layers/top.qcow2".into(),
            ram: None,
            net: Some(NetLaunch {
                netns: "fvm-0001".into(),
                tap: "tap0".into(),
                mac: "02:00:00:00:00:01".into(),
            }),
            uid: Some(jail::UID_BASE),
            pit: false,
        }
    }

    fn after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn confined_args_use_fds_seccomp_and_a_ring_buffer() {
        let a = QemuMicrovm::confined_args(&spec(), false, false);
        assert_eq!(after(&a, "-sandbox"), [SANDBOX]);
        assert!(!a
            .iter()
            .any(|x| x == "-daemonize" || x == "-pidfile" || x == "-qmp"));
        assert!(!a.iter().any(|x| x.contains("exec:") || x.contains("path=")));
        assert_eq!(
            after(&a, "-chardev"),
            [
                "ringbuf,id=con,size=1048576",
                "socket,id=agent,fd=4,server=on,wait=off",
                "socket,id=qmp,fd=3,server=on,wait=off",
            ]
        );
        assert_eq!(after(&a, "-mon"), ["chardev=qmp,mode=control"]);
        assert_eq!(after(&a, "-netdev"), ["tap,id=net0,fd=5"]);
        assert_eq!(
            after(&a, "-object")[1],
            "memory-backend-ram,id=ram,size=2048M"
        );
        assert!(after(&a, "-incoming").is_empty());
        assert_eq!(after(&a, "-name"), ["fastvm-vm1"]);
    }

    #[test]
    fn a_restore_reads_a_sealed_ram_fd_and_defers_the_stream() {
        let mut s = spec();
        s.ram = Some(RamFile {
            path: "/data/golden/k/ram".into(),
            shared: false,
        });
        let a = QemuMicrovm::confined_args(&s, true, true);
        assert_eq!(
            after(&a, "-object")[1],
            "memory-backend-file,id=ram,size=2048M,mem-path=/proc/self/fd/7,share=off"
        );
        assert_eq!(after(&a, "-incoming"), ["defer"]);
        // The golden VM itself writes its RAM file by path.
        s.ram = Some(RamFile {
            path: "/data/golden/k.building/ram".into(),
            shared: true,
        });
        let a = QemuMicrovm::confined_args(&s, false, false);
        assert_eq!(
            after(&a, "-object")[1],
            "memory-backend-file,id=ram,size=2048M,mem-path=/data/golden/k.building/ram,share=on"
        );
    }

    #[test]
    fn the_unconfined_floor_keeps_paths() {
        let paths = VmPaths::new("/data/vms/vm1");
        let a = QemuMicrovm::args(&spec(), &paths, None);
        assert!(a.iter().any(|x| x == "-daemonize"));
        assert_eq!(
            after(&a, "-netdev"),
            ["tap,id=net0,ifname=tap0,script=no,downscript=no"]
        );
        assert_eq!(
            after(&a, "-chardev")[0],
            "file,id=con,path=/data/vms/vm1/console.log"
        );
    }

    #[test]
    fn the_pit_follows_the_spec_and_old_records_keep_it() {
        let mut s = spec();
        assert_eq!(
            after(&QemuMicrovm::confined_args(&s, false, false), "-M"),
            ["microvm,pit=off"]
        );
        s.pit = true;
        assert_eq!(
            after(&QemuMicrovm::confined_args(&s, true, true), "-M"),
            ["microvm"]
        );
        // A record written before the field existed had the PIT: its
        // snapshots carry PIT state and must restore into a machine with one.
        let mut json = serde_json::to_value(spec()).expect("spec serializes");
        json.as_object_mut().expect("an object").remove("pit");
        let old: LaunchSpec = serde_json::from_value(json).expect("old record parses");
        assert!(old.pit);
    }

    #[test]
    fn the_kvm_command_line_keeps_the_pit_and_its_checks() {
        assert!(pit_needed(Accel::Kvm));
        let kvm = kernel_cmdline(Accel::Kvm);
        assert!(!kvm.contains("no_timer_check") && !kvm.contains("tsc_early_khz"));
        assert!(kvm.contains("nowatchdog"));
        // TCG drops the PIT exactly when the guest is told the TSC rate.
        let tcg = kernel_cmdline(Accel::Tcg);
        assert_eq!(
            !pit_needed(Accel::Tcg),
            tcg.contains("tsc_early_khz=") && tcg.contains("no_timer_check")
        );
    }

    #[test]
    fn the_guest_abi_tag_is_stable_and_tells_accelerators_apart() {
        let tcg = guest_abi_tag(Accel::Tcg);
        assert_eq!(tcg.len(), 8);
        assert_eq!(tcg, guest_abi_tag(Accel::Tcg));
        assert_ne!(tcg, guest_abi_tag(Accel::Kvm));
    }

    #[test]
    fn a_quiet_console_is_read_less_often() {
        let fast = crate::console::FOLLOW_POLL;
        let mut w = fast;
        let mut waits = Vec::new();
        for _ in 0..5 {
            w = next_drain_wait(w, false);
            waits.push(w.as_millis());
        }
        assert_eq!(waits, [400, 800, 1000, 1000, 1000]);
        assert_eq!(next_drain_wait(DRAIN_IDLE_MAX, true), fast);
    }
}
