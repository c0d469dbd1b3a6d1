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
    let f = std::fs::File::open(netns_path(name)).map_err(|e| Error::Network(format!("open netns {name}: {e}")))?;
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

/// Run `prog args` (in namespace `ns` when given) with `stdin` fed to it;
/// an error carries its stderr.
pub async fn run(ns: Option<&str>, prog: &str, args: &[&str], stdin: &str) -> Result<()> {
    let fd = ns.map(open).transpose()?;
    let mut cmd = tokio::process::Command::new(prog);
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
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
    let mut child = cmd.spawn().map_err(|e| Error::Network(format!("run {prog}: {e}")))?;
    drop(fd);
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.as_bytes()).await.map_err(|e| Error::Network(format!("{prog}: write stdin: {e}")))?;
    }
    let out = child.wait_with_output().await.map_err(|e| Error::Network(format!("{prog}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let where_ = ns.map(|n| format!(" in {n}")).unwrap_or_default();
        return Err(Error::Network(format!("{prog} {}{where_} failed: {}", args.join(" "), err.trim())));
    }
    Ok(())
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
pub async fn on_thread_in<T: Send + 'static>(name: &str, f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> Result<T> {
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
    rx.await.map_err(|_| Error::Network("netns thread died".into()))?.map_err(|e| Error::Network(format!("in netns {name}: {e}")))
}
