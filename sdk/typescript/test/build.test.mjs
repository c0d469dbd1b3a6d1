// client.build and the context ZIP, against a fake snapshot-imports API; the ZIP is
// checked by Python's zipfile (an independent reader that verifies every CRC).
import { after, afterEach, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import path from "node:path";

import { BuildError, FastvmClient } from "fastvm";
import { crc32, zipContext } from "../dist/esm/zip.js";

import { fakeServer, rmrf, sendJson, tempDir } from "./helpers.mjs";

const sha = (data) => createHash("sha256").update(data).digest("hex");

/** names -> sha256 of the contents of a ZIP, read and CRC-checked by Python. */
function readZip(buf, dir) {
  const p = path.join(dir, `z-${Math.random().toString(36).slice(2)}.zip`);
  fs.writeFileSync(p, buf);
  const script =
    "import json,sys,zipfile\nz=zipfile.ZipFile(sys.argv[1])\nassert z.testzip() is None\n" +
    "import hashlib\nprint(json.dumps({i.filename: hashlib.sha256(z.read(i)).hexdigest() for i in z.infolist()}))";
  return JSON.parse(execFileSync("python3", ["-c", script, p], { encoding: "utf8" }));
}

describe("build", () => {
  let srv;
  let client;
  let dir;
  let polls;
  let script; // statuses the import goes through on each GET

  before(async () => {
    dir = tempDir();
    srv = await fakeServer((rec, res) => {
      const m = `${rec.method} ${rec.path}`;
      if (m === "POST /v1/snapshot-imports/context-presign") {
        return sendJson(res, 200, { contextRef: "ctx-1", uploadUrl: "/staging/ctx?sig=1", expiresInSec: 900, maxUploadBytes: script.cap ?? 1 << 30 });
      }
      if (m === "PUT /staging/ctx") return sendJson(res, 200, undefined);
      if (m === "POST /v1/snapshot-imports") return sendJson(res, 201, { id: "imp-1", status: "pending" });
      if (m === "GET /v1/snapshot-imports/imp-1") {
        const status = script.statuses[Math.min(polls++, script.statuses.length - 1)];
        return sendJson(res, 200, { id: "imp-1", status, ...(status === "succeeded" ? { snapshotId: "snap-1" } : {}), ...(status === "failed" ? { error: "pull failed: no such image" } : {}) });
      }
      if (m === "GET /v1/snapshots/snap-1") return sendJson(res, 200, { id: "snap-1", name: "built", status: "ready" });
      return sendJson(res, 404, { error: { code: "NOT_FOUND", message: m } });
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
    polls = 0;
  });

  it("from an image: creates the import, polls it, returns the snapshot", async () => {
    script = { statuses: ["running", "running", "succeeded"] };
    polls = 0;
    const snap = await client.build({ imageRef: "python:3.13-slim", pollInterval: 0.01, name: "py" });
    assert.deepEqual(snap, { id: "snap-1", name: "built", status: "ready" });
    assert.deepEqual(srv.requests[0].json, { machineType: "c1m2", name: "py", source: { type: "image", image: "python:3.13-slim" } });
    assert.deepEqual(srv.requests.map((r) => `${r.method} ${r.path}`).slice(1), [
      ...Array(3).fill("GET /v1/snapshot-imports/imp-1"),
      "GET /v1/snapshots/snap-1",
    ]);
  });

  it("from a Dockerfile: zips the context, PUTs it, creates a dockerfile import", async () => {
    script = { statuses: ["succeeded"] };
    polls = 0;
    const ctx = path.join(dir, "ctx");
    fs.mkdirSync(path.join(ctx, "src", "pkg"), { recursive: true });
    fs.writeFileSync(path.join(ctx, "src", "pkg", "main.py"), "print('hi')\n");
    fs.writeFileSync(path.join(ctx, "requirements.txt"), "requests\n");
    fs.writeFileSync(path.join(ctx, "Dockerfile"), "FROM old\n"); // replaced
    fs.symlinkSync("requirements.txt", path.join(ctx, "req-link"));
    fs.symlinkSync("nowhere", path.join(ctx, "broken"));
    const dockerfile = "FROM python:3.13-slim\nCOPY . /app\n";
    await client.build({ dockerfile, contextDir: ctx, machineType: "c2m4", diskGiB: 20, pollInterval: 0.01 });
    const [presign, put, create] = srv.requests;
    const zip = put.body;
    assert.deepEqual(presign.json, { sizeBytes: zip.length });
    assert.equal(put.headers["content-type"], "application/zip");
    assert.equal(put.headers["content-length"], String(zip.length));
    assert.equal(put.headers.authorization, undefined);
    assert.deepEqual(readZip(zip, dir), {
      "req-link": sha("requests\n"),
      "requirements.txt": sha("requests\n"),
      "src/pkg/main.py": sha("print('hi')\n"),
      Dockerfile: sha(dockerfile),
    });
    assert.deepEqual(create.json, {
      machineType: "c2m4",
      diskGiB: 20,
      source: { type: "dockerfile", contextRef: "ctx-1", dockerfilePath: "Dockerfile" },
    });
  });

  it("a failed import is BuildError with the import's state", async () => {
    script = { statuses: ["running", "failed"] };
    polls = 0;
    const err = await client.build({ imageRef: "nope:1", pollInterval: 0.01 }).catch((e) => e);
    assert.ok(err instanceof BuildError, `${err}`);
    assert.match(err.message, /imp-1 failed: pull failed: no such image/);
    assert.equal(err.snapshotImport.status, "failed");
  });

  it("an import still running at the deadline is BuildError", async () => {
    script = { statuses: ["running"] };
    polls = 0;
    const err = await client.build({ imageRef: "slow:1", pollInterval: 0.02, timeout: 0.1 }).catch((e) => e);
    assert.ok(err instanceof BuildError);
    assert.match(err.message, /not finished after 0.1s/);
  });

  it("a context over the server's cap is refused before the upload", async () => {
    script = { statuses: ["succeeded"], cap: 10 };
    polls = 0;
    await assert.rejects(client.build({ dockerfile: "FROM x\n", pollInterval: 0.01 }), /over the server cap of 10/);
    assert.ok(!srv.requests.some((r) => r.method === "PUT"));
    script.cap = undefined;
  });

  it("needs exactly one of imageRef and dockerfile", async () => {
    await assert.rejects(client.build({}), TypeError);
    await assert.rejects(client.build({ imageRef: "a", dockerfile: "FROM a" }), TypeError);
    await assert.rejects(client.build({ imageRef: "a", contextDir: dir }), TypeError);
    await assert.rejects(client.build({ dockerfile: "FROM a", contextDir: path.join(dir, "missing") }), BuildError);
    assert.equal(srv.requests.length, 0);
  });
});

describe("zip", () => {
  it("crc32 matches the standard check value", () => {
    assert.equal(crc32(Buffer.from("123456789")), 0xcbf43926);
    assert.equal(crc32(Buffer.from("56789"), crc32(Buffer.from("1234"))), 0xcbf43926);
    assert.equal(crc32(Buffer.alloc(0)), 0);
  });

  it("a context with a large file streams through deflate and reads back", async () => {
    const dir = tempDir();
    try {
      const ctx = path.join(dir, "ctx");
      fs.mkdirSync(ctx);
      const big = Buffer.alloc(5 * 1024 * 1024, "abcdefgh");
      fs.writeFileSync(path.join(ctx, "big.txt"), big);
      const zip = await zipContext(ctx, "FROM scratch\n");
      try {
        assert.equal(fs.statSync(zip.path).size, zip.size);
        assert.ok(zip.size < big.length / 10, "deflated");
        const files = readZip(fs.readFileSync(zip.path), dir);
        assert.deepEqual(files, { "big.txt": sha(big), Dockerfile: sha("FROM scratch\n") });
      } finally {
        await zip.cleanup();
      }
      assert.ok(!fs.existsSync(zip.path), "cleanup removes the temporary file");
    } finally {
      rmrf(dir);
    }
  });
});
