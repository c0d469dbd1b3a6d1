/**
 * `FastvmClient`: configuration, the namespaces, the top-level helpers, and the send
 * loop with the retry policy of the Python SDK (`_client.py`):
 *
 * - idempotent methods (GET, HEAD, PUT, DELETE, OPTIONS) are retried up to
 *   `maxRetries` times (default 2) on connect errors and 5xx answers, others only
 *   when a call asks for it (`vms.launch({ maxRetries })`, `vms.run(..., { maxRetries })`);
 * - backoff 0.5 s * 2**attempt, capped at 8 s, with jitter;
 * - bodies that stream (uploads) are never retried;
 * - a request on a kept-alive socket that the server had already closed is sent
 *   again once on a fresh connection (it never reached the server).
 */

import * as http from "node:http";
import * as https from "node:https";
import type { IncomingMessage } from "node:http";
import { setTimeout as sleep } from "node:timers/promises";

import { build, type BuildParams } from "./build.js";
import {
  DEFAULT_BASE_URL,
  DEFAULT_MAX_RETRIES,
  DEFAULT_TIMEOUT,
  decodeBody,
  extendedTimeout,
  makeStatusError,
  maxRetriesFor,
  retryDelay,
  timeouts,
  type Timeouts,
} from "./core.js";
import { drain, readAll, sendOnce, TransportError, type HttpRequest, type RequestBody } from "./http.js";
import { Me, Quotas, Volumes } from "./resources/account.js";
import { SnapshotImports, Snapshots } from "./resources/snapshots.js";
import { VMs } from "./resources/vms.js";
import { download, upload, type DownloadOptions, type UploadOptions } from "./transfer.js";
import type { HealthResponse, Snapshot, VM } from "./types.js";
import { VERSION } from "./version.js";

export interface ClientOptions {
  /** Sent as `Authorization: Bearer <key>`. Default: `process.env.FASTVM_API_KEY`. */
  apiKey?: string | null | undefined;
  /** Default: `process.env.FASTVM_BASE_URL`, else `http://127.0.0.1:8080`. */
  baseUrl?: string | null | undefined;
  /**
   * Default HTTP timeout in seconds (to connect, and for every wait on the server);
   * `null`: none. Default 60. Long operations raise their read timeout to the
   * server's own limit (see the README).
   */
  timeout?: number | null | undefined;
  /** Retries of idempotent requests on connect errors and 5xx answers. Default 2. */
  maxRetries?: number | undefined;
  /** Your own `http.Agent` / `https.Agent` (proxies, TLS options); not destroyed by `close()`. */
  httpAgent?: http.Agent | undefined;
}

/** Options of one request, for the namespaces. */
export interface CallOptions {
  body?: unknown;
  query?: Record<string, string | number | boolean | undefined | null>;
  headers?: Record<string, string>;
  /** Timeouts of this call; `undefined`: the client's. */
  timeout?: Timeouts | null;
  maxRetries?: number;
}

export interface WaitForVmReadyOptions {
  /** Seconds between polls. Default 2. */
  pollInterval?: number;
  /** Total deadline in seconds. Default 300. */
  timeout?: number;
}

export class FastvmClient {
  readonly apiKey: string | undefined;
  readonly baseUrl: string;
  /** The default timeouts of a call, in seconds. */
  readonly timeouts: Timeouts | null;
  readonly maxRetries: number;
  /** Backoff between retries, in seconds: base * 2**attempt, capped at max, with jitter. */
  retryBaseDelay = 0.5;
  retryMaxDelay = 8;

  readonly vms: VMs;
  readonly me: Me;
  readonly snapshots: Snapshots;
  readonly snapshotImports: SnapshotImports;
  readonly quotas: Quotas;
  readonly volumes: Volumes;

  private readonly httpAgent: http.Agent;
  private readonly httpsAgent: https.Agent;
  private readonly ownsAgent: boolean;

  constructor(options: ClientOptions = {}) {
    const apiKey = options.apiKey ?? process.env["FASTVM_API_KEY"];
    this.apiKey = apiKey ? apiKey : undefined;
    const base = options.baseUrl || process.env["FASTVM_BASE_URL"] || DEFAULT_BASE_URL;
    this.baseUrl = base.replace(/\/+$/, "");
    const timeout = options.timeout === undefined ? DEFAULT_TIMEOUT : options.timeout;
    this.timeouts = timeout === null ? null : timeouts(timeout);
    this.maxRetries = options.maxRetries ?? DEFAULT_MAX_RETRIES;
    if (options.httpAgent) {
      this.httpAgent = options.httpAgent;
      this.httpsAgent = options.httpAgent as https.Agent;
      this.ownsAgent = false;
    } else {
      this.httpAgent = new http.Agent({ keepAlive: true });
      this.httpsAgent = new https.Agent({ keepAlive: true });
      this.ownsAgent = true;
    }
    this.vms = new VMs(this);
    this.me = new Me(this);
    this.snapshots = new Snapshots(this);
    this.snapshotImports = new SnapshotImports(this);
    this.quotas = new Quotas(this);
    this.volumes = new Volumes(this);
  }

  /** Close the kept-alive connections (a no-op for an agent you passed in). */
  close(): void {
    if (this.ownsAgent) {
      this.httpAgent.destroy();
      this.httpsAgent.destroy();
    }
  }

  // -- top-level API -----------------------------------------------------------------

  /** GET /healthz. */
  health(): Promise<HealthResponse> {
    return this._call("GET", "/healthz");
  }

  /**
   * Poll GET /v1/vms/{id} until the VM is running. Rejects with `VMLaunchError` when
   * it reaches error / stopped / deleting, `VMNotReadyError` after `timeout` seconds.
   */
  waitForVmReady(vmId: string, options: WaitForVmReadyOptions = {}): Promise<VM> {
    return this.vms.waitReady(vmId, options.pollInterval ?? 2, options.timeout ?? 300);
  }

  /**
   * Copy a local file or directory to `remotePath` in the VM.
   *
   * A directory is sent as a tar rooted at `./` that the SDK writes itself (no `tar`
   * binary is needed on the client), streamed without a temporary copy and with an
   * exact Content-Length computed from a first `lstat` walk. If the directory changes
   * during the upload, `FileTransferError` is raised and nothing is extracted in the
   * VM. A missing `localPath` raises `FileTransferError` with `code: "ENOENT"`.
   */
  upload(vmId: string, localPath: string, remotePath: string, options: UploadOptions = {}): Promise<void> {
    return upload(this, vmId, localPath, remotePath, options);
  }

  /**
   * Copy a file or directory of the VM to `localPath`. A missing `remotePath` raises
   * `FileTransferError` with `code: "ENOENT"`.
   *
   * Uses `vms.files.presign`, then `vms.files.export` (`POST /v1/vms/{id}/files/export`,
   * an extension of this server that is not in the API spec): the server streams the
   * file, or a tar of the directory rooted at `./`, out of the VM over its agent
   * channel into the staging object, which is then streamed to `localPath` (a
   * directory is extracted safely: absolute paths, `..`, links leaving the destination
   * and device files are refused with `UnsafeArchiveError`). Works without guest network.
   */
  download(vmId: string, remotePath: string, localPath: string, options: DownloadOptions = {}): Promise<void> {
    return download(this, vmId, remotePath, localPath, options);
  }

  /**
   * Build a snapshot from `imageRef`, or from `dockerfile` (its text) plus `contextDir`;
   * wait for it and return the Snapshot (`BuildError` on failure or after `timeout`).
   */
  build(params: BuildParams): Promise<Snapshot> {
    return build(this, params);
  }

  // -- transport (used by the namespaces) --------------------------------------------

  /** @internal Headers of a request to the API (`auth`) or to a signed URL. */
  _headers(extra?: Record<string, string>, auth = true): Record<string, string> {
    const headers: Record<string, string> = {
      Accept: "application/json",
      "User-Agent": `fastvm-typescript/${VERSION}`,
    };
    if (auth && this.apiKey) headers["Authorization"] = `Bearer ${this.apiKey}`;
    return { ...headers, ...extra };
  }

  /** @internal Absolute URL of an API path or of a signed URL (absolute, or relative to the API host). */
  _url(path: string, query?: CallOptions["query"]): string {
    const url = /^https?:\/\//.test(path) ? path : this.baseUrl + (path.startsWith("/") ? path : `/${path}`);
    if (!query) return url;
    const params = new URLSearchParams();
    for (const [k, v] of Object.entries(query)) if (v !== undefined && v !== null) params.append(k, String(v));
    const qs = params.toString();
    return qs ? `${url}${url.includes("?") ? "&" : "?"}${qs}` : url;
  }

  private agentFor(url: string): http.Agent {
    return url.startsWith("https:") ? this.httpsAgent : this.httpAgent;
  }

  /**
   * @internal Send with retries; resolves with a 2xx response (body unread), rejects
   * with the mapped `APIStatusError` or `APIConnectionError`.
   */
  async _send(req: HttpRequest, retries: number): Promise<IncomingMessage> {
    const info = { method: req.method, url: req.url };
    let attempt = 0;
    let staleRetried = false;
    for (;;) {
      let res: IncomingMessage;
      try {
        res = await sendOnce({ ...req, agent: req.agent ?? this.agentFor(req.url) });
      } catch (err) {
        if (!(err instanceof TransportError)) throw err;
        const f = err.failure;
        if (f.bodyError !== undefined) throw f.bodyError;
        const replayable = req.body === undefined || Buffer.isBuffer(req.body);
        if (f.staleSocket && replayable && !staleRetried) {
          staleRetried = true;
          continue;
        }
        if (f.retryable && replayable && attempt < retries) {
          await sleep(retryDelay(attempt, this.retryBaseDelay, this.retryMaxDelay) * 1000);
          attempt += 1;
          continue;
        }
        throw f.error;
      }
      const status = res.statusCode ?? 0;
      if (status >= 200 && status < 300) return res;
      if (status >= 500 && attempt < retries && (req.body === undefined || Buffer.isBuffer(req.body))) {
        await drain(res);
        await sleep(retryDelay(attempt, this.retryBaseDelay, this.retryMaxDelay) * 1000);
        attempt += 1;
        continue;
      }
      const body = await readAll(res, info);
      throw makeStatusError(status, res.statusMessage, body, res.headers, info);
    }
  }

  private request(method: string, path: string, opts: CallOptions, extraHeaders?: Record<string, string>): HttpRequest {
    const headers = this._headers({ ...extraHeaders, ...opts.headers });
    let body: Buffer | undefined;
    if (opts.body !== undefined) {
      body = Buffer.from(JSON.stringify(opts.body), "utf8");
      headers["Content-Type"] = "application/json";
      headers["Content-Length"] = String(body.length);
    } else if (method !== "GET" && method !== "HEAD") {
      headers["Content-Length"] = "0";
    }
    return {
      method,
      url: this._url(path, opts.query),
      headers,
      ...(body !== undefined ? { body } : {}),
      timeout: opts.timeout === undefined ? this.timeouts : opts.timeout,
    };
  }

  /** @internal One JSON call: the decoded body of the 2xx answer (`undefined` when empty). */
  async _call<T>(method: string, path: string, opts: CallOptions = {}): Promise<T> {
    const req = this.request(method, path, opts);
    const res = await this._send(req, maxRetriesFor(method, this.maxRetries, opts.maxRetries));
    const body = await readAll(res, { method, url: req.url });
    return decodeBody(res.statusCode ?? 0, body) as T;
  }

  /** @internal A call whose 2xx body the caller streams (never retried). */
  async _stream(method: string, path: string, opts: CallOptions = {}): Promise<IncomingMessage> {
    return this._send(this.request(method, path, opts), 0);
  }

  /** @internal PUT a body to a signed URL: no Authorization header, no read timeout, no retries. */
  async _putSigned(url: string, body: RequestBody, contentType: string, length: number): Promise<void> {
    const target = this._url(url);
    const headers = this._headers({ "Content-Type": contentType, "Content-Length": String(length) }, false);
    const res = await this._send(
      { method: "PUT", url: target, headers, body, timeout: extendedTimeout(this.timeouts, null) },
      0,
    );
    await drain(res);
  }

  /** @internal GET a signed URL as a stream (retried like any GET until the answer starts). */
  async _getSigned(url: string): Promise<IncomingMessage> {
    const target = this._url(url);
    return this._send(
      { method: "GET", url: target, headers: this._headers({}, false), timeout: extendedTimeout(this.timeouts, null) },
      this.maxRetries,
    );
  }
}
