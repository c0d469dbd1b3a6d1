//! Unpacking OCI / Docker image layers (tar streams, plain, gzip or zstd) onto a root
//! directory on the host, in order, with OCI whiteouts (`.wh.<name>`, `.wh..wh..opq`).
//!
//! Threat model: a layer is written by whoever pushed the image and may be hostile, while this
//! code runs as root on the host. No entry may create, change, remove or link anything outside
//! `root`: `root` is opened once, every parent directory is resolved from that fd with
//! `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` (absolute symlinks and
//! `..` stay inside, as under chroot), and the last component is only touched with `*at` calls
//! that never follow it. [`Limits`] bound the bytes and entries of a layer (decompression bombs),
//! and odd entries (`..` names, hard links out of the tree, unknown types) are skipped and noted.
//! What lands *inside* `root` is the image's business: setuid binaries and device nodes are made
//! as the image says, so `root` must sit under a directory other host users cannot traverse.

use std::cell::Cell;
use std::collections::HashSet;
use std::ffi::{CStr, CString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// At most this many notes are kept in [`ApplyStats::skipped`].
const MAX_SKIPPED: usize = 32;
/// Bytes the tar reader may consume between two entries (headers, PAX / GNU long-name records,
/// padding) and after the end of the archive: bounds what it buffers in memory.
const HEADER_BUDGET: u64 = 8 << 20;
/// Copy buffer of file contents.
const COPY_BUF: usize = 128 << 10;

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of a layer media type (OCI and Docker schema 2); `None` for a media type
    /// that is not a known layer type.
    pub fn from_media_type(mt: &str) -> Option<Compression> {
        match mt.trim().to_ascii_lowercase().as_str() {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Some(Compression::None),
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip"
            | "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                Some(Compression::Gzip)
            }
            "application/vnd.oci.image.layer.v1.tar+zstd"
            | "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd" => {
                Some(Compression::Zstd)
            }
            _ => None,
        }
    }
}

/// Why a layer could not be applied. Entries that are merely odd are not errors: they are
/// skipped and listed in [`ApplyStats::skipped`].
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot open the layer root {}: {source}", path.display())]
    Root { path: PathBuf, source: io::Error },
    #[error("openat2(2) is not available (Linux 5.6 or later is needed to unpack layers safely)")]
    Openat2Unsupported,
    #[error("layer entry {path:?}: {op}: {source}")]
    Io {
        path: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("reading the layer (at entry {path:?}): {source}")]
    Read { path: String, source: io::Error },
    #[error("layer entry {path:?}: the layer holds more than {limit} bytes")]
    TooLarge { path: String, limit: u64 },
    #[error("layer entry {path:?}: the layer holds more than {limit} entries")]
    TooManyEntries { path: String, limit: u64 },
}

/// What applying layers did; accumulates over calls.
#[derive(Debug, Default, Clone)]
pub struct ApplyStats {
    /// Tar entries read (whiteouts and skipped entries included).
    pub entries: u64,
    /// Bytes of file contents written.
    pub bytes: u64,
    /// `"<entry>: <why>"` of skipped entries and metadata not applied; the first 32.
    pub skipped: Vec<String>,
}

/// Bounds of one layer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Total bytes of entry contents in the layer (decompression-bomb guard).
    pub max_bytes: u64,
    /// Tar entries in the layer.
    pub max_entries: u64,
}

/// Apply one layer (a decompressed or compressed tar stream) onto `root`.
///
/// The stream is read to its end (so a caller hashing it sees every byte, and the gzip
/// trailer is checked). On error `root` holds a partially applied layer. Blocking: call it
/// from `spawn_blocking` in async code.
pub fn apply_layer(
    root: &Path,
    reader: impl Read,
    compression: Compression,
    limits: &Limits,
    stats: &mut ApplyStats,
) -> Result<(), LayerError> {
    let (root_fd, root_dev) = open_root(root)?;
    let read_err = |path: &str, source| LayerError::Read {
        path: path.to_owned(),
        source,
    };
    let decoder = match compression {
        Compression::None => Decoder::Plain(reader),
        Compression::Gzip => Decoder::Gzip(flate2::read::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            Decoder::Zstd(zstd::stream::read::Decoder::new(reader).map_err(|e| read_err("", e))?)
        }
    };
    let window = Rc::new(Window::default());
    window.headers();
    let mut archive = tar::Archive::new(Capped {
        inner: decoder,
        window: window.clone(),
    });
    let mut u = Unpacker {
        root: root_fd,
        root_dev,
        limits,
        stats,
        created: HashSet::new(),
        dir_times: Vec::new(),
        consumed: 0,
        entries: 0,
        buf: vec![0; COPY_BUF],
    };
    let mut last = String::new();
    for entry in archive.entries().map_err(|e| read_err(&last, e))? {
        let mut entry = entry.map_err(|e| read_err(&last, e))?;
        window.contents();
        last = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        u.entries += 1;
        u.stats.entries += 1;
        if u.entries > limits.max_entries {
            return Err(LayerError::TooManyEntries {
                path: last,
                limit: limits.max_entries,
            });
        }
        match u.apply(&mut entry, &last) {
            Ok(()) => {}
            Err(Fail::Skip(why)) => u.note(&last, why),
            Err(Fail::Fatal(e)) => return Err(e),
        }
        // Whatever the entry did not consume (skipped entries), counted like written data.
        u.copy(&mut entry, &mut io::sink(), &last)?;
        window.headers();
    }
    u.finish_dir_times();
    io::copy(&mut archive.into_inner(), &mut io::sink())
        .map_err(|e| read_err("(after the end of the archive)", e))?;
    Ok(())
}

/// Prepare an empty root: create `root` (0755, root:root) and, beneath it, the mount points
/// `dev proc sys tmp(1777) run etc root(0700)` where nothing of that name exists yet (a symlink
/// or a directory there is kept as it is).
pub fn ensure_mount_points(root: &Path) -> Result<(), LayerError> {
    let root_err = |source| LayerError::Root {
        path: root.to_owned(),
        source,
    };
    std::fs::create_dir_all(root).map_err(root_err)?;
    let path = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| root_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: AT_FDCWD is a valid dirfd for the whole process lifetime.
    let cwd = unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) };
    let fd = sys::openat(cwd, &path, libc::O_RDONLY | libc::O_DIRECTORY, 0).map_err(root_err)?;
    let as_root = sys::is_root();
    let io = |name: &str, op, source| LayerError::Io {
        path: name.to_owned(),
        op,
        source,
    };
    if as_root {
        sys::fchown(fd.as_fd(), 0, 0).map_err(|e| io("", "chown", e))?;
    }
    sys::fchmod(fd.as_fd(), 0o755).map_err(|e| io("", "chmod", e))?;
    let dirs: [(&CStr, &str, u32); 7] = [
        (c"dev", "dev", 0o755),
        (c"proc", "proc", 0o555),
        (c"sys", "sys", 0o555),
        (c"tmp", "tmp", 0o1777),
        (c"run", "run", 0o755),
        (c"etc", "etc", 0o755),
        (c"root", "root", 0o700),
    ];
    for (c, name, mode) in dirs {
        match sys::fstatat(fd.as_fd(), c) {
            Ok(_) => continue,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(io(name, "stat", e)),
        }
        sys::mkdirat(fd.as_fd(), c, 0o700).map_err(|e| io(name, "mkdir", e))?;
        let dir = sys::openat(
            fd.as_fd(),
            c,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| io(name, "open", e))?;
        if as_root {
            sys::fchown(dir.as_fd(), 0, 0).map_err(|e| io(name, "chown", e))?;
        }
        sys::fchmod(dir.as_fd(), mode).map_err(|e| io(name, "chmod", e))?;
    }
    Ok(())
}

/// Opens `root` as an O_PATH directory and checks that openat2 works; returns it and its device.
fn open_root(root: &Path) -> Result<(OwnedFd, u64), LayerError> {
    let root_err = |source| LayerError::Root {
        path: root.to_owned(),
        source,
    };
    let path = CString::new(root.as_os_str().as_bytes())
        .map_err(|e| root_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: AT_FDCWD is a valid dirfd for the whole process lifetime.
    let cwd = unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) };
    let fd = sys::openat(cwd, &path, libc::O_PATH | libc::O_DIRECTORY, 0).map_err(root_err)?;
    match sys::openat2(fd.as_fd(), c".", libc::O_PATH | libc::O_DIRECTORY, 0) {
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            return Err(LayerError::Openat2Unsupported)
        }
        Err(e) => return Err(root_err(e)),
    }
    let st = sys::fstat(fd.as_fd()).map_err(root_err)?;
    Ok((fd, st.st_dev))
}

/// The decompressed layer.
enum Decoder<R: Read> {
    Plain(R),
    Gzip(flate2::read::MultiGzDecoder<R>),
    Zstd(zstd::stream::read::Decoder<'static, io::BufReader<R>>),
}

impl<R: Read> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

/// How far the tar reader may read: [`HEADER_BUDGET`] past the current position while it looks
/// for the next entry, unbounded while we read entry contents (which we count ourselves).
#[derive(Default)]
struct Window {
    pos: Cell<u64>,
    limit: Cell<u64>,
}

impl Window {
    fn headers(&self) {
        self.limit.set(self.pos.get().saturating_add(HEADER_BUDGET));
    }
    fn contents(&self) {
        self.limit.set(u64::MAX);
    }
}

struct Capped<R> {
    inner: R,
    window: Rc<Window>,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let (pos, limit) = (self.window.pos.get(), self.window.limit.get());
        if pos >= limit && !buf.is_empty() {
            return Err(io::Error::other(format!(
                "more than {HEADER_BUDGET} bytes of tar headers, extension records or padding in a row"
            )));
        }
        let room = usize::try_from(limit - pos).unwrap_or(usize::MAX);
        let len = buf.len().min(room);
        let n = self.inner.read(&mut buf[..len])?;
        self.window.pos.set(pos.saturating_add(n as u64));
        Ok(n)
    }
}

/// Outcome of an entry that was not applied.
enum Fail {
    /// Not applied; noted in the stats, the layer goes on.
    Skip(String),
    Fatal(LayerError),
}

impl From<LayerError> for Fail {
    fn from(e: LayerError) -> Self {
        Fail::Fatal(e)
    }
}

/// Errors that the content of the layer causes (missing or odd paths): the entry is skipped.
/// Others (no space, I/O, out of fds) fail the layer.
fn io_fail(path: &str, op: &'static str, e: io::Error) -> Fail {
    match e.raw_os_error() {
        Some(
            libc::ENOENT
            | libc::ENOTDIR
            | libc::ELOOP
            | libc::EXDEV
            | libc::EEXIST
            | libc::ENAMETOOLONG
            | libc::EISDIR
            | libc::EMLINK
            | libc::ENOTEMPTY,
        ) => Fail::Skip(format!("{op}: {e}")),
        _ => Fail::Fatal(LayerError::Io {
            path: path.to_owned(),
            op,
            source: e,
        }),
    }
}

fn errno_is(e: &io::Error, codes: &[i32]) -> bool {
    e.raw_os_error().is_some_and(|c| codes.contains(&c))
}

/// Owner, mode, mtime and xattrs of an entry.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: libc::timespec,
    xattrs: Vec<(CString, Vec<u8>)>,
    notes: Vec<String>,
}

/// What a `.wh.` name means.
enum Whiteout<'a> {
    Opaque,
    Remove(&'a [u8]),
    Unsupported,
}

fn whiteout_kind(name: &[u8]) -> Option<Whiteout<'_>> {
    let rest = name.strip_prefix(b".wh.")?;
    Some(if rest == b".wh..opq" {
        Whiteout::Opaque
    } else if rest.is_empty() || rest == b"." || rest == b".." || rest.starts_with(b".wh.") {
        Whiteout::Unsupported
    } else {
        Whiteout::Remove(rest)
    })
}

/// An entry name as a relative path: no leading `/` or `./`, no empty or `.` components;
/// `..` components and NUL bytes are refused. Empty means the root itself.
fn normalize(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.contains(&0) {
        return Err("NUL byte in the name".into());
    }
    let mut out = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("`..` in the path".into()),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// (parent, last component) of a non-empty relative path.
fn split(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (b"", rel),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(dir.len() + 1 + name.len());
    if !dir.is_empty() {
        out.extend_from_slice(dir);
        out.push(b'/');
    }
    out.extend_from_slice(name);
    out
}

fn cstring(bytes: &[u8]) -> Result<CString, Fail> {
    CString::new(bytes).map_err(|_| Fail::Skip("NUL byte in a name".into()))
}

/// A relative path as a C string for openat2 (`.` for the root).
fn c_rel(rel: &[u8]) -> Result<CString, Fail> {
    cstring(if rel.is_empty() { b"." } else { rel })
}

fn timespec(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec as libc::time_t,
        tv_nsec: nsec as libc::c_long,
    }
}

/// A PAX `mtime` record: decimal seconds with an optional fraction, maybe negative.
fn parse_pax_time(v: &[u8]) -> Option<libc::timespec> {
    let s = std::str::from_utf8(v).ok()?.trim();
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = int.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut nsec: i64 = 0;
    for i in 0..9 {
        nsec = nsec * 10 + frac.as_bytes().get(i).map_or(0, |d| i64::from(d - b'0'));
    }
    Some(match (neg, nsec) {
        (false, _) => timespec(sec, nsec),
        (true, 0) => timespec(-sec, 0),
        (true, _) => timespec(-sec - 1, 1_000_000_000 - nsec),
    })
}

/// Xattr namespaces an image may set: its own `user.*`, file capabilities and ACLs. `trusted.*`
/// (read by host subsystems such as overlayfs) and other `security.*` labels are not taken.
fn xattr_allowed(name: &[u8]) -> bool {
    name.starts_with(b"user.")
        || name == b"security.capability"
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Applies the entries of one layer.
struct Unpacker<'a> {
    /// O_PATH fd of the root directory.
    root: OwnedFd,
    root_dev: u64,
    limits: &'a Limits,
    stats: &'a mut ApplyStats,
    /// Paths (and their ancestors) this layer created: whiteouts spare them.
    created: HashSet<Vec<u8>>,
    /// Directory mtimes, set at the end (later entries inside would change them).
    dir_times: Vec<(Vec<u8>, libc::timespec)>,
    /// Bytes of entry contents read in this layer.
    consumed: u64,
    entries: u64,
    buf: Vec<u8>,
}

impl Unpacker<'_> {
    fn note(&mut self, shown: &str, why: String) {
        tracing::debug!(entry = shown, reason = %why, "layer entry skipped");
        if self.stats.skipped.len() < MAX_SKIPPED {
            self.stats.skipped.push(format!("{shown}: {why}"));
        }
    }

    fn mark_created(&mut self, rel: &[u8]) {
        let mut p = rel;
        while !p.is_empty() && self.created.insert(p.to_vec()) {
            p = split(p).0;
        }
    }

    /// Resolves a directory beneath the root (symlinks followed, inside the root).
    fn open_dir(&self, rel: &[u8], flags: libc::c_int) -> Result<io::Result<OwnedFd>, Fail> {
        let path = c_rel(rel)?;
        Ok(sys::openat2(
            self.root.as_fd(),
            &path,
            flags | libc::O_DIRECTORY,
            0,
        ))
    }

    /// Resolves the parent directory of an entry, creating missing directories (0755, root).
    fn parent(&self, rel: &[u8]) -> Result<OwnedFd, Fail> {
        let shown = String::from_utf8_lossy(rel);
        let err = |e| io_fail(&shown, "resolving the parent directory", e);
        match self.open_dir(rel, libc::O_PATH)? {
            Ok(fd) => return Ok(fd),
            Err(e) if errno_is(&e, &[libc::ENOENT]) => {}
            Err(e) => return Err(err(e)),
        }
        let mut dir = self.open_dir(b"", libc::O_PATH)?.map_err(err)?;
        let mut end = 0;
        for comp in rel.split(|&b| b == b'/') {
            end += comp.len();
            let prefix = &rel[..end];
            end += 1;
            dir = match self.open_dir(prefix, libc::O_PATH)? {
                Ok(fd) => fd,
                Err(e) if errno_is(&e, &[libc::ENOENT]) => {
                    match sys::mkdirat(dir.as_fd(), &cstring(comp)?, 0o755) {
                        Ok(()) => {}
                        Err(e) if errno_is(&e, &[libc::EEXIST]) => {
                            return Err(Fail::Skip(format!(
                                "parent {:?} is a dangling symlink",
                                String::from_utf8_lossy(prefix)
                            )))
                        }
                        Err(e) => return Err(err(e)),
                    }
                    self.open_dir(prefix, libc::O_PATH)?.map_err(err)?
                }
                Err(e) => return Err(err(e)),
            };
        }
        Ok(dir)
    }

    fn apply<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, shown: &str) -> Result<(), Fail> {
        use tar::EntryType as T;
        let mut kind = entry.header().entry_type();
        if kind == T::XGlobalHeader {
            return Ok(());
        }
        let raw = entry.path_bytes().into_owned();
        if kind == T::Regular && raw.ends_with(b"/") {
            kind = T::Directory; // old tar: a directory is a regular file named `dir/`
        }
        let rel = normalize(&raw).map_err(Fail::Skip)?;
        let (parent, name) = split(&rel);
        if let Some(w) = whiteout_kind(name) {
            return self.whiteout(parent, w, shown);
        }
        let mut meta = self.meta(entry)?;
        for n in std::mem::take(&mut meta.notes) {
            self.note(shown, n);
        }
        if rel.is_empty() {
            return self.root_entry(kind, &meta, shown);
        }
        let cname = cstring(name)?;
        match kind {
            T::Regular | T::Continuous | T::GNUSparse => {
                self.file(entry, kind, &rel, parent, &cname, &meta, shown)
            }
            T::Directory => self.dir(&rel, parent, &cname, &meta, shown),
            T::Symlink => self.symlink(entry, &rel, parent, &cname, &meta, shown),
            T::Link => self.hardlink(entry, &rel, parent, &cname, shown),
            T::Char | T::Block | T::Fifo => {
                self.node(entry, kind, &rel, parent, &cname, &meta, shown)
            }
            other => Err(Fail::Skip(format!("unsupported entry type {other:?}"))),
        }
    }

    fn meta<R: Read>(&self, entry: &mut tar::Entry<'_, R>) -> Result<Meta, Fail> {
        let h = entry.header();
        let bad = |what: &str, e: io::Error| Fail::Skip(format!("bad {what} in the header: {e}"));
        let mode = h.mode().map_err(|e| bad("mode", e))? & 0o7777;
        let id = |v: u64| {
            u32::try_from(v)
                .ok()
                .filter(|&v| v != u32::MAX)
                .ok_or_else(|| Fail::Skip(format!("uid/gid {v} out of range")))
        };
        let uid = id(h.uid().map_err(|e| bad("uid", e))?)?;
        let gid = id(h.gid().map_err(|e| bad("gid", e))?)?;
        let secs = h.mtime().map_err(|e| bad("mtime", e))?;
        let mut meta = Meta {
            uid,
            gid,
            mode,
            mtime: timespec(i64::try_from(secs).unwrap_or(i64::MAX), 0),
            xattrs: Vec::new(),
            notes: Vec::new(),
        };
        let exts = match entry.pax_extensions() {
            Ok(exts) => exts,
            Err(e) => {
                meta.notes.push(format!("PAX records ignored: {e}"));
                None
            }
        };
        for ext in exts.into_iter().flatten() {
            let ext = match ext {
                Ok(ext) => ext,
                Err(e) => {
                    meta.notes
                        .push(format!("PAX records ignored from here: {e}"));
                    break;
                }
            };
            let key = ext.key_bytes();
            if key == b"mtime" {
                if let Some(t) = parse_pax_time(ext.value_bytes()) {
                    meta.mtime = t;
                }
            } else if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                let shown = String::from_utf8_lossy(name);
                match CString::new(name) {
                    Ok(c) if xattr_allowed(name) => {
                        meta.xattrs.push((c, ext.value_bytes().to_vec()));
                    }
                    _ => meta
                        .notes
                        .push(format!("xattr {shown:?} not applied (namespace)")),
                }
            }
        }
        Ok(meta)
    }

    /// chown, then chmod (chown clears setuid), xattrs (after chown, which drops capabilities).
    fn set_meta(&mut self, fd: BorrowedFd<'_>, meta: &Meta, shown: &str) -> Result<(), Fail> {
        if let Err(e) = sys::fchown(fd, meta.uid, meta.gid) {
            if !errno_is(&e, &[libc::EPERM, libc::EINVAL]) {
                return Err(io_fail(shown, "chown", e));
            }
            self.note(shown, format!("chown {}:{}: {e}", meta.uid, meta.gid));
        }
        sys::fchmod(fd, meta.mode).map_err(|e| io_fail(shown, "chmod", e))?;
        for (name, value) in &meta.xattrs {
            if let Err(e) = sys::fsetxattr(fd, name, value) {
                let why = format!("xattr {name:?} not applied: {e}");
                self.note(shown, why);
            }
        }
        Ok(())
    }

    /// Removes whatever `name` is in `dir` (a whole tree for a directory), never following it.
    fn remove_existing(&self, dir: BorrowedFd<'_>, name: &CStr, shown: &str) -> Result<(), Fail> {
        match sys::fstatat(dir, name) {
            Err(e) if errno_is(&e, &[libc::ENOENT]) => Ok(()),
            Err(e) => Err(io_fail(shown, "stat", e)),
            Ok(st) if is_dir(&st) => {
                remove_tree(dir, name, self.root_dev).map_err(|e| io_fail(shown, "remove", e))
            }
            Ok(_) => sys::unlinkat(dir, name, 0).map_err(|e| io_fail(shown, "unlink", e)),
        }
    }

    /// Reads the rest of the entry into `out`, counting it against `max_bytes`.
    fn copy<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        out: &mut dyn Write,
        shown: &str,
    ) -> Result<u64, LayerError> {
        let mut buf = std::mem::take(&mut self.buf);
        let res = (|| {
            let mut total = 0u64;
            loop {
                let n = match entry.read(&mut buf) {
                    Ok(0) => return Ok(total),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(LayerError::Read {
                            path: shown.to_owned(),
                            source: e,
                        })
                    }
                };
                self.consumed = self.consumed.saturating_add(n as u64);
                if self.consumed > self.limits.max_bytes {
                    return Err(LayerError::TooLarge {
                        path: shown.to_owned(),
                        limit: self.limits.max_bytes,
                    });
                }
                out.write_all(&buf[..n]).map_err(|e| LayerError::Io {
                    path: shown.to_owned(),
                    op: "write",
                    source: e,
                })?;
                total += n as u64;
            }
        })();
        self.buf = buf;
        res
    }

    #[allow(clippy::too_many_arguments)]
    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: tar::EntryType,
        rel: &[u8],
        parent: &[u8],
        name: &CStr,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), Fail> {
        let size = entry.size();
        if self.consumed.saturating_add(size) > self.limits.max_bytes {
            return Err(LayerError::TooLarge {
                path: shown.to_owned(),
                limit: self.limits.max_bytes,
            }
            .into());
        }
        let dir = self.parent(parent)?;
        self.remove_existing(dir.as_fd(), name, shown)?;
        let fd = sys::openat(
            dir.as_fd(),
            name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW,
            0o600,
        )
        .map_err(|e| io_fail(shown, "create", e))?;
        let mut file = File::from(fd);
        let written = self.copy(entry, &mut file, shown)?;
        self.stats.bytes += written;
        if kind != tar::EntryType::GNUSparse && written != size {
            return Err(LayerError::Read {
                path: shown.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("{written} of {size} bytes"),
                ),
            }
            .into());
        }
        self.set_meta(file.as_fd(), meta, shown)?;
        sys::futimens(file.as_fd(), meta.mtime).map_err(|e| io_fail(shown, "set mtime", e))?;
        self.mark_created(rel);
        Ok(())
    }

    fn dir(
        &mut self,
        rel: &[u8],
        parent: &[u8],
        name: &CStr,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), Fail> {
        let dir = self.parent(parent)?;
        let exists = match sys::fstatat(dir.as_fd(), name) {
            Ok(st) if is_dir(&st) => true,
            Ok(_) => {
                sys::unlinkat(dir.as_fd(), name, 0).map_err(|e| io_fail(shown, "unlink", e))?;
                false
            }
            Err(e) if errno_is(&e, &[libc::ENOENT]) => false,
            Err(e) => return Err(io_fail(shown, "stat", e)),
        };
        if !exists {
            sys::mkdirat(dir.as_fd(), name, 0o700).map_err(|e| io_fail(shown, "mkdir", e))?;
        }
        let fd = sys::openat(
            dir.as_fd(),
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )
        .map_err(|e| io_fail(shown, "open", e))?;
        self.set_meta(fd.as_fd(), meta, shown)?;
        self.dir_times.push((rel.to_vec(), meta.mtime));
        self.mark_created(rel);
        Ok(())
    }

    fn root_entry(&mut self, kind: tar::EntryType, meta: &Meta, shown: &str) -> Result<(), Fail> {
        if kind != tar::EntryType::Directory {
            return Err(Fail::Skip(format!(
                "the root itself given as {kind:?}, not a directory"
            )));
        }
        let fd = sys::openat(
            self.root.as_fd(),
            c".",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| io_fail(shown, "open", e))?;
        self.set_meta(fd.as_fd(), meta, shown)?;
        self.dir_times.push((Vec::new(), meta.mtime));
        Ok(())
    }

    fn symlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        rel: &[u8],
        parent: &[u8],
        name: &CStr,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), Fail> {
        let target = match entry.link_name_bytes() {
            Some(t) if !t.is_empty() => cstring(&t)?,
            _ => return Err(Fail::Skip("symlink without a target".into())),
        };
        let dir = self.parent(parent)?;
        self.remove_existing(dir.as_fd(), name, shown)?;
        sys::symlinkat(&target, dir.as_fd(), name).map_err(|e| io_fail(shown, "symlink", e))?;
        self.chown_nofollow(dir.as_fd(), name, meta, shown)?;
        sys::utimensat_nofollow(dir.as_fd(), name, meta.mtime)
            .map_err(|e| io_fail(shown, "set mtime", e))?;
        self.mark_created(rel);
        Ok(())
    }

    fn chown_nofollow(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), Fail> {
        if let Err(e) = sys::fchownat_nofollow(dir, name, meta.uid, meta.gid) {
            if !errno_is(&e, &[libc::EPERM, libc::EINVAL]) {
                return Err(io_fail(shown, "chown", e));
            }
            self.note(shown, format!("chown {}:{}: {e}", meta.uid, meta.gid));
        }
        Ok(())
    }

    fn hardlink<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        rel: &[u8],
        parent: &[u8],
        name: &CStr,
        shown: &str,
    ) -> Result<(), Fail> {
        let raw = entry
            .link_name_bytes()
            .ok_or_else(|| Fail::Skip("hard link without a target".into()))?;
        let target_shown = String::from_utf8_lossy(&raw).into_owned();
        let skip = |why: String| Fail::Skip(format!("hard link to {target_shown:?}: {why}"));
        let target = normalize(&raw).map_err(skip)?;
        if target.is_empty() {
            return Err(skip("the target is the root directory".into()));
        }
        let (tparent, tname) = split(&target);
        let tname = cstring(tname)?;
        let tdir = match self.open_dir(tparent, libc::O_PATH)? {
            Ok(fd) => fd,
            Err(e) => return Err(skip(format!("target directory: {e}"))),
        };
        let tst = match sys::fstatat(tdir.as_fd(), &tname) {
            Ok(st) => st,
            Err(e) => return Err(skip(format!("target: {e}"))),
        };
        if is_dir(&tst) {
            return Err(skip("the target is a directory".into()));
        }
        let dir = self.parent(parent)?;
        match sys::fstatat(dir.as_fd(), name) {
            Ok(st) if st.st_dev == tst.st_dev && st.st_ino == tst.st_ino => {
                self.mark_created(rel);
                return Ok(());
            }
            Ok(_) => self.remove_existing(dir.as_fd(), name, shown)?,
            Err(e) if errno_is(&e, &[libc::ENOENT]) => {}
            Err(e) => return Err(io_fail(shown, "stat", e)),
        }
        // Flags 0: a symlink target is linked itself, never followed.
        sys::linkat(tdir.as_fd(), &tname, dir.as_fd(), name)
            .map_err(|e| io_fail(shown, "link", e))?;
        self.mark_created(rel);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn node<R: Read>(
        &mut self,
        entry: &tar::Entry<'_, R>,
        kind: tar::EntryType,
        rel: &[u8],
        parent: &[u8],
        name: &CStr,
        meta: &Meta,
        shown: &str,
    ) -> Result<(), Fail> {
        let (fmt, dev) = match kind {
            tar::EntryType::Fifo => (libc::S_IFIFO, 0),
            _ => {
                let h = entry.header();
                let num = |v: io::Result<Option<u32>>| match v {
                    Ok(Some(n)) => Ok(n),
                    Ok(None) => Err(Fail::Skip("device numbers missing".into())),
                    Err(e) => Err(Fail::Skip(format!("bad device numbers: {e}"))),
                };
                let (major, minor) = (num(h.device_major())?, num(h.device_minor())?);
                let fmt = if kind == tar::EntryType::Char {
                    libc::S_IFCHR
                } else {
                    libc::S_IFBLK
                };
                (fmt, libc::makedev(major, minor))
            }
        };
        let dir = self.parent(parent)?;
        self.remove_existing(dir.as_fd(), name, shown)?;
        if let Err(e) = sys::mknodat(dir.as_fd(), name, fmt | 0o600, dev) {
            if errno_is(&e, &[libc::EPERM]) {
                return Err(Fail::Skip(format!("mknod: {e}")));
            }
            return Err(io_fail(shown, "mknod", e));
        }
        self.chown_nofollow(dir.as_fd(), name, meta, shown)?;
        sys::fchmodat_nofollow(dir.as_fd(), name, meta.mode)
            .map_err(|e| io_fail(shown, "chmod", e))?;
        sys::utimensat_nofollow(dir.as_fd(), name, meta.mtime)
            .map_err(|e| io_fail(shown, "set mtime", e))?;
        self.mark_created(rel);
        Ok(())
    }

    fn whiteout(&mut self, parent: &[u8], w: Whiteout<'_>, shown: &str) -> Result<(), Fail> {
        match w {
            Whiteout::Unsupported => Err(Fail::Skip("unsupported whiteout".into())),
            Whiteout::Remove(target) => {
                // Only lower layers are whited out; this layer's own entries stay.
                if self.created.contains(&join(parent, target)) {
                    return Ok(());
                }
                let dir = match self.open_dir(parent, libc::O_PATH)? {
                    Ok(fd) => fd,
                    Err(e) if errno_is(&e, &[libc::ENOENT, libc::ENOTDIR]) => return Ok(()),
                    Err(e) => return Err(io_fail(shown, "resolving the parent directory", e)),
                };
                self.remove_existing(dir.as_fd(), &cstring(target)?, shown)
            }
            Whiteout::Opaque => self.opaque(parent, shown),
        }
    }

    /// Empties `dir` of what lower layers put there: everything not created by this layer, in
    /// it and in the directories this layer created (or merged) below it.
    fn opaque(&mut self, dir: &[u8], shown: &str) -> Result<(), Fail> {
        let mut work = vec![dir.to_vec()];
        while let Some(d) = work.pop() {
            let fd = match self.open_dir(&d, libc::O_RDONLY)? {
                Ok(fd) => fd,
                Err(e) if errno_is(&e, &[libc::ENOENT, libc::ENOTDIR]) => continue,
                Err(e) => return Err(io_fail(shown, "opening the opaque directory", e)),
            };
            let names = sys::list_dir(fd.as_fd()).map_err(|e| io_fail(shown, "readdir", e))?;
            for child in names {
                let key = join(&d, child.to_bytes());
                let st = match sys::fstatat(fd.as_fd(), &child) {
                    Ok(st) => st,
                    Err(e) if errno_is(&e, &[libc::ENOENT]) => continue,
                    Err(e) => return Err(io_fail(shown, "stat", e)),
                };
                if self.created.contains(&key) {
                    if is_dir(&st) {
                        work.push(key);
                    }
                } else {
                    self.remove_existing(fd.as_fd(), &child, shown)?;
                }
            }
        }
        Ok(())
    }

    /// Sets the deferred directory mtimes; entries gone since are ignored.
    fn finish_dir_times(&mut self) {
        for (rel, t) in std::mem::take(&mut self.dir_times) {
            if rel.is_empty() {
                if let Ok(fd) = sys::openat(
                    self.root.as_fd(),
                    c".",
                    libc::O_RDONLY | libc::O_DIRECTORY,
                    0,
                ) {
                    let _ = sys::futimens(fd.as_fd(), t);
                }
                continue;
            }
            let (parent, name) = split(&rel);
            let (Ok(Ok(dir)), Ok(name)) = (self.open_dir(parent, libc::O_PATH), cstring(name))
            else {
                continue;
            };
            let _ = sys::utimensat_nofollow(dir.as_fd(), &name, t);
        }
    }
}

/// Removes the directory `name` in `parent` and everything below it, never following a
/// symlink and never leaving the device `dev`. Iterative: depth costs heap and fds, not stack.
fn remove_tree(parent: BorrowedFd<'_>, name: &CStr, dev: u64) -> io::Result<()> {
    struct Frame {
        fd: OwnedFd,
        name: CString,
        pending: Vec<CString>,
    }
    let open = |dir: BorrowedFd<'_>, name: &CStr| -> io::Result<Frame> {
        let fd = sys::openat(
            dir,
            name,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?;
        if sys::fstat(fd.as_fd())?.st_dev != dev {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        }
        let pending = sys::list_dir(fd.as_fd())?;
        Ok(Frame {
            fd,
            name: name.to_owned(),
            pending,
        })
    };
    let mut stack = vec![open(parent, name)?];
    while let Some(top) = stack.last_mut() {
        if let Some(child) = top.pending.pop() {
            let st = match sys::fstatat(top.fd.as_fd(), &child) {
                Ok(st) => st,
                Err(e) if errno_is(&e, &[libc::ENOENT]) => continue,
                Err(e) => return Err(e),
            };
            if is_dir(&st) {
                let frame = open(top.fd.as_fd(), &child)?;
                stack.push(frame);
            } else {
                sys::unlinkat(top.fd.as_fd(), &child, 0)?;
            }
            continue;
        }
        let Some(done) = stack.pop() else { break };
        drop(done.fd);
        let up = stack.last().map_or(parent, |f| f.fd.as_fd());
        sys::unlinkat(up, &done.name, libc::AT_REMOVEDIR)?;
    }
    Ok(())
}

/// Thin safe wrappers of the `*at` syscalls used here. Each takes a directory fd and a single
/// name (or a path resolved by openat2 beneath the root).
mod sys {
    use std::ffi::{CStr, CString};
    use std::io;
    use std::mem::MaybeUninit;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

    const RESOLVE: u64 =
        libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;

    fn cvt(r: libc::c_int) -> io::Result<()> {
        if r == -1 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn interrupted(e: &io::Error) -> bool {
        e.kind() == io::ErrorKind::Interrupted
    }

    pub fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    /// openat2 from `dir` with RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV:
    /// `dir` acts as `/` for every absolute symlink and `..` met on the way.
    pub fn openat2(
        dir: BorrowedFd<'_>,
        path: &CStr,
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<OwnedFd> {
        // SAFETY: open_how is plain integers (non-exhaustive in libc, hence no struct
        // literal): all zeroes is a valid value.
        let mut how: libc::open_how = unsafe { std::mem::zeroed() };
        how.flags = (flags | libc::O_CLOEXEC) as u64;
        how.mode = u64::from(mode);
        how.resolve = RESOLVE;
        let mut again = 0;
        loop {
            // SAFETY: `path` is NUL-terminated and `how` is a fully initialised open_how whose
            // exact size is passed; the kernel only reads both during the call.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_openat2,
                    dir.as_raw_fd(),
                    path.as_ptr(),
                    &how as *const libc::open_how,
                    std::mem::size_of::<libc::open_how>(),
                )
            };
            if r >= 0 {
                // SAFETY: the syscall returned a new fd that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) });
            }
            let e = io::Error::last_os_error();
            // EAGAIN: a concurrent rename made RESOLVE_IN_ROOT unsure; try again a few times.
            if interrupted(&e) || (e.raw_os_error() == Some(libc::EAGAIN) && again < 16) {
                again += 1;
                continue;
            }
            return Err(e);
        }
    }

    pub fn openat(
        dir: BorrowedFd<'_>,
        name: &CStr,
        flags: libc::c_int,
        mode: libc::mode_t,
    ) -> io::Result<OwnedFd> {
        loop {
            // SAFETY: `name` is NUL-terminated; openat does not keep the pointer.
            let r = unsafe {
                libc::openat(
                    dir.as_raw_fd(),
                    name.as_ptr(),
                    flags | libc::O_CLOEXEC,
                    libc::c_uint::from(mode),
                )
            };
            if r >= 0 {
                // SAFETY: openat returned a new fd that nothing else owns.
                return Ok(unsafe { OwnedFd::from_raw_fd(r) });
            }
            let e = io::Error::last_os_error();
            if !interrupted(&e) {
                return Err(e);
            }
        }
    }

    /// lstat of `name` in `dir`.
    pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `name` is NUL-terminated and `st` is valid for writes of a `stat`.
        cvt(unsafe {
            libc::fstatat(
                dir.as_raw_fd(),
                name.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        // SAFETY: fstatat succeeded, so it filled `st`.
        Ok(unsafe { st.assume_init() })
    }

    pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
        let mut st = MaybeUninit::<libc::stat>::uninit();
        // SAFETY: `st` is valid for writes of a `stat`; fstat works on O_PATH fds.
        cvt(unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) })?;
        // SAFETY: fstat succeeded, so it filled `st`.
        Ok(unsafe { st.assume_init() })
    }

    pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
    }

    pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
    }

    pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        // SAFETY: both strings are NUL-terminated.
        cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
    }

    /// Hard link without following a symlink target (flags 0).
    pub fn linkat(
        old_dir: BorrowedFd<'_>,
        old: &CStr,
        new_dir: BorrowedFd<'_>,
        new: &CStr,
    ) -> io::Result<()> {
        // SAFETY: both strings are NUL-terminated.
        cvt(unsafe {
            libc::linkat(
                old_dir.as_raw_fd(),
                old.as_ptr(),
                new_dir.as_raw_fd(),
                new.as_ptr(),
                0,
            )
        })
    }

    pub fn mknodat(
        dir: BorrowedFd<'_>,
        name: &CStr,
        mode: libc::mode_t,
        dev: libc::dev_t,
    ) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) })
    }

    pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
        // SAFETY: plain syscall on a borrowed fd.
        cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
    }

    pub fn fchownat_nofollow(
        dir: BorrowedFd<'_>,
        name: &CStr,
        uid: u32,
        gid: u32,
    ) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        cvt(unsafe {
            libc::fchownat(
                dir.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
        // SAFETY: plain syscall on a borrowed fd.
        cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
    }

    /// chmod of `name` in `dir` that refuses to act on a symlink. The C library does it with
    /// fchmodat2 (Linux 6.6) or an O_PATH fd; where neither works, `name` is checked with lstat
    /// first (callers only chmod nodes they just created with mknodat, which never follows).
    pub fn fchmodat_nofollow(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated.
        let r = cvt(unsafe {
            libc::fchmodat(
                dir.as_raw_fd(),
                name.as_ptr(),
                mode,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        });
        match r {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                let st = fstatat(dir, name)?;
                if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
                    return Err(e);
                }
                // SAFETY: `name` is NUL-terminated; it was just checked not to be a symlink.
                cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) })
            }
            r => r,
        }
    }

    pub fn futimens(fd: BorrowedFd<'_>, mtime: libc::timespec) -> io::Result<()> {
        let times = [mtime, mtime];
        // SAFETY: `times` holds the two timespecs futimens reads.
        cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })
    }

    pub fn utimensat_nofollow(
        dir: BorrowedFd<'_>,
        name: &CStr,
        mtime: libc::timespec,
    ) -> io::Result<()> {
        let times = [mtime, mtime];
        // SAFETY: `name` is NUL-terminated and `times` holds the two timespecs read.
        cvt(unsafe {
            libc::utimensat(
                dir.as_raw_fd(),
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    pub fn fsetxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8]) -> io::Result<()> {
        // SAFETY: `name` is NUL-terminated and `value` is valid for `value.len()` bytes.
        cvt(unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })
    }

    /// The names in a directory, without `.` and `..`.
    pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
        // A fresh open file description: the listing starts at the beginning and leaves the
        // caller's fd alone.
        let fd = openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)?.into_raw_fd();
        // SAFETY: `fd` is an open directory fd we own; on success the DIR takes it over.
        let dirp = unsafe { libc::fdopendir(fd) };
        if dirp.is_null() {
            let e = io::Error::last_os_error();
            // SAFETY: fdopendir failed, so `fd` is still ours to close.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        let mut out = Vec::new();
        let res = loop {
            // SAFETY: the errno location of this thread is always valid; zeroing it tells
            // the end of the directory from an error below.
            unsafe { *libc::__errno_location() = 0 };
            // SAFETY: `dirp` is a live DIR until closedir below.
            let ent = unsafe { libc::readdir(dirp) };
            if ent.is_null() {
                let e = io::Error::last_os_error();
                break if e.raw_os_error() == Some(0) {
                    Ok(())
                } else {
                    Err(e)
                };
            }
            // SAFETY: readdir returned a valid dirent whose d_name is NUL-terminated; it is
            // copied before the next readdir call.
            let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) };
            if name != c"." && name != c".." {
                out.push(name.to_owned());
            }
        };
        // SAFETY: `dirp` is live and closed exactly once (which closes `fd`).
        unsafe { libc::closedir(dirp) };
        res.map(|()| out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use tar::EntryType;

    /// One tar entry of a test layer; the name is written raw (hostile names included).
    struct E {
        name: Vec<u8>,
        kind: EntryType,
        mode: u32,
        uid: u64,
        gid: u64,
        mtime: u64,
        link: Option<Vec<u8>>,
        data: Vec<u8>,
        dev: (u32, u32),
        pax: Vec<(String, Vec<u8>)>,
    }

    fn e(name: &str, kind: EntryType, mode: u32) -> E {
        E {
            name: name.as_bytes().to_vec(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: 1_600_000_000,
            link: None,
            data: Vec::new(),
            dev: (0, 0),
            pax: Vec::new(),
        }
    }
    fn dir(name: &str, mode: u32) -> E {
        e(name, EntryType::Directory, mode)
    }
    fn file(name: &str, data: &[u8], mode: u32) -> E {
        E {
            data: data.to_vec(),
            ..e(name, EntryType::Regular, mode)
        }
    }
    fn symlink(name: &str, target: &str) -> E {
        E {
            link: Some(target.as_bytes().to_vec()),
            ..e(name, EntryType::Symlink, 0o777)
        }
    }
    fn hardlink(name: &str, target: &str) -> E {
        E {
            link: Some(target.as_bytes().to_vec()),
            ..e(name, EntryType::Link, 0o644)
        }
    }
    fn whiteout(name: &str) -> E {
        file(name, b"", 0o644)
    }
    impl E {
        fn owner(mut self, uid: u64, gid: u64) -> E {
            self.uid = uid;
            self.gid = gid;
            self
        }
        fn mtime(mut self, t: u64) -> E {
            self.mtime = t;
            self
        }
        fn pax(mut self, key: &str, value: &[u8]) -> E {
            self.pax.push((key.to_owned(), value.to_vec()));
            self
        }
    }

    fn tar(entries: Vec<E>) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            if !e.pax.is_empty() {
                b.append_pax_extensions(e.pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .expect("pax records");
            }
            let mut h = tar::Header::new_gnu();
            h.as_mut_bytes()[..e.name.len()].copy_from_slice(&e.name);
            h.set_entry_type(e.kind);
            h.set_mode(e.mode);
            h.set_uid(e.uid);
            h.set_gid(e.gid);
            h.set_mtime(e.mtime);
            h.set_size(e.data.len() as u64);
            if let Some(l) = &e.link {
                h.set_link_name_literal(l).expect("set_link_name_literal");
            }
            h.set_device_major(e.dev.0).expect("set_device_major");
            h.set_device_minor(e.dev.1).expect("set_device_minor");
            h.set_cksum();
            b.append(&h, e.data.as_slice()).expect("append");
        }
        b.into_inner().expect("into_inner")
    }

    const LIMITS: Limits = Limits {
        max_bytes: 1 << 30,
        max_entries: 100_000,
    };

    fn apply(root: &Path, entries: Vec<E>) -> ApplyStats {
        let mut stats = ApplyStats::default();
        apply_layer(
            root,
            tar(entries).as_slice(),
            Compression::None,
            &LIMITS,
            &mut stats,
        )
        .expect("apply_layer");
        stats
    }

    fn lmeta(p: &Path) -> std::fs::Metadata {
        std::fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn exists(p: &Path) -> bool {
        std::fs::symlink_metadata(p).is_ok()
    }

    fn getxattr(p: &Path, name: &CStr) -> Option<Vec<u8>> {
        let path = CString::new(p.as_os_str().as_bytes()).expect("new");
        let mut buf = vec![0u8; 256];
        // SAFETY: both strings are NUL-terminated and `buf` is valid for its length.
        let n = unsafe {
            libc::lgetxattr(
                path.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        (n >= 0).then(|| buf[..n as usize].to_vec())
    }

    fn user_xattrs_supported(dir: &Path) -> bool {
        let probe = dir.join(".xattr-probe");
        std::fs::write(&probe, b"").expect("write");
        let path = CString::new(probe.as_os_str().as_bytes()).expect("new");
        // SAFETY: both strings are NUL-terminated and the value is valid for 1 byte.
        let r = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"user.probe".as_ptr(),
                b"x".as_ptr().cast(),
                1,
                0,
            )
        };
        std::fs::remove_file(&probe).expect("remove_file");
        r == 0
    }

    fn all_names(root: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_owned()];
        while let Some(d) = stack.pop() {
            for ent in std::fs::read_dir(&d).expect("read_dir") {
                let ent = ent.expect("dir entry");
                let p = ent.path();
                out.push(
                    p.strip_prefix(root)
                        .expect("strip_prefix")
                        .display()
                        .to_string(),
                );
                if ent.file_type().expect("file_type").is_dir() {
                    stack.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn media_types() {
        use Compression as C;
        let m = Compression::from_media_type;
        assert_eq!(m("application/vnd.oci.image.layer.v1.tar"), Some(C::None));
        assert_eq!(
            m("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(C::Gzip)
        );
        assert_eq!(
            m("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(C::Zstd)
        );
        assert_eq!(
            m("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some(C::Gzip)
        );
        assert_eq!(
            m("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
            Some(C::Gzip)
        );
        assert_eq!(m("application/vnd.oci.image.config.v1+json"), None);
        assert_eq!(m("application/vnd.oci.image.layer.v1.tar+bzip2"), None);
    }

    #[test]
    fn normalizes_names() {
        assert_eq!(normalize(b"./a//b/./c/").expect("normalize"), b"a/b/c");
        assert_eq!(normalize(b"/etc/passwd").expect("normalize"), b"etc/passwd");
        assert_eq!(normalize(b"./").expect("normalize"), b"");
        assert!(normalize(b"a/../b").is_err());
        assert!(normalize(b"..").is_err());
        let t = parse_pax_time(b"1700000000.25").expect("parse_pax_time");
        assert_eq!((t.tv_sec, t.tv_nsec), (1_700_000_000, 250_000_000));
        let t = parse_pax_time(b"-1.5").expect("parse_pax_time");
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 500_000_000));
    }

    #[test]
    fn two_layers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("root");
        ensure_mount_points(&root).expect("ensure_mount_points");
        let as_root = sys::is_root();
        let xattrs = user_xattrs_supported(tmp.path());
        let mut l1 = vec![
            dir("./", 0o755),
            dir("./etc/", 0o755),
            file("etc/hosts", b"127.0.0.1 localhost\n", 0o644).mtime(1_000_000),
            // No `home/` entry: the parent is created implicitly.
            dir("home/user/", 0o700).owner(1000, 1000).mtime(2_000_000),
            file("home/user/.profile", b"PS1=x\n", 0o640).owner(1000, 1001),
            file("usr/bin/su", b"#!su", 0o4755).owner(1000, 0),
            file("usr/bin/tool", b"tool", 0o2711),
            symlink("bin", "usr/bin"),
            symlink("usr/bin/sh", "/bin/dash"),
            hardlink("etc/hosts.bak", "etc/hosts"),
            e("run/initctl", EntryType::Fifo, 0o600),
            file("tmp/x", b"", 0o1777),
            file("etc/attr", b"a", 0o600).pax("SCHILY.xattr.user.test", b"hello"),
            file("etc/trusted", b"a", 0o600).pax("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ];
        if as_root {
            l1.push(E {
                dev: (1, 3),
                ..e("dev/null", EntryType::Char, 0o666)
            });
        }
        let stats = apply(&root, l1);
        assert_eq!(stats.bytes, 20 + 6 + 4 + 4 + 1 + 1);
        assert!(
            stats.skipped.iter().any(|s| s.contains("trusted.overlay")),
            "{:?}",
            stats.skipped
        );

        let hosts = root.join("etc/hosts");
        assert_eq!(
            std::fs::read(&hosts).expect("read"),
            b"127.0.0.1 localhost\n"
        );
        assert_eq!(lmeta(&hosts).permissions().mode() & 0o7777, 0o644);
        assert_eq!(lmeta(&hosts).mtime(), 1_000_000);
        let home = root.join("home/user");
        assert!(lmeta(&home).is_dir());
        assert_eq!(lmeta(&home).permissions().mode() & 0o7777, 0o700);
        // Set at the end, after the file inside changed it.
        assert_eq!(lmeta(&home).mtime(), 2_000_000);
        assert_eq!(
            lmeta(&root.join("home")).permissions().mode() & 0o7777,
            0o755
        );
        let profile = root.join("home/user/.profile");
        assert_eq!(lmeta(&profile).permissions().mode() & 0o7777, 0o640);
        let su = root.join("usr/bin/su");
        assert_eq!(lmeta(&su).permissions().mode() & 0o7777, 0o4755);
        assert_eq!(
            lmeta(&root.join("usr/bin/tool")).permissions().mode() & 0o7777,
            0o2711
        );
        assert_eq!(
            lmeta(&root.join("tmp/x")).permissions().mode() & 0o7777,
            0o1777
        );
        if as_root {
            assert_eq!((lmeta(&home).uid(), lmeta(&home).gid()), (1000, 1000));
            assert_eq!((lmeta(&profile).uid(), lmeta(&profile).gid()), (1000, 1001));
            assert_eq!(lmeta(&su).uid(), 1000);
            let null = lmeta(&root.join("dev/null"));
            assert!(null.file_type().is_char_device());
            assert_eq!(null.rdev(), libc::makedev(1, 3));
            assert_eq!(null.permissions().mode() & 0o7777, 0o666);
        }
        assert_eq!(
            std::fs::read_link(root.join("usr/bin/sh")).expect("read_link"),
            Path::new("/bin/dash")
        );
        assert_eq!(
            std::fs::read_link(root.join("bin")).expect("read_link"),
            Path::new("usr/bin")
        );
        assert_eq!(
            lmeta(&root.join("etc/hosts.bak")).ino(),
            lmeta(&hosts).ino()
        );
        assert!(lmeta(&root.join("run/initctl")).file_type().is_fifo());
        if xattrs {
            let v = getxattr(&root.join("etc/attr"), c"user.test");
            assert_eq!(v.as_deref(), Some(&b"hello"[..]));
        }
        assert!(getxattr(&root.join("etc/trusted"), c"trusted.overlay.opaque").is_none());

        // Layer 2: a directory over a directory keeps its contents and takes the new
        // metadata; a file over a file, a symlink over a file, a file over a directory.
        let stats2 = apply(
            &root,
            vec![
                dir("etc", 0o750).mtime(3_000_000),
                file("etc/hosts", b"new\n", 0o600),
                symlink("etc/hosts.bak", "hosts"),
                file("home/user", b"now a file", 0o644),
                dir("run/initctl", 0o755),
            ],
        );
        assert!(stats2.skipped.is_empty(), "{:?}", stats2.skipped);
        let etc = lmeta(&root.join("etc"));
        assert_eq!(etc.permissions().mode() & 0o7777, 0o750);
        assert_eq!(etc.mtime(), 3_000_000);
        assert!(root.join("etc/attr").exists());
        assert_eq!(std::fs::read(&hosts).expect("read"), b"new\n");
        assert_eq!(
            std::fs::read_link(root.join("etc/hosts.bak")).expect("read_link"),
            Path::new("hosts")
        );
        assert_eq!(std::fs::read(&home).expect("read"), b"now a file");
        assert!(lmeta(&root.join("run/initctl")).is_dir());
        // The mount points were kept or made.
        assert_eq!(
            lmeta(&root.join("root")).permissions().mode() & 0o7777,
            0o700
        );
        assert_eq!(lmeta(&root).permissions().mode() & 0o7777, 0o755);
    }

    #[test]
    fn whiteouts() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        apply(
            root,
            vec![
                file("a/file1", b"1", 0o644),
                file("a/file2", b"2", 0o644),
                file("b/sub/deep/x", b"x", 0o644),
                symlink("b/sub/link", "/"),
                file("c/keep-lower", b"lower", 0o644),
                file("c/sub/lower", b"lower", 0o644),
                file("c/merged/lower", b"lower", 0o644),
                file("d/lower", b"lower", 0o644),
            ],
        );
        let stats = apply(
            root,
            vec![
                whiteout("a/.wh.file1"),
                whiteout(".wh.b"),
                whiteout("nonexistent/.wh.x"),
                file("c/new-before", b"n", 0o644),
                dir("c/merged", 0o755),
                whiteout("c/.wh..wh..opq"),
                file("c/new-after", b"n", 0o644),
                file("c/sub/new", b"n", 0o644),
                // A whiteout spares what the same layer made.
                file("d/same", b"s", 0o644),
                whiteout("d/.wh.same"),
                whiteout("d/.wh.lower"),
            ],
        );
        assert!(stats.skipped.is_empty(), "{:?}", stats.skipped);
        assert_eq!(
            all_names(root),
            [
                "a",
                "a/file2",
                "c",
                "c/merged",
                "c/new-after",
                "c/new-before",
                "c/sub",
                "c/sub/new",
                "d",
                "d/same",
            ]
        );
    }

    #[test]
    fn hostile_entries_stay_inside() {
        let outer = tempfile::tempdir().expect("tempdir");
        let root = outer.path().join("root");
        std::fs::create_dir(&root).expect("create_dir");
        let victim = outer.path().join("victim");
        std::fs::write(&victim, b"host file").expect("write");
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600))
            .expect("set_permissions");
        let victim_str = victim.to_str().expect("to_str").to_owned();
        let outer_str = outer.path().to_str().expect("to_str").to_owned();
        let passwd_links = lmeta(Path::new("/etc/passwd")).nlink();

        let stats = apply(
            &root,
            vec![
                file("../escape", b"x", 0o644),
                file("a/../../escape", b"x", 0o644),
                file("/abs-file", b"abs", 0o644),
                symlink("evil", "/"),
                file("evil/etc/passwd-owned", b"owned", 0o644),
                symlink("link", "../../.."),
                file("link/x", b"x", 0o644),
                hardlink("hl1", "/etc/passwd"),
                hardlink("hl2", "../../etc/passwd"),
                hardlink("hl3", "link/../etc/shadow"),
                // A hard link to a symlink links the symlink, never what it points to.
                symlink("ps", "/etc/passwd"),
                hardlink("hlps", "ps"),
                // A symlink then a file of the same name: replaced, not written through.
                symlink("sym", &victim_str),
                file("sym", b"replaced", 0o644),
                // Same with a directory entry (its chmod must not reach the victim).
                symlink("symdir", &victim_str),
                dir("symdir", 0o777),
                // A whiteout through a symlink to the host directory.
                symlink("out", &outer_str),
                whiteout("out/.wh.victim"),
                // Opaque through it.
                whiteout("out/.wh..wh..opq"),
                // A file through an absolute symlink to a host directory.
                file("out/victim", b"through", 0o666),
            ],
        );
        // Only the root and the victim are in outer; the victim is untouched.
        let mut outer_names: Vec<_> = std::fs::read_dir(outer.path())
            .expect("read_dir")
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .into_string()
                    .expect("into_string")
            })
            .collect();
        outer_names.sort();
        assert_eq!(outer_names, ["root", "victim"]);
        assert_eq!(std::fs::read(&victim).expect("read"), b"host file");
        assert_eq!(lmeta(&victim).permissions().mode() & 0o7777, 0o600);
        assert!(!Path::new("/etc/passwd-owned").exists());
        assert_eq!(lmeta(Path::new("/etc/passwd")).nlink(), passwd_links);
        assert!(!outer
            .path()
            .parent()
            .expect("parent")
            .join("escape")
            .exists());

        // Skipped: the `..` names and the hard links (nothing of that name inside root).
        let skipped = stats.skipped.join("\n");
        for name in ["../escape", "a/../../escape", "hl1", "hl2", "hl3"] {
            assert!(
                stats.skipped.iter().any(|s| s.starts_with(name)),
                "{name} not in {skipped}"
            );
        }
        // What did land, landed inside.
        assert_eq!(std::fs::read(root.join("abs-file")).expect("read"), b"abs");
        assert_eq!(
            std::fs::read(root.join("etc/passwd-owned")).expect("read"),
            b"owned"
        );
        assert_eq!(std::fs::read(root.join("x")).expect("read"), b"x");
        assert!(lmeta(&root.join("hlps")).file_type().is_symlink());
        assert_eq!(
            lmeta(&root.join("hlps")).ino(),
            lmeta(&root.join("ps")).ino()
        );
        assert!(lmeta(&root.join("sym")).is_file());
        assert_eq!(std::fs::read(root.join("sym")).expect("read"), b"replaced");
        assert!(lmeta(&root.join("symdir")).is_dir());
        // `out` dangles inside root (no `<root>/<outer>` there): the entry beneath it is
        // skipped rather than followed anywhere.
        assert!(
            stats.skipped.iter().any(|s| s.starts_with("out/victim")),
            "{skipped}"
        );
        assert!(lmeta(&root.join("out")).file_type().is_symlink());
        eprintln!("{skipped}");
        for name in all_names(&root) {
            assert!(!name.contains(".wh."), "{name}");
        }

        // A hard link to an absolute path links the file *inside* root.
        apply(
            &root,
            vec![
                file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644),
                hardlink("hl1", "/etc/passwd"),
                hardlink("hl4", "evil/etc/passwd"),
            ],
        );
        let inode = lmeta(&root.join("etc/passwd")).ino();
        assert_eq!(lmeta(&root.join("hl1")).ino(), inode);
        assert_eq!(lmeta(&root.join("hl4")).ino(), inode);
        assert_eq!(lmeta(Path::new("/etc/passwd")).nlink(), passwd_links);
        // Hard links to directories are refused.
        let stats = apply(&root, vec![hardlink("hl5", "etc")]);
        assert!(stats.skipped[0].starts_with("hl5"), "{:?}", stats.skipped);
        assert!(!exists(&root.join("hl5")));
    }

    #[test]
    fn compressed_layers() {
        let layer = tar(vec![dir("d", 0o755), file("d/f", b"compressed", 0o644)]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&layer).expect("write_all");
        let gz = gz.finish().expect("finish");
        let zst = zstd::encode_all(layer.as_slice(), 3).expect("encode_all");
        for (c, blob) in [(Compression::Gzip, gz), (Compression::Zstd, zst)] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let mut stats = ApplyStats::default();
            apply_layer(tmp.path(), blob.as_slice(), c, &LIMITS, &mut stats).expect("apply_layer");
            assert_eq!(
                std::fs::read(tmp.path().join("d/f")).expect("read"),
                b"compressed"
            );
            assert_eq!((stats.entries, stats.bytes), (2, 10));
            // A corrupt stream is an error.
            let mut bad = blob.clone();
            let n = bad.len();
            bad[n - 6] ^= 0xff;
            let tmp = tempfile::tempdir().expect("tempdir");
            let r = apply_layer(tmp.path(), bad.as_slice(), c, &LIMITS, &mut stats);
            assert!(r.is_err(), "{c:?}");
        }
    }

    #[test]
    fn limits() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let layer = tar(vec![
            file("small", &[1; 1000], 0o644),
            file("big", &[7; 10_000], 0o644),
        ]);
        let limits = Limits {
            max_bytes: 4096,
            max_entries: 10,
        };
        let mut stats = ApplyStats::default();
        let err = apply_layer(
            tmp.path(),
            layer.as_slice(),
            Compression::None,
            &limits,
            &mut stats,
        )
        .expect_err("must fail");
        assert!(
            matches!(&err, LayerError::TooLarge { path, limit: 4096 } if path == "big"),
            "{err}"
        );
        assert!(!tmp.path().join("big").exists());

        // A gzip bomb: a few KiB that inflate to 64 MiB of zeros in one file.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let mut b = tar::Builder::new(&mut gz);
        let mut h = tar::Header::new_gnu();
        h.set_path("zeros").expect("set_path");
        h.set_size(64 << 20);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, io::repeat(0).take(64 << 20)).expect("append");
        b.into_inner().expect("into_inner");
        let bomb = gz.finish().expect("finish");
        assert!(bomb.len() < 200_000);
        let limits = Limits {
            max_bytes: 1 << 20,
            max_entries: 10,
        };
        let err = apply_layer(
            tmp.path(),
            bomb.as_slice(),
            Compression::Gzip,
            &limits,
            &mut stats,
        )
        .expect_err("must fail");
        assert!(matches!(err, LayerError::TooLarge { .. }), "{err}");

        let many: Vec<E> = (0..20)
            .map(|i| file(&format!("f{i}"), b"", 0o644))
            .collect();
        let err = apply_layer(
            tmp.path(),
            tar(many).as_slice(),
            Compression::None,
            &limits,
            &mut stats,
        )
        .expect_err("must fail");
        assert!(
            matches!(err, LayerError::TooManyEntries { limit: 10, .. }),
            "{err}"
        );
    }

    #[test]
    fn ensure_mount_points_keeps_what_is_there() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join("new/root");
        std::fs::create_dir_all(&root).expect("create_dir_all");
        std::os::unix::fs::symlink("/outside", root.join("etc")).expect("symlink");
        std::os::unix::fs::symlink(tmp.path(), root.join("run")).expect("symlink");
        ensure_mount_points(&root).expect("ensure_mount_points");
        for (name, mode) in [
            ("dev", 0o755),
            ("proc", 0o555),
            ("sys", 0o555),
            ("tmp", 0o1777),
            ("root", 0o700),
        ] {
            let m = lmeta(&root.join(name));
            assert!(m.is_dir(), "{name}");
            assert_eq!(m.permissions().mode() & 0o7777, mode, "{name}");
        }
        assert!(lmeta(&root.join("etc")).file_type().is_symlink());
        assert!(lmeta(&root.join("run")).file_type().is_symlink());
        assert!(!exists(&tmp.path().join("dev")));
        assert_eq!(lmeta(&root).permissions().mode() & 0o7777, 0o755);
        // Idempotent.
        ensure_mount_points(&root).expect("ensure_mount_points");
    }
}
