/**
 * The ZIP archive of a Dockerfile build context (`client.build`), with Node built-ins
 * only: every regular file of the context directory (sorted walk, symlinks to files
 * followed like Python's `zipfile` does, symlinks to directories not descended),
 * deflated, plus the given Dockerfile text written as `Dockerfile` at the root (it
 * replaces a `Dockerfile` of the context). Written to a temporary file (each local
 * header is completed once its data is written), so memory stays bounded.
 * ZIP32 only: more than 65535 entries or 4 GiB is refused.
 */

import { createReadStream } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { createDeflateRaw } from "node:zlib";

import { BuildError } from "./errors.js";

export const DOCKERFILE_NAME = "Dockerfile";
const LIMIT32 = 0xffffffff;

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 (IEEE) continued from `crc` over `buf`. */
export function crc32(buf: Uint8Array, crc = 0): number {
  let c = (crc ^ 0xffffffff) >>> 0;
  for (let i = 0; i < buf.length; i++) c = CRC_TABLE[(c ^ buf[i]!) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

function dosDateTime(d: Date): { time: number; date: number } {
  if (d.getFullYear() < 1980) return { time: 0, date: (1 << 5) | 1 };
  return {
    time: (d.getHours() << 11) | (d.getMinutes() << 5) | Math.floor(d.getSeconds() / 2),
    date: ((d.getFullYear() - 1980) << 9) | ((d.getMonth() + 1) << 5) | d.getDate(),
  };
}

interface CentralEntry {
  name: Buffer;
  crc: number;
  csize: number;
  usize: number;
  time: number;
  date: number;
  mode: number;
  offset: number;
}

function localHeader(e: CentralEntry): Buffer {
  const h = Buffer.alloc(30);
  h.writeUInt32LE(0x04034b50, 0);
  h.writeUInt16LE(20, 4);
  h.writeUInt16LE(0x0800, 6); // UTF-8 names
  h.writeUInt16LE(8, 8); // deflate
  h.writeUInt16LE(e.time, 10);
  h.writeUInt16LE(e.date, 12);
  h.writeUInt32LE(e.crc, 14);
  h.writeUInt32LE(e.csize, 18);
  h.writeUInt32LE(e.usize, 22);
  h.writeUInt16LE(e.name.length, 26);
  h.writeUInt16LE(0, 28);
  return Buffer.concat([h, e.name]);
}

function centralHeader(e: CentralEntry): Buffer {
  const h = Buffer.alloc(46);
  h.writeUInt32LE(0x02014b50, 0);
  h.writeUInt16LE(0x031e, 4); // made by: Unix, 3.0
  h.writeUInt16LE(20, 6);
  h.writeUInt16LE(0x0800, 8);
  h.writeUInt16LE(8, 10);
  h.writeUInt16LE(e.time, 12);
  h.writeUInt16LE(e.date, 14);
  h.writeUInt32LE(e.crc, 16);
  h.writeUInt32LE(e.csize, 20);
  h.writeUInt32LE(e.usize, 24);
  h.writeUInt16LE(e.name.length, 28);
  h.writeUInt32LE(((e.mode & 0xffff) << 16) >>> 0, 38);
  h.writeUInt32LE(e.offset, 42);
  return Buffer.concat([h, e.name]);
}

class ZipWriter {
  private offset = 0;
  private readonly entries: CentralEntry[] = [];

  constructor(private readonly fh: FileHandle) {}

  private async write(buf: Buffer, position?: number): Promise<void> {
    await this.fh.write(buf, 0, buf.length, position ?? this.offset);
    if (position === undefined) this.offset += buf.length;
  }

  /** Add one member from a stream of its bytes. */
  async add(name: string, data: AsyncIterable<Uint8Array> | Iterable<Uint8Array>, mtime: Date, mode: number): Promise<void> {
    if (this.entries.length >= 0xffff) throw new BuildError("build context has too many files for a ZIP (65535)");
    const { time, date } = dosDateTime(mtime);
    const entry: CentralEntry = { name: Buffer.from(name, "utf8"), crc: 0, csize: 0, usize: 0, time, date, mode, offset: this.offset };
    await this.write(localHeader(entry)); // placeholder: crc and sizes filled in below
    const deflate = createDeflateRaw();
    const feed = (async () => {
      try {
        for await (const chunk of data) {
          entry.crc = crc32(chunk, entry.crc);
          entry.usize += chunk.length;
          if (!deflate.write(chunk)) await new Promise((r) => deflate.once("drain", r));
        }
        deflate.end();
      } catch (err) {
        deflate.destroy(err as Error);
      }
    })();
    for await (const out of deflate) {
      await this.write(out as Buffer);
      entry.csize += (out as Buffer).length;
    }
    await feed;
    if (entry.usize > LIMIT32 || entry.csize > LIMIT32 || this.offset > LIMIT32) {
      throw new BuildError("build context is over 4 GiB, too large for a ZIP");
    }
    await this.write(localHeader(entry), entry.offset);
    this.entries.push(entry);
  }

  /** Central directory and end record; returns the archive size. */
  async finish(): Promise<number> {
    const cdStart = this.offset;
    for (const e of this.entries) await this.write(centralHeader(e));
    const end = Buffer.alloc(22);
    end.writeUInt32LE(0x06054b50, 0);
    end.writeUInt16LE(this.entries.length, 8);
    end.writeUInt16LE(this.entries.length, 10);
    end.writeUInt32LE(this.offset - cdStart, 12);
    end.writeUInt32LE(cdStart, 16);
    await this.write(end);
    return this.offset;
  }
}

/** Regular files under `dir` as (relative posix path, absolute path), sorted walk. */
async function* contextFiles(dir: string, rel = ""): AsyncGenerator<[string, string]> {
  const full = rel ? path.join(dir, rel) : dir;
  const dirents = await fs.readdir(full, { withFileTypes: true });
  const dirs = dirents.filter((d) => d.isDirectory()).map((d) => d.name).sort();
  const others = dirents.filter((d) => !d.isDirectory()).map((d) => d.name).sort();
  for (const name of others) {
    const relName = rel ? `${rel}/${name}` : name;
    const abs = path.join(full, name);
    const st = await fs.stat(abs).catch(() => null); // follows symlinks; broken ones skipped
    if (st?.isFile()) yield [relName, abs];
  }
  for (const name of dirs) yield* contextFiles(dir, rel ? `${rel}/${name}` : name);
}

export interface ZipFile {
  path: string;
  size: number;
  /** Remove the temporary file (and its directory). */
  cleanup(): Promise<void>;
}

/** ZIP of `contextDir` plus `dockerfile` as `Dockerfile` at the root, in a temporary file. */
export async function zipContext(contextDir: string | undefined, dockerfile: string): Promise<ZipFile> {
  const tmpDir = await fs.mkdtemp(path.join(os.tmpdir(), "fastvm-build-"));
  const zipPath = path.join(tmpDir, "context.zip");
  const cleanup = (): Promise<void> => fs.rm(tmpDir, { recursive: true, force: true });
  try {
    const fh = await fs.open(zipPath, "w", 0o600);
    let size: number;
    try {
      const zip = new ZipWriter(fh);
      if (contextDir !== undefined) {
        for await (const [rel, abs] of contextFiles(contextDir)) {
          if (rel === DOCKERFILE_NAME) continue; // replaced below
          const st = await fs.stat(abs);
          await zip.add(rel, createReadStream(abs), st.mtime, st.mode);
        }
      }
      const text = Buffer.from(dockerfile, "utf8");
      await zip.add(DOCKERFILE_NAME, [text], new Date(), 0o100644);
      size = await zip.finish();
    } finally {
      await fh.close();
    }
    return { path: zipPath, size, cleanup };
  } catch (err) {
    await cleanup();
    throw err;
  }
}
