//! One VM's view of its attached volumes, as an NFSv3 file system
//! (`nfs3_server`'s [`NfsFileSystem`]).
//!
//! ```text
//!  /                      export root (virtual, read-only): one entry per attached volume
//!  /vol_<hex>/...         the volume's host directory <data>/volumes/<id>/data
//! ```
//!
//! Every object is named by a [`VolHandle`] (the host kernel's file handle,
//! sealed to its volume); a call opens it with `open_by_handle_at` and works
//! on file descriptors: names are single components looked up under a
//! directory without following symlinks, `..` of a volume's root is the
//! export root, and renames never cross volumes. A handle of a volume that is
//! no longer attached is stale. Read-only attachments (and `ro` volumes)
//! answer `NFS3ERR_ROFS` to every change.
//!
//! Size: a volume's size is a limit on the bytes its files occupy (blocks,
//! counted at open and kept up to date by the writes and removals made
//! through this server). A write that would extend past it gets
//! `NFS3ERR_NOSPC`; growing the volume lifts the limit at once in every
//! attached guest, without a remount.

use super::handle::{volume_id, Named, Sealer, VolHandle, VolumeKey};
use super::sys::{self, SetTime};
use nfs3_server::nfs3_types::nfs3::{
    createverf3, fattr3, filename3, ftype3, nfspath3, nfsstat3, nfstime3, sattr3, set_atime,
    set_mtime, specdata3, stable_how, Nfs3Option,
};
use nfs3_server::vfs::{
    DirEntryPlus, NextResult, NfsFileSystem, NfsReadFileSystem, ReadDirPlusIterator,
};
use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// A volume's directory on this host, open for serving.
#[derive(Debug)]
pub struct HostVolume {
    key: VolumeKey,
    dir: PathBuf,
    /// The directory, open read-only: the mount fd of
    /// `open_by_handle_at` and the identity `..` is checked against.
    root: OwnedFd,
    root_id: (u64, u64),
    root_kernel: (i32, Vec<u8>),
    size_bytes: AtomicU64,
    used_bytes: AtomicU64,
    read_only: AtomicBool,
}

impl HostVolume {
    /// Opens the directory `dir` (created if missing) of volume `id`,
    /// counting the bytes its files occupy.
    pub fn open(id: &str, dir: &Path, size_bytes: u64, read_only: bool) -> io::Result<HostVolume> {
        let key = super::handle::volume_key(id).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{id} is not a volume id"),
            )
        })?;
        std::fs::create_dir_all(dir)?;
        let root = sys::open_dir_path(dir)?;
        let st = sys::stat(root.as_fd())?;
        let root_kernel = sys::kernel_handle(root.as_fd())?;
        let used = usage(dir);
        Ok(HostVolume {
            key,
            dir: dir.to_owned(),
            root,
            root_id: (st.st_dev, st.st_ino),
            root_kernel,
            size_bytes: AtomicU64::new(size_bytes),
            used_bytes: AtomicU64::new(used),
            read_only: AtomicBool::new(read_only),
        })
    }

    pub fn id(&self) -> String {
        volume_id(&self.key)
    }

    pub fn key(&self) -> VolumeKey {
        self.key
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes.load(Ordering::Relaxed)
    }

    /// Bytes the volume's files occupy, as this server counts them.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    /// A new size limit, effective at once for every attached guest.
    pub fn set_size_bytes(&self, size: u64) {
        self.size_bytes.store(size, Ordering::Relaxed);
    }

    pub fn set_read_only(&self, ro: bool) {
        self.read_only.store(ro, Ordering::Relaxed);
    }

    /// Recounts the bytes used (e.g. after files changed outside the server).
    pub fn recount(&self) -> u64 {
        let used = usage(&self.dir);
        self.used_bytes.store(used, Ordering::Relaxed);
        used
    }

    fn fsid(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.key[..8]);
        u64::from_le_bytes(b)
    }

    fn add_used(&self, delta: i64) {
        let _ = self
            .used_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(if delta >= 0 {
                    u.saturating_add(delta as u64)
                } else {
                    u.saturating_sub(delta.unsigned_abs())
                })
            });
    }
}

/// Bytes occupied by the files under `dir` (symlinks not followed).
fn usage(dir: &Path) -> u64 {
    let mut total = 0u64;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            total = total.saturating_add(std::os::unix::fs::MetadataExt::blocks(&meta) * 512);
            if meta.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

#[derive(Debug, Clone)]
struct Attached {
    volume: Arc<HostVolume>,
    read_only: bool,
}

impl Attached {
    fn writable(&self) -> Result<(), nfsstat3> {
        if self.read_only || self.volume.read_only.load(Ordering::Relaxed) {
            Err(nfsstat3::NFS3ERR_ROFS)
        } else {
            Ok(())
        }
    }
}

#[derive(Debug)]
struct Inner {
    sealer: Sealer,
    attached: RwLock<BTreeMap<VolumeKey, Attached>>,
    /// Changes whenever the set of attached volumes does (the export
    /// root's mtime, so guests re-read its listing).
    root_version: AtomicU64,
}

/// One VM's export: cheap to clone, all clones share the attachments.
#[derive(Debug, Clone)]
pub struct ExportFs {
    inner: Arc<Inner>,
}

/// What a handle resolved to.
enum Target {
    Root,
    Object {
        att: Attached,
        kind: i32,
        kernel: Vec<u8>,
    },
}

fn io_err(e: io::Error) -> nfsstat3 {
    match e.raw_os_error() {
        Some(libc::ENOENT) => nfsstat3::NFS3ERR_NOENT,
        Some(libc::EEXIST) => nfsstat3::NFS3ERR_EXIST,
        Some(libc::ENOTDIR) => nfsstat3::NFS3ERR_NOTDIR,
        Some(libc::EISDIR) => nfsstat3::NFS3ERR_ISDIR,
        Some(libc::ENOTEMPTY) => nfsstat3::NFS3ERR_NOTEMPTY,
        Some(libc::EACCES) => nfsstat3::NFS3ERR_ACCES,
        Some(libc::EPERM) => nfsstat3::NFS3ERR_PERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => nfsstat3::NFS3ERR_NOSPC,
        Some(libc::EROFS) => nfsstat3::NFS3ERR_ROFS,
        Some(libc::ENAMETOOLONG) => nfsstat3::NFS3ERR_NAMETOOLONG,
        Some(libc::ESTALE) => nfsstat3::NFS3ERR_STALE,
        Some(libc::EXDEV) => nfsstat3::NFS3ERR_XDEV,
        Some(libc::EFBIG) => nfsstat3::NFS3ERR_FBIG,
        Some(libc::EINVAL) | Some(libc::ELOOP) => nfsstat3::NFS3ERR_INVAL,
        _ => nfsstat3::NFS3ERR_IO,
    }
}

/// A single directory entry name: not empty, no `/` or NUL, at most 255 bytes.
fn component(name: &[u8]) -> Result<CString, nfsstat3> {
    if name.len() > 255 {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    if name.is_empty() || name.contains(&b'/') || name == b"." || name == b".." {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    CString::new(name).map_err(|_| nfsstat3::NFS3ERR_INVAL)
}

fn time(sec: i64, nsec: i64) -> nfstime3 {
    nfstime3 {
        seconds: u32::try_from(sec).unwrap_or(0),
        nseconds: u32::try_from(nsec).unwrap_or(0),
    }
}

fn attr_of(st: &libc::stat, fsid: u64) -> fattr3 {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => ftype3::NF3DIR,
        libc::S_IFLNK => ftype3::NF3LNK,
        libc::S_IFBLK => ftype3::NF3BLK,
        libc::S_IFCHR => ftype3::NF3CHR,
        libc::S_IFSOCK => ftype3::NF3SOCK,
        libc::S_IFIFO => ftype3::NF3FIFO,
        _ => ftype3::NF3REG,
    };
    fattr3 {
        type_: kind,
        mode: st.st_mode & 0o7777,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        size: u64::try_from(st.st_size).unwrap_or(0),
        used: u64::try_from(st.st_blocks).unwrap_or(0) * 512,
        rdev: specdata3::default(),
        fsid,
        fileid: st.st_ino,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
    }
}

fn is_kind(st: &libc::stat, kind: libc::mode_t) -> bool {
    st.st_mode & libc::S_IFMT == kind
}

fn set_time_of(t: &set_atime) -> SetTime {
    match t {
        set_atime::DONT_CHANGE => SetTime::Keep,
        set_atime::SET_TO_SERVER_TIME => SetTime::Now,
        set_atime::SET_TO_CLIENT_TIME(t) => SetTime::At(t.seconds, t.nseconds),
    }
}

fn set_mtime_of(t: &set_mtime) -> SetTime {
    match t {
        set_mtime::DONT_CHANGE => SetTime::Keep,
        set_mtime::SET_TO_SERVER_TIME => SetTime::Now,
        set_mtime::SET_TO_CLIENT_TIME(t) => SetTime::At(t.seconds, t.nseconds),
    }
}

fn opt<
    T: Copy + nfs3_server::nfs3_types::xdr_codec::Pack + nfs3_server::nfs3_types::xdr_codec::Unpack,
>(
    o: &Nfs3Option<T>,
) -> Option<T> {
    match o {
        Nfs3Option::Some(v) => Some(*v),
        Nfs3Option::None => None,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, nfsstat3> + Send + 'static,
) -> Result<T, nfsstat3> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or(Err(nfsstat3::NFS3ERR_SERVERFAULT))
}

impl ExportFs {
    pub fn new(sealer: Sealer) -> ExportFs {
        ExportFs {
            inner: Arc::new(Inner {
                sealer,
                attached: RwLock::new(BTreeMap::new()),
                root_version: AtomicU64::new(1),
            }),
        }
    }

    /// Serves `volume` under `/vol_<hex>` (again: updates the read-only flag).
    pub fn attach(&self, volume: Arc<HostVolume>, read_only: bool) {
        if let Ok(mut a) = self.inner.attached.write() {
            a.insert(volume.key, Attached { volume, read_only });
        }
        self.inner.root_version.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops serving the volume: its handles become stale. False when it
    /// was not attached.
    pub fn detach(&self, volume: &VolumeKey) -> bool {
        let removed = self
            .inner
            .attached
            .write()
            .map(|mut a| a.remove(volume).is_some())
            .unwrap_or(false);
        self.inner.root_version.fetch_add(1, Ordering::Relaxed);
        removed
    }

    /// Ids of the attached volumes.
    pub fn attached(&self) -> Vec<String> {
        self.inner
            .attached
            .read()
            .map(|a| a.keys().map(volume_id).collect())
            .unwrap_or_default()
    }

    fn get(&self, key: &VolumeKey) -> Option<Attached> {
        self.inner.attached.read().ok()?.get(key).cloned()
    }

    fn resolve(&self, h: &VolHandle) -> Result<Target, nfsstat3> {
        match self.inner.sealer.open(h) {
            None => Err(nfsstat3::NFS3ERR_BADHANDLE),
            Some(Named::ExportRoot) => Ok(Target::Root),
            Some(Named::Object {
                volume,
                kernel_type,
                kernel,
            }) => {
                let att = self.get(&volume).ok_or(nfsstat3::NFS3ERR_STALE)?;
                Ok(Target::Object {
                    att,
                    kind: kernel_type,
                    kernel,
                })
            }
        }
    }

    /// The handle's attachment and the object opened with `flags`.
    fn open_object(&self, h: &VolHandle, flags: i32) -> Result<(Attached, OwnedFd), nfsstat3> {
        match self.resolve(h)? {
            Target::Root => Err(nfsstat3::NFS3ERR_ACCES),
            Target::Object { att, kind, kernel } => {
                let fd = sys::open_by_handle(att.volume.root.as_fd(), kind, &kernel, flags)
                    .map_err(io_err)?;
                Ok((att, fd))
            }
        }
    }

    fn seal_fd(&self, att: &Attached, fd: &OwnedFd) -> Result<VolHandle, nfsstat3> {
        let (kind, kernel) = sys::kernel_handle(fd.as_fd()).map_err(io_err)?;
        self.inner
            .sealer
            .seal(&att.volume.key, kind, &kernel)
            .ok_or(nfsstat3::NFS3ERR_SERVERFAULT)
    }

    fn volume_root(&self, att: &Attached) -> Result<VolHandle, nfsstat3> {
        let (kind, kernel) = &att.volume.root_kernel;
        self.inner
            .sealer
            .seal(&att.volume.key, *kind, kernel)
            .ok_or(nfsstat3::NFS3ERR_SERVERFAULT)
    }

    fn root_attr(&self) -> fattr3 {
        let n = self.inner.attached.read().map(|a| a.len()).unwrap_or(0) as u32;
        let v = self.inner.root_version.load(Ordering::Relaxed);
        let t = nfstime3 {
            seconds: u32::try_from(v).unwrap_or(u32::MAX),
            nseconds: 0,
        };
        fattr3 {
            type_: ftype3::NF3DIR,
            mode: 0o555,
            nlink: 2 + n,
            uid: 0,
            gid: 0,
            size: 4096,
            used: 4096,
            rdev: specdata3::default(),
            fsid: 0,
            fileid: 1,
            atime: t,
            mtime: t,
            ctime: t,
        }
    }

    fn attr_fd(att: &Attached, fd: &OwnedFd) -> Result<fattr3, nfsstat3> {
        let st = sys::stat(fd.as_fd()).map_err(io_err)?;
        Ok(attr_of(&st, att.volume.fsid()))
    }

    /// A directory of a volume, opened for use as the `dir` of `*at` calls.
    fn open_dir(&self, h: &VolHandle) -> Result<(Attached, OwnedFd), nfsstat3> {
        self.open_object(h, libc::O_RDONLY | libc::O_DIRECTORY)
            .map_err(|e| match e {
                nfsstat3::NFS3ERR_INVAL => nfsstat3::NFS3ERR_NOTDIR,
                e => e,
            })
    }

    fn lookup_now(&self, dir: &VolHandle, name: &[u8]) -> Result<VolHandle, nfsstat3> {
        match self.resolve(dir)? {
            Target::Root => {
                if name == b"." || name == b".." {
                    return Ok(Sealer::export_root());
                }
                let id = std::str::from_utf8(name).map_err(|_| nfsstat3::NFS3ERR_NOENT)?;
                let key = super::handle::volume_key(id).ok_or(nfsstat3::NFS3ERR_NOENT)?;
                let att = self.get(&key).ok_or(nfsstat3::NFS3ERR_NOENT)?;
                self.volume_root(&att)
            }
            Target::Object { att, kind, kernel } => {
                let dirfd =
                    sys::open_by_handle(att.volume.root.as_fd(), kind, &kernel, libc::O_PATH)
                        .map_err(io_err)?;
                let st = sys::stat(dirfd.as_fd()).map_err(io_err)?;
                if !is_kind(&st, libc::S_IFDIR) {
                    return Err(nfsstat3::NFS3ERR_NOTDIR);
                }
                if name == b"." {
                    return Ok(dir.clone());
                }
                if name == b".." {
                    if (st.st_dev, st.st_ino) == att.volume.root_id {
                        return Ok(Sealer::export_root());
                    }
                    let parent = sys::open_path_at(dirfd.as_fd(), c"..").map_err(io_err)?;
                    return self.seal_fd(&att, &parent);
                }
                let name = component(name)?;
                let fd = sys::open_path_at(dirfd.as_fd(), &name).map_err(io_err)?;
                self.seal_fd(&att, &fd)
            }
        }
    }

    fn getattr_now(&self, h: &VolHandle) -> Result<fattr3, nfsstat3> {
        match self.resolve(h)? {
            Target::Root => Ok(self.root_attr()),
            Target::Object { att, kind, kernel } => {
                let fd = sys::open_by_handle(att.volume.root.as_fd(), kind, &kernel, libc::O_PATH)
                    .map_err(io_err)?;
                let st = sys::stat(fd.as_fd()).map_err(io_err)?;
                // Removed, though the host kernel may keep the inode a moment
                // longer (and then still opens it by handle): stale to guests.
                if st.st_nlink == 0 {
                    return Err(nfsstat3::NFS3ERR_STALE);
                }
                Ok(attr_of(&st, att.volume.fsid()))
            }
        }
    }

    fn setattr_now(&self, h: &VolHandle, set: &sattr3) -> Result<fattr3, nfsstat3> {
        let (att, pfd) = self.open_object(h, libc::O_PATH)?;
        att.writable()?;
        let st = sys::stat(pfd.as_fd()).map_err(io_err)?;
        let regular = is_kind(&st, libc::S_IFREG);
        let dir = is_kind(&st, libc::S_IFDIR);
        if opt(&set.uid).is_some() || opt(&set.gid).is_some() {
            sys::chown(pfd.as_fd(), opt(&set.uid), opt(&set.gid)).map_err(io_err)?;
        }
        if let Some(size) = opt(&set.size) {
            if !regular {
                return Err(nfsstat3::NFS3ERR_INVAL);
            }
            let fd = self.open_object(h, libc::O_WRONLY)?.1;
            let before = sys::stat(fd.as_fd()).map_err(io_err)?;
            sys::truncate(fd.as_fd(), size).map_err(io_err)?;
            let after = sys::stat(fd.as_fd()).map_err(io_err)?;
            att.volume
                .add_used((after.st_blocks - before.st_blocks).saturating_mul(512));
        }
        let atime = set_time_of(&set.atime);
        let mtime = set_mtime_of(&set.mtime);
        let times = !matches!((atime, mtime), (SetTime::Keep, SetTime::Keep));
        if (opt(&set.mode).is_some() || times) && (regular || dir) {
            let flags = if dir {
                libc::O_RDONLY | libc::O_DIRECTORY
            } else {
                libc::O_RDONLY
            };
            let fd = self.open_object(h, flags)?.1;
            if let Some(mode) = opt(&set.mode) {
                sys::chmod(fd.as_fd(), mode).map_err(io_err)?;
            }
            if times {
                sys::set_times(fd.as_fd(), atime, mtime).map_err(io_err)?;
            }
        }
        Self::attr_fd(&att, &pfd)
    }

    fn create_now(
        &self,
        dir: &VolHandle,
        name: &[u8],
        exclusive: bool,
        set: Option<&sattr3>,
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        let (att, dirfd) = self.open_dir(dir)?;
        att.writable()?;
        let cname = component(name)?;
        let mode = set.and_then(|s| opt(&s.mode)).unwrap_or(0o644) & 0o7777;
        let mut flags = libc::O_CREAT | libc::O_WRONLY;
        if exclusive {
            flags |= libc::O_EXCL;
        }
        let fd = sys::open_at(dirfd.as_fd(), &cname, flags, mode).map_err(io_err)?;
        drop(fd);
        let pfd = sys::open_path_at(dirfd.as_fd(), &cname).map_err(io_err)?;
        let h = self.seal_fd(&att, &pfd)?;
        if let Some(set) = set {
            let rest = sattr3 {
                mode: Nfs3Option::None,
                ..set.clone()
            };
            let attr = self.setattr_now(&h, &rest)?;
            return Ok((h, attr));
        }
        let attr = Self::attr_fd(&att, &pfd)?;
        Ok((h, attr))
    }

    fn mkdir_now(&self, dir: &VolHandle, name: &[u8]) -> Result<(VolHandle, fattr3), nfsstat3> {
        let (att, dirfd) = self.open_dir(dir)?;
        att.writable()?;
        let cname = component(name)?;
        sys::mkdir_at(dirfd.as_fd(), &cname, 0o755).map_err(io_err)?;
        let pfd = sys::open_path_at(dirfd.as_fd(), &cname).map_err(io_err)?;
        let st = sys::stat(pfd.as_fd()).map_err(io_err)?;
        att.volume.add_used(st.st_blocks.saturating_mul(512));
        Ok((self.seal_fd(&att, &pfd)?, attr_of(&st, att.volume.fsid())))
    }

    fn remove_now(&self, dir: &VolHandle, name: &[u8]) -> Result<(), nfsstat3> {
        let (att, dirfd) = self.open_dir(dir)?;
        att.writable()?;
        let cname = component(name)?;
        let st = sys::stat_at(dirfd.as_fd(), &cname).map_err(io_err)?;
        let is_dir = is_kind(&st, libc::S_IFDIR);
        sys::unlink_at(dirfd.as_fd(), &cname, is_dir).map_err(io_err)?;
        if is_dir || st.st_nlink <= 1 {
            att.volume.add_used(-st.st_blocks.saturating_mul(512));
        }
        Ok(())
    }

    fn rename_now(
        &self,
        from: &VolHandle,
        from_name: &[u8],
        to: &VolHandle,
        to_name: &[u8],
    ) -> Result<(), nfsstat3> {
        let (att, from_fd) = self.open_dir(from)?;
        let (to_att, to_fd) = self.open_dir(to)?;
        if att.volume.key != to_att.volume.key {
            return Err(nfsstat3::NFS3ERR_XDEV);
        }
        att.writable()?;
        let (a, b) = (component(from_name)?, component(to_name)?);
        // A replaced file frees its blocks.
        let replaced = sys::stat_at(to_fd.as_fd(), &b).ok();
        sys::rename_at(from_fd.as_fd(), &a, to_fd.as_fd(), &b).map_err(io_err)?;
        if let Some(st) = replaced {
            if st.st_nlink <= 1 || is_kind(&st, libc::S_IFDIR) {
                att.volume.add_used(-st.st_blocks.saturating_mul(512));
            }
        }
        Ok(())
    }

    fn symlink_now(
        &self,
        dir: &VolHandle,
        name: &[u8],
        target: &[u8],
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        let (att, dirfd) = self.open_dir(dir)?;
        att.writable()?;
        let cname = component(name)?;
        if target.is_empty() || target.len() > 4096 {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        let ctarget = CString::new(target).map_err(|_| nfsstat3::NFS3ERR_INVAL)?;
        sys::symlink_at(&ctarget, dirfd.as_fd(), &cname).map_err(io_err)?;
        let pfd = sys::open_path_at(dirfd.as_fd(), &cname).map_err(io_err)?;
        Ok((self.seal_fd(&att, &pfd)?, Self::attr_fd(&att, &pfd)?))
    }

    fn read_now(
        &self,
        h: &VolHandle,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let (_, fd) = self.open_object(h, libc::O_RDONLY)?;
        let st = sys::stat(fd.as_fd()).map_err(io_err)?;
        if !is_kind(&st, libc::S_IFREG) {
            return Err(if is_kind(&st, libc::S_IFDIR) {
                nfsstat3::NFS3ERR_ISDIR
            } else {
                nfsstat3::NFS3ERR_INVAL
            });
        }
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let want = u64::from(count.min(1 << 20)).min(size.saturating_sub(offset));
        let mut buf = vec![0u8; want as usize];
        let mut got = 0usize;
        while got < buf.len() {
            match sys::pread(fd.as_fd(), &mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        buf.truncate(got);
        Ok((buf, offset + got as u64 >= size))
    }

    fn write_now(
        &self,
        h: &VolHandle,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let (att, pfd) = self.open_object(h, libc::O_PATH)?;
        att.writable()?;
        let before = sys::stat(pfd.as_fd()).map_err(io_err)?;
        if !is_kind(&before, libc::S_IFREG) {
            return Err(if is_kind(&before, libc::S_IFDIR) {
                nfsstat3::NFS3ERR_ISDIR
            } else {
                nfsstat3::NFS3ERR_INVAL
            });
        }
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(nfsstat3::NFS3ERR_FBIG)?;
        let growth = end.saturating_sub(u64::try_from(before.st_size).unwrap_or(0));
        let vol = &att.volume;
        if growth > 0 && vol.used_bytes().saturating_add(growth) > vol.size_bytes() {
            return Err(nfsstat3::NFS3ERR_NOSPC);
        }
        let fd = self.open_object(h, libc::O_WRONLY)?.1;
        let mut done = 0usize;
        while done < data.len() {
            match sys::pwrite(fd.as_fd(), &data[done..], offset + done as u64) {
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        let committed = if stable == stable_how::UNSTABLE {
            stable_how::UNSTABLE
        } else {
            sys::fsync(fd.as_fd()).map_err(io_err)?;
            stable_how::FILE_SYNC
        };
        let after = sys::stat(fd.as_fd()).map_err(io_err)?;
        vol.add_used((after.st_blocks - before.st_blocks).saturating_mul(512));
        Ok((attr_of(&after, vol.fsid()), committed))
    }

    fn readdir_now(&self, dir: &VolHandle, cookie: u64) -> Result<DirListing, nfsstat3> {
        let mut out = Vec::new();
        match self.resolve(dir)? {
            Target::Root => {
                let atts: Vec<Attached> = self
                    .inner
                    .attached
                    .read()
                    .map(|a| a.values().cloned().collect())
                    .unwrap_or_default();
                for (i, att) in atts.iter().enumerate() {
                    let index = i as u64 + 1;
                    if index <= cookie {
                        continue;
                    }
                    let h = self.volume_root(att)?;
                    let st = sys::stat(att.volume.root.as_fd()).map_err(io_err)?;
                    out.push(DirEntryPlus {
                        fileid: st.st_ino,
                        name: att.volume.id().into_bytes().into(),
                        cookie: index,
                        name_attributes: Some(attr_of(&st, att.volume.fsid())),
                        name_handle: Some(h),
                    });
                }
            }
            Target::Object { .. } => {
                let (att, dirfd) = self.open_dir(dir)?;
                let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&dirfd));
                let mut names: Vec<Vec<u8>> = std::fs::read_dir(path)
                    .map_err(io_err)?
                    .flatten()
                    .map(|e| e.file_name().into_encoded_bytes())
                    .collect();
                names.sort();
                for (i, name) in names.into_iter().enumerate() {
                    let index = i as u64 + 1;
                    if index <= cookie {
                        continue;
                    }
                    let Ok(cname) = CString::new(name.clone()) else {
                        continue;
                    };
                    // Gone since the listing: skip it.
                    let Ok(fd) = sys::open_path_at(dirfd.as_fd(), &cname) else {
                        continue;
                    };
                    let Ok(st) = sys::stat(fd.as_fd()) else {
                        continue;
                    };
                    out.push(DirEntryPlus {
                        fileid: st.st_ino,
                        name: name.into(),
                        cookie: index,
                        name_attributes: Some(attr_of(&st, att.volume.fsid())),
                        name_handle: self.seal_fd(&att, &fd).ok(),
                    });
                }
            }
        }
        Ok(DirListing {
            entries: out.into_iter(),
        })
    }

    fn readlink_now(&self, h: &VolHandle) -> Result<Vec<u8>, nfsstat3> {
        let (_, fd) = self.open_object(h, libc::O_PATH)?;
        let st = sys::stat(fd.as_fd()).map_err(io_err)?;
        if !is_kind(&st, libc::S_IFLNK) {
            return Err(nfsstat3::NFS3ERR_INVAL);
        }
        sys::read_link(fd.as_fd()).map_err(io_err)
    }

    fn commit_now(&self, h: &VolHandle) -> Result<(), nfsstat3> {
        let (_, fd) = self.open_object(h, libc::O_RDONLY)?;
        sys::fsync(fd.as_fd()).map_err(io_err)
    }
}

/// A directory listing from a cookie on.
pub struct DirListing {
    entries: std::vec::IntoIter<DirEntryPlus<VolHandle>>,
}

impl DirListing {
    pub fn new(entries: Vec<DirEntryPlus<VolHandle>>) -> DirListing {
        DirListing {
            entries: entries.into_iter(),
        }
    }
}

impl ReadDirPlusIterator<VolHandle> for DirListing {
    async fn next(&mut self) -> NextResult<DirEntryPlus<VolHandle>> {
        match self.entries.next() {
            Some(e) => NextResult::Ok(e),
            None => NextResult::Eof,
        }
    }
}

impl NfsReadFileSystem for ExportFs {
    type Handle = VolHandle;

    fn root_dir(&self) -> VolHandle {
        Sealer::export_root()
    }

    async fn lookup(&self, dir: &VolHandle, name: &filename3<'_>) -> Result<VolHandle, nfsstat3> {
        self.lookup_now(dir, name.as_ref())
    }

    async fn getattr(&self, id: &VolHandle) -> Result<fattr3, nfsstat3> {
        self.getattr_now(id)
    }

    async fn read(
        &self,
        id: &VolHandle,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let (me, id) = (self.clone(), id.clone());
        blocking(move || me.read_now(&id, offset, count)).await
    }

    #[allow(refining_impl_trait)]
    async fn readdirplus(&self, dir: &VolHandle, cookie: u64) -> Result<DirListing, nfsstat3> {
        let (me, dir) = (self.clone(), dir.clone());
        blocking(move || me.readdir_now(&dir, cookie)).await
    }

    async fn readlink(&self, id: &VolHandle) -> Result<nfspath3<'_>, nfsstat3> {
        self.readlink_now(id).map(nfspath3::from)
    }
}

impl NfsFileSystem for ExportFs {
    async fn setattr(&self, id: &VolHandle, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        self.setattr_now(id, &setattr)
    }

    async fn write(
        &self,
        id: &VolHandle,
        offset: u64,
        data: &[u8],
        stable: stable_how,
    ) -> Result<(fattr3, stable_how), nfsstat3> {
        let (me, id, data) = (self.clone(), id.clone(), data.to_vec());
        blocking(move || me.write_now(&id, offset, &data, stable)).await
    }

    async fn create(
        &self,
        dir: &VolHandle,
        name: &filename3<'_>,
        attr: sattr3,
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        self.create_now(dir, name.as_ref(), false, Some(&attr))
    }

    async fn create_exclusive(
        &self,
        dir: &VolHandle,
        name: &filename3<'_>,
        _verf: createverf3,
    ) -> Result<VolHandle, nfsstat3> {
        self.create_now(dir, name.as_ref(), true, None)
            .map(|(h, _)| h)
    }

    async fn mkdir(
        &self,
        dir: &VolHandle,
        name: &filename3<'_>,
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        self.mkdir_now(dir, name.as_ref())
    }

    async fn remove(&self, dir: &VolHandle, name: &filename3<'_>) -> Result<(), nfsstat3> {
        self.remove_now(dir, name.as_ref())
    }

    async fn rename<'a>(
        &self,
        from_dir: &VolHandle,
        from_name: &filename3<'a>,
        to_dir: &VolHandle,
        to_name: &filename3<'a>,
    ) -> Result<(), nfsstat3> {
        self.rename_now(from_dir, from_name.as_ref(), to_dir, to_name.as_ref())
    }

    async fn symlink<'a>(
        &self,
        dir: &VolHandle,
        name: &filename3<'a>,
        target: &nfspath3<'a>,
        _attr: &sattr3,
    ) -> Result<(VolHandle, fattr3), nfsstat3> {
        self.symlink_now(dir, name.as_ref(), target.as_ref())
    }

    async fn commit(&self, id: &VolHandle, _offset: u64, _count: u32) -> Result<(), nfsstat3> {
        let (me, id) = (self.clone(), id.clone());
        blocking(move || me.commit_now(&id)).await
    }
}
