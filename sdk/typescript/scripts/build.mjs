// Builds dist/esm (ES modules) and dist/cjs (CommonJS), each with .d.ts files.
// The sources import with ".js" suffixes, which both module systems resolve;
// dist/cjs/package.json marks that tree as CommonJS inside this "type": "module"
// package.
import { execFileSync } from "node:child_process";
import { mkdirSync, rmSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");

rmSync(path.join(root, "dist"), { recursive: true, force: true });
for (const project of ["tsconfig.json", "tsconfig.cjs.json"]) {
  execFileSync(process.execPath, [tsc, "-p", project], { cwd: root, stdio: "inherit" });
}
mkdirSync(path.join(root, "dist/cjs"), { recursive: true });
writeFileSync(path.join(root, "dist/cjs/package.json"), JSON.stringify({ type: "commonjs" }, null, 2) + "\n");
writeFileSync(path.join(root, "dist/esm/package.json"), JSON.stringify({ type: "module" }, null, 2) + "\n");
console.log("built dist/esm and dist/cjs");
