//! Control-plane tests over a simulated worker: the lifecycle paths a real
//! VM rarely takes (boots that fail or outlast the launch wait, deletes
//! during boot, worker failures, interrupted transitions at restart, a guest
//! dying mid-stream, snapshot captures that fail, restores racing a
//! snapshot delete), fast and deterministic, through the real router.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use fastvm_agent_proto::ExitStatus;
use fastvm_server::store::{Store, VmRecord};
use fastvm_server::worker::{ExecEvents, VmSpec, Worker, WorkerError};
use fastvm_server::AppState;
use fastvm_server::store::SnapshotRecord;
use fastvm_types::snapshot::SnapshotStatus;
use fastvm_types::{OrgId, SnapshotId, VmId, VmStatus};
use fastvm_worker::{ExecEvent, ExecRequest, VmState};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tower::ServiceExt;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// A worker whose VMs are entries in a map; boots can be held at a gate.
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
}

impl FakeWorker {
    fn set(&self, id: VmId, state: VmState) {
        if let Ok(mut m) = self.vms.lock() {
            m.insert(id, state);
        }
    }
    fn has(&self, id: VmId) -> bool {
        self.vms.lock().map(|m| m.contains_key(&id)).unwrap_or(false)
    }
    fn has_snapshot(&self, id: SnapshotId) -> bool {
        self.snapshots.lock().map(|m| m.contains(&id)).unwrap_or(false)
    }
    fn last_created(&self) -> Option<VmSpec> {
        self.created.lock().ok().and_then(|c| c.last().cloned())
    }
}

fn exit(code: i32) -> ExecEvent {
    ExecEvent::Exit(ExitStatus { code, signal: None, timed_out: false, duration_ms: 7, error: None })
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
            gate.acquire().await.map_err(|e| WorkerError::Failed(e.to_string()))?.forget();
        }
        if self.fail_create.load(Ordering::SeqCst) {
            self.set(spec.id, VmState::Error("boom".into()));
            return Err(WorkerError::Failed("QEMU failed: boom".into()));
        }
        if let Some(snap) = spec.snapshot.filter(|s| !self.has_snapshot(*s)) {
            return Err(WorkerError::NoSuchSnapshot(format!("no snapshot with id {snap}")));
        }
        self.set(spec.id, VmState::Running);
        Ok(())
    }

    fn state(&self, id: VmId) -> Option<VmState> {
        self.vms.lock().ok().and_then(|m| m.get(&id).cloned())
    }

    fn list(&self) -> Vec<(String, VmState)> {
        self.vms.lock().map(|m| m.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()).unwrap_or_default()
    }

    async fn pause(&self, id: VmId) -> Result<(), WorkerError> {
        if self.fail_pause.load(Ordering::SeqCst) {
            return Err(WorkerError::Failed("QMP error: stop failed".into()));
        }
        self.set(id, VmState::Paused);
        Ok(())
    }

    async fn resume(&self, id: VmId) -> Result<(), WorkerError> {
        self.set(id, VmState::Running);
        Ok(())
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
        if self.state(id) != Some(VmState::Running) {
            return Err(WorkerError::WrongState(format!("VM {id} is not running")));
        }
        let events: Vec<Result<ExecEvent, WorkerError>> = match req.argv.first().map(String::as_str) {
            Some("die-midway") => vec![Ok(ExecEvent::Stdout("partial".into())), Err(WorkerError::AgentUnavailable("agent connection closed".into()))],
            Some("flood") => {
                let chunk = bytes::Bytes::from(vec![b'x'; 1 << 20]);
                let mut v: Vec<_> = (0..5).map(|_| Ok(ExecEvent::Stdout(chunk.clone()))).collect();
                v.push(Ok(exit(0)));
                v
            }
            _ => vec![Ok(ExecEvent::Stdout("out\n".into())), Ok(ExecEvent::Stderr("err\n".into())), Ok(exit(3))],
        };
        Ok(futures::stream::iter(events).boxed())
    }

    async fn snapshot(&self, vm: VmId, snapshot: SnapshotId) -> Result<(), WorkerError> {
        if !matches!(self.state(vm), Some(VmState::Running | VmState::Paused)) {
            return Err(WorkerError::WrongState(format!("VM {vm} is not running or paused")));
        }
        if self.fail_snapshot.load(Ordering::SeqCst) {
            return Err(WorkerError::Failed("writing the memory state failed: No space left on device".into()));
        }
        if let Ok(mut s) = self.snapshots.lock() {
            s.insert(snapshot);
        }
        Ok(())
    }

    async fn delete_snapshot(&self, snapshot: SnapshotId) -> Result<(), WorkerError> {
        if let Ok(mut s) = self.snapshots.lock() {
            s.remove(&snapshot);
        }
        Ok(())
    }
}

struct Harness {
    state: AppState,
    router: axum::Router,
    worker: Arc<FakeWorker>,
    key: String,
    _dir: tempfile::TempDir,
}

async fn harness(worker: FakeWorker, launch_wait: Duration) -> Result<Harness, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), None).await?;
    fastvm_server::bootstrap(&store, dir.path()).await?;
    let key = std::fs::read_to_string(dir.path().join("admin-api-key"))?.trim().to_owned();
    let worker = Arc::new(worker);
    let state = AppState::new(store, worker.clone(), launch_wait);
    let router = fastvm_server::routes::router(state.clone());
    Ok(Harness { state, router, worker, key, _dir: dir })
}

impl Harness {
    async fn send(&self, method: &str, path: &str, body: Option<Value>, accept: Option<&str>) -> Result<(StatusCode, Vec<u8>), Box<dyn std::error::Error>> {
        let mut req = Request::builder().method(method).uri(path).header("authorization", format!("Bearer {}", self.key));
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        let req = match body {
            Some(b) => req.header("content-type", "application/json").body(Body::from(serde_json::to_vec(&b)?))?,
            None => req.body(Body::empty())?,
        };
        let res = self.router.clone().oneshot(req).await?;
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 64 << 20).await?;
        Ok((status, bytes.to_vec()))
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<(StatusCode, Value), Box<dyn std::error::Error>> {
        let (status, bytes) = self.send(method, path, body, None).await?;
        Ok((status, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
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
        Err(format!("VM {id} never became {status} (is {})", self.status_of(id).await?).into())
    }
}

fn gated() -> FakeWorker {
    FakeWorker { gate: Some(tokio::sync::Semaphore::new(0)), ..Default::default() }
}

fn id_of(v: &Value) -> Result<String, Box<dyn std::error::Error>> {
    Ok(v["id"].as_str().ok_or("no id")?.to_owned())
}

#[tokio::test]
async fn slow_boot_answers_202_then_runs() -> TestResult {
    let h = harness(gated(), Duration::from_millis(50)).await?;
    let (status, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c2m4", "ttl": {"seconds": 30, "action": "pause"}}))).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_eq!((&vm["status"], &vm["cpu"], &vm["memoryMiB"], &vm["expiresAtMs"]), (&json!("provisioning"), &json!(2), &json!(4096), &json!(null)));
    let id = id_of(&vm)?;
    // Provisioning VMs refuse transitions.
    let (status, err) = h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::CONFLICT, &json!("INVALID_STATE")));
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("provisioning")));
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
    let (status, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    assert_eq!((status, &vm["status"]), (StatusCode::CREATED, &json!("running")));
    Ok(())
}

#[tokio::test]
async fn failed_boot_is_error() -> TestResult {
    let worker = FakeWorker::default();
    worker.fail_create.store(true, Ordering::SeqCst);
    let h = harness(worker, Duration::from_secs(5)).await?;
    let (status, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    assert_eq!((status, &vm["status"]), (StatusCode::ACCEPTED, &json!("error")));
    let id = id_of(&vm)?;
    // error is terminal: not reconciled away, refuses pause, can be deleted.
    assert_eq!(h.status_of(&id).await?, "error");
    assert_eq!(h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?.0, StatusCode::CONFLICT);
    assert_eq!(h.call("DELETE", &format!("/v1/vms/{id}"), None).await?.0, StatusCode::OK);
    assert!(!h.worker.has(id.parse()?));
    Ok(())
}

#[tokio::test]
async fn delete_during_boot_leaves_nothing_behind() -> TestResult {
    let h = harness(gated(), Duration::ZERO).await?;
    let (status, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    assert_eq!(status, StatusCode::ACCEPTED);
    let id = id_of(&vm)?;
    let (status, body) = h.call("DELETE", &format!("/v1/vms/{id}"), None).await?;
    assert_eq!((status, body), (StatusCode::OK, json!({"id": id, "deleted": true})));
    assert_eq!(h.call("GET", &format!("/v1/vms/{id}"), None).await?.0, StatusCode::NOT_FOUND);
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
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    let id = id_of(&vm)?;
    h.worker.fail_pause.store(true, Ordering::SeqCst);
    let (status, err) = h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::INTERNAL_SERVER_ERROR, &json!("WORKER_ERROR")));
    assert_eq!(h.status_of(&id).await?, "running");
    h.worker.fail_pause.store(false, Ordering::SeqCst);
    let (status, vm) = h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?;
    assert_eq!((status, &vm["status"]), (StatusCode::OK, &json!("paused")));
    Ok(())
}

#[tokio::test]
async fn worker_states_are_reconciled_on_read() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    let id = id_of(&vm)?;
    let vm_id: VmId = id.parse()?;
    h.worker.set(vm_id, VmState::Stopped);
    let (_, list) = h.call("GET", "/v1/vms?status=running", None).await?;
    assert_eq!(list, json!([]), "a dead VM is no longer listed as running");
    assert_eq!(h.status_of(&id).await?, "stopped");
    // A VM that vanished from its worker is stopped too, and exec says why.
    let (_, vm2) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    let id2 = id_of(&vm2)?;
    if let Ok(mut m) = h.worker.vms.lock() {
        m.remove(&id2.parse()?);
    }
    let (status, err) = h.call("POST", &format!("/v1/vms/{id2}/exec"), Some(json!({"command": ["true"]}))).await?;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("stopped")), "{err}");
    Ok(())
}

#[tokio::test]
async fn exec_buffered_and_streamed() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    let path = format!("/v1/vms/{}/exec", id_of(&vm)?);
    let (status, out) = h.call("POST", &path, Some(json!({"command": ["anything"]}))).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(out, json!({"exitCode": 3, "stdout": "out\n", "stderr": "err\n", "timedOut": false, "stdoutTruncated": false, "stderrTruncated": false, "durationMs": 7}));

    let (_, flood) = h.call("POST", &path, Some(json!({"command": ["flood"]}))).await?;
    assert_eq!((flood["stdout"].as_str().map(str::len), &flood["stdoutTruncated"]), (Some(4 << 20), &json!(true)));

    let (status, body) = h.send("POST", &path, Some(json!({"command": ["anything"]})), Some("application/x-ndjson")).await?;
    assert_eq!(status, StatusCode::OK);
    let lines: Vec<Value> = body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(serde_json::from_slice).collect::<Result<_, _>>()?;
    assert_eq!(lines, [json!({"t": "o", "d": "b3V0Cg=="}), json!({"t": "e", "d": "ZXJyCg=="}), json!({"t": "x", "d": "", "c": 3, "to": false, "ms": 7})]);

    // A guest that dies mid-stream still ends the stream with one exit event.
    let (_, body) = h.send("POST", &path, Some(json!({"command": ["die-midway"]})), Some("application/x-ndjson")).await?;
    let lines: Vec<Value> = body.split(|&b| b == b'\n').filter(|l| !l.is_empty()).map(serde_json::from_slice).collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!((&lines[1]["t"], &lines[1]["c"]), (&json!("x"), &json!(-1)));
    assert!(lines[1]["d"].as_str().is_some_and(|d| d.contains("agent connection closed")));
    // ... and the buffered mode answers 503.
    let (status, err) = h.call("POST", &path, Some(json!({"command": ["die-midway"]}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::SERVICE_UNAVAILABLE, &json!("AGENT_UNAVAILABLE")));
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
    }
}

/// Rows left mid-transition by a previous run are settled at startup.
#[tokio::test]
async fn startup_settles_interrupted_transitions() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let store = h.state.store();
    let org = fastvm_server::default_org(store).await?.ok_or("default org")?;
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
    assert_eq!(status(&deleting).await?, None, "an interrupted delete is finished");
    assert!(!h.worker.has(deleting.id));
    assert_eq!(status(&died).await?, Some(VmStatus::Stopped));
    assert!(h.worker.has(orphan), "VMs the store does not know are left alone");
    Ok(())
}

// --- snapshots -----------------------------------------------------------------------

#[tokio::test]
async fn snapshot_crud_and_name_rules() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c2m4", "metadata": {"team": "a"}, "envVars": {"K": "v"}}))).await?;
    let vm_id = id_of(&vm)?;

    let (status, snap) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": vm_id, "name": "  base \t  image  "}))).await?;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let mut keys: Vec<&str> = snap.as_object().ok_or("object")?.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["bucketMounts", "createdAt", "envVars", "firewall", "id", "machineName", "metadata", "name", "orgId", "services", "status", "vmId", "volumes"]);
    assert_eq!((&snap["name"], &snap["status"], &snap["vmId"], &snap["orgId"]), (&json!("base image"), &json!("ready"), &vm["id"], &vm["orgId"]));
    assert_eq!((&snap["machineName"], &snap["metadata"], &snap["envVars"]), (&json!("c2m4"), &json!({"team": "a"}), &json!({"K": "v"})));
    assert_eq!((&snap["services"], &snap["volumes"], &snap["bucketMounts"]), (&json!([]), &json!([]), &json!([])));
    assert_eq!(snap["firewall"], vm["firewall"]);
    let sid = id_of(&snap)?;
    assert!(h.worker.has_snapshot(sid.parse()?));
    // The source VM is untouched.
    assert_eq!(h.status_of(&vm_id).await?, "running");

    // Default name, truncation to 64 runes.
    let (_, d) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": vm_id}))).await?;
    assert_eq!(d["name"], json!(format!("snapshot-{}", &vm_id[..8])));
    let (_, e) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": vm_id, "name": "   "}))).await?;
    assert_eq!(e["name"], d["name"]);
    let (_, t) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": vm_id, "name": "é".repeat(70)}))).await?;
    assert_eq!(t["name"], json!("é".repeat(64)));

    let (status, list) = h.call("GET", "/v1/snapshots", None).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(4));
    assert_eq!(list[0]["id"], snap["id"], "oldest first");
    assert_eq!(h.call("GET", &format!("/v1/snapshots/{sid}"), None).await?, (StatusCode::OK, snap.clone()));

    // Rename (normalized; empty gives the default name); nothing to update is 422.
    let (status, r) = h.call("PATCH", &format!("/v1/snapshots/{sid}"), Some(json!({"name": " new   name "}))).await?;
    assert_eq!((status, &r["name"]), (StatusCode::OK, &json!("new name")));
    assert_eq!(h.call("GET", &format!("/v1/snapshots/{sid}"), None).await?.1["name"], json!("new name"));
    let (_, r) = h.call("PATCH", &format!("/v1/snapshots/{sid}"), Some(json!({"name": ""}))).await?;
    assert_eq!(r["name"], d["name"]);
    let (status, err) = h.call("PATCH", &format!("/v1/snapshots/{sid}"), Some(json!({}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("INVALID_REQUEST")));
    let (status, err) = h.call("PATCH", &format!("/v1/snapshots/{sid}"), Some(json!({"nmae": "x"}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::BAD_REQUEST, &json!("INVALID_REQUEST")));

    // Delete: gone from the worker, 404 afterwards, not listed.
    let (status, body) = h.call("DELETE", &format!("/v1/snapshots/{sid}"), None).await?;
    assert_eq!((status, body), (StatusCode::OK, json!({"id": sid, "deleted": true})));
    assert!(!h.worker.has_snapshot(sid.parse()?));
    for (m, b) in [("GET", None), ("PATCH", Some(json!({"name": "x"}))), ("DELETE", None)] {
        let (status, err) = h.call(m, &format!("/v1/snapshots/{sid}"), b).await?;
        assert_eq!((status, &err["error"]["code"]), (StatusCode::NOT_FOUND, &json!("NOT_FOUND")), "{m}");
    }
    assert_eq!(h.call("GET", "/v1/snapshots", None).await?.1.as_array().map(Vec::len), Some(3));
    // Ids that are not UUIDs are 404s too.
    assert_eq!(h.call("GET", "/v1/snapshots/snp_123", None).await?.0, StatusCode::NOT_FOUND);
    Ok(())
}

#[tokio::test]
async fn snapshot_needs_a_running_or_paused_vm_of_the_org() -> TestResult {
    let h = harness(gated(), Duration::ZERO).await?;
    // Unknown VM, malformed body.
    let (status, err) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": VmId::new_v4()}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::NOT_FOUND, &json!("NOT_FOUND")));
    let (status, err) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": "nope"}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::BAD_REQUEST, &json!("INVALID_REQUEST")));
    let (status, _) = h.call("POST", "/v1/snapshots", Some(json!({"name": "x"}))).await?;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A provisioning VM: 409, and no row is left.
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    let id = id_of(&vm)?;
    let (status, err) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": id}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::CONFLICT, &json!("INVALID_STATE")));
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("provisioning")), "{err}");
    assert_eq!(h.call("GET", "/v1/snapshots", None).await?.1, json!([]));
    // Paused works, and the VM stays paused.
    if let Some(gate) = &h.worker.gate {
        gate.add_permits(1);
    }
    h.wait_status(&id, "running").await?;
    assert_eq!(h.call("POST", &format!("/v1/vms/{id}/pause"), None).await?.0, StatusCode::OK);
    let (status, snap) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": id}))).await?;
    assert_eq!((status, &snap["status"]), (StatusCode::CREATED, &json!("ready")));
    assert_eq!(h.status_of(&id).await?, "paused");
    // Another org sees nothing and can touch nothing.
    let store = h.state.store();
    let other = store.create_org("other").await?;
    let other_key = store.create_key(other, "k").await?.token;
    let other_h = Harness { state: h.state.clone(), router: h.router.clone(), worker: h.worker.clone(), key: other_key, _dir: tempfile::tempdir()? };
    let sid = id_of(&snap)?;
    for (m, path, b) in [
        ("GET", format!("/v1/snapshots/{sid}"), None),
        ("PATCH", format!("/v1/snapshots/{sid}"), Some(json!({"name": "mine"}))),
        ("DELETE", format!("/v1/snapshots/{sid}"), None),
        ("POST", "/v1/snapshots".to_owned(), Some(json!({"vmId": id}))),
        ("POST", "/v1/vms".to_owned(), Some(json!({"snapshotId": sid}))),
    ] {
        let (status, err) = other_h.call(m, &path, b).await?;
        assert_eq!((status, &err["error"]["code"]), (StatusCode::NOT_FOUND, &json!("NOT_FOUND")), "{m} {path}");
    }
    assert_eq!(other_h.call("GET", "/v1/snapshots", None).await?.1, json!([]));
    assert_eq!(h.call("GET", &format!("/v1/snapshots/{sid}"), None).await?.1["name"], snap["name"]);
    Ok(())
}

#[tokio::test]
async fn failed_capture_keeps_an_error_snapshot() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    h.worker.fail_snapshot.store(true, Ordering::SeqCst);
    let (status, err) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": vm["id"], "name": "doomed"}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::INTERNAL_SERVER_ERROR, &json!("WORKER_ERROR")));
    let message = err["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("No space left") && message.contains("status error"), "{err}");
    let (_, list) = h.call("GET", "/v1/snapshots", None).await?;
    assert_eq!((&list[0]["name"], &list[0]["status"]), (&json!("doomed"), &json!("error")));
    assert!(message.contains(list[0]["id"].as_str().unwrap_or("?")), "the error names the snapshot: {err}");
    // It cannot be restored, and can be deleted.
    let sid = id_of(&list[0])?;
    let (status, err) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": sid}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::CONFLICT, &json!("INVALID_STATE")));
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("error")), "{err}");
    assert_eq!(h.call("DELETE", &format!("/v1/snapshots/{sid}"), None).await?.0, StatusCode::OK);
    assert_eq!(h.call("GET", "/v1/snapshots", None).await?.1, json!([]));
    assert_eq!(h.status_of(&id_of(&vm)?).await?, "running");
    Ok(())
}

#[tokio::test]
async fn restore_takes_shape_env_and_firewall_from_the_snapshot() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let firewall = json!({"egress": {"defaultAction": "deny", "rules": []}});
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c2m4", "envVars": {"FROM": "source"}, "metadata": {"m": "source"}, "firewall": firewall}))).await?;
    let (_, snap) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": vm["id"], "name": "golden one"}))).await?;
    let sid = id_of(&snap)?;

    let (status, r) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": sid, "name": "clone", "metadata": {"m": "clone"}}))).await?;
    assert_eq!((status, &r["status"]), (StatusCode::CREATED, &json!("running")), "{r}");
    assert_eq!((&r["name"], &r["sourceName"], &r["machineName"], &r["cpu"], &r["memoryMiB"], &r["diskGiB"]), (&json!("clone"), &json!("golden one"), &json!("c2m4"), &json!(2), &json!(4096), &json!(10)));
    assert_eq!((&r["envVars"], &r["metadata"], &r["firewall"]), (&json!({"FROM": "source"}), &json!({"m": "clone"}), &vm["firewall"]));
    assert_ne!(r["id"], vm["id"]);
    let spec = h.worker.last_created().ok_or("no create")?;
    assert_eq!((spec.snapshot.map(|s| s.to_string()), spec.machine.name), (Some(sid.clone()), "c2m4"));
    assert_eq!(spec.env.get("FROM").map(String::as_str), Some("source"));

    // The request's env vars replace the snapshot's; the same machine type is accepted.
    let (status, r) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": sid, "machineType": " c2m4 ", "envVars": {"NEW": "1"}}))).await?;
    assert_eq!(status, StatusCode::CREATED, "{r}");
    assert_eq!((&r["envVars"], &r["metadata"], &r["name"]), (&json!({"NEW": "1"}), &json!({}), &json!(format!("vm-{}", &id_of(&r)?[..8]))));
    assert_eq!(h.worker.last_created().map(|s| s.env.into_iter().collect::<Vec<_>>()), Some(vec![("NEW".to_owned(), "1".to_owned())]));

    // Another machine type is refused, unknown ones too; nothing is left behind.
    let before = h.call("GET", "/v1/vms", None).await?.1.as_array().map(Vec::len);
    let (status, err) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": sid, "machineType": "c1m2"}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("MACHINE_TYPE_MISMATCH")));
    assert!(err["error"]["message"].as_str().is_some_and(|m| m.contains("c2m4") && m.contains("c1m2")), "{err}");
    let (status, err) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": sid, "machineType": "c3m7"}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::UNPROCESSABLE_ENTITY, &json!("INVALID_MACHINE_TYPE")));
    // Unknown snapshot: 404.
    let (status, err) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": SnapshotId::new_v4()}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::NOT_FOUND, &json!("NOT_FOUND")));
    assert_eq!(h.call("GET", "/v1/vms", None).await?.1.as_array().map(Vec::len), before);

    // A deleted snapshot: 404 on launch; its clones keep running.
    assert_eq!(h.call("DELETE", &format!("/v1/snapshots/{sid}"), None).await?.0, StatusCode::OK);
    let (status, err) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": sid}))).await?;
    assert_eq!((status, &err["error"]["code"]), (StatusCode::NOT_FOUND, &json!("NOT_FOUND")));
    assert_eq!(h.status_of(&id_of(&r)?).await?, "running");
    Ok(())
}

#[tokio::test]
async fn snapshot_delete_waits_for_restores_in_flight() -> TestResult {
    let h = harness(gated(), Duration::ZERO).await?;
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    let gate = h.worker.gate.as_ref().ok_or("gate")?;
    gate.add_permits(1);
    h.wait_status(&id_of(&vm)?, "running").await?;
    let (_, snap) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": vm["id"]}))).await?;
    let sid = id_of(&snap)?;
    // A restore held at the gate...
    let (status, r) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": sid}))).await?;
    assert_eq!((status, &r["status"], &r["sourceName"]), (StatusCode::ACCEPTED, &json!("provisioning"), &snap["name"]));
    // ...holds the delete back until it has its VM.
    let h = Arc::new(h);
    let h2 = h.clone();
    let path = format!("/v1/snapshots/{sid}");
    let delete = tokio::spawn(async move { h2.call("DELETE", &path, None).await.map(|(s, _)| s).map_err(|e| e.to_string()) });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!delete.is_finished(), "the delete did not wait for the restore");
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
    let (_, vm) = h.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"}))).await?;
    let (_, snap) = h.call("POST", "/v1/snapshots", Some(json!({"vmId": vm["id"]}))).await?;
    // The worker lost the files (e.g. removed by hand).
    if let Ok(mut s) = h.worker.snapshots.lock() {
        s.clear();
    }
    let (status, r) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": snap["id"]}))).await?;
    assert_eq!((status, &r["status"]), (StatusCode::ACCEPTED, &json!("error")));
    Ok(())
}

#[tokio::test]
async fn startup_marks_interrupted_captures_error() -> TestResult {
    let h = harness(FakeWorker::default(), Duration::from_secs(5)).await?;
    let store = h.state.store();
    let org = fastvm_server::default_org(store).await?.ok_or("default org")?;
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
    };
    store.insert_snapshot(&rec).await?;
    // Creating: neither restorable nor deletable.
    let (status, _) = h.call("POST", "/v1/vms", Some(json!({"snapshotId": rec.id}))).await?;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(h.call("DELETE", &format!("/v1/snapshots/{}", rec.id), None).await?.0, StatusCode::CONFLICT);
    assert_eq!(h.call("GET", &format!("/v1/snapshots/{}", rec.id), None).await?.1["status"], json!("creating"));
    h.state.reconcile_on_start().await?;
    let got = store.get_snapshot(org, rec.id).await?.ok_or("snapshot")?;
    assert_eq!(got.status, SnapshotStatus::Error);
    assert!(got.status_message.is_some_and(|m| m.contains("server stopped")));
    assert_eq!(h.call("DELETE", &format!("/v1/snapshots/{}", rec.id), None).await?.0, StatusCode::OK);
    Ok(())
}
