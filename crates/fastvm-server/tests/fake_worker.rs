//! Control-plane tests over a simulated worker: the lifecycle paths a real
//! VM rarely takes (boots that fail or outlast the launch wait, deletes
//! during boot, worker failures, interrupted transitions at restart, a guest
//! dying mid-stream), fast and deterministic, through the real router.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use fastvm_agent_proto::ExitStatus;
use fastvm_server::store::{Store, VmRecord};
use fastvm_server::worker::{ExecEvents, VmSpec, Worker, WorkerError};
use fastvm_server::AppState;
use fastvm_types::{OrgId, VmId, VmStatus};
use fastvm_worker::{ExecEvent, ExecRequest, VmState};
use futures::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
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
    deleted: Mutex<Vec<VmId>>,
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
        if let Some(gate) = &self.gate {
            gate.acquire().await.map_err(|e| WorkerError::Failed(e.to_string()))?.forget();
        }
        if self.fail_create.load(Ordering::SeqCst) {
            self.set(spec.id, VmState::Error("boom".into()));
            return Err(WorkerError::Failed("QEMU failed: boom".into()));
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
