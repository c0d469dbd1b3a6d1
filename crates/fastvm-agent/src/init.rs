//! PID 1 duties before the agent can serve: mounts, kernel modules, root
//! switch, filesystem growth, power off.
//!
//! The initramfs holds `/init` (this binary), `/fastvm/modules.order` (module
//! file names, dependencies first) and the `.ko` files next to it. The kernel
//! command line names the root disk: `fastvm.root=/dev/vda`.

use std::ffi::CString;
use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn check(ret: libc::c_int, what: &str) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        Err(io::Error::new(e.kind(), format!("{what}: {e}")))
    }
}

pub(crate) fn mount(
    src: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f, d) = (cstr(src)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
    let ret = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    check(ret, &format!("mount {fstype} on {target}"))
}

fn load_module(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let params = cstr("")?;
    use std::os::fd::AsRawFd;
    // SAFETY: finit_module reads the module from a valid open fd; params is a valid C string.
    let ret =
        unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if ret == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(io::Error::new(
        e.kind(),
        format!("load {}: {e}", path.display()),
    ))
}

fn load_modules() -> io::Result<()> {
    let dir = Path::new("/fastvm");
    let order = match std::fs::read_to_string(dir.join("modules.order")) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        load_module(&dir.join(name))?;
    }
    Ok(())
}

fn cmdline_value(key: &str) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    cmdline.split_whitespace().find_map(|kv| {
        kv.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::to_owned)
    })
}

fn wait_for(path: &str, limit: Duration) -> io::Result<()> {
    let start = Instant::now();
    while !Path::new(path).exists() {
        if start.elapsed() > limit {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{path} did not appear"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// Remove the initramfs files (they would pin memory for the VM's lifetime).
fn clear_initramfs() {
    for entry in ["/init", "/fastvm"] {
        let p = Path::new(entry);
        let _ = if p.is_dir() {
            std::fs::remove_dir_all(p)
        } else {
            std::fs::remove_file(p)
        };
    }
}

/// Everything PID 1 does before serving.
pub(crate) fn early() -> io::Result<()> {
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755")?;
    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    mount(
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    )?;
    load_modules()?;
    let root = cmdline_value("fastvm.root").unwrap_or_else(|| "/dev/vda".to_owned());
    wait_for(&root, Duration::from_secs(10))?;
    mount(&root, "/newroot", "ext4", 0, "")?;
    clear_initramfs();
    for m in ["/dev", "/proc", "/sys"] {
        mount(m, &format!("/newroot{m}"), "", libc::MS_MOVE, "")?;
    }
    std::env::set_current_dir("/newroot")?;
    mount(".", "/", "", libc::MS_MOVE, "")?;
    let dot = cstr(".")?;
    // SAFETY: chroot with a valid C string; we are root in the initramfs.
    check(unsafe { libc::chroot(dot.as_ptr()) }, "chroot")?;
    std::env::set_current_dir("/")?;
    // An imported image may lack any of these mount points (even /dev/pts
    // and /dev/shm are not in a fresh devtmpfs): made first, as `mkdir -p`.
    for (dir, mode) in [
        ("/tmp", 0o1777),
        ("/run", 0o755),
        ("/dev/pts", 0o755),
        ("/dev/shm", 0o1777),
    ] {
        ensure_dir(dir, mode)?;
    }
    let nosuid_nodev = libc::MS_NOSUID | libc::MS_NODEV;
    mount("tmpfs", "/tmp", "tmpfs", nosuid_nodev, "mode=1777")?;
    mount("tmpfs", "/run", "tmpfs", nosuid_nodev, "mode=0755")?;
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    )?;
    mount("tmpfs", "/dev/shm", "tmpfs", nosuid_nodev, "mode=1777")?;
    // Best effort: loopback up (netlink: no `ip` needed) and the root file
    // system grown to the disk size (an image without resize2fs has a disk
    // made at its full size).
    if let Err(e) = crate::netlink::link_up("lo") {
        crate::log(&format!("loopback: {e}"));
    }
    run_quietly("resize2fs", &[root.as_str()]);
    Ok(())
}

/// `mkdir -p path` with `mode` for the directories made (not for one that
/// exists: the image's own modes stay).
fn ensure_dir(path: &str, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if Path::new(path).is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)))
        .map_err(|e| io::Error::new(e.kind(), format!("create {path}: {e}")))
}

/// Run a helper of the guest image if it has one; its absence is no error.
fn run_quietly(prog: &str, args: &[&str]) {
    let status = std::process::Command::new(prog)
        .args(args)
        .env("PATH", crate::exec::DEFAULT_PATH)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    match status {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => crate::log(&format!("{prog} failed to start: {e}")),
        Ok(_) => {}
    }
}

/// Sync and power the machine off (QEMU then exits). Never returns.
pub(crate) fn power_off() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if std::process::id() == 1 {
        // SAFETY: reboot with a valid command; only PID 1 gets here.
        unsafe { libc::reboot(libc::RB_POWER_OFF) };
    }
    std::process::exit(1)
}

/// Sync and reboot (with `-no-reboot`, QEMU exits too).
pub(crate) fn reboot() -> ! {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    if std::process::id() == 1 {
        // SAFETY: reboot with a valid command.
        unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    }
    std::process::exit(1)
}
