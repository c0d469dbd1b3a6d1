//! The RAM of a restored VM, captured from its process instead of through a
//! migration.
//!
//! A restored VM's RAM is a private mapping of a sealed memfd copy of the
//! RAM file it was restored from (its *base*, see `qemu.rs`). A page the
//! guest has written since is an anonymous (copy-on-write) page of that
//! mapping; every other page still reads as the base's. So the VM's RAM is
//! the base overlaid with its written pages, which `/proc/<pid>/pagemap`
//! names (present and not file-backed, or swapped out) and
//! `/proc/<pid>/mem` reads:
//!
//! ```text
//!   new RAM file  =  base's data extents (copy_file_range, in the kernel)
//!                 +  written pages      (pagemap -> /proc/<pid>/mem; zero ones punched out)
//! ```
//!
//! Untouched memory costs one pagemap entry (8 bytes per 4 KiB page) and is
//! never read. A QEMU migration reads every page instead, and through the
//! private mapping every read of a hole of the memfd allocates a shmem
//! page in it (docs/ARCHITECTURE.md, "Sealed copies grow"): the first
//! capture of an idle 8 GiB clone took 21.6 s and left 7.8 GiB of zero pages.
//!
//! The VM must be paused: its vCPUs stopped, its devices quiesced (QEMU's
//! `stop` drains block I/O and holds network receives).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};

/// The page size of the guest RAM and of the host's page tables.
pub const PAGE: u64 = 4096;

/// Pages read from `/proc/<pid>/mem` at once, at most.
const RUN_PAGES: u64 = 256;

/// Pagemap entries read at once.
const PAGEMAP_CHUNK: u64 = 8192;

/// pagemap bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;

/// A mapping of (part of) the guest RAM file in the QEMU process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Virtual addresses `start..end` in the process.
    pub start: u64,
    pub end: u64,
    /// Offset in the RAM file of `start`.
    pub offset: u64,
}

/// What a capture read and wrote.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Bytes of the base's data extents copied.
    pub base_bytes: u64,
    /// Pages the guest wrote since its restore, with data.
    pub written_pages: u64,
    /// Pages the guest wrote that are zero now (holes in the new file).
    pub zero_pages: u64,
}

/// The identity of a file as `/proc/<pid>/maps` shows it: device
/// (major, minor) and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    pub major: u64,
    pub minor: u64,
    pub inode: u64,
}

impl FileIdentity {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        let dev = meta.dev();
        // glibc's gnu_dev_major / gnu_dev_minor.
        FileIdentity {
            major: ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
            minor: (dev & 0xff) | ((dev >> 12) & !0xff),
            inode: meta.ino(),
        }
    }
}

/// The mappings of file `file` in a `/proc/<pid>/maps` text.
pub fn parse_maps(maps: &str, file: FileIdentity) -> Vec<Mapping> {
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(offset), Some(dev), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let Some((major, minor)) = dev.split_once(':') else {
            continue;
        };
        let hex = |s: &str| u64::from_str_radix(s, 16).ok();
        let (Some(start), Some(end), Some(offset), Some(major), Some(minor), Ok(inode)) = (
            hex(start),
            hex(end),
            hex(offset),
            hex(major),
            hex(minor),
            inode.parse::<u64>(),
        ) else {
            continue;
        };
        if (FileIdentity {
            major,
            minor,
            inode,
        }) == file
            && end > start
        {
            out.push(Mapping { start, end, offset });
        }
    }
    out
}

/// Write into `out` (a new sparse file of `len` bytes, all holes) the RAM of
/// process `pid` whose RAM file, mapped privately at `maps`, was a copy of
/// `base` (see the module docs).
pub fn capture(pid: u32, maps: &[Mapping], base: &File, out: &File, len: u64) -> io::Result<Stats> {
    let covered: u64 = maps.iter().map(|m| m.end - m.start).sum();
    if maps.is_empty() || covered < len {
        return Err(io::Error::other(format!(
            "the RAM file is mapped for {covered} of its {len} bytes in process {pid}"
        )));
    }
    let mut stats = Stats {
        base_bytes: copy_data(base, out, len)?,
        ..Stats::default()
    };
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    for m in maps {
        overlay_written(&pagemap, &mem, out, m, len, &mut stats)?;
    }
    Ok(stats)
}

/// Copy the data extents of `from` (up to `len`) into `to` at the same
/// offsets, leaving its holes holes (in the kernel where it can: the
/// sealed copies of RAM files are made with it too). Bytes copied.
pub(crate) fn copy_data(from: &File, to: &File, len: u64) -> io::Result<u64> {
    let len = len.min(from.metadata()?.len());
    let mut copied = 0;
    let mut at = 0u64;
    while at < len {
        let Some(data) = seek(from, at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= len {
            break;
        }
        let hole = seek(from, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        copy_range(from, to, data, hole - data)?;
        copied += hole - data;
        at = hole;
    }
    Ok(copied)
}

/// `lseek(fd, at, whence)`; `None` when there is no more data (ENXIO).
fn seek(f: &File, at: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let at = libc::off_t::try_from(at).map_err(io::Error::other)?;
    // SAFETY: lseek on an fd we own; it reads and writes no memory of ours.
    let r = unsafe { libc::lseek(f.as_raw_fd(), at, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Copy `n` bytes at `at` of `from` to the same offset of `to`, in the kernel.
fn copy_range(from: &File, to: &File, at: u64, n: u64) -> io::Result<()> {
    let mut off_in = libc::loff_t::try_from(at).map_err(io::Error::other)?;
    let mut off_out = off_in;
    let mut left = n;
    while left > 0 {
        let chunk = left.min(1 << 30) as usize;
        // SAFETY: both fds are open files we own; the offsets are locals the
        // kernel updates; no buffer of ours is involved.
        let r = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut off_in,
                to.as_raw_fd(),
                &mut off_out,
                chunk,
                0,
            )
        };
        match r {
            r if r < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                ) {
                    // Not in the kernel between these two files: through a buffer.
                    return copy_range_buffered(from, to, off_in as u64, left);
                }
                return Err(e);
            }
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the base RAM file ended early",
                ))
            }
            r => left -= r as u64,
        }
    }
    Ok(())
}

/// [`copy_range`] through a buffer.
fn copy_range_buffered(from: &File, to: &File, mut at: u64, mut n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while n > 0 {
        let chunk = n.min(buf.len() as u64) as usize;
        from.read_exact_at(&mut buf[..chunk], at)?;
        to.write_all_at(&buf[..chunk], at)?;
        at += chunk as u64;
        n -= chunk as u64;
    }
    Ok(())
}

/// Punch out the pages of `file` that are allocated but all zero (a golden
/// VM's RAM file has such pages: its guest zeroed them through the shared
/// mapping). Its content does not change; restores' sealed copies and
/// captures that copy its data extents ([`capture`]) then skip them.
/// Bytes punched.
pub fn punch_zero_pages(file: &File) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let mut buf = vec![0u8; (RUN_PAGES * PAGE) as usize];
    let (mut punched, mut at) = (0u64, 0u64);
    while at < len {
        let Some(data) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        let mut off = data;
        while off < hole {
            let n = (hole - off).min(buf.len() as u64) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, off)?;
            // Runs of whole zero pages (a partial last page stays).
            let mut i = 0;
            let pages = n / PAGE as usize;
            while i < pages {
                if !is_zero(page_of(chunk, i)) {
                    i += 1;
                    continue;
                }
                let mut j = i + 1;
                while j < pages && is_zero(page_of(chunk, j)) {
                    j += 1;
                }
                punch(file, off + i as u64 * PAGE, (j - i) as u64 * PAGE)?;
                punched += (j - i) as u64 * PAGE;
                i = j;
            }
            off += n as u64;
        }
        at = hole;
    }
    Ok(punched)
}

/// Whether a pagemap entry is a page the process has written (its own
/// anonymous copy, resident or swapped out) rather than the file's.
fn written(entry: u64) -> bool {
    (entry & PM_PRESENT != 0 && entry & PM_FILE == 0) || entry & PM_SWAP != 0
}

/// Copy the written pages of mapping `m` from the process into `out`.
fn overlay_written(
    pagemap: &File,
    mem: &File,
    out: &File,
    m: &Mapping,
    len: u64,
    stats: &mut Stats,
) -> io::Result<()> {
    let pages = (m.end - m.start) / PAGE;
    let mut entries = vec![0u8; (PAGEMAP_CHUNK * 8) as usize];
    let mut run = Run::default();
    let mut buf = vec![0u8; (RUN_PAGES * PAGE) as usize];
    let mut first = 0;
    while first < pages {
        let n = (pages - first).min(PAGEMAP_CHUNK);
        let bytes = &mut entries[..(n * 8) as usize];
        pagemap.read_exact_at(bytes, (m.start / PAGE + first) * 8)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(e);
            let page = first + i as u64;
            let file_at = m.offset + page * PAGE;
            if !written(u64::from_ne_bytes(word)) || file_at + PAGE > len {
                run.flush(mem, out, m, &mut buf, stats)?;
                continue;
            }
            if !run.extends(page) {
                run.flush(mem, out, m, &mut buf, stats)?;
                run = Run {
                    first: page,
                    count: 0,
                };
            }
            run.count += 1;
            if run.count == RUN_PAGES {
                run.flush(mem, out, m, &mut buf, stats)?;
            }
        }
        first += n;
    }
    run.flush(mem, out, m, &mut buf, stats)
}

/// Consecutive written pages of one mapping, not yet copied.
#[derive(Default)]
struct Run {
    first: u64,
    count: u64,
}

impl Run {
    fn extends(&self, page: u64) -> bool {
        self.count > 0 && self.first + self.count == page
    }

    /// Read the run from the process and write it to `out`: data pages
    /// written, zero pages punched out (the base may have data there).
    fn flush(
        &mut self,
        mem: &File,
        out: &File,
        m: &Mapping,
        buf: &mut [u8],
        stats: &mut Stats,
    ) -> io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let bytes = &mut buf[..(self.count * PAGE) as usize];
        mem.read_exact_at(bytes, m.start + self.first * PAGE)?;
        let file_at = m.offset + self.first * PAGE;
        // Sub-runs of data pages and of zero pages.
        let mut i = 0;
        while i < self.count as usize {
            let zero = is_zero(page_of(bytes, i));
            let mut j = i + 1;
            while j < self.count as usize && is_zero(page_of(bytes, j)) == zero {
                j += 1;
            }
            let at = file_at + i as u64 * PAGE;
            let n = (j - i) as u64 * PAGE;
            if zero {
                punch(out, at, n)?;
                stats.zero_pages += (j - i) as u64;
            } else {
                out.write_all_at(&bytes[i * PAGE as usize..j * PAGE as usize], at)?;
                stats.written_pages += (j - i) as u64;
            }
            i = j;
        }
        self.count = 0;
        Ok(())
    }
}

fn page_of(bytes: &[u8], i: usize) -> &[u8] {
    &bytes[i * PAGE as usize..(i + 1) * PAGE as usize]
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

/// Make `n` bytes at `at` of `f` a hole (size kept).
fn punch(f: &File, at: u64, n: u64) -> io::Result<()> {
    let at = libc::off_t::try_from(at).map_err(io::Error::other)?;
    let n = libc::off_t::try_from(n).map_err(io::Error::other)?;
    // SAFETY: fallocate on an fd we own; no memory of ours is involved.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            at,
            n,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    #[test]
    fn maps_lines_of_the_file_are_found() {
        let id = FileIdentity {
            major: 0,
            minor: 1,
            inode: 4242,
        };
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:01 1234   /usr/bin/qemu-system-x86_64
7f1000000000-7f1040000000 rw-p 00000000 00:01 4242   /memfd:fastvm-ram (deleted)
7f1040000000-7f1080000000 rw-p 40000000 00:01 4242   /memfd:fastvm-ram (deleted)
7f1080000000-7f1080001000 rw-p 00000000 00:01 4243   /memfd:other (deleted)
7f1090000000-7f1090001000 rw-p 00000000 00:00 0 
garbage line
";
        assert_eq!(
            parse_maps(maps, id),
            vec![
                Mapping {
                    start: 0x7f10_0000_0000,
                    end: 0x7f10_4000_0000,
                    offset: 0
                },
                Mapping {
                    start: 0x7f10_4000_0000,
                    end: 0x7f10_8000_0000,
                    offset: 0x4000_0000
                },
            ]
        );
    }

    /// A memfd as a restored VM's RAM image: `pages` pages, data in some.
    fn memfd(pages: u64) -> File {
        let name = c"ram-capture-test";
        // SAFETY: memfd_create with a valid C string; the fd is new and ours.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create");
        // SAFETY: fd was just created and is owned by nothing else.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(pages * PAGE).expect("size");
        f
    }

    /// This process maps a base copy privately, writes some pages (data and
    /// zero), and the capture of its own pid gives the base + those pages.
    #[test]
    fn a_capture_is_the_base_overlaid_with_the_written_pages_and_reads_no_hole() {
        let pages = 64u64;
        let len = pages * PAGE;
        // Base on disk: data at pages 1, 2 and 40, holes elsewhere.
        let base_tmp = tempfile::NamedTempFile::new().expect("tmp");
        let base = base_tmp.as_file();
        base.set_len(len).expect("size");
        for (p, v) in [(1u64, 0x11u8), (2, 0x22), (40, 0x40)] {
            base.write_all_at(&[v; PAGE as usize], p * PAGE)
                .expect("write");
        }
        // Its sealed-copy stand-in, mapped privately like QEMU maps it.
        let copy = memfd(pages);
        for (p, v) in [(1u64, 0x11u8), (2, 0x22), (40, 0x40)] {
            copy.write_all_at(&[v; PAGE as usize], p * PAGE)
                .expect("write");
        }
        // SAFETY: a new private mapping of a file we own, `len` bytes; it is
        // only used through `ram` below and unmapped at the end.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                copy.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: the mapping is `len` bytes, readable and writable, and
        // nothing else refers to it.
        let ram = unsafe { std::slice::from_raw_parts_mut(addr.cast::<u8>(), len as usize) };
        let page = |p: u64| (p * PAGE) as usize..((p + 1) * PAGE) as usize;
        // Guest writes: new data on a hole (5), over base data (2), zeroes
        // over base data (40), a page read only (1) and one read on a hole (7).
        ram[page(5)].fill(0x55);
        ram[page(6)][100] = 0x66;
        ram[page(2)].fill(0x2f);
        ram[page(40)].fill(0);
        assert_eq!(ram[page(1)][0], 0x11);
        assert_eq!(ram[page(7)][0], 0);
        let allocated_before = copy.metadata().expect("stat").blocks();

        let id = FileIdentity::of(&copy.metadata().expect("stat"));
        let maps = parse_maps(
            &std::fs::read_to_string("/proc/self/maps").expect("maps"),
            id,
        );
        assert_eq!(maps.len(), 1, "{maps:?}");
        let out_tmp = tempfile::NamedTempFile::new().expect("tmp");
        let out = out_tmp.as_file();
        out.set_len(len).expect("size");
        let stats = capture(std::process::id(), &maps, base, out, len).expect("capture");
        // The holes of the copy were not read (no page added to it).
        assert_eq!(copy.metadata().expect("stat").blocks(), allocated_before);

        let got = std::fs::read(out_tmp.path()).expect("read");
        assert_eq!(got.len(), len as usize);
        for p in 0..pages {
            assert_eq!(got[page(p)], ram[page(p)], "page {p}");
        }
        assert_eq!(
            stats,
            Stats {
                base_bytes: 3 * PAGE,
                written_pages: 3,
                zero_pages: 1,
            }
        );
        // The zero page of the capture is a hole again.
        let data_at_40 = seek(out, 40 * PAGE, libc::SEEK_DATA).expect("seek");
        assert_ne!(data_at_40, Some(40 * PAGE));
        // SAFETY: the mapping made above, not used after this.
        unsafe { libc::munmap(addr, len as usize) };
    }

    #[test]
    fn zero_pages_are_punched_out_and_the_content_stays() {
        let tmp = tempfile::NamedTempFile::new().expect("tmp");
        let f = tmp.as_file();
        let len = 600 * PAGE;
        f.set_len(len).expect("size");
        // Allocated: pages 0..300 (zero but 7 and 299), 400..410 (zero).
        f.write_all_at(&vec![0u8; (300 * PAGE) as usize], 0)
            .expect("write");
        f.write_all_at(&[7u8; 10], 7 * PAGE + 100).expect("write");
        f.write_all_at(&[9u8; 1], 299 * PAGE).expect("write");
        f.write_all_at(&vec![0u8; (10 * PAGE) as usize], 400 * PAGE)
            .expect("write");
        let before = std::fs::read(tmp.path()).expect("read");
        let punched = punch_zero_pages(f).expect("punch");
        assert_eq!(punched, (300 - 2 + 10) * PAGE);
        assert_eq!(std::fs::read(tmp.path()).expect("read"), before);
        assert_eq!(f.metadata().expect("stat").blocks() * 512, 2 * PAGE);
        assert_eq!(punch_zero_pages(f).expect("again"), 0);
    }

    #[test]
    fn a_capture_refuses_a_ram_file_not_wholly_mapped() {
        let base = tempfile::tempfile().expect("tmp");
        let out = tempfile::tempfile().expect("tmp");
        let maps = [Mapping {
            start: 0x1000,
            end: 0x3000,
            offset: 0,
        }];
        let e = capture(std::process::id(), &maps, &base, &out, 4 * PAGE).expect_err("short");
        assert!(
            e.to_string().contains("mapped for 8192 of its 16384"),
            "{e}"
        );
        assert!(capture(std::process::id(), &[], &base, &out, 0).is_err());
    }
}
