// client.upload / client.download against a fake server that plays the API and the
// staging store: the request sequence, exact Content-Lengths, the VM-side
// commands, error mapping, and extraction of what the "VM" exports.
import { after, afterEach, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { FastvmClient, FileTransferError, NotFoundError, UnsafeArchiveError } from "fastvm";
import { extractCommand, shellQuote } from "../dist/esm/transfer.js";

import { fakeServer, rmrf, sendJson, tempDir } from "./helpers.mjs";

const EXEC_OK = { exitCode: 0, stdout: "", stderr: "", timedOut: false, stdoutTruncated: false, stderrTruncated: false, durationMs: 1 };

describe("upload and download", () => {
  let srv;
  let client;
  let dir;
  /** staging object n -> bytes */
  const store = new Map();
  let next = 0;
  /** What the fake VM answers. */
  let vm;

  before(async () => {
    dir = tempDir();
    srv = await fakeServer((rec, res) => {
      const m = `${rec.method} ${rec.path}`;
      if (m === "POST /v1/vms/vm1/files/presign") {
        const n = next++;
        return sendJson(res, 200, { uploadUrl: `/staging/${n}?sig=up`, downloadUrl: `/staging/${n}?sig=down`, expiresInSec: 900, maxUploadBytes: 1 << 30 });
      }
      if (rec.method === "PUT" && rec.path.startsWith("/staging/")) {
        store.set(rec.path, rec.body);
        return sendJson(res, 200, undefined);
      }
      if (rec.method === "GET" && rec.path.startsWith("/staging/")) {
        const data = store.get(rec.path);
        if (!data) return sendJson(res, 404, { error: { code: "NOT_FOUND", message: "no object" } });
        res.writeHead(200, { "Content-Type": "application/octet-stream", "Content-Length": data.length });
        // In pieces, as a real stream arrives.
        for (let i = 0; i < data.length; i += 1000) res.write(data.subarray(i, i + 1000));
        return res.end();
      }
      if (m === "POST /v1/vms/vm1/files/fetch") return sendJson(res, 200, vm.fetch ?? EXEC_OK);
      if (m === "POST /v1/vms/vm1/exec") return sendJson(res, 200, vm.exec ?? EXEC_OK);
      if (m === "POST /v1/vms/vm1/files/export") {
        if (vm.exportError) return sendJson(res, 404, vm.exportError);
        store.set(new URL(rec.json.url, "http://x").pathname, vm.exported);
        return sendJson(res, 200, { kind: vm.kind, sizeBytes: vm.exported.length });
      }
      return sendJson(res, 404, { error: { code: "NOT_FOUND", message: `no route ${m}` } });
    });
    client = new FastvmClient({ apiKey: "k", baseUrl: srv.url });
  });
  after(async () => {
    client.close();
    await srv.close();
    rmrf(dir);
  });
  afterEach(() => {
    srv.requests.length = 0;
    vm = {};
  });

  it("a file: presign -> PUT (exact length, no key) -> fetch", async () => {
    vm = {};
    const src = path.join(dir, "payload.bin");
    const data = randomBytes(2_500_000);
    fs.writeFileSync(src, data);
    await client.upload("vm1", src, "/root/payload.bin");
    const [presign, put, fetch] = srv.requests;
    assert.deepEqual([presign.method, presign.path, presign.json], ["POST", "/v1/vms/vm1/files/presign", { path: "/root/payload.bin" }]);
    assert.equal(put.method, "PUT");
    assert.equal(put.url, "/staging/0?sig=up");
    assert.equal(put.headers["content-length"], String(data.length));
    assert.equal(put.headers["content-type"], "application/octet-stream");
    assert.equal(put.headers.authorization, undefined, "signed URLs get no API key");
    assert.ok(put.body.equals(data));
    assert.deepEqual([fetch.path, fetch.json], ["/v1/vms/vm1/files/fetch", { url: "/staging/0?sig=down", path: "/root/payload.bin", timeoutSec: 600 }]);
    assert.equal(srv.requests.length, 3);
  });

  it("a directory: a sized tar to a temp path, fetched, extracted by a quoted command", async () => {
    vm = {};
    const src = path.join(dir, "tree");
    fs.mkdirSync(path.join(src, "sub"), { recursive: true });
    fs.writeFileSync(path.join(src, "sub", "a.txt"), "alpha\n");
    fs.symlinkSync("sub/a.txt", path.join(src, "link"));
    const dest = "/root/my dir/it's here";
    await client.upload("vm1", src, dest, { fetchTimeoutSec: 30, execTimeoutSec: 40 });
    const [presign, put, fetch, exec] = srv.requests;
    const tmp = presign.json.path;
    assert.match(tmp, /^\/var\/tmp\/\.fastvm-upload-[0-9a-f]{32}\.tar$/);
    assert.equal(put.headers["content-length"], String(put.body.length));
    const listed = execFileSync("tar", ["-tvf", "-"], { input: put.body, encoding: "utf8" });
    assert.match(listed, /\.\/sub\/a\.txt/);
    assert.match(listed, /\.\/link -> sub\/a\.txt/);
    assert.deepEqual(fetch.json, { url: `${put.path}?sig=down`, path: tmp, timeoutSec: 30 });
    assert.deepEqual(exec.json, { command: ["sh", "-c", extractCommand(tmp, dest)], timeoutSec: 40 });
    // The command really extracts into the quoted destination (run here with sh).
    const box = path.join(dir, "box");
    fs.mkdirSync(box);
    fs.writeFileSync(path.join(box, "t.tar"), put.body);
    execFileSync("sh", ["-c", extractCommand(path.join(box, "t.tar"), path.join(box, "my dir", "it's here"))]);
    assert.equal(fs.readFileSync(path.join(box, "my dir", "it's here", "sub", "a.txt"), "utf8"), "alpha\n");
    assert.ok(!fs.existsSync(path.join(box, "t.tar")), "the temp tar is removed");
  });

  it("a failed fetch in the VM is FileTransferError with its exit code and stderr; nothing is extracted", async () => {
    vm = { fetch: { ...EXEC_OK, exitCode: 22, stderr: "curl: (22) 403\n" } };
    const src = path.join(dir, "d2");
    fs.mkdirSync(src);
    const err = await client.upload("vm1", src, "/root/d2").catch((e) => e);
    assert.ok(err instanceof FileTransferError, `${err}`);
    assert.equal(err.exitCode, 22);
    assert.match(err.message, /fetch failed in the VM \(exit 22\): curl: \(22\) 403/);
    assert.ok(!srv.requests.some((r) => r.path.endsWith("/exec")));
    vm = { exec: { ...EXEC_OK, exitCode: 0, timedOut: true } };
    await assert.rejects(client.upload("vm1", src, "/root/d2"), /extract timed out in the VM/);
  });

  it("a missing local path is FileTransferError ENOENT before any request", async () => {
    const err = await client.upload("vm1", path.join(dir, "nope"), "/root/x").catch((e) => e);
    assert.ok(err instanceof FileTransferError);
    assert.equal(err.code, "ENOENT");
    assert.equal(srv.requests.length, 0);
  });

  it("download of a file: presign -> export(uploadUrl) -> GET downloadUrl into the file", async () => {
    const data = randomBytes(100_000);
    vm = { kind: "file", exported: data };
    const local = path.join(dir, "dl", "deep", "out.bin");
    await client.download("vm1", "/root/out.bin", local, { execTimeoutSec: 77 });
    const [presign, exp, get] = srv.requests;
    assert.deepEqual(presign.json, { path: "/root/out.bin" });
    assert.deepEqual(exp.json, { path: "/root/out.bin", url: `${get.path}?sig=up`, timeoutSec: 77 });
    assert.equal(get.url, `${get.path}?sig=down`);
    assert.equal(get.method, "GET");
    assert.equal(get.headers.authorization, undefined);
    assert.ok(fs.readFileSync(local).equals(data));
  });

  it("download of a directory extracts the VM's tar", async () => {
    const tree = path.join(dir, "vmtree");
    fs.mkdirSync(path.join(tree, "a", "b"), { recursive: true });
    fs.writeFileSync(path.join(tree, "a", "b", "c.txt"), "see\n");
    fs.symlinkSync("a/b/c.txt", path.join(tree, "ln"));
    vm = { kind: "directory", exported: execFileSync("tar", ["-C", tree, "-cf", "-", "."]) };
    const local = path.join(dir, "dl-tree");
    await client.download("vm1", "/root/tree", local);
    assert.equal(fs.readFileSync(path.join(local, "a", "b", "c.txt"), "utf8"), "see\n");
    assert.equal(fs.readlinkSync(path.join(local, "ln")), "a/b/c.txt");
  });

  it("a hostile tar from the VM is refused", async () => {
    const script = "import io,sys,tarfile\nt=tarfile.open(fileobj=sys.stdout.buffer,mode='w|')\ni=tarfile.TarInfo('../escape');i.size=1\nt.addfile(i,io.BytesIO(b'x'))\nt.close()";
    vm = { kind: "directory", exported: execFileSync("python3", ["-c", script]) };
    const local = path.join(dir, "hostile", "dest");
    await assert.rejects(client.download("vm1", "/root/tree", local), UnsafeArchiveError);
    assert.ok(!fs.existsSync(path.join(dir, "hostile", "escape")));
  });

  it("a missing remote path is FileTransferError ENOENT; other 404s stay NotFoundError", async () => {
    vm = { exportError: { error: { code: "FILE_NOT_FOUND", message: "no such path" } } };
    const err = await client.download("vm1", "/root/none", path.join(dir, "x")).catch((e) => e);
    assert.ok(err instanceof FileTransferError && !(err instanceof UnsafeArchiveError), `${err}`);
    assert.equal(err.code, "ENOENT");
    assert.equal(err.path, "/root/none");
    vm = { exportError: { error: { code: "NOT_FOUND", message: "no such VM" } } };
    await assert.rejects(client.download("vm1", "/root/none", path.join(dir, "x")), NotFoundError);
  });

  it("a body producer that fails aborts the PUT with the producer's own error", async () => {
    let closed = false;
    async function* body() {
      try {
        yield Buffer.alloc(64 * 1024, 1);
        throw new FileTransferError("the directory changed during the upload");
      } finally {
        closed = true;
      }
    }
    const err = await client._putSigned("/staging/broken?sig=up", body, "application/octet-stream", 10 * 1024 * 1024).catch((e) => e);
    assert.ok(err instanceof FileTransferError, `${err}`);
    assert.match(err.message, /changed during the upload/);
    assert.ok(closed);
    assert.ok(!store.has("/staging/broken"), "no complete object was stored");
  });

  it("shellQuote quotes like shlex.quote", () => {
    assert.equal(shellQuote("/root/plain-path_1.tar"), "/root/plain-path_1.tar");
    assert.equal(shellQuote(""), "''");
    assert.equal(shellQuote("a b"), "'a b'");
    assert.equal(shellQuote("it's"), `'it'"'"'s'`);
    assert.equal(execFileSync("sh", ["-c", `printf %s ${shellQuote("$(x) `y` it's")}`], { encoding: "utf8" }), "$(x) `y` it's");
  });
});
