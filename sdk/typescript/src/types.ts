/**
 * Public types of the SDK.
 *
 * Every schema of the committed OpenAPI document (openapi/fastvm.json) comes from
 * the generated `./generated/openapi.ts` (openapi-typescript, drift-tested), under
 * the spec's names. The operations this server does not serve yet (volumes, bucket
 * mounts, SSH keys, snapshot imports) have no schema there: their types are written
 * by hand below, field for field as the API reference and the Python SDK's models
 * (sdk/python/src/fastvm/models.py) define them.
 *
 * Wire names are already camelCase (`memoryMiB`, `sizeGiB`, `expiresAtMs`), so the
 * objects the SDK returns are the server's JSON as is.
 */

import type { components } from "./generated/openapi.js";

type S = components["schemas"];

// --- from the OpenAPI document ------------------------------------------------------

export type VMStatus = S["VMStatus"];
export type SnapshotStatus = S["SnapshotStatus"];
/** Machine size identifier, e.g. `c1m2`, `c2m4`. */
export type MachineType = string;
export type PolicyAction = S["PolicyAction"];
export type IngressRuleKind = S["IngressRuleKind"];
export type EgressRuleKind = S["EgressRuleKind"];
export type DNSMode = S["DNSMode"];
export type Protocol = S["Protocol"];
export type Metadata = S["Metadata"];
export type EnvVars = S["EnvVars"];
export type TTLAction = S["TtlAction"];
export type TTL = S["Ttl"];
export type MountStatus = S["MountStatus"];
export type FileKind = S["FileKind"];

export type DeleteResponse = S["DeleteResponse"];
export type HealthResponse = S["HealthResponse"];
export type IngressRule = S["IngressRule"];
export type EgressRule = S["EgressRule"];
export type IngressPolicy = S["IngressPolicy"];
export type EgressPolicy = S["EgressPolicy"];
export type DNSPolicy = S["DNSPolicy"];
export type FirewallPolicy = S["FirewallPolicy"];
export type VolumeAttachmentItem = S["VolumeAttachmentItem"];
export type BucketMount = S["BucketMount"];
export type VM = S["VM"];
export type SnapshotService = S["SnapshotService"];
export type SnapshotVolumeAttachment = S["SnapshotVolumeAttachment"];
export type SnapshotBucketMountAttachment = S["SnapshotBucketMountAttachment"];
export type Snapshot = S["Snapshot"];
export type ExecVMResponse = S["ExecVMResponse"];
/** One line of the NDJSON exec stream as the server sends it (see {@link ExecEvent}). */
export type ExecEventWire = S["ExecEvent"];
export type FilePresignResponse = S["FilePresignResponse"];
export type FileExportResponse = S["FileExportResponse"];
export type ConsoleTokenResponse = S["ConsoleTokenResponse"];
export type OrgQuotaValues = S["OrgQuotaValues"];
export type OrgQuotaUsage = S["OrgQuotaUsage"];
export type Service = S["Service"];
export type ApiErrorBody = S["ApiErrorBody"];

/** Request bodies, as the OpenAPI document defines them. */
export type LaunchVmRequest = S["LaunchVmRequest"];
export type UpdateVmRequest = S["UpdateVmRequest"];
export type ExecVmRequest = S["ExecVmRequest"];

/**
 * One event of the streaming exec (`client.vms.stream`), decoded from the wire's
 * short names (`{"t","d","c","to","ms"}`).
 *
 * - `type`: `"o"` stdout chunk, `"e"` stderr chunk, `"x"` exit event.
 * - `data`: for `o`/`e` the chunk's raw bytes (decoded from base64); for `x` the
 *   server's optional diagnostic (e.g. a spawn failure) as UTF-8, empty when none.
 * - `exitCode`, `timedOut`, `durationMs`: set on `x` events only.
 * - `diagnostic`: the `x` event's diagnostic as text (`""` when none or not `x`).
 */
export interface ExecEvent {
  type: "o" | "e" | "x";
  data: Buffer;
  exitCode?: number;
  timedOut?: boolean;
  durationMs?: number;
  diagnostic: string;
}

// --- hand-written: operations the OpenAPI document does not list yet ---------------

/** `{"type": "image", ...}` or `{"type": "dockerfile", ...}`; the other variant's fields must be omitted. */
export interface SnapshotImportSourceSpec {
  type: "image" | "dockerfile";
  /** OCI image reference; required when `type` is `image`. */
  image?: string;
  /** `<os>/<arch>`, default `linux/amd64`; image variant only. */
  platform?: string;
  registryUsername?: string;
  registryPassword?: string;
  registryHost?: string;
  /** Token from `snapshotImports.presignContext`; required when `type` is `dockerfile`. */
  contextRef?: string;
  /** Relative to the context root, default `Dockerfile`. */
  dockerfilePath?: string;
  buildArgs?: Record<string, string>;
  target?: string;
}

/** The public view of an import's source (secrets stripped). */
export interface SnapshotImportSourceView {
  type?: "image" | "dockerfile";
  image?: string;
  platform?: string;
  registryUsername?: string;
  registryHost?: string;
  dockerfilePath?: string;
  buildArgs?: Record<string, string>;
  target?: string;
  contextSizeBytes?: number;
}

export interface SnapshotImportEvent {
  phase?: string;
  status?: string;
  timestampMs?: number;
  message?: string;
}

export interface SnapshotImportResponse {
  id: string;
  name?: string;
  /** pending, claimed, running, succeeded, failed, cancelled (open set). */
  status: string;
  source?: SnapshotImportSourceView;
  events?: SnapshotImportEvent[];
  /** Set when `status` is `succeeded`. */
  snapshotId?: string;
  /** Set when `status` is `failed`. */
  error?: string;
  machineName?: string;
  cpu?: number;
  memoryMiB?: number;
  diskGiB?: number;
  createdAt?: string;
  startedAt?: string;
  updatedAt?: string;
  finishedAt?: string;
}

export interface ContextPresignResponse {
  contextRef: string;
  uploadUrl: string;
  expiresInSec?: number;
  maxUploadBytes?: number;
}

export interface SshKey {
  name?: string;
  publicKey: string;
  fingerprint: string;
  createdAt?: string;
}

export interface SshKeyListResponse {
  keys: SshKey[];
}

export interface Volume {
  id: string;
  name: string;
  orgId?: string;
  /** `rw` or `ro` (open set). */
  accessMode: string;
  sizeGiB: number;
  /** creating, ready, deleting (open set). */
  status: string;
  pendingSizeGiB?: number;
  mountedCount?: number;
  /** Omitted when the server cannot measure it. */
  usedGiB?: number;
  createdAt?: string;
}

export interface VolumeAttachmentItemWithVm extends VolumeAttachmentItem {
  vmId: string;
}

export interface DetachWarning {
  /** `ack_timeout`, `guest_unresponsive` (open set). */
  type: string;
  message?: string;
}

export interface DetachVolumeResponse {
  detached: boolean;
  warnings?: DetachWarning[];
}

/**
 * Customer credentials of a bucket mount (never returned by the API). `value` is sent
 * verbatim, e.g. `{ type: "aws-credentials", value: { data: iniText } }`.
 */
export interface BucketMountCredentials {
  type: string;
  value: Record<string, unknown>;
}
