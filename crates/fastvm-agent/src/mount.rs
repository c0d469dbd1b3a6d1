//! Mounts the host asks for ([`Control::Mount`] / [`Control::Unmount`],
//! protocol v4): volumes served over NFS by the worker, mounted at the path
//! the user chose. The agent makes the mount point; it never interprets the
//! source or options (the kernel does).
//!
//! [`Control::Mount`]: fastvm_agent_proto::Control::Mount
//! [`Control::Unmount`]: fastvm_agent_proto::Control::Unmount

use fastvm_agent_proto::UNMOUNT_BUSY;
use std::ffi::CString;
use std::path::Path;

fn c(s: &str, what: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} contains a NUL byte"))
}

fn checked_target(target: &str) -> Result<(), String> {
    let p = Path::new(target);
    if !p.is_absolute() || target == "/" || target.split('/').any(|c| c == "..") {
        return Err(format!(
            "mount point {target:?} must be an absolute path below /"
        ));
    }
    Ok(())
}

/// `mkdir -p target`, then mount(2).
pub(crate) fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    options: &str,
    read_only: bool,
) -> Result<(), String> {
    checked_target(target)?;
    std::fs::create_dir_all(target).map_err(|e| format!("create {target}: {e}"))?;
    let (src, tgt, fs, opts) = (
        c(source, "source")?,
        c(target, "target")?,
        c(fstype, "file system type")?,
        c(options, "options")?,
    );
    let flags = if read_only { libc::MS_RDONLY } else { 0 } | libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: NUL-terminated strings; `data` is the text options string the
    // kernel's file system parses.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            opts.as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(format!(
            "mount {source} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// umount2(2); EBUSY answers [`UNMOUNT_BUSY`] unless `lazy`.
pub(crate) fn unmount(target: &str, lazy: bool) -> Result<(), String> {
    checked_target(target)?;
    let tgt = c(target, "target")?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: NUL-terminated path.
    if unsafe { libc::umount2(tgt.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        // Nothing mounted there (or no such directory): already done.
        Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
        Some(libc::EBUSY) => Err(format!("{UNMOUNT_BUSY} {target} is in use by a process")),
        _ => Err(format!("unmount {target}: {e}")),
    }
}
