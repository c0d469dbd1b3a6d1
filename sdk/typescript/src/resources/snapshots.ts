/**
 * `client.snapshots` (VM snapshots) and `client.snapshotImports` (snapshots built
 * from OCI images or Dockerfiles; `client.build` composes these and waits).
 */

import type { FastvmClient } from "../client.js";
import { compact, operationTimeout, pathSegment as seg } from "../core.js";
import type {
  ContextPresignResponse,
  DeleteResponse,
  MachineType,
  Snapshot,
  SnapshotImportResponse,
  SnapshotImportSourceSpec,
} from "../types.js";

export class Snapshots {
  constructor(private readonly client: FastvmClient) {}

  /** GET /v1/snapshots. */
  list(): Promise<Snapshot[]> {
    return this.client._call("GET", "/v1/snapshots");
  }

  /**
   * POST /v1/snapshots: snapshot a VM (name auto-generated when omitted).
   *
   * The server answers once the capture is done and sets no time limit on it (a
   * capture writes the VM's memory to disk, so it grows with the memory size), so
   * this call has no read timeout.
   */
  create(params: { vmId: string; name?: string }): Promise<Snapshot> {
    return this.client._call("POST", "/v1/snapshots", {
      body: compact({ vmId: params.vmId, name: params.name }),
      timeout: operationTimeout(this.client.timeouts, null),
    });
  }

  /** GET /v1/snapshots/{id}. */
  retrieve(id: string): Promise<Snapshot> {
    return this.client._call("GET", `/v1/snapshots/${seg(id)}`);
  }

  /** PATCH /v1/snapshots/{id}: rename. */
  update(id: string, params: { name?: string }): Promise<Snapshot> {
    return this.client._call("PATCH", `/v1/snapshots/${seg(id)}`, { body: compact({ name: params.name }) });
  }

  /** DELETE /v1/snapshots/{id}. */
  delete(id: string): Promise<DeleteResponse> {
    return this.client._call("DELETE", `/v1/snapshots/${seg(id)}`);
  }
}

export interface SnapshotImportCreateParams {
  source: SnapshotImportSourceSpec;
  machineType?: MachineType;
  diskGiB?: number;
  name?: string;
}

export class SnapshotImports {
  constructor(private readonly client: FastvmClient) {}

  /** GET /v1/snapshot-imports. */
  list(): Promise<SnapshotImportResponse[]> {
    return this.client._call("GET", "/v1/snapshot-imports");
  }

  /**
   * POST /v1/snapshot-imports. `source` is `{ type: "image", image }` or
   * `{ type: "dockerfile", contextRef, dockerfilePath }`.
   */
  create(params: SnapshotImportCreateParams): Promise<SnapshotImportResponse> {
    return this.client._call("POST", "/v1/snapshot-imports", {
      body: compact({
        machineType: params.machineType,
        diskGiB: params.diskGiB,
        name: params.name,
        source: params.source,
      }),
    });
  }

  /** POST /v1/snapshot-imports/context-presign: signed PUT URL for a build-context ZIP. */
  presignContext(params: { sizeBytes?: number } = {}): Promise<ContextPresignResponse> {
    return this.client._call("POST", "/v1/snapshot-imports/context-presign", {
      body: compact({ sizeBytes: params.sizeBytes }),
    });
  }

  /** GET /v1/snapshot-imports/{id}. */
  retrieve(id: string): Promise<SnapshotImportResponse> {
    return this.client._call("GET", `/v1/snapshot-imports/${seg(id)}`);
  }

  /** DELETE /v1/snapshot-imports/{id} (terminal imports only; cascades to the snapshot). */
  delete(id: string): Promise<DeleteResponse> {
    return this.client._call("DELETE", `/v1/snapshot-imports/${seg(id)}`);
  }

  /** POST /v1/snapshot-imports/{id}/cancel. */
  cancel(id: string): Promise<SnapshotImportResponse> {
    return this.client._call("POST", `/v1/snapshot-imports/${seg(id)}/cancel`);
  }
}
