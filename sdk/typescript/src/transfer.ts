/**
 * `client.upload` / `client.download`: file and directory transfer through signed URLs,
 * the protocol of the Python SDK (`_transfer.py`):
 *
 * - upload, file: presign(remote) -> PUT the bytes (exact Content-Length) to
 *   `uploadUrl` -> the VM fetches `downloadUrl` to `remote`;
 * - upload, directory: presign(tmp) -> PUT a tar of the directory rooted at `./`
 *   (`tar.ts`: sized before streaming) -> the VM fetches it to `tmp` -> exec
 *   `mkdir -p DEST && tar -xf TMP -C DEST`, then `rm -f TMP`;
 * - download: presign(remote) -> files/export(remote, uploadUrl) (an extension of this
 *   server: it classifies the path in the VM, a missing one is a 404 FILE_NOT_FOUND,
 *   and streams the file or a tar of the directory over the agent channel into the
 *   staging object) -> stream GET `downloadUrl` into the local file, or into a safe
 *   extraction.
 *
 * Everything streams: no temporary copy on the client, memory bounded by chunk size.
 */

import { randomUUID } from "node:crypto";
import { createWriteStream } from "node:fs";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";

import type { FastvmClient } from "./client.js";
import { FileTransferError, NotFoundError } from "./errors.js";
import { bodyChunks } from "./http.js";
import { safeExtract } from "./tar-extract.js";
import { fileData, planTar, streamTar } from "./tar-write.js";
import type { ExecVMResponse } from "./types.js";

const OCTET = "application/octet-stream";

export interface UploadOptions {
  /** Seconds the VM may take to fetch the staged bytes. Default 600. */
  fetchTimeoutSec?: number;
  /** Seconds the VM may take to extract a directory's tar. Default 600. */
  execTimeoutSec?: number;
}

export interface DownloadOptions {
  /** Seconds the VM-side work (classify + stream) may take. Default 600. */
  execTimeoutSec?: number;
}

/** Quote for `sh` (like Python's `shlex.quote`). */
export function shellQuote(s: string): string {
  if (s !== "" && /^[A-Za-z0-9_@%+=:,./-]+$/.test(s)) return s;
  return `'${s.replace(/'/g, `'"'"'`)}'`;
}

function vmTmpPath(): string {
  // /var/tmp: on the VM disk (the guest /tmp is a RAM tmpfs, too small for big trees).
  return `/var/tmp/.fastvm-upload-${randomUUID().replace(/-/g, "")}.tar`;
}

export function extractCommand(tmp: string, dest: string): string {
  const t = shellQuote(tmp);
  const d = shellQuote(dest);
  return `mkdir -p ${d} && tar -xf ${t} -C ${d}; rc=$?; rm -f ${t}; exit $rc`;
}

function check(result: ExecVMResponse, what: string): void {
  const opts = { exitCode: result.exitCode, stderr: result.stderr };
  if (result.timedOut) throw new FileTransferError(`${what} timed out in the VM`, opts);
  if (result.exitCode !== 0 && result.exitCode !== undefined && result.exitCode !== null) {
    throw new FileTransferError(`${what} failed in the VM (exit ${result.exitCode})`, opts);
  }
}

function missing(p: string, where: string): FileTransferError {
  return new FileTransferError(`no such file or directory (${where}): ${p}`, { code: "ENOENT", path: p });
}

export async function upload(
  client: FastvmClient,
  vmId: string,
  localPath: string,
  remotePath: string,
  options: UploadOptions,
): Promise<void> {
  const fetchTimeoutSec = options.fetchTimeoutSec ?? 600;
  const execTimeoutSec = options.execTimeoutSec ?? 600;
  let st;
  try {
    st = await fs.stat(localPath);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "ENOENT") throw missing(localPath, "local");
    throw new FileTransferError(`cannot read ${localPath} for the upload: ${(err as Error).message}`, { cause: err });
  }
  if (!st.isFile() && !st.isDirectory()) {
    throw new FileTransferError(`${localPath} is neither a file nor a directory`, { path: localPath });
  }
  const dir = st.isDirectory();
  const target = dir ? vmTmpPath() : remotePath;
  let plan;
  if (dir) {
    try {
      plan = await planTar(localPath);
    } catch (err) {
      if (err instanceof FileTransferError) throw err;
      throw new FileTransferError(`cannot read ${localPath} for the upload: ${(err as Error).message}`, { cause: err });
    }
  }
  const presign = await client.vms.files.presign(vmId, { path: target });
  if (plan) {
    const p = plan;
    await client._putSigned(presign.uploadUrl, () => streamTar(p), OCTET, p.size);
  } else {
    const abs = await fs.realpath(localPath);
    await client._putSigned(presign.uploadUrl, () => fileData(path.dirname(abs), path.basename(abs), st.size), OCTET, st.size);
  }
  const fetched = await client.vms.files.fetch(vmId, {
    url: presign.downloadUrl,
    path: target,
    timeoutSec: fetchTimeoutSec,
  });
  check(fetched, "fetch");
  if (dir) {
    const result = await client.vms.run(vmId, { command: extractCommand(target, remotePath), timeoutSec: execTimeoutSec });
    check(result, "extract");
  }
}

export async function download(
  client: FastvmClient,
  vmId: string,
  remotePath: string,
  localPath: string,
  options: DownloadOptions,
): Promise<void> {
  const presign = await client.vms.files.presign(vmId, { path: remotePath });
  let exported;
  try {
    exported = await client.vms.files.export(vmId, {
      path: remotePath,
      url: presign.uploadUrl,
      timeoutSec: options.execTimeoutSec ?? 600,
    });
  } catch (err) {
    if (err instanceof NotFoundError && err.code === "FILE_NOT_FOUND") throw missing(remotePath, "in the VM");
    throw err;
  }
  const kind = exported?.kind;
  if (kind !== "file" && kind !== "directory") {
    throw new FileTransferError(`download: unexpected export answer ${JSON.stringify(exported)}`);
  }
  const res = await client._getSigned(presign.downloadUrl);
  const chunks = bodyChunks(res, { method: "GET", url: client._url(presign.downloadUrl) });
  try {
    if (kind === "directory") {
      await safeExtract(chunks, localPath);
    } else {
      await fs.mkdir(path.dirname(path.resolve(localPath)), { recursive: true });
      await pipeline(Readable.from(chunks), createWriteStream(localPath));
    }
  } finally {
    if (!res.complete) res.destroy();
  }
}
