//! Pseudo-terminals for execs that ask for one ([`fastvm_agent_proto::PtySpec`]).
//!
//! ```text
//!  open(cols, rows): posix_openpt(O_RDWR|O_NOCTTY|O_CLOEXEC), grantpt, unlockpt,
//!                    ptsname_r -> open the slave (O_NOCTTY|O_CLOEXEC), TIOCSWINSZ
//!  child:            stdin/stdout/stderr = the slave; in pre_exec: setsid() and
//!                    TIOCSCTTY on fd 0, so the PTY is its controlling terminal
//!                    (job control, Ctrl-C -> SIGINT to the foreground group)
//!  agent:            reads and writes the master (non-blocking, through AsyncFd);
//!                    resize = TIOCSWINSZ on the master (the kernel sends SIGWINCH)
//! ```
//!
//! Every descriptor is opened close-on-exec, so no other child of the agent
//! inherits a terminal it does not own. A read of the master fails with EIO
//! once no process holds the slave any more: that is the terminal's end of file.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use tokio::io::unix::AsyncFd;

/// The agent's end of a terminal, shared by the output pump, the stdin
/// feeder and resize requests.
pub(crate) type Master = Arc<AsyncFd<OwnedFd>>;

/// A fresh terminal: the master (non-blocking, registered with tokio) and the
/// slave (for the child's stdio).
pub(crate) struct Pty {
    pub(crate) master: Master,
    pub(crate) slave: OwnedFd,
}

fn check(ret: libc::c_int, what: &str) -> io::Result<libc::c_int> {
    if ret < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(ret)
}

/// Open a new terminal of `cols` x `rows`.
pub(crate) fn open(cols: u16, rows: u16) -> io::Result<Pty> {
    // SAFETY: posix_openpt takes flags only; the result is checked.
    let m = check(
        unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) },
        "posix_openpt",
    )?;
    // SAFETY: `m` is a descriptor we just opened and own.
    let master = unsafe { OwnedFd::from_raw_fd(m) };
    // SAFETY: grantpt/unlockpt act on our open master descriptor.
    check(unsafe { libc::grantpt(m) }, "grantpt")?;
    // SAFETY: as above.
    check(unsafe { libc::unlockpt(m) }, "unlockpt")?;
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: the buffer is valid for `name.len()` bytes; ptsname_r NUL-terminates on success.
    let rc = unsafe { libc::ptsname_r(m, name.as_mut_ptr(), name.len()) };
    if rc != 0 {
        return Err(io::Error::new(
            io::Error::from_raw_os_error(rc).kind(),
            format!("ptsname_r: {}", io::Error::from_raw_os_error(rc)),
        ));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    // SAFETY: `path` is a valid C string; the result is checked.
    let s = check(
        unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        },
        "open the terminal's slave",
    )?;
    // SAFETY: `s` is a descriptor we just opened and own.
    let slave = unsafe { OwnedFd::from_raw_fd(s) };
    set_size(&master, cols, rows)?;
    // SAFETY: fcntl on our own descriptor.
    let flags = check(unsafe { libc::fcntl(m, libc::F_GETFL) }, "fcntl")?;
    // SAFETY: fcntl on our own descriptor.
    let set = unsafe { libc::fcntl(m, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    check(set, "fcntl")?;
    // SAFETY: an OwnedFd is open, owned and always returns the same descriptor
    // until it is dropped together with the AsyncFd.
    let master = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
    Ok(Pty {
        master: Arc::new(master),
        slave,
    })
}

/// Set the window size of the terminal behind `fd` (master or slave).
pub(crate) fn set_size(fd: &impl AsRawFd, cols: u16, rows: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows.max(1),
        ws_col: cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    check(r, "TIOCSWINSZ")?;
    Ok(())
}

/// In the child, after stdio is the slave: a new session whose controlling
/// terminal is fd 0. Only async-signal-safe calls (runs between fork and exec).
pub(crate) fn make_controlling_terminal() -> io::Result<()> {
    // SAFETY: setsid and ioctl are async-signal-safe and touch no parent memory.
    unsafe {
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Read what the terminal printed; `Ok(0)` once every slave is closed (EIO).
pub(crate) async fn read(master: &Master, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = master.readable().await?;
        let r = guard.try_io(|fd| {
            // SAFETY: `buf` is valid for `buf.len()` writable bytes.
            let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

/// Write all of `data` to the terminal (keystrokes).
pub(crate) async fn write_all(master: &Master, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let mut guard = master.writable().await?;
        let r = guard.try_io(|fd| {
            // SAFETY: `data` is valid for `data.len()` readable bytes.
            let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match r {
            Ok(Ok(n)) => data = &data[n..],
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
    Ok(())
}

/// argv of the login shell: `/bin/bash -l`, else `/bin/sh -l`; an error
/// when the guest has neither (a distroless image).
pub(crate) fn login_shell() -> Result<Vec<String>, String> {
    login_shell_in(std::path::Path::new("/"))
}

fn login_shell_in(root: &std::path::Path) -> Result<Vec<String>, String> {
    ["/bin/bash", "/bin/sh"]
        .into_iter()
        .find(|shell| root.join(&shell[1..]).exists())
        .map(|shell| vec![shell.to_owned(), "-l".to_owned()])
        .ok_or_else(|| {
            "no login shell in this guest: neither /bin/bash nor /bin/sh exists \
             (run a command instead)"
                .to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_shell_prefers_bash_then_sh_then_fails() {
        let dir = std::env::temp_dir().join(format!("fastvm-agent-shell-{}", std::process::id()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).expect("must succeed");
        let err = login_shell_in(&dir).expect_err("must fail");
        assert!(err.contains("neither /bin/bash nor /bin/sh"), "{err}");
        std::fs::write(bin.join("sh"), "").expect("must succeed");
        assert_eq!(
            login_shell_in(&dir).expect("must succeed"),
            ["/bin/sh", "-l"]
        );
        std::fs::write(bin.join("bash"), "").expect("must succeed");
        assert_eq!(
            login_shell_in(&dir).expect("must succeed"),
            ["/bin/bash", "-l"]
        );
        std::fs::remove_dir_all(&dir).expect("must succeed");
    }
}
