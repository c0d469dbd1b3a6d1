/**
 * The per-VM namespaces: `client.vms.services`, `client.vms.files`,
 * `client.vms.volumes`, `client.vms.bucketMounts`.
 */

import type { FastvmClient } from "../client.js";
import { compact, FILE_TRANSFER_DEFAULT_TIMEOUT_SEC, operationTimeout, pathSegment as seg } from "../core.js";
import type {
  BucketMount,
  BucketMountCredentials,
  DetachVolumeResponse,
  ExecVMResponse,
  FileExportResponse,
  FilePresignResponse,
  Service,
  VolumeAttachmentItem,
} from "../types.js";

/** `client.vms.services`: HTTP services of a VM exposed through the proxy. */
export class Services {
  constructor(private readonly client: FastvmClient) {}

  /** GET /v1/vms/{id}/services. */
  list(id: string): Promise<Service[]> {
    return this.client._call("GET", `/v1/vms/${seg(id)}/services`);
  }

  /**
   * POST /v1/vms/{id}/services: register a service. `h2c: true` makes the proxy speak
   * HTTP/2 cleartext to the backend (gRPC).
   */
  register(id: string, params: { name: string; port: number; h2c?: boolean }): Promise<Service> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/services`, {
      body: { name: params.name, port: params.port, h2c: params.h2c ?? false },
    });
  }

  /** PUT /v1/vms/{id}/services/{serviceName}: register or update a service. */
  update(id: string, serviceName: string, params: { port: number; h2c?: boolean }): Promise<Service> {
    return this.client._call("PUT", `/v1/vms/${seg(id)}/services/${seg(serviceName)}`, {
      body: { port: params.port, h2c: params.h2c ?? false },
    });
  }

  /** DELETE /v1/vms/{id}/services/{serviceName}: deregister a service. */
  async delete(id: string, serviceName: string): Promise<void> {
    await this.client._call("DELETE", `/v1/vms/${seg(id)}/services/${seg(serviceName)}`);
  }
}

function serverLimit(timeoutSec: number | undefined): number {
  return timeoutSec ?? FILE_TRANSFER_DEFAULT_TIMEOUT_SEC;
}

/**
 * `client.vms.files`: signed-URL file staging (`client.upload` / `client.download`
 * compose these). `fetch` and `export` run as long as the server lets them (up to
 * `timeoutSec`, or its default of 600 s): their read timeout is that limit plus a
 * margin, never the client's default timeout.
 */
export class Files {
  constructor(private readonly client: FastvmClient) {}

  /** POST /v1/vms/{id}/files/presign: mint upload/download URLs for one staging object. */
  presign(id: string, params: { path: string }): Promise<FilePresignResponse> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/files/presign`, { body: { path: params.path } });
  }

  /** POST /v1/vms/{id}/files/fetch: the VM downloads `url` (a presigned `downloadUrl`) to `path`. */
  async fetch(id: string, params: { url: string; path: string; timeoutSec?: number }): Promise<ExecVMResponse> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/files/fetch`, {
      body: compact({ url: params.url, path: params.path, timeoutSec: params.timeoutSec }),
      timeout: operationTimeout(this.client.timeouts, serverLimit(params.timeoutSec)),
    });
  }

  /**
   * POST /v1/vms/{id}/files/export. **An extension of this server, not in the spec**:
   * the server streams `path` of the VM (a file, or a tar of a directory rooted at
   * `./`) into the staging object of `url` (an `uploadUrl` presigned for this VM) over
   * its agent channel. A missing path is a 404 `FILE_NOT_FOUND`.
   */
  async export(id: string, params: { path: string; url: string; timeoutSec?: number }): Promise<FileExportResponse> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/files/export`, {
      body: compact({ path: params.path, url: params.url, timeoutSec: params.timeoutSec }),
      timeout: operationTimeout(this.client.timeouts, serverLimit(params.timeoutSec)),
    });
  }
}

/** `client.vms.volumes`: attach / detach managed volumes. */
export class VMVolumes {
  constructor(private readonly client: FastvmClient) {}

  /** POST /v1/vms/{id}/volumes: attach a volume (`mountPath` under /mnt/ or /data/). */
  attach(id: string, params: { volumeId: string; mountPath: string; readOnly?: boolean }): Promise<VolumeAttachmentItem> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/volumes`, {
      body: { volumeId: params.volumeId, mountPath: params.mountPath, readOnly: params.readOnly ?? false },
    });
  }

  /** DELETE /v1/vms/{id}/volumes/{volumeId}: detach a volume. */
  detach(id: string, volumeId: string): Promise<DetachVolumeResponse> {
    return this.client._call("DELETE", `/v1/vms/${seg(id)}/volumes/${seg(volumeId)}`);
  }
}

/** `client.vms.bucketMounts`: customer GCS / S3 buckets mounted into a VM. */
export class BucketMounts {
  constructor(private readonly client: FastvmClient) {}

  /** GET /v1/vms/{id}/bucket-mounts. */
  list(id: string): Promise<BucketMount[]> {
    return this.client._call("GET", `/v1/vms/${seg(id)}/bucket-mounts`);
  }

  /** POST /v1/vms/{id}/bucket-mounts: mount `gs://bucket[/prefix]` or `s3://bucket[/prefix]`. */
  attach(
    id: string,
    params: { bucketUri: string; mountPath: string; credentials: BucketMountCredentials; readOnly?: boolean },
  ): Promise<BucketMount> {
    return this.client._call("POST", `/v1/vms/${seg(id)}/bucket-mounts`, {
      body: {
        bucketUri: params.bucketUri,
        mountPath: params.mountPath,
        readOnly: params.readOnly ?? false,
        credentials: params.credentials,
      },
    });
  }

  /** GET /v1/vms/{id}/bucket-mounts/{bucketMountId}. */
  retrieve(id: string, bucketMountId: string): Promise<BucketMount> {
    return this.client._call("GET", `/v1/vms/${seg(id)}/bucket-mounts/${seg(bucketMountId)}`);
  }

  /** PATCH /v1/vms/{id}/bucket-mounts/{bucketMountId}: replace the credentials in place. */
  rotate(id: string, bucketMountId: string, params: { credentials: BucketMountCredentials }): Promise<BucketMount> {
    return this.client._call("PATCH", `/v1/vms/${seg(id)}/bucket-mounts/${seg(bucketMountId)}`, {
      body: { credentials: params.credentials },
    });
  }

  /** DELETE /v1/vms/{id}/bucket-mounts/{bucketMountId}: detach and delete. */
  async delete(id: string, bucketMountId: string): Promise<void> {
    await this.client._call("DELETE", `/v1/vms/${seg(id)}/bucket-mounts/${seg(bucketMountId)}`);
  }
}
