//! The [`Worker`] trait: the control plane's only view of a VM host.
//!
//! Placement and lifecycle logic talk to workers only through this trait, never
//! to QEMU. Two implementations: `fastvm_worker::LocalWorker` over the
//! in-process runtime (single host), and [`crate::RemoteWorker`] over the
//! internal worker API of a `fastvm worker` process (cluster mode).
//!
//! Workers know nothing of orgs, names or API statuses: they run VM processes
//! by id and report each one's [`VmState`], and keep snapshots (memory,
//! device state and frozen disk layers) by id. A snapshot lives on the worker
//! that captured it, and in the cluster's snapshot store when there is one.

use crate::exec::{ExecEvent, ExecRequest};
use crate::machines::MachineType;
use crate::terminal::{PtySession, PtySpec};
use async_trait::async_trait;
use fastvm_types::{FirewallPolicy, SnapshotId, VmId};
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What the host knows about a VM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", content = "message", rename_all = "lowercase")]
pub enum VmState {
    Running,
    Paused,
    Stopped,
    Error(String),
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmState::Running => f.write_str("running"),
            VmState::Paused => f.write_str("paused"),
            VmState::Stopped => f.write_str("stopped"),
            VmState::Error(m) => write!(f, "error ({m})"),
        }
    }
}

/// Errors of a worker operation; each message says what failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum WorkerError {
    /// The worker has no such VM.
    #[error("{0}")]
    NotFound(String),
    /// The worker has no such snapshot.
    #[error("{0}")]
    NoSuchSnapshot(String),
    /// The VM's process state forbids the operation.
    #[error("{0}")]
    WrongState(String),
    #[error("{0}")]
    UnknownMachineType(String),
    /// The exec request was refused (by the worker or the guest agent).
    #[error("{0}")]
    InvalidExec(String),
    /// The guest agent cannot be reached (or broke the protocol).
    #[error("{0}")]
    AgentUnavailable(String),
    /// The VM has as many execs and guest connections open as it may have.
    #[error("{0}")]
    TooManyExecs(String),
    /// Nothing accepted the connection to a port in the guest (nothing
    /// listens there, or the VM has no network).
    #[error("{0}")]
    ConnectRefused(String),
    /// The worker or the guest did not answer in time.
    #[error("{0}")]
    Timeout(String),
    /// A volume operation failed (no such volume on this worker, the guest
    /// could not mount it, it is still attached, ...).
    #[error("{0}")]
    Volume(String),
    /// The worker itself cannot be reached (a remote worker that is down).
    #[error("{0}")]
    Unreachable(String),
    /// The VM's hypervisor stopped answering: the VM is marked failed
    /// (`error` with a message) and only a delete helps.
    #[error("{0}")]
    Unresponsive(String),
    /// An image import failed for a reason the user can act on (a bad
    /// reference, refused credentials, a missing platform, an image that
    /// does not boot); the message is safe to show them.
    #[error("{0}")]
    Import(String),
    /// Anything else (QEMU, disks, images).
    #[error("{0}")]
    Failed(String),
}

/// What to boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSpec {
    pub id: VmId,
    /// The machine shape (for a restore: the snapshot's).
    pub machine: MachineType,
    pub hostname: String,
    /// The guest's environment. On a restore an empty map keeps the
    /// snapshot's environment.
    pub env: BTreeMap<String, String>,
    /// Restore this snapshot (of this worker) instead of launching the
    /// machine type's fresh state.
    pub snapshot: Option<SnapshotId>,
    /// The VM's firewall (validated), enforced from its first packet.
    pub firewall: FirewallPolicy,
}

/// Events of one exec, ending with `Exit`. Dropping the stream before the
/// exit cancels the process. The stream is pulled: output is only read
/// from the guest as the consumer polls, so a slow consumer slows the guest.
pub type ExecEvents = BoxStream<'static, Result<ExecEvent, WorkerError>>;

/// Bytes fed to a process's stdin (or read from a staging object).
pub type ByteStream = BoxStream<'static, Result<bytes::Bytes, std::io::Error>>;

/// Counters a worker reports (metrics).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerStats {
    /// Guest agent connections re-established since the worker started.
    pub agent_reconnects: u64,
}

/// A byte stream both ways, e.g. a TCP connection to a port in a guest.
pub trait GuestIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> GuestIo for T {}

/// A connection into a guest, opened by [`Worker::connect`]. Whatever the
/// transport (a socket in the VM's network namespace for the embedded
/// worker, a tunnel for a remote one), callers see bytes both ways.
pub type GuestStream = Box<dyn GuestIo>;

/// What went wrong, though not fatally, while detaching a volume: the
/// volume is detached from the VM either way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "message", rename_all = "snake_case")]
pub enum DetachNote {
    /// Processes in the guest still used the mount: it was detached lazily
    /// and they get errors from then on.
    Busy(String),
    /// The guest did not answer (or was paused): it still has the mount,
    /// which now answers errors (the worker stopped serving it).
    GuestUnresponsive(String),
}

/// A bucket to mount in a running VM. The credentials travel to the worker
/// only; it signs the bucket requests, the guest never sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BucketAttach {
    /// `bm_<22 hex>`.
    pub mount: String,
    /// `s3://<bucket>[/prefix]` or `gs://<bucket>[/prefix]`.
    pub bucket_uri: String,
    /// Where it appears in the guest.
    pub mount_path: String,
    pub read_only: bool,
    pub credentials: fastvm_types::bucket_mount::BucketMountCredentials,
}

/// An OCI image to turn into a snapshot ([`Worker::import_image`]).
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageImport {
    /// The import's id (names its build VM and scratch files).
    pub import_id: String,
    /// The snapshot to produce.
    pub snapshot: SnapshotId,
    /// Image reference (`registry/repo:tag`, `repo@sha256:...`).
    pub image: String,
    /// `os/arch[/variant]`; `linux/amd64` when `None`.
    pub platform: Option<String>,
    /// Registry credentials of this import only (never stored).
    pub registry_username: Option<String>,
    pub registry_password: Option<String>,
    /// Shape of the build VM and of the snapshot.
    pub machine: MachineType,
    pub disk_gib: u32,
}

impl std::fmt::Debug for ImageImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageImport")
            .field("import_id", &self.import_id)
            .field("snapshot", &self.snapshot)
            .field("image", &self.image)
            .field("platform", &self.platform)
            .field("registry_username", &self.registry_username)
            .field(
                "registry_password",
                &self.registry_password.as_ref().map(|_| "<redacted>"),
            )
            .field("machine", &self.machine)
            .field("disk_gib", &self.disk_gib)
            .finish()
    }
}

/// The id of the builder VM of Dockerfile import `import_id` (and back: the
/// mapping is its own inverse). Both the worker, which names the VM, and the
/// control plane, which must recognise it as an import's (it has no VM row),
/// derive it from the import id. `None` when `import_id` is not a UUID.
pub fn builder_vm_id(import_id: &str) -> Option<uuid::Uuid> {
    // Flips bits of the node field only: version and variant stay.
    const MASK: u128 = 0xb11d_0b11d;
    uuid::Uuid::parse_str(import_id)
        .ok()
        .map(|u| uuid::Uuid::from_u128(u.as_u128() ^ MASK))
}

/// A Dockerfile build to turn into a snapshot ([`Worker::build_dockerfile`]).
/// The build context (a ZIP archive) travels beside it as a byte stream.
#[derive(Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DockerfileImport {
    /// The import's id (names its VMs and scratch files).
    pub import_id: String,
    /// The snapshot to produce.
    pub snapshot: SnapshotId,
    /// The Dockerfile's path in the context (relative, checked).
    pub dockerfile_path: String,
    /// `--build-arg KEY=VALUE` pairs.
    pub build_args: BTreeMap<String, String>,
    /// `--target` stage (`None`: the last one).
    pub target: Option<String>,
    /// The registry `registry_username`/`registry_password` are for
    /// (`host[:port]`); `FROM` images of other registries are pulled
    /// anonymously.
    pub registry_host: Option<String>,
    pub registry_username: Option<String>,
    pub registry_password: Option<String>,
    /// Size of the context archive that follows (bytes).
    pub context_bytes: u64,
    /// Shape of the builder VM and of the snapshot.
    pub machine: MachineType,
    pub disk_gib: u32,
}

impl std::fmt::Debug for DockerfileImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DockerfileImport")
            .field("import_id", &self.import_id)
            .field("snapshot", &self.snapshot)
            .field("dockerfile_path", &self.dockerfile_path)
            .field("build_args", &self.build_args.keys().collect::<Vec<_>>())
            .field("target", &self.target)
            .field("registry_host", &self.registry_host)
            .field("registry_username", &self.registry_username)
            .field(
                "registry_password",
                &self.registry_password.as_ref().map(|_| "<redacted>"),
            )
            .field("context_bytes", &self.context_bytes)
            .field("machine", &self.machine)
            .field("disk_gib", &self.disk_gib)
            .finish()
    }
}

/// Progress of an import: phase events and build-log lines.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ImportNote {
    /// A phase (`pull`, `export`, `saving`, `warming`) `started`,
    /// `completed` or `failed`, with a user-safe message.
    Event {
        phase: String,
        status: String,
        message: Option<String>,
    },
    /// One line of the build log.
    Log { line: String },
}

/// Where [`Worker::import_image`] reports progress.
pub type ImportSink = std::sync::Arc<dyn Fn(ImportNote) + Send + Sync>;

/// What an import produced (the snapshot is on the worker, like a capture's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImportedImage {
    /// Digest of the image manifest that was imported.
    pub manifest_digest: String,
    /// The image's `Env` (the snapshot's VMs see it under their own env).
    pub env: BTreeMap<String, String>,
    /// The image's `WorkingDir` and `User`: defaults of every exec.
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

fn no_buckets() -> WorkerError {
    WorkerError::Volume("bucket mounts are not supported on this worker".into())
}

fn no_volumes() -> WorkerError {
    WorkerError::Volume("volumes are not supported on this worker yet".into())
}

/// A host that runs VMs.
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    /// Stable id of this worker (stored with each VM it runs).
    fn id(&self) -> &str;
    /// Boot a VM and wait until its guest agent answers.
    async fn create(&self, spec: VmSpec) -> Result<(), WorkerError>;
    /// The process state of `id`; `None` when the worker does not know it.
    /// An error means the worker could not say (callers keep what they knew).
    async fn state(&self, id: VmId) -> Result<Option<VmState>, WorkerError>;
    /// Every VM the worker knows, with its state.
    async fn list(&self) -> Result<Vec<(VmId, VmState)>, WorkerError>;
    /// Stop the vCPUs, keeping memory.
    async fn pause(&self, id: VmId) -> Result<(), WorkerError>;
    async fn resume(&self, id: VmId) -> Result<(), WorkerError>;
    /// Kill the VM and remove its files; a VM the worker does not know is
    /// already deleted (`Ok`).
    async fn delete(&self, id: VmId) -> Result<(), WorkerError>;
    /// Start a process in the running VM.
    async fn exec(&self, id: VmId, req: ExecRequest) -> Result<ExecEvents, WorkerError>;
    /// Start a process whose stdin is `input` (then EOF), pulled only as the
    /// guest consumes it. When `input` fails, the process is killed and the
    /// events end with that error (a partial input never looks complete).
    /// The default refuses (a worker without stdin support).
    async fn exec_with_input(
        &self,
        id: VmId,
        req: ExecRequest,
        input: ByteStream,
    ) -> Result<ExecEvents, WorkerError> {
        let _ = (id, req, input);
        Err(WorkerError::Failed(
            "this worker cannot feed a process's stdin".into(),
        ))
    }
    /// Capture the running or paused VM `vm` as snapshot `snapshot`: memory,
    /// device state and disk. The VM keeps running (a paused VM stays
    /// paused). On failure nothing of the snapshot is left behind.
    async fn snapshot(&self, vm: VmId, snapshot: SnapshotId) -> Result<(), WorkerError>;
    /// Remove a snapshot. VMs restored from it keep working (their disk
    /// layers are reference-collected). An unknown snapshot is already
    /// deleted (`Ok`).
    async fn delete_snapshot(&self, snapshot: SnapshotId) -> Result<(), WorkerError>;
    /// Pull `job.image`, make a root disk of it, boot it once and capture
    /// the running VM as snapshot `job.snapshot`. Dropping the future
    /// cancels the import: its build VM and scratch files are removed.
    async fn import_image(
        &self,
        job: ImageImport,
        progress: ImportSink,
    ) -> Result<ImportedImage, WorkerError> {
        let _ = (job, progress);
        Err(WorkerError::Failed(
            "this worker cannot import images".into(),
        ))
    }
    /// Build `job`'s Dockerfile against `context` (a ZIP archive of
    /// `job.context_bytes` bytes) in a builder VM, make a root disk of the
    /// result, boot it once and capture it as snapshot `job.snapshot`.
    /// Dropping the future cancels the build: its VMs and scratch files are
    /// removed.
    async fn build_dockerfile(
        &self,
        job: DockerfileImport,
        context: ByteStream,
        progress: ImportSink,
    ) -> Result<ImportedImage, WorkerError> {
        let _ = (job, context, progress);
        Err(WorkerError::Failed(
            "this worker cannot build Dockerfiles".into(),
        ))
    }
    /// Replace the firewall of a VM; a running VM enforces it within a
    /// second, without a restart.
    async fn set_firewall(&self, id: VmId, policy: &FirewallPolicy) -> Result<(), WorkerError>;
    /// The firewall policy the worker knows VM `id` enforces; `Ok(None)`
    /// when it enforces nothing known (a push failed half-way, or the VM has
    /// no network): the control plane's reconciler then pushes the stored
    /// one. The default cannot tell (an error: the reconciler skips it).
    async fn enforced_firewall(&self, id: VmId) -> Result<Option<FirewallPolicy>, WorkerError> {
        let _ = id;
        Err(WorkerError::Failed(
            "this worker does not report enforced firewalls".into(),
        ))
    }
    /// The VM's public IPv6 address, when it has a network.
    async fn public_ipv6(&self, _id: VmId) -> Result<Option<String>, WorkerError> {
        Ok(None)
    }
    /// Create volume `volume` on this worker, or change its size limit and
    /// mode (at once in every guest it is attached to). Its files stay.
    async fn put_volume(
        &self,
        volume: &str,
        size_bytes: u64,
        read_only: bool,
    ) -> Result<(), WorkerError> {
        let _ = (volume, size_bytes, read_only);
        Err(no_volumes())
    }
    /// Remove volume `volume` and its files (refused while attached here).
    async fn delete_volume(&self, volume: &str) -> Result<(), WorkerError> {
        let _ = volume;
        Err(no_volumes())
    }
    /// Bytes the files of volume `volume` occupy.
    async fn volume_used_bytes(&self, volume: &str) -> Result<u64, WorkerError> {
        let _ = volume;
        Err(no_volumes())
    }
    /// Mount volume `volume` at `mount_path` in the running VM `id`.
    async fn attach_volume(
        &self,
        id: VmId,
        volume: &str,
        mount_path: &str,
        read_only: bool,
    ) -> Result<(), WorkerError> {
        let _ = (id, volume, mount_path, read_only);
        Err(no_volumes())
    }
    /// Unmount volume `volume` from VM `id` and stop serving it there; a
    /// note when that did not go cleanly (the VM keeps running either way).
    async fn detach_volume(
        &self,
        id: VmId,
        volume: &str,
    ) -> Result<Option<DetachNote>, WorkerError> {
        let _ = (id, volume);
        Err(no_volumes())
    }
    /// Mount a bucket in the running VM `id`.
    async fn attach_bucket(&self, id: VmId, bucket: &BucketAttach) -> Result<(), WorkerError> {
        let _ = (id, bucket);
        Err(no_buckets())
    }
    /// New credentials for bucket mount `mount` of VM `id` (of bucket
    /// `bucket_uri`): checked, then used from the next request on.
    async fn rotate_bucket(
        &self,
        id: VmId,
        mount: &str,
        bucket_uri: &str,
        credentials: &fastvm_types::bucket_mount::BucketMountCredentials,
    ) -> Result<(), WorkerError> {
        let _ = (id, mount, bucket_uri, credentials);
        Err(no_buckets())
    }
    /// Unmount bucket mount `mount` from VM `id`; a note when that did not
    /// go cleanly (the VM keeps running either way).
    async fn detach_bucket(
        &self,
        id: VmId,
        mount: &str,
    ) -> Result<Option<DetachNote>, WorkerError> {
        let _ = (id, mount);
        Err(no_buckets())
    }
    /// The bucket mounts served to VM `id`: mount id -> the last error its
    /// bucket answered (None: none since mounting or the last rotation).
    async fn bucket_health(
        &self,
        id: VmId,
    ) -> Result<BTreeMap<String, Option<String>>, WorkerError> {
        let _ = id;
        Err(no_buckets())
    }
    /// The worker's counters; an error means it cannot be reached.
    async fn stats(&self) -> Result<WorkerStats, WorkerError> {
        Ok(WorkerStats::default())
    }
    /// Open a TCP connection to `port` inside the running VM `id` (the
    /// services proxy, port forwards). The connection reaches the guest the
    /// way outside traffic does, so the VM's enforced firewall (user policy
    /// plus the services' auto rules) applies to it.
    async fn connect(&self, id: VmId, port: u16) -> Result<GuestStream, WorkerError> {
        let _ = (id, port);
        Err(WorkerError::Failed(
            "this worker cannot open connections into its VMs".into(),
        ))
    }
    /// Let go of every VM without stopping them (server shutdown).
    fn detach(&self) {}
    /// Open an interactive terminal in the running VM: `spec.argv` (the
    /// guest's login shell when empty) on a pseudo-terminal of the given
    /// size, in its own session (job control, Ctrl-C). See [`PtySession`].
    /// The default refuses (a worker without terminals).
    async fn open_pty(&self, id: VmId, spec: PtySpec) -> Result<PtySession, WorkerError> {
        let _ = (id, spec);
        Err(WorkerError::Failed(
            "this worker cannot open terminals".into(),
        ))
    }
    /// Follow the VM's serial console (read-only): the last `tail_bytes` of
    /// what the guest wrote to it, then new output as it comes. Works in
    /// any state, also when the guest agent does not answer; the stream ends
    /// when the VM is deleted. The default refuses.
    async fn open_serial(&self, id: VmId, tail_bytes: u64) -> Result<ByteStream, WorkerError> {
        let _ = (id, tail_bytes);
        Err(WorkerError::Failed(
            "this worker cannot show serial consoles".into(),
        ))
    }
    /// Open a TCP connection to `host:port` *as seen from inside* the
    /// running VM `id` (e.g. a service bound to the guest's 127.0.0.1), dialed
    /// by the guest agent and carried over the agent channel: unlike
    /// [`Worker::connect`] it needs no guest network and no firewall opening
    /// (SSH `-L` forwarding). Flow-controlled both ways; EOF is a half-close;
    /// dropping the stream closes the connection in the guest.
    /// `ConnectRefused` when the guest could not dial. The default refuses.
    async fn open_guest_tcp(
        &self,
        id: VmId,
        host: &str,
        port: u16,
    ) -> Result<GuestStream, WorkerError> {
        let _ = (id, host, port);
        Err(WorkerError::Failed(
            "this worker cannot open connections inside its VMs".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::builder_vm_id;

    #[test]
    fn builder_vm_ids_map_back_to_their_import() {
        let import = "7f0b8c1e-3d2a-4b5c-9e8f-0a1b2c3d4e5f";
        let builder = builder_vm_id(import).map(|u| u.to_string());
        assert_ne!(builder.as_deref(), Some(import));
        let back = builder.as_deref().and_then(builder_vm_id);
        assert_eq!(back.map(|u| u.to_string()).as_deref(), Some(import));
        // Still a version-4 UUID of the RFC variant.
        let b = builder_vm_id(import).map(|u| (u.get_version_num(), u.get_variant()));
        assert_eq!(b, Some((4, uuid::Variant::RFC4122)));
        assert_eq!(builder_vm_id("not-a-uuid"), None);
    }
}
