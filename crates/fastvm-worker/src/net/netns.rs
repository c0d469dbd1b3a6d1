//! Network namespaces and the commands run in them: `ip` for links,
//! addresses and routes, `nft` for the ruleset. A command runs in a
//! namespace by `setns` in its `pre_exec`, so no `ip netns exec` (and no
//! remount of /sys) is needed.

use crate::error::{Error, Result};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use tokio::io::AsyncWriteExt;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(name)
}

/// An open handle on the namespace `name`.
pub fn open(name: &str) -> Result<OwnedFd> {
    let f = std::fs::File::open(netns_path(name))
        .map_err(|e| Error::Network(format!("open netns {name}: {e}")))?;
    Ok(f.into())
}

/// Move the calling thread into the namespace `fd`.
pub fn enter(fd: &OwnedFd) -> std::io::Result<()> {
    // SAFETY: setns on a valid fd affects only the calling thread.
    let ret = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make /run/netns a shared mount point, as `ip netns add` does, so the
/// namespaces bound there are seen by mount namespaces created later.
fn prepare_run_dir() -> std::io::Result<()> {
    std::fs::create_dir_all(NETNS_DIR)?;
    let dir = c"/run/netns";
    let flags = libc::MS_SHARED | libc::MS_REC;
    // SAFETY: mount(2) with valid NUL-terminated strings and null data.
    if unsafe {
        libc::mount(
            c"".as_ptr(),
            dir.as_ptr(),
            c"none".as_ptr(),
            flags,
            std::ptr::null(),
        )
    } == 0
    {
        return Ok(());
    }
    if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(std::io::Error::last_os_error());
    }
    // Not a mount point yet: bind it onto itself, then make it shared.
    // SAFETY: as above.
    unsafe {
        if libc::mount(
            dir.as_ptr(),
            dir.as_ptr(),
            c"none".as_ptr(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        ) != 0
            || libc::mount(
                c"".as_ptr(),
                dir.as_ptr(),
                c"none".as_ptr(),
                flags,
                std::ptr::null(),
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

static RUN_DIR: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();

/// Create the named namespace `name` (like `ip netns add`, without a
/// process): `Ok(false)` when it exists already. `setup` runs inside the new
/// namespace before it is published (e.g. its sysctls).
pub async fn add(
    name: &str,
    setup: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> Result<bool> {
    RUN_DIR
        .get_or_init(|| prepare_run_dir().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::Network(format!("prepare {NETNS_DIR}: {e}")))?;
    let path = netns_path(name);
    // The file is the lock on the name: fails when another process has it.
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(Error::Network(format!("create {}: {e}", path.display()))),
    }
    let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|e| Error::Network(e.to_string()))?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("fastvm-netns".into())
        .spawn(move || {
            let result = (|| {
                // SAFETY: unshare(CLONE_NEWNET) moves only this thread, which ends below.
                if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // SAFETY: mount(2) with valid NUL-terminated strings and null data.
                let bound = unsafe {
                    libc::mount(
                        c"/proc/thread-self/ns/net".as_ptr(),
                        target.as_ptr(),
                        c"none".as_ptr(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                };
                if bound != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                setup()
            })();
            let _ = tx.send(result);
        });
    let result = match spawned {
        Ok(_) => rx
            .await
            .unwrap_or_else(|_| Err(std::io::Error::other("netns thread died"))),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        del(name);
        return Err(Error::Network(format!("create netns {name}: {e}")));
    }
    Ok(true)
}

/// Create the persistent tap `name` (no packet information, like `ip
/// tuntap add dev <name> mode tap`) in the calling thread's namespace.
pub fn create_tap(name: &str) -> std::io::Result<()> {
    /// `struct ifreq` as TUNSETIFF reads it: name, flags, padding to 40 bytes.
    #[repr(C)]
    struct IfReq {
        name: [libc::c_char; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!(
            "interface name {name} is too long"
        )));
    }
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes, `req` lives across
    // the call); TUNSETPERSIST takes an integer. The fd is valid.
    unsafe {
        if libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) != 0
            || libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) != 0
        {
            return Err(std::io::Error::other(format!(
                "create tap {name}: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Remove the named namespace `name` (like `ip netns del`): it goes away
/// with its last user.
pub fn del(name: &str) {
    let path = netns_path(name);
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 with a valid NUL-terminated path.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = std::fs::remove_file(&path);
}

/// Run `prog args` (in namespace `ns` when given) with `stdin` fed to it;
/// an error carries its stderr.
pub async fn run(ns: Option<&str>, prog: &str, args: &[&str], stdin: &str) -> Result<()> {
    exec(ns, prog, args, stdin, false).await.map(drop)
}

/// Like [`run`], returning the standard output.
pub async fn output(ns: Option<&str>, prog: &str, args: &[&str]) -> Result<Vec<u8>> {
    exec(ns, prog, args, "", true).await
}

async fn exec(
    ns: Option<&str>,
    prog: &str,
    args: &[&str],
    stdin: &str,
    capture: bool,
) -> Result<Vec<u8>> {
    let fd = ns.map(open).transpose()?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(if capture {
            std::process::Stdio::piped()
        } else {
            std::process::Stdio::null()
        })
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(fd) = fd.as_ref() {
        let raw = fd.as_raw_fd();
        // SAFETY: the closure only calls setns, which is async-signal-safe; `fd`
        // outlives the spawn below.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(raw, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| Error::Network(format!("run {prog}: {e}")))?;
    drop(fd);
    // Within a budget (`timeouts::NET_TOOL`): on overrun the child is
    // dropped, and with it killed (kill_on_drop, by pid).
    let input = child.stdin.take();
    let finished = async move {
        if let Some(mut input) = input {
            input
                .write_all(stdin.as_bytes())
                .await
                .map_err(|e| Error::Network(format!("{prog}: write stdin: {e}")))?;
        }
        child
            .wait_with_output()
            .await
            .map_err(|e| Error::Network(format!("{prog}: {e}")))
    };
    let out = tokio::time::timeout(crate::timeouts::NET_TOOL, finished)
        .await
        .map_err(|_| Error::Timeout {
            what: format!("{prog} {}", args.join(" ")),
            after: crate::timeouts::NET_TOOL,
        })??;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let where_ = ns.map(|n| format!(" in {n}")).unwrap_or_default();
        return Err(Error::Network(format!(
            "{prog} {}{where_} failed: {}",
            args.join(" "),
            err.trim()
        )));
    }
    Ok(out.stdout)
}

/// `ip -batch -` (in `ns` when given) with one command per line.
pub async fn ip_batch(ns: Option<&str>, lines: &str) -> Result<()> {
    run(ns, "ip", &["-batch", "-"], lines).await
}

/// `nft -f -` in `ns`.
pub async fn nft(ns: Option<&str>, script: &str) -> Result<()> {
    run(ns, "nft", &["-f", "-"], script).await
}

/// Run `f` on a new thread that has entered namespace `name`: sockets it
/// creates belong to that namespace for their whole life.
pub async fn on_thread_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let fd = open(name)?;
    let name = name.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("fastvm-netns".into())
        .spawn(move || {
            let result = enter(&fd).and_then(|()| f());
            let _ = tx.send(result);
        })
        .map_err(|e| Error::Network(format!("spawn netns thread: {e}")))?;
    rx.await
        .map_err(|_| Error::Network("netns thread died".into()))?
        .map_err(|e| Error::Network(format!("in netns {name}: {e}")))
}
