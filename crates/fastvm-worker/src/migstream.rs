//! Splitting a QEMU migration stream into a RAM file and the rest.
//!
//! A capture of a running VM makes QEMU write its whole state (every RAM
//! page, then the device state) as one migration stream. Loading such a
//! stream copies every page into the new VM before it runs: launching from
//! a user snapshot cost ~270 ms against ~105 ms from a golden snapshot,
//! whose RAM is a file restores map copy-on-write. [`split`] turns a user
//! snapshot into the golden shape while the stream is written: the pages
//! of the guest RAM block (`ram`, the memory backend every VM has) go into
//! a sparse file at their offsets, and everything else (the pages of the
//! small ROM blocks, the device state) into a stream without them. A
//! restore maps the file privately (see [`crate::jail::sealed_copy`]) and
//! loads only the small stream; the RAM block then keeps the file's content,
//! which is what the full stream would have written into it.
//!
//! The format (QEMU 7.2, `migration/savevm.c` and `migration/ram.c`):
//!
//! ```text
//! magic "QEVM" | version 3
//! CONFIGURATION 0x07: machine name (be32 len + bytes), subsections
//!     (0x05 | name | be32 version | fields: target-page-bits u32,
//!      capabilities: be32 n + n * (u8 len + name), uuid 16 bytes)
//! START 0x01 | FULL 0x04: be32 section id | u8 len + idstr | be32 instance | be32 version
//! PART 0x02 | END 0x03:  be32 section id
//!     ram section data: records until EOS, each a be64 (offset | flags):
//!       MEM_SIZE 0x04: blocks (u8 len + idstr, be64 length [, be64 addr with x-ignore-shared])
//!       ZERO 0x02 (+ fill byte) | PAGE 0x08 (+ 4096 bytes), with CONTINUE 0x20
//!         (same block as the previous page) or u8 len + block idstr
//!       EOS 0x10
//!     then an optional footer 0x7e | be32 section id
//! first FULL section of another device: device state to the end (copied as is)
//! EOF 0x00 (and the JSON description after it)
//! ```
//!
//! Only the records QEMU writes for our captures are understood (no
//! compression, no XBZRLE, no multifd, no postcopy); anything else is
//! [`SplitError::Unsupported`] and the caller falls back to keeping the
//! whole stream. Pages of the RAM block are written in runs of up to
//! [`RUN_BYTES`]; zero pages leave holes.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;

const MAGIC: u32 = 0x5145_564d;
const VERSION: u32 = 3;

const SECTION_EOF: u8 = 0x00;
const SECTION_START: u8 = 0x01;
const SECTION_PART: u8 = 0x02;
const SECTION_END: u8 = 0x03;
const SECTION_FULL: u8 = 0x04;
const SUBSECTION: u8 = 0x05;
const CONFIGURATION: u8 = 0x07;
const FOOTER: u8 = 0x7e;

const FLAG_ZERO: u64 = 0x02;
const FLAG_MEM_SIZE: u64 = 0x04;
const FLAG_PAGE: u64 = 0x08;
const FLAG_EOS: u64 = 0x10;
const FLAG_CONTINUE: u64 = 0x20;
/// Every flag QEMU 7.2/8.x may set (XBZRLE, HOOK, COMPRESS_PAGE, MULTIFD_FLUSH
/// among them); the ones not above are unsupported.
const FLAG_MASK: u64 = 0xfff;

/// Target page size of x86_64 guests.
pub const PAGE: usize = 4096;
/// Largest run of consecutive RAM pages written at once.
pub const RUN_BYTES: usize = 1 << 20;

/// How [`SplitError::Unsupported`]'s message starts.
pub const NOT_SPLITTABLE: &str = "migration stream not splittable";

/// The name of the RAM block every VM's guest memory is (`-object
/// memory-backend-*,id=ram`).
pub const RAM_BLOCK: &str = "ram";

#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The stream has something this splitter does not understand; the
    /// capture must keep the whole stream instead.
    #[error("migration stream not splittable: {0}")] // starts with NOT_SPLITTABLE
    Unsupported(String),
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
}

/// What a split wrote.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SplitStats {
    /// Pages of the RAM block written to the RAM file.
    pub ram_pages: u64,
    /// Zero pages of the RAM block (holes in the file).
    pub zero_pages: u64,
    /// Pages of other blocks (ROMs) kept in the stream.
    pub other_pages: u64,
    /// Bytes of the stream without the RAM block's pages.
    pub stream_bytes: u64,
}

/// Read the migration stream `input`; write the pages of block
/// [`RAM_BLOCK`] into `ram` (a file of `ram_len` bytes, all zero: holes)
/// and everything else, re-encoded where pages were left out, into `out`.
pub fn split(
    input: impl Read,
    out: impl Write,
    ram: &File,
    ram_len: u64,
) -> Result<SplitStats, SplitError> {
    let mut s = Splitter::new(
        BufReader::with_capacity(1 << 20, input),
        BufWriter::with_capacity(1 << 20, out),
        Some(ram),
        ram_len,
    );
    s.run()?;
    s.flush_run()?;
    s.w.inner.flush()?;
    s.stats.stream_bytes = s.w.bytes;
    Ok(s.stats)
}

/// The part of a split stream (or of a golden VM's, whose RAM is not in
/// it) before the device state: header, configuration and the RAM
/// sections, which carry the block list and the pages of the ROM blocks
/// but none of block [`RAM_BLOCK`] (of `ram_len` bytes). A stream with a
/// page of that block is [`SplitError::Unsupported`].
///
/// A capture that takes the RAM from the process ([`crate::ram_capture`])
/// writes this part of the VM's restore stream, then the device state
/// QEMU saves alone ([`join_device_state`]): the ROM blocks are as the
/// restore loaded them (a booted guest does not write its firmware).
pub fn state_prefix(input: impl Read, ram_len: u64) -> Result<Vec<u8>, SplitError> {
    let mut out = Vec::new();
    let mut s = Splitter::new(
        BufReader::with_capacity(1 << 16, input),
        &mut out,
        None,
        ram_len,
    );
    s.stop_at_devices = true;
    s.run()?;
    if !s.saw_ram_block {
        return unsupported("no RAM section before the device state");
    }
    Ok(out)
}

/// A whole stream: `prefix` ([`state_prefix`]) followed by the device
/// sections of `devices`, a stream as QMP `xen-save-devices-state` writes
/// one (magic, version, FULL sections, EOF: no configuration, no RAM).
pub fn join_device_state(mut prefix: Vec<u8>, devices: &[u8]) -> Result<Vec<u8>, SplitError> {
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&MAGIC.to_be_bytes());
    head[4..].copy_from_slice(&VERSION.to_be_bytes());
    if devices.len() < 10 || devices[..8] != head {
        return unsupported("device state without a QEVM header");
    }
    let body = &devices[8..];
    if body.first() != Some(&SECTION_FULL) {
        return unsupported(format!(
            "device state starts with section type {:#x}",
            body[0]
        ));
    }
    if body.last() != Some(&SECTION_EOF) {
        return unsupported("device state does not end with EOF");
    }
    prefix.extend_from_slice(body);
    Ok(prefix)
}

struct Counting<W: Write> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.bytes += b.len() as u64;
        self.inner.write_all(b)
    }
}

struct Splitter<'a, R: Read, W: Write> {
    r: BufReader<R>,
    w: Counting<W>,
    /// Where pages of the RAM block go; `None`: such a page is an error.
    ram: Option<&'a File>,
    ram_len: u64,
    /// Pending consecutive RAM pages, to be written at `run_at`.
    run: Vec<u8>,
    run_at: u64,
    /// One bit per RAM page written with data (a later zero page must clear it).
    written: Vec<u64>,
    stats: SplitStats,
    /// `x-ignore-shared` is on (the MEM_SIZE records carry each block's address).
    ignore_shared: bool,
    /// MEM_SIZE named the RAM block.
    saw_ram_block: bool,
    /// The block of the last page read / written (CONTINUE refers to it).
    last_in: Option<String>,
    last_out: Option<String>,
    ram_section: Option<u32>,
    /// Stop before the first device section ([`state_prefix`]).
    stop_at_devices: bool,
}

fn unsupported<T>(what: impl Into<String>) -> Result<T, SplitError> {
    Err(SplitError::Unsupported(what.into()))
}

impl<'a, R: Read, W: Write> Splitter<'a, R, W> {
    /// A splitter writing the RAM block's pages into `ram` (none: such a
    /// page is an error), the rest into `out`.
    fn new(r: BufReader<R>, out: W, ram: Option<&'a File>, ram_len: u64) -> Self {
        let pages = if ram.is_some() {
            ram_len as usize / PAGE
        } else {
            0
        };
        Splitter {
            r,
            w: Counting {
                inner: out,
                bytes: 0,
            },
            ram,
            ram_len,
            run: Vec::with_capacity(if ram.is_some() { RUN_BYTES } else { 0 }),
            run_at: 0,
            written: vec![0u64; pages.div_ceil(64)],
            stats: SplitStats::default(),
            ignore_shared: false,
            saw_ram_block: false,
            last_in: None,
            last_out: None,
            ram_section: None,
            stop_at_devices: false,
        }
    }

    fn read_exact<const N: usize>(&mut self) -> Result<[u8; N], SplitError> {
        let mut b = [0u8; N];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
    fn u8(&mut self) -> Result<u8, SplitError> {
        Ok(self.read_exact::<1>()?[0])
    }
    fn be32(&mut self) -> Result<u32, SplitError> {
        Ok(u32::from_be_bytes(self.read_exact::<4>()?))
    }
    fn be64(&mut self) -> Result<u64, SplitError> {
        Ok(u64::from_be_bytes(self.read_exact::<8>()?))
    }
    fn bytes(&mut self, n: usize) -> Result<Vec<u8>, SplitError> {
        let mut b = vec![0u8; n];
        self.r.read_exact(&mut b)?;
        Ok(b)
    }
    /// A u8-length-prefixed name.
    fn name(&mut self) -> Result<String, SplitError> {
        let len = self.u8()? as usize;
        let b = self.bytes(len)?;
        String::from_utf8(b).or_else(|_| unsupported("a name that is not UTF-8"))
    }
    fn peek(&mut self) -> Result<Option<u8>, SplitError> {
        Ok(self.r.fill_buf()?.first().copied())
    }
    fn put_name(&mut self, name: &str) -> Result<(), SplitError> {
        self.w.put(&[name.len() as u8])?;
        self.w.put(name.as_bytes())?;
        Ok(())
    }

    fn run(&mut self) -> Result<(), SplitError> {
        let (magic, version) = (self.be32()?, self.be32()?);
        if magic != MAGIC || version != VERSION {
            return unsupported(format!("header {magic:#x} version {version}"));
        }
        self.w.put(&magic.to_be_bytes())?;
        self.w.put(&version.to_be_bytes())?;
        loop {
            let kind = self.u8()?;
            match kind {
                CONFIGURATION => self.configuration()?,
                SECTION_START | SECTION_FULL => {
                    let id = self.be32()?;
                    let idstr = self.name()?;
                    let (instance, version) = (self.be32()?, self.be32()?);
                    let ram_start = idstr == "ram" && kind == SECTION_START;
                    if kind == SECTION_FULL && !ram_start && self.stop_at_devices {
                        return Ok(());
                    }
                    self.w.put(&[kind])?;
                    self.w.put(&id.to_be_bytes())?;
                    self.put_name(&idstr)?;
                    self.w.put(&instance.to_be_bytes())?;
                    self.w.put(&version.to_be_bytes())?;
                    if ram_start {
                        self.ram_section = Some(id);
                        self.ram_data()?;
                        self.footer()?;
                    } else if kind == SECTION_FULL {
                        // Device state from here on: copied as it is.
                        return self.copy_rest();
                    } else {
                        return unsupported(format!("iterable section {idstr:?}"));
                    }
                }
                SECTION_PART | SECTION_END => {
                    let id = self.be32()?;
                    if Some(id) != self.ram_section {
                        return unsupported(format!("section {id} is not the RAM section"));
                    }
                    self.w.put(&[kind])?;
                    self.w.put(&id.to_be_bytes())?;
                    self.ram_data()?;
                    self.footer()?;
                }
                SECTION_EOF if self.stop_at_devices => return Ok(()),
                SECTION_EOF => {
                    self.w.put(&[kind])?;
                    return self.copy_rest();
                }
                other => return unsupported(format!("section type {other:#x}")),
            }
        }
    }

    fn configuration(&mut self) -> Result<(), SplitError> {
        let len = self.be32()?;
        if len > 255 {
            return unsupported("machine name longer than 255 bytes");
        }
        let machine = self.bytes(len as usize)?;
        self.w.put(&[CONFIGURATION])?;
        self.w.put(&len.to_be_bytes())?;
        self.w.put(&machine)?;
        while self.peek()? == Some(SUBSECTION) {
            self.u8()?;
            let name = self.name()?;
            let version = self.be32()?;
            self.w.put(&[SUBSECTION])?;
            self.put_name(&name)?;
            self.w.put(&version.to_be_bytes())?;
            match name.as_str() {
                "configuration/target-page-bits" => {
                    let bits = self.be32()?;
                    if bits != 12 {
                        return unsupported(format!("target page bits {bits}"));
                    }
                    self.w.put(&bits.to_be_bytes())?;
                }
                "configuration/capabilities" => {
                    let n = self.be32()?;
                    self.w.put(&n.to_be_bytes())?;
                    for _ in 0..n {
                        let cap = self.name()?;
                        self.ignore_shared |= cap == "x-ignore-shared";
                        self.put_name(&cap)?;
                    }
                }
                "configuration/uuid" => {
                    let uuid = self.read_exact::<16>()?;
                    self.w.put(&uuid)?;
                }
                other => return unsupported(format!("configuration subsection {other:?}")),
            }
        }
        Ok(())
    }

    fn footer(&mut self) -> Result<(), SplitError> {
        if self.peek()? == Some(FOOTER) {
            self.u8()?;
            let id = self.be32()?;
            self.w.put(&[FOOTER])?;
            self.w.put(&id.to_be_bytes())?;
        }
        Ok(())
    }

    fn copy_rest(&mut self) -> Result<(), SplitError> {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = self.r.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            self.w.put(&buf[..n])?;
        }
    }

    /// The records of one RAM section, up to and including EOS.
    fn ram_data(&mut self) -> Result<(), SplitError> {
        loop {
            let v = self.be64()?;
            let (addr, flags) = (v & !FLAG_MASK, v & FLAG_MASK);
            if flags == FLAG_EOS {
                self.w.put(&v.to_be_bytes())?;
                return Ok(());
            }
            if flags == FLAG_MEM_SIZE {
                self.w.put(&v.to_be_bytes())?;
                self.mem_size(addr)?;
                continue;
            }
            let kind = flags & !FLAG_CONTINUE;
            if kind != FLAG_ZERO && kind != FLAG_PAGE {
                return unsupported(format!("RAM record flags {flags:#x}"));
            }
            let block = if flags & FLAG_CONTINUE != 0 {
                match &self.last_in {
                    Some(b) => b.clone(),
                    None => return unsupported("CONTINUE before any block"),
                }
            } else {
                let b = self.name()?;
                self.last_in = Some(b.clone());
                b
            };
            let data = if kind == FLAG_PAGE {
                Page::Data(self.bytes(PAGE)?)
            } else {
                Page::Fill(self.u8()?)
            };
            if block == RAM_BLOCK {
                if self.ram.is_none() {
                    return unsupported("the stream carries pages of the RAM block");
                }
                self.ram_page(addr, data)?;
            } else {
                self.stats.other_pages += 1;
                let cont = self.last_out.as_deref() == Some(block.as_str());
                let head = addr | kind | if cont { FLAG_CONTINUE } else { 0 };
                self.w.put(&head.to_be_bytes())?;
                if !cont {
                    self.put_name(&block)?;
                    self.last_out = Some(block);
                }
                match data {
                    Page::Data(d) => self.w.put(&d)?,
                    Page::Fill(f) => self.w.put(&[f])?,
                }
            }
        }
    }

    fn mem_size(&mut self, total: u64) -> Result<(), SplitError> {
        let mut left = total;
        while left > 0 {
            let name = self.name()?;
            let len = self.be64()?;
            self.put_name(&name)?;
            self.w.put(&len.to_be_bytes())?;
            if self.ignore_shared {
                let addr = self.be64()?;
                self.w.put(&addr.to_be_bytes())?;
            }
            if name == RAM_BLOCK && len != self.ram_len {
                return unsupported(format!(
                    "RAM block is {len} bytes, the RAM file {}",
                    self.ram_len
                ));
            }
            left = left
                .checked_sub(len)
                .map_or_else(|| unsupported("block sizes exceed the total"), Ok)?;
            self.saw_ram_block |= name == RAM_BLOCK;
        }
        if !self.saw_ram_block {
            return unsupported("no RAM block named \"ram\"");
        }
        Ok(())
    }

    fn ram_page(&mut self, addr: u64, page: Page) -> Result<(), SplitError> {
        if addr + PAGE as u64 > self.ram_len {
            return unsupported(format!("RAM page at {addr:#x} beyond the block"));
        }
        let n = (addr / PAGE as u64) as usize;
        let (word, bit) = (n / 64, 1u64 << (n % 64));
        match page {
            Page::Fill(0) => {
                self.stats.zero_pages += 1;
                // Only a page written before (a resend) needs zeroes.
                if self.written[word] & bit != 0 {
                    self.written[word] &= !bit;
                    self.push_page(addr, &[0u8; PAGE])?;
                }
            }
            Page::Fill(f) => {
                self.stats.ram_pages += 1;
                self.written[word] |= bit;
                self.push_page(addr, &[f; PAGE])?;
            }
            Page::Data(d) => {
                self.stats.ram_pages += 1;
                self.written[word] |= bit;
                self.push_page(addr, &d)?;
            }
        }
        Ok(())
    }

    fn push_page(&mut self, addr: u64, data: &[u8]) -> Result<(), SplitError> {
        let contiguous = self.run_at + self.run.len() as u64 == addr;
        if !contiguous || self.run.len() + data.len() > RUN_BYTES {
            self.flush_run()?;
            self.run_at = addr;
        }
        self.run.extend_from_slice(data);
        Ok(())
    }

    fn flush_run(&mut self) -> Result<(), SplitError> {
        if let (false, Some(ram)) = (self.run.is_empty(), self.ram) {
            ram.write_all_at(&self.run, self.run_at)?;
            self.run.clear();
        }
        Ok(())
    }
}

enum Page {
    Data(Vec<u8>),
    Fill(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream as QEMU 7.2 writes one (with x-ignore-shared): config, a
    /// RAM section with pages of `ram` and of a ROM, an END section, one
    /// device section, EOF and a description.
    fn stream() -> Vec<u8> {
        let mut s = Vec::new();
        let name = |s: &mut Vec<u8>, n: &str| {
            s.push(n.len() as u8);
            s.extend_from_slice(n.as_bytes());
        };
        s.extend_from_slice(&MAGIC.to_be_bytes());
        s.extend_from_slice(&VERSION.to_be_bytes());
        s.push(CONFIGURATION);
        s.extend_from_slice(&7u32.to_be_bytes());
        s.extend_from_slice(b"microvm");
        s.push(SUBSECTION);
        name(&mut s, "configuration/capabilities");
        s.extend_from_slice(&1u32.to_be_bytes());
        s.extend_from_slice(&1u32.to_be_bytes());
        name(&mut s, "x-ignore-shared");
        // START ram
        s.push(SECTION_START);
        s.extend_from_slice(&2u32.to_be_bytes());
        name(&mut s, "ram");
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&4u32.to_be_bytes());
        let (ram_len, rom_len) = (16 * PAGE as u64, 2 * PAGE as u64);
        s.extend_from_slice(&((ram_len + rom_len) | FLAG_MEM_SIZE).to_be_bytes());
        name(&mut s, "ram");
        s.extend_from_slice(&ram_len.to_be_bytes());
        s.extend_from_slice(&0u64.to_be_bytes());
        name(&mut s, "rom");
        s.extend_from_slice(&rom_len.to_be_bytes());
        s.extend_from_slice(&0xfeff_c000u64.to_be_bytes());
        s.extend_from_slice(&FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend_from_slice(&2u32.to_be_bytes());
        // PART: ram page 0 (data), page 1 (zero, CONTINUE), rom page 0, ram page 3
        s.push(SECTION_PART);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(&FLAG_PAGE.to_be_bytes());
        name(&mut s, "ram");
        s.extend_from_slice(&[0xaa; PAGE]);
        s.extend_from_slice(&((PAGE as u64) | FLAG_ZERO | FLAG_CONTINUE).to_be_bytes());
        s.push(0);
        s.extend_from_slice(&FLAG_PAGE.to_be_bytes());
        name(&mut s, "rom");
        s.extend_from_slice(&[0x55; PAGE]);
        s.extend_from_slice(&((3 * PAGE as u64) | FLAG_PAGE).to_be_bytes());
        name(&mut s, "ram");
        s.extend_from_slice(&[0xbb; PAGE]);
        s.extend_from_slice(&FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend_from_slice(&2u32.to_be_bytes());
        // END: ram page 4 (CONTINUE from ram), rom page 1 (needs its name again)
        s.push(SECTION_END);
        s.extend_from_slice(&2u32.to_be_bytes());
        s.extend_from_slice(&((4 * PAGE as u64) | FLAG_PAGE | FLAG_CONTINUE).to_be_bytes());
        s.extend_from_slice(&[0xcc; PAGE]);
        s.extend_from_slice(&((PAGE as u64) | FLAG_ZERO).to_be_bytes());
        name(&mut s, "rom");
        s.push(0);
        s.extend_from_slice(&FLAG_EOS.to_be_bytes());
        s.push(FOOTER);
        s.extend_from_slice(&2u32.to_be_bytes());
        // A device and the end.
        s.push(SECTION_FULL);
        s.extend_from_slice(&3u32.to_be_bytes());
        name(&mut s, "cpu");
        s.extend_from_slice(&0u32.to_be_bytes());
        s.extend_from_slice(&12u32.to_be_bytes());
        s.extend_from_slice(b"\x01\x02\x03 device bytes \x7e\x00");
        s.push(SECTION_EOF);
        s.extend_from_slice(b"\x06{json}");
        s
    }

    fn ram_file(len: u64) -> (tempfile::NamedTempFile, File) {
        let f = tempfile::NamedTempFile::new().expect("test");
        f.as_file().set_len(len).expect("test");
        let file = f.reopen().expect("test");
        (f, file)
    }

    #[test]
    fn ram_pages_go_to_the_file_and_the_rest_stays_in_order() {
        let input = stream();
        let (tmp, file) = ram_file(16 * PAGE as u64);
        let mut out = Vec::new();
        let stats = split(&input[..], &mut out, &file, 16 * PAGE as u64).expect("test");
        assert_eq!(
            stats,
            SplitStats {
                ram_pages: 3,
                zero_pages: 1,
                other_pages: 2,
                stream_bytes: out.len() as u64
            }
        );
        let ram = std::fs::read(tmp.path()).expect("test");
        assert_eq!(ram.len(), 16 * PAGE);
        assert!(ram[..PAGE].iter().all(|b| *b == 0xaa));
        assert!(ram[PAGE..3 * PAGE].iter().all(|b| *b == 0));
        assert!(ram[3 * PAGE..4 * PAGE].iter().all(|b| *b == 0xbb));
        assert!(ram[4 * PAGE..5 * PAGE].iter().all(|b| *b == 0xcc));
        assert!(ram[5 * PAGE..].iter().all(|b| *b == 0));
        // The output parses again: no RAM pages left, ROM pages intact, the
        // ROM page after a left-out RAM page names its block (no CONTINUE).
        let (_tmp2, file2) = ram_file(16 * PAGE as u64);
        let mut again = Vec::new();
        let stats2 = split(&out[..], &mut again, &file2, 16 * PAGE as u64).expect("test");
        assert_eq!(stats2.ram_pages + stats2.zero_pages, 0);
        assert_eq!(stats2.other_pages, 2);
        assert_eq!(again, out);
        assert!(out.ends_with(b"\x01\x02\x03 device bytes \x7e\x00\x00\x06{json}"));
        assert!(out.windows(PAGE).any(|w| w.iter().all(|b| *b == 0x55)));
        assert!(!out.windows(64).any(|w| w.iter().all(|b| *b == 0xaa)));
    }

    #[test]
    fn a_prefix_ends_before_the_device_state_and_takes_a_saved_device_state() {
        let (_tmp, file) = ram_file(16 * PAGE as u64);
        let mut split_out = Vec::new();
        split(&stream()[..], &mut split_out, &file, 16 * PAGE as u64).expect("test");
        let prefix = state_prefix(&split_out[..], 16 * PAGE as u64).expect("prefix");
        // Everything up to the first device section, nothing of it.
        let device_at = split_out
            .windows(4)
            .position(|w| w == b"\x03cpu")
            .expect("device section")
            - 5;
        assert_eq!(prefix, split_out[..device_at]);
        assert!(prefix.windows(PAGE).any(|w| w.iter().all(|b| *b == 0x55)));
        // A stream that still carries RAM pages has no such prefix.
        let e = state_prefix(&stream()[..], 16 * PAGE as u64).expect_err("RAM pages");
        assert!(matches!(e, SplitError::Unsupported(_)), "{e}");
        // A RAM block of another size neither.
        assert!(state_prefix(&split_out[..], 8 * PAGE as u64).is_err());

        let mut devices = Vec::new();
        devices.extend_from_slice(&MAGIC.to_be_bytes());
        devices.extend_from_slice(&VERSION.to_be_bytes());
        devices.push(SECTION_FULL);
        devices.extend_from_slice(
            b"\x00\x00\x00\x09\x03cpu\x00\x00\x00\x00\x00\x00\x00\x0c saved \x7e",
        );
        devices.push(SECTION_EOF);
        let whole = join_device_state(prefix.clone(), &devices).expect("join");
        assert_eq!(whole[..prefix.len()], prefix[..]);
        assert_eq!(whole[prefix.len()..], devices[8..]);
        // The joined stream is one the splitter reads to its end.
        let (_tmp2, file2) = ram_file(16 * PAGE as u64);
        let mut again = Vec::new();
        let stats = split(&whole[..], &mut again, &file2, 16 * PAGE as u64).expect("reads");
        assert_eq!((stats.ram_pages, stats.other_pages), (0, 2));
        assert_eq!(again, whole);

        for bad in [
            &devices[..6],
            &devices[4..],
            &[&devices[..8], &[SECTION_START][..], &devices[9..]].concat()[..],
            &devices[..devices.len() - 1],
        ] {
            let e = join_device_state(prefix.clone(), bad).expect_err("bad device state");
            assert!(matches!(e, SplitError::Unsupported(_)), "{e}");
        }
    }

    #[test]
    fn unknown_records_and_truncation_are_errors() {
        let (_t, file) = ram_file(16 * PAGE as u64);
        let input = stream();
        // Truncated anywhere before the device state: an I/O error.
        for cut in [3, 9, 40, 200, 4200] {
            let e = split(&input[..cut], std::io::sink(), &file, 16 * PAGE as u64);
            assert!(matches!(e, Err(SplitError::Io(_))), "cut {cut}: {e:?}");
        }
        // A RAM block of another size than the file.
        let e = split(&input[..], std::io::sink(), &file, 8 * PAGE as u64);
        assert!(matches!(e, Err(SplitError::Unsupported(_))), "{e:?}");
        // XBZRLE (0x40) where a page record was.
        let mut bad = input.clone();
        let at = bad
            .windows(8)
            .position(|w| w == FLAG_PAGE.to_be_bytes())
            .expect("test");
        bad[at + 7] = 0x40;
        let e = split(&bad[..], std::io::sink(), &file, 16 * PAGE as u64);
        assert!(matches!(e, Err(SplitError::Unsupported(_))), "{e:?}");
        // Not a migration stream.
        let e = split(&b"garbage!"[..], std::io::sink(), &file, 16 * PAGE as u64);
        assert!(matches!(e, Err(SplitError::Unsupported(_))), "{e:?}");
    }
}
