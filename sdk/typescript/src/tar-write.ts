/**
 * The tar archive of a directory upload, with Node built-ins only.
 *
 * `planTar` + `streamTar` make the archive `tar -C DIR -cf - .` would make,
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
 */

import { constants as fsc } from "node:fs";
import type { Stats } from "node:fs";
import * as fs from "node:fs/promises";
import * as path from "node:path";

import { FileTransferError } from "./errors.js";

export const BLOCK = 512;
const CHUNK = 1024 * 1024;

function padded(n: number): number {
  return Math.ceil(n / BLOCK) * BLOCK;
}

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
