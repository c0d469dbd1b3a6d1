//! The runtime: the VMs of this host, their state directories, and their
//! lifecycle.
//!
//! ```text
//!            create()                pause()            resume()
//!   (none) ----------> Running ------------> Paused -----------> Running
//!                        |  \                  |
//!           QEMU exits   |   \ stop()          | QEMU exits / stop()
//!        (guest off,     v    v                v
//!         killed) ----> Stopped  <-------------'
//!   create() failing -> Error(msg)      delete(): any state -> (none)
//!   a QMP timeout (wedged QEMU) in any operation -> Error(msg)
//! ```
//!
//! A wedged QEMU fails only its own VM: no host-wide lock (layers, golden
//! builds) is held while waiting on one VM's QEMU, every QMP command has a
//! budget ([`crate::timeouts`]), and `delete` SIGKILLs a failed VM's QEMU.
//!
//! State directory `<data>/vms/<id>/`: `spec.json` (what was launched),
//! `qemu.pid`, `qmp.sock`, `agent.sock`, `console.log`, `qemu.log`,
//! `net.json` (network slot and firewall policy, see [`crate::net`]). [`Runtime::open`] walks these directories and re-adopts
//! every VM whose QEMU still runs; the others are reported `Stopped`.

mod buckets;
mod builds;
mod imports;
mod volumes;

use volumes::VmVolumes;

use crate::accel::{self, Accel, AccelChoice};
use crate::agent::{AgentClient, ExecStream};
use crate::catalog::MachineType;
use crate::error::{Error, IoContext, Result};
use crate::exec::{self, ExecOutput, ExecRequest};
use crate::hypervisor::{Hypervisor, LaunchSpec, RamCapture, VmPaths, VmProcess};
use crate::images::{self, GuestImage, ImageStore, Progress};
use crate::jail;
use crate::net::{NetConfig, NetRecord, Network, VmNet};
use crate::qemu::QemuMicrovm;
use crate::snapshot_store::{self, SnapshotStore, StoredBase, StoredSnapshot};
use crate::timeouts;
use fastvm_agent_proto::GuestConfig;
use fastvm_types::FirewallPolicy;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub data_dir: PathBuf,
    pub accel: AccelChoice,
    pub qemu_binary: PathBuf,
    pub debian_mirror: String,
    /// The musl agent binary; found automatically when `None`.
    pub agent_binary: Option<PathBuf>,
    /// How long a fresh boot may take until the agent answers.
    pub boot_timeout: Duration,
    /// Where guest images are cached; `<data_dir>/images` when `None`.
    pub image_dir: Option<PathBuf>,
    /// Launch from golden snapshots (one fresh boot per image and machine
    /// type, restores afterwards). Off: every launch boots the kernel.
    pub golden: bool,
    /// Per-VM networking (namespace, tap, firewall, resolver); `None` gives
    /// VMs no network device at all (hosts without nftables).
    pub network: Option<NetConfig>,
    /// Registries (`HOST:PORT`) image imports speak plain HTTP to.
    pub insecure_registries: Vec<String>,
    /// Cap of the imports' layer cache (`<data>/oci`), least recently used
    /// blobs evicted first.
    pub layer_cache_bytes: u64,
}

impl RuntimeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        RuntimeConfig {
            data_dir: data_dir.into(),
            accel: AccelChoice::Auto,
            qemu_binary: PathBuf::from("qemu-system-x86_64"),
            debian_mirror: "http://deb.debian.org/debian".into(),
            agent_binary: None,
            boot_timeout: Duration::from_secs(120),
            image_dir: None,
            golden: true,
            network: Some(NetConfig::default()),
            insecure_registries: Vec::new(),
            layer_cache_bytes: crate::oci::cache::DEFAULT_CACHE_BYTES,
        }
    }
}

/// See [`Runtime::compat_info`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompatInfo {
    pub key: String,
    pub qemu_build: String,
    pub accel: String,
    pub cpu_model: String,
}

/// What the host knows about a VM process (shared with the control plane).
pub use fastvm_worker_api::VmState;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmInfo {
    pub id: String,
    pub machine: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_gib: u32,
    pub state: VmState,
    pub pid: Option<u32>,
    pub image_id: String,
    /// The guest's IPv6 address (from the operator's prefix), when networked.
    pub public_ipv6: Option<String>,
    /// The guest's private IPv4 address (NATed for egress).
    pub private_ipv4: Option<String>,
    pub mac: Option<String>,
}

/// A captured VM: frozen disk chain plus memory and device state.
/// Stored as `snapshot.json` in `<data>/snapshots/<id>/` (user snapshots) or
/// `<data>/golden/<key>/` (golden snapshots), next to its `memory` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub source_vm: Option<String>,
    /// The source VM's launch spec: a restore needs the same machine shape.
    pub launch: LaunchSpec,
    /// Frozen disk layers, top first.
    pub layers: Vec<PathBuf>,
    /// Device state (and RAM, unless `ram` is set).
    pub memory: PathBuf,
    /// RAM image file (golden snapshots): restores map it copy-on-write.
    #[serde(default)]
    pub ram: Option<PathBuf>,
    pub hostname: Option<String>,
    pub env: BTreeMap<String, String>,
    pub created_unix_ms: u64,
    /// [`Runtime::compat_key`] of the worker that captured it; a restore on
    /// a worker with another key is refused. `None`: recorded before keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compat_key: Option<String>,
    /// Volumes and bucket mounts mounted in the guest at capture (volume or
    /// bucket-mount id -> mount path). A restore detaches those mounts in the
    /// guest (they point at the source VM's server); the control plane
    /// attaches the volumes again (bucket mounts: once given credentials).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volume_mounts: BTreeMap<String, String>,
    /// Defaults of an imported image (its env, working dir, user), carried
    /// by every VM restored from the snapshot and by their snapshots.
    #[serde(default, skip_serializing_if = "GuestDefaults::is_empty")]
    pub guest_defaults: GuestDefaults,
}

/// What a fresh boot's root disk sits on (a new qcow2 overlay either way).
#[derive(Clone, Copy, Debug)]
pub(crate) enum RootDisk<'a> {
    /// The guest image's rootfs.
    Default,
    /// A frozen qcow2 layer (an imported image's base).
    Layer(&'a std::path::Path),
    /// Another raw ext4 image of the image store (the Dockerfile builder).
    Raw(&'a std::path::Path),
}

/// What an imported image sets for every process in its VMs: its `Env`
/// (under the VM's own env vars), `WorkingDir` and `User`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDefaults {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl GuestDefaults {
    pub fn is_empty(&self) -> bool {
        self.env.is_empty() && self.working_dir.is_none() && self.user.is_none()
    }
}

/// Layers pinned by a launch in progress ([`Runtime::pin_layers`]).
struct PinnedLayers {
    set: Arc<Mutex<Vec<PathBuf>>>,
    layers: Vec<PathBuf>,
}

impl Drop for PinnedLayers {
    fn drop(&mut self) {
        if let Ok(mut set) = self.set.lock() {
            for l in &self.layers {
                if let Some(i) = set.iter().position(|p| p == l) {
                    set.swap_remove(i);
                }
            }
        }
    }
}

/// A request to create a VM.
#[derive(Debug, Clone, Default)]
pub struct CreateVm {
    /// Chosen by the caller (the control plane's id); a new UUID when `None`.
    pub id: Option<String>,
    pub machine: String,
    pub disk_gib: Option<u32>,
    pub hostname: Option<String>,
    /// Visible to every exec in the VM. On a restore these replace the
    /// snapshot's env vars when not empty.
    pub env: BTreeMap<String, String>,
    /// Restore this snapshot instead of the machine type's golden snapshot.
    pub snapshot: Option<String>,
    /// Firewall of the VM (validated here too).
    pub firewall: FirewallPolicy,
}

/// `spec.json` of a VM directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmRecord {
    launch: LaunchSpec,
    hostname: Option<String>,
    env: BTreeMap<String, String>,
    /// Disk layers, the writable one first, then its frozen backing layers.
    #[serde(default)]
    layers: Vec<PathBuf>,
    /// An imported image's env, working dir and user.
    #[serde(default, skip_serializing_if = "GuestDefaults::is_empty")]
    defaults: GuestDefaults,
}

/// Who a new VM is in its guest: hostname, env vars, image defaults.
struct GuestIdentity {
    hostname: Option<String>,
    env: BTreeMap<String, String>,
    defaults: GuestDefaults,
}

struct Vm {
    record: VmRecord,
    /// Current disk chain (changes when the VM is snapshotted).
    layers: Mutex<Vec<PathBuf>>,
    paths: VmPaths,
    state: Mutex<VmState>,
    process: Mutex<Option<Arc<dyn VmProcess>>>,
    agent: tokio::sync::Mutex<Option<AgentClient>>,
    /// Serialises lifecycle operations of this VM.
    op: tokio::sync::Mutex<()>,
    net: Mutex<Option<Arc<VmNet>>>,
    /// The firewall policy the VM's ruleset and resolver are known to
    /// enforce; `None` when unknown (a push failed half-way, no network).
    enforced: Mutex<Option<FirewallPolicy>>,
    /// Its volume export and mounts, once a volume was attached (volumes.rs).
    volumes: tokio::sync::Mutex<Option<VmVolumes>>,
}

impl Vm {
    fn state(&self) -> VmState {
        self.state
            .lock()
            .map(|s| s.clone())
            .unwrap_or(VmState::Error("poisoned".into()))
    }
    fn set_state(&self, s: VmState) {
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
    }
    fn set_enforced(&self, policy: Option<FirewallPolicy>) {
        if let Ok(mut e) = self.enforced.lock() {
            *e = policy;
        }
    }
    /// A QMP timeout means this VM's QEMU is wedged: mark the VM failed
    /// (this VM only; nothing host-wide waits on it) and say so. Other
    /// errors pass through.
    fn fail_if_wedged(&self, action: &str, e: Error) -> Error {
        let Error::Timeout { what, after } = e else {
            return e;
        };
        let id = self.record.launch.id.clone();
        let detail = format!("QEMU did not answer {what} within {after:?} during {action}");
        tracing::error!(vm = %id, %detail, "VM unresponsive; marked failed");
        self.set_state(VmState::Error(format!(
            "the VM stopped responding (QEMU did not answer {what} within {after:?} during {action}); delete it"
        )));
        Error::Unresponsive { id, detail }
    }
    fn process(&self) -> Option<Arc<dyn VmProcess>> {
        self.process.lock().ok().and_then(|p| p.clone())
    }
    fn net(&self) -> Option<Arc<VmNet>> {
        self.net.lock().ok().and_then(|n| n.clone())
    }
    fn info(&self) -> VmInfo {
        let l = &self.record.launch;
        let net = self.net();
        VmInfo {
            id: l.id.clone(),
            machine: l.machine.clone(),
            vcpus: l.vcpus,
            memory_mib: l.memory_mib,
            disk_gib: l.disk_gib,
            state: self.state(),
            pid: self.process().filter(|p| !p.has_exited()).map(|p| p.pid()),
            image_id: l.image_id.clone(),
            public_ipv6: net.as_ref().map(|n| n.addr.guest6.to_string()),
            private_ipv4: net.as_ref().map(|n| n.addr.guest4.to_string()),
            mac: net.as_ref().map(|n| n.addr.mac.clone()),
        }
    }
    fn layers(&self) -> Vec<PathBuf> {
        self.layers.lock().map(|l| l.clone()).unwrap_or_default()
    }
    /// Persist `spec.json` with the current disk chain.
    fn save(&self) -> Result<()> {
        let mut record = self.record.clone();
        record.layers = self.layers();
        if let Some(top) = record.layers.first() {
            record.launch.disk = top.clone();
        }
        write_json_atomic(&self.paths.spec(), &record)
    }
    fn guest_config(&self) -> GuestConfig {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .and_then(|d| u64::try_from(d.as_nanos()).ok());
        let d = &self.record.defaults;
        let mut env = d.env.clone();
        env.extend(self.record.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        let exec_defaults = (d.working_dir.is_some() || d.user.is_some()).then(|| {
            fastvm_agent_proto::ExecDefaults {
                cwd: d.working_dir.clone(),
                user: d.user.clone(),
            }
        });
        GuestConfig {
            hostname: self.record.hostname.clone(),
            env,
            exec_defaults,
            time_unix_ns: now,
            entropy: (0..32).map(|_| rand::random::<u8>()).collect(),
            network: self.net().map(|n| n.guest_config()),
        }
    }
}

fn read_net_record(paths: &VmPaths) -> Option<NetRecord> {
    serde_json::from_slice(&std::fs::read(paths.dir.join("net.json")).ok()?).ok()
}

/// Write `value` as JSON to `path` via a temporary file and a rename.
fn write_json_atomic<T: Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| Error::Qemu(format!("serialize {}: {e}", path.display())))?;
    let tmp = path.with_extension("json.tmp");
    // 0600: VM directories are traversable by the VM's QEMU (see `jail`).
    crate::jail::create_private(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &bytes))
        .ctx(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("commit {}", path.display()))
}

pub struct Runtime {
    cfg: RuntimeConfig,
    /// Held while layers are collected ([`Runtime::gc_layers`]) and, briefly,
    /// while a launch pins the layers it is about to use.
    layers_lock: tokio::sync::Mutex<()>,
    /// Layers of launches and captures in progress (a new overlay, the chain
    /// under it): collection keeps them. A multiset: entries are removed by
    /// [`PinnedLayers`] when its launch has registered its VM (or failed).
    pinned_layers: Arc<Mutex<Vec<PathBuf>>>,
    /// One lock per golden snapshot key: restores of it hold it shared (its
    /// files stay put), builds and deletes exclusively (single-flight;
    /// launches of other keys never wait on them).
    golden_locks: Mutex<HashMap<String, Arc<tokio::sync::RwLock<()>>>>,
    /// The QEMU build and CPU model part of golden keys (computed once).
    qemu_build: tokio::sync::OnceCell<String>,
    /// Golden snapshots built (first builds and rebuilds) since open.
    golden_builds: std::sync::atomic::AtomicU64,
    accel: Accel,
    hv: Arc<dyn Hypervisor>,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    images: tokio::sync::OnceCell<(ImageStore, GuestImage)>,
    progress: Progress,
    net: Option<Network>,
    /// See [`Runtime::agent_reconnects`].
    agent_reconnects: std::sync::atomic::AtomicU64,
    /// See [`Runtime::set_snapshot_store`].
    store: Mutex<Option<Arc<SnapshotStore>>>,
    /// One lock per snapshot id being fetched from (or deleted in) the
    /// store: concurrent restores of one id fetch it once.
    fetch_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// See [`Runtime::store_fetches`].
    store_fetches: std::sync::atomic::AtomicU64,
    /// Volumes of this host, or why there can be none (volumes.rs).
    volumes: std::result::Result<Arc<crate::volumes::VolumeStore>, String>,
    /// Image imports that may run at once (imports.rs): each unpacks, makes a
    /// file system and boots a VM; more wait their turn.
    import_slots: tokio::sync::Semaphore,
    /// Imports hold it for reading while they run; the layer cache is pruned
    /// under the write lock, so only when none runs (oci/cache.rs).
    layer_cache: Arc<tokio::sync::RwLock<()>>,
}

impl Runtime {
    /// Open the runtime on its data dir and re-adopt the VMs found there.
    pub async fn open(cfg: RuntimeConfig) -> Result<Arc<Runtime>> {
        let vms_dir = cfg.data_dir.join("vms");
        std::fs::create_dir_all(&vms_dir).ctx(|| format!("create {}", vms_dir.display()))?;
        let accel = accel::choose(cfg.accel);
        for d in ["layers", "snapshots", "golden"] {
            std::fs::create_dir_all(cfg.data_dir.join(d)).ctx(|| format!("create {d} dir"))?;
        }
        // Fetches from the snapshot store that a previous run left half-way.
        if let Ok(entries) = std::fs::read_dir(cfg.data_dir.join("snapshots")) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".fetch-") {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let confined = crate::jail::is_root();
        if confined {
            // QEMU opens the disks, kernel and initramfs by path as the VM's uid:
            // every directory above the data dir (which is made 0711 below) and
            // an image dir of its own must be traversable by others.
            let mut reach: Vec<&std::path::Path> = cfg.data_dir.parent().into_iter().collect();
            if let Some(images) = cfg.image_dir.as_deref() {
                if !images.starts_with(&cfg.data_dir) {
                    reach.push(images);
                }
            }
            for dir in reach {
                if let Some(why) = crate::jail::unreachable_by_vms(dir) {
                    return Err(Error::HostSetup(why));
                }
            }
            crate::jail::secure_data_dir(&cfg.data_dir, &["vms", "layers", "golden", "images"])
                .ctx(|| format!("set the permissions of {}", cfg.data_dir.display()))?;
        }
        let cgroups = if confined {
            crate::cgroup::Cgroups::setup()
        } else {
            tracing::warn!("not root: VM processes run as this user, without cgroup limits");
            crate::cgroup::Cgroups::Off {
                reason: "the worker is not root".into(),
            }
        };
        let hv: Arc<dyn Hypervisor> = Arc::new(
            QemuMicrovm::new(cfg.qemu_binary.clone(), cgroups)
                .with_io_device(crate::cgroup::IoDevice::of_dir(&cfg.data_dir)),
        );
        let net = match cfg.network.clone() {
            Some(n) => Some(Network::open(n, &cfg.data_dir).await?),
            None => None,
        };
        let volumes = crate::volumes::VolumeStore::open(&cfg.data_dir)
            .map(Arc::new)
            .map_err(|e| {
                tracing::warn!(error = %e, "volumes are not available on this host");
                e.to_string()
            });
        let rt = Arc::new(Runtime {
            net,
            cfg,
            layers_lock: Default::default(),
            pinned_layers: Default::default(),
            golden_locks: Default::default(),
            qemu_build: Default::default(),
            golden_builds: Default::default(),
            accel,
            hv,
            vms: Mutex::new(HashMap::new()),
            images: Default::default(),
            progress: images::log_progress(),
            agent_reconnects: Default::default(),
            store: Default::default(),
            fetch_locks: Default::default(),
            store_fetches: Default::default(),
            volumes,
            import_slots: tokio::sync::Semaphore::new(imports::CONCURRENT_IMPORTS),
            layer_cache: Default::default(),
        });
        rt.adopt_all().await?;
        // Imports do not survive a restart of their worker (the control plane
        // fails them and deletes their build VM): their scratch trees go.
        // Moved aside at once (a new import may start right away), removed in
        // the background.
        let scratch = rt.cfg.data_dir.join("imports");
        let old = rt
            .cfg
            .data_dir
            .join(format!(".imports-old-{}", uuid::Uuid::new_v4().simple()));
        if std::fs::rename(&scratch, &old).is_ok() {
            std::thread::spawn(move || {
                let _ = std::fs::remove_dir_all(&old);
            });
        }
        Ok(rt)
    }

    pub fn data_dir(&self) -> &std::path::Path {
        &self.cfg.data_dir
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    async fn adopt_all(self: &Arc<Self>) -> Result<()> {
        let dir = self.cfg.data_dir.join("vms");
        for entry in std::fs::read_dir(&dir)
            .ctx(|| format!("list {}", dir.display()))?
            .flatten()
        {
            let paths = VmPaths::new(entry.path());
            let record: VmRecord = match std::fs::read(paths.spec())
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(dir = %paths.dir.display(), error = %e, "skipping VM directory with unreadable spec.json");
                    continue;
                }
            };
            let id = record.launch.id.clone();
            let (state, process) = match self.hv.adopt(&record.launch, &paths).await {
                Ok(Some(p)) => {
                    let p: Arc<dyn VmProcess> = Arc::from(p);
                    let state = match p.is_paused().await {
                        Ok(true) => VmState::Paused,
                        Ok(false) => VmState::Running,
                        Err(e @ Error::Timeout { .. }) => VmState::Error(format!(
                            "the VM stopped responding ({e}) when the worker re-adopted it; delete it"
                        )),
                        Err(_) => VmState::Running,
                    };
                    (state, Some(p))
                }
                Ok(None) => (VmState::Stopped, None),
                Err(e) => (VmState::Error(e.to_string()), None),
            };
            tracing::info!(vm = %id, %state, "adopted VM");
            let layers = if record.layers.is_empty() {
                vec![record.launch.disk.clone()]
            } else {
                record.layers.clone()
            };
            let net = match (&self.net, read_net_record(&paths)) {
                (Some(network), Some(rec)) => match network.adopt(rec).await {
                    Ok(n) => Some(n),
                    Err(e) => {
                        tracing::warn!(vm = %id, error = %e, "VM network not re-adopted");
                        None
                    }
                },
                _ => None,
            };
            let vm = Arc::new(Vm {
                record,
                layers: Mutex::new(layers),
                paths,
                state: Mutex::new(state),
                process: Mutex::new(process.clone()),
                agent: Default::default(),
                op: Default::default(),
                enforced: Mutex::new(net.as_ref().map(|n| n.policy())),
                net: Mutex::new(net),
                volumes: Default::default(),
            });
            if let Some(p) = process {
                self.watch(vm.clone(), p);
            }
            self.vms
                .lock()
                .map_err(|_| Error::Qemu("poisoned".into()))?
                .insert(id, vm);
        }
        if let Some(network) = &self.net {
            let keep: std::collections::HashSet<String> = self
                .vms
                .lock()
                .map(|m| {
                    m.values()
                        .filter_map(|vm| vm.net())
                        .map(|n| n.addr.netns.clone())
                        .collect()
                })
                .unwrap_or_default();
            network.cleanup_orphans(&keep).await;
        }
        Ok(())
    }

    /// Replace the firewall of a VM; a running VM enforces it at once (the
    /// ruleset is reloaded atomically and the resolver switches its gate).
    pub async fn set_firewall(&self, id: &str, policy: &FirewallPolicy) -> Result<()> {
        policy
            .validate()
            .map_err(|e| Error::InvalidFirewall(e.message))?;
        let vm = self.vm(id)?;
        let (Some(network), Some(net)) = (&self.net, vm.net()) else {
            return Ok(());
        };
        let previous = net.policy();
        if let Err(e) = network.set_policy(&net, policy).await {
            // The ruleset load is one transaction, but the resolver may have
            // switched: go back to the previous policy; until that is known
            // to be in force, nothing is.
            vm.set_enforced(None);
            if network.set_policy(&net, &previous).await.is_ok() {
                vm.set_enforced(Some(previous));
            }
            return Err(e);
        }
        vm.set_enforced(Some(policy.clone()));
        write_json_atomic(&vm.paths.dir.join("net.json"), &net.record())
    }

    /// The firewall policy VM `id` is known to enforce: `Ok(None)` when
    /// unknown (a push failed; push it again) or the VM has no network.
    pub fn enforced_firewall(&self, id: &str) -> Result<Option<FirewallPolicy>> {
        let vm = self.vm(id)?;
        if self.net.is_none() || vm.net().is_none() {
            return Ok(None);
        }
        Ok(vm.enforced.lock().ok().and_then(|e| e.clone()))
    }

    /// The part of a new VM's network QEMU needs to start (namespace and
    /// tap; when networking is on). The rest follows in [`Self::start_process`].
    async fn prepare_net(&self, id: &str, policy: &FirewallPolicy) -> Result<Option<Arc<VmNet>>> {
        policy
            .validate()
            .map_err(|e| Error::InvalidFirewall(e.message))?;
        match &self.net {
            Some(network) => Ok(Some(network.prepare(id, policy).await?)),
            None => Ok(None),
        }
    }

    /// Complete the network of a VM: veth, addresses, routes, firewall
    /// ruleset and resolver. On failure the VM keeps it (marked failed) and
    /// `delete` tears it down, like the rest of a VM that failed to start.
    async fn finish_net(&self, vm: &Vm) -> Result<()> {
        match (&self.net, vm.net()) {
            (Some(network), Some(net)) => network.finish(&net).await,
            _ => Ok(()),
        }
    }

    /// The VM's writable disk layer and the first part of its network, at
    /// the same time. Either is undone when the other fails.
    async fn create_disk_and_net(
        &self,
        overlay: impl std::future::Future<Output = Result<()>>,
        disk: &std::path::Path,
        id: &str,
        firewall: &FirewallPolicy,
    ) -> Result<Option<Arc<VmNet>>> {
        let (disk_made, net) = tokio::join!(overlay, self.prepare_net(id, firewall));
        let err = match (disk_made, net) {
            (Ok(()), Ok(net)) => return Ok(net),
            (Ok(()), Err(e)) => e,
            (Err(e), net) => {
                if let (Some(network), Ok(Some(n))) = (&self.net, net) {
                    network.destroy(&n).await;
                }
                e
            }
        };
        let _ = std::fs::remove_file(disk);
        Err(err)
    }

    /// Mark the VM stopped when its process exits, whatever the cause.
    fn watch(&self, vm: Arc<Vm>, process: Arc<dyn VmProcess>) {
        tokio::spawn(async move {
            process.wait_exit().await;
            let still_ours = vm.process().is_some_and(|p| Arc::ptr_eq(&p, &process));
            if still_ours && matches!(vm.state(), VmState::Running | VmState::Paused) {
                tracing::warn!(vm = %vm.record.launch.id, "VM process exited");
                vm.set_state(VmState::Stopped);
            }
        });
    }

    fn vm(&self, id: &str) -> Result<Arc<Vm>> {
        self.vms
            .lock()
            .ok()
            .and_then(|m| m.get(id).cloned())
            .ok_or_else(|| Error::NoSuchVm(id.to_owned()))
    }

    pub fn get(&self, id: &str) -> Result<VmInfo> {
        Ok(self.vm(id)?.info())
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let mut v: Vec<VmInfo> = self
            .vms
            .lock()
            .map(|m| m.values().map(|vm| vm.info()).collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// The builder rootfs of Dockerfile imports, building it on first use.
    pub async fn builder_rootfs(&self) -> Result<PathBuf> {
        self.image().await?;
        let (store, _) = self
            .images
            .get()
            .ok_or_else(|| Error::ImageBuild("the image store is not open".into()))?;
        store.ensure_builder(&self.progress).await
    }

    /// The default guest image, building it on first use.
    pub async fn image(&self) -> Result<&GuestImage> {
        let (_, image) = self
            .images
            .get_or_try_init(|| async {
                let agent = match &self.cfg.agent_binary {
                    Some(p) => p.clone(),
                    None => images::find_agent_binary()?,
                };
                let dir = self
                    .cfg
                    .image_dir
                    .clone()
                    .unwrap_or_else(|| self.cfg.data_dir.join("images"));
                let store = ImageStore::new(&dir, &self.cfg.debian_mirror, agent)?;
                let image = store.ensure_default(&self.progress).await?;
                Ok::<_, Error>((store, image))
            })
            .await?;
        Ok(image)
    }

    fn layer_path(&self) -> PathBuf {
        self.cfg
            .data_dir
            .join("layers")
            .join(format!("{}.qcow2", uuid::Uuid::new_v4()))
    }

    /// Create a VM and wait until its agent answers. Every launch is a
    /// restore: of `req.snapshot`, or of the golden snapshot of the machine
    /// type (built once per image, machine type and disk size by a fresh boot),
    /// unless golden snapshots are disabled.
    ///
    /// A golden snapshot that fails to restore (its files damaged, or made
    /// by a QEMU that no longer reads them) is deleted and rebuilt once, by
    /// one launch while the others wait for it, and the launch is retried on
    /// the new one.
    pub async fn create(&self, mut req: CreateVm) -> Result<VmInfo> {
        req.firewall
            .validate()
            .map_err(|e| Error::InvalidFirewall(e.message))?;
        if let Some(id) = &req.snapshot {
            let snap = match (self.snapshot_record(id), self.snapshot_store()) {
                (Err(Error::NoSuchSnapshot(_)), Some(store)) => {
                    self.fetch_snapshot(&store, id).await?
                }
                (r, _) => r?,
            };
            if let Some(theirs) = &snap.compat_key {
                let ours = self.compat_key().await?;
                if *theirs != ours {
                    return Err(Error::IncompatibleSnapshot {
                        id: id.clone(),
                        snapshot: theirs.clone(),
                        worker: ours,
                    });
                }
            }
            return self.restore(req, &snap).await;
        }
        if !self.cfg.golden {
            return self.boot_fresh(req).await;
        }
        let id = req
            .id
            .get_or_insert_with(|| uuid::Uuid::new_v4().to_string())
            .clone();
        let machine = MachineType::lookup(&req.machine)?;
        let disk_gib = req.disk_gib.unwrap_or(machine.disk_gib);
        let (key, snap, in_use) = self.golden(machine, disk_gib).await?;
        let restored = self.restore(req.clone(), &snap).await;
        drop(in_use);
        let err = match restored {
            Ok(info) => return Ok(info),
            Err(e) if is_restore_failure(&e) => e,
            Err(e) => return Err(e),
        };
        tracing::warn!(vm = %id, %key, error = %err, "golden snapshot failed to restore; rebuilding it");
        // The failed VM (if it got registered) goes; the retry reuses its id.
        match self.delete(&id).await {
            Ok(()) | Err(Error::NoSuchVm(_)) => {}
            Err(e) => return Err(e),
        }
        self.discard_golden(&key, &snap).await;
        let (_, snap, _in_use) = self.golden(machine, disk_gib).await?;
        self.restore(req, &snap).await
    }

    /// Register a VM (state dir, spec.json, disk chain) before its process
    /// starts, with its prepared network ([`Self::create_disk_and_net`]);
    /// on failure the network and the new disk layer are removed again.
    async fn register(
        &self,
        id: &str,
        launch: LaunchSpec,
        guest: GuestIdentity,
        layers: Vec<PathBuf>,
        net: Option<Arc<VmNet>>,
    ) -> Result<Arc<Vm>> {
        let result = self
            .register_with(id, launch, guest, layers.clone(), net.clone())
            .await;
        if result.is_err() {
            if let (Some(network), Some(n)) = (&self.net, &net) {
                network.destroy(n).await;
            }
            if let Some(top) = layers.first() {
                let _ = std::fs::remove_file(top);
            }
        }
        result
    }

    async fn register_with(
        &self,
        id: &str,
        mut launch: LaunchSpec,
        guest: GuestIdentity,
        layers: Vec<PathBuf>,
        net: Option<Arc<VmNet>>,
    ) -> Result<Arc<Vm>> {
        let paths = VmPaths::new(self.cfg.data_dir.join("vms").join(id));
        if paths.dir.exists() {
            return Err(Error::Qemu(format!("VM {id} already exists")));
        }
        std::fs::create_dir_all(&paths.dir).ctx(|| format!("create {}", paths.dir.display()))?;
        // Its own uid, unless the worker cannot switch uids.
        launch.uid = crate::jail::is_root().then(|| {
            let used: std::collections::HashSet<u32> = self
                .vms
                .lock()
                .map(|m| m.values().filter_map(|v| v.record.launch.uid).collect())
                .unwrap_or_default();
            crate::jail::pick_uid(id, &used)
        });
        launch.net = net.as_ref().map(|n| crate::hypervisor::NetLaunch {
            netns: n.addr.netns.clone(),
            tap: crate::net::addr::TAP.into(),
            mac: n.addr.mac.clone(),
        });
        let saved = match &net {
            Some(n) => write_json_atomic(&paths.dir.join("net.json"), &n.record()),
            None => Ok(()),
        };
        if let Err(e) = saved {
            let _ = std::fs::remove_dir_all(&paths.dir);
            return Err(e);
        }
        let record = VmRecord {
            launch,
            hostname: guest.hostname,
            env: guest.env,
            layers: layers.clone(),
            defaults: guest.defaults,
        };
        let vm = Arc::new(Vm {
            record,
            layers: Mutex::new(layers),
            paths,
            state: Mutex::new(VmState::Stopped),
            process: Mutex::new(None),
            agent: Default::default(),
            op: Default::default(),
            enforced: Mutex::new(net.as_ref().map(|n| n.policy())),
            net: Mutex::new(net),
            volumes: Default::default(),
        });
        if let Err(e) = vm.save() {
            let _ = std::fs::remove_dir_all(&vm.paths.dir);
            return Err(e);
        }
        self.vms
            .lock()
            .map_err(|_| Error::Qemu("poisoned".into()))?
            .insert(id.to_owned(), vm.clone());
        Ok(vm)
    }

    async fn qemu_img_overlay(
        backing: &std::path::Path,
        backing_format: &str,
        overlay: &std::path::Path,
        size_gib: Option<u32>,
    ) -> Result<()> {
        let mut cmd = tokio::process::Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2", "-F", backing_format, "-b"])
            .arg(backing)
            .arg(overlay);
        if let Some(g) = size_gib {
            cmd.arg(format!("{g}G"));
        }
        cmd.stdin(std::process::Stdio::null());
        let out = timeouts::output_within(&mut cmd, timeouts::QEMU_IMG, "qemu-img create").await?;
        if !out.status.success() {
            return Err(Error::Qemu(format!(
                "qemu-img create failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Boot a VM from the image (the slow path: kernel boot under TCG).
    pub async fn boot_fresh(&self, req: CreateVm) -> Result<VmInfo> {
        self.boot_fresh_with(req, None, RootDisk::Default, &GuestDefaults::default())
            .await
    }

    /// Boot a VM from the image's kernel and initramfs, with its disk over
    /// `base` (a frozen qcow2 layer, e.g. an imported root disk) or else over
    /// the image's root filesystem.
    async fn boot_fresh_with(
        &self,
        req: CreateVm,
        ram: Option<crate::hypervisor::RamFile>,
        root: RootDisk<'_>,
        defaults: &GuestDefaults,
    ) -> Result<VmInfo> {
        let base = match root {
            RootDisk::Layer(b) => Some(b),
            RootDisk::Default | RootDisk::Raw(_) => None,
        };
        let machine = MachineType::lookup(&req.machine)?;
        let image = self.image().await?.clone();
        let id = req
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let disk_gib = req.disk_gib.unwrap_or(machine.disk_gib);
        let vm = {
            let disk = self.layer_path();
            let mut pins = vec![disk.clone()];
            pins.extend(base.map(|b| b.to_path_buf()));
            let _pinned = self.pin_layers(pins).await;
            let overlay = match root {
                RootDisk::Layer(b) => Self::qemu_img_overlay(b, "qcow2", &disk, None),
                RootDisk::Raw(r) => Self::qemu_img_overlay(r, "raw", &disk, Some(disk_gib)),
                RootDisk::Default => {
                    Self::qemu_img_overlay(&image.rootfs, "raw", &disk, Some(disk_gib))
                }
            };
            let net = self
                .create_disk_and_net(overlay, &disk, &id, &req.firewall)
                .await?;
            let mut launch =
                LaunchSpec::new(&id, machine, disk_gib, self.accel, &image, disk.clone());
            launch.ram = ram;
            let guest = GuestIdentity {
                hostname: req.hostname.clone(),
                env: req.env.clone(),
                defaults: defaults.clone(),
            };
            let mut layers = vec![disk];
            layers.extend(base.map(|b| b.to_path_buf()));
            self.register(&id, launch, guest, layers, net).await?
        };
        let _op = vm.op.lock().await;
        let result = self.start_process(&vm, None).await;
        self.finish_start(&vm, result).await
    }

    async fn finish_start(&self, vm: &Arc<Vm>, result: Result<()>) -> Result<VmInfo> {
        match result {
            Ok(()) => {
                vm.set_state(VmState::Running);
                Ok(vm.info())
            }
            Err(e) => {
                tracing::warn!(vm = %vm.record.launch.id, error = %e, "VM failed to start");
                if let Some(p) = vm.process() {
                    let _ = p.kill().await;
                }
                vm.set_state(VmState::Error(e.to_string()));
                Err(e)
            }
        }
    }

    /// Restore a VM from a snapshot: a new writable layer over the snapshot's
    /// frozen disk, memory loaded from its state file, then a new identity.
    async fn restore(&self, req: CreateVm, snap: &SnapshotRecord) -> Result<VmInfo> {
        let id = req
            .id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let top = snap.layers.first().ok_or_else(|| Error::CorruptState {
            path: snap.memory.clone(),
            message: "snapshot without disk layers".into(),
        })?;
        if !snap.memory.is_file() {
            return Err(Error::CorruptState {
                path: snap.memory.clone(),
                message: "memory state file is missing".into(),
            });
        }
        if let Some(ram) = snap.ram.as_ref().filter(|r| !r.is_file()) {
            return Err(Error::CorruptState {
                path: ram.clone(),
                message: "RAM file is missing".into(),
            });
        }
        let hostname = req
            .hostname
            .clone()
            .or_else(|| Some(format!("vm-{}", id.split('-').next().unwrap_or(&id))));
        let env = if req.env.is_empty() {
            snap.env.clone()
        } else {
            req.env.clone()
        };
        let t0 = std::time::Instant::now();
        let vm = {
            let disk = self.layer_path();
            let mut pins = vec![disk.clone()];
            pins.extend(snap.layers.iter().cloned());
            let _pinned = self.pin_layers(pins).await;
            let net = self
                .create_disk_and_net(
                    Self::qemu_img_overlay(top, "qcow2", &disk, None),
                    &disk,
                    &id,
                    &req.firewall,
                )
                .await?;
            tracing::debug!(
                ms = t0.elapsed().as_millis() as u64,
                "restore: overlay created, namespace and tap ready"
            );
            let mut launch = snap.launch.clone();
            launch.id = id.clone();
            launch.disk = disk.clone();
            launch.ram = snap.ram.clone().map(|path| crate::hypervisor::RamFile {
                path,
                shared: false,
            });
            let mut layers = vec![disk];
            layers.extend(snap.layers.iter().cloned());
            let guest = GuestIdentity {
                hostname,
                env,
                defaults: snap.guest_defaults.clone(),
            };
            self.register(&id, launch, guest, layers, net).await?
        };
        let _op = vm.op.lock().await;
        let result = self.start_process(&vm, Some(&snap.memory)).await;
        let info = self.finish_start(&vm, result).await?;
        self.drop_stale_mounts(&vm, &snap.volume_mounts).await;
        Ok(info)
    }

    /// Start QEMU and complete the VM's network ([`Self::finish_net`]), then
    /// let the guest run. A fresh boot runs the guest as soon as QEMU starts,
    /// so its network is completed first. A restore starts QEMU paused
    /// (`-incoming`): the network is completed while it loads the state, and
    /// both are joined before `cont`. The guest never runs a single
    /// instruction before its firewall ruleset and resolver are in place.
    async fn start_process(&self, vm: &Arc<Vm>, incoming: Option<&std::path::Path>) -> Result<()> {
        let t0 = std::time::Instant::now();
        let (started, net) = match incoming {
            None => {
                self.finish_net(vm).await?;
                (
                    self.hv.start(&vm.record.launch, &vm.paths, None).await,
                    Ok(()),
                )
            }
            Some(_) => tokio::join!(
                self.hv.start(&vm.record.launch, &vm.paths, incoming),
                self.finish_net(vm)
            ),
        };
        let process: Arc<dyn VmProcess> = Arc::from(started?);
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "start: process up (state loaded), network complete"
        );
        if let Ok(mut p) = vm.process.lock() {
            *p = Some(process.clone());
        }
        self.watch(vm.clone(), process.clone());
        // Still paused: the caller kills the process on this error.
        net?;
        if incoming.is_some() {
            process.resume().await?;
        }
        let agent_sock = vm.paths.agent();
        let agent = tokio::select! {
            a = AgentClient::connect(&agent_sock, self.cfg.boot_timeout) => a?,
            _ = process.wait_exit() => {
                let console = String::from_utf8_lossy(&crate::console::read_tail(&vm.paths.console_log(), 4096)).into_owned();
                let tail: String = console.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
                return Err(Error::Qemu(format!("VM exited during start; console: {tail}")));
            }
        };
        tracing::debug!(
            ms = t0.elapsed().as_millis() as u64,
            "start: agent connected"
        );
        if incoming.is_some() {
            // A restore is on the latency path; the configuration is ordered
            // before anything else sent on this connection, so don't wait.
            agent.configure_in_background(vm.guest_config(), vm.record.launch.id.clone());
        } else {
            agent.configure(vm.guest_config()).await?;
        }
        *vm.agent.lock().await = Some(agent);
        Ok(())
    }

    /// Fail fast (and fail the VM) when its QEMU no longer answers: the
    /// agent channel goes through QEMU, so a wedged QEMU would leave a
    /// request waiting forever. One `query-status` (well under a
    /// millisecond when healthy; [`timeouts::QMP_SHORT`] when wedged).
    async fn probe(&self, vm: &Vm, action: &str) -> Result<()> {
        let Some(p) = vm.process().filter(|p| !p.has_exited()) else {
            return Ok(());
        };
        match p.is_paused().await {
            Err(e @ Error::Timeout { .. }) => Err(vm.fail_if_wedged(action, e)),
            _ => Ok(()),
        }
    }

    /// The VM's agent connection, reconnecting when needed; checks first
    /// that QEMU answers ([`Self::probe`]).
    async fn agent(&self, vm: &Vm) -> Result<AgentClient> {
        self.probe(vm, "a request to the guest agent").await?;
        let mut slot = vm.agent.lock().await;
        if let Some(a) = slot.as_ref() {
            if a.closed_reason().is_none() {
                return Ok(a.clone());
            }
        }
        if slot.is_some() {
            self.agent_reconnects
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let agent = AgentClient::connect(&vm.paths.agent(), Duration::from_secs(30)).await?;
        agent.configure(vm.guest_config()).await?;
        *slot = Some(agent.clone());
        Ok(agent)
    }

    /// Agent connections re-established (after the guest's agent or its
    /// channel went away) since this runtime opened.
    pub fn agent_reconnects(&self) -> u64 {
        self.agent_reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn require(vm: &Vm, want: VmState, action: &'static str) -> Result<()> {
        let state = vm.state();
        if state != want {
            return Err(Error::WrongState {
                id: vm.record.launch.id.clone(),
                state: state.to_string(),
                action,
                need: if want == VmState::Running {
                    "running"
                } else {
                    "paused"
                },
            });
        }
        Ok(())
    }

    /// Start a process in a running VM and stream its events.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecStream> {
        let spec = exec::to_spec(req)?;
        let vm = self.vm(id)?;
        Self::require(&vm, VmState::Running, "exec")?;
        self.agent(&vm).await?.exec(spec).await
    }

    /// Open a TCP connection to `host:port` as seen from inside the running
    /// VM (its loopback included, its firewall not involved), dialed by the
    /// guest agent and carried over the agent channel.
    pub async fn connect_in_guest(
        &self,
        id: &str,
        host: &str,
        port: u16,
    ) -> Result<tokio::io::DuplexStream> {
        let vm = self.vm(id)?;
        Self::require(&vm, VmState::Running, "connect")?;
        self.agent(&vm).await?.connect_tcp(host, port).await
    }

    /// Run a process to completion, buffering at most `cap` bytes per stream.
    pub async fn exec_buffered(
        &self,
        id: &str,
        req: &ExecRequest,
        cap: usize,
    ) -> Result<ExecOutput> {
        exec::collect(self.exec(id, req).await?, cap).await
    }

    /// One protocol round trip with the VM's agent (no process spawned).
    pub async fn ping(&self, id: &str) -> Result<()> {
        let vm = self.vm(id)?;
        Self::require(&vm, VmState::Running, "ping")?;
        self.agent(&vm).await?.ping().await
    }

    /// Follow the VM's serial console (`console.log`), starting `tail` bytes
    /// before its end. Works in any state, also when the agent does not answer.
    pub async fn follow_console(
        &self,
        id: &str,
        tail: u64,
    ) -> Result<crate::console::ConsoleFollower> {
        let path = self.vm(id)?.paths.console_log();
        crate::console::ConsoleFollower::open(&path, tail).await
    }

    /// Where the VM's files live (console log, sockets, disk).
    pub fn vm_dir(&self, id: &str) -> Result<PathBuf> {
        Ok(self.vm(id)?.paths.dir.clone())
    }

    pub async fn pause(&self, id: &str) -> Result<VmInfo> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        Self::require(&vm, VmState::Running, "pause")?;
        let p = vm
            .process()
            .ok_or_else(|| Error::Qemu("no process".into()))?;
        p.pause().await.map_err(|e| vm.fail_if_wedged("pause", e))?;
        vm.set_state(VmState::Paused);
        Ok(vm.info())
    }

    pub async fn resume(&self, id: &str) -> Result<VmInfo> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        Self::require(&vm, VmState::Paused, "resume")?;
        let p = vm
            .process()
            .ok_or_else(|| Error::Qemu("no process".into()))?;
        p.resume()
            .await
            .map_err(|e| vm.fail_if_wedged("resume", e))?;
        vm.set_state(VmState::Running);
        Ok(vm.info())
    }

    /// Shut the guest down cleanly (killing it if it does not stop in time).
    pub async fn stop(&self, id: &str) -> Result<VmInfo> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        if let Some(p) = vm.process() {
            if !p.has_exited() {
                if vm.state() == VmState::Paused {
                    let _ = p.resume().await;
                }
                // A wedged QEMU (the probe in `agent` fails) is killed below.
                if let Ok(agent) = self.agent(&vm).await {
                    let _ = agent.shutdown().await;
                }
                if tokio::time::timeout(Duration::from_secs(10), p.wait_exit())
                    .await
                    .is_err()
                {
                    p.kill().await?;
                }
            }
        }
        vm.set_state(VmState::Stopped);
        Ok(vm.info())
    }

    /// Kill the VM process (if any) and remove every trace of it.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        let wedged = matches!(vm.state(), VmState::Error(_));
        vm.set_state(VmState::Stopped);
        if let Some(p) = vm.process() {
            if wedged && !p.has_exited() {
                // A failed VM's QEMU may not answer `quit`: SIGKILL by pid at
                // once (its QMP connection is still open, so the process
                // exists and the pid is not recycled).
                if let Ok(pid) = libc::pid_t::try_from(p.pid()) {
                    // SAFETY: kill has no memory preconditions; see above for the pid.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            p.kill().await?;
        }
        *vm.agent.lock().await = None;
        // Stops the VM's volume server (its volumes stay, for other VMs).
        *vm.volumes.lock().await = None;
        if let (Some(network), Some(net)) =
            (&self.net, vm.net.lock().ok().and_then(|mut n| n.take()))
        {
            network.destroy(&net).await;
        }
        if vm.paths.dir.exists() {
            std::fs::remove_dir_all(&vm.paths.dir)
                .ctx(|| format!("remove {}", vm.paths.dir.display()))?;
        }
        if let Ok(mut m) = self.vms.lock() {
            m.remove(id);
        }
        self.gc_layers().await
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("snapshots").join(id)
    }

    /// Capture a running or paused VM (memory, device state and disk). The
    /// VM keeps running (or stays paused) afterwards. The disk costs nothing
    /// to capture: the VM's writable layer is frozen and the VM continues on
    /// a new empty overlay.
    pub async fn snapshot(
        &self,
        vm_id: &str,
        snapshot_id: Option<String>,
    ) -> Result<SnapshotRecord> {
        let id = snapshot_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let dir = self.snapshot_dir(&id);
        let Some(store) = self.snapshot_store() else {
            return self.capture(vm_id, id, dir, false).await;
        };
        if !snapshot_store::valid_snapshot_id(&id) {
            return Err(Error::SnapshotStore(format!(
                "snapshot id {id:?} is not usable as an object key (A-Z a-z 0-9 - _ . only)"
            )));
        }
        let record = self.capture(vm_id, id, dir.clone(), false).await?;
        let t0 = std::time::Instant::now();
        if let Err(e) = self.upload_snapshot(&store, &record).await {
            tracing::warn!(snapshot = %record.id, error = %e, "snapshot upload failed; snapshot removed");
            let _ = std::fs::remove_dir_all(&dir);
            let _ = self.gc_layers().await;
            return Err(e);
        }
        tracing::info!(snapshot = %record.id, ms = t0.elapsed().as_millis() as u64, "snapshot uploaded to the store");
        Ok(record)
    }

    async fn capture(
        &self,
        vm_id: &str,
        id: String,
        dir: PathBuf,
        leave_paused: bool,
    ) -> Result<SnapshotRecord> {
        let vm = self.vm(vm_id)?;
        let _op = vm.op.lock().await;
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return Err(Error::WrongState {
                id: vm_id.to_owned(),
                state: vm.state().to_string(),
                action: "snapshot",
                need: "running or paused",
            });
        }
        let process = vm
            .process()
            .ok_or_else(|| Error::Qemu("no process".into()))?;
        if dir.exists() {
            return Err(Error::Qemu(format!("snapshot {id} already exists")));
        }
        std::fs::create_dir_all(&dir).ctx(|| format!("create {}", dir.display()))?;
        let memory = dir.join("memory");
        // Private RAM goes into a file restores map copy-on-write (see
        // `migstream`); shared RAM (a golden VM's) is its file already.
        let ram_shared = vm.record.launch.ram.as_ref().is_some_and(|r| r.shared);
        let ram = (!ram_shared).then(|| dir.join("ram"));
        if let Some(ram) = &ram {
            jail::create_private(ram)
                .and_then(|f| f.set_len(u64::from(vm.record.launch.memory_mib) << 20))
                .ctx(|| format!("create {}", ram.display()))?;
        }
        let new_layer = self.layer_path();
        let frozen = vm.layers();
        // The new layer is referenced before QEMU creates it, so that layer
        // collection (which takes the host-wide layers lock) keeps it; that
        // lock is not held while this VM's QEMU works: a wedged QEMU must
        // not stall every other launch.
        {
            let _layers = self.layers_lock.lock().await;
            if let Ok(mut l) = vm.layers.lock() {
                l.insert(0, new_layer.clone());
            }
        }
        let result = match tokio::time::timeout(
            timeouts::MIGRATION,
            process.snapshot(&memory, ram.as_deref(), &new_layer, leave_paused),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                what: "the memory snapshot".into(),
                after: timeouts::MIGRATION,
            }),
        }
        .map_err(|e| vm.fail_if_wedged("snapshot", e));
        if leave_paused && result.is_ok() {
            vm.set_state(VmState::Paused);
        }
        // Whether or not the memory dump worked, QEMU may already write to the new layer.
        if new_layer.exists() {
            vm.save()?;
        } else if let Ok(mut l) = vm.layers.lock() {
            l.retain(|p| p != &new_layer);
        }
        let ram_capture = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let ram_file = match (ram, ram_capture) {
            (Some(path), RamCapture::File) => {
                // The sealed copy restores map, made now rather than on the
                // first restore (which is on a user's latency path).
                let (hv, ram) = (self.hv.clone(), path.clone());
                tokio::spawn(async move {
                    if let Err(e) = hv.prepare_ram(&ram).await {
                        tracing::warn!(ram = %ram.display(), error = %e, "preparing the snapshot's RAM failed (the first restore will retry)");
                    }
                });
                Some(path)
            }
            (Some(path), RamCapture::InStream) => {
                let _ = std::fs::remove_file(path);
                None
            }
            (None, _) => None,
        };
        let compat_key = self.compat_key().await.ok();
        // The RAM backend of a restore is decided from `ram` below, never inherited.
        let mut launch = vm.record.launch.clone();
        launch.ram = None;
        let record = SnapshotRecord {
            id,
            source_vm: Some(vm_id.to_owned()),
            launch,
            layers: frozen,
            memory,
            ram: match ram_file {
                Some(path) => Some(path),
                None => vm
                    .record
                    .launch
                    .ram
                    .as_ref()
                    .filter(|r| r.shared)
                    .map(|r| r.path.clone()),
            },
            hostname: vm.record.hostname.clone(),
            env: vm.record.env.clone(),
            guest_defaults: vm.record.defaults.clone(),
            volume_mounts: vm
                .volumes
                .lock()
                .await
                .as_ref()
                .map(|v| v.mounts())
                .unwrap_or_default(),
            created_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            compat_key,
        };
        write_json_atomic(&dir.join("snapshot.json"), &record)?;
        Ok(record)
    }

    fn read_snapshot(dir: &std::path::Path) -> Result<SnapshotRecord> {
        let path = dir.join("snapshot.json");
        let bytes = std::fs::read(&path).ctx(|| format!("read {}", path.display()))?;
        serde_json::from_slice(&bytes).map_err(|e| Error::CorruptState {
            path,
            message: e.to_string(),
        })
    }

    /// A user snapshot by id.
    pub fn snapshot_record(&self, id: &str) -> Result<SnapshotRecord> {
        // A leading dot: the store's fetch staging dirs (`.fetch-<id>`).
        if id.is_empty() || id.contains('/') || id.contains("..") || id.starts_with('.') {
            return Err(Error::NoSuchSnapshot(id.to_owned()));
        }
        let dir = self.snapshot_dir(id);
        if !dir.join("snapshot.json").exists() {
            return Err(Error::NoSuchSnapshot(id.to_owned()));
        }
        Self::read_snapshot(&dir)
    }

    /// Delete a user snapshot. VMs restored from it keep working: layers are
    /// collected only when no VM or snapshot references them any more.
    ///
    /// With a snapshot store, its `snapshots/<id>/` goes too (the local copy
    /// may be absent: only the store's then); its layers stay in the store,
    /// where other snapshots may share them.
    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        let store = self.snapshot_store();
        // Not while a fetch of it runs (it would leave a local copy behind).
        let lock = self.fetch_lock(id);
        let _fetching = match store {
            Some(_) => Some(lock.lock().await),
            None => None,
        };
        let local = self.snapshot_record(id);
        if let Some(store) = store {
            let key = SnapshotStore::snapshot_key(id, "snapshot.json");
            let stored = snapshot_store::valid_snapshot_id(id) && store.exists(&key).await?;
            if stored {
                store.delete_snapshot(id).await?;
            } else if local.is_err() {
                return Err(Error::NoSuchSnapshot(id.to_owned()));
            }
            if local.is_err() {
                return Ok(());
            }
        }
        let local = local?;
        if let Some(ram) = &local.ram {
            self.hv.forget_ram(ram);
        }
        let dir = self.snapshot_dir(id);
        std::fs::remove_dir_all(&dir).ctx(|| format!("remove {}", dir.display()))?;
        self.gc_layers().await
    }

    /// The golden snapshot of a machine type at its default disk size
    /// (built on first use).
    pub async fn golden_snapshot(&self, machine: &str) -> Result<SnapshotRecord> {
        let m = MachineType::lookup(machine)?;
        Ok(self.golden(m, m.disk_gib).await?.1)
    }

    /// Golden snapshots built (first builds and rebuilds) since this runtime opened.
    pub fn golden_builds(&self) -> u64 {
        self.golden_builds
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The QEMU build and CPU model part of golden keys: a state file is only
    /// read back reliably by the QEMU that wrote it, on the same CPU model.
    async fn qemu_build(&self) -> Result<&str> {
        let build = self
            .qemu_build
            .get_or_try_init(|| qemu_build_id(&self.cfg.qemu_binary, self.accel))
            .await?;
        Ok(build.as_str())
    }

    /// What must match for a snapshot captured on one worker to be restored
    /// on another: accelerator, QEMU build (version + binary hash), guest
    /// CPU model (the `-q<16 hex>` part of golden keys) and device set
    /// (network device or not), e.g. `tcg-q0123456789abcdef-net1`. The guest
    /// image is not part of it: the store carries the files a snapshot sits on.
    pub async fn compat_key(&self) -> Result<String> {
        let build = self.qemu_build().await?;
        let net = if self.net.is_some() { "-net1" } else { "" };
        Ok(format!("{}-q{build}{net}", self.accel))
    }

    /// [`Runtime::compat_key`] with its parts, for a worker's registration.
    pub async fn compat_info(&self) -> Result<CompatInfo> {
        Ok(CompatInfo {
            key: self.compat_key().await?,
            qemu_build: self.qemu_build().await?.to_owned(),
            accel: self.accel.to_string(),
            cpu_model: cpu_model(self.accel),
        })
    }

    /// The key (directory name under `<data>/golden/`) of a golden snapshot:
    /// image, accelerator, machine type, disk size, device set, QEMU build
    /// (version + binary hash), CPU model, and the guest ABI tag (machine
    /// options such as the PIT, and the kernel command line: see
    /// [`crate::qemu::guest_abi_tag`]).
    async fn golden_key(&self, machine: MachineType, disk_gib: u32) -> Result<String> {
        let image = self.image().await?.clone();
        // The device set is part of the key: a golden VM without a network
        // device cannot be restored into one with it (and vice versa).
        let net = if self.net.is_some() { "-net1" } else { "" };
        let build = self.qemu_build().await?;
        let abi = crate::qemu::guest_abi_tag(self.accel);
        Ok(format!(
            "{}-{}-{}-{}g{net}-a{abi}-q{build}",
            image.id, self.accel, machine.name, disk_gib
        ))
    }

    fn golden_lock(&self, key: &str) -> Arc<tokio::sync::RwLock<()>> {
        let mut locks = self.golden_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(key.to_owned()).or_default().clone()
    }

    /// Delete golden snapshot `key` if it still is `failed` (a concurrent
    /// launch may have rebuilt it already: then the new one stays).
    async fn discard_golden(&self, key: &str, failed: &SnapshotRecord) {
        let lock = self.golden_lock(key);
        let _g = lock.write().await;
        let dir = self.cfg.data_dir.join("golden").join(key);
        let same = Self::read_snapshot(&dir).is_ok_and(|r| {
            r.created_unix_ms == failed.created_unix_ms && r.memory == failed.memory
        });
        if same {
            tracing::warn!(%key, "deleting golden snapshot that failed to restore");
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(%key, error = %e, "could not delete the golden snapshot");
            }
        }
    }

    /// The golden snapshot of (image, accelerator, machine type, disk size,
    /// QEMU build, CPU model) and its key, built by one fresh boot the first
    /// time (one build per key at a time; other keys do not wait). The guard
    /// keeps its files in place (no rebuild or delete) while held: hold it
    /// until the restore from it is done.
    async fn golden(
        &self,
        machine: MachineType,
        disk_gib: u32,
    ) -> Result<(
        String,
        SnapshotRecord,
        tokio::sync::OwnedRwLockReadGuard<()>,
    )> {
        let key = self.golden_key(machine, disk_gib).await?;
        let lock = self.golden_lock(&key);
        let shared = lock.clone().read_owned().await;
        let dir = self.cfg.data_dir.join("golden").join(&key);
        if let Some(record) = complete_snapshot(&dir) {
            return Ok((key, record, shared));
        }
        drop(shared);
        let exclusive = lock.write_owned().await;
        let record = self.golden_locked(&key, machine, disk_gib).await?;
        Ok((key, record, exclusive.downgrade()))
    }

    async fn golden_locked(
        &self,
        key: &str,
        machine: MachineType,
        disk_gib: u32,
    ) -> Result<SnapshotRecord> {
        let key = key.to_owned();
        let dir = self.cfg.data_dir.join("golden").join(&key);
        if let Some(r) = complete_snapshot(&dir) {
            return Ok(r);
        }
        if dir.exists() {
            tracing::warn!(%key, "golden snapshot incomplete; rebuilding");
            let _ = std::fs::remove_dir_all(&dir);
        }
        tracing::info!(%key, "building golden snapshot (one fresh boot)");
        self.golden_builds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let vm_id = format!("golden-{}", uuid::Uuid::new_v4());
        let req = CreateVm {
            id: Some(vm_id.clone()),
            machine: machine.name.into(),
            disk_gib: Some(disk_gib),
            ..Default::default()
        };
        // The golden VM's RAM lives in a file that becomes the snapshot's RAM image.
        let tmp = dir.with_extension("building");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).ctx(|| format!("create {}", tmp.display()))?;
        let ram = crate::hypervisor::RamFile {
            path: tmp.join("ram"),
            shared: true,
        };
        let booted = self
            .boot_fresh_with(req, Some(ram), RootDisk::Default, &GuestDefaults::default())
            .await;
        let captured = match booted {
            // Left paused: with shared RAM, anything it ran afterwards would change the image.
            Ok(_) => {
                self.capture(&vm_id, key.clone(), tmp.join("state"), true)
                    .await
            }
            Err(e) => Err(e),
        };
        // Commit the record before the golden VM goes: deleting it collects
        // every layer no record references.
        let committed = captured.and_then(|mut record| {
            std::fs::rename(tmp.join("state").join("memory"), tmp.join("memory"))
                .ctx(|| "move golden state".into())?;
            let _ = std::fs::remove_dir_all(tmp.join("state"));
            std::fs::rename(&tmp, &dir).ctx(|| format!("commit {}", dir.display()))?;
            record.memory = dir.join("memory");
            record.ram = Some(dir.join("ram"));
            record.source_vm = None;
            write_json_atomic(&dir.join("snapshot.json"), &record)?;
            Ok(record)
        });
        let _ = self.delete(&vm_id).await;
        let record = committed?;
        // The golden VM is gone: its RAM image is root's alone from now on
        // (restores get a sealed copy, see `jail`).
        if let Some(ram) = &record.ram {
            crate::jail::make_root_only(ram).ctx(|| format!("chown {}", ram.display()))?;
            // Pages its guest zeroed are allocated in the file: holes they
            // become, so copies and captures of it skip them.
            let path = ram.clone();
            let punched = tokio::task::spawn_blocking(move || {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .and_then(|f| crate::ram_capture::punch_zero_pages(&f))
            })
            .await
            .map_err(|e| Error::Qemu(format!("golden RAM: {e}")))?
            .ctx(|| format!("punch the zero pages of {}", ram.display()))?;
            tracing::debug!(mib = punched >> 20, "golden RAM: zero pages punched out");
        }
        self.gc_layers().await?;
        Ok(record)
    }

    /// Keep `layers` from collection until the guard is dropped. Taken
    /// under the layers lock: a collection either finished before (a layer
    /// it removed is missing, and the launch fails on it) or sees the pins.
    async fn pin_layers(&self, layers: Vec<PathBuf>) -> PinnedLayers {
        let _layers = self.layers_lock.lock().await;
        if let Ok(mut p) = self.pinned_layers.lock() {
            p.extend(layers.iter().cloned());
        }
        PinnedLayers {
            set: self.pinned_layers.clone(),
            layers,
        }
    }

    /// Remove disk layers nothing references (no VM, user or golden
    /// snapshot, no launch in progress).
    async fn gc_layers(&self) -> Result<()> {
        let _layers = self.layers_lock.lock().await;
        let mut used: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
        if let Ok(p) = self.pinned_layers.lock() {
            used.extend(p.iter().cloned());
        }
        if let Ok(vms) = self.vms.lock() {
            for vm in vms.values() {
                used.extend(vm.layers());
            }
        }
        // VMs on disk that this runtime does not hold (e.g. skipped as unreadable) keep theirs too.
        for dir in ["vms"] {
            if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join(dir)) {
                for e in entries.flatten() {
                    if let Ok(r) = std::fs::read(e.path().join("spec.json"))
                        .map_err(|_| ())
                        .and_then(|b| serde_json::from_slice::<VmRecord>(&b).map_err(|_| ()))
                    {
                        used.extend(r.layers);
                        used.insert(r.launch.disk);
                    }
                }
            }
        }
        for dir in ["snapshots", "golden"] {
            if let Ok(entries) = std::fs::read_dir(self.cfg.data_dir.join(dir)) {
                for e in entries.flatten() {
                    match Self::read_snapshot(&e.path()) {
                        Ok(r) => used.extend(r.layers),
                        // An unreadable record might still need its layers: collect nothing this time.
                        Err(_) if e.path().join("snapshot.json").exists() => return Ok(()),
                        Err(_) => {}
                    }
                }
            }
        }
        let layers_dir = self.cfg.data_dir.join("layers");
        for e in std::fs::read_dir(&layers_dir)
            .ctx(|| "list layers".into())?
            .flatten()
        {
            if !used.contains(&e.path()) {
                tracing::debug!(layer = %e.path().display(), "removing unreferenced disk layer");
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    }

    /// Forget all in-memory handles without touching the VMs (used to
    /// simulate a worker restart in tests; dropping the runtime does the same).
    pub fn detach_all(&self) {
        if let Ok(mut m) = self.vms.lock() {
            m.clear();
        }
    }
}

/// The snapshot store side of the runtime (see [`crate::snapshot_store`]):
/// uploads after a capture, fetches into the local layout before a restore.
impl Runtime {
    /// Use `store` for user snapshots from now on (`None`: local only).
    /// With a store, [`Runtime::snapshot`] returns once the snapshot is in
    /// the store, [`Runtime::create`] fetches snapshots it does not have,
    /// and [`Runtime::delete_snapshot`] deletes them there too. Golden
    /// snapshots never go to the store.
    pub fn set_snapshot_store(&self, store: Option<Arc<SnapshotStore>>) {
        if let Ok(mut s) = self.store.lock() {
            *s = store;
        }
    }

    pub fn snapshot_store(&self) -> Option<Arc<SnapshotStore>> {
        self.store.lock().ok().and_then(|s| s.clone())
    }

    /// Snapshots fetched from the store since this runtime opened.
    pub fn store_fetches(&self) -> u64 {
        self.store_fetches
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn fetch_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.fetch_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_owned()).or_default().clone()
    }

    fn image_dir(&self) -> PathBuf {
        self.cfg
            .image_dir
            .clone()
            .unwrap_or_else(|| self.cfg.data_dir.join("images"))
    }

    /// Upload a captured snapshot: image files and layers (skipped when
    /// the store has them), the memory file, then `snapshot.json`.
    async fn upload_snapshot(&self, store: &SnapshotStore, record: &SnapshotRecord) -> Result<()> {
        // A user snapshot's RAM file lives in its own directory; anything
        // else is a golden RAM image, which is per worker.
        let own_ram = record
            .ram
            .as_ref()
            .filter(|r| r.parent() == record.memory.parent());
        if record.ram.is_some() && own_ram.is_none() {
            return Err(Error::SnapshotStore(
                "a snapshot over a shared RAM image (golden) cannot be stored".into(),
            ));
        }
        let compat_key = match &record.compat_key {
            Some(k) => k.clone(),
            None => self.compat_key().await?,
        };
        let bottom = record.layers.last().ok_or_else(|| Error::CorruptState {
            path: record.memory.clone(),
            message: "snapshot without disk layers".into(),
        })?;
        // Image files, layers and memory go up at once (each a bounded stream).
        let images = async {
            let kernel = upload_image_file(store, &record.launch.kernel).await?;
            let initrd = upload_image_file(store, &record.launch.initrd).await?;
            let base = match qemu_img_backing(bottom).await? {
                Some((path, format)) => Some(StoredBase {
                    sha256: upload_image_file(store, &path).await?,
                    format,
                }),
                None => None,
            };
            Ok::<_, Error>((kernel, initrd, base))
        };
        let layers = async {
            let mut layers = Vec::with_capacity(record.layers.len());
            for layer in &record.layers {
                // A layer fetched from the store is named by its digest there
                // (its local backing name differs, so its content does too).
                let digest = match layer.file_stem().and_then(|n| n.to_str()) {
                    Some(n) if snapshot_store::is_digest(n) => n.to_owned(),
                    _ => snapshot_store::sha256_file(layer).await?,
                };
                let uploaded = store
                    .upload_if_missing(layer, &SnapshotStore::layer_key(&digest))
                    .await?;
                tracing::debug!(layer = %layer.display(), %digest, uploaded, "snapshot layer in the store");
                layers.push(digest);
            }
            Ok(layers)
        };
        let memory_key = SnapshotStore::snapshot_key(&record.id, "memory");
        let memory = store.upload_file(&record.memory, &memory_key);
        let ram = async {
            let Some(ram) = own_ram else {
                return Ok(None);
            };
            let packed = ram.with_extension("packed");
            let (src, dest) = (ram.clone(), packed.clone());
            tokio::task::spawn_blocking(move || snapshot_store::pack_ram(&src, &dest))
                .await
                .map_err(|e| Error::SnapshotStore(format!("packing the RAM file: {e}")))?
                .ctx(|| format!("pack {}", ram.display()))?;
            let up = store
                .upload_file(&packed, &SnapshotStore::snapshot_key(&record.id, "ram"))
                .await;
            let _ = std::fs::remove_file(&packed);
            up.map(Some)
        };
        let ((kernel, initrd, base), layers, memory, ram) =
            tokio::try_join!(images, layers, memory, ram)?;
        let mut record = record.clone();
        record.compat_key = Some(compat_key.clone());
        store
            .put_snapshot(&StoredSnapshot {
                format: snapshot_store::FORMAT,
                compat_key,
                record,
                layers,
                base,
                kernel,
                initrd,
                memory,
                ram,
            })
            .await
    }

    /// Fetch snapshot `id` from the store into `<data>/snapshots/<id>/`
    /// (layers into `<data>/layers/<digest>.qcow2`, image files into the
    /// image dir's `blobs/<digest>`), once for concurrent callers.
    async fn fetch_snapshot(&self, store: &SnapshotStore, id: &str) -> Result<SnapshotRecord> {
        let lock = self.fetch_lock(id);
        let _single = lock.lock().await;
        if let Ok(r) = self.snapshot_record(id) {
            return Ok(r);
        }
        let t0 = std::time::Instant::now();
        let doc = store.get_snapshot(id).await?;
        let ours = self.compat_key().await?;
        if doc.compat_key != ours {
            return Err(Error::IncompatibleSnapshot {
                id: id.to_owned(),
                snapshot: doc.compat_key,
                worker: ours,
            });
        }
        let digests = doc
            .layers
            .iter()
            .chain([&doc.kernel, &doc.initrd, &doc.memory.sha256])
            .chain(doc.base.as_ref().map(|b| &b.sha256))
            .chain(doc.ram.as_ref().map(|r| &r.sha256));
        if doc.layers.is_empty()
            || doc.record.ram.is_some() != doc.ram.is_some()
            || !digests.into_iter().all(|d| snapshot_store::is_digest(d))
            || doc
                .base
                .as_ref()
                .is_some_and(|b| !matches!(b.format.as_str(), "raw" | "qcow2"))
        {
            return Err(Error::SnapshotStore(format!(
                "snapshot {id}: malformed snapshot.json in the store"
            )));
        }
        let staging = self
            .cfg
            .data_dir
            .join("snapshots")
            .join(format!(".fetch-{id}"));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).ctx(|| format!("create {}", staging.display()))?;
        let result = self.fetch_into(store, &doc, &staging).await;
        let _ = std::fs::remove_dir_all(&staging);
        let record = match result {
            // Deleted from the store while it was being fetched.
            Err(e @ Error::SnapshotStore(_)) => {
                let key = SnapshotStore::snapshot_key(id, "snapshot.json");
                return Err(match store.exists(&key).await {
                    Ok(false) => Error::NoSuchSnapshot(id.to_owned()),
                    _ => e,
                });
            }
            r => r?,
        };
        self.store_fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(snapshot = %id, ms = t0.elapsed().as_millis() as u64, "snapshot fetched from the store");
        Ok(record)
    }

    /// Download what snapshot `doc` needs and this worker lacks (image
    /// files, memory and layers at once), then commit it.
    async fn fetch_into(
        &self,
        store: &SnapshotStore,
        doc: &StoredSnapshot,
        staging: &std::path::Path,
    ) -> Result<SnapshotRecord> {
        let blobs = self.image_dir().join("blobs");
        let base = doc
            .base
            .as_ref()
            .map(|b| (blobs.join(&b.sha256), b.format.clone()));
        let images = async {
            for digest in [&doc.kernel, &doc.initrd]
                .into_iter()
                .chain(doc.base.as_ref().map(|b| &b.sha256))
            {
                self.fetch_image_file(store, digest).await?;
            }
            Ok(())
        };
        let (memory_key, memory_file) = (
            SnapshotStore::snapshot_key(&doc.record.id, "memory"),
            staging.join("memory"),
        );
        let memory = store.download_verified(&memory_key, &doc.memory.sha256, &memory_file);
        let layers = self.download_layers(store, doc, staging, base.as_ref());
        let ram = async {
            let Some(stored) = &doc.ram else {
                return Ok(());
            };
            let (packed, ram) = (staging.join("ram.packed"), staging.join("ram"));
            let key = SnapshotStore::snapshot_key(&doc.record.id, "ram");
            store
                .download_verified(&key, &stored.sha256, &packed)
                .await?;
            let (src, dest) = (packed.clone(), ram.clone());
            let unpacked =
                tokio::task::spawn_blocking(move || snapshot_store::unpack_ram(&src, &dest))
                    .await
                    .map_err(|e| Error::SnapshotStore(format!("unpacking the RAM file: {e}")))?;
            let _ = std::fs::remove_file(&packed);
            unpacked.map_err(|e| Error::SnapshotStore(format!("snapshot {}: {e}", doc.record.id)))
        };
        tokio::try_join!(images, memory, layers, ram)?;
        loop {
            if let Some(record) = self.commit_fetched(doc, staging, &blobs).await? {
                return Ok(record);
            }
            // A layer that was here got collected meanwhile: fetch it too.
            self.download_layers(store, doc, staging, base.as_ref())
                .await?;
        }
    }

    fn fetched_layer(&self, digest: &str) -> PathBuf {
        self.cfg
            .data_dir
            .join("layers")
            .join(format!("{digest}.qcow2"))
    }

    /// Download the layers of `doc` this worker lacks into `staging` (not
    /// under `layers/`: layer collection removes unreferenced files there)
    /// and point each at the local path of the layer below it (the bottom
    /// one at the base disk).
    async fn download_layers(
        &self,
        store: &SnapshotStore,
        doc: &StoredSnapshot,
        staging: &std::path::Path,
        base: Option<&(PathBuf, String)>,
    ) -> Result<()> {
        for (i, digest) in doc.layers.iter().enumerate() {
            let staged = staging.join(format!("{digest}.qcow2"));
            if self.fetched_layer(digest).is_file() || staged.is_file() {
                continue;
            }
            store
                .download_verified(&SnapshotStore::layer_key(digest), digest, &staged)
                .await?;
            let backing = match doc.layers.get(i + 1) {
                Some(below) => Some((self.fetched_layer(below), "qcow2".to_owned())),
                None => base.cloned(),
            };
            qemu_img_rebase(&staged, backing.as_ref()).await?;
        }
        Ok(())
    }

    /// Move the fetched layers into `layers/` and commit the snapshot's
    /// directory, under the layers lock, so that collection sees either
    /// neither or both. `None` when a layer that was here is gone.
    async fn commit_fetched(
        &self,
        doc: &StoredSnapshot,
        staging: &std::path::Path,
        blobs: &std::path::Path,
    ) -> Result<Option<SnapshotRecord>> {
        let _layers = self.layers_lock.lock().await;
        let staged = |d: &str| staging.join(format!("{d}.qcow2"));
        if doc
            .layers
            .iter()
            .any(|d| !self.fetched_layer(d).is_file() && !staged(d).is_file())
        {
            return Ok(None);
        }
        for digest in &doc.layers {
            if staged(digest).is_file() {
                let dest = self.fetched_layer(digest);
                std::fs::rename(staged(digest), &dest)
                    .ctx(|| format!("move {} into place", dest.display()))?;
                if crate::jail::is_root() {
                    crate::jail::make_shared_readonly(&dest)
                        .ctx(|| format!("chown {}", dest.display()))?;
                }
            }
        }
        let dir = self.snapshot_dir(&doc.record.id);
        let mut record = doc.record.clone();
        record.layers = doc.layers.iter().map(|d| self.fetched_layer(d)).collect();
        record.memory = dir.join("memory");
        record.ram = doc.ram.as_ref().map(|_| dir.join("ram"));
        record.launch.kernel = blobs.join(&doc.kernel);
        record.launch.initrd = blobs.join(&doc.initrd);
        record.launch.disk = record.layers[0].clone();
        record.compat_key = Some(doc.compat_key.clone());
        write_json_atomic(&staging.join("snapshot.json"), &record)?;
        if dir.exists() && !dir.join("snapshot.json").exists() {
            // Left by an earlier fetch or capture that died half-way.
            let _ = std::fs::remove_dir_all(&dir);
        }
        std::fs::rename(staging, &dir).ctx(|| format!("commit {}", dir.display()))?;
        Ok(Some(record))
    }

    /// The local path of image file `digest` (kernel, initramfs, base
    /// disk), downloaded into `<image dir>/blobs/` when absent: the image
    /// store's own content-addressed layout.
    async fn fetch_image_file(&self, store: &SnapshotStore, digest: &str) -> Result<PathBuf> {
        let blobs = self.image_dir().join("blobs");
        let dest = blobs.join(digest);
        if dest.is_file() {
            return Ok(dest);
        }
        std::fs::create_dir_all(&blobs).ctx(|| format!("create {}", blobs.display()))?;
        let tmp = blobs.join(format!(".{digest}.{}.fetch", uuid::Uuid::new_v4()));
        store
            .download_verified(&SnapshotStore::image_key(digest), digest, &tmp)
            .await?;
        let readable = std::os::unix::fs::PermissionsExt::from_mode(0o644);
        let moved = std::fs::set_permissions(&tmp, readable)
            .and_then(|()| std::fs::rename(&tmp, &dest))
            .ctx(|| format!("store {}", dest.display()));
        if moved.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        moved?;
        Ok(dest)
    }
}

/// Upload an image file (kernel, initramfs, base disk) as `images/<digest>`
/// unless the store has it; its digest. Files of the image store are named
/// by their digest already (not hashed again).
async fn upload_image_file(store: &SnapshotStore, path: &std::path::Path) -> Result<String> {
    let digest = match path.file_name().and_then(|n| n.to_str()) {
        Some(n) if snapshot_store::is_digest(n) => n.to_owned(),
        _ => snapshot_store::sha256_file(path).await?,
    };
    store
        .upload_if_missing(path, &SnapshotStore::image_key(&digest))
        .await?;
    Ok(digest)
}

/// The backing file (as a path, resolved like QEMU does) and its format of
/// qcow2 image `layer`, if it has one.
async fn qemu_img_backing(layer: &std::path::Path) -> Result<Option<(PathBuf, String)>> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["info", "-U", "--output=json", "-f", "qcow2"])
        .arg(layer)
        .stdin(std::process::Stdio::null());
    let out = timeouts::output_within(&mut cmd, timeouts::QEMU_IMG, "qemu-img info").await?;
    if !out.status.success() {
        return Err(Error::Qemu(format!(
            "qemu-img info {} failed: {}",
            layer.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| Error::Qemu(format!("qemu-img info {}: {e}", layer.display())))?;
    let Some(backing) = info
        .get("full-backing-filename")
        .or_else(|| info.get("backing-filename"))
        .and_then(serde_json::Value::as_str)
    else {
        return Ok(None);
    };
    let format = info
        .get("backing-filename-format")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("raw")
        .to_owned();
    Ok(Some((PathBuf::from(backing), format)))
}

/// Point qcow2 `layer` at `backing` (or at nothing) without touching its
/// data (`qemu-img rebase -u`): a fetched layer still names the backing
/// path of the worker that captured it.
async fn qemu_img_rebase(
    layer: &std::path::Path,
    backing: Option<&(PathBuf, String)>,
) -> Result<()> {
    let mut cmd = tokio::process::Command::new("qemu-img");
    cmd.args(["rebase", "-u", "-f", "qcow2"]);
    match backing {
        Some((path, format)) => {
            cmd.args(["-F", format.as_str(), "-b"]).arg(path);
        }
        None => {
            cmd.args(["-b", ""]);
        }
    }
    cmd.arg(layer).stdin(std::process::Stdio::null());
    let out = timeouts::output_within(&mut cmd, timeouts::QEMU_IMG, "qemu-img rebase").await?;
    if !out.status.success() {
        return Err(Error::Qemu(format!(
            "qemu-img rebase {} failed: {}",
            layer.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// True for a restore that failed in QEMU (the snapshot's state or disk
/// could not be loaded), as opposed to the host (network, quota, ids).
fn is_restore_failure(e: &Error) -> bool {
    matches!(
        e,
        Error::Qemu(_) | Error::Qmp(_) | Error::Timeout { .. } | Error::CorruptState { .. }
    )
}

/// Where `binary` is: itself when it names a path, else the first match on `PATH`.
fn resolve_binary(binary: &std::path::Path) -> PathBuf {
    if binary.components().count() > 1 {
        return binary.to_path_buf();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .unwrap_or_else(|| binary.to_path_buf())
}

/// The CPU model a guest of `accel` sees: QEMU's `max` model under TCG
/// (defined by the QEMU build), the host CPU under KVM (its model name and
/// feature flags, from `/proc/cpuinfo`).
fn cpu_model(accel: Accel) -> String {
    match accel {
        Accel::Tcg => "tcg-max".into(),
        Accel::Kvm => {
            let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        (k.trim() == name).then(|| v.trim().to_owned())
                    })
                    .unwrap_or_default()
            };
            format!("kvm-host:{}:{}", field("model name"), field("flags"))
        }
    }
}

/// 16 hex digits of SHA-256 over QEMU's `--version`, the SHA-256 of the
/// QEMU binary and the guest CPU model ([`cpu_model`]).
async fn qemu_build_id(binary: &std::path::Path, accel: Accel) -> Result<String> {
    use sha2::{Digest, Sha256};
    let path = resolve_binary(binary);
    let mut cmd = tokio::process::Command::new(&path);
    cmd.arg("--version").stdin(std::process::Stdio::null());
    let out = timeouts::output_within(&mut cmd, timeouts::QEMU_IMG, "qemu --version").await?;
    if !out.status.success() {
        return Err(Error::Qemu(format!(
            "{} --version failed: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let version = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let hashed = path.clone();
    let binary_hash = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
        let mut f = std::fs::File::open(&hashed)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    })
    .await
    .map_err(|e| Error::Qemu(format!("hashing the QEMU binary: {e}")))?
    .ctx(|| format!("hash {}", path.display()))?;
    let cpu = cpu_model(accel);
    tracing::info!(qemu = %path.display(), %version, %binary_hash, "QEMU build (part of golden snapshot keys)");
    let id = hex::encode(Sha256::digest(format!("{version}\n{binary_hash}\n{cpu}")));
    Ok(id[..16].to_owned())
}

/// The snapshot record in `dir` when it and every file it names exist.
fn complete_snapshot(dir: &std::path::Path) -> Option<SnapshotRecord> {
    let r = Runtime::read_snapshot(dir).ok()?;
    let complete = r.memory.is_file()
        && r.layers.iter().all(|l| l.is_file())
        && r.ram.as_ref().is_none_or(|p| p.is_file());
    complete.then_some(r)
}
