// Compile-only test of the public types (`npm run typecheck`): the README's usage
// type-checks against the built declarations, and misuse does not.
import {
  FastvmClient,
  FileTransferError,
  NotFoundError,
  type ExecEvent,
  type ExecVMResponse,
  type Snapshot,
  type VM,
} from "fastvm";

// Every model name the Python SDK exports (sdk/python/src/fastvm/models.py) is a type here too.
export type {
  VMStatus,
  SnapshotStatus,
  MachineType,
  PolicyAction,
  IngressRuleKind,
  EgressRuleKind,
  DNSMode,
  Protocol,
  Metadata,
  EnvVars,
  TTLAction,
  DeleteResponse,
  HealthResponse,
  TTL,
  IngressRule,
  EgressRule,
  IngressPolicy,
  EgressPolicy,
  DNSPolicy,
  FirewallPolicy,
  VolumeAttachmentItem,
  VolumeAttachmentItemWithVm,
  BucketMount,
  BucketMountCredentials,
  VM,
  SnapshotService,
  SnapshotVolumeAttachment,
  SnapshotBucketMountAttachment,
  Snapshot,
  SnapshotImportSourceSpec,
  SnapshotImportSourceView,
  SnapshotImportEvent,
  SnapshotImportResponse,
  ContextPresignResponse,
  ExecEvent,
  ExecVMResponse,
  FilePresignResponse,
  ConsoleTokenResponse,
  SshKey,
  SshKeyListResponse,
  OrgQuotaValues,
  OrgQuotaUsage,
  Service,
  Volume,
  DetachWarning,
  DetachVolumeResponse,
} from "fastvm";

export async function usage(): Promise<void> {
  const client = new FastvmClient({ apiKey: process.env["FASTVM_API_KEY"], baseUrl: "http://127.0.0.1:8080" });
  const vm: VM = await client.vms.launch({ machineType: "c1m2", name: "dev" });
  const memory: number = vm.memoryMiB;
  const r: ExecVMResponse = await client.vms.run(vm.id, { command: "uname -a", timeoutSec: 10 });
  const code: number = r.exitCode;
  await client.vms.run(vm.id, { command: ["python3", "main.py"] });
  for await (const ev of client.vms.stream(vm.id, { command: "make -j8" })) {
    const e: ExecEvent = ev;
    if (e.type === "o") process.stdout.write(e.data);
    else if (e.type === "x") console.log(e.exitCode, e.durationMs, memory, code);
  }
  await client.waitForVmReady(vm.id, { timeout: 120 });
  await client.vms.setFirewall(vm.id, { egress: { defaultAction: "deny", rules: [] } });
  await client.vms.update(vm.id, { ttl: null });
  await client.upload(vm.id, "./src", "/root/src");
  await client.download(vm.id, "/root/out.log", "./out.log", { execTimeoutSec: 60 });
  const snap: Snapshot = await client.snapshots.create({ vmId: vm.id });
  await client.vms.launch({ snapshotId: snap.id });
  await client.build({ imageRef: "python:3.13-slim" });
  try {
    await client.vms.retrieve("nope");
  } catch (e) {
    if (e instanceof NotFoundError) console.log(e.status, e.code);
    if (e instanceof FileTransferError) console.log(e.code === "ENOENT");
  }

  // @ts-expect-error: machineType is a string
  await client.vms.launch({ machineType: 2 });
  // @ts-expect-error: command is required
  await client.vms.run(vm.id, {});
  // @ts-expect-error: no such namespace
  client.vm.list();
  // @ts-expect-error: the spec's names are camelCase
  await client.vms.set_firewall(vm.id, {});
  client.close();
}
