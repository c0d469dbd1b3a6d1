/**
 * Org- and user-level namespaces: `client.me.sshKeys`, `client.quotas`,
 * `client.volumes`.
 */

import type { FastvmClient } from "../client.js";
import { compact, pathSegment as seg } from "../core.js";
import type {
  DeleteResponse,
  OrgQuotaUsage,
  SshKey,
  SshKeyListResponse,
  Volume,
  VolumeAttachmentItemWithVm,
} from "../types.js";

/** `client.me.sshKeys`: the calling user's authorized SSH keys. */
export class SshKeys {
  constructor(private readonly client: FastvmClient) {}

  /** GET /v1/me/ssh-keys. */
  list(): Promise<SshKeyListResponse> {
    return this.client._call("GET", "/v1/me/ssh-keys");
  }

  /** POST /v1/me/ssh-keys: register an OpenSSH public key (`ssh-ed25519 AAAA...`). */
  add(params: { publicKey: string; name?: string }): Promise<SshKey> {
    return this.client._call("POST", "/v1/me/ssh-keys", {
      body: compact({ name: params.name, publicKey: params.publicKey }),
    });
  }

  /** DELETE /v1/me/ssh-keys/{fingerprint}; the fingerprint (`SHA256:...`) is URL-encoded. */
  delete(fingerprint: string): Promise<DeleteResponse> {
    return this.client._call("DELETE", `/v1/me/ssh-keys/${seg(fingerprint)}`);
  }
}

/** `client.me`: the calling user's own resources. */
export class Me {
  readonly sshKeys: SshKeys;

  constructor(client: FastvmClient) {
    this.sshKeys = new SshKeys(client);
  }
}

/** `client.quotas`: organisation limits and usage. */
export class Quotas {
  constructor(private readonly client: FastvmClient) {}

  /** GET /v1/org/quotas. */
  retrieve(): Promise<OrgQuotaUsage> {
    return this.client._call("GET", "/v1/org/quotas");
  }
}

/** `client.volumes`: managed shared volumes. */
export class Volumes {
  constructor(private readonly client: FastvmClient) {}

  /** GET /v1/volumes. */
  list(): Promise<Volume[]> {
    return this.client._call("GET", "/v1/volumes");
  }

  /** POST /v1/volumes. `accessMode` is `"rw"` or `"ro"`. */
  create(params: { name: string; sizeGiB: number; accessMode: "rw" | "ro" }): Promise<Volume> {
    return this.client._call("POST", "/v1/volumes", {
      body: { name: params.name, sizeGiB: params.sizeGiB, accessMode: params.accessMode },
    });
  }

  /** GET /v1/volumes/{id}. */
  retrieve(id: string): Promise<Volume> {
    return this.client._call("GET", `/v1/volumes/${seg(id)}`);
  }

  /** PATCH /v1/volumes/{id}: rename, resize, or change the access mode. */
  update(id: string, params: { name?: string; sizeGiB?: number; accessMode?: "rw" | "ro" }): Promise<Volume> {
    return this.client._call("PATCH", `/v1/volumes/${seg(id)}`, {
      body: compact({ name: params.name, sizeGiB: params.sizeGiB, accessMode: params.accessMode }),
    });
  }

  /** DELETE /v1/volumes/{id}. */
  delete(id: string): Promise<DeleteResponse> {
    return this.client._call("DELETE", `/v1/volumes/${seg(id)}`);
  }

  /** GET /v1/volumes/{id}/attachments: the VMs this volume is attached to. */
  listAttachments(id: string): Promise<VolumeAttachmentItemWithVm[]> {
    return this.client._call("GET", `/v1/volumes/${seg(id)}/attachments`);
  }
}
