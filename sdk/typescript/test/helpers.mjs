// Shared helpers of the unit tests: a local fake API server that records every
// request, and temp dirs. The unit tests import the built package (`npm run build`
// first), so they test what is published.
import http from "node:http";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

/**
 * A fake API on 127.0.0.1:<free port>. `handler(rec, res)` answers; `rec` is the
 * recorded request `{ method, url, path, query, headers, body, json }` (the body is
 * read before the handler runs). Returns `{ url, requests, close, sockets }`.
 */
export async function fakeServer(handler) {
  const requests = [];
  const sockets = new Set();
  const server = http.createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", async () => {
      const u = new URL(req.url, "http://x");
      const body = Buffer.concat(chunks);
      let json;
      try {
        json = body.length ? JSON.parse(body.toString("utf8")) : undefined;
      } catch {
        json = undefined;
      }
      const rec = {
        method: req.method,
        url: req.url,
        path: u.pathname,
        rawPath: req.url.split("?")[0],
        query: Object.fromEntries(u.searchParams),
        headers: req.headers,
        body,
        json,
      };
      requests.push(rec);
      try {
        await handler(rec, res, req);
      } catch (err) {
        if (!res.headersSent) sendJson(res, 599, { error: { code: "TEST_HANDLER", message: String(err) } });
        else res.destroy();
      }
    });
  });
  server.on("connection", (s) => {
    sockets.add(s);
    s.on("close", () => sockets.delete(s));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    requests,
    sockets,
    server,
    close: () =>
      new Promise((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}

export function sendJson(res, status, obj, headers = {}) {
  const body = obj === undefined ? Buffer.alloc(0) : Buffer.from(JSON.stringify(obj));
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": body.length, ...headers });
  res.end(body);
}

export function tempDir(prefix = "fastvm-ts-test-") {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function rmrf(p) {
  fs.rmSync(p, { recursive: true, force: true });
}

/** A VM body as the server sends it. */
export function vmBody(overrides = {}) {
  return {
    id: "11111111-2222-3333-4444-555555555555",
    name: "dev",
    orgId: "org",
    machineName: "c1m2",
    sourceName: "",
    status: "running",
    cpu: 1,
    memoryMiB: 2048,
    diskGiB: 10,
    metadata: {},
    envVars: {},
    firewall: {},
    effectiveFirewall: {},
    volumes: [],
    bucketMounts: [],
    createdAt: "2025-01-01T00:00:00Z",
    ...overrides,
  };
}
