/**
 * Error classes of the SDK, the same hierarchy and status mapping as the Python SDK
 * (sdk/python/src/fastvm/_exceptions.py):
 *
 *     FastvmError
 *     ├── APIError
 *     │   ├── APIStatusError            (the server answered with a non-2xx status)
 *     │   │   ├── BadRequestError           400
 *     │   │   ├── AuthenticationError       401
 *     │   │   ├── PermissionDeniedError     403
 *     │   │   ├── NotFoundError             404
 *     │   │   ├── ConflictError             409
 *     │   │   ├── PayloadTooLargeError      413
 *     │   │   ├── UnprocessableEntityError  422
 *     │   │   ├── RateLimitError            429
 *     │   │   └── InternalServerError       5xx
 *     │   └── APIConnectionError        (no answer: connect failure, broken connection)
 *     │       └── APITimeoutError
 *     ├── VMLaunchError                 (the VM reached error / stopped / deleting)
 *     ├── VMNotReadyError               (polling deadline exceeded)
 *     ├── FileTransferError             (upload / download failed; code "ENOENT" for a missing path)
 *     │   └── UnsafeArchiveError        (a downloaded tar member would escape its destination)
 *     └── BuildError                    (a snapshot import failed, was cancelled or timed out)
 */

import type { SnapshotImportResponse, VM } from "./types.js";

/** Base class of every error raised by the SDK. */
export class FastvmError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** An HTTP exchange with the API failed. */
export class APIError extends FastvmError {
  /** Method and URL of the request, when there was one. */
  readonly request: { method: string; url: string } | undefined;

  constructor(message: string, options?: { cause?: unknown; request?: { method: string; url: string } }) {
    super(message, options);
    this.request = options?.request;
  }
}

/**
 * The server answered with a non-success status. `code` and `message` come from the
 * server's error body `{"error": {"code": "SOME_CODE", "message": "..."}}`; `body`
 * is the decoded JSON body (or the raw text when it was not JSON).
 */
export class APIStatusError extends APIError {
  readonly status: number;
  readonly code: string | undefined;
  /** The server's message alone (`.message` reads `HTTP <status> <code>: <message>`). */
  readonly errorMessage: string;
  readonly body: unknown;
  readonly headers: Record<string, string | string[] | undefined>;

  constructor(
    status: number,
    code: string | undefined,
    message: string,
    body?: unknown,
    options?: { headers?: Record<string, string | string[] | undefined>; request?: { method: string; url: string } },
  ) {
    super(`HTTP ${status}${code ? ` ${code}` : ""}: ${message}`, { request: options?.request });
    this.status = status;
    this.code = code;
    this.errorMessage = message;
    this.body = body;
    this.headers = options?.headers ?? {};
  }
}

/** 400 */
export class BadRequestError extends APIStatusError {}
/** 401 */
export class AuthenticationError extends APIStatusError {}
/** 403 */
export class PermissionDeniedError extends APIStatusError {}
/** 404 */
export class NotFoundError extends APIStatusError {}
/** 409 */
export class ConflictError extends APIStatusError {}
/** 413 */
export class PayloadTooLargeError extends APIStatusError {}
/** 422 */
export class UnprocessableEntityError extends APIStatusError {}
/** 429 */
export class RateLimitError extends APIStatusError {}
/** 5xx */
export class InternalServerError extends APIStatusError {}

const STATUS_ERRORS: Record<number, typeof APIStatusError> = {
  400: BadRequestError,
  401: AuthenticationError,
  403: PermissionDeniedError,
  404: NotFoundError,
  409: ConflictError,
  413: PayloadTooLargeError,
  422: UnprocessableEntityError,
  429: RateLimitError,
};

/** The `APIStatusError` subclass of an HTTP status. */
export function statusErrorClass(status: number): typeof APIStatusError {
  if (status >= 500) return InternalServerError;
  return STATUS_ERRORS[status] ?? APIStatusError;
}

/** The request never got an answer (DNS, refused connection, reset, ...). */
export class APIConnectionError extends APIError {
  constructor(message = "Connection error.", options?: { cause?: unknown; request?: { method: string; url: string } }) {
    super(message, options);
  }
}

/** The request timed out. */
export class APITimeoutError extends APIConnectionError {
  constructor(message = "Request timed out.", options?: { cause?: unknown; request?: { method: string; url: string } }) {
    super(message, options);
  }
}

/** The VM reached a terminal failure status (error, stopped, deleting) while waiting. */
export class VMLaunchError extends FastvmError {
  readonly vm: VM;
  readonly vmId: string;
  readonly status: string;

  constructor(vm: VM, message?: string) {
    super(message ?? `VM ${vm.id} entered terminal status "${vm.status}" before becoming running`);
    this.vm = vm;
    this.vmId = vm.id;
    this.status = vm.status;
  }
}

/** The VM did not reach `running` before the polling deadline. */
export class VMNotReadyError extends FastvmError {
  readonly vmId: string;
  readonly lastStatus: string | undefined;
  /** The deadline, in seconds. */
  readonly timeout: number;

  constructor(vmId: string, lastStatus: string | undefined, timeout: number) {
    super(`VM ${vmId} not running after ${timeout}s (last status: ${lastStatus === undefined ? "none" : `"${lastStatus}"`})`);
    this.vmId = vmId;
    this.lastStatus = lastStatus;
    this.timeout = timeout;
  }
}

/**
 * `client.upload` / `client.download` failed. `exitCode` and `stderr` are set when a
 * VM-side step (fetch, tar) failed; `code` is `"ENOENT"` when the local (upload) or
 * remote (download) path does not exist.
 */
export class FileTransferError extends FastvmError {
  readonly code: string | undefined;
  readonly path: string | undefined;
  readonly exitCode: number | undefined;
  readonly stderr: string | undefined;

  constructor(
    message: string,
    options?: { code?: string; path?: string; exitCode?: number; stderr?: string; cause?: unknown },
  ) {
    const stderr = options?.stderr;
    super(stderr && stderr.trim() ? `${message}: ${stderr.trim()}` : message, { cause: options?.cause });
    this.code = options?.code;
    this.path = options?.path;
    this.exitCode = options?.exitCode;
    this.stderr = stderr;
  }
}

/**
 * A tar member of a downloaded directory has an absolute path, a `..` component, is
 * a link pointing outside the destination, or is a device / FIFO; extraction stopped.
 */
export class UnsafeArchiveError extends FileTransferError {}

/**
 * `client.build` failed: the snapshot import failed, was cancelled, or did not finish
 * before the deadline. `snapshotImport` is its last known state.
 */
export class BuildError extends FastvmError {
  readonly snapshotImport: SnapshotImportResponse | undefined;

  constructor(message: string, snapshotImport?: SnapshotImportResponse) {
    super(message);
    this.snapshotImport = snapshotImport;
  }
}
