/**
 * `client.vms`: VM lifecycle, firewall, exec (buffered and streamed), and the
 * per-VM sub-namespaces `services`, `files`, `volumes`, `bucketMounts`.
 */

import { setTimeout as sleep } from "node:timers/promises";

import type { FastvmClient } from "../client.js";
import { compact, normalizeCommand, operationTimeout, pathSegment as seg, timeouts, vmReadiness } from "../core.js";
import { APIError, VMLaunchError, VMNotReadyError } from "../errors.js";
import { bodyChunks } from "../http.js";
import type {
  ConsoleTokenResponse,
  DeleteResponse,
  DNSPolicy,
  EgressPolicy,
  EnvVars,
  ExecEvent,
  ExecEventWire,
  ExecVMResponse,
  FirewallPolicy,
  IngressPolicy,
  MachineType,
  Metadata,
  TTL,
  VM,
  VMStatus,
} from "../types.js";
import { BucketMounts, Files, Services, VMVolumes } from "./vm-subresources.js";

const NDJSON = "application/x-ndjson";
/** Bound on one NDJSON line (the server sends chunks of at most a few hundred KiB). */
const MAX_LINE_BYTES = 64 * 1024 * 1024;

export interface LaunchParams {
  /** VM flavor (`c1m2`, `c2m4`, ...). Required unless `snapshotId` is set. */
  machineType?: MachineType;
  /** Restore from this snapshot instead of cold-booting. */
  snapshotId?: string;
  name?: string;
  metadata?: Metadata;
  /** Initial firewall policy (server defaults for omitted blocks). */
  firewall?: FirewallPolicy | null;
  envVars?: EnvVars;
  ttl?: TTL | null;
  /** Wait until `running` (default `true`); `false` returns the raw 201/202 body. */
  wait?: boolean;
  /** Seconds between polls while waiting. Default 2. */
  pollInterval?: number;
  /** Seconds to wait for `running` before `VMNotReadyError`. Default 300. */
  waitTimeout?: number;
  /** HTTP timeout of the POST, in seconds (default: the client's). */
  timeout?: number;
  /** Retries of the POST on connect errors and 5xx (not idempotent: default 0). */
  maxRetries?: number;
}

export interface UpdateParams {
  name?: string;
  metadata?: Metadata;
  /** `null` clears the TTL; a value sets it and restarts the cycle; omitted keeps it. */
  ttl?: TTL | null;
}

export interface FirewallParams {
  ingress?: IngressPolicy;
  egress?: EgressPolicy;
  dns?: DNSPolicy;
}

export interface RunParams {
  /** A shell string (run as `["sh", "-c", command]`) or an argv array. */
  command: string | readonly string[];
  /** Server-side limit in seconds; omitted: the command runs until it exits. */
  timeoutSec?: number;
  /** Absolute working directory in the guest. */
  cwd?: string;
  /** Extra environment for this command. */
  env?: EnvVars;
  /** Retries on connect errors and 5xx (not idempotent: default 0). */
  maxRetries?: number;
}

export type StreamParams = Omit<RunParams, "maxRetries">;

function execBody(p: StreamParams): Record<string, unknown> {
  return compact({ command: normalizeCommand(p.command), timeoutSec: p.timeoutSec, cwd: p.cwd, env: p.env });
}

/** True when running; throws `VMLaunchError` on a terminal failure status. */
function checkReady(vm: VM): boolean {
  const state = vmReadiness(vm.status);
  if (state === "failed") throw new VMLaunchError(vm);
  return state === "ready";
}

/** Decode one NDJSON line of the exec stream (`undefined` for a blank line). */
export function decodeExecEvent(line: string): ExecEvent | undefined {
  const text = line.trim();
  if (!text) return undefined;
  let wire: ExecEventWire;
  try {
    wire = JSON.parse(text) as ExecEventWire;
  } catch {
    throw new APIError(`malformed exec stream line from the server: ${JSON.stringify(text.slice(0, 200))}`);
  }
  if (wire === null || typeof wire !== "object" || !["o", "e", "x"].includes(wire.t)) {
    throw new APIError(`unexpected exec stream event from the server: ${JSON.stringify(text.slice(0, 200))}`);
  }
  const d = typeof wire.d === "string" ? wire.d : "";
  if (wire.t === "x") {
    const event: ExecEvent = { type: "x", data: Buffer.from(d, "utf8"), diagnostic: d };
    if (wire.c != null) event.exitCode = wire.c;
    if (wire.to != null) event.timedOut = wire.to;
    if (wire.ms != null) event.durationMs = wire.ms;
    return event;
  }
  return { type: wire.t, data: Buffer.from(d, "base64"), diagnostic: "" };
}

/** Split a byte stream into NDJSON events. */
export async function* ndjsonEvents(chunks: AsyncIterable<Buffer>): AsyncGenerator<ExecEvent> {
  let pending: Buffer[] = [];
  let pendingBytes = 0;
  for await (const chunk of chunks) {
    let start = 0;
    for (let nl = chunk.indexOf(0x0a, start); nl !== -1; nl = chunk.indexOf(0x0a, start)) {
      const piece = chunk.subarray(start, nl);
      const line = pending.length ? Buffer.concat([...pending, piece]) : piece;
      pending = [];
      pendingBytes = 0;
      start = nl + 1;
      const event = decodeExecEvent(line.toString("utf8"));
      if (event) yield event;
    }
    if (start < chunk.length) {
      pending.push(chunk.subarray(start));
      pendingBytes += chunk.length - start;
      if (pendingBytes > MAX_LINE_BYTES) {
        throw new APIError(`exec stream line longer than ${MAX_LINE_BYTES} bytes from the server`);
      }
    }
  }
  if (pending.length) {
    const event = decodeExecEvent(Buffer.concat(pending).toString("utf8"));
    if (event) yield event;
  }
}

export class VMs {
  readonly services: Services;
  readonly files: Files;
  readonly volumes: VMVolumes;
  readonly bucketMounts: BucketMounts;

  constructor(private readonly client: FastvmClient) {
    this.services = new Services(client);
    this.files = new Files(client);
    this.volumes = new VMVolumes(client);
    this.bucketMounts = new BucketMounts(client);
  }

  /** GET /v1/vms, optionally only VMs with `status`. */
  list(params: { status?: VMStatus | string } = {}): Promise<VM[]> {
    return this.client._call("GET", "/v1/vms", { query: { status: params.status } });
  }

  /**
   * POST /v1/vms, then (`wait`, the default) poll until `status` is `running`.
   *
   * 201 (running now) and 202 (queued) are both handled. `wait: false` returns the
   * raw 201/202 body. Rejects with `VMLaunchError` on error / stopped / deleting and
   * `VMNotReadyError` after `waitTimeout` seconds.
   */
  async launch(params: LaunchParams = {}): Promise<VM> {
    const body = compact({
      machineType: params.machineType,
      snapshotId: params.snapshotId,
      name: params.name,
      metadata: params.metadata,
      firewall: params.firewall,
      envVars: params.envVars,
      ttl: params.ttl,
    });
    const vm = await this.client._call<VM>("POST", "/v1/vms", {
      body,
      ...(params.timeout !== undefined ? { timeout: timeouts(params.timeout) } : {}),
      maxRetries: params.maxRetries ?? 0,
    });
    if (params.wait === false) return vm;
    if (checkReady(vm)) return vm;
    return this.waitReady(vm.id, params.pollInterval ?? 2, params.waitTimeout ?? 300);
  }

  /** @internal The polling of `launch` and `client.waitForVmReady`. */
  async waitReady(vmId: string, pollInterval: number, timeout: number): Promise<VM> {
    const deadline = performance.now() + timeout * 1000;
    for (;;) {
      const vm = await this.retrieve(vmId);
      if (checkReady(vm)) return vm;
      const remaining = deadline - performance.now();
      if (remaining <= 0) throw new VMNotReadyError(vmId, vm.status, timeout);
      await sleep(Math.min(pollInterval * 1000, remaining));
    }
  }

  /** GET /v1/vms/{id}. */
  retrieve(id: string): Promise<VM> {
    return this.client._call("GET", `/v1/vms/${seg(id)}`);
  }

  /**
   * PATCH /v1/vms/{id}. Only the fields given are sent; `ttl: null` sends
   * `"ttl": null` and clears the TTL.
   */
  update(id: string, params: UpdateParams): Promise<VM> {
    return this.client._call("PATCH", `/v1/vms/${seg(id)}`, {
      body: compact({ name: params.name, metadata: params.metadata, ttl: params.ttl }),
    });
  }

  /** DELETE /v1/vms/{id}. */
  delete(id: string): Promise<DeleteResponse> {
    return this.client._call("DELETE", `/v1/vms/${seg(id)}`);
  }

  /** POST /v1/vms/{id}/pause. */
  pause(id: string): Promise<VM> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/pause`);
  }

  /** POST /v1/vms/{id}/resume. */
  resume(id: string): Promise<VM> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/resume`);
  }

  /** POST /v1/vms/{id}/ttl/refresh: restart the TTL cycle. */
  refreshTtl(id: string): Promise<VM> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/ttl/refresh`);
  }

  /** PUT /v1/vms/{id}/firewall: replace the whole policy (omitted blocks get server defaults). */
  setFirewall(id: string, policy: FirewallParams): Promise<VM> {
    return this.client._call("PUT", `/v1/vms/${seg(id)}/firewall`, { body: firewallBody(policy) });
  }

  /** PATCH /v1/vms/{id}/firewall: replace only the blocks given. */
  patchFirewall(id: string, policy: FirewallParams): Promise<VM> {
    return this.client._call("PATCH", `/v1/vms/${seg(id)}/firewall`, { body: firewallBody(policy) });
  }

  /** POST /v1/vms/{id}/console-token. */
  consoleToken(id: string): Promise<ConsoleTokenResponse> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/console-token`);
  }

  /**
   * POST /v1/vms/{id}/exec, buffered. A string command runs as `["sh", "-c", command]`;
   * an array is the argv. Without `timeoutSec` there is no read timeout: the server
   * answers when the command exits.
   */
  async run(id: string, params: RunParams): Promise<ExecVMResponse> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/exec`, {
      body: execBody(params),
      timeout: operationTimeout(this.client.timeouts, params.timeoutSec),
      maxRetries: params.maxRetries ?? 0,
    });
  }

  /**
   * POST /v1/vms/{id}/exec with `Accept: application/x-ndjson`: yields
   * {@link ExecEvent}s as the output arrives (`o` stdout, `e` stderr, `x` exit).
   * The request is sent when iteration starts; leaving the loop early closes it.
   *
   *     for await (const ev of client.vms.stream(vm.id, { command: "make -j8" })) {
   *       if (ev.type === "o") process.stdout.write(ev.data);
   *       else if (ev.type === "x") console.log(`exit ${ev.exitCode} in ${ev.durationMs} ms`);
   *     }
   */
  async *stream(id: string, params: StreamParams): AsyncGenerator<ExecEvent, void, undefined> {
    const path = `/v1/vms/${seg(id)}/exec`;
    const res = await this.client._stream("POST", path, {
      body: execBody(params),
      headers: { Accept: NDJSON },
      timeout: operationTimeout(this.client.timeouts, null),
    });
    try {
      yield* ndjsonEvents(bodyChunks(res, { method: "POST", url: this.client._url(path) }));
    } finally {
      if (!res.complete) res.destroy();
    }
  }
}

function firewallBody(p: FirewallParams): FirewallPolicy {
  return compact({ ingress: p.ingress, egress: p.egress, dns: p.dns }) as FirewallPolicy;
}
