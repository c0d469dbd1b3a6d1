// vms.stream: NDJSON exec events as an async iterator, against a fake server that
// splits lines across chunks, plus the decoder on its own.
import { after, afterEach, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import { setTimeout as sleep } from "node:timers/promises";

import { APIError, ConflictError, FastvmClient } from "fastvm";

import { fakeServer, sendJson } from "./helpers.mjs";

const b64 = (s) => Buffer.from(s).toString("base64");

describe("vms.stream", () => {
  let srv;
  let answer;
  let client;
  before(async () => {
    srv = await fakeServer((rec, res, req) => answer(rec, res, req));
  });
  after(() => srv.close());
  afterEach(() => {
    client?.close();
    srv.requests.length = 0;
  });

  function make() {
    client = new FastvmClient({ apiKey: "k", baseUrl: srv.url, timeout: 0.5 });
    return client;
  }

  it("asks for NDJSON and decodes o / e / x events, whatever the chunking", async () => {
    const lines =
      [
        { t: "o", d: b64("hello\n") },
        { t: "e", d: Buffer.from([0, 255, 10]).toString("base64") },
        {},
        { t: "x", c: 7, to: false, ms: 1234 },
      ]
        .map((o) => (Object.keys(o).length ? JSON.stringify(o) : "   "))
        .join("\n") + "\n";
    answer = async (rec, res) => {
      res.writeHead(200, { "Content-Type": "application/x-ndjson" });
      // One byte per write: every line is split across chunks.
      for (const byte of Buffer.from(lines)) {
        res.write(Buffer.from([byte]));
        if (byte === 0x0a) await sleep(5);
      }
      res.end();
    };
    const events = [];
    for await (const ev of make().vms.stream("vm1", { command: "echo hello", timeoutSec: 5 })) events.push(ev);
    const [rec] = srv.requests;
    assert.equal(rec.method, "POST");
    assert.equal(rec.path, "/v1/vms/vm1/exec");
    assert.equal(rec.headers.accept, "application/x-ndjson");
    assert.deepEqual(rec.json, { command: ["sh", "-c", "echo hello"], timeoutSec: 5 });
    assert.deepEqual(
      events.map((e) => [e.type, [...e.data]]),
      [
        ["o", [...Buffer.from("hello\n")]],
        ["e", [0, 255, 10]],
        ["x", []],
      ],
    );
    assert.equal(events[2].exitCode, 7);
    assert.equal(events[2].timedOut, false);
    assert.equal(events[2].durationMs, 1234);
    assert.equal(events[2].diagnostic, "");
  });

  it("yields each event as it arrives, and outlives the client's read timeout", async () => {
    answer = async (rec, res) => {
      res.writeHead(200, { "Content-Type": "application/x-ndjson" });
      res.write(JSON.stringify({ t: "o", d: b64("first") }) + "\n");
      await sleep(900); // longer than the client's 0.5 s timeout
      res.end(JSON.stringify({ t: "x", c: 0, d: "spawn note" }));
    };
    const started = performance.now();
    const seen = [];
    for await (const ev of make().vms.stream("vm1", { command: ["true"] })) seen.push([ev.type, performance.now() - started]);
    assert.deepEqual(seen.map((s) => s[0]), ["o", "x"]);
    assert.ok(seen[0][1] < 500, `first event after ${seen[0][1]} ms`);
    assert.ok(seen[1][1] >= 850);
  });

  it("the last line needs no newline; an x diagnostic is text", async () => {
    answer = (rec, res) => {
      res.writeHead(200);
      res.end(JSON.stringify({ t: "x", c: 127, d: "spawn failed: no such file" }));
    };
    const events = [];
    for await (const ev of make().vms.stream("vm1", { command: ["nope"] })) events.push(ev);
    assert.equal(events.length, 1);
    assert.equal(events[0].exitCode, 127);
    assert.equal(events[0].diagnostic, "spawn failed: no such file");
    assert.equal(events[0].data.toString(), "spawn failed: no such file");
  });

  it("nothing is sent until iteration starts; leaving the loop closes the connection", async () => {
    let closed;
    answer = async (rec, res, req) => {
      closed = new Promise((resolve) => res.on("close", resolve));
      res.writeHead(200);
      for (let i = 0; i < 100 && !res.destroyed; i++) {
        res.write(JSON.stringify({ t: "o", d: b64(`tick ${i}\n`) }) + "\n");
        await sleep(20);
      }
      res.end();
    };
    const it = make().vms.stream("vm1", { command: "yes" });
    await sleep(50);
    assert.equal(srv.requests.length, 0);
    for await (const ev of it) {
      assert.equal(ev.data.toString(), "tick 0\n");
      break;
    }
    await closed;
  });

  it("an error answer is the typed error, before any event", async () => {
    answer = (rec, res) => sendJson(res, 409, { error: { code: "VM_PAUSED", message: "VM is paused" } });
    await assert.rejects(async () => {
      for await (const _ of make().vms.stream("vm1", { command: "true" })) assert.fail("no event expected");
    }, (e) => e instanceof ConflictError && e.code === "VM_PAUSED");
  });

  it("a malformed line is an APIError naming it", async () => {
    answer = (rec, res) => {
      res.writeHead(200);
      res.end('{"t":"o","d":""}\nnot json\n');
    };
    const seen = [];
    await assert.rejects(async () => {
      for await (const ev of make().vms.stream("vm1", { command: "true" })) seen.push(ev);
    }, (e) => e instanceof APIError && /not json/.test(e.message));
    assert.equal(seen.length, 1);
    answer = (rec, res) => {
      res.writeHead(200);
      res.end('{"t":"z"}\n');
    };
    await assert.rejects(async () => {
      for await (const _ of make().vms.stream("vm1", { command: "true" })) {
        // none
      }
    }, /unexpected exec stream event/);
  });
});
