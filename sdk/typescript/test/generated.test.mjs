// Drift test: src/generated/openapi.ts must be what openapi-typescript makes from the
// committed openapi/fastvm.json today. When the server's OpenAPI document changes,
// run `npm run generate` and commit the result.
import { it } from "node:test";
import assert from "node:assert/strict";
import fs from "node:fs";

import { generate, OUTPUT_PATH, SPEC_PATH } from "../scripts/generate-types.mjs";

it("src/generated/openapi.ts is generated from the current openapi/fastvm.json", async () => {
  const committed = fs.readFileSync(OUTPUT_PATH, "utf8");
  const fresh = await generate();
  assert.ok(
    committed === fresh,
    `${OUTPUT_PATH} is stale against ${SPEC_PATH}: run \`npm run generate\` in sdk/typescript and commit it`,
  );
});

it("the generated types cover every schema of the document", async () => {
  const doc = JSON.parse(fs.readFileSync(SPEC_PATH, "utf8"));
  const committed = fs.readFileSync(OUTPUT_PATH, "utf8");
  for (const name of Object.keys(doc.components.schemas)) {
    assert.match(committed, new RegExp(`^        ${name}: `, "m"), `schema ${name}`);
  }
  for (const [p, item] of Object.entries(doc.paths)) {
    for (const op of Object.values(item)) if (op.operationId) assert.match(committed, new RegExp(`^    ${op.operationId}: \\{`, "m"), `${p} ${op.operationId}`);
  }
});
