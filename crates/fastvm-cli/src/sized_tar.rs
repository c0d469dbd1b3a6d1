//! A tar of a local directory whose exact size is known before a byte is read,
//! so `fastvm cp DIR VM:PATH` can PUT it with a Content-Length (S3 presigned
//! PUTs require one) without a temporary copy.
//!
//! ```text
//!  plan    walk the tree (lstat only, no file data read) -> entries + exact size
//!  write   walk it again in the same order, compare with the plan, write the
//!          archive with tar::Builder; an entry that appeared or disappeared, or
//!          whose type, size or symlink target differs, or a file shorter or longer
//!          than its size -> an error before a wrong byte count is written
//! ```
//!
//! Members are rooted at `./` (`./`, `./sub/`, `./sub/file`), as `tar -C DIR -cf - .`
//! makes them. Format (what `size` counts): per member a 512-byte GNU header,
//! preceded by a GNU `././@LongLink` block (`L` for the name, `K` for a symlink
//! target: a 512-byte header + the name and a NUL, padded to 512) when the name
//! or target is longer than the 100-byte header field; file data padded to 512;
//! then the two zero blocks `tar::Builder::finish` writes (no record padding).
//! Regular files, directories, symlinks (not followed), FIFOs and device nodes;
//! sockets are skipped as GNU tar does; hard links are stored as separate copies.

use std::ffi::OsString;
use std::fs::{self, Metadata};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

const BLOCK: u64 = 512;
/// Bytes of the name and linkname fields of a header.
const FIELD: usize = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Char,
    Block,
}

impl Kind {
    fn of(meta: &Metadata) -> Option<Self> {
        let t = meta.file_type();
        Some(if t.is_file() {
            Kind::File
        } else if t.is_dir() {
            Kind::Dir
        } else if t.is_symlink() {
            Kind::Symlink
        } else if t.is_fifo() {
            Kind::Fifo
        } else if t.is_char_device() {
            Kind::Char
        } else if t.is_block_device() {
            Kind::Block
        } else {
            return None; // a socket: skipped
        })
    }
}

#[derive(Debug)]
struct Entry {
    /// Relative to the root; empty for the root itself.
    rel: PathBuf,
    kind: Kind,
    size: u64,
    link: Option<OsString>,
}

/// Pass 1: what will be archived and the exact archive size.
#[derive(Debug)]
pub struct Plan {
    dir: PathBuf,
    entries: Vec<Entry>,
    pub size: u64,
}

fn padded(n: u64) -> u64 {
    n.div_ceil(BLOCK) * BLOCK
}

/// Bytes of the GNU long-name (or long-link) member for a name of `len` bytes.
fn long_member(len: usize) -> u64 {
    if len > FIELD {
        BLOCK + padded(len as u64 + 1)
    } else {
        0
    }
}

/// The name of a member: `./`, `./rel`, `./rel/` for a directory.
fn member_name(rel: &Path, kind: Kind) -> Vec<u8> {
    let mut name = b"./".to_vec();
    if !rel.as_os_str().is_empty() {
        name.extend_from_slice(rel.as_os_str().as_bytes());
        if kind == Kind::Dir {
            name.push(b'/');
        }
    }
    name
}

fn member_size(e: &Entry) -> u64 {
    let name = member_name(&e.rel, e.kind).len();
    let link = e.link.as_ref().map_or(0, |l| l.len());
    long_member(name) + long_member(link) + BLOCK + padded(e.size)
}

/// Pre-order walk, children sorted by name, symlinks not followed:
/// `(relative path, lstat)`.
struct Walk {
    root: PathBuf,
    stack: Vec<PathBuf>,
}

impl Walk {
    fn new(root: &Path) -> Self {
        Walk {
            root: root.to_owned(),
            stack: vec![PathBuf::new()],
        }
    }
}

impl Iterator for Walk {
    type Item = io::Result<(PathBuf, Metadata)>;

    fn next(&mut self) -> Option<Self::Item> {
        let rel = self.stack.pop()?;
        let path = self.root.join(&rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                return Some(Err(io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.display()),
                )))
            }
        };
        if meta.is_dir() {
            let names = fs::read_dir(&path).and_then(|it| {
                it.map(|e| e.map(|e| e.file_name()))
                    .collect::<io::Result<Vec<_>>>()
            });
            let mut names = match names {
                Ok(n) => n,
                Err(e) => {
                    return Some(Err(io::Error::new(
                        e.kind(),
                        format!("{}: {e}", path.display()),
                    )))
                }
            };
            names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            self.stack
                .extend(names.into_iter().rev().map(|n| rel.join(n)));
        }
        Some(Ok((rel, meta)))
    }
}

fn entry(root: &Path, rel: PathBuf, meta: &Metadata) -> io::Result<Option<Entry>> {
    let Some(kind) = Kind::of(meta) else {
        return Ok(None);
    };
    let link = if kind == Kind::Symlink {
        Some(fs::read_link(root.join(&rel))?.into_os_string())
    } else {
        None
    };
    let size = if kind == Kind::File { meta.len() } else { 0 };
    Ok(Some(Entry {
        rel,
        kind,
        size,
        link,
    }))
}

/// Pass 1: lstat every entry and compute the archive size. Reads no file data.
pub fn plan(dir: &Path) -> io::Result<Plan> {
    let mut entries = Vec::new();
    let mut size = 2 * BLOCK; // the end of the archive
    for item in Walk::new(dir) {
        let (rel, meta) = item?;
        if let Some(e) = entry(dir, rel, &meta)? {
            size += member_size(&e);
            entries.push(e);
        }
    }
    Ok(Plan {
        dir: dir.to_owned(),
        entries,
        size,
    })
}

fn changed(dir: &Path, rel: &Path, why: &str) -> io::Error {
    io::Error::other(format!(
        "{} {why} during the upload (the archive size is computed before streaming); upload again once the directory is stable",
        dir.join(rel).display()
    ))
}

/// A GNU `././@LongLink` member carrying `name` (type `L` or `K`).
fn append_long<W: Write>(b: &mut tar::Builder<W>, kind: u8, name: &[u8]) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    let marker = b"././@LongLink";
    h.as_old_mut().name[..marker.len()].copy_from_slice(marker);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(name.len() as u64 + 1);
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_cksum();
    b.append(&h, name.chain(&[0u8][..]))
}

/// Puts `value` in a 100-byte field (truncated when a long member carries it whole).
fn set_field(field: &mut [u8; FIELD], value: &[u8]) {
    let n = value.len().min(FIELD);
    field[..n].copy_from_slice(&value[..n]);
}

/// Exactly `left` bytes of a file; an error if it ends early or has more.
struct Exact<'a> {
    file: fs::File,
    left: u64,
    size: u64,
    dir: &'a Path,
    rel: &'a Path,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            let mut one = [0u8; 1];
            return match self.file.read(&mut one)? {
                0 => Ok(0),
                _ => Err(changed(
                    self.dir,
                    self.rel,
                    &format!("grew (was {} bytes)", self.size),
                )),
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want])?;
        if n == 0 {
            return Err(changed(
                self.dir,
                self.rel,
                &format!("shrank (was {} bytes)", self.size),
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Pass 2: write the archive (exactly `plan.size` bytes) into `out`; returns `out`.
pub fn write<W: Write>(plan: &Plan, out: W) -> io::Result<W> {
    let dir = plan.dir.as_path();
    let mut b = tar::Builder::new(out);
    let mut planned = plan.entries.iter();
    let mut written = 2 * BLOCK;
    for item in Walk::new(dir) {
        let (rel, meta) = match item {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(io::Error::other(format!("{} changed during the upload (an entry disappeared: {e}); upload again once the directory is stable", dir.display()))),
            Err(e) => return Err(e),
        };
        let Some(now) = entry(dir, rel, &meta).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                changed(dir, Path::new(""), "changed (a symlink disappeared)")
            } else {
                e
            }
        })?
        else {
            continue;
        };
        let Some(want) = planned.next() else {
            return Err(changed(dir, &now.rel, "appeared"));
        };
        if want.rel != now.rel {
            return Err(io::Error::other(format!(
                "{} changed during the upload: found {} where {} was expected (an entry appeared or disappeared; the archive size is computed before streaming); upload again once the directory is stable",
                dir.display(),
                now.rel.display(),
                want.rel.display()
            )));
        }
        if want.kind != now.kind {
            return Err(changed(dir, &now.rel, "changed type"));
        }
        if want.size != now.size {
            return Err(changed(
                dir,
                &now.rel,
                &format!("changed size ({} -> {} bytes)", want.size, now.size),
            ));
        }
        if want.link != now.link {
            return Err(changed(dir, &now.rel, "changed its symlink target"));
        }
        let name = member_name(&now.rel, now.kind);
        let mut h = tar::Header::new_gnu();
        h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
        h.set_mode(meta.mode() & 0o7777);
        h.set_size(now.size);
        if name.len() > FIELD {
            append_long(&mut b, b'L', &name)?;
        }
        set_field(&mut h.as_old_mut().name, &name);
        if let Some(link) = &now.link {
            let link = link.as_bytes();
            if link.len() > FIELD {
                append_long(&mut b, b'K', link)?;
            }
            set_field(&mut h.as_old_mut().linkname, link);
        }
        if matches!(now.kind, Kind::Char | Kind::Block) {
            let dev = meta.rdev();
            h.set_device_major(libc::major(dev))?;
            h.set_device_minor(libc::minor(dev))?;
        }
        h.set_cksum();
        if now.kind == Kind::File && now.size > 0 {
            let path = dir.join(&now.rel);
            let file = fs::File::open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            b.append(
                &h,
                Exact {
                    file,
                    left: now.size,
                    size: now.size,
                    dir,
                    rel: &now.rel,
                },
            )?;
        } else {
            b.append(&h, io::empty())?;
        }
        written += member_size(&now);
    }
    if let Some(gone) = planned.next() {
        return Err(changed(dir, &gone.rel, "disappeared"));
    }
    if written != plan.size {
        // Not with an unchanged tree: a bug, caught before the end of the body.
        return Err(io::Error::other(format!(
            "sized tar of {}: {written} bytes made, {} planned",
            dir.display(),
            plan.size
        )));
    }
    b.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// Counts the bytes written, checking the plan against the real archive.
    fn archive(dir: &Path) -> (Plan, Vec<u8>) {
        let p = plan(dir).expect("plan");
        let bytes = write(&p, Vec::new()).expect("write");
        (p, bytes)
    }

    fn tricky_tree(root: &Path) {
        let long_dir = "d".repeat(90);
        let deep = root.join(&long_dir).join("e".repeat(60));
        fs::create_dir_all(&deep).expect("mkdir");
        fs::write(deep.join("f".repeat(200)), vec![1u8; 1000]).expect("long file");
        fs::write(root.join("empty"), b"").expect("empty");
        fs::write(root.join("exact512"), vec![2u8; 512]).expect("512");
        fs::write(root.join("x".repeat(100)), b"100-byte name").expect("100");
        fs::write(root.join("y".repeat(99)), b"99 + ./ = 101").expect("99");
        fs::create_dir(root.join("empty dir")).expect("empty dir");
        fs::write(root.join("naïve – 日本語.txt"), "non-ascii").expect("utf8");
        fs::write(
            root.join(std::ffi::OsStr::from_bytes(b"latin1-\xe9")),
            "not utf-8",
        )
        .expect("latin1");
        let exe = root.join("run.sh");
        fs::write(&exe, "#!/bin/sh\n").expect("exe");
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o750)).expect("chmod");
        symlink("empty", root.join("link")).expect("symlink");
        symlink("z".repeat(150), root.join("dangling-long-link")).expect("long symlink");
        symlink(&long_dir, root.join("dirlink")).expect("dir symlink");
        let fifo = std::ffi::CString::new(root.join("fifo").as_os_str().as_bytes()).expect("cstr");
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).expect("socket");
    }

    #[test]
    fn size_matches_the_archive_of_a_tricky_tree() {
        let tmp = tempfile::tempdir().expect("tmp");
        tricky_tree(tmp.path());
        let (p, bytes) = archive(tmp.path());
        assert_eq!(p.size, bytes.len() as u64);
        // It reads back with the names rooted at ./, long names and targets intact.
        let mut names = Vec::new();
        for e in tar::Archive::new(&bytes[..]).entries().expect("entries") {
            let mut e = e.expect("entry");
            let name = e.path_bytes().into_owned();
            if e.header().entry_type().is_symlink() {
                let target = e.link_name_bytes().expect("target").into_owned();
                if name == b"./dangling-long-link" {
                    assert_eq!(target, "z".repeat(150).as_bytes());
                }
            }
            if name.ends_with(&[b'f'; 200]) {
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("data");
                assert_eq!(data, vec![1u8; 1000]);
            }
            if name == b"./run.sh" {
                assert_eq!(e.header().mode().expect("mode"), 0o750);
            }
            names.push(String::from_utf8_lossy(&name).into_owned());
        }
        assert_eq!(names[0], "./");
        assert!(names.iter().all(|n| n.starts_with("./")), "{names:?}");
        assert!(names.contains(&"./empty dir/".to_owned()) && names.contains(&"./fifo".to_owned()));
        assert!(
            !names.iter().any(|n| n.contains("sock")),
            "sockets are skipped"
        );
        assert!(names.contains(&format!(
            "./{}/{}/{}",
            "d".repeat(90),
            "e".repeat(60),
            "f".repeat(200)
        )));
        // GNU tar, when present, reads it too.
        if let Ok(out) = std::process::Command::new("tar")
            .arg("-tf")
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut c| {
                c.stdin.take().expect("stdin").write_all(&bytes)?;
                c.wait_with_output()
            })
        {
            assert!(out.status.success());
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).lines().count(),
                names.len()
            );
        }
    }

    #[test]
    fn size_matches_for_small_trees() {
        for n in 0..4usize {
            let tmp = tempfile::tempdir().expect("tmp");
            for i in 0..n {
                fs::write(tmp.path().join(format!("f{i}")), vec![0u8; i * 700]).expect("write");
            }
            let (p, bytes) = archive(tmp.path());
            assert_eq!(p.size, bytes.len() as u64, "{n} files");
        }
    }

    /// A named change made to a tree between the two passes.
    type Change = (&'static str, Box<dyn Fn(&Path)>);

    #[test]
    fn a_changed_tree_is_an_error() {
        let cases: Vec<Change> = vec![
            (
                "changed size",
                Box::new(|d| fs::write(d.join("a"), b"longer than before").expect("grow")),
            ),
            (
                "appeared",
                Box::new(|d| fs::write(d.join("z-new"), b"").expect("new")),
            ),
            (
                "found",
                Box::new(|d| fs::write(d.join("b-new"), b"").expect("new")),
            ),
            (
                "disappeared",
                Box::new(|d| fs::remove_file(d.join("c")).expect("rm")),
            ),
            (
                "symlink target",
                Box::new(|d| {
                    fs::remove_file(d.join("l")).expect("rm");
                    symlink("c", d.join("l")).expect("ln");
                }),
            ),
            (
                "changed type",
                Box::new(|d| {
                    fs::remove_file(d.join("c")).expect("rm");
                    fs::create_dir(d.join("c")).expect("mkdir");
                }),
            ),
        ];
        for (why, change) in cases {
            let tmp = tempfile::tempdir().expect("tmp");
            fs::write(tmp.path().join("a"), b"a").expect("a");
            fs::write(tmp.path().join("c"), b"c").expect("c");
            symlink("a", tmp.path().join("l")).expect("l");
            let p = plan(tmp.path()).expect("plan");
            change(tmp.path());
            let err = write(&p, Vec::new()).expect_err(why).to_string();
            assert!(
                err.contains(why) && err.contains("during the upload"),
                "{why}: {err}"
            );
        }
    }

    #[test]
    fn a_file_changing_while_read_is_an_error() {
        let tmp = tempfile::tempdir().expect("tmp");
        let f = tmp.path().join("f");
        fs::write(&f, b"0123456789").expect("write");
        let file = fs::File::open(&f).expect("open");
        let rel = Path::new("f");
        let mut out = Vec::new();
        let r = Exact {
            file,
            left: 12,
            size: 12,
            dir: tmp.path(),
            rel,
        }
        .read_to_end(&mut out);
        assert!(r.expect_err("short").to_string().contains("shrank"));
        let file = fs::File::open(&f).expect("open");
        let r = Exact {
            file,
            left: 8,
            size: 8,
            dir: tmp.path(),
            rel,
        }
        .read_to_end(&mut out);
        assert!(r.expect_err("long").to_string().contains("grew"));
    }
}
