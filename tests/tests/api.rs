//! End-to-end tests of the REST API: a real server (in this process, on an
//! ephemeral port) over real QEMU guests, driven with an HTTP client.
//!
//! Server A (shared by most tests, on the shared tokio runtime) has one
//! shared running VM; tests that change a VM's status launch their own (cheap
//! once A's golden snapshot exists). The restart test runs its own server B
//! on its own tokio runtime, which it drops to simulate a process exit.

use base64::Engine as _;
use fastvm_e2e::{assert_api_error, block_on, config, data_dir, json_call, process_gone};
use fastvm_server::{RunningServer, ServerConfig};
use futures::StreamExt;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

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

fn server_config(dir: &Path, launch_wait: Duration) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir);
    cfg.runtime = config(dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = launch_wait;
    cfg
}

fn admin_key(dir: &Path) -> String {
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("admin-api-key written at first start");
    key.trim().to_owned()
}

/// Server A: a generous launch wait, so launches answer 201.
static A: LazyLock<Api> = LazyLock::new(|| {
    let dir = data_dir("api");
    let server = block_on(fastvm_server::start(server_config(
        &dir,
        Duration::from_secs(300),
    )))
    .expect("start server A");
    let key = admin_key(&dir);
    Api {
        server,
        dir,
        key,
        client: Client::new(),
    }
});

fn call(method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let a = &*A;
    block_on(json_call(
        &a.client,
        a.url(path),
        Some(&a.key),
        method,
        body,
    ))
}

/// Launch a VM on A (201 expected) and return its JSON.
fn launch(body: Value) -> Value {
    let (status, vm) = call(Method::POST, "/v1/vms", Some(body));
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    assert_eq!(vm["status"], "running");
    vm
}

fn id_of(vm: &Value) -> String {
    vm["id"].as_str().expect("id").to_owned()
}

/// The shared VM of server A.
static VM: LazyLock<Value> = LazyLock::new(|| {
    let start = Instant::now();
    let vm = launch(json!({
        "machineType": "c1m2",
        "name": "  shared   vm ",
        "metadata": {"team": "api"},
        "envVars": {"GREETING": "hello api"},
        "firewall": {"egress": {"defaultAction": "deny", "rules": [{"kind": "cidr", "value": "10.0.0.0/8", "protocol": "tcp", "ports": "443", "action": "allow"}]}},
        "ttl": {"seconds": 3600, "action": "pause"},
    }));
    eprintln!("shared VM {} launched in {:?}", vm["id"], start.elapsed());
    vm
});

fn exec_json(vm: &str, command: &[&str]) -> Value {
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{vm}/exec"),
        Some(json!({"command": command})),
    );
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

fn sh(vm: &str, cmd: &str) -> Value {
    exec_json(vm, &["sh", "-c", cmd])
}

/// Start an NDJSON exec on A.
async fn ndjson(vm: &str, body: Value) -> reqwest::Response {
    let a = &*A;
    let res = a
        .client
        .post(a.url(&format!("/v1/vms/{vm}/exec")))
        .bearer_auth(&a.key)
        .header("accept", "application/x-ndjson")
        .json(&body)
        .send()
        .await
        .expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        res.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-ndjson")
    );
    res
}

/// Splits an NDJSON byte stream into parsed events.
struct Lines {
    stream: futures::stream::BoxStream<'static, reqwest::Result<Vec<u8>>>,
    buf: Vec<u8>,
}

impl Lines {
    fn new(res: reqwest::Response) -> Self {
        Lines {
            stream: res.bytes_stream().map(|c| c.map(|b| b.to_vec())).boxed(),
            buf: Vec::new(),
        }
    }

    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&line).expect("an ExecEvent line"));
            }
            match self.stream.next().await {
                Some(chunk) => self.buf.extend_from_slice(&chunk.expect("chunk")),
                None => {
                    assert!(self.buf.is_empty(), "trailing bytes without newline");
                    return None;
                }
            }
        }
    }
}

fn data(ev: &Value) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(ev["d"].as_str().expect("d"))
        .expect("base64")
}

fn qemu_pid(dir: &Path, vm: &str) -> u32 {
    let s = std::fs::read_to_string(dir.join("vms").join(vm).join("qemu.pid")).expect("qemu.pid");
    s.trim().parse().expect("pid")
}

// --- health, OpenAPI -----------------------------------------------------------

#[test]
fn health_and_openapi_need_no_key() {
    let a = &*A;
    let (status, body) = block_on(json_call(
        &a.client,
        a.url("/healthz"),
        None,
        Method::GET,
        None,
    ));
    assert_eq!((status, body), (StatusCode::OK, json!({"status": "ok"})));
    let (status, doc) = block_on(json_call(
        &a.client,
        a.url("/openapi.json"),
        None,
        Method::GET,
        None,
    ));
    assert_eq!(status, StatusCode::OK);
    assert!(doc["openapi"]
        .as_str()
        .is_some_and(|v| v.starts_with("3.1")));
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../openapi/fastvm.json"
        ))
        .expect("committed openapi"),
    )
    .expect("json");
    assert_eq!(
        doc, committed,
        "served /openapi.json differs from openapi/fastvm.json"
    );
}

// --- launch and the VM view ------------------------------------------------------

#[test]
fn launch_201_returns_every_vm_field() {
    let vm = &*VM;
    let mut keys: Vec<&str> = vm
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
            "cpu",
            "createdAt",
            "deletedAt",
            "diskGiB",
            "effectiveFirewall",
            "envVars",
            "expiresAtMs",
            "firewall",
            "id",
            "machineName",
            "memoryMiB",
            "metadata",
            "name",
            "orgId",
            "pausedAt",
            "publicIpv6",
            "sourceName",
            "status",
            "statusMessage",
            "ttl",
            "ttlRemainingMs",
            "volumes"
        ]
    );
    assert_eq!(vm["name"], "shared vm");
    assert_eq!(
        (
            &vm["machineName"],
            &vm["cpu"],
            &vm["memoryMiB"],
            &vm["diskGiB"]
        ),
        (&json!("c1m2"), &json!(1), &json!(2048), &json!(10))
    );
    assert_eq!(vm["metadata"], json!({"team": "api"}));
    assert_eq!(vm["envVars"], json!({"GREETING": "hello api"}));
    assert_eq!(
        (
            &vm["volumes"],
            &vm["bucketMounts"],
            &vm["deletedAt"],
            &vm["pausedAt"]
        ),
        (&json!([]), &json!([]), &json!(null), &json!(null))
    );
    // Every VM gets an address of the worker's IPv6 prefix (default fd00:fa57::/64).
    assert!(
        vm["publicIpv6"]
            .as_str()
            .is_some_and(|a| a.starts_with("fd00:fa57::")),
        "{}",
        vm["publicIpv6"]
    );
    // The stored policy comes back normalized; no services yet, so the effective one equals it.
    assert_eq!(vm["firewall"]["egress"]["defaultAction"], "deny");
    assert_eq!(vm["firewall"]["ingress"]["defaultAction"], "deny");
    assert_eq!(vm["firewall"]["dns"]["mode"], "deny");
    assert_eq!(vm["effectiveFirewall"], vm["firewall"]);
    assert_eq!(vm["ttl"], json!({"seconds": 3600, "action": "pause"}));
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let expires = vm["expiresAtMs"]
        .as_u64()
        .expect("expiresAtMs while running with a TTL");
    assert!(
        expires > now_ms && expires <= now_ms + 3_600_000,
        "{expires} vs {now_ms}"
    );
    assert_eq!(vm["ttlRemainingMs"], json!(null));
    assert!(vm["createdAt"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z') && t.contains('T')));
    // GET returns the same view.
    let (status, got) = call(Method::GET, &format!("/v1/vms/{}", id_of(vm)), None);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got["id"], vm["id"]);
    assert_eq!(got["orgId"], vm["orgId"]);
}

#[test]
fn list_filters_by_status() {
    let id = id_of(&VM);
    let ids = |path: &str| -> Vec<String> {
        let (status, list) = call(Method::GET, path, None);
        assert_eq!(status, StatusCode::OK, "{list}");
        list.as_array().expect("array").iter().map(id_of).collect()
    };
    assert!(ids("/v1/vms").contains(&id));
    assert!(ids("/v1/vms?status=running").contains(&id));
    assert!(!ids("/v1/vms?status=paused").contains(&id));
    assert!(ids("/v1/vms?status=hibernating").is_empty());
    assert!(ids("/v1/vms?status=Running").is_empty());
}

#[test]
fn launch_validation_errors() {
    assert_api_error(
        &call(Method::POST, "/v1/vms", Some(json!({}))),
        StatusCode::BAD_REQUEST,
        "INVALID_MACHINE_TYPE",
    );
    assert_api_error(
        &call(
            Method::POST,
            "/v1/vms",
            Some(json!({"machineType": "c3m7"})),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_MACHINE_TYPE",
    );
    let snap = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"snapshotId": "0b6a7c1e-1111-4222-8333-444455556666"})),
    );
    assert_api_error(&snap, StatusCode::NOT_FOUND, "NOT_FOUND");
    let meta = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2", "metadata": {"k": "v".repeat(5000)}})),
    );
    assert_api_error(&meta, StatusCode::BAD_REQUEST, "INVALID_METADATA");
    let env = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2", "envVars": {"1BAD": "x"}})),
    );
    assert_api_error(&env, StatusCode::BAD_REQUEST, "INVALID_ENV_VARS");
    let fw = call(
        Method::POST,
        "/v1/vms",
        Some(
            json!({"machineType": "c1m2", "firewall": {"ingress": {"defaultAction": "deny", "rules": [{"kind": "cidr", "value": "10.0.0.0", "protocol": "tcp", "ports": "22", "action": "allow"}]}}}),
        ),
    );
    assert_api_error(&fw, StatusCode::BAD_REQUEST, "INVALID_CIDR");
    let ttl = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2", "ttl": {"seconds": 0, "action": "delete"}})),
    );
    assert_api_error(&ttl, StatusCode::BAD_REQUEST, "INVALID_TTL");
    // None of these left a VM behind.
    let (_, list) = call(Method::GET, "/v1/vms?status=provisioning", None);
    assert_eq!(list, json!([]));
}

// --- exec ----------------------------------------------------------------------

#[test]
fn exec_json_collects_output() {
    let id = id_of(&VM);
    let out = sh(&id, "echo \"$GREETING\"; echo oops >&2; exit 3");
    assert_eq!(out["stdout"], "hello api\n");
    assert_eq!(out["stderr"], "oops\n");
    assert_eq!(out["exitCode"], 3);
    assert_eq!(
        (
            &out["timedOut"],
            &out["stdoutTruncated"],
            &out["stderrTruncated"]
        ),
        (&json!(false), &json!(false), &json!(false))
    );
    assert!(out["durationMs"].is_u64());
    // argv verbatim, cwd, per-exec env.
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{id}/exec"),
        Some(
            json!({"command": ["sh", "-c", "echo \"$X\" $1; pwd", "sh", "$HOME"], "env": {"X": "y"}, "cwd": "/tmp"}),
        ),
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(out["stdout"], "y $HOME\n/tmp\n");
    // Invalid UTF-8 is replaced, not an error.
    assert_eq!(sh(&id, "printf 'a\\377b'")["stdout"], "a\u{FFFD}b");
    // A program that cannot start: 127 and a diagnostic.
    let out = exec_json(&id, &["/no/such/program"]);
    assert_eq!(out["exitCode"], 127);
    assert!(
        out["stderr"]
            .as_str()
            .is_some_and(|s| s.contains("No such file")),
        "{out}"
    );
}

#[test]
fn exec_json_caps_at_4_mib() {
    let out = sh(&id_of(&VM), "yes | head -c 5000000; echo err >&2");
    assert_eq!(out["stdout"].as_str().map(str::len), Some(4 << 20));
    assert_eq!(out["stdoutTruncated"], true);
    assert_eq!(
        (&out["stderr"], &out["stderrTruncated"]),
        (&json!("err\n"), &json!(false))
    );
}

#[test]
fn exec_timeout() {
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{}/exec", id_of(&VM)),
        Some(json!({"command": ["sleep", "60"], "timeoutSec": 1})),
    );
    assert_eq!(status, StatusCode::OK);
    assert_eq!(out["timedOut"], true);
    assert_ne!(out["exitCode"], 0);
}

#[test]
fn exec_validation_errors() {
    let path = format!("/v1/vms/{}/exec", id_of(&VM));
    assert_api_error(
        &call(Method::POST, &path, Some(json!({"command": []}))),
        StatusCode::BAD_REQUEST,
        "INVALID_COMMAND",
    );
    assert_api_error(
        &call(
            Method::POST,
            &path,
            Some(json!({"command": ["ls"], "timeoutSec": 0})),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_TIMEOUT",
    );
    assert_api_error(
        &call(
            Method::POST,
            &path,
            Some(json!({"command": ["ls"], "cwd": "tmp"})),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_PATH",
    );
    assert_api_error(
        &call(Method::POST, &path, Some(json!({"command": "ls"}))),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    assert_api_error(
        &call(
            Method::POST,
            &path,
            Some(json!({"command": ["ls"], "timeout_sec": 5})),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
}

#[test]
fn exec_ndjson_streams_events() {
    let id = id_of(&VM);
    block_on(async {
        let res = ndjson(&id, json!({"command": ["sh", "-c", "printf out; printf err >&2; printf '\\000\\377'; exit 5"]})).await;
        let mut lines = Lines::new(res);
        let (mut stdout, mut stderr, mut exit) = (Vec::new(), Vec::new(), None);
        while let Some(ev) = lines.next().await {
            assert!(exit.is_none(), "event after the exit event: {ev}");
            match ev["t"].as_str() {
                Some("o") => stdout.extend(data(&ev)),
                Some("e") => stderr.extend(data(&ev)),
                Some("x") => exit = Some(ev),
                other => panic!("unknown event type {other:?}"),
            }
        }
        assert_eq!(stdout, b"out\0\xff");
        assert_eq!(stderr, b"err");
        let exit = exit.expect("an exit event");
        assert_eq!(
            (&exit["c"], &exit["to"], &exit["d"]),
            (&json!(5), &json!(false), &json!(""))
        );
        assert!(exit["ms"].is_u64());
    });
}

/// Output arrives as the process produces it: the first line is read while
/// the process still waits for a file that only a second exec creates.
#[test]
fn exec_ndjson_is_live() {
    let id = id_of(&VM);
    block_on(async {
        let cmd = "rm -f /tmp/go-live; echo first; while [ ! -e /tmp/go-live ]; do sleep 0.05; done; echo second";
        let mut lines =
            Lines::new(ndjson(&id, json!({"command": ["sh", "-c", cmd], "timeoutSec": 60})).await);
        let first = lines.next().await.expect("first event");
        assert_eq!(
            (first["t"].as_str(), data(&first)),
            (Some("o"), b"first\n".to_vec())
        );
        let a = &*A;
        let (status, _) = json_call(
            &a.client,
            a.url(&format!("/v1/vms/{id}/exec")),
            Some(&a.key),
            Method::POST,
            Some(json!({"command": ["touch", "/tmp/go-live"]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let second = lines.next().await.expect("second event");
        assert_eq!(data(&second), b"second\n");
        assert_eq!(lines.next().await.expect("exit")["c"], 0);
    });
}

/// A client that stops reading stops the guest process (the HTTP body is
/// backpressured end to end, so nothing piles up in the server), and a
/// client that goes away cancels it.
#[test]
fn exec_ndjson_backpressure_and_disconnect() {
    let id = id_of(&VM);
    let progress = || -> u64 {
        sh(&id, "cat /tmp/bp-chunks 2>/dev/null || echo 0")["stdout"]
            .as_str()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let cmd = "echo $$ > /tmp/bp-pid; i=0; while :; do head -c 65536 /dev/zero; i=$((i+1)); echo $i > /tmp/bp-chunks; done";
    let lines = block_on(async {
        let mut lines = Lines::new(ndjson(&id, json!({"command": ["sh", "-c", cmd]})).await);
        assert_eq!(lines.next().await.expect("first chunk")["t"], "o");
        lines
    });
    // The reader is stalled: the writer must come to a halt, with a bounded amount in flight.
    let mut last = progress();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = progress();
        if now == last {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest kept writing to a stalled client ({now} chunks)"
        );
        last = now;
    }
    eprintln!("stalled client: the guest stopped after {last} chunks of 64 KiB");
    assert!(
        last * 65536 < 64 << 20,
        "{last} chunks of 64 KiB in flight to a stalled client"
    );
    let pid = sh(&id, "cat /tmp/bp-pid")["stdout"]
        .as_str()
        .unwrap_or("")
        .trim()
        .to_owned();
    assert!(!pid.is_empty());
    // Dropping the response closes the connection: the process is cancelled.
    drop(lines);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let alive = sh(
            &id,
            &format!("kill -0 {pid} 2>/dev/null && echo alive || echo gone"),
        );
        if alive["stdout"] == "gone\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the exec kept running after its client went away"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

// --- auth and org isolation --------------------------------------------------------

#[test]
fn missing_or_bad_key_is_401() {
    let a = &*A;
    for key in [None, Some("fvm_0123"), Some("not-a-key")] {
        let res = block_on(json_call(
            &a.client,
            a.url("/v1/vms"),
            key,
            Method::GET,
            None,
        ));
        assert_api_error(&res, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    }
    let res = block_on(
        a.client
            .get(a.url("/v1/vms"))
            .header("authorization", "Basic Zm9vOmJhcg==")
            .send(),
    )
    .expect("send");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        res.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    // Auth comes before anything else: a bad body without a key is still 401.
    let res = block_on(
        a.client
            .post(a.url("/v1/vms"))
            .header("content-type", "application/json")
            .body("{")
            .send(),
    )
    .expect("send");
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
}

#[test]
fn another_orgs_key_gets_404() {
    let a = &*A;
    let id = id_of(&VM);
    let other_key = block_on(async {
        let store = a.server.state().store();
        let org = store.create_org("other-org").await.expect("org");
        store.create_key(org, "test").await.expect("key").token
    });
    let other = |method: Method, path: &str, body: Option<Value>| {
        block_on(json_call(
            &a.client,
            a.url(path),
            Some(&other_key),
            method,
            body,
        ))
    };
    for (method, path, body) in [
        (Method::GET, format!("/v1/vms/{id}"), None),
        (
            Method::PATCH,
            format!("/v1/vms/{id}"),
            Some(json!({"name": "mine"})),
        ),
        (Method::POST, format!("/v1/vms/{id}/pause"), None),
        (Method::POST, format!("/v1/vms/{id}/resume"), None),
        (
            Method::POST,
            format!("/v1/vms/{id}/exec"),
            Some(json!({"command": ["true"]})),
        ),
        (Method::DELETE, format!("/v1/vms/{id}"), None),
    ] {
        let res = other(method.clone(), &path, body);
        assert_api_error(&res, StatusCode::NOT_FOUND, "NOT_FOUND");
        assert!(
            !res.1.to_string().contains("shared vm"),
            "{method} {path} leaked data: {}",
            res.1
        );
    }
    let (status, list) = other(Method::GET, "/v1/vms", None);
    assert_eq!((status, list), (StatusCode::OK, json!([])));
    // The VM is untouched.
    let (status, vm) = call(Method::GET, &format!("/v1/vms/{id}"), None);
    assert_eq!(
        (status, &vm["status"], &vm["name"]),
        (StatusCode::OK, &json!("running"), &json!("shared vm"))
    );
    // A revoked key stops working.
    block_on(
        a.server
            .state()
            .store()
            .revoke_key(&fastvm_server::auth::token_prefix(&other_key)),
    )
    .expect("revoke");
    assert_api_error(
        &other(Method::GET, "/v1/vms", None),
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
    );
}

// --- malformed requests --------------------------------------------------------------

#[test]
fn malformed_requests_are_clear_4xx() {
    let a = &*A;
    let raw = |method: Method, path: &str, content_type: Option<&str>, body: Vec<u8>| {
        let mut req = a
            .client
            .request(method, a.url(path))
            .bearer_auth(&a.key)
            .body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let res = block_on(async {
            let res = req.send().await.expect("send");
            let status = res.status();
            (
                status,
                serde_json::from_slice::<Value>(&res.bytes().await.expect("body"))
                    .unwrap_or(Value::Null),
            )
        });
        res
    };
    let json_ct = Some("application/json");
    assert_api_error(
        &raw(
            Method::POST,
            "/v1/vms",
            json_ct,
            b"{\"machineType\": ".to_vec(),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_JSON",
    );
    assert_api_error(
        &raw(Method::POST, "/v1/vms", json_ct, Vec::new()),
        StatusCode::BAD_REQUEST,
        "INVALID_JSON",
    );
    assert_api_error(
        &raw(
            Method::POST,
            "/v1/vms",
            json_ct,
            b"{\"machineType\": 5}".to_vec(),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    let unknown = raw(
        Method::POST,
        "/v1/vms",
        json_ct,
        b"{\"machineType\": \"c1m2\", \"gpu\": true}".to_vec(),
    );
    assert_api_error(&unknown, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
    assert!(
        unknown.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("unknown field `gpu`")),
        "{}",
        unknown.1
    );
    assert_api_error(
        &raw(Method::POST, "/v1/vms", Some("text/plain"), b"{}".to_vec()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    assert_api_error(
        &raw(Method::POST, "/v1/vms", None, b"{}".to_vec()),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UNSUPPORTED_MEDIA_TYPE",
    );
    // Over 1 MiB: 413, whatever the JSON.
    let mut big = b"{\"machineType\": \"c1m2\", \"name\": \"".to_vec();
    big.extend(std::iter::repeat_n(b'x', 2 << 20));
    big.extend(b"\"}");
    assert_api_error(
        &raw(Method::POST, "/v1/vms", json_ct, big.clone()),
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
    );
    assert_api_error(
        &raw(
            Method::POST,
            &format!("/v1/vms/{}/exec", id_of(&VM)),
            json_ct,
            big,
        ),
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
    );
    // Ids that are not UUIDs, and well-formed ones that do not exist.
    for path in [
        "/v1/vms/not-a-uuid",
        "/v1/vms/123",
        "/v1/vms/%00",
        "/v1/vms/0b6a7c1e-1111-4222-8333-444455556666",
    ] {
        assert_api_error(
            &raw(Method::GET, path, None, Vec::new()),
            StatusCode::NOT_FOUND,
            "NOT_FOUND",
        );
    }
    assert_api_error(
        &raw(Method::POST, "/v1/vms/nope/pause", None, Vec::new()),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &raw(
            Method::POST,
            "/v1/vms/nope/exec",
            json_ct,
            b"{\"command\": [\"ls\"]}".to_vec(),
        ),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    // Unknown routes and methods answer in the same shape.
    assert_api_error(
        &raw(Method::GET, "/v1/nothing-here", None, Vec::new()),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &raw(
            Method::GET,
            &format!("/v1/vms/{}/nothing-here", id_of(&VM)),
            None,
            Vec::new(),
        ),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &raw(Method::DELETE, "/v1/vms", None, Vec::new()),
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
    );
    assert_api_error(
        &raw(Method::PUT, "/healthz", None, Vec::new()),
        StatusCode::METHOD_NOT_ALLOWED,
        "METHOD_NOT_ALLOWED",
    );
    // A malformed query.
    assert_api_error(
        &raw(
            Method::GET,
            "/v1/vms?status=running&status=paused",
            None,
            Vec::new(),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
}

// --- lifecycle of dedicated VMs on A ---------------------------------------------------

#[test]
fn patch_pause_resume_and_illegal_transitions() {
    let vm = launch(json!({"machineType": "c1m2", "name": "lifecycle"}));
    let id = id_of(&vm);
    let path = format!("/v1/vms/{id}");
    // PATCH: name normalized, metadata replaced, TTL set then removed.
    let (status, v) = call(
        Method::PATCH,
        &path,
        Some(
            json!({"name": "  new   name ", "metadata": {"a": "1"}, "ttl": {"seconds": 600, "action": "delete"}}),
        ),
    );
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (&v["name"], &v["metadata"], &v["ttl"]),
        (
            &json!("new name"),
            &json!({"a": "1"}),
            &json!({"seconds": 600, "action": "delete"})
        )
    );
    assert!(v["expiresAtMs"].is_u64());
    let (_, v) = call(Method::PATCH, &path, Some(json!({"name": ""})));
    assert_eq!(v["name"], format!("vm-{}", &id[..8]));
    assert_api_error(
        &call(Method::PATCH, &path, Some(json!({}))),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );
    assert_api_error(
        &call(Method::PATCH, &path, Some(json!({"status": "paused"}))),
        StatusCode::BAD_REQUEST,
        "INVALID_REQUEST",
    );

    // resume while running: 409 naming the status.
    let res = call(Method::POST, &format!("{path}/resume"), None);
    assert_api_error(&res, StatusCode::CONFLICT, "INVALID_STATE");
    assert!(
        res.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("running")),
        "{}",
        res.1
    );

    // pause: TTL frozen, pausedAt set; exec and a second pause refused.
    let (status, v) = call(Method::POST, &format!("{path}/pause"), None);
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(v["status"], "paused");
    assert!(v["pausedAt"].is_string());
    assert_eq!(v["expiresAtMs"], json!(null));
    assert!(
        v["ttlRemainingMs"]
            .as_u64()
            .is_some_and(|ms| ms <= 600_000 && ms > 500_000),
        "{v}"
    );
    let res = call(Method::POST, &format!("{path}/pause"), None);
    assert_api_error(&res, StatusCode::CONFLICT, "INVALID_STATE");
    assert!(
        res.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("paused")),
        "{}",
        res.1
    );
    assert_api_error(
        &call(
            Method::POST,
            &format!("{path}/exec"),
            Some(json!({"command": ["true"]})),
        ),
        StatusCode::CONFLICT,
        "INVALID_STATE",
    );
    let (_, listed) = call(Method::GET, "/v1/vms?status=paused", None);
    assert!(listed
        .as_array()
        .is_some_and(|l| l.iter().any(|v| v["id"] == json!(id))));

    // PATCH ttl null while paused clears the frozen budget.
    let (_, v) = call(Method::PATCH, &path, Some(json!({"ttl": null})));
    assert_eq!(
        (&v["ttl"], &v["ttlRemainingMs"], &v["status"]),
        (&json!(null), &json!(null), &json!("paused"))
    );

    // resume: running again, exec works, the guest kept its memory.
    let (status, v) = call(Method::POST, &format!("{path}/resume"), None);
    assert_eq!(status, StatusCode::OK, "{v}");
    assert_eq!(
        (&v["status"], &v["pausedAt"]),
        (&json!("running"), &json!(null))
    );
    assert_eq!(sh(&id, "echo back")["stdout"], "back\n");

    let (status, body) = call(Method::DELETE, &path, None);
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"id": id, "deleted": true}))
    );
}

#[test]
fn delete_kills_the_vm() {
    let vm = launch(json!({"machineType": "c1m2"}));
    let id = id_of(&vm);
    assert_eq!(vm["name"], format!("vm-{}", &id[..8]));
    let pid = qemu_pid(&A.dir, &id);
    assert!(!process_gone(pid));
    let (status, body) = call(Method::DELETE, &format!("/v1/vms/{id}"), None);
    assert_eq!(
        (status, body),
        (StatusCode::OK, json!({"id": id, "deleted": true}))
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_gone(pid) {
        assert!(
            Instant::now() < deadline,
            "QEMU {pid} still runs after DELETE"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!A.dir.join("vms").join(&id).exists());
    assert_api_error(
        &call(Method::GET, &format!("/v1/vms/{id}"), None),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &call(Method::DELETE, &format!("/v1/vms/{id}"), None),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    let (_, list) = call(Method::GET, "/v1/vms", None);
    assert!(!list
        .as_array()
        .is_some_and(|l| l.iter().any(|v| v["id"] == json!(id))));
}

#[test]
fn a_vm_whose_qemu_dies_is_stopped() {
    let vm = launch(json!({"machineType": "c1m2", "name": "doomed"}));
    let id = id_of(&vm);
    let pid = qemu_pid(&A.dir, &id);
    // SAFETY: kill has no memory preconditions; the pid is a QEMU this test launched.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, v) = call(Method::GET, &format!("/v1/vms/{id}"), None);
        assert_eq!(status, StatusCode::OK);
        if v["status"] == "stopped" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {} after its QEMU was killed",
            v["status"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, stopped) = call(Method::GET, "/v1/vms?status=stopped", None);
    assert!(stopped
        .as_array()
        .is_some_and(|l| l.iter().any(|v| v["id"] == json!(id))));
    let res = call(Method::POST, &format!("/v1/vms/{id}/pause"), None);
    assert_api_error(&res, StatusCode::CONFLICT, "INVALID_STATE");
    assert!(
        res.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("stopped")),
        "{}",
        res.1
    );
    assert_api_error(
        &call(
            Method::POST,
            &format!("/v1/vms/{id}/exec"),
            Some(json!({"command": ["true"]})),
        ),
        StatusCode::CONFLICT,
        "INVALID_STATE",
    );
    let (status, _) = call(Method::DELETE, &format!("/v1/vms/{id}"), None);
    assert_eq!(status, StatusCode::OK);
}

// --- 202 path and restart (own server) ----------------------------------------------

/// A short launch wait answers 202 (provisioning) and the VM becomes running;
/// a server restart (the old one's process gone) re-adopts it: status and
/// exec work again, and the guest kept its state.
#[test]
fn launch_202_then_restart_readopts() {
    let dir = data_dir("api-restart");
    let cfg = server_config(&dir, Duration::ZERO);
    let client_of = || Client::new();

    let rt_b = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime B");
    let id = rt_b.block_on(async {
        let server = fastvm_server::start(cfg.clone()).await.expect("start B");
        let key = admin_key(&dir);
        let client = client_of();
        let url = |p: &str| format!("{}{p}", server.url());
        let (status, vm) = json_call(
            &client,
            url("/v1/vms"),
            Some(&key),
            Method::POST,
            Some(json!({"machineType": "c1m2", "name": "survivor"})),
        )
        .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{vm}");
        assert_eq!(vm["status"], "provisioning");
        let id = id_of(&vm);
        let (_, listed) = json_call(
            &client,
            url("/v1/vms?status=provisioning"),
            Some(&key),
            Method::GET,
            None,
        )
        .await;
        assert!(
            listed
                .as_array()
                .is_some_and(|l| l.iter().any(|v| v["id"] == json!(id))),
            "{listed}"
        );
        // exec while provisioning: 409.
        let res = json_call(
            &client,
            url(&format!("/v1/vms/{id}/exec")),
            Some(&key),
            Method::POST,
            Some(json!({"command": ["true"]})),
        )
        .await;
        if res.0 != StatusCode::OK {
            assert_api_error(&res, StatusCode::CONFLICT, "INVALID_STATE");
        }
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let (status, v) = json_call(
                &client,
                url(&format!("/v1/vms/{id}")),
                Some(&key),
                Method::GET,
                None,
            )
            .await;
            assert_eq!(status, StatusCode::OK);
            match v["status"].as_str() {
                Some("running") => break,
                Some("provisioning") => {}
                other => panic!("unexpected status {other:?}: {v}"),
            }
            assert!(Instant::now() < deadline, "still provisioning");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (status, out) = json_call(
            &client,
            url(&format!("/v1/vms/{id}/exec")),
            Some(&key),
            Method::POST,
            Some(json!({"command": ["sh", "-c", "echo before > /root/marker; hostname"]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert_eq!(out["stdout"], format!("vm-{}\n", &id[..8]));
        server.stop().await.expect("graceful stop");
        id
    });
    // The old server's process is gone (its runtime and connections with it).
    drop(rt_b);
    let pid = qemu_pid(&dir, &id);
    assert!(!process_gone(pid), "shutdown must leave VMs running");

    let rt_c = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime C");
    rt_c.block_on(async {
        let server = fastvm_server::start(cfg).await.expect("restart");
        let key = admin_key(&dir);
        let client = client_of();
        let url = |p: &str| format!("{}{p}", server.url());
        let (status, vm) = json_call(
            &client,
            url(&format!("/v1/vms/{id}")),
            Some(&key),
            Method::GET,
            None,
        )
        .await;
        assert_eq!(
            (status, &vm["status"], &vm["name"]),
            (StatusCode::OK, &json!("running"), &json!("survivor"))
        );
        let (status, out) = json_call(
            &client,
            url(&format!("/v1/vms/{id}/exec")),
            Some(&key),
            Method::POST,
            Some(json!({"command": ["cat", "/root/marker"]})),
        )
        .await;
        assert_eq!(
            (status, &out["stdout"]),
            (StatusCode::OK, &json!("before\n")),
            "{out}"
        );
        let (status, _) = json_call(
            &client,
            url(&format!("/v1/vms/{id}")),
            Some(&key),
            Method::DELETE,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        server.stop().await.expect("stop");
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_gone(pid) {
        assert!(Instant::now() < deadline, "QEMU still runs after DELETE");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The admin key file is private to its owner.
#[test]
fn admin_key_file_is_0600() {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(A.dir.join("admin-api-key")).expect("key file");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(A.key.starts_with("fvm_"));
}
