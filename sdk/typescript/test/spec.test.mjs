// Every operation of the API reference, walked against this SDK: the method exists
// under the spec's name in camelCase (`client.vms.set_firewall` ->
// `client.vms.setFirewall`), and, called through a fake server, sends the spec's
// HTTP method to the spec's path with every parameter under its wire name (query for
// GET, else body). The operations come from the machine-readable extract of the
// spec that the Python SDK commits and keeps equal to the spec
// (sdk/python/tests/spec_operations.json).
import { after, before, describe, it } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { FastvmClient } from "fastvm";

import { fakeServer, sendJson, vmBody } from "./helpers.mjs";

const here = path.dirname(fileURLToPath(import.meta.url));
const SPEC = JSON.parse(fs.readFileSync(path.resolve(here, "../../python/tests/spec_operations.json"), "utf8"));

/** `memory_mi_b` -> `memoryMiB` (the Python SDK's rule for wire names). */
const camel = (name) => name.split("_").map((p, i) => (i === 0 ? p : p.slice(0, 1).toUpperCase() + p.slice(1))).join("");

// The extract lost method and path of a few operations (the spec renders them
// without); these are the routes the spec's own text names.
const ROUTES = {
  "vms.services.delete": ["DELETE", "/v1/vms/{id}/services/{serviceName}"],
  "vms.bucket_mounts.delete": ["DELETE", "/v1/vms/{id}/bucket-mounts/{bucketMountId}"],
  "vms.bucket_mounts.rotate": ["PATCH", "/v1/vms/{id}/bucket-mounts/{bucketMountId}"],
};

// Parameters of the SDK's overrides that are options of the call, not wire fields.
const CALL_OPTIONS = new Set(["wait", "poll_interval", "wait_timeout", "timeout", "max_retries"]);

function dummy(name, type) {
  if (name === "command") return "echo hi";
  if (name === "credentials") return { type: "aws-credentials", value: { data: "[default]" } };
  if (name === "source") return { type: "image", image: "alpine:3" };
  if (name === "ttl") return { seconds: 60, action: "pause" };
  if (type.startsWith("int")) return 7;
  if (type === "bool") return true;
  if (type === "float") return 1.5;
  if (/^(str|MachineType|VMStatus)/.test(type) || type.includes('"rw"')) return type.includes('"rw"') ? "ro" : `v-${name}`;
  return {};
}

function resolve(client, dotted) {
  let target = client;
  const parts = dotted.split(".").map(camel);
  for (const p of parts.slice(0, -1)) target = target?.[p];
  return { owner: target, fn: target?.[parts.at(-1)], name: parts.join(".") };
}

describe("the API reference, operation by operation", () => {
  let srv;
  let client;
  before(async () => {
    srv = await fakeServer((rec, res) => sendJson(res, 200, vmBody({ status: "running", snapshotId: "s" })));
    client = new FastvmClient({ apiKey: "k", baseUrl: srv.url, maxRetries: 0 });
  });
  after(async () => {
    client.close();
    await srv.close();
  });

  const operations = Object.entries(SPEC.operations);

  it("covers the spec's operations", () => {
    assert.ok(operations.length >= 50, `${operations.length} operations`);
  });

  for (const [dotted, op] of operations) {
    it(`${dotted} -> client.${dotted.split(".").map(camel).join(".")}`, async () => {
      const { owner, fn, name } = resolve(client, dotted);
      assert.equal(typeof fn, "function", `client.${name} is missing`);
      const [method, route] = op.method && op.path ? [op.method, op.path] : ROUTES[dotted] ?? [];
      if (!method) {
        assert.equal(op.kind, "helper", `${dotted}: no route known`);
        return; // helpers compose several calls: covered by their own tests
      }
      // Positional: the path parameters, in the spec's order; the rest in one object.
      const pathParams = [...route.matchAll(/\{(\w+)\}/g)].map((m) => m[1]);
      const positional = [];
      const fields = {};
      for (const p of op.signature) {
        if (CALL_OPTIONS.has(p.name)) continue;
        const wire = camel(p.name);
        if (pathParams.includes(wire)) positional.push(`p-${wire}`);
        else fields[wire] = dummy(p.name, p.type);
      }
      assert.equal(positional.length, pathParams.length, `${dotted}: path parameters`);
      srv.requests.length = 0;
      const args = Object.keys(fields).length ? [...positional, fields] : positional;
      const result = fn.apply(owner, args);
      if (result && typeof result[Symbol.asyncIterator] === "function") {
        for await (const _ of result) break;
      } else {
        await result;
      }
      const rec = srv.requests[0];
      assert.ok(rec, `${dotted}: no request sent`);
      assert.equal(rec.method, method);
      const expected = pathParams.reduce((p, name) => p.replace(`{${name}}`, `p-${name}`), route);
      assert.equal(rec.path, expected);
      for (const [wire, value] of Object.entries(fields)) {
        if (method === "GET") assert.equal(rec.query[wire], String(value), `${dotted}: query ${wire}`);
        else assert.ok(rec.json && wire in rec.json, `${dotted}: body has no ${wire}: ${JSON.stringify(rec.json)}`);
      }
    });
  }
});
