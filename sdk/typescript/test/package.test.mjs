// The published shape of the package: ESM and CommonJS builds with the same exports,
// type declarations for both, the version, and no runtime dependencies.
import { it } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

import * as esm from "fastvm";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const pkg = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8"));
const require = createRequire(import.meta.url);

it("ESM and CommonJS export the same names, classes that work", () => {
  const cjs = require("fastvm");
  assert.deepEqual(Object.keys(cjs).sort(), Object.keys(esm).sort());
  for (const name of ["FastvmClient", "NotFoundError", "FileTransferError", "UnsafeArchiveError", "BuildError", "VMLaunchError", "VMNotReadyError", "APITimeoutError"]) {
    assert.equal(typeof esm[name], "function", name);
    assert.equal(typeof cjs[name], "function", name);
  }
  const c = new cjs.FastvmClient({ baseUrl: "http://127.0.0.1:1" });
  assert.equal(typeof c.vms.stream, "function");
  assert.ok(new cjs.NotFoundError(404, "X", "m") instanceof cjs.APIStatusError);
  c.close();
});

it("package.json points at built files with type declarations", () => {
  assert.equal(pkg.name, "fastvm");
  assert.equal(pkg.type, "module");
  const exp = pkg.exports["."];
  for (const file of [exp.import.default, exp.import.types, exp.require.default, exp.require.types, pkg.main, pkg.types]) {
    assert.ok(fs.existsSync(path.join(root, file)), file);
  }
  assert.equal(JSON.parse(fs.readFileSync(path.join(root, "dist/cjs/package.json"), "utf8")).type, "commonjs");
  assert.match(fs.readFileSync(path.join(root, exp.require.types), "utf8"), /FastvmClient/);
});

it("the version is package.json's; no runtime dependencies; Node >= 20", () => {
  assert.equal(esm.VERSION, pkg.version);
  assert.equal(pkg.dependencies, undefined);
  assert.equal(pkg.engines.node, ">=20");
});
