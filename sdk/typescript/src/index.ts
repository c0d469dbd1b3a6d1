/**
 * TypeScript SDK of Fast VM.
 *
 *     import { FastvmClient } from "fastvm";
 *
 *     const client = new FastvmClient(); // reads FASTVM_API_KEY / FASTVM_BASE_URL
 *     const vm = await client.vms.launch({ machineType: "c1m2", name: "dev" });
 *     console.log((await client.vms.run(vm.id, { command: "uname -a" })).stdout);
 */

export { FastvmClient } from "./client.js";
export type { ClientOptions, WaitForVmReadyOptions } from "./client.js";
export { DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT } from "./core.js";
export * from "./errors.js";
export type {
  VMStatus, SnapshotStatus, MachineType, PolicyAction, IngressRuleKind, EgressRuleKind,
  DNSMode, Protocol, Metadata, EnvVars, TTLAction, TTL, MountStatus, FileKind,
  DeleteResponse, HealthResponse, IngressRule, EgressRule, IngressPolicy, EgressPolicy,
  DNSPolicy, FirewallPolicy, VolumeAttachmentItem, BucketMount, VM, SnapshotService,
  SnapshotVolumeAttachment, SnapshotBucketMountAttachment, Snapshot, ExecVMResponse,
  ExecEventWire, FilePresignResponse, FileExportResponse, ConsoleTokenResponse,
  OrgQuotaValues, OrgQuotaUsage, Service, ApiErrorBody, LaunchVmRequest,
  UpdateVmRequest, ExecVmRequest, ExecEvent, SnapshotImportSourceSpec,
  SnapshotImportSourceView, SnapshotImportEvent, SnapshotImportResponse,
  ContextPresignResponse, SshKey, SshKeyListResponse, Volume,
  VolumeAttachmentItemWithVm, DetachWarning, DetachVolumeResponse,
  BucketMountCredentials,
} from "./types.js";
export type { BuildParams } from "./build.js";
export type { DownloadOptions, UploadOptions } from "./transfer.js";
export type { FirewallParams, LaunchParams, RunParams, StreamParams, UpdateParams } from "./resources/vms.js";
export type { SnapshotImportCreateParams } from "./resources/snapshots.js";
export type { VMs } from "./resources/vms.js";
export type { BucketMounts, Files, Services, VMVolumes } from "./resources/vm-subresources.js";
export type { Me, Quotas, SshKeys, Volumes } from "./resources/account.js";
export type { SnapshotImports, Snapshots } from "./resources/snapshots.js";
export { VERSION } from "./version.js";
