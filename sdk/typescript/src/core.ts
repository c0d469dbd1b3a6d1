/**
 * The I/O-free rules shared by every call, the same as the Python SDK's `_core.py`:
 * defaults, the timeouts of long operations, the retry policy, command
 * normalisation, the VM readiness rule and the mapping of error responses.
 */

import { APIStatusError, statusErrorClass } from "./errors.js";

export const DEFAULT_BASE_URL = "http://127.0.0.1:8080";
/** Seconds: the default HTTP timeout of a call (connect, and between two reads). */
export const DEFAULT_TIMEOUT = 60;
export const DEFAULT_MAX_RETRIES = 2;

/**
 * files.fetch / files.export without `timeoutSec`: the server's default limit, in
 * seconds (`FILE_TRANSFER_DEFAULT_TIMEOUT_SEC` in crates/fastvm-types/src/files.rs,
 * the `default` of `timeoutSec` in the OpenAPI document).
 */
export const FILE_TRANSFER_DEFAULT_TIMEOUT_SEC = 600;
/**
 * The read timeout of a call the server bounds is its limit plus this margin, so
 * the server answers (with its own timeout result) before the client gives up.
 */
export const TIMEOUT_MARGIN = 30;

const IDEMPOTENT_METHODS = new Set(["GET", "HEAD", "PUT", "DELETE", "OPTIONS"]);

/**
 * The HTTP timeouts of one request, in seconds; `null` means no limit. `connect`
 * bounds connecting; `read` bounds every wait for the server (for the response head
 * and between two chunks of the body), like httpx's read timeout.
 */
export interface Timeouts {
  connect: number | null;
  read: number | null;
}

export function timeouts(seconds: number | null): Timeouts {
  return { connect: seconds, read: seconds };
}

/**
 * `base` with the read timeout raised to `read` seconds (`null`: wait as long as
 * the server keeps the request open). Never lowers it.
 */
export function extendedTimeout(base: Timeouts | null, read: number | null): Timeouts | null {
  if (base === null) return null;
  if (read !== null && base.read !== null && base.read >= read) return base;
  return { connect: base.connect, read };
}

/**
 * The timeouts of a call the server bounds at `serverLimitSec` seconds (`null`: not
 * bounded): the read timeout is that limit plus {@link TIMEOUT_MARGIN}, so a long
 * operation never times out on the client while the server still works on it.
 */
export function operationTimeout(base: Timeouts | null, serverLimitSec: number | null | undefined): Timeouts | null {
  if (serverLimitSec != null && (typeof serverLimitSec !== "number" || !Number.isFinite(serverLimitSec))) {
    throw new TypeError(`timeoutSec must be a number of seconds, not ${JSON.stringify(serverLimitSec)}`);
  }
  return extendedTimeout(base, serverLimitSec == null ? null : serverLimitSec + TIMEOUT_MARGIN);
}

/** An explicit per-call value wins; else idempotent methods get the client's default, others 0. */
export function maxRetriesFor(method: string, clientDefault: number, explicit: number | undefined): number {
  if (explicit !== undefined) return explicit;
  return IDEMPOTENT_METHODS.has(method.toUpperCase()) ? clientDefault : 0;
}

/** Backoff before retry `attempt` (0-based): base * 2**attempt, capped, with jitter. */
export function retryDelay(attempt: number, base: number, max: number): number {
  const delay = Math.min(base * 2 ** attempt, max);
  return delay * (0.75 + Math.random() * 0.25);
}

/** Error codes of a failure to connect: nothing reached the server, so retrying is safe. */
const CONNECT_ERROR_CODES = new Set([
  "ECONNREFUSED",
  "ENOTFOUND",
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "EADDRNOTAVAIL",
]);

export function isConnectErrorCode(code: string | undefined): boolean {
  return code !== undefined && CONNECT_ERROR_CODES.has(code);
}

/** URL-encode one path segment (`SHA256:a+b/c` -> `SHA256%3Aa%2Bb%2Fc`). */
export function pathSegment(value: string): string {
  return encodeURIComponent(String(value)).replace(/[!'()*]/g, (c) => "%" + c.charCodeAt(0).toString(16).toUpperCase());
}

/** `"ls -la"` -> `["sh", "-c", "ls -la"]`; argv arrays pass through. */
export function normalizeCommand(command: string | readonly string[]): string[] {
  if (typeof command === "string") return ["sh", "-c", command];
  if (!Array.isArray(command) || command.length === 0 || !command.every((a) => typeof a === "string")) {
    throw new TypeError("command must be a non-empty string or a non-empty array of strings");
  }
  return [...command];
}

/** A VM in one of these statuses will never become running on its own. */
const VM_TERMINAL_FAILURE = new Set(["error", "stopped", "deleting"]);

/** `"ready"`, `"failed"` or `"pending"` (unknown statuses count as in transition). */
export function vmReadiness(status: string | undefined): "ready" | "failed" | "pending" {
  if (status === "running") return "ready";
  if (status !== undefined && VM_TERMINAL_FAILURE.has(status)) return "failed";
  return "pending";
}

/** A JSON body: keys whose value is `undefined` are dropped (`null` is sent). */
export function compact<T extends Record<string, unknown>>(fields: T): Partial<T> {
  const out: Record<string, unknown> = {};
  for (const [k, v] of Object.entries(fields)) if (v !== undefined) out[k] = v;
  return out as Partial<T>;
}

/** Decode a response body: `undefined` when empty, JSON when it parses, else the text. */
export function decodeBody(status: number, body: Buffer): unknown {
  if (status === 204 || body.length === 0) return undefined;
  const text = body.toString("utf8");
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Map an error response to the matching {@link APIStatusError} subclass. */
export function makeStatusError(
  status: number,
  statusText: string | undefined,
  body: Buffer,
  headers: Record<string, string | string[] | undefined>,
  request: { method: string; url: string },
): APIStatusError {
  let payload: unknown;
  const text = body.toString("utf8");
  try {
    payload = body.length ? JSON.parse(text) : undefined;
  } catch {
    payload = text;
  }
  let code: string | undefined;
  let message: string | undefined;
  if (payload !== null && typeof payload === "object" && !Array.isArray(payload)) {
    const p = payload as Record<string, unknown>;
    const err = p["error"];
    if (err !== null && typeof err === "object") {
      const e = err as Record<string, unknown>;
      if (typeof e["code"] === "string") code = e["code"];
      if (typeof e["message"] === "string") message = e["message"];
    } else if (typeof err === "string") {
      message = err;
    }
    if (!message && typeof p["message"] === "string") message = p["message"];
  } else if (typeof payload === "string" && payload.trim()) {
    message = payload.trim();
  }
  if (!message) message = statusText || `HTTP ${status}`;
  const Cls = statusErrorClass(status);
  return new Cls(status, code, message, payload, { headers, request });
}
