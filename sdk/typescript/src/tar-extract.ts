/**
 * Safe, streaming extraction of the tar archive of a directory download, with Node
 * built-ins only.
 *
 * `safeExtract` is a streaming reader of what the VM's GNU tar writes
 * (ustar, GNU long names `L`/`K`, pax `x`/`g`, base-256 numbers) that checks every
 * member before it touches the disk, because the archive comes from a machine we do
 * not trust. A member is refused with `UnsafeArchiveError` (extraction stops) when:
 *
 * - its name is absolute (`/etc/passwd`, `C:\x`) or has a `..` component;
 * - its parent directory resolves outside the destination (through a symlink
 *   extracted earlier);
 * - it is a symlink whose target is absolute or resolves outside the destination;
 * - it is a hard link whose target name is absolute, has `..`, resolves outside, or
 *   is not a regular file already extracted;
 * - it is a character or block device or a FIFO.
 *
 * Accepted members are written without following an existing entry of the same name
 * (it is removed first, files are created with O_EXCL); setuid / setgid / sticky and
 * group/other write bits are dropped.
 */

import type { BigIntStats, Stats } from "node:fs";
import { constants as fsc } from "node:fs";
import * as fs from "node:fs/promises";
import * as path from "node:path";

import { FileTransferError, UnsafeArchiveError } from "./errors.js";

const BLOCK = 512;
/** Bound on a pax or GNU long-name member's data (kept in memory). */
const MAX_META_BYTES = 1024 * 1024;

function padded(n: number): number {
  return Math.ceil(n / BLOCK) * BLOCK;
}

/** Sequential reader of exact byte counts over a stream of chunks. */
class ByteReader {
  private buf: Buffer = Buffer.alloc(0);
  private done = false;
  private readonly it: AsyncIterator<Uint8Array>;

  constructor(chunks: AsyncIterable<Uint8Array>) {
    this.it = chunks[Symbol.asyncIterator]();
  }

  private async fill(): Promise<boolean> {
    if (this.done) return false;
    const next = await this.it.next();
    if (next.done) {
      this.done = true;
      return false;
    }
    const chunk = Buffer.from(next.value.buffer, next.value.byteOffset, next.value.byteLength);
    this.buf = this.buf.length ? Buffer.concat([this.buf, chunk]) : chunk;
    return true;
  }

  /** Exactly `n` bytes, or fewer only at the end of the stream. */
  async read(n: number): Promise<Buffer> {
    while (this.buf.length < n && (await this.fill()));
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(out.length);
    return out;
  }

  /** The next `n` bytes in pieces; throws when the stream ends first. */
  async *pieces(n: number): AsyncGenerator<Buffer> {
    let left = n;
    while (left > 0) {
      if (this.buf.length === 0 && !(await this.fill())) throw truncated();
      const piece = this.buf.subarray(0, Math.min(left, this.buf.length));
      this.buf = this.buf.subarray(piece.length);
      left -= piece.length;
      yield piece;
    }
  }

  async skip(n: number): Promise<void> {
    for await (const _ of this.pieces(n)) {
      // discard
    }
  }

  async close(): Promise<void> {
    await this.it.return?.();
  }
}

function truncated(): FileTransferError {
  return new FileTransferError("download: the directory archive ended in the middle of a member");
}

function cstr(b: Buffer): string {
  const nul = b.indexOf(0);
  return (nul === -1 ? b : b.subarray(0, nul)).toString("utf8");
}

/** A numeric header field: octal text, or GNU base-256 when the high bit is set. */
export function parseNumber(field: Buffer): number {
  if (field.length > 0 && (field[0]! & 0x80) !== 0) {
    if ((field[0]! & 0x40) !== 0) throw new FileTransferError("download: negative number in a tar header");
    let value = BigInt(field[0]! & 0x3f);
    for (let i = 1; i < field.length; i++) value = (value << 8n) | BigInt(field[i]!);
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw new FileTransferError("download: number too large in a tar header");
    return Number(value);
  }
  const text = cstr(field).trim();
  if (text === "") return 0;
  if (!/^[0-7]+$/.test(text)) throw new FileTransferError(`download: bad number ${JSON.stringify(text)} in a tar header`);
  return parseInt(text, 8);
}

function checksumOk(h: Buffer): boolean {
  const stored = parseNumber(h.subarray(148, 156));
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const byte = i >= 148 && i < 156 ? 0x20 : h[i]!;
    unsigned += byte;
    signed += byte > 127 ? byte - 256 : byte;
  }
  return stored === unsigned || stored === signed;
}

/** Parse pax records (`"<len> key=value\n"`). */
export function parsePax(data: Buffer): Map<string, string> {
  const out = new Map<string, string>();
  let pos = 0;
  while (pos < data.length) {
    const space = data.indexOf(0x20, pos);
    if (space === -1) break;
    const len = parseInt(data.subarray(pos, space).toString("ascii"), 10);
    if (!Number.isFinite(len) || len <= 0 || pos + len > data.length) {
      throw new FileTransferError("download: malformed pax header in the directory archive");
    }
    const record = data.subarray(space + 1, pos + len - 1).toString("utf8");
    const eq = record.indexOf("=");
    if (eq > 0) out.set(record.slice(0, eq), record.slice(eq + 1));
    pos += len;
  }
  return out;
}

interface TarEntry {
  name: string;
  type: string;
  mode: number;
  size: number;
  mtime: number;
  linkname: string;
}

/** The members of a tar stream; the caller must consume (or skip) `size` data bytes of each. */
async function* entries(reader: ByteReader): AsyncGenerator<TarEntry> {
  let longName: string | undefined;
  let longLink: string | undefined;
  let pax = new Map<string, string>();
  for (;;) {
    const h = await reader.read(BLOCK);
    if (h.length === 0) return; // no end blocks: tolerated like GNU tar does
    if (h.length < BLOCK) throw truncated();
    if (h.every((b) => b === 0)) return;
    if (!checksumOk(h)) throw new FileTransferError("download: bad checksum in the directory archive");
    const type = String.fromCharCode(h[156]!);
    const size = parseNumber(h.subarray(124, 136));
    const magic = h.subarray(257, 263).toString("latin1");
    const prefix = magic.startsWith("ustar") ? cstr(h.subarray(345, 500)) : "";
    const readMeta = async (): Promise<Buffer> => {
      if (size > MAX_META_BYTES) throw new FileTransferError("download: oversized tar metadata member");
      const data = await reader.read(padded(size));
      if (data.length < padded(size)) throw truncated();
      return data.subarray(0, size);
    };
    if (type === "x") {
      for (const [k, v] of parsePax(await readMeta())) pax.set(k, v);
      continue;
    }
    if (type === "g") {
      await readMeta(); // global defaults: none that matter here
      continue;
    }
    if (type === "L") {
      longName = cstr(await readMeta());
      continue;
    }
    if (type === "K") {
      longLink = cstr(await readMeta());
      continue;
    }
    let name = cstr(h.subarray(0, 100));
    if (prefix) name = `${prefix}/${name}`;
    name = pax.get("path") ?? longName ?? name;
    const linkname = pax.get("linkpath") ?? longLink ?? cstr(h.subarray(157, 257));
    const paxSize = pax.get("size");
    const paxMtime = pax.get("mtime");
    yield {
      name,
      type: type === "\0" ? "0" : type,
      mode: parseNumber(h.subarray(100, 108)),
      size: paxSize !== undefined ? Number(paxSize) : size,
      mtime: paxMtime !== undefined ? Math.floor(Number(paxMtime)) : parseNumber(h.subarray(136, 148)),
      linkname,
    };
    longName = undefined;
    longLink = undefined;
    pax = new Map();
  }
}

const DRIVE = /^[A-Za-z]:/;

/** Why a member name is unsafe, or undefined. */
function unsafeName(name: string): string | undefined {
  const norm = name.replace(/\\/g, "/");
  if (norm.startsWith("/") || DRIVE.test(norm)) return "absolute path";
  if (norm.split("/").includes("..")) return "'..' component";
  return undefined;
}

function within(p: string, root: string): boolean {
  return p === root || p.startsWith(root.endsWith(path.sep) ? root : root + path.sep);
}

/** Bound on symlinks followed while resolving one path (like the kernel's ELOOP limit). */
const MAX_SYMLINKS = 40;

/**
 * Like Python's non-strict `os.path.realpath`: resolve `p` component by component,
 * following symlinks as they are met (so `a/..` with `a -> .` goes above `a`'s
 * directory, as the kernel would), `..` applied to the path resolved so far, and
 * components that do not exist appended as they are. `p` must not be normalized
 * lexically first (`path.join` would turn `a/..` into nothing).
 */
export async function realpathLoose(p: string): Promise<string> {
  const abs = p.startsWith("/") ? p : `${process.cwd()}/${p}`;
  const budget = { links: MAX_SYMLINKS };
  return resolveParts("/", abs.split("/"), budget);
}

async function resolveParts(start: string, parts: string[], budget: { links: number }): Promise<string> {
  let cur = start;
  for (const part of parts) {
    if (part === "" || part === ".") continue;
    if (part === "..") {
      cur = path.posix.dirname(cur);
      continue;
    }
    const next = cur === "/" ? `/${part}` : `${cur}/${part}`;
    let st: Stats;
    try {
      st = await fs.lstat(next);
    } catch {
      cur = next; // missing: kept as written
      continue;
    }
    if (!st.isSymbolicLink()) {
      cur = next;
      continue;
    }
    if (--budget.links < 0) throw new UnsafeArchiveError(`too many levels of symbolic links at ${next}`);
    const target = await fs.readlink(next);
    cur = await resolveParts(target.startsWith("/") ? "/" : cur, target.split("/"), budget);
  }
  return cur;
}

async function lstatOrNull(p: string): Promise<BigIntStats | null> {
  try {
    return await fs.lstat(p, { bigint: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") return null;
    throw err;
  }
}

/**
 * The real path of directory `parts` under `root`, created as needed; refuses a
 * component that resolves outside `root` or is not a directory.
 */
async function ensureDir(root: string, parts: string[], member: string): Promise<string> {
  let cur = root;
  for (const part of parts) {
    const next = path.join(cur, part);
    const st = await lstatOrNull(next);
    if (st === null) {
      await fs.mkdir(next, { mode: 0o755 });
      cur = next;
      continue;
    }
    const real = st.isSymbolicLink() ? await realpathLoose(next) : next;
    if (!within(real, root)) {
      throw new UnsafeArchiveError(`refusing tar member ${JSON.stringify(member)}: its directory resolves outside the destination`);
    }
    const rst = await lstatOrNull(real);
    if (rst === null || !rst.isDirectory()) {
      throw new FileTransferError(`download: ${JSON.stringify(member)}: ${real} is not a directory`);
    }
    cur = real;
  }
  return cur;
}

/** Remove what is at `p` (not following a symlink), unless it is a directory. */
async function clear(p: string): Promise<void> {
  const st = await lstatOrNull(p);
  if (st !== null && !st.isDirectory()) await fs.unlink(p);
}

function safeMode(mode: number, dir: boolean): number {
  const m = mode & 0o755; // no setuid / setgid / sticky, no group/other write
  return dir ? m | 0o700 : m | 0o600;
}

/**
 * Extract the tar stream `chunks` into `dest` (created if missing), sequentially,
 * checking every member first (see the module doc).
 */
export async function safeExtract(chunks: AsyncIterable<Uint8Array>, dest: string): Promise<void> {
  await fs.mkdir(dest, { recursive: true });
  const root = await fs.realpath(dest);
  const reader = new ByteReader(chunks);
  try {
    for await (const entry of entries(reader)) {
      await extractOne(reader, entry, root);
    }
  } finally {
    await reader.close();
  }
}

async function extractOne(reader: ByteReader, e: TarEntry, root: string): Promise<void> {
  const reason = unsafeName(e.name);
  if (reason) throw new UnsafeArchiveError(`refusing tar member ${JSON.stringify(e.name)}: ${reason}`);
  const parts = e.name.split("/").filter((p) => p !== "" && p !== ".");
  const dataBytes = padded(e.size);
  if (parts.length === 0) {
    // The root itself ("./"): nothing to create.
    await reader.skip(dataBytes);
    return;
  }
  const base = parts[parts.length - 1]!;
  const parent = await ensureDir(root, parts.slice(0, -1), e.name);
  const target = path.join(parent, base);
  switch (e.type) {
    case "0":
    case "7": {
      await clear(target);
      const handle = await fs.open(target, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_EXCL | fsc.O_NOFOLLOW, safeMode(e.mode, false));
      try {
        let left = e.size;
        for await (const piece of reader.pieces(dataBytes)) {
          const useful = piece.subarray(0, Math.max(0, Math.min(piece.length, left)));
          left -= useful.length;
          if (useful.length) await handle.write(useful);
        }
      } finally {
        await handle.close();
      }
      await fs.utimes(target, e.mtime, e.mtime);
      return;
    }
    case "5": {
      await reader.skip(dataBytes);
      const existed = (await lstatOrNull(target)) !== null;
      const dir = await ensureDir(root, parts, e.name);
      if (!existed) await fs.chmod(dir, safeMode(e.mode, true));
      return;
    }
    case "2": {
      await reader.skip(dataBytes);
      const link = e.linkname;
      if (link.startsWith("/") || DRIVE.test(link)) {
        throw new UnsafeArchiveError(`refusing symlink ${JSON.stringify(e.name)} -> ${JSON.stringify(link)}: absolute target`);
      }
      if (!within(await realpathLoose(`${parent}/${link}`), root)) {
        throw new UnsafeArchiveError(
          `refusing symlink ${JSON.stringify(e.name)} -> ${JSON.stringify(link)}: points outside the destination`,
        );
      }
      await clear(target);
      await fs.symlink(link, target);
      return;
    }
    case "1": {
      await reader.skip(dataBytes);
      const link = e.linkname;
      const why = unsafeName(link);
      if (why) throw new UnsafeArchiveError(`refusing hard link ${JSON.stringify(e.name)} -> ${JSON.stringify(link)}: ${why}`);
      const source = await realpathLoose(`${root}/${link}`);
      if (!within(source, root)) {
        throw new UnsafeArchiveError(
          `refusing hard link ${JSON.stringify(e.name)} -> ${JSON.stringify(link)}: points outside the destination`,
        );
      }
      const st = await lstatOrNull(source);
      if (st === null || !st.isFile()) {
        throw new UnsafeArchiveError(
          `refusing hard link ${JSON.stringify(e.name)} -> ${JSON.stringify(link)}: not a file extracted before`,
        );
      }
      await clear(target);
      await fs.link(source, target);
      return;
    }
    case "3":
    case "4":
    case "6":
      throw new UnsafeArchiveError(
        `refusing tar member ${JSON.stringify(e.name)}: ${e.type === "6" ? "FIFO" : "device file"}`,
      );
    default:
      throw new FileTransferError(
        `download: tar member ${JSON.stringify(e.name)} has an unsupported type ${JSON.stringify(e.type)}`,
      );
  }
}
