"""Typed models of every schema of the API.

All are ``@dataclass(kw_only=True)`` classes built on :class:`fastvm._model.Model`:
snake_case attributes, camelCase on the wire (``memory_mi_b`` <-> ``memoryMiB``),
``from_dict`` tolerant of unknown keys (kept in ``.extra``), ``to_dict`` producing
wire names. Every attribute defaults to ``None`` because the server may omit fields.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Mapping, Optional

from ._model import Model, wire

__all__ = [
    # primitives / aliases
    "VMStatus",
    "SnapshotStatus",
    "MachineType",
    "PolicyAction",
    "IngressRuleKind",
    "EgressRuleKind",
    "DNSMode",
    "Protocol",
    "Metadata",
    "EnvVars",
    "TTLAction",
    # objects
    "DeleteResponse",
    "HealthResponse",
    "TTL",
    "IngressRule",
    "EgressRule",
    "IngressPolicy",
    "EgressPolicy",
    "DNSPolicy",
    "FirewallPolicy",
    "VolumeAttachmentItem",
    "VolumeAttachmentItemWithVm",
    "BucketMount",
    "BucketMountCredentials",
    "VM",
    "SnapshotService",
    "SnapshotVolumeAttachment",
    "SnapshotBucketMountAttachment",
    "Snapshot",
    "SnapshotImportSourceSpec",
    "SnapshotImportSourceView",
    "SnapshotImportEvent",
    "SnapshotImportResponse",
    "ContextPresignResponse",
    "ExecEvent",
    "ExecVMResponse",
    "FilePresignResponse",
    "ConsoleTokenResponse",
    "SshKey",
    "SshKeyListResponse",
    "OrgQuotaValues",
    "OrgQuotaUsage",
    "Service",
    "Volume",
    "DetachWarning",
    "DetachVolumeResponse",
]

# --- primitives -------------------------------------------------------------------

VMStatus = str
"""provisioning, running, stopped, pausing, paused, resuming, deleting, error (open set)."""
SnapshotStatus = str
"""creating, ready, error (open set)."""
MachineType = str
"""Machine size identifier, e.g. ``c1m2``, ``c2m4``."""
PolicyAction = Literal["allow", "deny"]
IngressRuleKind = Literal["cidr"]
EgressRuleKind = Literal["cidr", "fqdn"]
DNSMode = Literal["allow", "deny"]
Protocol = Literal["tcp", "udp", "any"]
TTLAction = Literal["pause", "delete"]
Metadata = Dict[str, str]
"""Free-form string->string labels (keys are never case-converted)."""
EnvVars = Dict[str, str]
"""Environment variables injected at boot (keys are never case-converted)."""


# --- small shared objects ---------------------------------------------------------


@dataclass(kw_only=True)
class DeleteResponse(Model):
    id: Optional[str] = None
    deleted: Optional[bool] = None


@dataclass(kw_only=True)
class HealthResponse(Model):
    status: Optional[str] = None


@dataclass(kw_only=True)
class TTL(Model):
    """VM auto-action timer: after ``seconds`` of running, ``action`` happens."""

    seconds: Optional[int] = None
    action: Optional[str] = None  # "pause" | "delete"


# --- firewall ---------------------------------------------------------------------


@dataclass(kw_only=True)
class IngressRule(Model):
    kind: Optional[str] = "cidr"
    value: Optional[str] = None
    """CIDR, e.g. ``::/0`` or ``10.0.0.0/8``."""
    protocol: Optional[str] = None  # "tcp" | "udp" | "any"
    ports: Optional[str] = None
    """``443``, ``8080-8090`` or ``any`` (must be ``any`` when protocol is ``any``)."""
    action: Optional[str] = None  # "allow" | "deny"
    description: Optional[str] = None


@dataclass(kw_only=True)
class EgressRule(Model):
    kind: Optional[str] = None  # "cidr" | "fqdn"
    value: Optional[str] = None
    """CIDR for ``kind="cidr"``; domain (optional leading ``*.``) for ``kind="fqdn"``."""
    protocol: Optional[str] = None
    ports: Optional[str] = None
    action: Optional[str] = None
    description: Optional[str] = None


@dataclass(kw_only=True)
class IngressPolicy(Model):
    default_action: Optional[str] = None  # "allow" | "deny"
    rules: Optional[List[IngressRule]] = None


@dataclass(kw_only=True)
class EgressPolicy(Model):
    default_action: Optional[str] = None
    rules: Optional[List[EgressRule]] = None


@dataclass(kw_only=True)
class DNSPolicy(Model):
    mode: Optional[str] = None  # "allow" | "deny"
    domains: Optional[List[str]] = None
    block_bypass: Optional[bool] = None


@dataclass(kw_only=True)
class FirewallPolicy(Model):
    """All blocks optional; the server substitutes ingress deny / egress allow /
    dns deny-nothing for missing ones."""

    ingress: Optional[IngressPolicy] = None
    egress: Optional[EgressPolicy] = None
    dns: Optional[DNSPolicy] = None


# --- volumes and bucket mounts ----------------------------------------------------


@dataclass(kw_only=True)
class VolumeAttachmentItem(Model):
    volume_id: Optional[str] = None
    mount_path: Optional[str] = None
    read_only: Optional[bool] = None
    mount_status: Optional[str] = None  # mounted | failed | pending
    status_message: Optional[str] = None


@dataclass(kw_only=True)
class VolumeAttachmentItemWithVm(VolumeAttachmentItem):
    vm_id: Optional[str] = None


@dataclass(kw_only=True)
class BucketMount(Model):
    id: Optional[str] = None
    vm_id: Optional[str] = None
    bucket_uri: Optional[str] = None
    mount_path: Optional[str] = None
    read_only: Optional[bool] = None
    mount_status: Optional[str] = None
    status_message: Optional[str] = None
    created_at: Optional[str] = None


@dataclass(kw_only=True)
class BucketMountCredentials(Model):
    """Customer credentials for a bucket mount (never returned by the API).

    ``type`` selects the provider shape; ``value`` is sent verbatim (its keys are
    not case-converted), e.g.::

        BucketMountCredentials(type="aws-credentials", value={"data": ini_text})
        BucketMountCredentials(type="gcp-service-account-json",
                               value={"type": "service_account", "client_email": ..., "private_key": ...})
    """

    type: Optional[str] = None
    value: Optional[Dict[str, Any]] = None


# --- VMs --------------------------------------------------------------------------


@dataclass(kw_only=True)
class VM(Model):
    id: Optional[str] = None
    name: Optional[str] = None
    org_id: Optional[str] = None
    machine_name: Optional[str] = None
    source_name: Optional[str] = None
    firewall: Optional[FirewallPolicy] = None
    effective_firewall: Optional[FirewallPolicy] = None
    metadata: Optional[Metadata] = None
    env_vars: Optional[EnvVars] = None
    public_ipv6: Optional[str] = None
    """The VM's public IPv6 address (from the server's ``--ipv6-prefix``). ``None``
    (JSON ``null``) while no address is assigned: the VM is still ``provisioning``
    (its network comes up with its first boot), its boot failed (``error``), or the
    server runs without VM networking (``fastvm serve --no-network``). A running VM
    of a networked server always has one."""
    cpu: Optional[int] = None
    memory_mi_b: Optional[int] = None
    disk_gi_b: Optional[int] = None
    status: Optional[VMStatus] = None
    created_at: Optional[str] = None
    deleted_at: Optional[str] = None
    ttl: Optional[TTL] = None
    expires_at_ms: Optional[int] = None
    ttl_remaining_ms: Optional[int] = None
    paused_at: Optional[str] = None
    status_message: Optional[str] = None
    """Why the VM is ``error`` or ``stopped`` (its boot failed, its hypervisor stopped
    responding, ...); ``None`` in every other status. An extension of the spec."""
    volumes: Optional[List[VolumeAttachmentItem]] = None
    bucket_mounts: Optional[List[BucketMount]] = None


# --- snapshots --------------------------------------------------------------------


@dataclass(kw_only=True)
class SnapshotService(Model):
    name: Optional[str] = None
    port: Optional[int] = None
    h2c: Optional[bool] = None


@dataclass(kw_only=True)
class SnapshotVolumeAttachment(Model):
    volume_id: Optional[str] = None
    mount_path: Optional[str] = None
    read_only: Optional[bool] = None


@dataclass(kw_only=True)
class SnapshotBucketMountAttachment(Model):
    bucket_uri: Optional[str] = None
    mount_path: Optional[str] = None
    read_only: Optional[bool] = None


@dataclass(kw_only=True)
class Snapshot(Model):
    id: Optional[str] = None
    name: Optional[str] = None
    org_id: Optional[str] = None
    vm_id: Optional[str] = None
    status: Optional[SnapshotStatus] = None
    machine_name: Optional[MachineType] = None
    """Machine type the snapshot was captured on; VMs restored from it get it."""
    firewall: Optional[FirewallPolicy] = None
    """The source VM's firewall policy; a restore without ``firewall`` gets it."""
    metadata: Optional[Metadata] = None
    env_vars: Optional[EnvVars] = None
    services: Optional[List[SnapshotService]] = None
    volumes: Optional[List[SnapshotVolumeAttachment]] = None
    bucket_mounts: Optional[List[SnapshotBucketMountAttachment]] = None
    created_at: Optional[str] = None


# --- snapshot imports -------------------------------------------------------------


@dataclass(kw_only=True)
class SnapshotImportSourceSpec(Model):
    """``type="image"`` uses ``image``/``platform``; ``type="dockerfile"`` uses
    ``context_ref``/``dockerfile_path``/``build_args``/``target``. ``build_args`` keys
    are sent verbatim."""

    type: Optional[str] = None  # "image" | "dockerfile"
    image: Optional[str] = None
    platform: Optional[str] = None
    registry_username: Optional[str] = None
    registry_password: Optional[str] = None
    registry_host: Optional[str] = None
    context_ref: Optional[str] = None
    dockerfile_path: Optional[str] = None
    build_args: Optional[Dict[str, str]] = None
    target: Optional[str] = None


@dataclass(kw_only=True)
class SnapshotImportSourceView(Model):
    type: Optional[str] = None
    image: Optional[str] = None
    platform: Optional[str] = None
    registry_username: Optional[str] = None
    registry_host: Optional[str] = None
    dockerfile_path: Optional[str] = None
    build_args: Optional[Dict[str, str]] = None
    target: Optional[str] = None
    context_size_bytes: Optional[int] = None


@dataclass(kw_only=True)
class SnapshotImportEvent(Model):
    phase: Optional[str] = None
    status: Optional[str] = None
    timestamp_ms: Optional[int] = None
    message: Optional[str] = None


@dataclass(kw_only=True)
class SnapshotImportResponse(Model):
    id: Optional[str] = None
    name: Optional[str] = None
    status: Optional[str] = None
    """pending, claimed, running, succeeded, failed, cancelled (open set)."""
    source: Optional[SnapshotImportSourceView] = None
    events: Optional[List[SnapshotImportEvent]] = None
    snapshot_id: Optional[str] = None
    error: Optional[str] = None
    machine_name: Optional[str] = None
    cpu: Optional[int] = None
    memory_mi_b: Optional[int] = None
    disk_gi_b: Optional[int] = None
    created_at: Optional[str] = None
    started_at: Optional[str] = None
    updated_at: Optional[str] = None
    finished_at: Optional[str] = None


@dataclass(kw_only=True)
class ContextPresignResponse(Model):
    context_ref: Optional[str] = None
    upload_url: Optional[str] = None
    expires_in_sec: Optional[int] = None
    max_upload_bytes: Optional[int] = None


# --- exec -------------------------------------------------------------------------


@dataclass(kw_only=True)
class ExecEvent(Model):
    """One event of the NDJSON exec stream (wire ``{"t","d","c","to","ms"}``).

    * ``type``: ``"o"`` stdout chunk, ``"e"`` stderr chunk, ``"x"`` exit event.
    * ``data``: always ``bytes``. For ``o``/``e`` the chunk decoded from base64. For
      ``x`` the server's optional diagnostic string (e.g. a spawn failure) encoded as
      UTF-8, ``b""`` when absent; :attr:`diagnostic` gives it as ``str``.
    * ``exit_code``, ``timed_out``, ``duration_ms``: set on ``x`` events only.
    """

    type: Optional[str] = wire("t")
    data: bytes = wire("d", b"")
    exit_code: Optional[int] = wire("c")
    timed_out: Optional[bool] = wire("to")
    duration_ms: Optional[int] = wire("ms")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | ExecEvent) -> ExecEvent:
        event = super().from_dict(data)
        if isinstance(event.data, str):
            if event.type in ("o", "e"):
                event.data = base64.b64decode(event.data)
            else:
                event.data = event.data.encode("utf-8")
        elif event.data is None:
            event.data = b""
        return event

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if self.type in ("o", "e"):
            out["d"] = base64.b64encode(self.data).decode("ascii")
        elif self.data:
            out["d"] = self.data.decode("utf-8", "replace")
        else:
            out.pop("d", None)
        return out

    @property
    def diagnostic(self) -> str:
        """For ``x`` events: the diagnostic message as text (``""`` when none)."""
        return self.data.decode("utf-8", "replace") if self.type == "x" else ""


@dataclass(kw_only=True)
class ExecVMResponse(Model):
    exit_code: Optional[int] = None
    stdout: Optional[str] = None
    stderr: Optional[str] = None
    timed_out: Optional[bool] = None
    stdout_truncated: Optional[bool] = None
    stderr_truncated: Optional[bool] = None
    duration_ms: Optional[int] = None


# --- files / console / ssh --------------------------------------------------------


@dataclass(kw_only=True)
class FilePresignResponse(Model):
    upload_url: Optional[str] = None
    download_url: Optional[str] = None
    expires_in_sec: Optional[int] = None
    max_upload_bytes: Optional[int] = None


@dataclass(kw_only=True)
class ConsoleTokenResponse(Model):
    token: Optional[str] = None
    expires_in_sec: Optional[int] = None
    websocket_path: Optional[str] = None
    """Combine as ``wss://<host><websocket_path>?session=<token>``."""


@dataclass(kw_only=True)
class SshKey(Model):
    name: Optional[str] = None
    public_key: Optional[str] = None
    fingerprint: Optional[str] = None
    created_at: Optional[str] = None


@dataclass(kw_only=True)
class SshKeyListResponse(Model):
    keys: Optional[List[SshKey]] = None


@dataclass(kw_only=True)
class SshGatewayInfo(Model):
    """Extension: how to reach the SSH gateway (``client.me.ssh_gateway()``)."""

    host_keys: Optional[List[str]] = None
    port: Optional[int] = None


# --- quotas -----------------------------------------------------------------------


@dataclass(kw_only=True)
class OrgQuotaValues(Model):
    vcpu: Optional[int] = None
    memory_mi_b: Optional[int] = None
    disk_gi_b: Optional[int] = None
    snapshot_count: Optional[int] = None
    volume_count: Optional[int] = None
    volume_gi_b: Optional[int] = None


@dataclass(kw_only=True)
class OrgQuotaUsage(Model):
    org_id: Optional[str] = None
    limits: Optional[OrgQuotaValues] = None
    usage: Optional[OrgQuotaValues] = None


# --- services ---------------------------------------------------------------------


@dataclass(kw_only=True)
class Service(Model):
    name: Optional[str] = None
    port: Optional[int] = None
    h2c: Optional[bool] = None
    url: Optional[str] = None
    """Extension of this server: the service's full URL through the proxy
    (``http://<name>--<vmIdHex>.proxy.<domain>:<port>/``); ``None`` when the
    server runs no proxy."""


# --- volumes ----------------------------------------------------------------------


@dataclass(kw_only=True)
class Volume(Model):
    id: Optional[str] = None
    name: Optional[str] = None
    org_id: Optional[str] = None
    access_mode: Optional[str] = None  # "rw" | "ro"
    size_gi_b: Optional[int] = None
    status: Optional[str] = None  # creating | ready | deleting
    pending_size_gi_b: Optional[int] = None
    mounted_count: Optional[int] = None
    used_gi_b: Optional[int] = None
    """GiB used inside the volume (rounded down). The server omits ``usedGiB`` when
    it cannot measure it (never sends ``null``); then this is ``None``."""
    created_at: Optional[str] = None


@dataclass(kw_only=True)
class DetachWarning(Model):
    type: Optional[str] = None
    message: Optional[str] = None


@dataclass(kw_only=True)
class DetachVolumeResponse(Model):
    detached: Optional[bool] = None
    warnings: Optional[List[DetachWarning]] = None
