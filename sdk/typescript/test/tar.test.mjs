// The tar writer (sized, two passes) and the safe streaming extractor, checked
// against independent implementations: GNU tar (the VM's side) and Python's tarfile
// (to craft hostile archives).
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { FileTransferError, UnsafeArchiveError } from "fastvm";
import { planTar, streamTar } from "../dist/esm/tar-write.js";
import { parseNumber, parsePax, safeExtract } from "../dist/esm/tar-extract.js";

import { rmrf, tempDir } from "./helpers.mjs";

const LONG_DIR = "d".repeat(90);
const LONG_FILE = "f".repeat(150);

function makeTree(root, { fifo = false } = {}) {
  fs.mkdirSync(path.join(root, "sub", "deeper"), { recursive: true });
  fs.mkdirSync(path.join(root, "empty"));
  fs.mkdirSync(path.join(root, LONG_DIR, LONG_DIR), { recursive: true });
  fs.writeFileSync(path.join(root, "sub", "a.txt"), "alpha\n");
  fs.writeFileSync(path.join(root, "sub", "deeper", "b.bin"), randomBytes(3 * 1024 * 1024 + 17));
  fs.writeFileSync(path.join(root, "zero"), "");
  fs.writeFileSync(path.join(root, "exec.sh"), "#!/bin/sh\necho hi\n");
  fs.chmodSync(path.join(root, "exec.sh"), 0o751);
  fs.writeFileSync(path.join(root, "private"), "secret");
  fs.chmodSync(path.join(root, "private"), 0o600);
  fs.writeFileSync(path.join(root, LONG_DIR, LONG_DIR, LONG_FILE), "deep\n");
  fs.writeFileSync(path.join(root, "ünïcødé name.txt"), "utf-8\n");
  fs.symlinkSync("sub/a.txt", path.join(root, "link-rel"));
  fs.symlinkSync("sub", path.join(root, "link-dir"));
  fs.symlinkSync("does-not-exist", path.join(root, "dangling"));
  fs.symlinkSync("x".repeat(150), path.join(root, "long-target"));
  if (fifo) execFileSync("mkfifo", [path.join(root, "pipe")]);
}

/** Every entry under root: kind, mode bits, link target or content digest. */
function treeOf(root) {
  const out = {};
  const walk = (rel) => {
    for (const name of fs.readdirSync(path.join(root, rel)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      const p = path.join(root, r);
      const st = fs.lstatSync(p);
      if (st.isSymbolicLink()) out[r] = ["link", fs.readlinkSync(p)];
      else if (st.isDirectory()) {
        out[r] = ["dir", st.mode & 0o777];
        walk(r);
      } else if (st.isFIFO()) out[r] = ["fifo"];
      else out[r] = ["file", st.mode & 0o777, st.size, createHash("sha256").update(fs.readFileSync(p)).digest("hex")];
    }
  };
  walk("");
  return out;
}

async function collect(gen) {
  const chunks = [];
  for await (const c of gen) chunks.push(c);
  return Buffer.concat(chunks);
}

async function* chunked(buf, size) {
  for (let i = 0; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

/** Run a Python tarfile script that writes an archive to argv[1]; return its bytes. */
function pythonTar(dir, body) {
  const out = path.join(dir, `py-${Math.random().toString(36).slice(2)}.tar`);
  const script = `import io, sys, tarfile\nt = tarfile.open(sys.argv[1], "w", format=tarfile.GNU_FORMAT)\ndef add(name, type=tarfile.REGTYPE, data=b"", linkname="", mode=0o644, **kw):\n    i = tarfile.TarInfo(name); i.type = type; i.linkname = linkname; i.mode = mode; i.size = len(data) if type == tarfile.REGTYPE else 0\n    for k, v in kw.items(): setattr(i, k, v)\n    t.addfile(i, io.BytesIO(data) if type == tarfile.REGTYPE else None)\n${body}\nt.close()\n`;
  execFileSync("python3", ["-c", script, out]);
  return fs.readFileSync(out);
}

describe("tar writer", () => {
  let dir;
  before(() => (dir = tempDir()));
  after(() => rmrf(dir));

  it("makes exactly plan.size bytes that GNU tar extracts to the same tree", async () => {
    const src = path.join(dir, "src");
    fs.mkdirSync(src);
    makeTree(src, { fifo: true });
    const plan = await planTar(src);
    const archive = await collect(streamTar(plan));
    assert.equal(archive.length, plan.size);
    assert.equal(archive.length % 512, 0);
    const tarPath = path.join(dir, "ours.tar");
    fs.writeFileSync(tarPath, archive);
    const listed = execFileSync("tar", ["-tf", tarPath], { encoding: "utf8" }).split("\n").filter(Boolean);
    assert.equal(listed[0], "./");
    assert.ok(listed.includes("./sub/deeper/b.bin"));
    assert.ok(listed.includes(`./${LONG_DIR}/${LONG_DIR}/${LONG_FILE}`), "long names through pax");
    const out = path.join(dir, "gnu-out");
    fs.mkdirSync(out);
    execFileSync("tar", ["-xf", tarPath, "-C", out]);
    assert.deepEqual(treeOf(out), treeOf(src));
  });

  it("members are rooted at ./ in sorted pre-order, and the end is two zero blocks", async () => {
    const src = path.join(dir, "small");
    fs.mkdirSync(path.join(src, "b"), { recursive: true });
    fs.writeFileSync(path.join(src, "b", "x"), "x");
    fs.writeFileSync(path.join(src, "a"), "a");
    const archive = await collect(streamTar(await planTar(src)));
    const names = execFileSync("tar", ["-tf", "-"], { input: archive, encoding: "utf8" }).split("\n").filter(Boolean);
    assert.deepEqual(names, ["./", "./a", "./b/", "./b/x"]);
    assert.ok(archive.subarray(-1024).every((b) => b === 0));
    // header(512) + data(512) per file, header per dir, 2 end blocks
    assert.equal(archive.length, 512 * (1 + 2 + 1 + 2 + 2));
  });

  it("a file that grows, shrinks, appears or disappears after planning fails the stream", async () => {
    const cases = [
      ["grows", (src) => fs.appendFileSync(path.join(src, "f"), "more"), /changed size|grew/],
      ["shrinks", (src) => fs.truncateSync(path.join(src, "f"), 1), /changed size|shrank/],
      ["appears", (src) => fs.writeFileSync(path.join(src, "g"), "new"), /appeared|found "g"/],
      ["disappears", (src) => fs.unlinkSync(path.join(src, "f")), /disappeared|found/],
      ["changes type", (src) => (fs.unlinkSync(path.join(src, "f")), fs.mkdirSync(path.join(src, "f"))), /changed type/],
    ];
    for (const [what, mutate, message] of cases) {
      const src = path.join(dir, `mut-${what.replace(" ", "-")}`);
      fs.mkdirSync(src);
      fs.writeFileSync(path.join(src, "f"), "0123456789");
      const plan = await planTar(src);
      mutate(src);
      await assert.rejects(collect(streamTar(plan)), (e) => e instanceof FileTransferError && message.test(e.message), what);
    }
  });
});

describe("safe extraction", () => {
  let dir;
  before(() => (dir = tempDir()));
  after(() => rmrf(dir));

  it("extracts what the VM's GNU tar makes (long names, symlinks, modes), in small chunks", async () => {
    const src = path.join(dir, "gnu-src");
    fs.mkdirSync(src);
    makeTree(src);
    const archive = execFileSync("tar", ["-C", src, "-cf", "-", "."], { maxBuffer: 64 << 20 });
    const out = path.join(dir, "gnu-extract");
    await safeExtract(chunked(archive, 777), out);
    assert.deepEqual(treeOf(out), treeOf(src));
  });

  it("extracts pax archives (GNU tar --format=posix) and its own", async () => {
    const src = path.join(dir, "pax-src");
    fs.mkdirSync(src);
    makeTree(src);
    const pax = execFileSync("tar", ["--format=posix", "-C", src, "-cf", "-", "."], { maxBuffer: 64 << 20 });
    const out1 = path.join(dir, "pax-extract");
    await safeExtract(chunked(pax, 4096), out1);
    assert.deepEqual(treeOf(out1), treeOf(src));
    const ours = await collect(streamTar(await planTar(src)));
    const out2 = path.join(dir, "own-extract");
    await safeExtract(chunked(ours, 100_000), out2);
    assert.deepEqual(treeOf(out2), treeOf(src));
  });

  const hostile = [
    ["an absolute path", `add("/abs-evil", data=b"x")`, /absolute path/],
    ["a .. component", `add("../dotdot-evil", data=b"x")`, /'\.\.' component/],
    ["a .. component inside", `add("./a/../../dotdot2-evil", data=b"x")`, /'\.\.' component/],
    ["a long GNU name with ..", `add("./" + "a" * 120 + "/../../../long-evil", data=b"x")`, /'\.\.' component/],
    ["an absolute symlink", `add("./link", tarfile.SYMTYPE, linkname="/etc")`, /absolute target/],
    ["a symlink leaving the destination", `add("./link", tarfile.SYMTYPE, linkname="../../outside")`, /points outside/],
    [
      "a member below a symlink that leaves (chained)",
      `add("./a", tarfile.SYMTYPE, linkname=".")\nadd("./b", tarfile.SYMTYPE, linkname="a/..")`,
      /points outside/,
    ],
    ["an absolute hard link", `add("./h", tarfile.LNKTYPE, linkname="/etc/passwd")`, /absolute path/],
    ["a hard link with ..", `add("./h", tarfile.LNKTYPE, linkname="../x")`, /'\.\.' component/],
    ["a hard link to nothing extracted", `add("./h", tarfile.LNKTYPE, linkname="missing")`, /not a file/],
    ["a character device", `add("./null", tarfile.CHRTYPE, devmajor=1, devminor=3)`, /device file/],
    ["a block device", `add("./disk", tarfile.BLKTYPE, devmajor=8, devminor=0)`, /device file/],
    ["a FIFO", `add("./pipe", tarfile.FIFOTYPE)`, /FIFO/],
  ];
  for (const [what, body, message] of hostile) {
    it(`refuses ${what}`, async () => {
      const archive = pythonTar(dir, body);
      const root = fs.mkdtempSync(path.join(dir, "case-"));
      const dest = path.join(root, "dest");
      await assert.rejects(safeExtract(chunked(archive, 512), dest), (e) => e instanceof UnsafeArchiveError && message.test(e.message));
      // Nothing landed outside the destination.
      assert.deepEqual(fs.readdirSync(root), ["dest"]);
      assert.ok(!fs.existsSync("/abs-evil"));
    });
  }

  it("refuses a member whose directory is a symlink leaving the destination", async () => {
    const root = fs.mkdtempSync(path.join(dir, "symdir-"));
    const outside = path.join(root, "outside");
    const dest = path.join(root, "dest");
    fs.mkdirSync(outside);
    fs.mkdirSync(dest);
    fs.symlinkSync(outside, path.join(dest, "out")); // left there before the download
    const archive = pythonTar(dir, `add("./out/evil", data=b"x")`);
    await assert.rejects(safeExtract(chunked(archive, 512), dest), /directory resolves outside/);
    assert.deepEqual(fs.readdirSync(outside), []);
  });

  it("replaces an existing symlink instead of writing through it", async () => {
    const root = fs.mkdtempSync(path.join(dir, "through-"));
    const outside = path.join(root, "victim");
    const dest = path.join(root, "dest");
    fs.writeFileSync(outside, "untouched");
    fs.mkdirSync(dest);
    fs.symlinkSync(outside, path.join(dest, "f"));
    await safeExtract(chunked(pythonTar(dir, `add("./f", data=b"new content")`), 512), dest);
    assert.equal(fs.readFileSync(outside, "utf8"), "untouched");
    assert.equal(fs.readFileSync(path.join(dest, "f"), "utf8"), "new content");
    assert.ok(!fs.lstatSync(path.join(dest, "f")).isSymbolicLink());
  });

  it("accepts links that stay inside; drops setuid and group/other write bits", async () => {
    const archive = pythonTar(
      dir,
      [
        `add("./", tarfile.DIRTYPE, mode=0o755)`,
        `add("./dir", tarfile.DIRTYPE, mode=0o777)`,
        `add("./dir/file", data=b"payload", mode=0o4777)`,
        `add("./here", tarfile.SYMTYPE, linkname="dir/file")`,
        `add("./self", tarfile.SYMTYPE, linkname=".")`,
        `add("./self/through-self", data=b"ok")`,
        `add("./hard", tarfile.LNKTYPE, linkname="dir/file")`,
      ].join("\n"),
    );
    const dest = path.join(dir, "inside");
    await safeExtract(chunked(archive, 512), dest);
    assert.equal(fs.readFileSync(path.join(dest, "here"), "utf8"), "payload");
    assert.equal(fs.readFileSync(path.join(dest, "hard"), "utf8"), "payload");
    assert.equal(fs.readFileSync(path.join(dest, "through-self"), "utf8"), "ok");
    assert.equal(fs.statSync(path.join(dest, "dir", "file")).mode & 0o7777, 0o755);
    assert.equal(fs.statSync(path.join(dest, "dir")).mode & 0o777, 0o755);
  });

  it("a corrupt or truncated archive is a FileTransferError", async () => {
    const good = pythonTar(dir, `add("./f", data=b"x" * 2000)`);
    const corrupt = Buffer.from(good);
    corrupt[10] ^= 0xff; // inside the name: checksum mismatch
    await assert.rejects(safeExtract(chunked(corrupt, 512), path.join(dir, "corrupt")), (e) => e instanceof FileTransferError && /checksum/.test(e.message));
    await assert.rejects(safeExtract(chunked(good.subarray(0, 1024), 512), path.join(dir, "short")), (e) => e instanceof FileTransferError && /ended/.test(e.message));
  });

  it("header numbers: octal and GNU base-256; pax records", () => {
    assert.equal(parseNumber(Buffer.from("0000644\0")), 0o644);
    assert.equal(parseNumber(Buffer.from("       \0")), 0);
    const big = Buffer.alloc(12);
    big[0] = 0x80;
    big.writeUIntBE(20 * 2 ** 30, 6, 6);
    assert.equal(parseNumber(big), 20 * 2 ** 30);
    assert.throws(() => parseNumber(Buffer.from("12x4\0")), FileTransferError);
    const rec = (k, v) => {
      const body = ` ${k}=${v}\n`;
      let n = Buffer.byteLength(body) + 2;
      if (String(n).length !== 2) n += 1;
      return `${n}${body}`;
    };
    assert.deepEqual(
      [...parsePax(Buffer.from(rec("path", "é/x") + rec("size", "12")))],
      [
        ["path", "é/x"],
        ["size", "12"],
      ],
    );
  });
});
