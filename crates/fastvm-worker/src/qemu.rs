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
use serde_json::json;
use std::path::{Path, PathBuf};
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

pub struct QemuMicrovm {
    pub binary: PathBuf,
}

impl Default for QemuMicrovm {
    fn default() -> Self {
        QemuMicrovm {
            binary: PathBuf::from("qemu-system-x86_64"),
        }
    }
}

/// The process name QEMU is given, used to recognise our VMs' processes.
fn process_name(id: &str) -> String {
    format!("fastvm-{id}")
}

impl QemuMicrovm {
    /// The full argument list for `spec` (no binary).
    pub fn args(spec: &LaunchSpec, paths: &VmPaths, incoming: Option<&Path>) -> Vec<String> {
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
            format!(
                "id=root,file={},format=qcow2,if=none,discard=unmap",
                p(spec.disk.clone())
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-chardev".into(),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                p(paths.agent())
            ),
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
        if let Some(net) = &spec.net {
            a.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", net.mac),
            ]);
        }
        // Guest RAM is always the backend object `ram`, so that every
        // snapshot stream names the same RAM block whichever backend a VM had.
        let backend = match &spec.ram {
            Some(ram) => {
                let share = if ram.shared { "on" } else { "off" };
                format!(
                    "memory-backend-file,id=ram,size={}M,mem-path={},share={share}",
                    spec.memory_mib,
                    p(ram.path.clone())
                )
            }
            None => format!("memory-backend-ram,id=ram,size={}M", spec.memory_mib),
        };
        a.extend([
            "-object".into(),
            backend,
            "-machine".into(),
            "memory-backend=ram".into(),
        ]);
        if incoming.is_some() {
            // The stream is fed after the capabilities are set over QMP.
            a.push("-incoming".into());
            a.push("defer".into());
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

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
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

    async fn start(
        &self,
        spec: &LaunchSpec,
        paths: &VmPaths,
        incoming: Option<&Path>,
    ) -> Result<Box<dyn VmProcess>> {
        for stale in [paths.qmp(), paths.agent(), paths.pidfile()] {
            let _ = std::fs::remove_file(stale);
        }
        let log = std::fs::File::create(paths.hypervisor_log()).ctx(|| "create qemu.log".into())?;
        let mut cmd = tokio::process::Command::new(&self.binary);
        cmd.args(Self::args(spec, paths, incoming))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        // QEMU runs in the VM's network namespace, where it opens its tap.
        let netns = spec
            .net
            .as_ref()
            .map(|n| crate::net::netns::open(&n.netns))
            .transpose()?;
        let netns_fd = netns.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        // SAFETY: the closure only makes async-signal-safe syscalls (sigaction,
        // sigprocmask, setns); `netns` stays open until the spawn is done.
        unsafe {
            cmd.pre_exec(move || {
                reset_signals()?;
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
        let status = cmd
            .status()
            .await
            .ctx(|| format!("run {}", self.binary.display()))?;
        drop(netns);
        if !status.success() {
            return Err(Error::Qemu(format!(
                "exited with {status}: {}",
                tail(&paths.hypervisor_log(), 2000)
            )));
        }
        let pid = read_pid(paths).ok_or_else(|| Error::Qemu("no pidfile after start".into()))?;
        let qmp = match Qmp::connect(&paths.qmp()).await {
            Ok(q) => q,
            Err(e) => {
                let what = if incoming.is_some() {
                    "restore failed"
                } else {
                    "QEMU failed to start"
                };
                return Err(Error::Qemu(format!(
                    "{what}: {e}: {}",
                    tail(&paths.hypervisor_log(), 500)
                )));
            }
        };
        let process = QemuProcess { pid, qmp };
        if let Some(mem) = incoming {
            let uri = format!("exec:cat {}", shell_quote(&mem.to_string_lossy()));
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
        tracing::info!(vm = %spec.id, pid, accel = %spec.accel, restored = incoming.is_some(), "QEMU started");
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

/// Migration capabilities of every capture and restore (both ends must agree):
/// `x-ignore-shared` skips file-backed shared RAM (the golden VM's RAM image),
/// so such a snapshot carries only device state and a private mapping of the
/// file is restored without loading any RAM.
const CAPABILITIES: &[&str] = &["x-ignore-shared"];

impl QemuProcess {
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
    async fn snapshot(&self, memory: &Path, new_layer: &Path, leave_paused: bool) -> Result<()> {
        let was_running = !self.is_paused().await?;
        if was_running {
            self.pause().await?;
        }
        let result = async {
            // Paused: nothing writes to the disk between the layer switch and the memory dump.
            self.qmp
                .execute(
                    "blockdev-snapshot-sync",
                    Some(json!({ "device": "root", "snapshot-file": new_layer.to_string_lossy(), "format": "qcow2" })),
                )
                .await?;
            self.set_capabilities().await?;
            self.qmp.execute("migrate-set-parameters", Some(json!({ "max-bandwidth": 64u64 << 30 }))).await?;
            let uri = format!("exec:cat > {}", shell_quote(&memory.to_string_lossy()));
            self.qmp.execute("migrate", Some(json!({ "uri": uri }))).await?;
            loop {
                let info = self.qmp.execute("query-migrate", None).await?;
                match info.get("status").and_then(serde_json::Value::as_str) {
                    Some("completed") => break,
                    Some("failed") | Some("cancelled") => {
                        let why = info.get("error-desc").and_then(serde_json::Value::as_str).unwrap_or("unknown");
                        return Err(Error::Qemu(format!("memory snapshot failed: {why}")));
                    }
                    _ => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            Ok(())
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
