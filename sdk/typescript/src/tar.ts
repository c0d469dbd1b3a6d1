/**
 * The tar archives of directory transfers, both directions, with Node built-ins only.
 *
 * Upload (`planTar` + `streamTar`): the archive `tar -C DIR -cf - .` would make,
 * members rooted at `./` (`./`, `./sub/`, `./sub/file`), whose exact size is known
 * before a byte is read, so the PUT carries a Content-Length (S3 presigned PUTs need
 * one) without a temporary copy:
 *
 * - pass 1 (`planTar`) walks the tree with `lstat` only and adds up the headers and
 *   padded data;
 * - pass 2 (`streamTar`) walks it again in the same order and yields the archive. A
 *   tree that changed in between (an entry appeared or disappeared, a type, size or
 *   symlink target differs, a file is shorter or longer than its size) throws
 *   `FileTransferError` before a wrong byte count could be sent.
 *
 * Format: ustar headers; a pax extended header (`x`) carries what does not fit (long
 * path or link target, size >= 8 GiB, large uid/gid). Regular files, directories,
 * symlinks (not followed), FIFOs and device nodes; sockets are skipped like GNU tar
 * does; hard links are stored as separate copies. The end is two zero blocks.
 *
 * Download (`safeExtract`): a streaming reader of what the VM's GNU tar writes
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

import { constants as fsc } from "node:fs";
import type { BigIntStats, Stats } from "node:fs";
import * as fs from "node:fs/promises";
import * as path from "node:path";

import { FileTransferError, UnsafeArchiveError } from "./errors.js";

export const BLOCK = 512;
const CHUNK = 1024 * 1024;
/** Bound on a pax or GNU long-name member's data (kept in memory). */
const MAX_META_BYTES = 1024 * 1024;

function padded(n: number): number {
  return Math.ceil(n / BLOCK) * BLOCK;
}

// --- writing -------------------------------------------------------------------------

type Kind = "file" | "dir" | "symlink" | "fifo" | "chr" | "blk";

const TYPEFLAG: Record<Kind, string> = { file: "0", symlink: "2", chr: "3", blk: "4", dir: "5", fifo: "6" };

interface Member {
  name: string;
  kind: Kind;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  linkname: string;
  devmajor: number;
  devminor: number;
}

interface PlannedEntry {
  rel: string;
  kind: Kind;
  size: number;
  linkname: string;
  headerLength: number;
}

/** The result of pass 1: what will be archived, and the exact archive size. */
export interface TarPlan {
  directory: string;
  entries: PlannedEntry[];
  size: number;
}

function kindOf(st: Stats): Kind | undefined {
  if (st.isFile()) return "file";
  if (st.isDirectory()) return "dir";
  if (st.isSymbolicLink()) return "symlink";
  if (st.isFIFO()) return "fifo";
  if (st.isCharacterDevice()) return "chr";
  if (st.isBlockDevice()) return "blk";
  return undefined; // socket: skipped
}

// Linux's dev_t encoding (glibc's gnu_dev_major / gnu_dev_minor).
function devMajor(rdev: number): number {
  return Number(((BigInt(rdev) >> 8n) & 0xfffn) | ((BigInt(rdev) >> 32n) & ~0xfffn));
}
function devMinor(rdev: number): number {
  return Number((BigInt(rdev) & 0xffn) | ((BigInt(rdev) >> 12n) & ~0xffn));
}

async function memberOf(directory: string, rel: string, st: Stats): Promise<Member | undefined> {
  const kind = kindOf(st);
  if (kind === undefined) return undefined;
  const base = rel === "" ? "." : `./${rel}`;
  return {
    name: kind === "dir" ? `${base}/` : base,
    kind,
    mode: st.mode & 0o7777,
    uid: st.uid,
    gid: st.gid,
    size: kind === "file" ? st.size : 0,
    mtime: Math.max(0, Math.floor(st.mtimeMs / 1000)),
    linkname: kind === "symlink" ? await fs.readlink(path.join(directory, rel)) : "",
    devmajor: kind === "chr" || kind === "blk" ? devMajor(st.rdev) : 0,
    devminor: kind === "chr" || kind === "blk" ? devMinor(st.rdev) : 0,
  };
}

/** `value` as a NUL-terminated octal field of `width` bytes, or undefined if it does not fit. */
function octal(value: number, width: number): string | undefined {
  const s = Math.trunc(value).toString(8);
  return s.length <= width - 1 ? s.padStart(width - 1, "0") + "\0" : undefined;
}

function paxRecord(key: string, value: string): Buffer {
  const body = ` ${key}=${value}\n`;
  const bodyLen = Buffer.byteLength(body);
  let len = bodyLen + String(bodyLen).length;
  if (String(len).length + bodyLen !== len) len = String(len + 1).length + bodyLen;
  return Buffer.from(`${len}${body}`, "utf8");
}

/** Split a name into ustar (prefix, name), or undefined when it does not fit. */
function splitName(name: string): [string, string] | undefined {
  if (Buffer.byteLength(name) <= 100) return ["", name];
  const bytes = Buffer.from(name);
  for (let i = Math.min(bytes.length - 1, 155); i > 0; i--) {
    if (bytes[i] === 0x2f && bytes.length - i - 1 <= 100 && bytes.length - i - 1 > 0) {
      return [bytes.subarray(0, i).toString(), bytes.subarray(i + 1).toString()];
    }
  }
  return undefined;
}

function ustarHeader(fields: {
  name: string;
  prefix: string;
  mode: number;
  uid: string;
  gid: string;
  size: string;
  mtime: string;
  typeflag: string;
  linkname: string;
  devmajor: number;
  devminor: number;
}): Buffer {
  const h = Buffer.alloc(BLOCK);
  const put = (s: string, offset: number, width: number): void => {
    const b = Buffer.from(s, "utf8");
    b.copy(h, offset, 0, Math.min(b.length, width));
  };
  put(fields.name, 0, 100);
  put(octal(fields.mode, 8) ?? "0000000\0", 100, 8);
  put(fields.uid, 108, 8);
  put(fields.gid, 116, 8);
  put(fields.size, 124, 12);
  put(fields.mtime, 136, 12);
  put("        ", 148, 8);
  put(fields.typeflag, 156, 1);
  put(fields.linkname, 157, 100);
  put("ustar\0", 257, 6);
  put("00", 263, 2);
  put(octal(fields.devmajor, 8) ?? "0000000\0", 329, 8);
  put(octal(fields.devminor, 8) ?? "0000000\0", 337, 8);
  put(fields.prefix, 345, 155);
  let sum = 0;
  for (const byte of h) sum += byte;
  put(sum.toString(8).padStart(6, "0") + "\0 ", 148, 8);
  return h;
}

/** The header block(s) of a member: a pax header first when something does not fit ustar. */
export function headerOf(m: Member): Buffer {
  const pax: Buffer[] = [];
  const split = splitName(m.name);
  if (!split) pax.push(paxRecord("path", m.name));
  if (Buffer.byteLength(m.linkname) > 100) pax.push(paxRecord("linkpath", m.linkname));
  const num = (key: string, value: number, width: number): string => {
    const field = octal(value, width);
    if (field !== undefined) return field;
    pax.push(paxRecord(key, String(value)));
    return "0".repeat(width - 1) + "\0";
  };
  const size = num("size", m.size, 12);
  const uid = num("uid", m.uid, 8);
  const gid = num("gid", m.gid, 8);
  const mtime = num("mtime", m.mtime, 12);
  const [prefix, name] = split ?? ["", Buffer.from(m.name).subarray(0, 100).toString()];
  const header = ustarHeader({
    name,
    prefix,
    mode: m.mode,
    uid,
    gid,
    size,
    mtime,
    typeflag: TYPEFLAG[m.kind],
    linkname: Buffer.byteLength(m.linkname) > 100 ? "" : m.linkname,
    devmajor: m.devmajor,
    devminor: m.devminor,
  });
  if (pax.length === 0) return header;
  const data = Buffer.concat(pax);
  const paxName = `./PaxHeaders/${path.posix.basename(m.name.replace(/\/$/, "")) || "root"}`;
  const paxHeader = ustarHeader({
    name: Buffer.from(paxName).subarray(0, 100).toString(),
    prefix: "",
    mode: 0o644,
    uid: octal(0, 8)!,
    gid: octal(0, 8)!,
    size: octal(data.length, 12)!,
    mtime: octal(m.mtime, 12) ?? octal(0, 12)!,
    typeflag: "x",
    linkname: "",
    devmajor: 0,
    devminor: 0,
  });
  return Buffer.concat([paxHeader, data, Buffer.alloc(padded(data.length) - data.length), header]);
}

/** (relative path, lstat) of the directory and everything under it, pre-order, children sorted. */
async function* walk(directory: string, rel = ""): AsyncGenerator<[string, Stats]> {
  const full = rel ? path.join(directory, rel) : directory;
  const st = await fs.lstat(full);
  yield [rel, st];
  if (st.isDirectory()) {
    const names = (await fs.readdir(full)).sort();
    for (const name of names) yield* walk(directory, rel ? `${rel}/${name}` : name);
  }
}

/** Size of an archive whose members (headers + padded data) take `memberBytes`. */
export function archiveSize(memberBytes: number): number {
  return memberBytes + 2 * BLOCK;
}

/** Pass 1: lstat every entry, compute the exact archive size. Reads no file data. */
export async function planTar(directory: string): Promise<TarPlan> {
  const entries: PlannedEntry[] = [];
  let total = 0;
  for await (const [rel, st] of walk(directory)) {
    const m = await memberOf(directory, rel, st);
    if (!m) continue;
    const headerLength = headerOf(m).length;
    entries.push({ rel, kind: m.kind, size: m.size, linkname: m.linkname, headerLength });
    total += headerLength + padded(m.size);
  }
  return { directory, entries, size: archiveSize(total) };
}

function changed(directory: string, rel: string, why: string): FileTransferError {
  const shown = rel ? path.join(directory, rel) : directory;
  return new FileTransferError(
    `${JSON.stringify(shown)} ${why} during the upload (the archive size is computed before streaming); ` +
      "upload it again once the directory is stable",
  );
}

/** Exactly `size` bytes of `directory/rel`; FileTransferError if it is shorter or longer. */
export async function* fileData(directory: string, rel: string, size: number): AsyncGenerator<Buffer> {
  const handle = await fs.open(path.join(directory, rel), fsc.O_RDONLY | fsc.O_NOFOLLOW);
  try {
    let left = size;
    while (left > 0) {
      const buf = Buffer.allocUnsafe(Math.min(CHUNK, left));
      const { bytesRead } = await handle.read(buf, 0, buf.length, null);
      if (bytesRead === 0) throw changed(directory, rel, `shrank (was ${size} bytes)`);
      left -= bytesRead;
      yield buf.subarray(0, bytesRead);
    }
    const { bytesRead } = await handle.read(Buffer.alloc(1), 0, 1, null);
    if (bytesRead !== 0) throw changed(directory, rel, `grew (was ${size} bytes)`);
  } finally {
    await handle.close();
  }
}

/** Pass 2: the archive, exactly `plan.size` bytes, in chunks of about 1 MiB. */
export async function* streamTar(plan: TarPlan): AsyncGenerator<Buffer> {
  const { directory } = plan;
  let buf: Buffer[] = [];
  let buffered = 0;
  let produced = 0;
  let index = 0;
  const push = (b: Buffer): void => {
    buf.push(b);
    buffered += b.length;
  };
  const take = (): Buffer => {
    const out = Buffer.concat(buf);
    buf = [];
    buffered = 0;
    produced += out.length;
    return out;
  };
  const entries = walk(directory);
  for (;;) {
    let next: IteratorResult<[string, Stats]>;
    try {
      next = await entries.next();
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (e.code === "ENOENT") {
        const rel = e.path ? path.relative(directory, e.path) : "";
        throw changed(directory, rel, "disappeared");
      }
      throw err;
    }
    if (next.done) break;
    const [rel, st] = next.value;
    const m = await memberOf(directory, rel, st);
    if (!m) continue;
    const want = plan.entries[index++];
    if (!want) throw changed(directory, rel, "appeared");
    if (want.rel !== rel) {
      throw new FileTransferError(
        `${JSON.stringify(directory)} changed during the upload: found ${JSON.stringify(rel)} where ` +
          `${JSON.stringify(want.rel)} was expected (an entry appeared or disappeared; the archive size is ` +
          "computed before streaming); upload it again once the directory is stable",
      );
    }
    if (m.kind !== want.kind) throw changed(directory, rel, "changed type");
    if (m.size !== want.size) throw changed(directory, rel, `changed size (${want.size} -> ${m.size} bytes)`);
    if (m.linkname !== want.linkname) throw changed(directory, rel, "changed its symlink target");
    const header = headerOf(m);
    if (header.length !== want.headerLength) throw changed(directory, rel, "changed metadata");
    push(header);
    if (m.kind === "file" && m.size > 0) {
      for await (const chunk of fileData(directory, rel, m.size)) {
        push(chunk);
        if (buffered >= CHUNK) yield take();
      }
      push(Buffer.alloc(padded(m.size) - m.size));
    }
    if (buffered >= CHUNK) yield take();
  }
  const gone = plan.entries[index];
  if (gone) throw changed(directory, gone.rel, "disappeared");
  const members = produced + buffered;
  if (archiveSize(members) !== plan.size) {
    // Not with an unchanged tree: a bug, never a wrong Content-Length.
    throw new FileTransferError(`sized tar of ${directory}: ${archiveSize(members)} bytes made, ${plan.size} planned`);
  }
  push(Buffer.alloc(plan.size - members));
  yield take();
}

// --- reading -------------------------------------------------------------------------

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

/** Like Python's non-strict realpath: resolve the part that exists, append the rest. */
async function realpathLoose(p: string): Promise<string> {
  const abs = path.resolve(p);
  const rest: string[] = [];
  let cur = abs;
  for (;;) {
    try {
      const real = await fs.realpath(cur);
      return rest.length ? path.resolve(real, ...rest.reverse()) : real;
    } catch (err) {
      const e = err as NodeJS.ErrnoException;
      if (e.code !== "ENOENT" && e.code !== "ENOTDIR") throw err;
      const parent = path.dirname(cur);
      if (parent === cur) return abs;
      rest.push(path.basename(cur));
      cur = parent;
    }
  }
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
      if (!within(await realpathLoose(path.join(parent, link)), root)) {
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
      const source = await realpathLoose(path.join(root, link));
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
