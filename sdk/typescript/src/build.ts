/**
 * `client.build`: a snapshot from an OCI image or a Dockerfile, waited to completion
 * (the Python SDK's `_build.py`):
 *
 * - image: POST /v1/snapshot-imports {machineType, diskGiB?, name?, source: {type: "image", image}}
 * - dockerfile: zip the context with the Dockerfile at its root (`zip.ts`) ->
 *   presignContext(size) -> PUT the zip (application/zip) -> POST /v1/snapshot-imports
 *   with source {type: "dockerfile", contextRef, dockerfilePath: "Dockerfile"}
 *
 * then poll GET /v1/snapshot-imports/{id} until succeeded (-> the Snapshot) or
 * failed / cancelled / deadline (-> BuildError).
 */

import { createReadStream } from "node:fs";
import * as fs from "node:fs/promises";
import { setTimeout as sleep } from "node:timers/promises";

import type { FastvmClient } from "./client.js";
import { BuildError } from "./errors.js";
import type { MachineType, Snapshot, SnapshotImportResponse, SnapshotImportSourceSpec } from "./types.js";
import { DOCKERFILE_NAME, zipContext } from "./zip.js";

export interface BuildParams {
  /** An OCI image reference (`python:3.13-slim`); exclusive with `dockerfile`. */
  imageRef?: string;
  /** The Dockerfile's text; exclusive with `imageRef`. */
  dockerfile?: string;
  /** The build context directory (only with `dockerfile`). */
  contextDir?: string;
  /** Default `c1m2`. */
  machineType?: MachineType;
  diskGiB?: number;
  name?: string;
  /** Seconds between polls. Default 2. */
  pollInterval?: number;
  /** Seconds before `BuildError`. Default 1800. */
  timeout?: number;
}

const FAILED = new Set(["failed", "cancelled"]);

/** True when succeeded; throws BuildError when failed or cancelled. */
function done(imp: SnapshotImportResponse): boolean {
  if (FAILED.has(imp.status)) {
    throw new BuildError(`snapshot import ${imp.id} ${imp.status}: ${imp.error || "no error given"}`, imp);
  }
  if (imp.status === "succeeded") {
    if (!imp.snapshotId) throw new BuildError(`snapshot import ${imp.id} succeeded without a snapshotId`, imp);
    return true;
  }
  return false;
}

export async function build(client: FastvmClient, params: BuildParams): Promise<Snapshot> {
  const { imageRef, dockerfile, contextDir } = params;
  if ((imageRef === undefined) === (dockerfile === undefined)) {
    throw new TypeError("build() needs exactly one of imageRef or dockerfile");
  }
  if (contextDir !== undefined && dockerfile === undefined) throw new TypeError("contextDir is only used with dockerfile");
  if (contextDir !== undefined) {
    const st = await fs.stat(contextDir).catch(() => null);
    if (!st?.isDirectory()) throw new BuildError(`build context ${contextDir} is not a directory`);
  }
  const timeout = params.timeout ?? 1800;
  const pollInterval = params.pollInterval ?? 2;
  const deadline = performance.now() + timeout * 1000;
  const common = { machineType: params.machineType ?? "c1m2", diskGiB: params.diskGiB, name: params.name };
  let source: SnapshotImportSourceSpec;
  if (imageRef !== undefined) {
    source = { type: "image", image: imageRef };
  } else {
    const zip = await zipContext(contextDir, dockerfile!);
    try {
      const ctx = await client.snapshotImports.presignContext({ sizeBytes: zip.size });
      if (ctx.maxUploadBytes && zip.size > ctx.maxUploadBytes) {
        throw new BuildError(`build context is ${zip.size} bytes, over the server cap of ${ctx.maxUploadBytes}`);
      }
      await client._putSigned(ctx.uploadUrl, () => createReadStream(zip.path), "application/zip", zip.size);
      source = { type: "dockerfile", contextRef: ctx.contextRef, dockerfilePath: DOCKERFILE_NAME };
    } finally {
      await zip.cleanup();
    }
  }
  let imp = await client.snapshotImports.create({ ...common, source });
  while (!done(imp)) {
    const remaining = deadline - performance.now();
    if (remaining <= 0) {
      throw new BuildError(`snapshot import ${imp.id} not finished after ${timeout}s (status "${imp.status}")`, imp);
    }
    await sleep(Math.min(pollInterval * 1000, remaining));
    imp = await client.snapshotImports.retrieve(imp.id);
  }
  return client.snapshots.retrieve(imp.snapshotId!);
}
