//! Cluster mode of the control plane over in-process fake workers, through
//! the real router and the real internal routes, on SQLite and on a real
//! PostgreSQL (`FASTVM_TEST_PG_URL`, e.g. `export FASTVM_TEST_PG_URL=$(scripts/start-postgres)`;
//! without it the PostgreSQL runs are skipped, and fail under CI):
//! placement spread, snapshot compatibility filter, two control planes
//! racing launches against a quota and a worker's capacity, stale
//! heartbeats, re-registration with reconciliation and fencing, drain.
//!
//! `placement_throughput` (ignored) measures launch requests/s with fake
//! workers that boot instantly:
//! `FASTVM_TEST_PG_URL=... cargo test -p fastvm-server --test fleet -- --ignored --nocapture`.

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use fastvm_server::fleet::{worker_token, Connector, Fleet, WorkerEndpoint};
use fastvm_server::store::{QuotaPatch, SnapshotRecord, Store};
use fastvm_server::worker::{ExecEvents, VmSpec, VmState, Worker, WorkerError};
use fastvm_server::AppState;
use fastvm_types::snapshot::SnapshotStatus;
use fastvm_types::{FirewallPolicy, OrgId, SnapshotId, VmId};
use serde_json::{json, Value};
use sqlx::postgres::{PgConnectOptions, PgConnection};
use sqlx::{ConnectOptions, Connection};
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tower::ServiceExt;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

const SECRET: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A worker host in a map: VMs by id, snapshots it holds.
#[derive(Default)]
struct FakeWorker {
    id: String,
    vms: Mutex<HashMap<VmId, VmState>>,
    deleted: Mutex<Vec<VmId>>,
    snapshots: Mutex<Vec<SnapshotId>>,
    /// Tokens of the handles made for it (by generation order).
    tokens: Mutex<Vec<String>>,
}

impl FakeWorker {
    fn count(&self) -> usize {
        self.vms.lock().map(|m| m.len()).unwrap_or(0)
    }
    fn has(&self, id: VmId) -> bool {
        self.vms
            .lock()
            .map(|m| m.contains_key(&id))
            .unwrap_or(false)
    }
    fn was_deleted(&self, id: VmId) -> bool {
        self.deleted
            .lock()
            .map(|d| d.contains(&id))
            .unwrap_or(false)
    }
    fn forget(&self, id: VmId) {
        if let Ok(mut m) = self.vms.lock() {
            m.remove(&id);
        }
    }
}

/// The handle the connector gives: the worker plus the token it was made with.
struct Handle(Arc<FakeWorker>);

#[async_trait]
impl Worker for Handle {
    fn id(&self) -> &str {
        &self.0.id
    }
    async fn create(&self, spec: VmSpec) -> Result<(), WorkerError> {
        if let Ok(mut m) = self.0.vms.lock() {
            m.insert(spec.id, VmState::Running);
        }
        Ok(())
    }
    async fn state(&self, id: VmId) -> Result<Option<VmState>, WorkerError> {
        Ok(self.0.vms.lock().ok().and_then(|m| m.get(&id).cloned()))
    }
    async fn list(&self) -> Result<Vec<(VmId, VmState)>, WorkerError> {
        Ok(self
            .0
            .vms
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default())
    }
    async fn pause(&self, id: VmId) -> Result<(), WorkerError> {
        if let Ok(mut m) = self.0.vms.lock() {
            m.insert(id, VmState::Paused);
        }
        Ok(())
    }
    async fn resume(&self, id: VmId) -> Result<(), WorkerError> {
        if let Ok(mut m) = self.0.vms.lock() {
            m.insert(id, VmState::Running);
        }
        Ok(())
    }
    async fn delete(&self, id: VmId) -> Result<(), WorkerError> {
        self.0.forget(id);
        if let Ok(mut d) = self.0.deleted.lock() {
            d.push(id);
        }
        Ok(())
    }
    async fn exec(
        &self,
        _id: VmId,
        _req: fastvm_worker::ExecRequest,
    ) -> Result<ExecEvents, WorkerError> {
        Err(WorkerError::Failed("no exec in this fake".into()))
    }
    async fn snapshot(&self, _vm: VmId, snapshot: SnapshotId) -> Result<(), WorkerError> {
        if let Ok(mut s) = self.0.snapshots.lock() {
            s.push(snapshot);
        }
        Ok(())
    }
    async fn delete_snapshot(&self, _snapshot: SnapshotId) -> Result<(), WorkerError> {
        Ok(())
    }
    async fn set_firewall(&self, _id: VmId, _policy: &FirewallPolicy) -> Result<(), WorkerError> {
        Ok(())
    }
    async fn enforced_firewall(&self, _id: VmId) -> Result<Option<FirewallPolicy>, WorkerError> {
        Ok(None)
    }
}

/// The fake hosts of one test, shared by every control plane of it.
#[derive(Default, Clone)]
struct Hosts(Arc<Mutex<HashMap<String, Arc<FakeWorker>>>>);

impl Hosts {
    fn get(&self, id: &str) -> Arc<FakeWorker> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(FakeWorker {
                    id: id.to_owned(),
                    ..Default::default()
                })
            })
            .clone()
    }
    fn connector(&self) -> Connector {
        let hosts = self.clone();
        Arc::new(move |ep: WorkerEndpoint| {
            let w = hosts.get(&ep.id);
            if let Ok(mut t) = w.tokens.lock() {
                t.push(ep.token.clone());
            }
            Arc::new(Handle(w)) as Arc<dyn Worker>
        })
    }
}

/// Where a test's store lives.
enum Db {
    Sqlite(tempfile::TempDir),
    Pg {
        admin: String,
        db: String,
        url: String,
    },
}

impl Db {
    async fn sqlite() -> Res<Db> {
        Ok(Db::Sqlite(tempfile::tempdir()?))
    }

    /// A fresh database on the test PostgreSQL; None when there is none (skip).
    async fn pg() -> Res<Option<Db>> {
        let Ok(admin) = std::env::var("FASTVM_TEST_PG_URL") else {
            if std::env::var_os("CI").is_some() {
                return Err(
                    "FASTVM_TEST_PG_URL is not set under CI (scripts/start-postgres)".into(),
                );
            }
            eprintln!("FASTVM_TEST_PG_URL is not set: skipping the PostgreSQL run");
            return Ok(None);
        };
        let opts: PgConnectOptions = admin.parse()?;
        let db = format!("fastvm_fleet_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect_with(&opts).await?;
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&mut conn)
            .await?;
        let url = opts.clone().database(&db).to_url_lossy().to_string();
        Ok(Some(Db::Pg { admin, db, url }))
    }

    async fn open(&self) -> Res<Store> {
        Ok(match self {
            Db::Sqlite(dir) => Store::open(dir.path(), None).await?,
            Db::Pg { url, .. } => Store::open(Path::new("/nonexistent"), Some(url)).await?,
        })
    }

    async fn drop_db(self) {
        if let Db::Pg { admin, db, .. } = self {
            if let Ok(opts) = admin.parse::<PgConnectOptions>() {
                if let Ok(mut conn) = PgConnection::connect_with(&opts).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                        .execute(&mut conn)
                        .await;
                }
            }
        }
    }
}

/// One control plane.
struct Cp {
    state: AppState,
    router: axum::Router,
    key: String,
}

async fn control_plane(db: &Db, hosts: &Hosts, wait: Duration) -> Res<Cp> {
    let store = db.open().await?;
    let dir = tempfile::tempdir()?;
    fastvm_server::bootstrap(&store, dir.path()).await?;
    let org = fastvm_server::default_org(&store)
        .await?
        .ok_or("no default org")?;
    // The admin key: the bootstrap's (first control plane) or a new one for user admin.
    let key = match std::fs::read_to_string(dir.path().join("admin-api-key")) {
        Ok(k) => k.trim().to_owned(),
        Err(_) => {
            let users = admin_user(&store).await?;
            store.create_key_for(org, Some(users), "admin").await?.token
        }
    };
    let fleet = Fleet::cluster(store.clone(), SECRET, hosts.connector()).with_snapshot_store(true);
    let state = AppState::with_fleet(store, fleet, wait);
    let router = fastvm_server::routes::router(state.clone());
    Ok(Cp { state, router, key })
}

/// The id of user `admin` (made by the first bootstrap).
async fn admin_user(store: &Store) -> Res<uuid::Uuid> {
    // The bootstrap key's user is the admin: find it through a throwaway key list.
    let org = fastvm_server::default_org(store)
        .await?
        .ok_or("no default org")?;
    for k in store.list_keys(Some(org)).await? {
        if let Some(u) = k.user_id {
            return Ok(u);
        }
    }
    Err("no admin user".into())
}

impl Cp {
    async fn call_as(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Res<(StatusCode, Value)> {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {key}"));
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&b)?))?,
            None => req.body(Body::empty())?,
        };
        let res = self.router.clone().oneshot(req).await?;
        let status = res.status();
        let bytes = axum::body::to_bytes(res.into_body(), 1 << 20).await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Res<(StatusCode, Value)> {
        self.call_as(&self.key.clone(), method, path, body).await
    }

    /// Register a worker through the internal route; its generation.
    async fn register(&self, id: &str, cpus: u64, memory_mib: u64, compat: &str) -> Res<i64> {
        let (status, v) = self
            .call_as(
                SECRET,
                "POST",
                "/internal/v1/workers/register",
                Some(json!({
                    "id": id,
                    "address": format!("http://{id}.test:7070"),
                    "info": {"cpus": cpus, "memory_mib": memory_mib, "disk_free_gib": 100,
                             "qemu_build": "10.0.2", "accel": "tcg", "cpu_model": "max", "compat_key": compat}
                })),
            )
            .await?;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["heartbeat_interval_ms"], json!(2000));
        v["generation"]
            .as_i64()
            .ok_or_else(|| "no generation".into())
    }

    async fn heartbeat(&self, id: &str, generation: i64, token: &str) -> Res<StatusCode> {
        let (status, _) = self
            .call_as(
                token,
                "POST",
                &format!("/internal/v1/workers/{id}/heartbeat"),
                Some(json!({"generation": generation, "vm_count": 0})),
            )
            .await?;
        Ok(status)
    }

    async fn launch(&self) -> Res<(StatusCode, Value)> {
        self.call("POST", "/v1/vms", Some(json!({"machineType": "c1m2"})))
            .await
    }

    async fn worker_of(&self, vm: &Value) -> Res<String> {
        let id: VmId = vm["id"].as_str().ok_or("no id")?.parse()?;
        Ok(self
            .state
            .store()
            .get_vm_unscoped(id)
            .await?
            .ok_or("no row")?
            .worker_id)
    }

    async fn status_of(&self, id: VmId) -> Res<(String, Value)> {
        let (_, v) = self.call("GET", &format!("/v1/vms/{id}"), None).await?;
        Ok((v["status"].as_str().unwrap_or("").to_owned(), v))
    }
}

/// Run `f` on SQLite and (when configured) on PostgreSQL.
macro_rules! both {
    ($sqlite:ident, $pg:ident, $body:ident) => {
        #[tokio::test]
        async fn $sqlite() -> TestResult {
            let db = Db::sqlite().await?;
            let r = $body(&db).await;
            db.drop_db().await;
            r
        }
        #[tokio::test]
        async fn $pg() -> TestResult {
            let Some(db) = Db::pg().await? else {
                return Ok(());
            };
            let r = $body(&db).await;
            db.drop_db().await;
            r
        }
    };
}

async fn spreads(db: &Db) -> TestResult {
    let hosts = Hosts::default();
    let cp = control_plane(db, &hosts, Duration::from_secs(5)).await?;
    for w in ["wk_a", "wk_b", "wk_c"] {
        cp.register(w, 8, 65536, "k1").await?;
    }
    let mut on: HashMap<String, usize> = HashMap::new();
    for _ in 0..12 {
        let (status, v) = cp.launch().await?;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(v["status"], json!("running"));
        *on.entry(cp.worker_of(&v).await?).or_default() += 1;
    }
    assert_eq!(on.len(), 3, "{on:?}");
    assert!(on.values().all(|n| *n == 4), "{on:?}");
    for w in ["wk_a", "wk_b", "wk_c"] {
        assert_eq!(hosts.get(w).count(), 4);
    }
    // The admin list shows them with their VM counts.
    let (status, list) = cp.call("GET", "/v1/admin/workers", None).await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    let arr = list.as_array().ok_or("not a list")?;
    assert_eq!(arr.len(), 3);
    assert!(arr
        .iter()
        .all(|w| w["vmCount"] == json!(4) && w["status"] == json!("ready")));
    assert_eq!(arr[0]["memoryMiB"], json!(65536));
    Ok(())
}
both!(
    placement_spreads_sqlite,
    placement_spreads_postgres,
    spreads
);

async fn compat(db: &Db) -> TestResult {
    let hosts = Hosts::default();
    let cp = control_plane(db, &hosts, Duration::from_secs(5)).await?;
    cp.register("wk_a", 8, 65536, "k1").await?;
    cp.register("wk_b", 8, 65536, "k1").await?;
    cp.register("wk_c", 8, 65536, "k2").await?;
    // A VM and its snapshot: the snapshot row takes its worker's key, stored.
    let (_, vm) = cp.launch().await?;
    let src_worker = cp.worker_of(&vm).await?;
    let (status, snap) = cp
        .call("POST", "/v1/snapshots", Some(json!({"vmId": vm["id"]})))
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    let sid: SnapshotId = snap["id"].as_str().ok_or("no id")?.parse()?;
    let org = fastvm_server::default_org(cp.state.store())
        .await?
        .ok_or("org")?;
    let row = cp
        .state
        .store()
        .get_snapshot(org, sid)
        .await?
        .ok_or("row")?;
    let key = if src_worker == "wk_c" { "k2" } else { "k1" };
    assert_eq!((row.compat_key.as_deref(), row.stored), (Some(key), true));
    // A stored k1 snapshot restores on k1 workers only.
    let k1 = insert_snapshot(cp.state.store(), org, "wk_a", Some("k1"), true).await?;
    for _ in 0..6 {
        let (status, v) = cp
            .call("POST", "/v1/vms", Some(json!({"snapshotId": k1})))
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        let w = cp.worker_of(&v).await?;
        assert!(w == "wk_a" || w == "wk_b", "placed on {w}");
    }
    // A snapshot not in the store restores on its own worker only.
    let local = insert_snapshot(cp.state.store(), org, "wk_c", None, false).await?;
    for _ in 0..3 {
        let (status, v) = cp
            .call("POST", "/v1/vms", Some(json!({"snapshotId": local})))
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        assert_eq!(cp.worker_of(&v).await?, "wk_c");
    }
    // No compatible worker: 503 NO_CAPACITY, nothing stored.
    let k9 = insert_snapshot(cp.state.store(), org, "wk_a", Some("k9"), true).await?;
    let before = cp.state.store().list_vms(org, None).await?.len();
    let (status, v) = cp
        .call("POST", "/v1/vms", Some(json!({"snapshotId": k9})))
        .await?;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{v}");
    assert_eq!(v["error"]["code"], json!("NO_CAPACITY"));
    assert_eq!(cp.state.store().list_vms(org, None).await?.len(), before);
    Ok(())
}
both!(compat_filter_sqlite, compat_filter_postgres, compat);

async fn insert_snapshot(
    store: &Store,
    org: OrgId,
    worker: &str,
    compat_key: Option<&str>,
    stored: bool,
) -> Res<SnapshotId> {
    let rec = SnapshotRecord {
        id: SnapshotId::new_v4(),
        org_id: org,
        vm_id: VmId::new_v4(),
        worker_id: worker.into(),
        name: "s".into(),
        status: SnapshotStatus::Ready,
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
        compat_key: compat_key.map(str::to_owned),
        stored,
    };
    store.insert_snapshot(&rec).await?;
    Ok(rec.id)
}

/// 50 launches split over two control planes on one database, at once.
async fn race(a: &Cp, b: &Cp, key_a: &str, key_b: &str) -> Res<usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let (router, key) = if i % 2 == 0 {
            (a.router.clone(), key_a.to_owned())
        } else {
            (b.router.clone(), key_b.to_owned())
        };
        tasks.spawn(async move {
            let req = Request::builder()
                .method("POST")
                .uri("/v1/vms")
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(Body::from(r#"{"machineType":"c1m2"}"#))
                .map_err(|e| e.to_string())?;
            let res = router.oneshot(req).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(res.status())
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        let status = r??;
        if status.is_success() {
            ok += 1;
        } else {
            assert!(
                status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::SERVICE_UNAVAILABLE,
                "{status}"
            );
        }
    }
    Ok(ok)
}

async fn two_control_planes(db: &Db) -> TestResult {
    let hosts = Hosts::default();
    let a = control_plane(db, &hosts, Duration::from_secs(5)).await?;
    // PostgreSQL: a second control plane on the same database. SQLite has
    // one writer and one control plane: both halves go through `a`.
    let second = match db {
        Db::Pg { .. } => Some(control_plane(db, &hosts, Duration::from_secs(5)).await?),
        Db::Sqlite(_) => None,
    };
    let b = second.as_ref().unwrap_or(&a);
    for w in ["wk_a", "wk_b", "wk_c"] {
        a.register(w, 64, 1 << 20, "k1").await?;
    }
    // Quota: 7 vCPUs. 50 concurrent launches of 1 vCPU: exactly 7 land.
    let store = a.state.store();
    let org = fastvm_server::default_org(store).await?.ok_or("org")?;
    store
        .set_quota(
            org,
            QuotaPatch {
                vcpu: Some(7),
                memory_mib: Some(1 << 30),
                disk_gib: Some(1 << 30),
                ..Default::default()
            },
        )
        .await?;
    let ok = race(&a, b, &a.key, &b.key).await?;
    let live = store.list_vms(org, None).await?.len();
    println!("quota race: {ok} of 50 launches accepted (quota 7 vCPUs), {live} VM rows");
    assert_eq!((ok, live), (7, 7));
    // Capacity: two other orgs (so the org locks do not serialise them),
    // no quota limit, workers of 1 CPU (4 vCPUs each): exactly 12 land,
    // none over a worker's capacity.
    let mut keys = Vec::new();
    for name in ["racers-1", "racers-2"] {
        let org2 = store.create_org(name).await?;
        store
            .set_quota(
                org2,
                QuotaPatch {
                    vcpu: Some(1000),
                    memory_mib: Some(1 << 30),
                    disk_gib: Some(1 << 30),
                    ..Default::default()
                },
            )
            .await?;
        keys.push(store.create_key(org2, "racer").await?.token);
    }
    for w in ["wk_d", "wk_e", "wk_f"] {
        a.register(w, 1, 1 << 20, "k2").await?;
    }
    for w in ["wk_a", "wk_b", "wk_c"] {
        a.drain_via_admin(w).await?;
    }
    let ok = race(&a, b, &keys[0], &keys[1]).await?;
    let mut per = Vec::new();
    for w in ["wk_d", "wk_e", "wk_f"] {
        per.push(store.list_live_vms_on(w).await?.len());
    }
    println!("capacity race: {ok} of 50 launches accepted (3 workers x 4 vCPUs): {per:?}");
    assert_eq!(ok, 12);
    assert_eq!(per, vec![4, 4, 4]);
    Ok(())
}
both!(
    two_control_planes_race_sqlite,
    two_control_planes_race_postgres,
    two_control_planes
);

impl Cp {
    async fn drain_via_admin(&self, id: &str) -> TestResult {
        let (status, v) = self
            .call("POST", &format!("/v1/admin/workers/{id}/drain"), None)
            .await?;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["status"], json!("draining"));
        Ok(())
    }
}

async fn failure_and_return(db: &Db) -> TestResult {
    let hosts = Hosts::default();
    let cp = control_plane(db, &hosts, Duration::from_secs(5)).await?;
    let gen_a = cp.register("wk_a", 8, 65536, "k1").await?;
    // Only wk_a: three VMs land there.
    let mut vms = Vec::new();
    for _ in 0..3 {
        let (status, v) = cp.launch().await?;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        vms.push(v["id"].as_str().ok_or("id")?.parse::<VmId>()?);
    }
    // Heartbeats: the right token is accepted, another is 401.
    let token = worker_token(SECRET, "wk_a", gen_a);
    assert_eq!(
        cp.heartbeat("wk_a", gen_a, &token).await?,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        cp.heartbeat("wk_a", gen_a, "wrong").await?,
        StatusCode::UNAUTHORIZED
    );
    tokio::time::sleep(Duration::from_millis(30)).await;
    let cut = fastvm_server::store::now_ms();
    tokio::time::sleep(Duration::from_millis(30)).await;
    cp.register("wk_b", 8, 65536, "k1").await?;
    // wk_a's heartbeat is older than the cut: unreachable, its VMs unknown.
    let lost = cp.state.monitor_round_with(cut).await?;
    assert_eq!(lost, vec!["wk_a".to_owned()]);
    assert!(
        cp.state.monitor_round_with(cut).await?.is_empty(),
        "idempotent"
    );
    for id in &vms {
        let (status, v) = cp.status_of(*id).await?;
        assert_eq!(status, "unknown", "{v}");
        assert!(v["statusMessage"]
            .as_str()
            .is_some_and(|m| m.contains("stopped answering")));
    }
    // Its heartbeats are now refused (409: register again).
    assert_eq!(
        cp.heartbeat("wk_a", gen_a, &token).await?,
        StatusCode::CONFLICT
    );
    // New launches land elsewhere.
    let (_, v) = cp.launch().await?;
    assert_eq!(cp.worker_of(&v).await?, "wk_b");
    // Meanwhile: vms[1] is deleted by its user (its worker is unreachable:
    // the row goes, the worker is told when it returns); vms[2] is lost on
    // the host (it did not survive).
    let (status, v) = cp
        .call("DELETE", &format!("/v1/vms/{}", vms[1]), None)
        .await?;
    assert!(status.is_success(), "{v}");
    let a = hosts.get("wk_a");
    a.forget(vms[2]);
    assert!(a.has(vms[1]));
    // wk_a comes back: a new generation, and reconciliation.
    let gen2 = cp.register("wk_a", 8, 65536, "k1").await?;
    assert_eq!(gen2, gen_a + 1);
    let mut settled = false;
    for _ in 0..100 {
        let s0 = cp.status_of(vms[0]).await?.0;
        let s2 = cp.status_of(vms[2]).await?.0;
        if s0 == "running" && s2 == "error" && a.was_deleted(vms[1]) {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(settled, "reconciliation did not settle");
    let (_, v) = cp.status_of(vms[2]).await?;
    assert!(v["statusMessage"]
        .as_str()
        .is_some_and(|m| m.contains("lost with its worker")));
    assert!(!a.has(vms[1]), "the deleted VM was fenced off its worker");
    // The handle used for it is the new generation's.
    let last = a.tokens.lock().map(|t| t.last().cloned()).ok().flatten();
    assert_eq!(last, Some(worker_token(SECRET, "wk_a", gen2)));
    // The old generation's heartbeats stay refused; the new one's pass.
    assert_eq!(
        cp.heartbeat("wk_a", gen_a, &token).await?,
        StatusCode::CONFLICT
    );
    assert_eq!(
        cp.heartbeat("wk_a", gen2, &worker_token(SECRET, "wk_a", gen2))
            .await?,
        StatusCode::NO_CONTENT
    );
    Ok(())
}
both!(
    stale_heartbeat_and_reregistration_sqlite,
    stale_heartbeat_and_reregistration_postgres,
    failure_and_return
);

async fn drain(db: &Db) -> TestResult {
    let hosts = Hosts::default();
    let cp = control_plane(db, &hosts, Duration::from_secs(5)).await?;
    for w in ["wk_a", "wk_b"] {
        cp.register(w, 8, 65536, "k1").await?;
    }
    // Not for org keys.
    let org = fastvm_server::default_org(cp.state.store())
        .await?
        .ok_or("org")?;
    let plain = cp.state.store().create_key(org, "plain").await?.token;
    let (status, _) = cp
        .call_as(&plain, "POST", "/v1/admin/workers/wk_a/drain", None)
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = cp.call_as(&plain, "GET", "/v1/admin/workers", None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Before the drain: two VMs on wk_a, one paused, one running.
    let mut on_a = Vec::new();
    while on_a.len() < 2 {
        let (status, v) = cp.launch().await?;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        if cp.worker_of(&v).await? == "wk_a" {
            on_a.push(v["id"].as_str().ok_or("id")?.parse::<VmId>()?);
        }
    }
    let (status, v) = cp
        .call("POST", &format!("/v1/vms/{}/pause", on_a[0]), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    cp.drain_via_admin("wk_a").await?;
    // The paused VM moves to wk_b (same id, still paused); the running one stays.
    let (a, b) = (hosts.get("wk_a"), hosts.get("wk_b"));
    let mut moved = false;
    for _ in 0..100 {
        let row = cp
            .state
            .store()
            .get_vm_unscoped(on_a[0])
            .await?
            .ok_or("row")?;
        if row.worker_id == "wk_b" && row.status == fastvm_types::VmStatus::Paused {
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(moved, "the paused VM was not moved");
    assert!(!a.has(on_a[0]) && a.was_deleted(on_a[0]));
    let on_b = b.vms.lock().ok().and_then(|m| m.get(&on_a[0]).cloned());
    assert_eq!(on_b, Some(VmState::Paused));
    assert_eq!(cp.status_of(on_a[0]).await?.0, "paused");
    assert!(a.has(on_a[1]));
    assert_eq!(cp.status_of(on_a[1]).await?.0, "running");
    // It resumes where it is now.
    let (status, v) = cp
        .call("POST", &format!("/v1/vms/{}/resume", on_a[0]), None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        b.vms.lock().ok().and_then(|m| m.get(&on_a[0]).cloned()),
        Some(VmState::Running)
    );
    let (status, _) = cp
        .call("POST", "/v1/admin/workers/wk_zz/drain", None)
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    for _ in 0..6 {
        let (_, v) = cp.launch().await?;
        assert_eq!(cp.worker_of(&v).await?, "wk_b");
    }
    // Draining survives a re-registration.
    cp.register("wk_a", 8, 65536, "k1").await?;
    let (_, list) = cp.call("GET", "/v1/admin/workers", None).await?;
    assert_eq!(list[0]["id"], json!("wk_a"));
    assert_eq!(list[0]["status"], json!("draining"));
    Ok(())
}
both!(
    drain_stops_placement_and_moves_paused_vms_sqlite,
    drain_stops_placement_and_moves_paused_vms_postgres,
    drain
);

/// Launch requests/s one control plane sustains with workers that boot
/// instantly (16 clients at once).
async fn throughput(db: &Db, label: &str) -> TestResult {
    let hosts = Hosts::default();
    let cp = control_plane(db, &hosts, Duration::from_secs(5)).await?;
    for w in ["wk_a", "wk_b", "wk_c"] {
        cp.register(w, 4096, 1 << 30, "k1").await?;
    }
    let org = fastvm_server::default_org(cp.state.store())
        .await?
        .ok_or("org")?;
    cp.state
        .store()
        .set_quota(
            org,
            QuotaPatch {
                vcpu: Some(1 << 40),
                memory_mib: Some(1 << 50),
                disk_gib: Some(1 << 40),
                ..Default::default()
            },
        )
        .await?;
    for round in 0..2 {
        let n = 600;
        let clients = 16;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for c in 0..clients {
            let router = cp.router.clone();
            let key = cp.key.clone();
            tasks.spawn(async move {
                let mut ok = 0u32;
                for _ in 0..(n / clients + usize::from(c < n % clients)) {
                    let req = Request::builder()
                        .method("POST")
                        .uri("/v1/vms")
                        .header("authorization", format!("Bearer {key}"))
                        .header("content-type", "application/json")
                        .body(Body::from(r#"{"machineType":"c1m2"}"#))
                        .map_err(|e| e.to_string())?;
                    let res = router
                        .clone()
                        .oneshot(req)
                        .await
                        .map_err(|e| e.to_string())?;
                    if res.status().is_success() {
                        ok += 1;
                    }
                }
                Ok::<_, String>(ok)
            });
        }
        let mut ok = 0;
        while let Some(r) = tasks.join_next().await {
            ok += r??;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "placement throughput ({label}, round {round}): {ok}/{n} launches in {secs:.2} s = {:.0} launches/s ({clients} clients, 3 fake workers)",
            f64::from(ok) / secs
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: run with --ignored --nocapture"]
async fn placement_throughput() -> TestResult {
    let db = Db::sqlite().await?;
    let r = throughput(&db, "SQLite").await;
    db.drop_db().await;
    r?;
    if let Some(db) = Db::pg().await? {
        let r = throughput(&db, "PostgreSQL").await;
        db.drop_db().await;
        r?;
    }
    Ok(())
}

/// PostgreSQL: a registration seen by one control plane drops the cached
/// handle of another at once (LISTEN/NOTIFY), well before the monitor's
/// next comparison of cache and table.
#[tokio::test]
async fn notify_invalidates_other_control_planes_postgres() -> TestResult {
    let Some(db) = Db::pg().await? else {
        return Ok(());
    };
    let r = async {
        let hosts = Hosts::default();
        let a = control_plane(&db, &hosts, Duration::from_secs(5)).await?;
        let b = control_plane(&db, &hosts, Duration::from_secs(5)).await?;
        let url = match &db {
            Db::Pg { url, .. } => url.clone(),
            Db::Sqlite(_) => return Err("not PostgreSQL".into()),
        };
        a.register("wk_a", 8, 65536, "k1").await?;
        let _monitor = fastvm_server::fleet::spawn_monitor(&b.state, Some(&url));
        let before = b.state.fleet().get("wk_a").await?;
        // Let the LISTEN connection come up and the monitor's first round pass.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(Arc::ptr_eq(&before, &b.state.fleet().get("wk_a").await?));
        a.register("wk_a", 8, 65536, "k1").await?;
        let started = Instant::now();
        let mut replaced = false;
        while started.elapsed() < Duration::from_millis(1500) {
            if !Arc::ptr_eq(&before, &b.state.fleet().get("wk_a").await?) {
                replaced = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        println!(
            "NOTIFY: the other control plane dropped its handle after {} ms",
            started.elapsed().as_millis()
        );
        assert!(replaced, "the other control plane kept its old handle");
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    db.drop_db().await;
    r
}

/// The TTL reaper of a cluster control plane fires VMs of every worker.
#[tokio::test]
async fn ttl_reaper_covers_every_worker() -> TestResult {
    let db = Db::sqlite().await?;
    let hosts = Hosts::default();
    let cp = control_plane(&db, &hosts, Duration::from_secs(5)).await?;
    for w in ["wk_a", "wk_b"] {
        cp.register(w, 8, 65536, "k1").await?;
    }
    let mut vms = Vec::new();
    for _ in 0..2 {
        let (status, v) = cp
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"machineType": "c1m2", "ttl": {"seconds": 1, "action": "delete"}})),
            )
            .await?;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        vms.push((
            cp.worker_of(&v).await?,
            v["id"].as_str().ok_or("id")?.parse::<VmId>()?,
        ));
    }
    assert_ne!(vms[0].0, vms[1].0, "one VM on each worker");
    let reaper = fastvm_server::spawn_ttl_reaper(&cp.state);
    let mut gone = false;
    for _ in 0..100 {
        if vms.iter().all(|(w, id)| hosts.get(w).was_deleted(*id)) {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    reaper.stop().await;
    assert!(gone, "the TTL deletes did not reach both workers");
    Ok(())
}

/// A single-host server lists its embedded worker and has nothing to drain.
#[tokio::test]
async fn embedded_worker_in_admin_list() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), None).await?;
    fastvm_server::bootstrap(&store, dir.path()).await?;
    let key = std::fs::read_to_string(dir.path().join("admin-api-key"))?
        .trim()
        .to_owned();
    let local = Hosts::default().get("local");
    let state = AppState::new(store, Arc::new(Handle(local)), Duration::from_secs(5));
    assert!(!state.fleet().is_cluster());
    let cp = Cp {
        router: fastvm_server::routes::router(state.clone()),
        state,
        key,
    };
    let (status, v) = cp.launch().await?;
    assert_eq!(status, StatusCode::CREATED, "{v}");
    assert_eq!(cp.worker_of(&v).await?, "local");
    let (status, list) = cp.call("GET", "/v1/admin/workers", None).await?;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["id"], json!("local"));
    assert_eq!(list[0]["address"], json!("embedded"));
    assert_eq!(list[0]["vmCount"], json!(1));
    let (status, _) = cp
        .call("POST", "/v1/admin/workers/local/drain", None)
        .await?;
    assert_eq!(status, StatusCode::CONFLICT);
    // Workers cannot register with a single-host server.
    let (status, _) = cp
        .call_as(
            SECRET,
            "POST",
            "/internal/v1/workers/register",
            Some(json!({
            "id": "wk_a", "address": "http://a:1",
            "info": {"cpus": 1, "memory_mib": 1, "disk_free_gib": 1, "qemu_build": "q",
                     "accel": "tcg", "cpu_model": "max", "compat_key": "k"}})),
        )
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    Ok(())
}

/// PostgreSQL: two control planes racing 20 snapshot captures against a
/// snapshot quota of 3 store exactly 3.
#[tokio::test]
async fn snapshot_quota_race_postgres() -> TestResult {
    let Some(db) = Db::pg().await? else {
        return Ok(());
    };
    let r = async {
        let hosts = Hosts::default();
        let a = control_plane(&db, &hosts, Duration::from_secs(5)).await?;
        let b = control_plane(&db, &hosts, Duration::from_secs(5)).await?;
        a.register("wk_a", 8, 65536, "k1").await?;
        let (_, vm) = a.launch().await?;
        let store = a.state.store();
        let org = fastvm_server::default_org(store).await?.ok_or("org")?;
        store
            .set_quota(
                org,
                QuotaPatch {
                    snapshot_count: Some(3),
                    ..Default::default()
                },
            )
            .await?;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..20 {
            let cp = if i % 2 == 0 { &a } else { &b };
            let (router, key, vm) = (cp.router.clone(), cp.key.clone(), vm["id"].clone());
            tasks.spawn(async move {
                let req = Request::builder()
                    .method("POST")
                    .uri("/v1/snapshots")
                    .header("authorization", format!("Bearer {key}"))
                    .header("content-type", "application/json")
                    .body(Body::from(json!({"vmId": vm}).to_string()))
                    .map_err(|e| e.to_string())?;
                let res = router.oneshot(req).await.map_err(|e| e.to_string())?;
                Ok::<_, String>(res.status())
            });
        }
        let mut ok = 0;
        while let Some(r) = tasks.join_next().await {
            let status = r??;
            if status.is_success() {
                ok += 1;
            } else {
                assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            }
        }
        let rows = store.list_snapshots(org).await?.len();
        println!("snapshot quota race: {ok} of 20 captures accepted (quota 3), {rows} rows");
        assert_eq!((ok, rows), (3, 3));
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    db.drop_db().await;
    r
}

/// A cluster control plane with an embedded worker that has a registration:
/// it takes new VMs like the remote workers, and the monitor keeps its row fresh.
#[tokio::test]
async fn embedded_worker_in_a_cluster() -> TestResult {
    let db = Db::sqlite().await?;
    let store = db.open().await?;
    let dir = tempfile::tempdir()?;
    fastvm_server::bootstrap(&store, dir.path()).await?;
    let key = std::fs::read_to_string(dir.path().join("admin-api-key"))?
        .trim()
        .to_owned();
    let hosts = Hosts::default();
    let local = hosts.get("local");
    let fleet = Fleet::cluster(store.clone(), SECRET, hosts.connector())
        .with_local(Arc::new(Handle(local.clone())))
        .with_local_registration(fastvm_server::store::WorkerRegistrationRow {
            id: String::new(),
            address: "embedded".into(),
            cpus: 8,
            memory_mib: 65536,
            disk_free_gib: 100,
            qemu_build: "10.0.2".into(),
            accel: "tcg".into(),
            cpu_model: "max".into(),
            compat_key: "k1".into(),
        });
    assert_eq!(fleet.register_local().await?, Some("local".to_owned()));
    let state = AppState::with_fleet(store, fleet, Duration::from_secs(5));
    let cp = Cp {
        router: fastvm_server::routes::router(state.clone()),
        state,
        key,
    };
    cp.register("wk_a", 8, 65536, "k1").await?;
    let mut on: HashMap<String, usize> = HashMap::new();
    for _ in 0..4 {
        let (status, v) = cp.launch().await?;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        *on.entry(cp.worker_of(&v).await?).or_default() += 1;
    }
    assert_eq!(on.get("local"), Some(&2), "{on:?}");
    assert_eq!(local.count(), 2);
    // The monitor heartbeats it: a cut before now leaves it ready.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let cut = fastvm_server::store::now_ms();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let lost = cp.state.monitor_round_with(cut).await?;
    assert_eq!(lost, vec!["wk_a".to_owned()]);
    let row = cp.state.store().get_worker("local").await?.ok_or("row")?;
    assert_eq!(row.status, fastvm_server::store::WorkerStatus::Ready);
    assert_eq!(row.vm_count, 2);
    Ok(())
}
