//! Control-plane tests over a simulated worker: the lifecycle paths a real
//! VM rarely takes (boots that fail or outlast the launch wait, deletes
//! during boot, worker failures, interrupted transitions at restart, a guest
//! dying mid-stream, snapshot captures that fail, restores racing a
//! snapshot delete), fast and deterministic, through the real router.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use fastvm_agent_proto::ExitStatus;
use fastvm_server::store::SnapshotRecord;
use fastvm_server::store::{Store, VmRecord};
use fastvm_server::worker::{ExecEvents, VmSpec, Worker, WorkerError};
use fastvm_server::AppState;
use fastvm_types::snapshot::SnapshotStatus;
use fastvm_types::{FirewallPolicy, OrgId, SnapshotId, VmId, VmStatus};
use fastvm_worker::{ExecEvent, ExecRequest, VmState};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A worker whose VMs are entries in a map; boots can be held at a gate.
/// A Dockerfile build a [`FakeWorker`] saw: (context bytes, path, target, build args).
type Built = (Vec<u8>, String, Option<String>, String);

#[derive(Default)]
struct FakeWorker {
    vms: Mutex<HashMap<VmId, VmState>>,
    /// When set, `create` waits for a permit.
    gate: Option<tokio::sync::Semaphore>,
    fail_create: AtomicBool,
    fail_pause: AtomicBool,
    fail_snapshot: AtomicBool,
    deleted: Mutex<Vec<VmId>>,
    snapshots: Mutex<HashSet<SnapshotId>>,
    /// The spec of every create, in order.
    created: Mutex<Vec<VmSpec>>,
    /// Every firewall pushed by set_firewall, in order.
    firewalls: Mutex<Vec<(VmId, FirewallPolicy)>>,
    /// When set, `set_firewall` fails (and enforces nothing new).
    fail_firewall: AtomicBool,
    /// What each VM enforces (`enforced_firewall`).
    enforced: Mutex<HashMap<VmId, FirewallPolicy>>,
    /// How many times `resume` ran.
    resumes: AtomicUsize,
    /// When set, `import_image` waits for a permit after its pull (a
    /// long import, cancelled or interrupted by a restart).
    import_gate: Option<tokio::sync::Semaphore>,
    /// Dockerfile builds seen: (context bytes, path, target, build args).
    built: std::sync::Mutex<Vec<Built>>,
}

impl FakeWorker {
    fn set(&self, id: VmId, state: VmState) {
        if let Ok(mut m) = self.vms.lock() {
            m.insert(id, state);
        }
    }
    fn get(&self, id: VmId) -> Option<VmState> {
        self.vms.lock().ok().and_then(|m| m.get(&id).cloned())
    }
    fn has(&self, id: VmId) -> bool {
        self.vms
            .lock()
            .map(|m| m.contains_key(&id))
            .unwrap_or(false)
    }
    fn has_snapshot(&self, id: SnapshotId) -> bool {
        self.snapshots
            .lock()
            .map(|m| m.contains(&id))
            .unwrap_or(false)
    }
    fn last_created(&self) -> Option<VmSpec> {
        self.created.lock().ok().and_then(|c| c.last().cloned())
    }
}

fn exit(code: i32) -> ExecEvent {
    ExecEvent::Exit(ExitStatus {
        code,
        signal: None,
        timed_out: false,
        duration_ms: 7,
        error: None,
    })
}

#[async_trait]
impl Worker for FakeWorker {
    fn id(&self) -> &str {
        "local"
    }

    async fn create(&self, spec: VmSpec) -> Result<(), WorkerError> {
        if let Ok(mut c) = self.created.lock() {
            c.push(spec.clone());
        }
        if let Some(gate) = &self.gate {
            gate.acquire()
                .await
                .map_err(|e| WorkerError::Failed(e.to_string()))?
                .forget();
        }
        if self.fail_create.load(Ordering::SeqCst) {
            self.set(spec.id, VmState::Error("boom".into()));
            return Err(WorkerError::Failed("QEMU failed: boom".into()));
        }
        if let Some(snap) = spec.snapshot.filter(|s| !self.has_snapshot(*s)) {
            return Err(WorkerError::NoSuchSnapshot(format!(
                "no snapshot with id {snap}"
            )));
        }
        if let Ok(mut e) = self.enforced.lock() {
            e.insert(spec.id, spec.firewall.clone());
        }
        self.set(spec.id, VmState::Running);
        Ok(())
    }

    async fn state(&self, id: VmId) -> Result<Option<VmState>, WorkerError> {
        Ok(self.get(id))
    }

    async fn list(&self) -> Result<Vec<(VmId, VmState)>, WorkerError> {
        Ok(self
            .vms
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default())
    }

    async fn pause(&self, id: VmId) -> Result<(), WorkerError> {
        if self.fail_pause.load(Ordering::SeqCst) {
            return Err(WorkerError::Failed("QMP error: stop failed".into()));
        }
        self.set(id, VmState::Paused);
        Ok(())
    }

    async fn resume(&self, id: VmId) -> Result<(), WorkerError> {
        self.resumes.fetch_add(1, Ordering::SeqCst);
        // Long enough for concurrent requests to pile up behind it.
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.set(id, VmState::Running);
        Ok(())
    }

    /// The "guest" is this host: port `port` on 127.0.0.1.
    async fn connect(
        &self,
        id: VmId,
        port: u16,
    ) -> Result<fastvm_server::worker::GuestStream, WorkerError> {
        if self.get(id) != Some(VmState::Running) {
            return Err(WorkerError::WrongState(format!("VM {id} is not running")));
        }
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| WorkerError::ConnectRefused(e.to_string()))?;
        Ok(Box::new(stream))
    }

    async fn delete(&self, id: VmId) -> Result<(), WorkerError> {
        if let Ok(mut m) = self.vms.lock() {
            m.remove(&id);
        }
        if let Ok(mut d) = self.deleted.lock() {
            d.push(id);
        }
        Ok(())
    }

    async fn exec(&self, id: VmId, req: ExecRequest) -> Result<ExecEvents, WorkerError> {
        if self.get(id) != Some(VmState::Running) {
            return Err(WorkerError::WrongState(format!("VM {id} is not running")));
        }
        let events: Vec<Result<ExecEvent, WorkerError>> = match req.argv.first().map(String::as_str)
        {
            Some("die-midway") => vec![
                Ok(ExecEvent::Stdout("partial".into())),
                Err(WorkerError::AgentUnavailable(
                    "agent connection closed".into(),
                )),
            ],
            Some("flood") => {
                let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
                let mut v: Vec<_> = (0..5)
                    .map(|_| Ok(ExecEvent::Stdout(chunk.clone())))
                    .collect();
                v.push(Ok(exit(0)));
                v
            }
            _ => vec![
                Ok(ExecEvent::Stdout("out\n".into())),
                Ok(ExecEvent::Stderr("err\n".into())),
                Ok(exit(3)),
            ],
        };
        Ok(futures::stream::iter(events).boxed())
    }

    async fn snapshot(&self, vm: VmId, snapshot: SnapshotId) -> Result<(), WorkerError> {
        if !matches!(self.get(vm), Some(VmState::Running | VmState::Paused)) {
            return Err(WorkerError::WrongState(format!(
                "VM {vm} is not running or paused"
            )));
        }
        if self.fail_snapshot.load(Ordering::SeqCst) {
            return Err(WorkerError::Failed(
                "writing the memory state failed: No space left on device".into(),
            ));
        }
        if let Ok(mut s) = self.snapshots.lock() {
            s.insert(snapshot);
        }
        Ok(())
    }

    async fn build_dockerfile(
        &self,
        job: fastvm_server::worker::DockerfileImport,
        mut context: fastvm_server::worker::ByteStream,
        progress: fastvm_server::worker::ImportSink,
    ) -> Result<fastvm_server::worker::ImportedImage, WorkerError> {
        use futures::StreamExt as _;
        let mut bytes = Vec::new();
        while let Some(chunk) = context.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| WorkerError::Failed(e.to_string()))?);
        }
        assert_eq!(bytes.len() as u64, job.context_bytes);
        let args: Vec<String> = job
            .build_args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if let Ok(mut b) = self.built.lock() {
            b.push((
                bytes,
                job.dockerfile_path.clone(),
                job.target.clone(),
                args.join(","),
            ));
        }
        if let Ok(mut s) = self.snapshots.lock() {
            s.insert(job.snapshot);
        }
        progress(fastvm_server::worker::ImportNote::Event {
            phase: "build".into(),
            status: "completed".into(),
            message: None,
        });
        Ok(fastvm_server::worker::ImportedImage {
            manifest_digest: "sha256:beef".into(),
            env: Default::default(),
            working_dir: None,
            user: None,
        })
    }

    async fn import_image(
        &self,
        job: fastvm_server::worker::ImageImport,
        progress: fastvm_server::worker::ImportSink,
    ) -> Result<fastvm_server::worker::ImportedImage, WorkerError> {
        use fastvm_server::worker::ImportNote;
        let event = |phase: &str, status: &str| ImportNote::Event {
            phase: phase.into(),
            status: status.into(),
            message: None,
        };
        progress(event("pull", "started"));
        if job.image.contains("missing") {
            return Err(WorkerError::Import(format!(
                "image {} was not found in its registry",
                job.image
            )));
        }
        progress(ImportNote::Log {
            line: "layer 1/1: cached".into(),
        });
        progress(event("pull", "completed"));
        if let Some(gate) = &self.import_gate {
            let _permit = gate.acquire().await;
        }
        // The build VM is named after the import; the snapshot appears.
        if let Ok(vm) = job.import_id.parse() {
            self.set(vm, VmState::Running);
        }
        if let Ok(mut s) = self.snapshots.lock() {
            s.insert(job.snapshot);
        }
        if let Ok(vm) = job.import_id.parse() {
            if let Ok(mut m) = self.vms.lock() {
                m.remove(&vm);
            }
        }
        progress(event("warming", "completed"));
        Ok(fastvm_server::worker::ImportedImage {
            manifest_digest: "sha256:feed".into(),
            env: Default::default(),
            working_dir: None,
            user: None,
        })
    }

    async fn delete_snapshot(&self, snapshot: SnapshotId) -> Result<(), WorkerError> {
        if let Ok(mut s) = self.snapshots.lock() {
            s.remove(&snapshot);
        }
        Ok(())
    }

    async fn set_firewall(&self, id: VmId, policy: &FirewallPolicy) -> Result<(), WorkerError> {
        if !self.has(id) {
            return Err(WorkerError::NotFound(format!("no VM {id}")));
        }
        if self.fail_firewall.load(Ordering::SeqCst) {
            return Err(WorkerError::Failed(
                "VM networking failed: nft -f - failed: netlink: Error: Could not process rule"
                    .into(),
            ));
        }
        if let Ok(mut f) = self.firewalls.lock() {
            f.push((id, policy.clone()));
        }
        if let Ok(mut e) = self.enforced.lock() {
            e.insert(id, policy.clone());
        }
        Ok(())
    }

    async fn enforced_firewall(&self, id: VmId) -> Result<Option<FirewallPolicy>, WorkerError> {
        Ok(self.enforced.lock().ok().and_then(|e| e.get(&id).cloned()))
    }

    async fn public_ipv6(&self, id: VmId) -> Result<Option<String>, WorkerError> {
        Ok(self.has(id).then(|| "fd00:fa57::1:2".to_owned()))
    }
}

struct Harness {
    state: AppState,
    router: axum::Router,
    worker: Arc<FakeWorker>,
    key: String,
    _dir: Arc<tempfile::TempDir>,
}

async fn harness(
    worker: FakeWorker,
    launch_wait: Duration,
) -> Result<Harness, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), None).await?;
    fastvm_server::bootstrap(&store, dir.path()).await?;
    let key = std::fs::read_to_string(dir.path().join("admin-api-key"))?
        .trim()
        .to_owned();
    let worker = Arc::new(worker);
    let state = AppState::new(store, worker.clone(), launch_wait);
    let router = fastvm_server::routes::router(state.clone());
    Ok(Harness {
        state,
        router,
        worker,
        key,
        _dir: Arc::new(dir),
    })
}

impl Harness {
    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        accept: Option<&str>,
    ) -> Result<(StatusCode, Vec<u8>), Box<dyn std::error::Error>> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {}", self.key));
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&b)?))?,
            None => req.body(Body::empty())?,
        };
        let res = self.router.clone().oneshot(req).await?;
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 64 << 20).await?;
        Ok((status, bytes.to_vec()))
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), Box<dyn std::error::Error>> {
        let (status, bytes) = self.send(method, path, body, None).await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    async fn status_of(&self, id: &str) -> Result<String, Box<dyn std::error::Error>> {
        let (_, v) = self.call("GET", &format!("/v1/vms/{id}"), None).await?;
        Ok(v["status"].as_str().unwrap_or("").to_owned())
    }

    /// Poll until the VM has `status` (background work settles quickly here).
    async fn wait_status(&self, id: &str, status: &str) -> TestResult {
        for _ in 0..200 {
            if self.status_of(id).await? == status {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!(
            "VM {id} never became {status} (is {})",
            self.status_of(id).await?
        )
        .into())
    }
}

fn gated() -> FakeWorker {
    FakeWorker {
        gate: Some(tokio::sync::Semaphore::new(0)),
        ..Default::default()
    }
}

fn id_of(v: &Value) -> Result<String, Box<dyn std::error::Error>> {
    Ok(v["id"].as_str().ok_or("no id")?.to_owned())
}

#[tokio::test]
async fn slow_boot_answers_202_then_runs() -> TestResult {
    let h = harness(gated(), Duration::from_millis(50)).await?;
    let (status, vm) = h
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"machineType": "c2m4", "ttl": {"seconds": 30, "action": "pause"}})),
        )
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!(
        (
            &vm["status"],
            &vm["cpu"],
            &vm["memoryMiB"],
            &vm["expiresAtMs"]
        ),
        (
            &json!("provisioning"),
            &json!(2),
            &json!(4096),
            &json!(null)
        )
    );
    let id = id_of(&vm)?;
    // Provisioning VMs refuse transitions.
    let (status, err) = h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::CONFLICT, &json!("INVALID_STATE"))
    );
    assert!(err["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("provisioning")));
    if let Some(gate) = &h.worker.gate {
        gate.add_permits(1);
    }
    h.wait_status(&id, "running").await?;
    // The TTL starts when the VM runs.
    let (_, vm) = h.call("GET", &format!("/v1/vms/{id}"), None).await?;
    assert!(vm["expiresAtMs"].is_u64());
    Ok(())
}

#[tokio::test]
async fn fast_boot_answers_201() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (status, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    assert_eq!(
        (status, &vm["status"]),
        (StatusCode::CREATED, &json!("running"))
    );
    Ok(())
}

#[tokio::test]
async fn failed_boot_is_error() -> TestResult {
    let worker = FakeWorker::default();
    worker.fail_create.store(true, Ordering::SeqCst);
    let h = harness(worker, Duration::from_secs(5)).await?;
    let (status, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    assert_eq!(
        (status, &vm["status"]),
        (StatusCode::ACCEPTED, &json!("error"))
    );
    let id = id_of(&vm)?;
    // error is terminal: not reconciled away, refuses pause, can be deleted.
    assert_eq!(h.status_of(&id).await?, "error");
    assert_eq!(
        h.call("POST", &format!("/v1/vms/{id}/pause"), None)
            .await?
            .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        h.call("DELETE", &format!("/v1/vms/{id}"), None).await?.0,
        StatusCode::OK
    );
    assert!(!h.worker.has(id.parse()?));
    Ok(())
}

#[tokio::test]
async fn delete_during_boot_leaves_nothing_behind() -> TestResult {
    let h = harness(gated(), Duration::ZERO).await?;
    let (status, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = id_of(&vm)?;
    let (status, body) = h.call("DELETE", &format!("/v1/vms/{id}"), None).await?;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"id": id, "deleted": true}))
    );
    assert_eq!(
        h.call("GET", &format!("/v1/vms/{id}"), None).await?.0,
        StatusCode::NOT_FOUND
    );
    // The boot completes after the delete: the provisioner removes the VM.
    if let Some(gate) = &h.worker.gate {
        gate.add_permits(1);
    }
    let vm_id: VmId = id.parse()?;
    for _ in 0..200 {
        if !h.worker.has(vm_id) && h.worker.deleted.lock().map(|d| d.len()).unwrap_or(0) >= 2 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("the VM booted after its delete was left running".into())
}

#[tokio::test]
async fn failed_pause_settles_on_the_workers_view() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    let id = id_of(&vm)?;
    h.worker.fail_pause.store(true, Ordering::SeqCst);
    let (status, err) = h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::INTERNAL_SERVER_ERROR, &json!("WORKER_ERROR"))
    );
    assert_eq!(h.status_of(&id).await?, "running");
    h.worker.fail_pause.store(false, Ordering::SeqCst);
    let (status, vm) = h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?;
    assert_eq!((status, &vm["status"]), (StatusCode::OK, &json!("paused")));
    Ok(())
}

#[tokio::test]
async fn worker_states_are_reconciled_on_read() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    let id = id_of(&vm)?;
    let vm_id: VmId = id.parse()?;
    h.worker.set(vm_id, VmState::Stopped);
    let (_, list) = h.call("GET", "/v1/vms?status=running", None).await?;
    assert_eq!(list, json!([]), "a dead VM is no longer listed as running");
    assert_eq!(h.status_of(&id).await?, "stopped");
    // A VM that vanished from its worker is stopped too, and exec says why.
    let (_, vm2) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    let id2 = id_of(&vm2)?;
    if let Ok(mut m) = h.worker.vms.lock() {
        m.remove(&id2.parse()?);
    }
    let (status, err) = h
        .call(
            "POST",
            &format!("/v1/vms/{id2}/exec"),
            Some(json!({"command": ["true"]})),
        )
        .await?;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped")),
        "{err}"
    );
    Ok(())
}

#[tokio::test]
async fn exec_buffered_and_streamed() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    let path = format!("/v1/vms/{}/exec", id_of(&vm)?);
    let (status, out) = h
        .call("POST", &path, Some(json!({"command": ["anything"]})))
        .await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        out,
        json!({"exitCode": 3, "stdout": "out\n", "stderr": "err\n", "timedOut": false, "stdoutTruncated": false, "stderrTruncated": false, "durationMs": 7})
    );

    let (_, flood) = h
        .call("POST", &path, Some(json!({"command": ["flood"]})))
        .await?;
    assert_eq!(
        (
            flood["stdout"].as_str().map(str::len),
            &flood["stdoutTruncated"]
        ),
        (Some(4 << 20), &json!(true))
    );

    let (status, body) = h
        .send(
            "POST",
            &path,
            Some(json!({"command": ["anything"]})),
            Some("application/x-ndjson"),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<Value> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()?;
    assert_eq!(
        lines,
        [
            json!({"t": "o", "d": "b3V0Cg=="}),
            json!({"t": "e", "d": "ZXJyCg=="}),
            json!({"t": "x", "d": "", "c": 3, "to": false, "ms": 7})
        ]
    );

    // A guest that dies mid-stream still ends the stream with one exit event.
    let (_, body) = h
        .send(
            "POST",
            &path,
            Some(json!({"command": ["die-midway"]})),
            Some("application/x-ndjson"),
        )
        .await?;
    let lines: Vec<Value> = body
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(serde_json::from_slice)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!((&lines[1]["t"], &lines[1]["c"]), (&json!("x"), &json!(-1)));
    assert!(lines[1]["d"]
        .as_str()
        .is_some_and(|d| d.contains("agent connection closed")));
    // ... and the buffered mode answers 503.
    let (status, err) = h
        .call("POST", &path, Some(json!({"command": ["die-midway"]})))
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::SERVICE_UNAVAILABLE, &json!("AGENT_UNAVAILABLE"))
    );
    Ok(())
}

fn row(org: OrgId, status: VmStatus) -> VmRecord {
    VmRecord {
        id: VmId::new_v4(),
        org_id: org,
        worker_id: "local".into(),
        name: "r".into(),
        machine_name: "c1m2".into(),
        source_name: String::new(),
        cpu: 1,
        memory_mib: 2048,
        disk_gib: 10,
        status,
        status_message: None,
        firewall: Default::default(),
        metadata: Default::default(),
        env_vars: Default::default(),
        ttl: None,
        expires_at_ms: None,
        ttl_remaining_ms: None,
        created_at_ms: 1,
        paused_at_ms: None,
        deleted_at_ms: None,
        version: 0,
        public_ipv6: None,
        services: vec![],
    }
}

/// Rows left mid-transition by a previous run are settled at startup.
#[tokio::test]
async fn startup_settles_interrupted_transitions() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let store = h.state.store();
    let org = fastvm_server::default_org(store)
        .await?
        .ok_or("default org")?;
    let booted = row(org, VmStatus::Provisioning);
    let never_booted = row(org, VmStatus::Provisioning);
    let pausing = row(org, VmStatus::Pausing);
    let deleting = row(org, VmStatus::Deleting);
    let died = row(org, VmStatus::Running);
    for r in [&booted, &never_booted, &pausing, &deleting, &died] {
        store.insert_vm(r).await?;
    }
    h.worker.set(booted.id, VmState::Running);
    h.worker.set(pausing.id, VmState::Paused);
    h.worker.set(deleting.id, VmState::Running);
    h.worker.set(died.id, VmState::Stopped);
    let orphan = VmId::new_v4();
    h.worker.set(orphan, VmState::Running);

    h.state.reconcile_on_start().await?;
    let status = |r: &VmRecord| {
        let id = r.id;
        async move { store.get_vm(org, id).await.map(|v| v.map(|v| v.status)) }
    };
    assert_eq!(status(&booted).await?, Some(VmStatus::Running));
    assert_eq!(status(&never_booted).await?, Some(VmStatus::Error));
    assert_eq!(status(&pausing).await?, Some(VmStatus::Paused));
    assert_eq!(
        status(&deleting).await?,
        None,
        "an interrupted delete is finished"
    );
    assert!(!h.worker.has(deleting.id));
    assert_eq!(status(&died).await?, Some(VmStatus::Stopped));
    assert!(
        h.worker.has(orphan),
        "VMs the store does not know are left alone"
    );
    Ok(())
}

// --- snapshots -----------------------------------------------------------------------

#[tokio::test]
async fn snapshot_crud_and_name_rules() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"machineType": "c2m4", "metadata": {"team": "a"}, "envVars": {"K": "v"}})),
        )
        .await?;
    let vm_id = id_of(&vm)?;

    let (status, snap) = h
        .call(
            "POST",
            "/v1/snapshots",
            Some(json!({"vmId": vm_id, "name": "  base \t  image  "})),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let mut keys: Vec<&str> = snap
        .as_object()
        .ok_or("object")?
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "bucketMounts",
            "createdAt",
            "envVars",
            "firewall",
            "id",
            "machineName",
            "metadata",
            "name",
            "orgId",
            "services",
            "status",
            "vmId",
            "volumes"
        ]
    );
    assert_eq!(
        (
            &snap["name"],
            &snap["status"],
            &snap["vmId"],
            &snap["orgId"]
        ),
        (
            &json!("base image"),
            &json!("ready"),
            &vm["id"],
            &vm["orgId"]
        )
    );
    assert_eq!(
        (&snap["machineName"], &snap["metadata"], &snap["envVars"]),
        (&json!("c2m4"), &json!({"team": "a"}), &json!({"K": "v"}))
    );
    assert_eq!(
        (&snap["services"], &snap["volumes"], &snap["bucketMounts"]),
        (&json!([]), &json!([]), &json!([]))
    );
    assert_eq!(snap["firewall"], vm["firewall"]);
    let sid = id_of(&snap)?;
    assert!(h.worker.has_snapshot(sid.parse()?));
    // The source VM is untouched.
    assert_eq!(h.status_of(&vm_id).await?, "running");

    // Default name, truncation to 64 runes.
    let (_, d) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": vm_id})))
        .await?;
    assert_eq!(d["name"], json!(format!("snapshot-{}", &vm_id[..8])));
    let (_, e) = h
        .call(
            "POST",
            "/v1/snapshots",
            Some(json!({"vmId": vm_id, "name": "   "})),
        )
        .await?;
    assert_eq!(e["name"], d["name"]);
    let (_, t) = h
        .call(
            "POST",
            "/v1/snapshots",
            Some(json!({"vmId": vm_id, "name": "é".repeat(70)})),
        )
        .await?;
    assert_eq!(t["name"], json!("é".repeat(64)));

    let (status, list) = h.call("GET", "/v1/snapshots", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(4));
    assert_eq!(list[0]["id"], snap["id"], "oldest first");
    assert_eq!(
        h.call("GET", &format!("/v1/snapshots/{sid}"), None).await?,
        (StatusCode::OK, snap.clone())
    );

    // Rename (normalized; empty gives the default name); nothing to update is 400.
    let (status, r) = h
        .call(
            "PATCH",
            &format!("/v1/snapshots/{sid}"),
            Some(json!({"name": " new   name "})),
        )
        .await?;
    assert_eq!((status, &r["name"]), (StatusCode::OK, &json!("new name")));
    assert_eq!(
        h.call("GET", &format!("/v1/snapshots/{sid}"), None)
            .await?
            .1["name"],
        json!("new name")
    );
    let (_, r) = h
        .call(
            "PATCH",
            &format!("/v1/snapshots/{sid}"),
            Some(json!({"name": ""})),
        )
        .await?;
    assert_eq!(r["name"], d["name"]);
    let (status, err) = h
        .call("PATCH", &format!("/v1/snapshots/{sid}"), Some(json!({})))
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("INVALID_REQUEST"))
    );
    let (status, err) = h
        .call(
            "PATCH",
            &format!("/v1/snapshots/{sid}"),
            Some(json!({"nmae": "x"})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("INVALID_REQUEST"))
    );

    // Delete: gone from the worker, 404 afterwards, not listed.
    let (status, body) = h
        .call("DELETE", &format!("/v1/snapshots/{sid}"), None)
        .await?;
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"id": sid, "deleted": true}))
    );
    assert!(!h.worker.has_snapshot(sid.parse()?));
    for (m, b) in [
        ("GET", None),
        ("PATCH", Some(json!({"name": "x"}))),
        ("DELETE", None),
    ] {
        let (status, err) = h.call(m, &format!("/v1/snapshots/{sid}"), b).await?;
        assert_eq!(
            (status, &err["error"]["code"]),
            (StatusCode::NOT_FOUND, &json!("NOT_FOUND")),
            "{m}"
        );
    }
    assert_eq!(
        h.call("GET", "/v1/snapshots", None)
            .await?
            .1
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    // Ids that are not UUIDs are 404s too.
    assert_eq!(
        h.call("GET", "/v1/snapshots/snp_123", None).await?.0,
        StatusCode::NOT_FOUND
    );
    Ok(())
}

#[tokio::test]
async fn snapshot_needs_a_running_or_paused_vm_of_the_org() -> TestResult {
    let h = harness(gated(), Duration::ZERO).await?;
    // Unknown VM, malformed body.
    let (status, err) = h
        .call(
            "POST",
            "/v1/snapshots",
            Some(json!({"vmId": VmId::new_v4()})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("NOT_FOUND"))
    );
    let (status, err) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": "nope"})))
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("INVALID_REQUEST"))
    );
    let (status, _) = h
        .call("POST", "/v1/snapshots", Some(json!({"name": "x"})))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A provisioning VM: 409, and no row is left.
    let (_, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    let id = id_of(&vm)?;
    let (status, err) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": id})))
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::CONFLICT, &json!("INVALID_STATE"))
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("provisioning")),
        "{err}"
    );
    assert_eq!(h.call("GET", "/v1/snapshots", None).await?.1, json!([]));
    // Paused works, and the VM stays paused.
    if let Some(gate) = &h.worker.gate {
        gate.add_permits(1);
    }
    h.wait_status(&id, "running").await?;
    assert_eq!(
        h.call("POST", &format!("/v1/vms/{id}/pause"), None)
            .await?
            .0,
        StatusCode::OK
    );
    let (status, snap) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": id})))
        .await?;
    assert_eq!(
        (status, &snap["status"]),
        (StatusCode::CREATED, &json!("ready"))
    );
    assert_eq!(h.status_of(&id).await?, "paused");
    // Another org sees nothing and can touch nothing.
    let store = h.state.store();
    let other = store.create_org("other").await?;
    let other_key = store.create_key(other, "k").await?.token;
    let other_h = Harness {
        state: h.state.clone(),
        router: h.router.clone(),
        worker: h.worker.clone(),
        key: other_key,
        _dir: Arc::new(tempfile::tempdir()?),
    };
    let sid = id_of(&snap)?;
    for (m, path, b) in [
        ("GET", format!("/v1/snapshots/{sid}"), None),
        (
            "PATCH",
            format!("/v1/snapshots/{sid}"),
            Some(json!({"name": "mine"})),
        ),
        ("DELETE", format!("/v1/snapshots/{sid}"), None),
        (
            "POST",
            "/v1/snapshots".to_owned(),
            Some(json!({"vmId": id})),
        ),
        (
            "POST",
            "/v1/vms".to_owned(),
            Some(json!({"snapshotId": sid})),
        ),
    ] {
        let (status, err) = other_h.call(m, &path, b).await?;
        assert_eq!(
            (status, &err["error"]["code"]),
            (StatusCode::NOT_FOUND, &json!("NOT_FOUND")),
            "{m} {path}"
        );
    }
    assert_eq!(
        other_h.call("GET", "/v1/snapshots", None).await?.1,
        json!([])
    );
    assert_eq!(
        h.call("GET", &format!("/v1/snapshots/{sid}"), None)
            .await?
            .1["name"],
        snap["name"]
    );
    Ok(())
}

#[tokio::test]
async fn failed_capture_keeps_an_error_snapshot() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    h.worker.fail_snapshot.store(true, Ordering::SeqCst);
    let (status, err) = h
        .call(
            "POST",
            "/v1/snapshots",
            Some(json!({"vmId": vm["id"], "name": "doomed"})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::INTERNAL_SERVER_ERROR, &json!("WORKER_ERROR"))
    );
    let message = err["error"]["message"].as_str().unwrap_or("");
    assert!(
        message.contains("No space left") && message.contains("status error"),
        "{err}"
    );
    let (_, list) = h.call("GET", "/v1/snapshots", None).await?;
    assert_eq!(
        (&list[0]["name"], &list[0]["status"]),
        (&json!("doomed"), &json!("error"))
    );
    assert!(
        message.contains(list[0]["id"].as_str().unwrap_or("?")),
        "the error names the snapshot: {err}"
    );
    // It cannot be restored, and can be deleted.
    let sid = id_of(&list[0])?;
    let (status, err) = h
        .call("POST", "/v1/vms", Some(json!({"snapshotId": sid})))
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::CONFLICT, &json!("INVALID_STATE"))
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("error")),
        "{err}"
    );
    assert_eq!(
        h.call("DELETE", &format!("/v1/snapshots/{sid}"), None)
            .await?
            .0,
        StatusCode::OK
    );
    assert_eq!(h.call("GET", "/v1/snapshots", None).await?.1, json!([]));
    assert_eq!(h.status_of(&id_of(&vm)?).await?, "running");
    Ok(())
}

#[tokio::test]
async fn restore_takes_shape_env_and_firewall_from_the_snapshot() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let firewall = json!({"egress": {"defaultAction": "deny", "rules": []}});
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c2m4", "envVars": {"FROM": "source"}, "metadata": {"m": "source"}, "firewall": firewall}))).await?;
    let (_, snap) = h
        .call(
            "POST",
            "/v1/snapshots",
            Some(json!({"vmId": vm["id"], "name": "golden one"})),
        )
        .await?;
    let sid = id_of(&snap)?;

    let (status, r) = h
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"snapshotId": sid, "name": "clone", "metadata": {"m": "clone"}})),
        )
        .await?;
    assert_eq!(
        (status, &r["status"]),
        (StatusCode::CREATED, &json!("running")),
        "{r}"
    );
    assert_eq!(
        (
            &r["name"],
            &r["sourceName"],
            &r["machineName"],
            &r["cpu"],
            &r["memoryMiB"],
            &r["diskGiB"]
        ),
        (
            &json!("clone"),
            &json!("golden one"),
            &json!("c2m4"),
            &json!(2),
            &json!(4096),
            &json!(10)
        )
    );
    assert_eq!(
        (&r["envVars"], &r["metadata"], &r["firewall"]),
        (
            &json!({"FROM": "source"}),
            &json!({"m": "clone"}),
            &vm["firewall"]
        )
    );
    assert_ne!(r["id"], vm["id"]);
    let spec = h.worker.last_created().ok_or("no create")?;
    assert_eq!(
        (spec.snapshot.map(|s| s.to_string()), spec.machine.name),
        (Some(sid.clone()), "c2m4")
    );
    assert_eq!(spec.env.get("FROM").map(String::as_str), Some("source"));

    // The request's env vars replace the snapshot's; the same machine type is accepted.
    let (status, r) = h
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"snapshotId": sid, "machineType": " c2m4 ", "envVars": {"NEW": "1"}})),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!(
        (&r["envVars"], &r["metadata"], &r["name"]),
        (
            &json!({"NEW": "1"}),
            &json!({}),
            &json!(format!("vm-{}", &id_of(&r)?[..8]))
        )
    );
    assert_eq!(
        h.worker
            .last_created()
            .map(|s| s.env.into_iter().collect::<Vec<_>>()),
        Some(vec![("NEW".to_owned(), "1".to_owned())])
    );

    // Another machine type is refused, unknown ones too; nothing is left behind.
    let before = h
        .call("GET", "/v1/vms", None)
        .await?
        .1
        .as_array()
        .map(Vec::len);
    let (status, err) = h
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"snapshotId": sid, "machineType": "c1m2"})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("MACHINE_TYPE_MISMATCH"))
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("c2m4") && m.contains("c1m2")),
        "{err}"
    );
    let (status, err) = h
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"snapshotId": sid, "machineType": "c3m7"})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("INVALID_MACHINE_TYPE"))
    );
    // Unknown snapshot: 404.
    let (status, err) = h
        .call(
            "POST",
            "/v1/vms",
            Some(json!({"snapshotId": SnapshotId::new_v4()})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("NOT_FOUND"))
    );
    assert_eq!(
        h.call("GET", "/v1/vms", None)
            .await?
            .1
            .as_array()
            .map(Vec::len),
        before
    );

    // A deleted snapshot: 404 on launch; its clones keep running.
    assert_eq!(
        h.call("DELETE", &format!("/v1/snapshots/{sid}"), None)
            .await?
            .0,
        StatusCode::OK
    );
    let (status, err) = h
        .call("POST", "/v1/vms", Some(json!({"snapshotId": sid})))
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::NOT_FOUND, &json!("NOT_FOUND"))
    );
    assert_eq!(h.status_of(&id_of(&r)?).await?, "running");
    Ok(())
}

#[tokio::test]
async fn snapshot_delete_waits_for_restores_in_flight() -> TestResult {
    let h = harness(gated(), Duration::ZERO).await?;
    let (_, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    let gate = h.worker.gate.as_ref().ok_or("gate")?;
    gate.add_permits(1);
    h.wait_status(&id_of(&vm)?, "running").await?;
    let (_, snap) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": vm["id"]})))
        .await?;
    let sid = id_of(&snap)?;
    // A restore held at the gate...
    let (status, r) = h
        .call("POST", "/v1/vms", Some(json!({"snapshotId": sid})))
        .await?;
    assert_eq!(
        (status, &r["status"], &r["sourceName"]),
        (StatusCode::ACCEPTED, &json!("provisioning"), &snap["name"])
    );
    // ...holds the delete back until it has its VM.
    let h = Arc::new(h);
    let h2 = h.clone();
    let path = format!("/v1/snapshots/{sid}");
    let delete = tokio::spawn(async move {
        h2.call("DELETE", &path, None)
            .await
            .map(|(s, _)| s)
            .map_err(|e| e.to_string())
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !delete.is_finished(),
        "the delete did not wait for the restore"
    );
    assert!(h.worker.has_snapshot(sid.parse()?));
    if let Some(gate) = &h.worker.gate {
        gate.add_permits(1);
    }
    assert_eq!(delete.await??, StatusCode::OK);
    h.wait_status(&id_of(&r)?, "running").await?;
    assert!(!h.worker.has_snapshot(sid.parse()?));
    Ok(())
}

#[tokio::test]
async fn restore_failure_is_an_error_vm() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    let (_, snap) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": vm["id"]})))
        .await?;
    // The worker lost the files (e.g. removed by hand).
    if let Ok(mut s) = h.worker.snapshots.lock() {
        s.clear();
    }
    let (status, r) = h
        .call("POST", "/v1/vms", Some(json!({"snapshotId": snap["id"]})))
        .await?;
    assert_eq!(
        (status, &r["status"]),
        (StatusCode::ACCEPTED, &json!("error"))
    );
    Ok(())
}

#[tokio::test]
async fn startup_marks_interrupted_captures_error() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let store = h.state.store();
    let org = fastvm_server::default_org(store)
        .await?
        .ok_or("default org")?;
    let rec = SnapshotRecord {
        id: SnapshotId::new_v4(),
        org_id: org,
        vm_id: VmId::new_v4(),
        worker_id: "local".into(),
        name: "half".into(),
        status: SnapshotStatus::Creating,
        status_message: None,
        machine_name: "c1m2".into(),
        cpu: 1,
        memory_mib: 2048,
        disk_gib: 10,
        metadata: Default::default(),
        env_vars: Default::default(),
        firewall: Default::default(),
        services: vec![],
        volumes: vec![],
        bucket_mounts: vec![],
        created_at_ms: 1,
        deleted_at_ms: None,
        compat_key: None,
        stored: false,
    };
    store.insert_snapshot(&rec).await?;
    // Creating: neither restorable nor deletable.
    let (status, _) = h
        .call("POST", "/v1/vms", Some(json!({"snapshotId": rec.id})))
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        h.call("DELETE", &format!("/v1/snapshots/{}", rec.id), None)
            .await?
            .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        h.call("GET", &format!("/v1/snapshots/{}", rec.id), None)
            .await?
            .1["status"],
        json!("creating")
    );
    h.state.reconcile_on_start().await?;
    let got = store.get_snapshot(org, rec.id).await?.ok_or("snapshot")?;
    assert_eq!(got.status, SnapshotStatus::Error);
    assert!(got
        .status_message
        .is_some_and(|m| m.contains("server stopped")));
    assert_eq!(
        h.call("DELETE", &format!("/v1/snapshots/{}", rec.id), None)
            .await?
            .0,
        StatusCode::OK
    );
    Ok(())
}

// --- TTL -----------------------------------------------------------------------------

impl Harness {
    /// A new server (state, router, TTL reaper) over the same store and
    /// worker, as after a restart.
    async fn restarted(
        &self,
    ) -> Result<(Harness, fastvm_server::TtlReaper), Box<dyn std::error::Error>> {
        let store = Store::open(self._dir.path(), None).await?;
        let state = AppState::new(store, self.worker.clone(), self.state.launch_wait());
        state.reconcile_on_start().await?;
        let reaper = fastvm_server::spawn_ttl_reaper(&state);
        let router = fastvm_server::routes::router(state.clone());
        Ok((
            Harness {
                state,
                router,
                worker: self.worker.clone(),
                key: self.key.clone(),
                _dir: self._dir.clone(),
            },
            reaper,
        ))
    }

    async fn vm(&self, id: &str) -> Result<(StatusCode, Value), Box<dyn std::error::Error>> {
        self.call("GET", &format!("/v1/vms/{id}"), None).await
    }

    /// Poll (every 20 ms, up to `within`) until the VM has `status`; returns when (ms).
    async fn wait_status_within(
        &self,
        id: &str,
        status: &str,
        within: Duration,
    ) -> Result<i64, Box<dyn std::error::Error>> {
        let start = std::time::Instant::now();
        loop {
            let (code, v) = self.vm(id).await?;
            let now = fastvm_server::store::now_ms();
            if (status == "gone" && code == StatusCode::NOT_FOUND) || v["status"] == json!(status) {
                return Ok(now);
            }
            if start.elapsed() > within {
                return Err(format!(
                    "VM {id} did not become {status} within {within:?} (is {})",
                    v["status"]
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn launch(&self, body: Value) -> Result<(StatusCode, Value), Box<dyn std::error::Error>> {
        self.call("POST", "/v1/vms", Some(body)).await
    }
}

fn ms(v: &Value, field: &str) -> Result<i64, Box<dyn std::error::Error>> {
    Ok(v[field]
        .as_i64()
        .ok_or_else(|| format!("{field} is {} in {v}", v[field]))?)
}

#[tokio::test]
async fn ttl_pause_fires_within_a_second() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let reaper = fastvm_server::spawn_ttl_reaper(&h.state);
    let (status, vm) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 1, "action": "pause"}}))
        .await?;
    assert_eq!(status, StatusCode::CREATED);
    let id = id_of(&vm)?;
    let deadline = ms(&vm, "expiresAtMs")?;
    assert_eq!(vm["ttlRemainingMs"], json!(null));
    let fired_at = h
        .wait_status_within(&id, "paused", Duration::from_secs(3))
        .await?;
    assert!(
        fired_at >= deadline && fired_at <= deadline + 1000,
        "fired at {fired_at}, deadline {deadline}"
    );
    assert_eq!(
        h.worker.get(id.parse()?),
        Some(VmState::Paused),
        "the worker really paused it"
    );
    let (_, vm) = h.vm(&id).await?;
    // The TTL pause ends the cycle: the next resume starts a full one.
    assert_eq!(
        (&vm["expiresAtMs"], &vm["ttlRemainingMs"]),
        (&json!(null), &json!(1000))
    );
    // Resumed, it runs a full second again, then pauses again.
    let (status, vm) = h
        .call("POST", &format!("/v1/vms/{id}/resume"), None)
        .await?;
    assert_eq!(status, StatusCode::OK);
    let deadline = ms(&vm, "expiresAtMs")?;
    assert!(deadline - fastvm_server::store::now_ms() > 800);
    let fired_at = h
        .wait_status_within(&id, "paused", Duration::from_secs(3))
        .await?;
    assert!(
        fired_at >= deadline && fired_at <= deadline + 1000,
        "fired at {fired_at}, deadline {deadline}"
    );
    reaper.stop().await;
    Ok(())
}

#[tokio::test]
async fn ttl_delete_fires() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let reaper = fastvm_server::spawn_ttl_reaper(&h.state);
    let (_, vm) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 1, "action": "delete"}}))
        .await?;
    let id = id_of(&vm)?;
    let deadline = ms(&vm, "expiresAtMs")?;
    // A VM without TTL is left alone.
    let (_, other) = h.launch(json!({"machineType": "c1m2"})).await?;
    let fired_at = h
        .wait_status_within(&id, "gone", Duration::from_secs(3))
        .await?;
    assert!(
        fired_at <= deadline + 1000,
        "gone at {fired_at}, deadline {deadline}"
    );
    assert!(!h.worker.has(id.parse()?));
    assert!(h
        .worker
        .deleted
        .lock()
        .map_err(|e| e.to_string())?
        .contains(&id.parse()?));
    assert_eq!(h.status_of(&id_of(&other)?).await?, "running");
    let (_, list) = h.call("GET", "/v1/vms", None).await?;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    reaper.stop().await;
    Ok(())
}

#[tokio::test]
async fn ttl_freezes_while_paused_and_resumes_the_rest() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let reaper = fastvm_server::spawn_ttl_reaper(&h.state);
    let (_, vm) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 2, "action": "delete"}}))
        .await?;
    let id = id_of(&vm)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, vm) = h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?;
    assert_eq!(vm["expiresAtMs"], json!(null));
    let remaining = ms(&vm, "ttlRemainingMs")?;
    assert!((1000..=1600).contains(&remaining), "remaining {remaining}");
    // Paused past the original deadline: nothing fires, the budget stays frozen.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (_, vm) = h.vm(&id).await?;
    assert_eq!(
        (&vm["status"], ms(&vm, "ttlRemainingMs")?),
        (&json!("paused"), remaining)
    );
    let before = fastvm_server::store::now_ms();
    let (_, vm) = h
        .call("POST", &format!("/v1/vms/{id}/resume"), None)
        .await?;
    let deadline = ms(&vm, "expiresAtMs")?;
    assert!(
        deadline >= before + remaining && deadline <= fastvm_server::store::now_ms() + remaining,
        "deadline {deadline}"
    );
    assert_eq!(vm["ttlRemainingMs"], json!(null));
    let gone_at = h
        .wait_status_within(&id, "gone", Duration::from_secs(3))
        .await?;
    assert!(
        gone_at >= deadline && gone_at <= deadline + 1000,
        "gone at {gone_at}, deadline {deadline}"
    );
    reaper.stop().await;
    Ok(())
}

#[tokio::test]
async fn ttl_refresh_and_clear() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let reaper = fastvm_server::spawn_ttl_reaper(&h.state);
    let (_, vm) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 2, "action": "pause"}}))
        .await?;
    let id = id_of(&vm)?;
    let first = ms(&vm, "expiresAtMs")?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (status, vm) = h
        .call("POST", &format!("/v1/vms/{id}/ttl/refresh"), None)
        .await?;
    assert_eq!(status, StatusCode::OK);
    let second = ms(&vm, "expiresAtMs")?;
    assert!(
        second >= first + 1100,
        "refresh starts a new full cycle: {first} -> {second}"
    );
    // Past the first deadline it still runs; it pauses at the new one.
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(first + 300 - fastvm_server::store::now_ms()).unwrap_or(0),
    ))
    .await;
    assert_eq!(h.status_of(&id).await?, "running");
    let fired_at = h
        .wait_status_within(&id, "paused", Duration::from_secs(3))
        .await?;
    assert!(fired_at >= second && fired_at <= second + 1000);

    // Paused: the refresh gives a full frozen budget.
    h.call(
        "PATCH",
        &format!("/v1/vms/{id}"),
        Some(json!({"ttl": {"seconds": 5, "action": "pause"}})),
    )
    .await?;
    let (status, vm) = h
        .call("POST", &format!("/v1/vms/{id}/ttl/refresh"), None)
        .await?;
    assert_eq!(
        (status, &vm["ttlRemainingMs"], &vm["expiresAtMs"]),
        (StatusCode::OK, &json!(5000), &json!(null))
    );

    // PATCH ttl null clears it; then a refresh is 409 TTL_NOT_SET.
    let (status, vm) = h
        .call(
            "PATCH",
            &format!("/v1/vms/{id}"),
            Some(json!({"ttl": null})),
        )
        .await?;
    assert_eq!(
        (status, &vm["ttl"], &vm["ttlRemainingMs"]),
        (StatusCode::OK, &json!(null), &json!(null))
    );
    let (status, err) = h
        .call("POST", &format!("/v1/vms/{id}/ttl/refresh"), None)
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::CONFLICT, &json!("TTL_NOT_SET"))
    );
    let (status, _) = h
        .call(
            "POST",
            &format!("/v1/vms/{}/ttl/refresh", VmId::new_v4()),
            None,
        )
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);

    // A VM that is neither running nor paused: 409 INVALID_STATE.
    h.worker.fail_create.store(true, Ordering::SeqCst);
    let (_, bad) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 5, "action": "pause"}}))
        .await?;
    assert_eq!(bad["status"], json!("error"));
    let (status, err) = h
        .call(
            "POST",
            &format!("/v1/vms/{}/ttl/refresh", id_of(&bad)?),
            None,
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::CONFLICT, &json!("INVALID_STATE"))
    );
    reaper.stop().await;
    Ok(())
}

#[tokio::test]
async fn ttl_timers_survive_a_restart() -> TestResult {
    // No reaper: the server is "down" while the deadlines pass.
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, p) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 1, "action": "pause"}}))
        .await?;
    let (_, d) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 1, "action": "delete"}}))
        .await?;
    let (_, later) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 2, "action": "pause"}}))
        .await?;
    let (p, d, later_deadline, later) = (
        id_of(&p)?,
        id_of(&d)?,
        ms(&later, "expiresAtMs")?,
        id_of(&later)?,
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(h.status_of(&p).await?, "running");
    let (h2, reaper) = h.restarted().await?;
    h2.wait_status_within(&p, "paused", Duration::from_millis(1000))
        .await?;
    h2.wait_status_within(&d, "gone", Duration::from_millis(1000))
        .await?;
    // A deadline still ahead at the restart fires on time too.
    let fired_at = h2
        .wait_status_within(&later, "paused", Duration::from_secs(3))
        .await?;
    assert!(fired_at >= later_deadline && fired_at <= later_deadline + 1000);
    reaper.stop().await;
    Ok(())
}

#[tokio::test]
async fn failed_ttl_pause_rearms_a_full_cycle() -> TestResult {
    // A failed TTL pause settles on the worker's view and re-arms a full cycle.
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    h.worker.fail_pause.store(true, Ordering::SeqCst);
    let reaper = fastvm_server::spawn_ttl_reaper(&h.state);
    let (_, vm) = h
        .launch(json!({"machineType": "c1m2", "ttl": {"seconds": 1, "action": "pause"}}))
        .await?;
    let id = id_of(&vm)?;
    let first = ms(&vm, "expiresAtMs")?;
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let (_, vm) = h.vm(&id).await?;
    assert_eq!(vm["status"], json!("running"));
    assert!(
        ms(&vm, "expiresAtMs")? >= first + 900,
        "a new cycle after the failed attempt"
    );
    reaper.stop().await;
    Ok(())
}

// --- quotas --------------------------------------------------------------------------

async fn org_of(h: &Harness) -> Result<OrgId, Box<dyn std::error::Error>> {
    Ok(fastvm_server::default_org(h.state.store())
        .await?
        .ok_or("default org")?)
}

#[tokio::test]
async fn quotas_defaults_and_live_usage() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (status, q) = h.call("GET", "/v1/org/quotas", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(q["orgId"], json!(org_of(&h).await?.to_string()));
    assert_eq!(
        q["limits"],
        json!({"vcpu": 16, "memoryMiB": 32768, "diskGiB": 200, "snapshotCount": 50, "volumeCount": 20, "volumeGiB": 500})
    );
    assert_eq!(
        q["usage"],
        json!({"vcpu": 0, "memoryMiB": 0, "diskGiB": 0, "snapshotCount": 0, "volumeCount": 0, "volumeGiB": 0})
    );
    let (_, a) = h.launch(json!({"machineType": "c2m4"})).await?;
    let (_, b) = h.launch(json!({"machineType": "c1m2"})).await?;
    let (a, b) = (id_of(&a)?, id_of(&b)?);
    h.call("POST", &format!("/v1/vms/{a}/pause"), None).await?;
    let (status, _) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": b})))
        .await?;
    assert_eq!(status, StatusCode::CREATED);
    let (_, q) = h.call("GET", "/v1/org/quotas", None).await?;
    // Paused VMs count.
    assert_eq!(
        q["usage"],
        json!({"vcpu": 3, "memoryMiB": 6144, "diskGiB": 20, "snapshotCount": 1, "volumeCount": 0, "volumeGiB": 0})
    );
    // Stopped VMs and deleted ones do not.
    h.worker.set(b.parse()?, VmState::Stopped);
    assert_eq!(h.status_of(&b).await?, "stopped");
    h.call("DELETE", &format!("/v1/vms/{a}"), None).await?;
    let (_, q) = h.call("GET", "/v1/org/quotas", None).await?;
    assert_eq!(
        (
            &q["usage"]["vcpu"],
            &q["usage"]["memoryMiB"],
            &q["usage"]["snapshotCount"]
        ),
        (&json!(0), &json!(0), &json!(1))
    );
    // Limits changed by the admin function show up.
    h.state
        .store()
        .set_quota(
            org_of(&h).await?,
            fastvm_server::store::QuotaPatch {
                vcpu: Some(4),
                ..Default::default()
            },
        )
        .await?;
    let (_, q) = h.call("GET", "/v1/org/quotas", None).await?;
    assert_eq!(
        (&q["limits"]["vcpu"], &q["limits"]["memoryMiB"]),
        (&json!(4), &json!(32768))
    );
    Ok(())
}

async fn expect_429(h: &Harness, res: (StatusCode, Value), code: &str) -> TestResult {
    let (status, err) = res;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::TOO_MANY_REQUESTS, &json!(code)),
        "{err}"
    );
    let msg = err["error"]["message"].as_str().unwrap_or("");
    assert!(
        msg.contains("limit of") && msg.contains("uses") && msg.contains("needs"),
        "{msg}"
    );
    let _ = h;
    Ok(())
}

#[tokio::test]
async fn each_quota_answers_429_with_its_code_and_changes_nothing() -> TestResult {
    use fastvm_server::store::QuotaPatch;
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let org = org_of(&h).await?;
    let store = h.state.store();
    let (_, base) = h.launch(json!({"machineType": "c1m2"})).await?;
    let base = id_of(&base)?;
    let vms_before = h.call("GET", "/v1/vms", None).await?.1;
    let created_before = h.worker.created.lock().map_err(|e| e.to_string())?.len();

    store
        .set_quota(
            org,
            QuotaPatch {
                vcpu: Some(2),
                ..Default::default()
            },
        )
        .await?;
    let res = h.launch(json!({"machineType": "c2m4"})).await?;
    assert!(
        res.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("needs 2 vCPU")
                && m.contains("uses 1 vCPU")
                && m.contains("limit of 2 vCPU")),
        "{}",
        res.1
    );
    expect_429(&h, res, "QUOTA_EXCEEDED_VCPU").await?;

    store
        .set_quota(
            org,
            QuotaPatch {
                vcpu: Some(16),
                memory_mib: Some(4096),
                ..Default::default()
            },
        )
        .await?;
    expect_429(
        &h,
        h.launch(json!({"machineType": "c2m4"})).await?,
        "QUOTA_EXCEEDED_MEMORY_MIB",
    )
    .await?;

    store
        .set_quota(
            org,
            QuotaPatch {
                memory_mib: Some(32768),
                disk_gib: Some(15),
                ..Default::default()
            },
        )
        .await?;
    expect_429(
        &h,
        h.launch(json!({"machineType": "c1m2"})).await?,
        "QUOTA_EXCEEDED_DISK_GIB",
    )
    .await?;

    // Nothing was created: no row, no worker call.
    assert_eq!(h.call("GET", "/v1/vms", None).await?.1, vms_before);
    assert_eq!(
        h.worker.created.lock().map_err(|e| e.to_string())?.len(),
        created_before
    );

    // Restores are launches: the same check.
    store
        .set_quota(
            org,
            QuotaPatch {
                disk_gib: Some(200),
                snapshot_count: Some(1),
                ..Default::default()
            },
        )
        .await?;
    let (status, snap) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": base})))
        .await?;
    assert_eq!(status, StatusCode::CREATED);
    expect_429(
        &h,
        h.call("POST", "/v1/snapshots", Some(json!({"vmId": base})))
            .await?,
        "QUOTA_EXCEEDED_SNAPSHOT_COUNT",
    )
    .await?;
    let (_, snaps) = h.call("GET", "/v1/snapshots", None).await?;
    assert_eq!(snaps.as_array().map(Vec::len), Some(1));
    store
        .set_quota(
            org,
            QuotaPatch {
                vcpu: Some(1),
                ..Default::default()
            },
        )
        .await?;
    expect_429(
        &h,
        h.launch(json!({"snapshotId": snap["id"]})).await?,
        "QUOTA_EXCEEDED_VCPU",
    )
    .await?;

    // Resume: paused VMs count, so it fails only when the limits were lowered below the usage.
    store
        .set_quota(
            org,
            QuotaPatch {
                vcpu: Some(16),
                ..Default::default()
            },
        )
        .await?;
    h.call("POST", &format!("/v1/vms/{base}/pause"), None)
        .await?;
    let (status, _) = h
        .call("POST", &format!("/v1/vms/{base}/resume"), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "at the limit is fine");
    h.call("POST", &format!("/v1/vms/{base}/pause"), None)
        .await?;
    store
        .set_quota(
            org,
            QuotaPatch {
                memory_mib: Some(1024),
                ..Default::default()
            },
        )
        .await?;
    expect_429(
        &h,
        h.call("POST", &format!("/v1/vms/{base}/resume"), None)
            .await?,
        "QUOTA_EXCEEDED_MEMORY_MIB",
    )
    .await?;
    assert_eq!(h.status_of(&base).await?, "paused");
    assert_eq!(h.worker.get(base.parse()?), Some(VmState::Paused));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_launches_cannot_race_past_a_limit() -> TestResult {
    let h = Arc::new(harness(FakeWorker::default(), Duration::from_secs(5)).await?);
    let org = org_of(&h).await?;
    h.state
        .store()
        .set_quota(
            org,
            fastvm_server::store::QuotaPatch {
                vcpu: Some(3),
                ..Default::default()
            },
        )
        .await?;
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            h.launch(json!({"machineType": "c1m2"}))
                .await
                .map(|(s, v)| (s, v["error"]["code"].clone()))
                .map_err(|e| e.to_string())
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        match t.await?? {
            (StatusCode::CREATED, _) => ok += 1,
            (StatusCode::TOO_MANY_REQUESTS, code) if code == json!("QUOTA_EXCEEDED_VCPU") => {
                refused += 1
            }
            other => return Err(format!("unexpected answer {other:?}").into()),
        }
    }
    assert_eq!((ok, refused), (3, 7));
    let (_, list) = h.call("GET", "/v1/vms", None).await?;
    assert_eq!(list.as_array().map(Vec::len), Some(3));
    let (_, q) = h.call("GET", "/v1/org/quotas", None).await?;
    assert_eq!(q["usage"]["vcpu"], json!(3));
    Ok(())
}

#[tokio::test]
async fn firewall_put_and_patch_validate_store_and_push() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (status, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2", "firewall": {"dns": {"mode": "allow", "domains": ["*.example.com"]}}}))).await?;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(vm["publicIpv6"], json!("fd00:fa57::1:2"));
    let id = id_of(&vm)?;
    assert_eq!(
        h.worker
            .last_created()
            .map(|s| s.firewall.dns.map(|d| d.domains)),
        Some(Some(vec!["*.example.com".to_owned()]))
    );
    let path = format!("/v1/vms/{id}/firewall");

    // PUT replaces: missing blocks become the defaults.
    let put = json!({"ingress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "8080", "action": "allow"}]}});
    let (status, v) = h.call("PUT", &path, Some(put)).await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["firewall"]["dns"]["mode"], json!("deny"));
    assert_eq!(v["firewall"]["ingress"]["rules"][0]["ports"], json!("8080"));
    assert_eq!(
        v["effectiveFirewall"]["egress"]["defaultAction"],
        json!("allow")
    );
    let pushed = h.worker.firewalls.lock().map(|f| f.len()).unwrap_or(0);
    assert_eq!(pushed, 1);

    // PATCH keeps the blocks it does not carry.
    let (status, v) = h
        .call(
            "PATCH",
            &path,
            Some(json!({"egress": {"defaultAction": "deny", "rules": []}})),
        )
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (
            &v["firewall"]["egress"]["defaultAction"],
            &v["firewall"]["ingress"]["rules"][0]["ports"]
        ),
        (&json!("deny"), &json!("8080"))
    );
    assert_eq!(
        h.call("GET", &format!("/v1/vms/{id}"), None).await?.1["firewall"],
        v["firewall"]
    );

    // Validation: 400 with the rule's code; nothing stored or pushed.
    let bad = [
        (
            json!({"ingress": {"rules": [{"kind": "cidr", "value": "10.0.0.0/33", "action": "allow"}]}}),
            "INVALID_CIDR",
        ),
        (
            json!({"ingress": {"rules": [{"kind": "cidr", "value": "::/0", "protocol": "any", "ports": "80", "action": "allow"}]}}),
            "INVALID_PORTS",
        ),
        (
            json!({"egress": {"rules": [{"kind": "fqdn", "value": "a.*.com", "action": "allow"}]}}),
            "INVALID_FIREWALL",
        ),
        (
            json!({"dns": {"mode": "allow", "domains": ["ok.test"]}, "egress": {"rules": [{"kind": "fqdn", "value": "other.test", "action": "allow"}]}}),
            "DEAD_FQDN_RULE",
        ),
    ];
    for (body, code) in bad {
        let (status, err) = h.call("PUT", &path, Some(body.clone())).await?;
        assert_eq!(
            (status, &err["error"]["code"]),
            (StatusCode::BAD_REQUEST, &json!(code)),
            "{body}: {err}"
        );
    }
    // A PATCH whose merge makes a rule dead is refused too.
    let (_, _) = h.call("PATCH", &path, Some(json!({"egress": {"rules": [{"kind": "fqdn", "value": "api.test", "protocol": "tcp", "ports": "443", "action": "allow"}]}}))).await?;
    let (status, err) = h
        .call(
            "PATCH",
            &path,
            Some(json!({"dns": {"mode": "deny", "domains": ["api.test"]}})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("DEAD_FQDN_RULE")),
        "{err}"
    );
    let (status, _) = h.call("PUT", &path, Some(json!({"bogus": 1}))).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // serde decodes a struct from an array too; the API wants an object (found by schemathesis).
    for method in ["PUT", "PATCH"] {
        let (status, err) = h.call(method, &path, Some(json!([null, null]))).await?;
        assert_eq!(
            (status, &err["error"]["code"]),
            (StatusCode::BAD_REQUEST, &json!("INVALID_REQUEST")),
            "{method}: {err}"
        );
    }
    assert_eq!(h.worker.firewalls.lock().map(|f| f.len()).unwrap_or(0), 3);

    // Unknown VM: 404.
    let (status, _) = h
        .call(
            "PUT",
            &format!("/v1/vms/{}/firewall", VmId::new_v4()),
            Some(json!({})),
        )
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

/// One HTTP/1.1 exchange on a fresh connection; the status code and body.
async fn raw_get(
    proxy: std::net::SocketAddr,
    host: &str,
) -> Result<(u16, String), Box<dyn std::error::Error + Send + Sync>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(proxy).await?;
    conn.write_all(
        format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    conn.read_to_string(&mut out).await?;
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_wakes_a_paused_vm_with_one_resume() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    // The "guest" service: a local HTTP server.
    let guest = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = guest.local_addr()?.port();
    tokio::spawn(std::future::IntoFuture::into_future(axum::serve(
        guest,
        axum::Router::new().route("/", axum::routing::get(|| async { "hi from the guest" })),
    )));
    let (_, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    let id = vm["id"].as_str().ok_or("id")?.to_owned();
    let (status, svc) = h
        .call(
            "POST",
            &format!("/v1/vms/{id}/services"),
            Some(json!({"name": "web", "port": port})),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{svc}");
    // The auto rule reached the worker.
    let pushed = h
        .worker
        .firewalls
        .lock()
        .map_err(|_| "poisoned")?
        .last()
        .cloned()
        .ok_or("no firewall pushed")?;
    assert_eq!(pushed.1.ingress.as_ref().map(|i| i.rules.len()), Some(1));
    assert_eq!(
        h.call("POST", &format!("/v1/vms/{id}/pause"), None)
            .await?
            .0,
        StatusCode::OK
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let cfg = fastvm_server::proxy::ProxyConfig::new(listener.local_addr()?);
    let proxy = fastvm_server::proxy::spawn(listener, h.state.clone(), &cfg)?;
    let host = format!("web--{}.proxy.localhost", id.replace('-', ""));
    let answers = futures::future::join_all((0..50).map(|_| raw_get(proxy.addr(), &host))).await;
    for a in answers {
        let (status, body) = a.map_err(|e| e.to_string())?;
        assert_eq!((status, body.as_str()), (200, "hi from the guest"));
    }
    assert_eq!(
        h.worker.resumes.load(Ordering::SeqCst),
        1,
        "50 requests to a paused VM resume it once"
    );
    let (_, vm) = h.call("GET", &format!("/v1/vms/{id}"), None).await?;
    assert_eq!(vm["status"], "running");

    // A stopped VM (as the control plane learns it): 502 with the reason.
    h.worker.set(id.parse()?, VmState::Stopped);
    assert_eq!(
        h.call("GET", &format!("/v1/vms/{id}"), None).await?.1["status"],
        "stopped"
    );
    let (status, body) = raw_get(proxy.addr(), &host)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("stopped"), "{body}");
    Ok(())
}

/// One error, one status, everywhere: a value that breaks a rule gets the same
/// 400 and code on every route that takes it (issue 21: an invalid firewall
/// was 400 on PUT/PATCH /firewall but 422 inside POST /v1/vms).
#[tokio::test]
async fn each_shared_validation_answers_one_status_and_code_on_every_route() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (status, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let id = id_of(&vm)?;
    let (status, snap) = h
        .call("POST", "/v1/snapshots", Some(json!({"vmId": id})))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let sid = id_of(&snap)?;

    let bad_firewall = json!({"ingress": {"defaultAction": "deny", "rules": [{"kind": "cidr", "value": "10.0.0.0/33", "protocol": "tcp", "ports": "22", "action": "allow"}]}});
    let dead_fqdn = json!({"dns": {"mode": "allow", "domains": ["ok.test"]}, "egress": {"rules": [{"kind": "fqdn", "value": "other.test", "action": "allow"}]}});
    let bad_metadata = json!({"k": "v".repeat(5000)});
    let bad_ttl = json!({"seconds": 0, "action": "delete"});
    let vm_path = format!("/v1/vms/{id}");
    let fw_path = format!("/v1/vms/{id}/firewall");
    let exec_path = format!("/v1/vms/{id}/exec");
    let url = "http://127.0.0.1/v1/staging/x";
    // (code, [(method, path, body)]): every route that takes the value.
    type Routes = Vec<(&'static str, String, Value)>;
    let cases: Vec<(&str, Routes)> = vec![
        (
            "INVALID_CIDR",
            vec![
                (
                    "POST",
                    "/v1/vms".into(),
                    json!({"machineType": "c1m2", "firewall": bad_firewall}),
                ),
                ("PUT", fw_path.clone(), bad_firewall.clone()),
                ("PATCH", fw_path.clone(), bad_firewall.clone()),
            ],
        ),
        (
            "DEAD_FQDN_RULE",
            vec![
                (
                    "POST",
                    "/v1/vms".into(),
                    json!({"machineType": "c1m2", "firewall": dead_fqdn}),
                ),
                ("PUT", fw_path.clone(), dead_fqdn.clone()),
                ("PATCH", fw_path.clone(), dead_fqdn.clone()),
            ],
        ),
        (
            "INVALID_METADATA",
            vec![
                (
                    "POST",
                    "/v1/vms".into(),
                    json!({"machineType": "c1m2", "metadata": bad_metadata}),
                ),
                ("PATCH", vm_path.clone(), json!({"metadata": bad_metadata})),
            ],
        ),
        (
            "INVALID_TTL",
            vec![
                (
                    "POST",
                    "/v1/vms".into(),
                    json!({"machineType": "c1m2", "ttl": bad_ttl}),
                ),
                ("PATCH", vm_path.clone(), json!({"ttl": bad_ttl})),
            ],
        ),
        (
            "INVALID_TIMEOUT",
            vec![
                (
                    "POST",
                    exec_path.clone(),
                    json!({"command": ["true"], "timeoutSec": 0}),
                ),
                (
                    "POST",
                    format!("{vm_path}/files/fetch"),
                    json!({"url": url, "path": "/root/f", "timeoutSec": 0}),
                ),
                (
                    "POST",
                    format!("{vm_path}/files/export"),
                    json!({"url": url, "path": "/root/f", "timeoutSec": 0}),
                ),
            ],
        ),
        (
            "INVALID_PATH",
            vec![
                (
                    "POST",
                    exec_path.clone(),
                    json!({"command": ["true"], "cwd": "root"}),
                ),
                (
                    "POST",
                    format!("{vm_path}/files/presign"),
                    json!({"path": "root/f"}),
                ),
                (
                    "POST",
                    format!("{vm_path}/files/fetch"),
                    json!({"url": url, "path": "root/f"}),
                ),
                (
                    "POST",
                    format!("{vm_path}/files/export"),
                    json!({"url": url, "path": "root/f"}),
                ),
            ],
        ),
        (
            "INVALID_REQUEST",
            vec![
                // Nothing to update, and a body of the wrong shape.
                ("PATCH", vm_path.clone(), json!({})),
                ("PATCH", format!("/v1/snapshots/{sid}"), json!({})),
                ("PUT", fw_path.clone(), json!({"bogus": 1})),
                (
                    "POST",
                    "/v1/vms".into(),
                    json!({"machineType": "c1m2", "bogus": 1}),
                ),
            ],
        ),
        (
            "INVALID_MACHINE_TYPE",
            vec![
                ("POST", "/v1/vms".into(), json!({"machineType": "c3m7"})),
                ("POST", "/v1/vms".into(), json!({})),
            ],
        ),
        (
            "MACHINE_TYPE_MISMATCH",
            vec![(
                "POST",
                "/v1/vms".into(),
                json!({"snapshotId": sid, "machineType": "c2m4"}),
            )],
        ),
        (
            "INVALID_COMMAND",
            vec![("POST", exec_path.clone(), json!({"command": []}))],
        ),
        (
            "INVALID_SERVICE_NAME",
            vec![
                (
                    "POST",
                    format!("{vm_path}/services"),
                    json!({"name": "Bad_Name", "port": 8080}),
                ),
                (
                    "PUT",
                    format!("{vm_path}/services/Bad_Name"),
                    json!({"port": 8080}),
                ),
            ],
        ),
        (
            "INVALID_SERVICE_PORT",
            vec![
                (
                    "POST",
                    format!("{vm_path}/services"),
                    json!({"name": "web", "port": 80}),
                ),
                (
                    "PUT",
                    format!("{vm_path}/services/web"),
                    json!({"port": 80}),
                ),
            ],
        ),
    ];
    for (code, routes) in cases {
        for (method, path, body) in routes {
            let (status, err) = h.call(method, &path, Some(body.clone())).await?;
            assert_eq!(
                (status, err["error"]["code"].as_str()),
                (StatusCode::BAD_REQUEST, Some(code)),
                "{method} {path} {body}: {err}"
            );
            assert!(
                err["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{method} {path}: no message"
            );
        }
    }
    // Nothing was changed or created by the refused requests.
    let (_, list) = h.call("GET", "/v1/vms", None).await?;
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(
        h.worker
            .firewalls
            .lock()
            .map(|f| f.len())
            .unwrap_or(usize::MAX),
        0
    );
    Ok(())
}

#[tokio::test]
async fn a_policy_the_worker_cannot_enforce_is_rolled_back_and_reconciled() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (status, vm) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let id = id_of(&vm)?;
    let vm_id: VmId = id.parse()?;
    let path = format!("/v1/vms/{id}/firewall");
    let first = json!({"ingress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "8080", "action": "allow"}]}});
    let (status, v) = h.call("PUT", &path, Some(first)).await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    let stored = v["firewall"].clone();

    // The worker refuses: 503 FIREWALL_NOT_ENFORCED, and nothing changed.
    h.worker.fail_firewall.store(true, Ordering::SeqCst);
    let (status, err) = h
        .call(
            "PUT",
            &path,
            Some(json!({"egress": {"defaultAction": "deny"}})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("FIREWALL_NOT_ENFORCED")
        ),
        "{err}"
    );
    assert!(err["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("nothing was changed")));
    let (_, now) = h.call("GET", &format!("/v1/vms/{id}"), None).await?;
    assert_eq!(now["firewall"], stored);
    // A service is policy too: refused and not registered.
    let (status, err) = h
        .call(
            "POST",
            &format!("/v1/vms/{id}/services"),
            Some(json!({"name": "web", "port": 8000})),
        )
        .await?;
    assert_eq!(
        (status, &err["error"]["code"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("FIREWALL_NOT_ENFORCED")
        ),
        "{err}"
    );
    let (_, svcs) = h
        .call("GET", &format!("/v1/vms/{id}/services"), None)
        .await?;
    assert_eq!(svcs, json!([]), "{svcs}");
    h.worker.fail_firewall.store(false, Ordering::SeqCst);

    // The worker no longer knows what it enforces (e.g. a push that failed
    // half-way): the reconciler pushes the stored policy.
    if let Ok(mut e) = h.worker.enforced.lock() {
        e.remove(&vm_id);
    }
    let pushed = h.worker.firewalls.lock().map(|f| f.len()).unwrap_or(0);
    h.state.reconcile_on_start().await?;
    let last = h
        .worker
        .firewalls
        .lock()
        .ok()
        .and_then(|f| f.last().cloned());
    let (_, now) = h.call("GET", &format!("/v1/vms/{id}"), None).await?;
    let effective: FirewallPolicy = serde_json::from_value(now["effectiveFirewall"].clone())?;
    assert_eq!(last, Some((vm_id, effective.clone())));
    assert_eq!(
        h.worker.firewalls.lock().map(|f| f.len()).unwrap_or(0),
        pushed + 1
    );
    // Enforced and stored agree: the next round pushes nothing.
    h.state.reconcile_on_start().await?;
    assert_eq!(
        h.worker.firewalls.lock().map(|f| f.len()).unwrap_or(0),
        pushed + 1
    );
    Ok(())
}

// --- GET /v1/vms: pages and cached views -----------------------------------------------

impl Harness {
    /// GET `path`: status, JSON body and the `X-Next-Cursor` header.
    async fn get_page(
        &self,
        path: &str,
    ) -> Result<(StatusCode, Value, Option<String>), Box<dyn std::error::Error>> {
        let req = Request::builder()
            .method("GET")
            .uri(path)
            .header("authorization", format!("Bearer {}", self.key))
            .body(Body::empty())?;
        let res = self.router.clone().oneshot(req).await?;
        let status = res.status();
        let next = res
            .headers()
            .get("x-next-cursor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = axum::body::to_bytes(res.into_body(), 64 << 20).await?;
        Ok((status, serde_json::from_slice(&bytes)?, next))
    }

    /// A running VM row of the default org created at `created_at_ms`,
    /// known to the worker (no launch: no quota, any number).
    async fn running_row(&self, created_at_ms: i64) -> Result<VmId, Box<dyn std::error::Error>> {
        let mut r = row(org_of(self).await?, VmStatus::Running);
        r.created_at_ms = created_at_ms;
        self.state.store().insert_vm(&r).await?;
        self.worker.set(r.id, VmState::Running);
        Ok(r.id)
    }
}

fn ids_of(list: &Value) -> Vec<String> {
    list.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn list_pages_cover_every_vm_once_while_vms_come_and_go() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    // 23 VMs, some sharing a creation time (ties are ordered by id).
    let mut stable = Vec::new();
    for i in 0..23 {
        stable.push(h.running_row(1_000 + i / 4).await?.to_string());
    }
    let (status, whole, next) = h.get_page("/v1/vms").await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(next, None, "no cursor without limit");
    let order = ids_of(&whole);
    assert_eq!(order.len(), 23);

    // Walk pages of 5; between pages, delete a VM not yet reached and one
    // already listed, and create new ones (one ordered before the cursor,
    // one at the end).
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut deleted = Vec::new();
    let mut created = Vec::new();
    for round in 0.. {
        let path = match &cursor {
            Some(c) => format!("/v1/vms?limit=5&cursor={c}"),
            None => "/v1/vms?limit=5".to_owned(),
        };
        let (status, page, next) = h.get_page(&path).await?;
        assert_eq!(status, StatusCode::OK, "{page}");
        assert!(page.is_array(), "the body stays the plain array: {page}");
        let ids = ids_of(&page);
        assert!(ids.len() <= 5);
        seen.extend(ids.clone());
        let Some(next) = next else { break };
        assert!(round < 20, "the walk does not end");
        cursor = Some(next);
        let ahead = order
            .iter()
            .rev()
            .find(|id| !seen.contains(id) && !deleted.contains(*id));
        for id in ahead
            .into_iter()
            .chain(ids.first())
            .cloned()
            .collect::<Vec<_>>()
        {
            let (s, _) = h.call("DELETE", &format!("/v1/vms/{id}"), None).await?;
            assert_eq!(s, StatusCode::OK);
            deleted.push(id);
        }
        created.push(h.running_row(999).await?.to_string());
        created.push(h.running_row(10_000 + round).await?.to_string());
    }
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "a VM was listed twice: {seen:?}");
    for id in &stable {
        let whole_walk = !deleted.contains(id);
        assert!(
            !whole_walk || seen.contains(id),
            "VM {id} existed for the whole walk but was missed"
        );
    }
    // Those created before the cursor's place are not listed; those at the end are.
    for (i, id) in created.iter().enumerate() {
        assert_eq!(seen.contains(id), i % 2 == 1, "created VM {id} (#{i})");
    }
    // The pages follow the order of the plain list.
    let positions: Vec<usize> = seen
        .iter()
        .filter_map(|id| order.iter().position(|o| o == id))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{positions:?}");
    Ok(())
}

#[tokio::test]
async fn list_pages_with_a_status_filter_and_the_last_page() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let mut running = Vec::new();
    for i in 0..6 {
        let id = h.running_row(100 + i).await?;
        if i % 3 == 2 {
            // The worker says it stopped: reconciled on read.
            h.worker.set(id, VmState::Stopped);
        } else {
            running.push(id.to_string());
        }
    }
    let (_, p1, next) = h.get_page("/v1/vms?status=running&limit=2").await?;
    let cursor = next.ok_or("a second page")?;
    let (_, p2, next) = h
        .get_page(&format!("/v1/vms?status=running&limit=2&cursor={cursor}"))
        .await?;
    let mut got = ids_of(&p1);
    got.extend(ids_of(&p2));
    if let Some(c) = next {
        let (_, p3, last) = h
            .get_page(&format!("/v1/vms?status=running&limit=2&cursor={c}"))
            .await?;
        got.extend(ids_of(&p3));
        assert_eq!(last, None);
    }
    assert_eq!(got, running);
    // A page exactly as long as the rest has no next cursor.
    let (_, all, next) = h.get_page("/v1/vms?limit=6").await?;
    assert_eq!((ids_of(&all).len(), next), (6, None));
    let (_, stopped, _) = h.get_page("/v1/vms?status=stopped").await?;
    assert_eq!(ids_of(&stopped).len(), 2);
    Ok(())
}

#[tokio::test]
async fn list_shows_each_change_of_a_vm() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h
        .launch(json!({"machineType": "c1m2", "name": "one"}))
        .await?;
    let id = id_of(&vm)?;
    let listed = |list: &Value| list.get(0).cloned().unwrap_or(Value::Null);
    let (_, list, _) = h.get_page("/v1/vms").await?;
    let (_, got) = h.call("GET", &format!("/v1/vms/{id}"), None).await?;
    assert_eq!(listed(&list), got, "the list shows what GET shows");
    // Every kind of change shows at the next list: a rename...
    let (s, _) = h
        .call(
            "PATCH",
            &format!("/v1/vms/{id}"),
            Some(json!({"name": "two"})),
        )
        .await?;
    assert_eq!(s, StatusCode::OK);
    let (_, list, _) = h.get_page("/v1/vms").await?;
    assert_eq!(listed(&list)["name"], "two");
    // ...a pause, the worker's own view (reconciliation)...
    let (s, _) = h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?;
    assert_eq!(s, StatusCode::OK);
    h.wait_status(&id, "paused").await?;
    let (_, list, _) = h.get_page("/v1/vms").await?;
    assert_eq!(listed(&list)["status"], "paused");
    h.worker
        .set(id.parse()?, VmState::Error("QEMU crashed".into()));
    let (_, list, _) = h.get_page("/v1/vms").await?;
    assert_eq!(
        (&listed(&list)["status"], &listed(&list)["statusMessage"]),
        (&json!("error"), &json!("QEMU crashed"))
    );
    // ...and a public IPv6 recorded without any other change.
    h.state
        .store()
        .set_vm_public_ipv6(id.parse()?, Some("fd00:fa57::9"))
        .await?;
    let (_, list, _) = h.get_page("/v1/vms").await?;
    assert_eq!(listed(&list)["publicIpv6"], "fd00:fa57::9");
    let (_, got) = h.call("GET", &format!("/v1/vms/{id}"), None).await?;
    assert_eq!(listed(&list), got);
    // Deleted: gone from the list.
    h.call("DELETE", &format!("/v1/vms/{id}"), None).await?;
    let (_, list, _) = h.get_page("/v1/vms").await?;
    assert_eq!(list, json!([]));
    Ok(())
}

#[tokio::test]
async fn list_refuses_bad_limits_and_cursors() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    h.running_row(1).await?;
    for (query, code, says) in [
        ("limit=0", "INVALID_LIMIT", "from 1 to 1000"),
        ("limit=1001", "INVALID_LIMIT", "from 1 to 1000"),
        ("limit=ten", "INVALID_LIMIT", "\"ten\""),
        ("limit=-3", "INVALID_LIMIT", "from 1 to 1000"),
        ("cursor=abc", "INVALID_CURSOR", "X-Next-Cursor"),
        ("limit=5&cursor=zz", "INVALID_CURSOR", "unchanged"),
        (
            "cursor=00000000000000010000000000000000000000000000000g",
            "INVALID_CURSOR",
            "not a cursor",
        ),
    ] {
        let (status, err) = h.call("GET", &format!("/v1/vms?{query}"), None).await?;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {err}");
        assert_eq!(err["error"]["code"], code, "{query}: {err}");
        let message = err["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{query}: {message}");
    }
    // An empty cursor (a string) is an absent one, like status=; an empty
    // limit is not a number.
    let (status, list, next) = h.get_page("/v1/vms?cursor=&status=").await?;
    assert_eq!(
        (status, ids_of(&list).len(), next),
        (StatusCode::OK, 1, None)
    );
    let (status, err) = h.call("GET", "/v1/vms?limit=", None).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["error"]["code"], "INVALID_LIMIT", "{err}");
    Ok(())
}

impl Harness {
    /// GET `path` with `Accept-Encoding: accept_encoding` (when given): the
    /// status, the Content-Encoding and the body as received.
    async fn get_encoded(
        &self,
        path: &str,
        accept_encoding: Option<&str>,
    ) -> Result<(StatusCode, Option<String>, Vec<u8>), Box<dyn std::error::Error>> {
        let mut req = Request::builder()
            .method("GET")
            .uri(path)
            .header("authorization", format!("Bearer {}", self.key));
        if let Some(a) = accept_encoding {
            req = req.header("accept-encoding", a);
        }
        let res = self
            .router
            .clone()
            .oneshot(req.body(Body::empty())?)
            .await?;
        let status = res.status();
        assert_eq!(
            res.headers().get("vary").and_then(|v| v.to_str().ok()),
            Some("accept-encoding")
        );
        let encoding = res
            .headers()
            .get("content-encoding")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = axum::body::to_bytes(res.into_body(), 64 << 20).await?;
        Ok((status, encoding, bytes.to_vec()))
    }
}

fn gunzip(bytes: &[u8]) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes).read_to_end(&mut out)?;
    Ok(out)
}

/// The whole list is answered from a cache while the org's list generation
/// stands: a write by another control plane (another store on the same
/// database) and a VM whose worker reports another status both show at the
/// next list; clients that accept gzip get the same list compressed.
#[tokio::test]
async fn whole_lists_follow_every_write_and_are_served_gzipped() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(h.running_row(i).await?);
    }
    let (status, encoding, plain) = h.get_encoded("/v1/vms", None).await?;
    assert_eq!((status, encoding), (StatusCode::OK, None));
    assert!(plain.len() > 8 << 10, "{} bytes", plain.len());
    let list: Value = serde_json::from_slice(&plain)?;
    assert_eq!(ids_of(&list).len(), 30);
    for accept in ["gzip", "br, gzip;q=0.5", "*", "deflate, GZIP"] {
        let (status, encoding, zipped) = h.get_encoded("/v1/vms", Some(accept)).await?;
        assert_eq!(
            (status, encoding.as_deref()),
            (StatusCode::OK, Some("gzip")),
            "{accept}"
        );
        assert!(
            zipped.len() < plain.len() / 4,
            "{accept}: {} bytes",
            zipped.len()
        );
        assert_eq!(gunzip(&zipped)?, plain, "{accept}");
    }
    for accept in ["gzip;q=0", "identity", "br", "*;q=0"] {
        let (_, encoding, body) = h.get_encoded("/v1/vms", Some(accept)).await?;
        assert_eq!((encoding, body.len()), (None, plain.len()), "{accept}");
    }
    // Small answers and pages are never compressed.
    let (_, encoding, _) = h.get_encoded("/v1/vms?limit=20", Some("gzip")).await?;
    assert_eq!(encoding, None);

    // Another control plane renames a VM: the next list, plain or gzip, shows it.
    let other = Store::open(h._dir.path(), None).await?;
    let org = org_of(&h).await?;
    let mut rec = other.get_vm(org, ids[7]).await?.ok_or("row")?;
    rec.name = "renamed-elsewhere".into();
    assert!(other.update_vm(&mut rec).await?);
    let (_, _, zipped) = h.get_encoded("/v1/vms", Some("gzip")).await?;
    let list: Value = serde_json::from_slice(&gunzip(&zipped)?)?;
    assert_eq!(list[7]["name"], "renamed-elsewhere");
    let (_, list, _) = h.get_page("/v1/vms").await?;
    assert_eq!(list[7]["name"], "renamed-elsewhere");
    // ...and a VM it inserts is listed.
    let mut extra = row(org, VmStatus::Stopped);
    extra.created_at_ms = 100;
    other.insert_vm(&extra).await?;
    let (_, list, _) = h.get_page("/v1/vms").await?;
    assert_eq!(ids_of(&list).len(), 31);
    assert_eq!(list[30]["id"], extra.id.to_string());
    // A VM whose worker says it is paused now (no row written yet).
    h.worker.set(ids[3], VmState::Paused);
    let (_, _, zipped) = h.get_encoded("/v1/vms", Some("gzip")).await?;
    let list: Value = serde_json::from_slice(&gunzip(&zipped)?)?;
    assert_eq!(list[3]["status"], "paused");
    // With the status filter, cached apart.
    let (_, paused, _) = h.get_page("/v1/vms?status=paused").await?;
    assert_eq!(ids_of(&paused), [ids[3].to_string()]);
    h.worker.set(ids[3], VmState::Running);
    let (_, paused, _) = h.get_page("/v1/vms?status=paused").await?;
    assert_eq!(ids_of(&paused), Vec::<String>::new());
    other.close().await;
    Ok(())
}

#[tokio::test]
async fn list_keeps_the_stored_status_when_the_worker_cannot_say() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let known = h.running_row(1).await?;
    let mut lost = row(org_of(&h).await?, VmStatus::Running);
    lost.worker_id = "no-such-worker".into();
    lost.created_at_ms = 2;
    h.state.store().insert_vm(&lost).await?;
    for _ in 0..2 {
        let (status, list, _) = h.get_page("/v1/vms").await?;
        assert_eq!(status, StatusCode::OK, "{list}");
        assert_eq!(ids_of(&list), [known.to_string(), lost.id.to_string()]);
        assert_eq!(list[1]["status"], "running", "{list}");
    }
    Ok(())
}

// --- snapshot imports ----------------------------------------------------------------

impl Harness {
    async fn wait_import(
        &self,
        id: &str,
        status: &str,
    ) -> Result<Value, Box<dyn std::error::Error>> {
        for _ in 0..300 {
            let (_, v) = self
                .call("GET", &format!("/v1/snapshot-imports/{id}"), None)
                .await?;
            if v["status"] == json!(status) {
                return Ok(v);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, v) = self
            .call("GET", &format!("/v1/snapshot-imports/{id}"), None)
            .await?;
        Err(format!("import {id} never became {status}: {v}").into())
    }
}

fn image_import(image: &str) -> Value {
    json!({"source": {"type": "image", "image": image, "registryUsername": "u", "registryPassword": "pw-secret"}})
}

#[tokio::test]
async fn imports_succeed_fail_and_delete_with_their_snapshot() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (code, imp) = h
        .call(
            "POST",
            "/v1/snapshot-imports",
            Some(image_import("reg:5000/app:1")),
        )
        .await?;
    assert_eq!(code, StatusCode::CREATED, "{imp}");
    assert_eq!(imp["status"], json!("pending"));
    assert_eq!(
        imp["snapshotId"],
        Value::Null,
        "no snapshot id before success"
    );
    assert!(
        !imp.to_string().contains("pw-secret"),
        "the password is never echoed: {imp}"
    );
    let id = id_of(&imp)?;
    let done = h.wait_import(&id, "succeeded").await?;
    let snap = done["snapshotId"]
        .as_str()
        .ok_or("no snapshotId")?
        .to_owned();
    let phases: Vec<String> = done["events"]
        .as_array()
        .ok_or("no events")?
        .iter()
        .map(|e| {
            format!(
                "{}:{}",
                e["phase"].as_str().unwrap_or(""),
                e["status"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        phases.first().map(String::as_str),
        Some("preparing:started")
    );
    assert_eq!(
        phases.last().map(String::as_str),
        Some("done:completed"),
        "{phases:?}"
    );
    let (_, logs) = h
        .send(
            "GET",
            &format!("/v1/snapshot-imports/{id}/logs"),
            None,
            None,
        )
        .await?;
    assert!(String::from_utf8_lossy(&logs).contains("layer 1/1: cached"));
    // The snapshot row: ready, named by the image, its source is the import.
    let (code, s) = h
        .call("GET", &format!("/v1/snapshots/{snap}"), None)
        .await?;
    assert_eq!(code, StatusCode::OK, "{s}");
    assert_eq!(
        (s["status"].clone(), s["vmId"].clone(), s["name"].clone()),
        (json!("ready"), json!(id), json!("reg:5000/app:1"))
    );
    // Terminal: cancel is refused, delete takes the snapshot along.
    let (code, _) = h
        .call("POST", &format!("/v1/snapshot-imports/{id}/cancel"), None)
        .await?;
    assert_eq!(code, StatusCode::CONFLICT);
    let (code, _) = h
        .call("DELETE", &format!("/v1/snapshot-imports/{id}"), None)
        .await?;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        h.call("GET", &format!("/v1/snapshots/{snap}"), None)
            .await?
            .0,
        StatusCode::NOT_FOUND
    );
    assert!(!h.worker.has_snapshot(snap.parse()?));
    assert_eq!(
        h.call("GET", &format!("/v1/snapshot-imports/{id}"), None)
            .await?
            .0,
        StatusCode::NOT_FOUND
    );

    // A failed import: the worker's user-safe message, no snapshot.
    let (_, imp) = h
        .call(
            "POST",
            "/v1/snapshot-imports",
            Some(image_import("reg:5000/missing:1")),
        )
        .await?;
    let failed = h.wait_import(&id_of(&imp)?, "failed").await?;
    assert_eq!(
        failed["error"],
        json!("image reg:5000/missing:1 was not found in its registry")
    );
    assert_eq!(failed["snapshotId"], Value::Null);
    Ok(())
}

#[tokio::test]
async fn imports_in_flight_are_cancelled_or_failed_by_a_restart() -> TestResult {
    let h = harness(
        FakeWorker {
            import_gate: Some(tokio::sync::Semaphore::new(0)),
            ..Default::default()
        },
        Duration::from_secs(5),
    )
    .await?;
    // Cancel: the worker call is dropped, the import ends cancelled.
    let (_, imp) = h
        .call(
            "POST",
            "/v1/snapshot-imports",
            Some(image_import("reg:5000/app:1")),
        )
        .await?;
    let id = id_of(&imp)?;
    h.wait_import(&id, "running").await?;
    // An import in flight counts against snapshotCount: with room for one
    // snapshot, a second import is refused while the first runs.
    h.state
        .store()
        .set_quota(
            org_of(&h).await?,
            fastvm_server::store::QuotaPatch {
                snapshot_count: Some(1),
                ..Default::default()
            },
        )
        .await?;
    let (code, v) = h
        .call(
            "POST",
            "/v1/snapshot-imports",
            Some(image_import("reg:5000/other:1")),
        )
        .await?;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], json!("QUOTA_EXCEEDED_SNAPSHOT_COUNT"));
    // Its VM (no VM row) holds its machine's vCPUs: with a limit of one
    // vCPU, a launch is refused while it runs, and the usage shows it.
    h.state
        .store()
        .set_quota(
            org_of(&h).await?,
            fastvm_server::store::QuotaPatch {
                vcpu: Some(1),
                ..Default::default()
            },
        )
        .await?;
    let (code, v) = h
        .call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
        .await?;
    assert_eq!(code, StatusCode::TOO_MANY_REQUESTS, "{v}");
    assert_eq!(v["error"]["code"], json!("QUOTA_EXCEEDED_VCPU"));
    let (_, q) = h.call("GET", "/v1/org/quotas", None).await?;
    assert_eq!(
        (
            &q["usage"]["vcpu"],
            &q["usage"]["memoryMiB"],
            &q["usage"]["snapshotCount"]
        ),
        (&json!(1), &json!(2048), &json!(1)),
        "{q}"
    );
    let (code, c) = h
        .call("POST", &format!("/v1/snapshot-imports/{id}/cancel"), None)
        .await?;
    assert_eq!(code, StatusCode::OK, "{c}");
    assert_eq!(
        (c["status"].clone(), c["snapshotId"].clone()),
        (json!("cancelled"), Value::Null)
    );
    assert_eq!(
        c["events"]
            .as_array()
            .and_then(|e| e.last())
            .map(|e| e["status"].clone()),
        Some(json!("cancelled"))
    );
    // Its task is gone: nothing brings it back to life.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        h.wait_import(&id, "cancelled").await?["status"],
        json!("cancelled")
    );

    // Restart while one runs: it fails clearly, and its build VM and snapshot go.
    let (_, imp) = h
        .call(
            "POST",
            "/v1/snapshot-imports",
            Some(image_import("reg:5000/app:2")),
        )
        .await?;
    let id = id_of(&imp)?;
    h.wait_import(&id, "running").await?;
    let (h2, _reaper) = h.restarted().await?;
    let v = h2.wait_import(&id, "failed").await?;
    assert!(
        v["error"]
            .as_str()
            .unwrap_or("")
            .contains("the server restarted"),
        "{v}"
    );
    let build_vm: VmId = id.parse()?;
    assert!(
        h2.worker
            .deleted
            .lock()
            .map(|d| d.contains(&build_vm))
            .unwrap_or(false),
        "the build VM is removed"
    );
    assert!(v["finishedAt"].is_string());
    Ok(())
}

#[tokio::test]
async fn import_requests_are_checked() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    for (body, code, err) in [
        (
            json!({"source": {"type": "image"}}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            json!({"source": {"type": "image", "image": "a"}, "machineType": "c9m9"}),
            StatusCode::BAD_REQUEST,
            Some("INVALID_MACHINE_TYPE"),
        ),
        (
            json!({"source": {"type": "image", "image": "a"}, "diskGiB": 257}),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            json!({"source": {"type": "dockerfile", "contextRef": "x"}}),
            StatusCode::BAD_REQUEST,
            Some("INVALID_CONTEXT_REF"),
        ),
        (
            json!({"source": {"type": "image", "image": "a", "contextRef": "x"}}),
            StatusCode::BAD_REQUEST,
            None,
        ),
    ] {
        let (got, v) = h
            .call("POST", "/v1/snapshot-imports", Some(body.clone()))
            .await?;
        assert_eq!(got, code, "{body} -> {v}");
        if let Some(e) = err {
            assert_eq!(v["error"]["code"], json!(e), "{v}");
        }
    }
    assert_eq!(
        h.call("GET", "/v1/snapshot-imports", None).await?.1,
        json!([])
    );
    let (code, _) = h
        .call(
            "POST",
            "/v1/snapshot-imports/context-presign",
            Some(json!({"sizeBytes": 5})),
        )
        .await?;
    // This harness has no staging store.
    assert_eq!(code, StatusCode::NOT_IMPLEMENTED);
    Ok(())
}

/// A Dockerfile import: presign, PUT the context, create; the worker gets
/// the context's bytes and the build's parameters; the ref is single-use
/// and the staged context is gone afterwards.
#[tokio::test]
async fn dockerfile_imports_stream_their_context_once() -> TestResult {
    let mut h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let local = Arc::new(fastvm_server::staging::local::LocalStaging::open(
        h._dir.path(),
        "http://127.0.0.1:1",
    )?);
    let state = AppState::new(
        h.state.store().clone(),
        h.worker.clone(),
        Duration::from_secs(5),
    )
    .with_local_staging(local, Default::default());
    h.router = fastvm_server::routes::router(state.clone());
    h.state = state;
    let (code, p) = h
        .call(
            "POST",
            "/v1/snapshot-imports/context-presign",
            Some(json!({"sizeBytes": 11})),
        )
        .await?;
    assert_eq!(code, StatusCode::OK, "{p}");
    let ctx = p["contextRef"].as_str().ok_or("no contextRef")?.to_owned();
    assert!(ctx.starts_with("ctx_"), "{p}");
    assert_eq!(p["maxUploadBytes"], json!(512u64 << 20));
    let url = p["uploadUrl"].as_str().ok_or("no uploadUrl")?;
    let path = url
        .strip_prefix("http://127.0.0.1:1")
        .ok_or("odd uploadUrl")?;
    let create = json!({"source": {"type": "dockerfile", "contextRef": ctx,
        "buildArgs": {"A": "1"}, "target": "app", "dockerfilePath": "sub/Dockerfile"}});
    // Before the upload: nothing to build.
    let (code, v) = h
        .call("POST", "/v1/snapshot-imports", Some(create.clone()))
        .await?;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], json!("INVALID_CONTEXT_REF"));
    let put = Request::builder()
        .method("PUT")
        .uri(path)
        .header("content-type", "application/zip")
        .body(Body::from(&b"PK-context!"[..]))?;
    let res = h.router.clone().oneshot(put).await?;
    assert!(res.status().is_success(), "{}", res.status());
    let (code, v) = h
        .call("POST", "/v1/snapshot-imports", Some(create.clone()))
        .await?;
    assert_eq!(code, StatusCode::CREATED, "{v}");
    assert_eq!(v["source"]["contextSizeBytes"], json!(11));
    let id = id_of(&v)?;
    let mut done = Value::Null;
    for _ in 0..200 {
        done = h
            .call("GET", &format!("/v1/snapshot-imports/{id}"), None)
            .await?
            .1;
        if done["status"] == json!("succeeded") || done["status"] == json!("failed") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(done["status"], json!("succeeded"), "{done}");
    let got = h.worker.built.lock().map(|b| b.clone()).unwrap_or_default();
    assert_eq!(
        got,
        vec![(
            b"PK-context!".to_vec(),
            "sub/Dockerfile".to_owned(),
            Some("app".to_owned()),
            "A=1".to_owned()
        )]
    );
    // Single use: the same ref again is refused.
    let (code, v) = h.call("POST", "/v1/snapshot-imports", Some(create)).await?;
    assert_eq!(code, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["error"]["code"], json!("INVALID_CONTEXT_REF"));
    Ok(())
}
