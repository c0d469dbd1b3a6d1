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
//! ```
//!
//! State directory `<data>/vms/<id>/`: `spec.json` (what was launched),
//! `qemu.pid`, `qmp.sock`, `agent.sock`, `console.log`, `qemu.log`,
//! `disk.qcow2`. [`Runtime::open`] walks these directories and re-adopts
//! every VM whose QEMU still runs; the others are reported `Stopped`.

use crate::accel::{self, Accel, AccelChoice};
use crate::agent::{connect_vm, AgentClient, ExecStream};
use crate::catalog::MachineType;
use crate::error::{Error, IoContext, Result};
use crate::exec::{self, ExecOutput, ExecRequest};
use crate::hypervisor::{Hypervisor, LaunchSpec, VmPaths, VmProcess};
use crate::images::{self, GuestImage, ImageStore, Progress};
use crate::qemu::QemuMicrovm;
use fastvm_agent_proto::GuestConfig;
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
        }
    }
}

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
}

/// A request to create a VM.
#[derive(Debug, Clone, Default)]
pub struct CreateVm {
    /// Chosen by the caller (the control plane's id); a new UUID when `None`.
    pub id: Option<String>,
    pub machine: String,
    pub disk_gib: Option<u32>,
    pub hostname: Option<String>,
    /// Visible to every exec in the VM.
    pub env: BTreeMap<String, String>,
}

/// `spec.json` of a VM directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmRecord {
    launch: LaunchSpec,
    hostname: Option<String>,
    env: BTreeMap<String, String>,
}

struct Vm {
    record: VmRecord,
    paths: VmPaths,
    state: Mutex<VmState>,
    process: Mutex<Option<Arc<dyn VmProcess>>>,
    agent: tokio::sync::Mutex<Option<AgentClient>>,
    /// Serialises lifecycle operations of this VM.
    op: tokio::sync::Mutex<()>,
}

impl Vm {
    fn state(&self) -> VmState {
        self.state.lock().map(|s| s.clone()).unwrap_or(VmState::Error("poisoned".into()))
    }
    fn set_state(&self, s: VmState) {
        if let Ok(mut g) = self.state.lock() {
            *g = s;
        }
    }
    fn process(&self) -> Option<Arc<dyn VmProcess>> {
        self.process.lock().ok().and_then(|p| p.clone())
    }
    fn info(&self) -> VmInfo {
        let l = &self.record.launch;
        VmInfo {
            id: l.id.clone(),
            machine: l.machine.clone(),
            vcpus: l.vcpus,
            memory_mib: l.memory_mib,
            disk_gib: l.disk_gib,
            state: self.state(),
            pid: self.process().filter(|p| !p.has_exited()).map(|p| p.pid()),
            image_id: l.image_id.clone(),
        }
    }
    fn guest_config(&self) -> GuestConfig {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).ok().and_then(|d| u64::try_from(d.as_nanos()).ok());
        GuestConfig {
            hostname: self.record.hostname.clone(),
            env: self.record.env.clone(),
            time_unix_ns: now,
            entropy: (0..32).map(|_| rand::random::<u8>()).collect(),
        }
    }
}

pub struct Runtime {
    cfg: RuntimeConfig,
    accel: Accel,
    hv: Arc<dyn Hypervisor>,
    vms: Mutex<HashMap<String, Arc<Vm>>>,
    images: tokio::sync::OnceCell<(ImageStore, GuestImage)>,
    progress: Progress,
}

impl Runtime {
    /// Open the runtime on its data dir and re-adopt the VMs found there.
    pub async fn open(cfg: RuntimeConfig) -> Result<Arc<Runtime>> {
        let vms_dir = cfg.data_dir.join("vms");
        std::fs::create_dir_all(&vms_dir).ctx(|| format!("create {}", vms_dir.display()))?;
        let accel = accel::choose(cfg.accel);
        let hv: Arc<dyn Hypervisor> = Arc::new(QemuMicrovm { binary: cfg.qemu_binary.clone() });
        let rt = Arc::new(Runtime { cfg, accel, hv, vms: Mutex::new(HashMap::new()), images: Default::default(), progress: images::log_progress() });
        rt.adopt_all().await?;
        Ok(rt)
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// Set the sink of image-build progress lines (default: tracing).
    pub fn set_progress(self: &mut Arc<Self>, progress: Progress) {
        if let Some(rt) = Arc::get_mut(self) {
            rt.progress = progress;
        }
    }

    async fn adopt_all(self: &Arc<Self>) -> Result<()> {
        let dir = self.cfg.data_dir.join("vms");
        for entry in std::fs::read_dir(&dir).ctx(|| format!("list {}", dir.display()))?.flatten() {
            let paths = VmPaths::new(entry.path());
            let record: VmRecord = match std::fs::read(paths.spec()).map_err(|e| e.to_string()).and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string())) {
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
                    let state = if p.is_paused().await.unwrap_or(false) { VmState::Paused } else { VmState::Running };
                    (state, Some(p))
                }
                Ok(None) => (VmState::Stopped, None),
                Err(e) => (VmState::Error(e.to_string()), None),
            };
            tracing::info!(vm = %id, %state, "adopted VM");
            let vm = Arc::new(Vm {
                record,
                paths,
                state: Mutex::new(state),
                process: Mutex::new(process.clone()),
                agent: Default::default(),
                op: Default::default(),
            });
            if let Some(p) = process {
                self.watch(vm.clone(), p);
            }
            self.vms.lock().map_err(|_| Error::Qemu("poisoned".into()))?.insert(id, vm);
        }
        Ok(())
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
        self.vms.lock().ok().and_then(|m| m.get(id).cloned()).ok_or_else(|| Error::NoSuchVm(id.to_owned()))
    }

    pub fn get(&self, id: &str) -> Result<VmInfo> {
        Ok(self.vm(id)?.info())
    }

    pub fn list(&self) -> Vec<VmInfo> {
        let mut v: Vec<VmInfo> = self.vms.lock().map(|m| m.values().map(|vm| vm.info()).collect()).unwrap_or_default();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
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
                let dir = self.cfg.image_dir.clone().unwrap_or_else(|| self.cfg.data_dir.join("images"));
                let store = ImageStore::new(&dir, &self.cfg.debian_mirror, agent)?;
                let image = store.ensure_default(&self.progress).await?;
                Ok::<_, Error>((store, image))
            })
            .await?;
        Ok(image)
    }

    /// Boot a new VM and wait until its agent answers.
    pub async fn create(&self, req: CreateVm) -> Result<VmInfo> {
        let machine = MachineType::lookup(&req.machine)?;
        let image = self.image().await?.clone();
        let id = req.id.clone().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let disk_gib = req.disk_gib.unwrap_or(machine.disk_gib);
        let paths = VmPaths::new(self.cfg.data_dir.join("vms").join(&id));
        if paths.dir.exists() {
            return Err(Error::Qemu(format!("VM {id} already exists")));
        }
        std::fs::create_dir_all(&paths.dir).ctx(|| format!("create {}", paths.dir.display()))?;
        let record = VmRecord { launch: LaunchSpec::new(&id, machine, disk_gib, self.accel, &image), hostname: req.hostname.clone(), env: req.env.clone() };
        let bytes = serde_json::to_vec_pretty(&record).map_err(|e| Error::Qemu(e.to_string()))?;
        std::fs::write(paths.spec(), bytes).ctx(|| "write spec.json".into())?;
        let vm = Arc::new(Vm {
            record,
            paths,
            state: Mutex::new(VmState::Stopped),
            process: Mutex::new(None),
            agent: Default::default(),
            op: Default::default(),
        });
        self.vms.lock().map_err(|_| Error::Qemu("poisoned".into()))?.insert(id.clone(), vm.clone());
        let _op = vm.op.lock().await;
        match self.boot(&vm, &image).await {
            Ok(()) => {
                vm.set_state(VmState::Running);
                Ok(vm.info())
            }
            Err(e) => {
                tracing::warn!(vm = %id, error = %e, "VM failed to start");
                if let Some(p) = vm.process() {
                    let _ = p.kill().await;
                }
                vm.set_state(VmState::Error(e.to_string()));
                Err(e)
            }
        }
    }

    async fn boot(&self, vm: &Arc<Vm>, image: &GuestImage) -> Result<()> {
        let disk = vm.paths.disk();
        let out = tokio::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image.rootfs)
            .arg(&disk)
            .arg(format!("{}G", vm.record.launch.disk_gib))
            .output()
            .await
            .ctx(|| "run qemu-img".into())?;
        if !out.status.success() {
            return Err(Error::Qemu(format!("qemu-img create failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
        }
        let process: Arc<dyn VmProcess> = Arc::from(self.hv.start(&vm.record.launch, &vm.paths).await?);
        if let Ok(mut p) = vm.process.lock() {
            *p = Some(process.clone());
        }
        self.watch(vm.clone(), process.clone());
        let agent_sock = vm.paths.agent();
        let agent = tokio::select! {
            a = connect_vm(&agent_sock, self.cfg.boot_timeout) => a?,
            _ = process.wait_exit() => {
                let console = std::fs::read_to_string(vm.paths.console_log()).unwrap_or_default();
                let tail: String = console.lines().rev().take(5).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join(" | ");
                return Err(Error::Qemu(format!("VM exited during boot; console: {tail}")));
            }
        };
        agent.configure(vm.guest_config()).await?;
        *vm.agent.lock().await = Some(agent);
        Ok(())
    }

    /// The VM's agent connection, reconnecting when needed.
    async fn agent(&self, vm: &Vm) -> Result<AgentClient> {
        let mut slot = vm.agent.lock().await;
        if let Some(a) = slot.as_ref() {
            if a.closed_reason().is_none() {
                return Ok(a.clone());
            }
        }
        let agent = connect_vm(&vm.paths.agent(), Duration::from_secs(30)).await?;
        agent.configure(vm.guest_config()).await?;
        *slot = Some(agent.clone());
        Ok(agent)
    }

    fn require(vm: &Vm, want: VmState, action: &'static str) -> Result<()> {
        let state = vm.state();
        if state != want {
            return Err(Error::WrongState { id: vm.record.launch.id.clone(), state: state.to_string(), action, need: if want == VmState::Running { "running" } else { "paused" } });
        }
        Ok(())
    }

    /// Start a process in a running VM and stream its events.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecStream> {
        let spec = req.to_spec()?;
        let vm = self.vm(id)?;
        Self::require(&vm, VmState::Running, "exec")?;
        self.agent(&vm).await?.exec(spec).await
    }

    /// Run a process to completion, buffering at most `cap` bytes per stream.
    pub async fn exec_buffered(&self, id: &str, req: &ExecRequest, cap: usize) -> Result<ExecOutput> {
        exec::collect(self.exec(id, req).await?, cap).await
    }

    /// One protocol round trip with the VM's agent (no process spawned).
    pub async fn ping(&self, id: &str) -> Result<()> {
        let vm = self.vm(id)?;
        Self::require(&vm, VmState::Running, "ping")?;
        self.agent(&vm).await?.ping().await
    }

    /// Where the VM's files live (console log, sockets, disk).
    pub fn vm_dir(&self, id: &str) -> Result<PathBuf> {
        Ok(self.vm(id)?.paths.dir.clone())
    }

    pub async fn pause(&self, id: &str) -> Result<VmInfo> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        Self::require(&vm, VmState::Running, "pause")?;
        let p = vm.process().ok_or_else(|| Error::Qemu("no process".into()))?;
        p.pause().await?;
        vm.set_state(VmState::Paused);
        Ok(vm.info())
    }

    pub async fn resume(&self, id: &str) -> Result<VmInfo> {
        let vm = self.vm(id)?;
        let _op = vm.op.lock().await;
        Self::require(&vm, VmState::Paused, "resume")?;
        let p = vm.process().ok_or_else(|| Error::Qemu("no process".into()))?;
        p.resume().await?;
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
                if let Ok(agent) = self.agent(&vm).await {
                    let _ = agent.shutdown().await;
                }
                if tokio::time::timeout(Duration::from_secs(10), p.wait_exit()).await.is_err() {
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
        vm.set_state(VmState::Stopped);
        if let Some(p) = vm.process() {
            p.kill().await?;
        }
        *vm.agent.lock().await = None;
        if vm.paths.dir.exists() {
            std::fs::remove_dir_all(&vm.paths.dir).ctx(|| format!("remove {}", vm.paths.dir.display()))?;
        }
        if let Ok(mut m) = self.vms.lock() {
            m.remove(id);
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
