//! End-to-end tests of snapshots over the REST API: a real server (in this
//! process, on an ephemeral port) over real QEMU guests.
//!
//! One server and one source VM are shared: the source writes a file and
//! starts a background counter, then is snapshotted once over HTTP (`SNAP`).
//! Tests restore that snapshot, or take their own snapshots of the source
//! (capturing never disturbs it), and delete the VMs they create.

use fastvm_e2e::{assert_api_error, block_on, config, data_dir, json_call};
use fastvm_server::{RunningServer, ServerConfig};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

struct Api {
    server: RunningServer,
    key: String,
    client: Client,
}

fn server_config(dir: &Path) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir);
    cfg.runtime = config(dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    cfg
}

static A: LazyLock<Api> = LazyLock::new(|| {
    let dir = data_dir("api-snapshots");
    let server = block_on(fastvm_server::start(server_config(&dir))).expect("start server");
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("admin-api-key")
        .trim()
        .to_owned();
    Api {
        server,
        key,
        client: Client::new(),
    }
});

async fn call_with(
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let a = &*A;
    json_call(
        &a.client,
        format!("{}{path}", a.server.url()),
        Some(key),
        method,
        body,
    )
    .await
}

fn call(method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    block_on(call_with(&A.key, method, path, body))
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().expect("id").to_owned()
}

/// `sh -c cmd` in a VM: (exit code, trimmed stdout).
fn sh(vm: &str, cmd: &str) -> (i64, String) {
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{vm}/exec"),
        Some(json!({"command": ["sh", "-c", cmd]})),
    );
    assert_eq!(status, StatusCode::OK, "{out}");
    (
        out["exitCode"].as_i64().expect("exitCode"),
        out["stdout"].as_str().expect("stdout").trim().to_owned(),
    )
}

fn counter(vm: &str) -> u64 {
    let (code, out) = sh(vm, "cat /tmp/counter");
    assert_eq!(code, 0, "no counter in {vm}");
    out.parse().expect("counter value")
}

/// Take a snapshot over HTTP (201 expected).
fn snapshot(body: Value) -> Value {
    let t = Instant::now();
    let (status, snap) = call(Method::POST, "/v1/snapshots", Some(body));
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    assert_eq!(snap["status"], "ready");
    eprintln!("snapshot {} taken in {:?}", snap["id"], t.elapsed());
    snap
}

/// Restore a snapshot over HTTP (201 and running expected).
fn restore(snapshot_id: &str, extra: Value) -> Value {
    let mut body = json!({"snapshotId": snapshot_id});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    let t = Instant::now();
    let (status, vm) = call(Method::POST, "/v1/vms", Some(body));
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["status"], "running");
    eprintln!("restored {} in {:?}", vm["id"], t.elapsed());
    vm
}

fn delete_vm(id: &str) {
    let (status, body) = call(Method::DELETE, &format!("/v1/vms/{id}"), None);
    assert_eq!(status, StatusCode::OK, "{body}");
}

/// The shared source VM, with a file written and a counter running.
static SOURCE: LazyLock<Value> = LazyLock::new(|| {
    let t = Instant::now();
    let (status, vm) = call(
        Method::POST,
        "/v1/vms",
        Some(
            json!({"machineType": "c1m2", "name": "source", "metadata": {"team": "snap"}, "envVars": {"SNAP_ENV": "from-source"}}),
        ),
    );
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    eprintln!("source VM {} launched in {:?}", vm["id"], t.elapsed());
    let setup = "echo payload > /root/file; sync; \
                 nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done' >/dev/null 2>&1 & \
                 sleep 1; cat /tmp/counter";
    let (code, out) = sh(&id_of(&vm), setup);
    assert_eq!(code, 0, "{out}");
    vm
});

/// The shared snapshot of the source, taken after its setup.
static SNAP: LazyLock<Value> =
    LazyLock::new(|| snapshot(json!({"vmId": SOURCE["id"], "name": "  shared \t  snap "})));

#[test]
fn snapshot_fields_name_rules_and_crud() {
    let (source, snap) = (&*SOURCE, &*SNAP);
    let mut keys: Vec<&str> = snap
        .as_object()
        .expect("object")
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
            &snap["vmId"],
            &snap["orgId"],
            &snap["machineName"]
        ),
        (
            &json!("shared snap"),
            &source["id"],
            &source["orgId"],
            &json!("c1m2")
        )
    );
    assert_eq!(
        (&snap["metadata"], &snap["envVars"], &snap["firewall"]),
        (
            &json!({"team": "snap"}),
            &json!({"SNAP_ENV": "from-source"}),
            &source["firewall"]
        )
    );
    assert_eq!(
        (&snap["services"], &snap["volumes"], &snap["bucketMounts"]),
        (&json!([]), &json!([]), &json!([]))
    );

    // Default name and truncation to 64 runes, on two more captures of the source.
    let source_id = id_of(source);
    let default = snapshot(json!({"vmId": source_id}));
    assert_eq!(
        default["name"],
        json!(format!("snapshot-{}", &source_id[..8]))
    );
    let long = snapshot(json!({"vmId": source_id, "name": format!("  {}  ", "ß".repeat(70))}));
    assert_eq!(long["name"], json!("ß".repeat(64)));

    // List (oldest first) and get.
    let (status, list) = call(Method::GET, "/v1/snapshots", None);
    assert_eq!(status, StatusCode::OK);
    let ids: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|s| s["id"].as_str())
        .collect();
    let (di, li) = (
        ids.iter().position(|i| *i == id_of(&default)),
        ids.iter().position(|i| *i == id_of(&long)),
    );
    assert!(
        ids.contains(&id_of(snap).as_str()) && di.is_some() && di < li,
        "{ids:?}"
    );
    assert_eq!(
        call(Method::GET, &format!("/v1/snapshots/{}", id_of(snap)), None),
        (StatusCode::OK, snap.clone())
    );

    // Rename: normalized; an empty name gives the default name.
    let path = format!("/v1/snapshots/{}", id_of(&long));
    let (status, renamed) = call(
        Method::PATCH,
        &path,
        Some(json!({"name": "  short \n name "})),
    );
    assert_eq!(
        (status, &renamed["name"], &renamed["id"]),
        (StatusCode::OK, &json!("short name"), &long["id"])
    );
    assert_eq!(call(Method::GET, &path, None).1["name"], "short name");
    assert_eq!(
        call(Method::PATCH, &path, Some(json!({"name": ""}))).1["name"],
        default["name"]
    );

    // Delete both; they are gone.
    for s in [&default, &long] {
        let path = format!("/v1/snapshots/{}", id_of(s));
        assert_eq!(
            call(Method::DELETE, &path, None),
            (StatusCode::OK, json!({"id": id_of(s), "deleted": true}))
        );
        assert_api_error(
            &call(Method::GET, &path, None),
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        );
        assert_api_error(
            &call(Method::DELETE, &path, None),
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        );
    }
    let (_, list) = call(Method::GET, "/v1/snapshots", None);
    assert!(!list
        .as_array()
        .expect("array")
        .iter()
        .any(|s| s["id"] == default["id"] || s["id"] == long["id"]));
    // The source kept running through all of it.
    let (status, vm) = call(Method::GET, &format!("/v1/vms/{source_id}"), None);
    assert_eq!((status, &vm["status"]), (StatusCode::OK, &json!("running")));
}

#[test]
fn restore_keeps_files_and_processes_and_clones_are_independent() {
    let snap = &*SNAP;
    let sid = id_of(snap);
    let a = restore(&sid, json!({"name": "clone a", "metadata": {"clone": "a"}}));
    let b = restore(
        &sid,
        json!({"machineType": "c1m2", "envVars": {"OWN": "b"}}),
    );
    let (ia, ib) = (id_of(&a), id_of(&b));
    // The VM view: shape and sourceName from the snapshot, the rest from the request.
    assert_eq!(
        (
            &a["name"],
            &a["sourceName"],
            &a["machineName"],
            &a["cpu"],
            &a["memoryMiB"],
            &a["diskGiB"]
        ),
        (
            &json!("clone a"),
            &json!("shared snap"),
            &json!("c1m2"),
            &json!(1),
            &json!(2048),
            &json!(10)
        )
    );
    assert_eq!(
        (&a["metadata"], &a["envVars"]),
        (&json!({"clone": "a"}), &json!({"SNAP_ENV": "from-source"}))
    );
    assert_eq!(
        (&b["envVars"], &b["metadata"], &b["sourceName"]),
        (&json!({"OWN": "b"}), &json!({}), &json!("shared snap"))
    );

    // The file written before the snapshot is there; the counter started
    // before it kept its value and still runs.
    assert_eq!(sh(&ia, "cat /root/file"), (0, "payload".to_owned()));
    let c1 = counter(&ia);
    assert!(c1 >= 5, "the counter restarted: {c1}");
    std::thread::sleep(Duration::from_millis(800));
    let c2 = counter(&ia);
    assert!(
        c2 > c1,
        "the background process is not running after the restore: {c1} -> {c2}"
    );
    // Env vars: the snapshot's unless the launch gave some; own hostnames.
    assert_eq!(sh(&ia, "echo \"$SNAP_ENV\""), (0, "from-source".to_owned()));
    assert_eq!(sh(&ib, "echo \"$OWN|$SNAP_ENV\""), (0, "b|".to_owned()));
    assert_eq!(sh(&ia, "hostname").1, format!("vm-{}", &ia[..8]));
    assert_eq!(sh(&ib, "hostname").1, format!("vm-{}", &ib[..8]));

    // Writes in one clone are invisible in the other and in the source.
    sh(&ia, "echo A > /root/x; sync");
    sh(&ib, "echo B > /root/x; sync");
    assert_eq!(sh(&ia, "cat /root/x").1, "A");
    assert_eq!(sh(&ib, "cat /root/x").1, "B");
    assert_eq!(
        sh(&id_of(&SOURCE), "cat /root/x").0,
        1,
        "a clone's write leaked into the source"
    );
    let (_, list) = call(Method::GET, "/v1/vms?status=running", None);
    assert!(list
        .as_array()
        .expect("array")
        .iter()
        .any(|v| v["id"] == a["id"]));
    delete_vm(&ia);
    delete_vm(&ib);
}

#[test]
fn deleting_a_snapshot_leaves_restored_vms_working() {
    let source = id_of(&SOURCE);
    let snap = snapshot(json!({"vmId": source, "name": "short-lived"}));
    let sid = id_of(&snap);
    let clone = restore(&sid, json!({}));
    let cid = id_of(&clone);
    assert_eq!(
        call(Method::DELETE, &format!("/v1/snapshots/{sid}"), None).0,
        StatusCode::OK
    );
    // The clone keeps working, reads and writes its disk.
    assert_eq!(
        sh(
            &cid,
            "cat /root/file; echo more > /root/more; sync; cat /root/more"
        ),
        (0, "payload\nmore".to_owned())
    );
    let c1 = counter(&cid);
    std::thread::sleep(Duration::from_millis(500));
    assert!(counter(&cid) > c1);
    // Launching from the deleted snapshot is a 404 and leaves nothing behind.
    assert_api_error(
        &call(Method::POST, "/v1/vms", Some(json!({"snapshotId": sid}))),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    let (status, vm) = call(Method::GET, &format!("/v1/vms/{cid}"), None);
    assert_eq!(
        (status, &vm["status"], &vm["sourceName"]),
        (StatusCode::OK, &json!("running"), &json!("short-lived"))
    );
    delete_vm(&cid);
}

#[test]
fn snapshot_of_a_paused_vm() {
    // A clone of the shared snapshot, so the shared source is never paused.
    let vm = restore(&id_of(&SNAP), json!({"name": "to pause"}));
    let id = id_of(&vm);
    sh(&id, "echo before-pause > /root/paused; sync");
    let (status, paused) = call(Method::POST, &format!("/v1/vms/{id}/pause"), None);
    assert_eq!(
        (status, &paused["status"]),
        (StatusCode::OK, &json!("paused"))
    );
    let snap = snapshot(json!({"vmId": id}));
    assert_eq!(snap["name"], json!(format!("snapshot-{}", &id[..8])));
    // The VM stays paused.
    let (_, now) = call(Method::GET, &format!("/v1/vms/{id}"), None);
    assert_eq!(
        (&now["status"], &now["pausedAt"]),
        (&json!("paused"), &paused["pausedAt"])
    );
    // Its restore runs, with the files and processes of the paused VM.
    let clone = restore(&id_of(&snap), json!({}));
    let cid = id_of(&clone);
    assert_eq!(clone["sourceName"], snap["name"]);
    assert_eq!(
        sh(&cid, "cat /root/paused /root/file"),
        (0, "before-pause\npayload".to_owned())
    );
    let c1 = counter(&cid);
    std::thread::sleep(Duration::from_millis(500));
    assert!(counter(&cid) > c1);
    // The paused VM resumes normally.
    let (status, resumed) = call(Method::POST, &format!("/v1/vms/{id}/resume"), None);
    assert_eq!(
        (status, &resumed["status"]),
        (StatusCode::OK, &json!("running"))
    );
    assert_eq!(sh(&id, "cat /root/paused").1, "before-pause");
    delete_vm(&cid);
    delete_vm(&id);
    assert_eq!(
        call(
            Method::DELETE,
            &format!("/v1/snapshots/{}", id_of(&snap)),
            None
        )
        .0,
        StatusCode::OK
    );
}

#[test]
fn another_orgs_key_gets_404() {
    let (source, snap) = (&*SOURCE, &*SNAP);
    let (vm, sid) = (id_of(source), id_of(snap));
    let other_key = block_on(async {
        let store = A.server.state().store();
        let org = store.create_org("snapshots-other-org").await.expect("org");
        store.create_key(org, "test").await.expect("key").token
    });
    let other = |method: Method, path: &str, body: Option<Value>| {
        block_on(call_with(&other_key, method, path, body))
    };
    for (method, path, body) in [
        (Method::GET, format!("/v1/snapshots/{sid}"), None),
        (
            Method::PATCH,
            format!("/v1/snapshots/{sid}"),
            Some(json!({"name": "mine"})),
        ),
        (Method::DELETE, format!("/v1/snapshots/{sid}"), None),
        (
            Method::POST,
            "/v1/snapshots".to_owned(),
            Some(json!({"vmId": vm})),
        ),
        (
            Method::POST,
            "/v1/vms".to_owned(),
            Some(json!({"snapshotId": sid})),
        ),
    ] {
        let res = other(method.clone(), &path, body);
        assert_api_error(&res, StatusCode::NOT_FOUND, "NOT_FOUND");
        assert!(
            !res.1.to_string().contains("shared snap"),
            "{method} {path} leaked data: {}",
            res.1
        );
    }
    assert_eq!(
        other(Method::GET, "/v1/snapshots", None),
        (StatusCode::OK, json!([]))
    );
    assert_eq!(
        other(Method::GET, "/v1/vms", None),
        (StatusCode::OK, json!([]))
    );
    // Untouched.
    let (status, got) = call(Method::GET, &format!("/v1/snapshots/{sid}"), None);
    assert_eq!(
        (status, &got["name"]),
        (StatusCode::OK, &json!("shared snap"))
    );
}

#[test]
fn snapshot_errors() {
    let sid = id_of(&SNAP);
    // Unknown, malformed and missing vmId.
    assert_api_error(
        &call(
            Method::POST,
            "/v1/snapshots",
            Some(json!({"vmId": "0b6a7c1e-1111-4222-8333-444455556666"})),
        ),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &call(Method::POST, "/v1/snapshots", Some(json!({"vmId": "vm-1"}))),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    assert_api_error(
        &call(Method::POST, "/v1/snapshots", Some(json!({"name": "x"}))),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    assert_api_error(
        &call(
            Method::POST,
            "/v1/snapshots",
            Some(json!({"vmId": sid, "vm_id": sid})),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    // Unknown snapshots and ids that are not UUIDs.
    assert_api_error(
        &call(
            Method::GET,
            "/v1/snapshots/0b6a7c1e-1111-4222-8333-444455556666",
            None,
        ),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &call(Method::GET, "/v1/snapshots/snp_123", None),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &call(
            Method::POST,
            "/v1/vms",
            Some(json!({"snapshotId": "0b6a7c1e-1111-4222-8333-444455556666"})),
        ),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    // Restoring as another machine type; renaming with nothing to rename.
    assert_api_error(
        &call(
            Method::POST,
            "/v1/vms",
            Some(json!({"snapshotId": sid, "machineType": "c2m4"})),
        ),
        StatusCode::BAD_REQUEST,
        "MACHINE_TYPE_MISMATCH",
    );
    assert_api_error(
        &call(
            Method::PATCH,
            &format!("/v1/snapshots/{sid}"),
            Some(json!({})),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    // None of these left a VM or a failed snapshot behind (other tests run
    // concurrently and launch VMs of their own, all c1m2).
    let (_, vms) = call(Method::GET, "/v1/vms", None);
    assert!(
        vms.as_array()
            .expect("array")
            .iter()
            .all(|v| v["machineName"] == "c1m2"),
        "{vms}"
    );
    let (_, snaps) = call(Method::GET, "/v1/snapshots", None);
    assert!(
        snaps
            .as_array()
            .expect("array")
            .iter()
            .all(|s| s["status"] != "error"),
        "{snaps}"
    );
}

#[test]
fn fork_makes_running_copies_with_fresh_identities() {
    let source = &*SOURCE;
    let vm = id_of(source);
    let (code, _) = sh(&vm, "echo forked-state > /dev/shm/f");
    assert_eq!(code, 0);
    let fork_path = format!("/v1/vms/{vm}/fork");
    // Bad input first: nothing is created.
    for count in [json!(0), json!(33)] {
        let res = call(Method::POST, &fork_path, Some(json!({ "count": count })));
        assert_api_error(&res, StatusCode::BAD_REQUEST, "INVALID_FORK_COUNT");
    }
    let res = call(Method::POST, &fork_path, Some(json!({"count": 1, "x": 1})));
    assert_eq!(res.0, StatusCode::BAD_REQUEST, "{}", res.1);
    let res = call(
        Method::POST,
        &format!("/v1/vms/{}/fork", uuid::Uuid::new_v4()),
        Some(json!({"count": 1})),
    );
    assert_api_error(&res, StatusCode::NOT_FOUND, "NOT_FOUND");

    let before = counter(&vm);
    let t = Instant::now();
    let (status, copies) = call(Method::POST, &fork_path, Some(json!({"count": 3})));
    assert_eq!(status, StatusCode::CREATED, "{copies}");
    eprintln!("fork of 3 in {:?}", t.elapsed());
    let copies = copies.as_array().expect("a list").clone();
    assert_eq!(copies.len(), 3);
    let mut hosts = vec![sh(&vm, "hostname").1];
    let mut ipv6 = vec![source["publicIpv6"].clone()];
    let mut macs = vec![sh(&vm, "cat /sys/class/net/eth0/address").1];
    for (i, c) in copies.iter().enumerate() {
        let id = id_of(c);
        assert_eq!(c["status"], "running", "{c}");
        assert_eq!(c["name"], format!("source-fork-{}", i + 1));
        assert_eq!(c["machineName"], "c1m2");
        assert_eq!(c["metadata"], json!({"team": "snap"}));
        assert_eq!(c["envVars"]["SNAP_ENV"], "from-source");
        // The source's memory (tmpfs) and processes, going on from where they were.
        assert_eq!(sh(&id, "cat /dev/shm/f"), (0, "forked-state".to_owned()));
        assert!(counter(&id) >= before, "the counter restarted in {id}");
        assert_eq!(sh(&id, "cat /root/file"), (0, "payload".to_owned()));
        hosts.push(sh(&id, "hostname").1);
        macs.push(sh(&id, "cat /sys/class/net/eth0/address").1);
        let (_, got) = call(Method::GET, &format!("/v1/vms/{id}"), None);
        ipv6.push(got["publicIpv6"].clone());
    }
    let distinct = |v: &Vec<String>| v.iter().collect::<std::collections::HashSet<_>>().len();
    assert_eq!(distinct(&hosts), 4, "hostnames {hosts:?}");
    assert_eq!(distinct(&macs), 4, "MACs {macs:?}");
    let ipv6: Vec<String> = ipv6.iter().map(|v| v.to_string()).collect();
    assert_eq!(distinct(&ipv6), 4, "public IPv6 {ipv6:?}");
    let random: Vec<String> = copies
        .iter()
        .map(|c| sh(&id_of(c), "head -c 16 /dev/urandom | od -An -tx1").1)
        .collect();
    assert_eq!(distinct(&random), 3, "copies share their random stream");
    // Copy-on-write: one copy's writes are its own.
    sh(&id_of(&copies[0]), "echo changed > /dev/shm/f");
    assert_eq!(sh(&id_of(&copies[1]), "cat /dev/shm/f").1, "forked-state");
    assert_eq!(sh(&vm, "cat /dev/shm/f").1, "forked-state");
    // The source keeps running; no hidden snapshot is left listed.
    assert!(counter(&vm) > before);
    let (_, snaps) = call(Method::GET, "/v1/snapshots", None);
    assert!(
        !snaps.to_string().contains("fork"),
        "a fork's snapshot is listed: {snaps}"
    );
    for c in &copies {
        delete_vm(&id_of(c));
    }

    // Quota: the copies are counted all at once, and nothing is created when they do not fit.
    let (org, key) = block_on(async {
        let store = A.server.state().store();
        let org = store.create_org("fork-quota-org").await.expect("org");
        let patch = fastvm_server::store::QuotaPatch {
            vcpu: Some(2),
            ..Default::default()
        };
        store.set_quota(org, patch).await.expect("quota");
        (org, store.create_key(org, "test").await.expect("key").token)
    });
    let other = |method: Method, path: &str, body: Option<Value>| {
        block_on(call_with(&key, method, path, body))
    };
    let (status, small) = other(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{small}");
    let small_id = id_of(&small);
    let res = other(
        Method::POST,
        &format!("/v1/vms/{small_id}/fork"),
        Some(json!({"count": 2})),
    );
    assert_api_error(&res, StatusCode::TOO_MANY_REQUESTS, "QUOTA_EXCEEDED_VCPU");
    let (_, list) = other(Method::GET, "/v1/vms", None);
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    // Another org cannot fork it.
    let res = call(
        Method::POST,
        &format!("/v1/vms/{small_id}/fork"),
        Some(json!({"count": 1})),
    );
    assert_api_error(&res, StatusCode::NOT_FOUND, "NOT_FOUND");
    let (status, one) = other(
        Method::POST,
        &format!("/v1/vms/{small_id}/fork"),
        Some(json!({"count": 1})),
    );
    assert_eq!(status, StatusCode::CREATED, "{one}");
    for id in [small_id, id_of(&one[0])] {
        let (status, body) = other(Method::DELETE, &format!("/v1/vms/{id}"), None);
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let _ = org;
}
