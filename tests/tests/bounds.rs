//! End-to-end tests of what a guest or a client can make the server hold
//! (issue 17): real guests flooding exec streams nobody reads, the cap on
//! concurrent execs per VM, and the per-org cap on staged bytes.
//!
//! One server, two VMs (A floods, B answers and takes the concurrency test),
//! org staging cap 4 MiB and a 20 s object lifetime so expiry is quick. The
//! tests take turns (one lock): the memory test reads this process's RSS,
//! which any other test would move.

use fastvm_e2e::{assert_api_error, block_on, config, data_dir, json_call, rss_bytes};
use fastvm_server::{RunningServer, ServerConfig};
use futures::StreamExt;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

const ORG_CAP: u64 = 4 << 20;
const MAX_AGE: Duration = Duration::from_secs(20);

struct Api {
    server: RunningServer,
    dir: PathBuf,
    key: String,
    client: Client,
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }
}

static S: LazyLock<Api> = LazyLock::new(|| {
    let dir = data_dir("bounds");
    let mut cfg = ServerConfig::new(&dir);
    cfg.runtime = config(&dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    cfg.staging.org_cap_bytes = ORG_CAP;
    cfg.staging.max_age = MAX_AGE;
    let server = block_on(fastvm_server::start(cfg)).expect("start server");
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("admin key")
        .trim()
        .to_owned();
    Api {
        server,
        dir,
        key,
        client: Client::new(),
    }
});

static TURN: Mutex<()> = Mutex::new(());

fn call(method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let s = &*S;
    block_on(json_call(
        &s.client,
        s.url(path),
        Some(&s.key),
        method,
        body,
    ))
}

fn launch(name: &str) -> String {
    let (status, vm) = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2", "name": name})),
    );
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    vm["id"].as_str().expect("id").to_owned()
}

static A: LazyLock<String> = LazyLock::new(|| launch("flooder"));
static B: LazyLock<String> = LazyLock::new(|| launch("bystander"));

fn exec(vm: &str, cmd: &str) -> (StatusCode, Value) {
    call(
        Method::POST,
        &format!("/v1/vms/{vm}/exec"),
        Some(json!({"command": ["sh", "-c", cmd]})),
    )
}

fn exec_ok(vm: &str, cmd: &str) -> String {
    let (status, out) = exec(vm, cmd);
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exitCode"], json!(0), "{out}");
    out["stdout"].as_str().expect("stdout").to_owned()
}

/// Start an NDJSON exec and return its response once the exec is open.
async fn ndjson(vm: &str, cmd: &str) -> reqwest::Response {
    let s = &*S;
    // A client of its own: its connection ends when the response is dropped.
    let res = Client::new()
        .post(s.url(&format!("/v1/vms/{vm}/exec")))
        .bearer_auth(&s.key)
        .header("accept", "application/x-ndjson")
        .json(&json!({"command": ["sh", "-c", cmd]}))
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    res
}

#[test]
fn a_flood_nobody_reads_holds_bounded_memory_and_other_vms_answer() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let (a, b) = (A.clone(), B.clone());
    exec_ok(&a, "true");
    exec_ok(&b, "true");
    let rss_before = rss_bytes();
    // Four streams of `cat /dev/zero` as fast as the guest can: each read a
    // little (so the flood is on), then never again.
    let mut hogs = Vec::new();
    for _ in 0..4 {
        let res = block_on(ndjson(&a, "exec cat /dev/zero"));
        let mut body = res.bytes_stream();
        let mut got = 0usize;
        while got < 1 << 20 {
            let chunk = block_on(body.next())
                .expect("the flood flows")
                .expect("chunk");
            got += chunk.len();
        }
        hogs.push(body);
    }
    // Meanwhile the other VM, and the flooding VM itself on other streams,
    // keep answering; the server's memory stays put.
    let mut peak = 0u64;
    for i in 0..10 {
        assert_eq!(
            exec_ok(&b, &format!("echo b-$(({i}*2))")),
            format!("b-{}\n", i * 2)
        );
        assert_eq!(
            exec_ok(&a, &format!("echo a-$(({i}*3))")),
            format!("a-{}\n", i * 3)
        );
        peak = peak.max(rss_bytes().saturating_sub(rss_before));
        std::thread::sleep(Duration::from_millis(500));
    }
    // The floods are still there, blocked (not finished, not cut).
    let running = exec_ok(&a, "pgrep -xc cat || true");
    assert_eq!(
        running.trim(),
        "4",
        "the 4 floods run, blocked on their windows"
    );
    println!("flood test: server RSS grew by at most {peak} bytes over 4 unread floods");
    assert!(
        peak < 64 << 20,
        "the server grew by {peak} bytes while 4 floods were not read"
    );
    // Dropping the readers cancels the floods in the guest.
    drop(hogs);
    let deadline = Instant::now() + Duration::from_secs(60);
    while exec_ok(&a, "pgrep -xc cat || true").trim() != "0" {
        assert!(
            Instant::now() < deadline,
            "the floods outlived their clients"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_65th_concurrent_exec_of_a_vm_gets_429() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let b = B.clone();
    // Processes named `sleep` before (the guest may run its own).
    let sleeps = || exec_ok(&b, "pgrep -xc sleep || true").trim().to_owned();
    let baseline = sleeps();
    let mut open = Vec::new();
    for _ in 0..64 {
        open.push(block_on(ndjson(&b, "sleep 600")));
    }
    let (status, err) = exec(&b, "echo one-too-many");
    assert_api_error(
        &(status, err.clone()),
        StatusCode::TOO_MANY_REQUESTS,
        "TOO_MANY_EXECS",
    );
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("64")),
        "{err}"
    );
    // Streams count too: an NDJSON exec is refused the same way.
    let s = &*S;
    let res = block_on(
        s.client
            .post(s.url(&format!("/v1/vms/{b}/exec")))
            .bearer_auth(&s.key)
            .header("accept", "application/x-ndjson")
            .json(&json!({"command": ["true"]}))
            .send(),
    )
    .expect("send");
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    // Another VM is not affected.
    exec_ok(&A, "true");
    // One ends: there is room again.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, out) = exec(&b, "echo room");
        if status == StatusCode::OK {
            assert_eq!(out["stdout"], json!("room\n"));
            break;
        }
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{out}");
        assert!(
            Instant::now() < deadline,
            "the dropped exec never freed its place"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    // Every place comes back once the clients are gone: 64 open again, the
    // 65th is refused again.
    drop(open);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut again = Vec::new();
    while again.len() < 64 {
        let res = block_on(
            Client::new()
                .post(S.url(&format!("/v1/vms/{b}/exec")))
                .bearer_auth(&S.key)
                .header("accept", "application/x-ndjson")
                .json(&json!({"command": ["sleep", "600"]}))
                .send(),
        )
        .expect("send");
        if res.status() == StatusCode::OK {
            again.push(res);
        } else {
            assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
            assert!(
                Instant::now() < deadline,
                "only {} places came back after the clients left",
                again.len()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let (status, err) = exec(&b, "echo one-too-many");
    assert_api_error(
        &(status, err),
        StatusCode::TOO_MANY_REQUESTS,
        "TOO_MANY_EXECS",
    );
    drop(again);
    // And the guest's processes are gone, also those cancelled before the
    // agent had started them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let base: usize = baseline.parse().unwrap_or(0);
    loop {
        let left: usize = sleeps().parse().unwrap_or(usize::MAX);
        if left <= base {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} sleeps outlived their clients ({base} before)"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn presign(vm: &str, path: &str) -> Value {
    let (status, p) = call(
        Method::POST,
        &format!("/v1/vms/{vm}/files/presign"),
        Some(json!({"path": path})),
    );
    assert_eq!(status, StatusCode::OK, "{p}");
    p
}

fn put(url: &str, len: usize) -> (StatusCode, Value) {
    block_on(async {
        // Connection: close: a refused upload is answered before its body is
        // read, and the server then drops the connection; pooled, the next
        // request could go out on it and fail (hyper's IncompleteMessage).
        let res = S
            .client
            .put(url)
            .header("connection", "close")
            .header("content-type", "application/octet-stream")
            .body(vec![7u8; len])
            .send()
            .await
            .expect("put");
        let status = res.status();
        let body = res.bytes().await.expect("body");
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    })
}

/// Files under the staging dir (objects and partial uploads).
fn staged_files(dir: &Path) -> usize {
    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        if e.path().is_dir() {
                            walk(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join("staging"))
}

#[test]
fn staged_bytes_are_capped_per_org_until_they_expire() {
    let _turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    let b = B.clone();
    exec_ok(&b, "head -c 2097152 /dev/zero > /root/two");
    let before = staged_files(&S.dir);
    // 3 MiB of 4: stored.
    let first = presign(&b, "/root/in");
    let up = first["uploadUrl"].as_str().expect("uploadUrl");
    let (status, body) = put(up, 3 << 20);
    assert_eq!(status, StatusCode::OK, "{body}");
    // The same uploadUrl again: single-use.
    assert_api_error(&put(up, 10), StatusCode::CONFLICT, "UPLOAD_URL_USED");
    // 2 MiB more: over the org's cap, refused, nothing left behind.
    let second = presign(&b, "/root/in2");
    let up2 = second["uploadUrl"].as_str().expect("uploadUrl");
    assert_api_error(
        &put(up2, 2 << 20),
        StatusCode::TOO_MANY_REQUESTS,
        "STAGING_QUOTA_EXCEEDED",
    );
    // An export into the store counts the same.
    let third = presign(&b, "/root/out");
    assert_api_error(
        &call(
            Method::POST,
            &format!("/v1/vms/{b}/files/export"),
            Some(json!({"url": third["uploadUrl"], "path": "/root/two"})),
        ),
        StatusCode::TOO_MANY_REQUESTS,
        "STAGING_QUOTA_EXCEEDED",
    );
    assert_eq!(
        staged_files(&S.dir),
        before + 1,
        "only the first object is stored"
    );
    // Once the first object expires (GC), the same upload is accepted.
    let deadline = Instant::now() + MAX_AGE + Duration::from_secs(60);
    loop {
        let p = presign(&b, "/root/in3");
        let (status, body) = put(p["uploadUrl"].as_str().expect("u"), 2 << 20);
        if status == StatusCode::OK {
            break;
        }
        assert_api_error(
            &(status, body),
            StatusCode::TOO_MANY_REQUESTS,
            "STAGING_QUOTA_EXCEEDED",
        );
        assert!(
            Instant::now() < deadline,
            "the staged bytes never came back"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    // And an export fits again too (2 + 2 MiB).
    let p = presign(&b, "/root/out2");
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{b}/files/export"),
        Some(json!({"url": p["uploadUrl"], "path": "/root/two"})),
    );
    assert_eq!(status, StatusCode::OK, "{out}");
}
