//! Confinement of a VM's QEMU process: the uid it runs as, the files it can
//! reach, and the privileged work done for it before it drops root.
//!
//! ```text
//!  worker (root)                               QEMU child, in pre_exec (still root)
//!  listen qmp.sock, agent.sock (root, 0600)    setsid, signals reset
//!  open memory state file (restore)           setns(VM netns); open /dev/net/tun, TUNSETIFF tap0
//!  sealed memfd copy of golden RAM (restore)   write 0 to the VM cgroup's cgroup.procs
//!  chown the VM's writable layer to its uid    dup2 every fd to its fixed number (FD_*)
//!                                              setgroups([]), setresgid, setresuid (caps gone)
//!                                              exec qemu ... -sandbox on,...=deny
//! ```
//!
//! * **Uid.** Each VM gets uid = gid = [`UID_BASE`] + n, n < [`UID_COUNT`],
//!   picked from a hash of the VM id (probing past uids of live VMs) and
//!   recorded in its `spec.json` ([`crate::hypervisor::LaunchSpec::uid`]), so
//!   a restarted worker re-adopts the process with the uid it already has.
//!   No `/etc/passwd` entry is needed. The range sits far above login uids
//!   and above the usual subuid ranges of user namespaces.
//! * **Files.** The data dir, `vms/`, `layers/` and `golden/` are `0711`
//!   (traversable, not listable); other entries of the data dir (the
//!   control plane's database, keys, staging) lose all group/other bits.
//!   A VM directory is `root:<vm gid> 0710`: QEMU reaches only the snapshot
//!   socket the worker creates there for it; its sockets, logs and records
//!   are root's (QEMU gets the sockets as inherited fds). A VM's writable
//!   layer is `<uid>:<gid> 0600`; frozen layers (snapshots, golden) are
//!   `root 0644` under unguessable names in the unlistable `layers/`.
//! * **Golden RAM.** QEMU 7.2 opens a private `memory-backend-file` read-write
//!   (there is no `rom=off` before 8.2), so a restored VM never gets the
//!   golden RAM file itself (root `0600`): it gets a memfd copy, sealed
//!   against writes ([`sealed_copy`]), which it maps copy-on-write. One memfd
//!   per golden RAM file and worker process, shared by every restore.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// First uid (and gid) of VM processes.
pub const UID_BASE: u32 = 1_900_000_000;
/// Number of VM uids.
pub const UID_COUNT: u32 = 1 << 20;

/// Fixed fd numbers QEMU finds its inherited descriptors at.
pub const FD_QMP: RawFd = 3;
pub const FD_AGENT: RawFd = 4;
pub const FD_TAP: RawFd = 5;
pub const FD_INCOMING: RawFd = 6;
pub const FD_RAM: RawFd = 7;

/// True when the worker runs as root (and so can confine VM processes).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The uid for VM `id`: a hash of the id into the range, then the next one
/// not in `used`.
pub fn pick_uid(id: &str, used: &std::collections::HashSet<u32>) -> u32 {
    use sha2::Digest;
    let h = sha2::Sha256::digest(id.as_bytes());
    let start = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) % UID_COUNT;
    (0..UID_COUNT)
        .map(|i| UID_BASE + (start + i) % UID_COUNT)
        .find(|u| !used.contains(u))
        .unwrap_or(UID_BASE + start)
}

fn chown(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
}

fn chmod(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Create (or truncate) `path` as a file of its creator's alone (`0600`):
/// records, logs and state files in places a VM uid can traverse.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// A file only the VM's QEMU (and root) may read and write.
pub fn give_to_vm(path: &Path, uid: u32) -> std::io::Result<()> {
    chown(path, uid, uid)?;
    chmod(path, 0o600)
}

/// A file every VM may read and none may write (frozen disk layers).
pub fn make_shared_readonly(path: &Path) -> std::io::Result<()> {
    chown(path, 0, 0)?;
    chmod(path, 0o644)
}

/// A file of root's alone (golden RAM, once captured).
pub fn make_root_only(path: &Path) -> std::io::Result<()> {
    chown(path, 0, 0)?;
    chmod(path, 0o600)
}

/// A VM state directory: root's, traversable by the VM's group only.
pub fn secure_vm_dir(dir: &Path, uid: u32) -> std::io::Result<()> {
    chown(dir, 0, uid)?;
    chmod(dir, 0o710)
}

/// Why a VM's QEMU (an unprivileged uid of its own) cannot reach files under
/// `path`: the first of `path` and the directories above it that others may
/// not traverse, and what to do. `None` when every one has the `o+x` bit.
pub fn unreachable_by_vms(path: &Path) -> Option<String> {
    let mut dirs: Vec<&Path> = path.ancestors().collect();
    dirs.reverse();
    for dir in dirs {
        let Ok(meta) = std::fs::metadata(dir) else {
            continue;
        };
        if meta.is_dir() && meta.permissions().mode() & 0o001 == 0 {
            return Some(format!(
                "VM processes run as their own unprivileged uid and must traverse {} and every \
                 directory above it, but {} is mode {:04o}: run `chmod o+x {}` or choose a directory others \
                 can traverse (e.g. /var/lib/fastvm)",
                path.display(),
                dir.display(),
                meta.permissions().mode() & 0o7777,
                dir.display()
            ));
        }
    }
    None
}

/// Data dir permissions (see the module docs). `traversable` are the
/// entries QEMU processes reach files in; every other entry loses its
/// group/other bits.
pub fn secure_data_dir(data_dir: &Path, traversable: &[&str]) -> std::io::Result<()> {
    chmod(data_dir, 0o711)?;
    for entry in std::fs::read_dir(data_dir)?.flatten() {
        let name = entry.file_name();
        let meta = match std::fs::symlink_metadata(entry.path()) {
            Ok(m) if !m.file_type().is_symlink() => m,
            _ => continue,
        };
        if meta.is_dir() && traversable.iter().any(|t| name == *t) {
            chmod(&entry.path(), 0o711)?;
        } else {
            let mode = meta.permissions().mode() & 0o7700;
            chmod(&entry.path(), mode)?;
        }
    }
    Ok(())
}

/// A copy of `path` in a memfd sealed against writes, growth and shrinking:
/// any uid may open it (`/proc/self/fd/N`) and map it privately, nobody can
/// change its content. Holes stay holes.
pub fn sealed_copy(path: &Path) -> std::io::Result<OwnedFd> {
    let src = std::fs::File::open(path)?;
    let len = src.metadata()?.len();
    let name = c"fastvm-golden-ram";
    // SAFETY: memfd_create with a valid C string; the returned fd is owned below.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let mem = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = std::fs::File::from(mem.try_clone()?);
    file.set_len(len)?;
    crate::ram_capture::copy_data(&src, &file, len)?;
    let (s, d) = (src.as_raw_fd(), mem.as_raw_fd());
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a valid memfd.
    if unsafe { libc::fcntl(d, libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The page cache of the file is not needed any more (the memfd has the pages).
    // SAFETY: advice on a valid fd.
    unsafe { libc::posix_fadvise(s, 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(mem)
}

/// `struct ifreq` as TUNSETIFF reads it: name, flags, padding to 40 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Most fds a child is given.
const MAX_FDS: usize = 8;

/// Everything the forked child does before exec, prepared in the parent so
/// that the child only makes async-signal-safe syscalls on plain data.
#[derive(Clone, Copy)]
pub struct ChildSetup {
    /// (source fd in the parent, fixed number in the child).
    fds: [(RawFd, RawFd); MAX_FDS],
    nfds: usize,
    netns: Option<RawFd>,
    tap: Option<IfReq>,
    /// `cgroup.procs` files to write "0" to (opened in the parent).
    cgroup_procs: [RawFd; MAX_FDS],
    ncgroups: usize,
    /// Drop to this uid (= gid); `None` stays root (tests of old records).
    uid: Option<u32>,
}

impl ChildSetup {
    pub fn new(uid: Option<u32>) -> Self {
        ChildSetup {
            fds: [(-1, -1); MAX_FDS],
            nfds: 0,
            netns: None,
            tap: None,
            cgroup_procs: [-1; MAX_FDS],
            ncgroups: 0,
            uid,
        }
    }

    /// Give the child `fd` as number `target`; `fd` must stay open until spawned.
    pub fn pass_fd(&mut self, fd: RawFd, target: RawFd) -> std::io::Result<()> {
        let slot = self
            .fds
            .get_mut(self.nfds)
            .ok_or_else(|| std::io::Error::other("too many fds for QEMU"))?;
        *slot = (fd, target);
        self.nfds += 1;
        Ok(())
    }

    /// Enter the network namespace `fd` and open its tap `name` as [`FD_TAP`].
    pub fn tap_in_netns(&mut self, netns: RawFd, name: &str) -> std::io::Result<()> {
        if name.len() >= libc::IFNAMSIZ {
            return Err(std::io::Error::other(format!(
                "interface name {name} is too long"
            )));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            // The flags QEMU itself uses when it opens a tap (vnet header on):
            // snapshots record the virtio-net features that follow from them.
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        self.netns = Some(netns);
        self.tap = Some(req);
        Ok(())
    }

    /// Enter the cgroup whose `cgroup.procs` is open as `fd` before exec.
    pub fn join_cgroup(&mut self, fd: RawFd) -> std::io::Result<()> {
        let slot = self
            .cgroup_procs
            .get_mut(self.ncgroups)
            .ok_or_else(|| std::io::Error::other("too many cgroups"))?;
        *slot = fd;
        self.ncgroups += 1;
        Ok(())
    }

    /// Run in the child between fork and exec.
    ///
    /// # Safety
    /// Only call in a freshly forked child (`pre_exec`): it changes process
    /// credentials and file descriptors. It makes only async-signal-safe
    /// syscalls and does not allocate.
    pub unsafe fn run_in_child(&self) -> std::io::Result<()> {
        fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
            if ret < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(ret)
            }
        }
        // SAFETY: plain syscalls on fds and data prepared by the parent, all
        // valid until the spawn returns; `req` lives across the ioctl.
        unsafe {
            // Own session: no terminal signals; QEMU outlives the worker.
            libc::setsid();
            for &fd in &self.cgroup_procs[..self.ncgroups] {
                check(libc::write(fd, b"0".as_ptr().cast(), 1) as libc::c_int)?;
            }
            // Copies of every source above the fixed numbers first, so that no
            // dup2 overwrites a source not yet moved.
            let mut tmp = [-1; MAX_FDS + 1];
            for (i, &(src, _)) in self.fds[..self.nfds].iter().enumerate() {
                tmp[i] = check(libc::fcntl(src, libc::F_DUPFD_CLOEXEC, 64))?;
            }
            let mut targets = self.fds;
            let mut n = self.nfds;
            if let (Some(ns), Some(mut req)) = (self.netns, self.tap) {
                check(libc::setns(ns, libc::CLONE_NEWNET))?;
                let tun = check(libc::open(
                    c"/dev/net/tun".as_ptr(),
                    libc::O_RDWR | libc::O_CLOEXEC,
                ))?;
                check(libc::ioctl(tun, libc::TUNSETIFF, &mut req as *mut IfReq))?;
                tmp[n] = check(libc::fcntl(tun, libc::F_DUPFD_CLOEXEC, 64))?;
                libc::close(tun);
                if n < MAX_FDS {
                    targets[n] = (-1, FD_TAP);
                }
                n += 1;
            } else if let Some(ns) = self.netns {
                check(libc::setns(ns, libc::CLONE_NEWNET))?;
            }
            for i in 0..n.min(MAX_FDS) {
                // dup2 leaves the new number without FD_CLOEXEC: QEMU inherits it.
                check(libc::dup2(tmp[i], targets[i].1))?;
            }
            // Nothing else crosses exec: descriptors the worker inherited
            // without FD_CLOEXEC (a jobserver pipe, say) are closed at exec.
            // (Linux >= 5.11; older kernels keep them.)
            libc::syscall(
                libc::SYS_close_range,
                FD_RAM as libc::c_uint + 1,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if let Some(id) = self.uid {
                check(libc::setgroups(0, std::ptr::null()))?;
                check(libc::setresgid(id, id, id))?;
                // From uid 0 to a non-zero uid: the permitted, effective and
                // ambient capability sets are cleared by the kernel.
                check(libc::setresuid(id, id, id))?;
                check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
            }
        }
        Ok(())
    }
}

/// `path` as a C string (for paths handed to raw syscalls).
pub fn cpath(path: &Path) -> std::io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_ancestor_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let closed = dir.path().join("closed");
        let data = closed.join("data");
        std::fs::create_dir_all(&data).expect("mkdir");
        chmod(dir.path(), 0o755).expect("chmod");
        chmod(&closed, 0o700).expect("chmod");
        let why = unreachable_by_vms(&data).expect("refused");
        assert!(
            why.contains(&closed.display().to_string()) && why.contains("0700"),
            "{why}"
        );
        chmod(&closed, 0o711).expect("chmod");
        assert_eq!(unreachable_by_vms(&data), None);
    }

    #[test]
    fn uids_are_in_range_stable_and_distinct() {
        let mut used = std::collections::HashSet::new();
        let a = pick_uid("vm-a", &used);
        assert_eq!(a, pick_uid("vm-a", &used));
        assert!((UID_BASE..UID_BASE + UID_COUNT).contains(&a));
        used.insert(a);
        let again = pick_uid("vm-a", &used);
        assert_ne!(again, a);
        assert!((UID_BASE..UID_BASE + UID_COUNT).contains(&again));
    }

    #[test]
    fn sealed_copy_keeps_content_and_refuses_writes() -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("ram");
        let f = std::fs::File::create(&path)?;
        f.set_len(8 << 20)?;
        f.write_all_at(b"hello", 4 << 20)?;
        let mem = std::fs::File::from(sealed_copy(&path)?);
        let mut buf = [0u8; 5];
        mem.read_exact_at(&mut buf, 4 << 20)?;
        assert_eq!(&buf, b"hello");
        assert_eq!(mem.metadata()?.len(), 8 << 20);
        assert!(mem.write_all_at(b"x", 0).is_err());
        Ok(())
    }
}
