//! The QEMU `microvm` driver.
//!
//! One `qemu-system-x86_64 -M microvm` process per VM, started with
//! `-daemonize` so that it is re-parented away from the worker and survives
//! it. Devices: a virtio-blk root disk (qcow2 overlay), a virtio-serial port
//! `fastvm.agent` on a unix-socket chardev (the agent channel), virtio-rng,
//! the serial console into `console.log`, and QMP on `qmp.sock`.

use crate::accel::Accel;
use crate::error::{Error, IoContext, Result};
use crate::hypervisor::{Hypervisor, LaunchSpec, VmPaths, VmProcess};
use crate::qmp::Qmp;
use async_trait::async_trait;
use std::path::PathBuf;
use std::time::Duration;

/// Kernel command line of every guest. `quiet` keeps the (slow, emulated)
/// serial console short; the agent logs its own lines at error level.
pub const KERNEL_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=-1 quiet rw fastvm.root=/dev/vda i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// The command line for `accel`. Under TCG the guest TSC ticks at the host
/// TSC rate, but the kernel cannot calibrate it (no HPET/PM timer on
/// microvm) and, on a loaded host, then hangs in early boot waiting for
/// timer ticks. Telling it the frequency (`tsc_early_khz`) skips every
/// calibration loop.
pub fn kernel_cmdline(accel: Accel) -> String {
    match (accel, host_tsc_khz()) {
        (Accel::Tcg, Some(khz)) => format!("{KERNEL_CMDLINE} tsc_early_khz={khz} tsc=reliable"),
        _ => KERNEL_CMDLINE.to_owned(),
    }
}

/// The host TSC frequency, measured once against CLOCK_MONOTONIC_RAW.
pub fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(measure_tsc_khz)
}

#[cfg(target_arch = "x86_64")]
fn measure_tsc_khz() -> Option<u64> {
    let now = || {
        let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
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

pub struct QemuMicrovm {
    pub binary: PathBuf,
}

impl Default for QemuMicrovm {
    fn default() -> Self {
        QemuMicrovm { binary: PathBuf::from("qemu-system-x86_64") }
    }
}

/// The process name QEMU is given, used to recognise our VMs' processes.
fn process_name(id: &str) -> String {
    format!("fastvm-{id}")
}

impl QemuMicrovm {
    /// The full argument list for `spec` (no binary).
    pub fn args(spec: &LaunchSpec, paths: &VmPaths) -> Vec<String> {
        let p = |x: PathBuf| x.to_string_lossy().into_owned();
        let (accel, cpu) = match spec.accel {
            Accel::Kvm => ("kvm", "host,arch-capabilities=off"),
            // A bounded translation cache keeps per-VM host memory in check.
            Accel::Tcg => ("tcg,thread=multi,tb-size=128", "max"),
        };
        let mut a: Vec<String> = vec![
            "-name".into(),
            process_name(&spec.id),
            "-M".into(),
            "microvm".into(),
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
            p(spec.kernel.clone()),
            "-initrd".into(),
            p(spec.initrd.clone()),
            "-append".into(),
            kernel_cmdline(spec.accel),
            "-chardev".into(),
            format!("file,id=con,path={}", p(paths.console_log())),
            "-serial".into(),
            "chardev:con".into(),
            "-drive".into(),
            format!("id=root,file={},format=qcow2,if=none,discard=unmap", p(paths.disk())),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={},server=on,wait=off", p(paths.agent())),
            "-device".into(),
            "virtserialport,chardev=agent,name=fastvm.agent".into(),
            "-object".into(),
            "rng-random,id=rng,filename=/dev/urandom".into(),
            "-device".into(),
            "virtio-rng-device,rng=rng".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", p(paths.qmp())),
            "-pidfile".into(),
            p(paths.pidfile()),
            "-daemonize".into(),
        ];
        a.shrink_to_fit();
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
        unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, default_action.as_ptr(), std::ptr::null_mut::<u64>(), 8usize) };
    }
    let empty = 0u64;
    // SAFETY: raw rt_sigprocmask with a valid empty set; async-signal-safe.
    unsafe { libc::syscall(libc::SYS_rt_sigprocmask, libc::SIG_SETMASK, &empty as *const u64, std::ptr::null_mut::<u64>(), 8usize) };
    Ok(())
}

fn read_pid(paths: &VmPaths) -> Option<u32> {
    std::fs::read_to_string(paths.pidfile()).ok()?.trim().parse().ok()
}

/// True when `pid` is alive and is the QEMU of VM `id` (not a recycled pid).
fn is_our_process(pid: u32, id: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let want = process_name(id);
    cmdline.split(|b| *b == 0).any(|arg| arg == want.as_bytes())
}

fn tail(path: &std::path::Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let start = s.len().saturating_sub(max);
    s.get(start..).unwrap_or("").trim().to_owned()
}

#[async_trait]
impl Hypervisor for QemuMicrovm {
    fn name(&self) -> &'static str {
        "qemu-microvm"
    }

    async fn start(&self, spec: &LaunchSpec, paths: &VmPaths) -> Result<Box<dyn VmProcess>> {
        for stale in [paths.qmp(), paths.agent(), paths.pidfile()] {
            let _ = std::fs::remove_file(stale);
        }
        let log = std::fs::File::create(paths.hypervisor_log()).ctx(|| "create qemu.log".into())?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(Self::args(spec, paths)).stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).stderr(log);
        // SAFETY: the closure only makes async-signal-safe syscalls.
        unsafe { cmd.pre_exec(reset_signals) };
        let status = cmd.status().await.ctx(|| format!("run {}", self.binary.display()))?;
        if !status.success() {
            return Err(Error::Qemu(format!("exited with {status}: {}", tail(&paths.hypervisor_log(), 2000))));
        }
        let pid = read_pid(paths).ok_or_else(|| Error::Qemu("no pidfile after start".into()))?;
        let qmp = Qmp::connect(&paths.qmp()).await?;
        tracing::info!(vm = %spec.id, pid, accel = %spec.accel, "QEMU started");
        Ok(Box::new(QemuProcess { pid, qmp }))
    }

    async fn adopt(&self, spec: &LaunchSpec, paths: &VmPaths) -> Result<Option<Box<dyn VmProcess>>> {
        let Some(pid) = read_pid(paths) else { return Ok(None) };
        if !is_our_process(pid, &spec.id) {
            return Ok(None);
        }
        match Qmp::connect(&paths.qmp()).await {
            Ok(qmp) => Ok(Some(Box::new(QemuProcess { pid, qmp }))),
            Err(e) => {
                tracing::warn!(vm = %spec.id, pid, error = %e, "QEMU alive but QMP unreachable; treating as dead");
                Ok(None)
            }
        }
    }
}

pub struct QemuProcess {
    pid: u32,
    qmp: Qmp,
}

#[async_trait]
impl VmProcess for QemuProcess {
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
        if tokio::time::timeout(Duration::from_secs(3), self.qmp.wait_closed()).await.is_err() {
            // SAFETY: kill has no memory preconditions; the pid is the QEMU we started
            // (its QMP socket is still open, so the pid cannot have been recycled).
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
            self.qmp.wait_closed().await;
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
