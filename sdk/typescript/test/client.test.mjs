// FastvmClient against a local fake server: configuration, request shapes, error
// mapping, the retry policy, timeouts, launch / waitForVmReady polling.
import { after, afterEach, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import net from "node:net";
import { setTimeout as sleep } from "node:timers/promises";

import * as fastvm from "fastvm";
import {
  APIConnectionError,
  APIStatusError,
  APITimeoutError,
  AuthenticationError,
  BadRequestError,
  ConflictError,
  FastvmClient,
  InternalServerError,
  NotFoundError,
  PayloadTooLargeError,
  PermissionDeniedError,
  RateLimitError,
  UnprocessableEntityError,
  VMLaunchError,
  VMNotReadyError,
} from "fastvm";

import { fakeServer, sendJson, vmBody } from "./helpers.mjs";

function withEnv(vars, fn) {
  const saved = {};
  for (const k of Object.keys(vars)) {
    saved[k] = process.env[k];
    if (vars[k] === undefined) delete process.env[k];
    else process.env[k] = vars[k];
  }
  try {
    return fn();
  } finally {
    for (const [k, v] of Object.entries(saved)) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
  }
}

describe("configuration", () => {
  it("defaults to the Python SDK's local server and no key", () => {
    withEnv({ FASTVM_API_KEY: undefined, FASTVM_BASE_URL: undefined }, () => {
      const c = new FastvmClient();
      assert.equal(c.baseUrl, "http://127.0.0.1:8080");
      assert.equal(fastvm.DEFAULT_BASE_URL, "http://127.0.0.1:8080");
      assert.equal(c.apiKey, undefined);
      assert.equal(c.maxRetries, 2);
      assert.deepEqual(c.timeouts, { connect: 60, read: 60 });
    });
  });

  it("reads FASTVM_API_KEY and FASTVM_BASE_URL; options win", () => {
    withEnv({ FASTVM_API_KEY: "env-key", FASTVM_BASE_URL: "http://env.example:1/" }, () => {
      const c = new FastvmClient();
      assert.equal(c.apiKey, "env-key");
      assert.equal(c.baseUrl, "http://env.example:1");
      const o = new FastvmClient({ apiKey: "opt-key", baseUrl: "http://opt.example:2//", timeout: null, maxRetries: 5 });
      assert.equal(o.apiKey, "opt-key");
      assert.equal(o.baseUrl, "http://opt.example:2");
      assert.equal(o.timeouts, null);
      assert.equal(o.maxRetries, 5);
    });
  });
});

describe("requests against a fake server", () => {
  let srv;
  let client;
  let answer;

  before(async () => {
    srv = await fakeServer((rec, res) => answer(rec, res));
  });
  after(() => srv.close());
  afterEach(() => {
    client?.close();
    srv.requests.length = 0;
  });

  function make(opts = {}) {
    client = new FastvmClient({ apiKey: "k-123", baseUrl: srv.url, ...opts });
    client.retryBaseDelay = 0.001;
    return client;
  }

  it("sends the key, JSON and a user agent; decodes the answer", async () => {
    answer = (rec, res) => sendJson(res, 200, [vmBody()]);
    const vms = await make().vms.list({ status: "running" });
    assert.equal(vms[0].memoryMiB, 2048);
    const [rec] = srv.requests;
    assert.equal(rec.method, "GET");
    assert.equal(rec.path, "/v1/vms");
    assert.deepEqual(rec.query, { status: "running" });
    assert.equal(rec.headers.authorization, "Bearer k-123");
    assert.equal(rec.headers.accept, "application/json");
    assert.match(rec.headers["user-agent"], /^fastvm-typescript\/\d+\.\d+\.\d+$/);
  });

  it("omits Authorization without a key", async () => {
    answer = (rec, res) => sendJson(res, 200, { status: "ok" });
    await withEnv({ FASTVM_API_KEY: undefined }, () => make({ apiKey: undefined }).health());
    assert.equal(srv.requests[0].headers.authorization, undefined);
  });

  it("URL-encodes path segments (an SSH key fingerprint)", async () => {
    answer = (rec, res) => sendJson(res, 200, { id: "x", deleted: true });
    await make().me.sshKeys.delete("SHA256:a+b/c=");
    assert.equal(srv.requests[0].rawPath, "/v1/me/ssh-keys/SHA256%3Aa%2Bb%2Fc%3D");
  });

  it("update sends only the fields given; ttl: null clears", async () => {
    answer = (rec, res) => sendJson(res, 200, vmBody());
    await make().vms.update("vm1", { name: "n" });
    await client.vms.update("vm1", { ttl: null });
    await client.vms.update("vm1", { metadata: { a: "b" }, ttl: { seconds: 60, action: "delete" } });
    assert.deepEqual(srv.requests.map((r) => [r.method, r.path, r.json]), [
      ["PATCH", "/v1/vms/vm1", { name: "n" }],
      ["PATCH", "/v1/vms/vm1", { ttl: null }],
      ["PATCH", "/v1/vms/vm1", { metadata: { a: "b" }, ttl: { seconds: 60, action: "delete" } }],
    ]);
  });

  it("run wraps a string in sh -c and passes an argv through", async () => {
    answer = (rec, res) => sendJson(res, 200, { exitCode: 0, stdout: "", stderr: "", timedOut: false, stdoutTruncated: false, stderrTruncated: false, durationMs: 1 });
    await make().vms.run("vm1", { command: "ls -la | wc -l" });
    await client.vms.run("vm1", { command: ["python3", "main.py", "--flag"], timeoutSec: 5, cwd: "/root", env: { A: "1" } });
    assert.deepEqual(srv.requests[0].json, { command: ["sh", "-c", "ls -la | wc -l"] });
    assert.deepEqual(srv.requests[1].json, { command: ["python3", "main.py", "--flag"], timeoutSec: 5, cwd: "/root", env: { A: "1" } });
    await assert.rejects(client.vms.run("vm1", { command: [] }), TypeError);
    await assert.rejects(client.vms.run("vm1", { command: ["ok", 3] }), TypeError);
    await assert.rejects(client.vms.run("vm1", { command: "true", timeoutSec: "5" }), /timeoutSec must be a number/);
    await assert.rejects(client.vms.files.fetch("vm1", { url: "/u", path: "/p", timeoutSec: NaN }), TypeError);
    assert.equal(srv.requests.length, 2, "nothing sent for bad arguments");
  });

  it("firewall, services, files, snapshots: methods, paths and bodies", async () => {
    answer = (rec, res) => (rec.method === "DELETE" && rec.path.includes("/services/") ? (res.writeHead(204), res.end()) : sendJson(res, 200, {}));
    const c = make();
    await c.vms.setFirewall("v", { ingress: { defaultAction: "deny", rules: [] } });
    await c.vms.patchFirewall("v", { dns: { mode: "allow", domains: ["a.example"] } });
    await c.vms.services.register("v", { name: "web", port: 8080 });
    await c.vms.services.update("v", "web", { port: 9090, h2c: true });
    assert.equal(await c.vms.services.delete("v", "web"), undefined);
    await c.vms.files.presign("v", { path: "/root/f" });
    await c.vms.files.fetch("v", { url: "/u", path: "/root/f" });
    await c.vms.files.export("v", { path: "/root/f", url: "/u", timeoutSec: 9 });
    await c.snapshots.create({ vmId: "v" });
    await c.snapshots.update("s", { name: "n" });
    await c.vms.refreshTtl("v");
    await c.vms.consoleToken("v");
    await c.quotas.retrieve();
    assert.deepEqual(srv.requests.map((r) => [r.method, r.path, r.json]), [
      ["PUT", "/v1/vms/v/firewall", { ingress: { defaultAction: "deny", rules: [] } }],
      ["PATCH", "/v1/vms/v/firewall", { dns: { mode: "allow", domains: ["a.example"] } }],
      ["POST", "/v1/vms/v/services", { name: "web", port: 8080, h2c: false }],
      ["PUT", "/v1/vms/v/services/web", { port: 9090, h2c: true }],
      ["DELETE", "/v1/vms/v/services/web", undefined],
      ["POST", "/v1/vms/v/files/presign", { path: "/root/f" }],
      ["POST", "/v1/vms/v/files/fetch", { url: "/u", path: "/root/f" }],
      ["POST", "/v1/vms/v/files/export", { path: "/root/f", url: "/u", timeoutSec: 9 }],
      ["POST", "/v1/snapshots", { vmId: "v" }],
      ["PATCH", "/v1/snapshots/s", { name: "n" }],
      ["POST", "/v1/vms/v/ttl/refresh", undefined],
      ["POST", "/v1/vms/v/console-token", undefined],
      ["GET", "/v1/org/quotas", undefined],
    ]);
  });

  const statuses = [
    [400, BadRequestError],
    [401, AuthenticationError],
    [403, PermissionDeniedError],
    [404, NotFoundError],
    [409, ConflictError],
    [413, PayloadTooLargeError],
    [422, UnprocessableEntityError],
    [429, RateLimitError],
    [500, InternalServerError],
    [503, InternalServerError],
    [418, APIStatusError],
  ];
  for (const [status, Cls] of statuses) {
    it(`maps HTTP ${status} to ${Cls.name} with the server's code and message`, async () => {
      answer = (rec, res) => sendJson(res, status, { error: { code: "SOME_CODE", message: "what to fix" } });
      const err = await make({ maxRetries: 0 }).vms.retrieve("x").catch((e) => e);
      assert.ok(err instanceof Cls, `${err}`);
      assert.ok(err instanceof APIStatusError && err instanceof fastvm.APIError && err instanceof fastvm.FastvmError);
      assert.equal(err.constructor, Cls);
      assert.equal(err.status, status);
      assert.equal(err.code, "SOME_CODE");
      assert.equal(err.errorMessage, "what to fix");
      assert.equal(err.message, `HTTP ${status} SOME_CODE: what to fix`);
      assert.deepEqual(err.body, { error: { code: "SOME_CODE", message: "what to fix" } });
      assert.equal(err.name, Cls.name);
    });
  }

  it("an error body that is not JSON becomes the message", async () => {
    answer = (rec, res) => {
      res.writeHead(400, { "Content-Type": "text/plain" });
      res.end("plain words\n");
    };
    const err = await make().health().catch((e) => e);
    assert.ok(err instanceof BadRequestError);
    assert.equal(err.code, undefined);
    assert.equal(err.errorMessage, "plain words");
    answer = (rec, res) => {
      res.writeHead(404);
      res.end();
    };
    const empty = await client.health().catch((e) => e);
    assert.equal(empty.errorMessage, "Not Found");
  });

  it("retries idempotent requests on 5xx, up to maxRetries", async () => {
    let n = 0;
    answer = (rec, res) => (++n < 3 ? sendJson(res, 503, { error: { code: "BUSY", message: "later" } }) : sendJson(res, 200, vmBody()));
    const vm = await make().vms.retrieve("x");
    assert.equal(vm.status, "running");
    assert.equal(srv.requests.length, 3);
    n = -10;
    const err = await client.vms.retrieve("x").catch((e) => e);
    assert.ok(err instanceof InternalServerError);
    assert.equal(srv.requests.length, 3 + 3, "1 try + 2 retries");
  });

  it("does not retry POST unless asked; launch and run take maxRetries", async () => {
    answer = (rec, res) => sendJson(res, 500, { error: { code: "E", message: "boom" } });
    await assert.rejects(make().vms.pause("x"), InternalServerError);
    assert.equal(srv.requests.length, 1);
    await assert.rejects(client.vms.launch({ machineType: "c1m2", maxRetries: 2 }), InternalServerError);
    assert.equal(srv.requests.length, 1 + 3);
    await assert.rejects(client.vms.run("x", { command: "true", maxRetries: 1 }), InternalServerError);
    assert.equal(srv.requests.length, 1 + 3 + 2);
  });

  it("does not retry 4xx", async () => {
    answer = (rec, res) => sendJson(res, 404, { error: { code: "NOT_FOUND", message: "no" } });
    await assert.rejects(make().vms.retrieve("x"), NotFoundError);
    assert.equal(srv.requests.length, 1);
  });

  it("a read timeout is APITimeoutError; long operations lift it", async () => {
    answer = async (rec, res) => {
      await sleep(600);
      sendJson(res, 200, rec.path.endsWith("/exec") ? { exitCode: 0, stdout: "ok", stderr: "" } : vmBody());
    };
    const c = make({ timeout: 0.2, maxRetries: 0 });
    const err = await c.vms.retrieve("x").catch((e) => e);
    assert.ok(err instanceof APITimeoutError && err instanceof APIConnectionError, `${err}`);
    // exec without timeoutSec: the server bounds it, no read timeout on the client.
    assert.equal((await c.vms.run("x", { command: "sleep 1" })).stdout, "ok");
    // snapshot capture: unbounded on the server.
    await c.snapshots.create({ vmId: "x" });
    // fetch: the server's 600 s default plus a margin.
    await c.vms.files.fetch("x", { url: "/u", path: "/p" });
  });

  it("a timeout while the body streams is APITimeoutError too", async () => {
    answer = async (rec, res) => {
      res.writeHead(200, { "Content-Type": "application/json" });
      res.write('{"id":');
      await sleep(800);
      res.end('"x"}');
    };
    const err = await make({ timeout: 0.2 }).vms.retrieve("x").catch((e) => e);
    assert.ok(err instanceof APITimeoutError, `${err}`);
  });
});

describe("connection errors", () => {
  it("a refused connection is APIConnectionError after the retries", async () => {
    // A port nothing listens on: bind one, close it.
    const s = net.createServer();
    await new Promise((r) => s.listen(0, "127.0.0.1", r));
    const { port } = s.address();
    await new Promise((r) => s.close(r));
    const c = new FastvmClient({ baseUrl: `http://127.0.0.1:${port}`, maxRetries: 2 });
    c.retryBaseDelay = 0.05;
    const started = performance.now();
    const err = await c.health().catch((e) => e);
    const elapsed = performance.now() - started;
    assert.ok(err instanceof APIConnectionError && !(err instanceof APITimeoutError), `${err}`);
    assert.match(err.message, /ECONNREFUSED/);
    // Two backoffs of 0.05 * 2**attempt * [0.75, 1]: at least 0.11 s.
    assert.ok(elapsed >= 100, `retried with backoff (${elapsed} ms)`);
    c.close();
  });

  it("a server that connects later is reached by the retries", async () => {
    const s = net.createServer();
    await new Promise((r) => s.listen(0, "127.0.0.1", r));
    const { port } = s.address();
    await new Promise((r) => s.close(r));
    const c = new FastvmClient({ baseUrl: `http://127.0.0.1:${port}`, maxRetries: 3 });
    c.retryBaseDelay = 0.3;
    setTimeout(async () => {
      const http = await import("node:http");
      const late = http.createServer((req, res) => sendJson(res, 200, { status: "ok" }));
      late.listen(port, "127.0.0.1");
      setTimeout(() => late.close(), 3000).unref();
    }, 100);
    assert.deepEqual(await c.health(), { status: "ok" });
    c.close();
  });
});

describe("launch and waitForVmReady", () => {
  let srv;
  let answer;
  before(async () => {
    srv = await fakeServer((rec, res) => answer(rec, res));
  });
  after(() => srv.close());
  afterEach(() => (srv.requests.length = 0));

  function client() {
    return new FastvmClient({ apiKey: "k", baseUrl: srv.url });
  }

  it("201 running: returns at once, body in wire names", async () => {
    answer = (rec, res) => sendJson(res, 201, vmBody());
    const c = client();
    const vm = await c.vms.launch({ machineType: "c1m2", name: "dev", metadata: { a: "b" }, envVars: { X: "1" }, ttl: { seconds: 60, action: "pause" } });
    assert.equal(vm.status, "running");
    assert.deepEqual(srv.requests[0].json, { machineType: "c1m2", name: "dev", metadata: { a: "b" }, envVars: { X: "1" }, ttl: { seconds: 60, action: "pause" } });
    assert.equal(srv.requests.length, 1);
    c.close();
  });

  it("202 provisioning: polls GET /v1/vms/{id} until running", async () => {
    let polls = 0;
    answer = (rec, res) =>
      rec.method === "POST"
        ? sendJson(res, 202, vmBody({ status: "provisioning" }))
        : sendJson(res, 200, vmBody({ status: ++polls < 3 ? "provisioning" : "running" }));
    const c = client();
    const vm = await c.vms.launch({ snapshotId: "snap", pollInterval: 0.01 });
    assert.equal(vm.status, "running");
    assert.deepEqual(srv.requests[0].json, { snapshotId: "snap" });
    assert.deepEqual(srv.requests.slice(1).map((r) => `${r.method} ${r.path}`), Array(3).fill(`GET /v1/vms/${vmBody().id}`));
    c.close();
  });

  it("wait: false returns the raw 202 body", async () => {
    answer = (rec, res) => sendJson(res, 202, vmBody({ status: "provisioning" }));
    const c = client();
    assert.equal((await c.vms.launch({ machineType: "c1m2", wait: false })).status, "provisioning");
    assert.equal(srv.requests.length, 1);
    c.close();
  });

  for (const status of ["error", "stopped", "deleting"]) {
    it(`status ${status} is VMLaunchError`, async () => {
      answer = (rec, res) => sendJson(res, rec.method === "POST" ? 202 : 200, vmBody({ status: rec.method === "POST" ? "provisioning" : status }));
      const c = client();
      const err = await c.vms.launch({ machineType: "c1m2", pollInterval: 0.01 }).catch((e) => e);
      assert.ok(err instanceof VMLaunchError, `${err}`);
      assert.equal(err.status, status);
      assert.equal(err.vmId, vmBody().id);
      assert.equal(err.vm.status, status);
      c.close();
    });
  }

  it("waitForVmReady: VMNotReadyError after the deadline; unknown statuses are in transition", async () => {
    answer = (rec, res) => sendJson(res, 200, vmBody({ status: "some-future-status" }));
    const c = client();
    const started = performance.now();
    const err = await c.waitForVmReady("vm1", { pollInterval: 0.05, timeout: 0.3 }).catch((e) => e);
    assert.ok(err instanceof VMNotReadyError, `${err}`);
    assert.equal(err.lastStatus, "some-future-status");
    assert.equal(err.timeout, 0.3);
    assert.ok(performance.now() - started >= 290);
    assert.ok(srv.requests.length >= 3);
    answer = (rec, res) => sendJson(res, 200, vmBody());
    assert.equal((await c.waitForVmReady("vm1")).status, "running");
    c.close();
  });
});
