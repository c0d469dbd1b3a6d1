/**
 * One HTTP exchange over Node's `http` / `https` modules.
 *
 * Not `fetch`: Node's fetch (undici) gives up on any response whose head or body
 * pauses for 300 s, and long operations (exec without a limit, a snapshot capture,
 * a 10-minute file fetch) legitimately wait longer. Here the two timeouts of
 * {@link Timeouts} are enforced exactly: `connect` until the socket is connected,
 * `read` as the socket's idle timeout while the request is in flight (so it bounds
 * every wait for the server, not the whole transfer), `null` for none.
 *
 * Errors come back as `APIConnectionError` / `APITimeoutError` with `retryable` set
 * when nothing can have reached the server (connect failure or connect timeout).
 */

import * as http from "node:http";
import * as https from "node:https";
import type { IncomingMessage } from "node:http";
import { pipeline, Readable } from "node:stream";

import type { Timeouts } from "./core.js";
import { isConnectErrorCode } from "./core.js";
import { APIConnectionError, APITimeoutError } from "./errors.js";

/** A request body: bytes, or a factory of a stream of chunks (sent once, not replayable). */
export type RequestBody = Buffer | (() => AsyncIterable<Uint8Array>);

export interface HttpRequest {
  method: string;
  url: string;
  headers: Record<string, string>;
  body?: RequestBody;
  timeout: Timeouts | null;
  agent?: http.Agent | undefined;
}

/** A failure of the exchange, with whether a retry is safe. */
export interface TransportFailure {
  error: APIConnectionError;
  /** Nothing reached the server (connect error or connect timeout). */
  retryable: boolean;
  /** A kept-alive socket that the server had closed: the request never got through. */
  staleSocket: boolean;
  /** The request body's producer failed with this error (the caller's own error). */
  bodyError?: unknown;
}

export class TransportError extends Error {
  constructor(readonly failure: TransportFailure) {
    super(failure.error.message);
  }
}

function describe(err: NodeJS.ErrnoException): string {
  return err.code ? `${err.code}: ${err.message}` : err.message;
}

/**
 * Send one request and resolve with the response once its head arrived. The read
 * timeout stays armed on the response body until it ends; a timeout or broken
 * connection while reading it makes the response emit an `APITimeoutError` /
 * `APIConnectionError`.
 */
export function sendOnce(req: HttpRequest): Promise<IncomingMessage> {
  const url = new URL(req.url);
  const mod = url.protocol === "https:" ? https : http;
  const info = { method: req.method, url: req.url };
  return new Promise<IncomingMessage>((resolve, reject) => {
    let connected = false;
    let response: IncomingMessage | undefined;
    let settled = false;
    let connectTimer: NodeJS.Timeout | undefined;

    const fail = (failure: TransportFailure): void => {
      if (connectTimer) clearTimeout(connectTimer);
      if (!settled) {
        settled = true;
        reject(new TransportError(failure));
      } else if (response && !response.destroyed) {
        response.destroy(failure.error);
      }
    };

    const request = mod.request(url, { method: req.method, headers: req.headers, agent: req.agent }, (res) => {
      response = res;
      settled = true;
      resolve(res);
      res.on("end", () => request.setTimeout(0));
    });

    const markConnected = (): void => {
      connected = true;
      if (connectTimer) clearTimeout(connectTimer);
    };
    request.on("socket", (socket) => {
      // A kept-alive socket is connected already.
      if (!socket.connecting) markConnected();
      else socket.once("connect", markConnected);
    });

    const connectSec = req.timeout?.connect ?? null;
    if (connectSec !== null) {
      connectTimer = setTimeout(() => {
        if (connected) return;
        const error = new APITimeoutError(`Request timed out: no connection to ${url.host} within ${connectSec}s`, {
          request: info,
        });
        request.destroy();
        fail({ error, retryable: true, staleSocket: false });
      }, connectSec * 1000);
    }
    const readSec = req.timeout?.read ?? null;
    if (readSec !== null) {
      request.setTimeout(readSec * 1000, () => {
        const error = connected
          ? new APITimeoutError(`Request timed out: no data from the server for ${readSec}s`, { request: info })
          : new APITimeoutError(`Request timed out: no connection to ${url.host} within ${readSec}s`, { request: info });
        fail({ error, retryable: !connected, staleSocket: false });
        request.destroy();
      });
    }

    let bodyError: unknown;
    request.on("error", (err: NodeJS.ErrnoException) => {
      if (err instanceof APIConnectionError) return; // ours, reported already
      if (bodyError !== undefined) {
        // The body's producer failed (e.g. the directory changed under a sized tar):
        // the request was aborted for it and the caller sees the producer's error.
        const cause = bodyError as Error;
        const error = new APIConnectionError(`request body failed: ${cause.message}`, { cause, request: info });
        fail({ error, retryable: false, staleSocket: false, bodyError });
        return;
      }
      const retryable = !connected && isConnectErrorCode(err.code);
      const staleSocket = request.reusedSocket && err.code === "ECONNRESET" && response === undefined;
      const error = new APIConnectionError(`Connection error: ${describe(err)}`, { cause: err, request: info });
      fail({ error, retryable, staleSocket });
    });

    const body = req.body;
    if (body === undefined) {
      request.end();
    } else if (Buffer.isBuffer(body)) {
      request.end(body);
    } else {
      const source = Readable.from(body());
      source.once("error", (err) => (bodyError = err));
      // pipeline: an error on either side destroys both (the producer's files are
      // closed when the request fails; the request is aborted when the producer
      // fails, with the producer's error, reported above).
      pipeline(source, request, () => {});
    }
  });
}

/** An error while reading a response body, as an SDK error. */
export function bodyReadError(err: unknown, request: { method: string; url: string }): Error {
  if (err instanceof APIConnectionError) return err;
  const e = err as NodeJS.ErrnoException;
  return new APIConnectionError(`Connection error while reading the response: ${describe(e)}`, { cause: err, request });
}

/** The chunks of a response body; a broken connection becomes an `APIConnectionError`. */
export async function* bodyChunks(res: IncomingMessage, request: { method: string; url: string }): AsyncGenerator<Buffer> {
  try {
    for await (const chunk of res) yield chunk as Buffer;
  } catch (err) {
    throw bodyReadError(err, request);
  } finally {
    if (!res.complete) res.destroy();
  }
}

/** The whole body of a response. */
export async function readAll(res: IncomingMessage, request: { method: string; url: string }): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of bodyChunks(res, request)) chunks.push(chunk);
  return Buffer.concat(chunks);
}

/** Read and drop a response body (so its socket can be reused); errors ignored. */
export async function drain(res: IncomingMessage): Promise<void> {
  try {
    for await (const _ of res) {
      // discard
    }
  } catch {
    // a broken body of a response we discard anyway
  }
}
