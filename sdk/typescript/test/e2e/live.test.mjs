// End-to-end tests of the TypeScript SDK against a live `fastvm serve` booting real
// QEMU microVMs (see live-server.mjs). One server for the whole file: the first
// launch in a fresh data dir builds the golden snapshot, every later one restores it.
//
// Runs with `npm run test:e2e` after `npm run build` (it imports the built package).
// FASTVM_E2E=1: fails (never skips) when it cannot run.
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes, randomUUID } from "node:crypto";
import { execFileSync } from "node:child_process";
import fs from "node:fs";
import http from "node:http";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";

import {
  AuthenticationError,
  APIConnectionError,
  BadRequestError,
  ConflictError,
  FastvmClient,
  FileTransferError,
  NotFoundError,
} from "fastvm";

import { LiveServer, findBinary, unavailableReason } from "./live-server.mjs";

const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const reason = unavailableReason();
if (reason && process.env.FASTVM_E2E === "1") {
  // CI must never silently skip the end-to-end tests.
  it("the end-to-end suite can run", () => assert.fail(`${reason} [FASTVM_E2E=1: e2e tests must run]`));
}

describe("fastvm TypeScript SDK against a live server", { skip: reason && process.env.FASTVM_E2E !== "1" ? reason : false }, () => {
  if (reason) return;
  /** @type {LiveServer} */
  let server;
  /** @type {FastvmClient} */
  let client;
  /** The shared VM; tests must not change its state. */
  let vm;
  let tmp;

  before(async () => {
    server = new LiveServer(findBinary().binary);
    await server.start();
    // As a user would: the client reads FASTVM_API_KEY / FASTVM_BASE_URL.
    process.env.FASTVM_API_KEY = server.apiKey;
    process.env.FASTVM_BASE_URL = server.baseUrl;
    client = new FastvmClient();
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), "fastvm-ts-e2e-files-"));
  });

  after(async () => {
    client?.close();
    await server?.stop();
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  async function freshVm() {
    return client.vms.launch({ machineType: "c1m2", pollInterval: 0.5 });
  }

  async function cleanup(id) {
    await client.vms.delete(id).catch(() => {});
  }

  it("health and the client's env defaults", async () => {
    assert.equal(client.baseUrl, server.baseUrl);
    assert.equal(client.apiKey, server.apiKey);
    assert.deepEqual(await client.health(), { status: "ok" });
  });

  it("vms.launch waits until running and returns the VM", async () => {
    vm = await client.vms.launch({ machineType: "c1m2", name: "dev", pollInterval: 0.5 });
    assert.equal(vm.status, "running");
    assert.equal(vm.name, "dev");
    assert.equal(vm.machineName, "c1m2");
    assert.match(vm.id, /^[0-9a-f-]{36}$/);
    assert.ok(vm.memoryMiB > 0 && vm.cpu > 0 && vm.diskGiB > 0);
    assert.ok(server.qemuPids()[vm.id], "the VM has a live QEMU process");
    const listed = await client.vms.list();
    assert.ok(listed.some((v) => v.id === vm.id));
    assert.ok((await client.vms.list({ status: "running" })).some((v) => v.id === vm.id));
    assert.deepEqual(await client.vms.list({ status: "paused" }), []);
    assert.equal((await client.vms.retrieve(vm.id)).id, vm.id);
  });

  it("vms.run: a string runs under sh -c, an array is the argv", async () => {
    const r = await client.vms.run(vm.id, { command: "echo $((6 * 7)); echo oops >&2; exit 3" });
    assert.equal(r.exitCode, 3);
    assert.equal(r.stdout, "42\n");
    assert.equal(r.stderr, "oops\n");
    assert.equal(r.timedOut, false);
    const argv = await client.vms.run(vm.id, { command: ["printf", "%s|", "a b", "$HOME"] });
    assert.equal(argv.stdout, "a b|$HOME|");
    const timed = await client.vms.run(vm.id, { command: "sleep 30", timeoutSec: 1 });
    assert.equal(timed.timedOut, true);
  });

  it("vms.stream yields stdout, stderr and exit events incrementally", async () => {
    const events = [];
    const started = performance.now();
    let firstAt;
    for await (const ev of client.vms.stream(vm.id, {
      command: "echo first; sleep 2; printf '\\000\\377' ; echo err >&2; exit 7",
    })) {
      if (firstAt === undefined) firstAt = performance.now() - started;
      events.push(ev);
    }
    const out = Buffer.concat(events.filter((e) => e.type === "o").map((e) => e.data));
    const err = Buffer.concat(events.filter((e) => e.type === "e").map((e) => e.data));
    assert.deepEqual(out, Buffer.concat([Buffer.from("first\n"), Buffer.from([0x00, 0xff])]));
    assert.equal(err.toString(), "err\n");
    const exit = events.at(-1);
    assert.equal(exit.type, "x");
    assert.equal(exit.exitCode, 7);
    assert.equal(exit.timedOut, false);
    assert.ok(exit.durationMs >= 2000, `durationMs ${exit.durationMs}`);
    const total = performance.now() - started;
    assert.ok(firstAt < total - 1000, `first event at ${firstAt} ms of ${total} ms: not incremental`);
  });

  it("vms.stream: leaving the loop early ends the request; the VM keeps working", async () => {
    for await (const ev of client.vms.stream(vm.id, { command: ["sh", "-c", "while true; do echo tick; sleep 0.2; done"], timeoutSec: 30 })) {
      assert.equal(ev.type, "o");
      break;
    }
    assert.equal((await client.vms.run(vm.id, { command: "echo still-here" })).stdout, "still-here\n");
  });

  it("long operations outlast the client's default timeout", async () => {
    const impatient = new FastvmClient({ timeout: 2 });
    try {
      const r = await impatient.vms.run(vm.id, { command: "sleep 4; echo done" });
      assert.equal(r.stdout, "done\n");
      const events = [];
      for await (const ev of impatient.vms.stream(vm.id, { command: "sleep 4; echo streamed" })) events.push(ev);
      assert.equal(Buffer.concat(events.filter((e) => e.type === "o").map((e) => e.data)).toString(), "streamed\n");
    } finally {
      impatient.close();
    }
  });

  it("launch({ wait: false }) returns at once; waitForVmReady waits", async () => {
    const raw = await client.vms.launch({ machineType: "c1m2", wait: false });
    try {
      assert.ok(["provisioning", "running"].includes(raw.status), raw.status);
      const ready = await client.waitForVmReady(raw.id, { pollInterval: 0.5, timeout: 240 });
      assert.equal(ready.status, "running");
      assert.equal(ready.id, raw.id);
    } finally {
      await cleanup(raw.id);
    }
  });

  it("typed errors carry the server's status, code and message", async () => {
    await assert.rejects(client.vms.retrieve(randomUUID()), (e) => e instanceof NotFoundError && e.status === 404 && !!e.code);
    await assert.rejects(
      client.vms.launch({ machineType: "no-such-type" }),
      (e) => e instanceof BadRequestError && e.status === 400 && /machine/i.test(e.message),
    );
    const bad = new FastvmClient({ apiKey: "fvm_not_a_key" });
    await assert.rejects(bad.vms.list(), (e) => e instanceof AuthenticationError && e.status === 401);
    bad.close();
    const nowhere = new FastvmClient({ baseUrl: "http://127.0.0.1:9", maxRetries: 1 });
    nowhere.retryBaseDelay = 0.01;
    await assert.rejects(nowhere.health(), (e) => e instanceof APIConnectionError);
    nowhere.close();
  });

  it("update, TTL refresh and delete", async () => {
    const v = await freshVm();
    try {
      const updated = await client.vms.update(v.id, { name: "renamed", metadata: { team: "sdk" }, ttl: { seconds: 3600, action: "pause" } });
      assert.equal(updated.name, "renamed");
      assert.deepEqual(updated.metadata, { team: "sdk" });
      assert.deepEqual(updated.ttl, { seconds: 3600, action: "pause" });
      assert.ok(updated.expiresAtMs > Date.now());
      const refreshed = await client.vms.refreshTtl(v.id);
      assert.ok(refreshed.expiresAtMs >= updated.expiresAtMs);
      const cleared = await client.vms.update(v.id, { ttl: null });
      assert.equal(cleared.ttl ?? null, null);
      assert.equal(cleared.name, "renamed");
      const token = await client.vms.consoleToken(v.id);
      assert.ok(token.token && token.websocketPath);
      const deleted = await client.vms.delete(v.id);
      assert.deepEqual(deleted, { id: v.id, deleted: true });
      await assert.rejects(client.vms.retrieve(v.id), NotFoundError);
      const deadline = Date.now() + 10_000;
      while (server.qemuPids()[v.id] && Date.now() < deadline) await sleep(100);
      assert.equal(server.qemuPids()[v.id], undefined, "the deleted VM's QEMU is gone");
    } finally {
      await cleanup(v.id);
    }
  });

  it("pause and resume keep the VM's memory", async () => {
    const v = await freshVm();
    try {
      assert.equal((await client.vms.run(v.id, { command: "echo kept > /dev/shm/state" })).exitCode, 0);
      const paused = await client.vms.pause(v.id);
      assert.equal(paused.status, "paused");
      assert.ok(paused.pausedAt);
      await assert.rejects(client.vms.run(v.id, { command: "true" }), (e) => e instanceof ConflictError && e.status === 409);
      const resumed = await client.vms.resume(v.id);
      assert.equal(resumed.status, "running");
      assert.equal((await client.vms.run(v.id, { command: "cat /dev/shm/state" })).stdout, "kept\n");
      await assert.rejects(client.vms.resume(v.id), ConflictError);
    } finally {
      await cleanup(v.id);
    }
  });

  const RESOLVE = (name) =>
    `python3 -c "import socket\ntry:\n socket.getaddrinfo('${name}', 80)\n print('resolved')\nexcept socket.gaierror as e:\n print('nxdomain' if e.errno == socket.EAI_NONAME else 'failed')"`;

  it("setFirewall replaces the policy, patchFirewall one block; the guest's resolver enforces them", async () => {
    const v = await freshVm();
    try {
      let got = await client.vms.setFirewall(v.id, {
        ingress: { defaultAction: "deny", rules: [{ kind: "cidr", value: "::/0", protocol: "tcp", ports: "8080", action: "allow" }] },
        egress: { defaultAction: "allow", rules: [] },
        dns: { mode: "allow", domains: ["*.allowed.example"] },
      });
      assert.equal(got.firewall.dns.mode, "allow");
      assert.deepEqual(got.firewall.dns.domains, ["*.allowed.example"]);
      assert.equal(got.firewall.ingress.rules[0].ports, "8080");
      assert.equal((await client.vms.run(v.id, { command: RESOLVE("other.example") })).stdout.trim(), "nxdomain");
      got = await client.vms.patchFirewall(v.id, { dns: { mode: "deny", domains: [] } });
      assert.equal(got.firewall.dns.mode, "deny");
      assert.equal(got.firewall.ingress.rules[0].ports, "8080", "the block not given is kept");
      // Forwarded upstream now (nothing answers there in tests): failed, not NXDOMAIN.
      assert.equal((await client.vms.run(v.id, { command: RESOLVE("other.example") })).stdout.trim(), "failed");
      assert.deepEqual((await client.vms.retrieve(v.id)).firewall, got.firewall);
      await assert.rejects(
        client.vms.patchFirewall(v.id, { ingress: { defaultAction: "deny", rules: [{ kind: "cidr", value: "not-a-cidr", protocol: "tcp", ports: "80", action: "allow" }] } }),
        BadRequestError,
      );
    } finally {
      await cleanup(v.id);
    }
  });

  it("snapshots: create, list, rename, restore with launch({ snapshotId }), delete", async () => {
    const v = await freshVm();
    try {
      assert.equal((await client.vms.run(v.id, { command: "echo from-snapshot > /root/marker && sync" })).exitCode, 0);
      let snap = await client.snapshots.create({ vmId: v.id, name: "ts-snap" });
      assert.equal(snap.vmId, v.id);
      assert.equal(snap.name, "ts-snap");
      const deadline = Date.now() + 180_000;
      while (snap.status === "creating" && Date.now() < deadline) {
        await sleep(500);
        snap = await client.snapshots.retrieve(snap.id);
      }
      assert.equal(snap.status, "ready");
      assert.ok((await client.snapshots.list()).some((s) => s.id === snap.id));
      assert.equal((await client.snapshots.update(snap.id, { name: "ts-renamed" })).name, "ts-renamed");
      const restored = await client.vms.launch({ snapshotId: snap.id, pollInterval: 0.5 });
      try {
        assert.equal(restored.status, "running");
        assert.notEqual(restored.id, v.id);
        const r = await client.vms.run(restored.id, { command: "cat /root/marker" });
        assert.equal(r.stdout, "from-snapshot\n");
      } finally {
        await cleanup(restored.id);
      }
      assert.deepEqual(await client.snapshots.delete(snap.id), { id: snap.id, deleted: true });
      await assert.rejects(client.snapshots.retrieve(snap.id), NotFoundError);
    } finally {
      await cleanup(v.id);
    }
  });

  it("services: register, reach through the proxy, update, delete", async () => {
    const v = await freshVm();
    try {
      const web =
        "import http.server,socket,sys\n" +
        "class H(http.server.BaseHTTPRequestHandler):\n" +
        "    protocol_version='HTTP/1.1'\n" +
        "    def do_GET(self):\n" +
        "        b=b'hi from port '+sys.argv[1].encode()+b' at '+self.path.encode()\n" +
        "        self.send_response(200); self.send_header('Content-Length',str(len(b))); self.end_headers(); self.wfile.write(b)\n" +
        "    def log_message(self,*a): pass\n" +
        "class S(http.server.ThreadingHTTPServer):\n" +
        "    address_family=socket.AF_INET6\n" +
        "S(('::',int(sys.argv[1])),H).serve_forever()\n";
      const b64 = Buffer.from(web).toString("base64");
      for (const port of [8080, 9090]) {
        const r = await client.vms.run(v.id, {
          command:
            `echo ${b64} | base64 -d > /root/web.py && (setsid python3 /root/web.py ${port} </dev/null >/tmp/web${port}.log 2>&1 &); ` +
            `for i in $(seq 150); do python3 -c 'import socket; socket.create_connection(("::1", ${port}), 1)' 2>/dev/null && exit 0; sleep 0.1; done; cat /tmp/web${port}.log; exit 1`,
          timeoutSec: 60,
        });
        assert.equal(r.exitCode, 0, r.stdout + r.stderr);
      }
      const svc = await client.vms.services.register(v.id, { name: "web", port: 8080 });
      assert.equal(svc.name, "web");
      assert.equal(svc.port, 8080);
      assert.equal(svc.h2c, false);
      const host = `web--${v.id.replaceAll("-", "")}.proxy.localhost`;
      assert.equal(svc.url, `http://${host}:${server.proxyPort}/`);
      assert.deepEqual((await client.vms.services.list(v.id)).map((s) => s.name), ["web"]);
      assert.equal(await proxyGet(host, "/hello"), "hi from port 8080 at /hello");
      const moved = await client.vms.services.update(v.id, "web", { port: 9090 });
      assert.equal(moved.port, 9090);
      assert.equal(await proxyGet(host, "/x"), "hi from port 9090 at /x");
      await client.vms.services.delete(v.id, "web");
      assert.deepEqual(await client.vms.services.list(v.id), []);
      await assert.rejects(client.vms.services.delete(v.id, "web"), NotFoundError);
    } finally {
      await cleanup(v.id);
    }
  });

  function proxyGet(host, urlPath) {
    return new Promise((resolve, reject) => {
      const req = http.get({ host: "127.0.0.1", port: server.proxyPort, path: urlPath, headers: { host } }, (res) => {
        const chunks = [];
        res.on("data", (c) => chunks.push(c));
        res.on("end", () =>
          res.statusCode === 200 ? resolve(Buffer.concat(chunks).toString()) : reject(new Error(`proxy answered ${res.statusCode}`)),
        );
      });
      req.on("error", reject);
      req.setTimeout(30_000, () => req.destroy(new Error("proxy timeout")));
    });
  }

  function digest(file) {
    return createHash("sha256").update(fs.readFileSync(file)).digest("hex");
  }

  /** Every entry under root: kind, mode bits, link target or content digest. */
  function treeOf(root) {
    const out = {};
    const walk = (rel) => {
      for (const name of fs.readdirSync(path.join(root, rel)).sort()) {
        const r = rel ? `${rel}/${name}` : name;
        const st = fs.lstatSync(path.join(root, r));
        if (st.isSymbolicLink()) out[r] = ["link", fs.readlinkSync(path.join(root, r))];
        else if (st.isDirectory()) {
          out[r] = ["dir", st.mode & 0o777];
          walk(r);
        } else out[r] = ["file", st.mode & 0o777, st.size, digest(path.join(root, r))];
      }
    };
    walk("");
    return out;
  }

  it("upload and download of a file, byte for byte", async () => {
    const src = path.join(tmp, "payload.bin");
    fs.writeFileSync(src, Buffer.concat([randomBytes(3 << 20), Buffer.from("tail")]));
    await client.upload(vm.id, src, "/root/payload.bin");
    const r = await client.vms.run(vm.id, { command: "sha256sum /root/payload.bin" });
    assert.equal(r.stdout.split(" ")[0], digest(src));
    const back = path.join(tmp, "back", "nested", "payload.bin");
    await client.download(vm.id, "/root/payload.bin", back);
    assert.equal(digest(back), digest(src));
  });

  it("upload and download of a directory: contents, modes, symlinks, empty dirs, long names", async () => {
    const src = path.join(tmp, "tree");
    const long = "n".repeat(120);
    fs.mkdirSync(path.join(src, "sub", "deeper"), { recursive: true });
    fs.mkdirSync(path.join(src, "empty"));
    fs.mkdirSync(path.join(src, "d".repeat(90), "e".repeat(90)), { recursive: true });
    fs.writeFileSync(path.join(src, "sub", "a.txt"), "alpha\n");
    fs.writeFileSync(path.join(src, "sub", "deeper", "b.bin"), randomBytes(70_000));
    fs.writeFileSync(path.join(src, "exec.sh"), "#!/bin/sh\necho hi\n", { mode: 0o751 });
    fs.chmodSync(path.join(src, "exec.sh"), 0o751);
    fs.writeFileSync(path.join(src, "private"), "secret");
    fs.chmodSync(path.join(src, "private"), 0o600);
    fs.writeFileSync(path.join(src, "d".repeat(90), "e".repeat(90), long), "deep and long\n");
    fs.writeFileSync(path.join(src, "ünïcødé name.txt"), "utf-8\n");
    fs.symlinkSync("sub/a.txt", path.join(src, "link-rel"));
    fs.symlinkSync("sub", path.join(src, "link-dir"));
    fs.symlinkSync("does-not-exist", path.join(src, "dangling"));
    await client.upload(vm.id, src, "/root/tree");
    const inVm = await client.vms.run(vm.id, {
      command: `cat /root/tree/sub/a.txt /root/tree/link-rel /root/tree/${"d".repeat(90)}/${"e".repeat(90)}/${long}; stat -c %a /root/tree/exec.sh; readlink /root/tree/link-dir; ls /root/tree/empty | wc -l`,
    });
    assert.equal(inVm.stdout, "alpha\nalpha\ndeep and long\n751\nsub\n0\n", inVm.stderr);
    const back = path.join(tmp, "tree-back");
    await client.download(vm.id, "/root/tree", back);
    assert.deepEqual(treeOf(back), treeOf(src));
  });

  it("a missing path is FileTransferError with code ENOENT, both ways", async () => {
    await assert.rejects(
      client.download(vm.id, "/root/no-such-thing", path.join(tmp, "nothing")),
      (e) => e instanceof FileTransferError && e.code === "ENOENT",
    );
    await assert.rejects(
      client.upload(vm.id, path.join(tmp, "no-such-local"), "/root/x"),
      (e) => e instanceof FileTransferError && e.code === "ENOENT",
    );
  });

  it("quotas.retrieve reports the org's usage", async () => {
    const q = await client.quotas.retrieve();
    assert.ok(q.orgId);
    assert.ok(q.usage.vcpu >= vm.cpu, JSON.stringify(q));
  });

  it("the CommonJS build works against the live server", () => {
    const script =
      "const { FastvmClient } = require('fastvm');" +
      "const c = new FastvmClient();" +
      "c.vms.run(process.argv[1], { command: 'echo cjs' }).then((r) => { process.stdout.write(r.stdout); c.close(); })" +
      ".catch((e) => { console.error(e); process.exit(1); });";
    const out = execFileSync(process.execPath, ["-e", script, vm.id], { encoding: "utf8", cwd: PACKAGE_DIR });
    assert.equal(out, "cjs\n");
  });
});
