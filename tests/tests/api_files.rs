//! End-to-end tests of file transfer: presign, the signed staging URLs,
//! fetch (object -> guest over the agent channel) and export (guest ->
//! object), through a real server over one shared real guest.
//!
//! Server F caps uploads at 64 MiB (`staging.max_upload_bytes`) so the
//! over-cap tests stay cheap. Server G (no VM) proves the staging GC.

use fastvm_e2e::{assert_api_error, block_on, config, data_dir, json_call};
use fastvm_server::staging::token::{self, Claims, Method as TokenMethod};
use fastvm_server::{RunningServer, ServerConfig};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::LazyLock;
use std::time::Duration;

const CAP: u64 = 64 << 20;

struct Api {
    server: RunningServer,
    dir: PathBuf,
    key: String,
    client: Client,
}

fn server_config(dir: &Path) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir);
    cfg.runtime = config(dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    cfg.staging.max_upload_bytes = Some(CAP);
    cfg
}

fn start(name: &str, tweak: impl FnOnce(&mut ServerConfig)) -> Api {
    let dir = data_dir(name);
    let mut cfg = server_config(&dir);
    tweak(&mut cfg);
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
}

static F: LazyLock<Api> = LazyLock::new(|| start("files", |_| {}));

fn call(method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    call_as(&F.key, method, path, body)
}

fn call_as(key: &str, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let f = &*F;
    block_on(json_call(
        &f.client,
        format!("{}{path}", f.server.url()),
        Some(key),
        method,
        body,
    ))
}

static VM: LazyLock<String> = LazyLock::new(|| {
    let (status, vm) = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2", "name": "files"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    vm["id"].as_str().expect("id").to_owned()
});

fn sh(cmd: &str) -> Value {
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{}/exec", *VM),
        Some(json!({"command": ["sh", "-c", cmd]})),
    );
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

fn presign(path: &str) -> Value {
    let (status, p) = call(
        Method::POST,
        &format!("/v1/vms/{}/files/presign", *VM),
        Some(json!({"path": path})),
    );
    assert_eq!(status, StatusCode::OK, "{p}");
    p
}

fn put(url: &str, body: Vec<u8>) -> (StatusCode, Value) {
    block_on(async {
        let res = F
            .client
            .put(url)
            // Not pooled: a refused upload ends its connection (see bounds.rs).
            .header("connection", "close")
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .expect("put");
        let status = res.status();
        (
            status,
            serde_json::from_slice(&res.bytes().await.expect("body")).unwrap_or(Value::Null),
        )
    })
}

fn get(url: &str) -> (StatusCode, Vec<u8>) {
    block_on(async {
        let res = F.client.get(url).send().await.expect("get");
        (res.status(), res.bytes().await.expect("body").to_vec())
    })
}

fn fetch(url: &str, path: &str) -> (StatusCode, Value) {
    call(
        Method::POST,
        &format!("/v1/vms/{}/files/fetch", *VM),
        Some(json!({"url": url, "path": path, "timeoutSec": 300})),
    )
}

fn export(url: &str, path: &str) -> (StatusCode, Value) {
    call(
        Method::POST,
        &format!("/v1/vms/{}/files/export", *VM),
        Some(json!({"url": url, "path": path, "timeoutSec": 300})),
    )
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::Rng::fill(&mut rand::thread_rng(), &mut v[..]);
    v
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn secret(dir: &Path) -> Vec<u8> {
    hex::decode(
        std::fs::read_to_string(dir.join("staging.key"))
            .expect("staging.key")
            .trim(),
    )
    .expect("hex")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Upload `data` to `path` in the guest through presign + PUT + fetch.
fn upload(data: Vec<u8>, path: &str) {
    let p = presign(path);
    let (status, body) = put(p["uploadUrl"].as_str().expect("uploadUrl"), data);
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, out) = fetch(p["downloadUrl"].as_str().expect("downloadUrl"), path);
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exitCode"], 0, "{out}");
}

#[test]
fn presign_answers_spec_shape() {
    let p = presign("/root/x");
    assert_eq!(p["maxUploadBytes"], json!(CAP));
    assert!(p["expiresInSec"].as_u64().is_some_and(|s| s > 0));
    let up = p["uploadUrl"].as_str().expect("uploadUrl");
    assert!(
        up.starts_with(&format!("{}/v1/staging/", F.server.url())),
        "{up}"
    );
    assert_ne!(p["uploadUrl"], p["downloadUrl"]);
    assert_api_error(
        &call(
            Method::POST,
            &format!("/v1/vms/{}/files/presign", *VM),
            Some(json!({"path": "rel"})),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_PATH",
    );
}

#[test]
fn file_round_trip_is_byte_identical() {
    let data = random_bytes(5 << 20);
    let sum = sha256_hex(&data);
    upload(data.clone(), "/root/rt/deep/er/file.bin");
    let out = sh("sha256sum /root/rt/deep/er/file.bin");
    assert!(
        out["stdout"].as_str().is_some_and(|s| s.starts_with(&sum)),
        "{out}"
    );

    let p = presign("/root/rt/deep/er/file.bin");
    let (status, ex) = export(
        p["uploadUrl"].as_str().expect("u"),
        "/root/rt/deep/er/file.bin",
    );
    assert_eq!(status, StatusCode::OK, "{ex}");
    assert_eq!(ex, json!({"kind": "file", "sizeBytes": data.len()}));
    let (status, got) = get(p["downloadUrl"].as_str().expect("d"));
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "downloaded bytes differ");
    // The same downloadUrl serves the object again; an empty file works too.
    assert_eq!(
        get(p["downloadUrl"].as_str().expect("d")).1.len(),
        data.len()
    );
    upload(Vec::new(), "/root/rt/empty");
    assert_eq!(sh("stat -c %s /root/rt/empty")["stdout"], "0\n");
}

#[test]
fn directory_exports_as_tar_rooted_at_dot() {
    sh("rm -rf /root/tree && mkdir -p /root/tree/a/empty && echo hi > /root/tree/a/f && ln -s f /root/tree/a/link && chmod 751 /root/tree/a/f");
    let p = presign("/root/tree");
    let (status, ex) = export(p["uploadUrl"].as_str().expect("u"), "/root/tree");
    assert_eq!(status, StatusCode::OK, "{ex}");
    assert_eq!(ex["kind"], "directory");
    let (_, tar) = get(p["downloadUrl"].as_str().expect("d"));
    assert_eq!(ex["sizeBytes"], json!(tar.len()));
    // List it with the host's tar: every entry under ./, modes and the symlink kept.
    let mut child = std::process::Command::new("tar")
        .args(["-tvf", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("tar");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&tar)
        .expect("write tar");
    let mut listing = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut listing)
        .expect("read");
    assert!(child.wait().expect("tar").success());
    assert!(listing.lines().all(|l| l.contains(" ./")), "{listing}");
    assert!(
        listing.contains("-rwxr-x--x") && listing.contains("./a/f"),
        "{listing}"
    );
    assert!(listing.contains("./a/link -> f"), "{listing}");
    assert!(listing.contains("./a/empty/"), "{listing}");
}

#[test]
fn missing_path_is_file_not_found() {
    let p = presign("/nope");
    assert_api_error(
        &export(p["uploadUrl"].as_str().expect("u"), "/nope/not/here"),
        StatusCode::NOT_FOUND,
        "FILE_NOT_FOUND",
    );
}

#[test]
fn urls_are_checked() {
    let p = presign("/root/u");
    let (up, down) = (
        p["uploadUrl"].as_str().expect("u"),
        p["downloadUrl"].as_str().expect("d"),
    );
    // Wrong direction.
    assert_eq!(get(up).0, StatusCode::FORBIDDEN);
    let wrong = put(down, b"x".to_vec());
    assert_api_error(&wrong, StatusCode::FORBIDDEN, "SIGNED_URL_WRONG_METHOD");
    assert_api_error(
        &fetch(up, "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    assert_api_error(
        &export(down, "/root"),
        StatusCode::BAD_REQUEST,
        "INVALID_EXPORT_URL",
    );
    // Nothing uploaded yet.
    assert_api_error(
        &fetch(down, "/root/u"),
        StatusCode::NOT_FOUND,
        "STAGING_OBJECT_NOT_FOUND",
    );
    // Tampered signature and payload.
    let mut bad = down.to_owned();
    let last = bad.pop().expect("char");
    bad.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(get(&bad).0, StatusCode::FORBIDDEN);
    assert_api_error(
        &fetch(&bad, "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    let (_, sig) = down
        .rsplit_once('/')
        .expect("token")
        .1
        .split_once('.')
        .expect("dot");
    let forged = format!("{}/v1/staging/eyJrIjoiLi4vLi4veCJ9.{sig}", F.server.url());
    assert_api_error(
        &put(&forged, b"x".to_vec()),
        StatusCode::FORBIDDEN,
        "SIGNED_URL_INVALID",
    );
    // Not ours at all.
    assert_api_error(
        &fetch("http://example.invalid/file", "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    // Expired (signed with the server's own key, so only the expiry is wrong).
    let key = secret(&F.dir);
    let claims = |method, object: &str, org: &str| Claims {
        object: object.to_owned(),
        org: org.to_owned(),
        vm: VM.clone(),
        method,
        expires: unix_now() - 1,
        cap: CAP,
    };
    let org = default_org();
    let obj = uuid::Uuid::new_v4().to_string();
    let expired_put = format!(
        "{}/v1/staging/{}",
        F.server.url(),
        token::sign(&key, &claims(TokenMethod::Put, &obj, &org))
    );
    assert_api_error(
        &put(&expired_put, b"x".to_vec()),
        StatusCode::FORBIDDEN,
        "SIGNED_URL_EXPIRED",
    );
    let expired_get = format!(
        "{}/v1/staging/{}",
        F.server.url(),
        token::sign(&key, &claims(TokenMethod::Get, &obj, &org))
    );
    assert_api_error(
        &fetch(&expired_get, "/root/u"),
        StatusCode::BAD_REQUEST,
        "SIGNED_URL_EXPIRED",
    );
    // Traversal in a (validly signed) object name never becomes a path.
    let mut sneaky = claims(TokenMethod::Put, "../../../../tmp/evil", &org);
    sneaky.expires = unix_now() + 60;
    let sneaky_url = format!(
        "{}/v1/staging/{}",
        F.server.url(),
        token::sign(&key, &sneaky)
    );
    assert_api_error(
        &put(&sneaky_url, b"x".to_vec()),
        StatusCode::FORBIDDEN,
        "SIGNED_URL_INVALID",
    );
    assert_eq!(
        call(Method::PUT, "/v1/staging/..%2F..%2Fadmin-api-key", None).0,
        StatusCode::FORBIDDEN
    );
    // A URL minted for a VM of another org.
    let mut other = claims(TokenMethod::Get, &obj, &uuid::Uuid::new_v4().to_string());
    other.expires = unix_now() + 60;
    let other_url = format!(
        "{}/v1/staging/{}",
        F.server.url(),
        token::sign(&key, &other)
    );
    let res = fetch(&other_url, "/root/u");
    assert_api_error(&res, StatusCode::BAD_REQUEST, "INVALID_FETCH_URL");
    assert!(
        res.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("another org")),
        "{:?}",
        res.1
    );
}

fn default_org() -> String {
    block_on(async {
        fastvm_server::default_org(F.server.state().store())
            .await
            .expect("org")
            .expect("default org")
            .to_string()
    })
}

#[test]
fn other_org_cannot_presign_or_fetch_into_our_vm() {
    let store = F.server.state().store().clone();
    let key = block_on(async {
        let org = store
            .create_org(&format!("other-{}", uuid::Uuid::new_v4()))
            .await
            .expect("org");
        store
            .create_key_for(org, None, "k")
            .await
            .expect("key")
            .token
    });
    let p = presign("/root/o");
    assert_api_error(
        &call_as(
            &key,
            Method::POST,
            &format!("/v1/vms/{}/files/presign", *VM),
            Some(json!({"path": "/a"})),
        ),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    let body = json!({"url": p["downloadUrl"], "path": "/root/o"});
    assert_api_error(
        &call_as(
            &key,
            Method::POST,
            &format!("/v1/vms/{}/files/fetch", *VM),
            Some(body),
        ),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
}

#[test]
fn over_cap_uploads_are_refused_without_storing() {
    let p = presign("/root/big");
    let up = p["uploadUrl"].as_str().expect("u").to_owned();
    // A declared length over the cap: 413 before any body byte is read.
    let addr = F.server.addr();
    let path = &up[up.find("/v1/staging/").expect("path")..];
    let mut sock = std::net::TcpStream::connect(addr).expect("connect");
    write!(sock, "PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000000\r\nContent-Type: application/octet-stream\r\n\r\n").expect("write");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut head = [0u8; 64];
    let n = sock.read(&mut head).expect("read");
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // A chunked body crossing the cap: cut off, 413, no file left behind.
    let chunks = futures::stream::iter(
        (0..(CAP / (1 << 20) + 4))
            .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 1 << 20]))),
    );
    let status = block_on(async {
        F.client
            .put(&up)
            .body(reqwest::Body::wrap_stream(chunks))
            .send()
            .await
            .map(|r| r.status())
    });
    // The server may answer 413 and close while the client still sends.
    assert!(
        status
            .as_ref()
            .map_or(true, |s| *s == StatusCode::PAYLOAD_TOO_LARGE),
        "{status:?}"
    );
    let (status, _) = get(p["downloadUrl"].as_str().expect("d"));
    assert_eq!(status, StatusCode::NOT_FOUND);
    let staged = walk_files(&F.dir.join("staging"));
    assert!(staged.iter().all(|(_, size)| *size <= CAP), "{staged:?}");
    assert!(
        staged
            .iter()
            .all(|(p, _)| !p.to_string_lossy().contains(".part-")),
        "{staged:?}"
    );
    // Export of a guest file over the cap: 413, nothing stored.
    sh(&format!("head -c {} /dev/zero > /root/toobig", CAP + 1));
    let p = presign("/root/toobig");
    assert_api_error(
        &export(p["uploadUrl"].as_str().expect("u"), "/root/toobig"),
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
    );
    assert_eq!(
        get(p["downloadUrl"].as_str().expect("d")).0,
        StatusCode::NOT_FOUND
    );
    sh("rm -f /root/toobig");
}

fn walk_files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            match e.metadata() {
                Ok(m) if m.is_dir() => out.extend(walk_files(&p)),
                Ok(m) => out.push((p, m.len())),
                Err(_) => {}
            }
        }
    }
    out
}

#[test]
fn concurrent_transfers_to_one_vm() {
    let datas: Vec<Vec<u8>> = (0..4).map(|i| random_bytes((1 << 20) + i * 4099)).collect();
    let vm = VM.clone();
    block_on(async {
        let tasks = datas.iter().enumerate().map(|(i, data)| {
            let data = data.clone();
            let vm = vm.clone();
            async move {
                let f = &*F;
                let url = |p: &str| format!("{}{p}", f.server.url());
                let path = format!("/root/conc/{i}");
                let p: Value = f
                    .client
                    .post(url(&format!("/v1/vms/{vm}/files/presign")))
                    .bearer_auth(&f.key)
                    .json(&json!({"path": path}))
                    .send()
                    .await
                    .expect("presign")
                    .json()
                    .await
                    .expect("json");
                let res = f
                    .client
                    .put(p["uploadUrl"].as_str().expect("u"))
                    .body(data)
                    .send()
                    .await
                    .expect("put");
                assert_eq!(res.status(), StatusCode::OK);
                let out: Value = f
                    .client
                    .post(url(&format!("/v1/vms/{vm}/files/fetch")))
                    .bearer_auth(&f.key)
                    .json(&json!({"url": p["downloadUrl"], "path": path}))
                    .send()
                    .await
                    .expect("fetch")
                    .json()
                    .await
                    .expect("json");
                assert_eq!(out["exitCode"], 0, "{out}");
            }
        });
        futures::future::join_all(tasks).await;
    });
    let out = sh("cd /root/conc && sha256sum 0 1 2 3");
    let text = out["stdout"].as_str().expect("stdout");
    for (i, d) in datas.iter().enumerate() {
        assert!(text.contains(&format!("{}  {i}", sha256_hex(d))), "{text}");
    }
}

#[test]
fn fetch_to_an_unwritable_path_reports_the_failure() {
    // A fetch to a path the shell cannot create fails with the exec's result.
    let p = presign("/proc/nope");
    assert_eq!(
        put(p["uploadUrl"].as_str().expect("u"), b"abc".to_vec()).0,
        StatusCode::OK
    );
    let (status, out) = fetch(p["downloadUrl"].as_str().expect("d"), "/proc/nope/x");
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_ne!(out["exitCode"], 0, "{out}");
    assert!(!out["stderr"].as_str().unwrap_or("").is_empty(), "{out}");
}

#[test]
fn staging_gc_removes_old_objects() {
    let g = start("files-gc", |cfg| {
        cfg.staging.max_age = Duration::from_secs(2)
    });
    let key = secret(&g.dir);
    let claims = |method| Claims {
        object: uuid::Uuid::new_v4().to_string(),
        org: uuid::Uuid::new_v4().to_string(),
        vm: uuid::Uuid::new_v4().to_string(),
        method,
        expires: unix_now() + 600,
        cap: 100,
    };
    let put_c = claims(TokenMethod::Put);
    let get_c = Claims {
        method: TokenMethod::Get,
        ..put_c.clone()
    };
    let url = |c: &Claims| format!("{}/v1/staging/{}", g.server.url(), token::sign(&key, c));
    assert_eq!(put(&url(&put_c), b"hello".to_vec()).0, StatusCode::OK);
    assert_eq!(get(&url(&get_c)), (StatusCode::OK, b"hello".to_vec()));
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(get(&url(&get_c)).0, StatusCode::NOT_FOUND);
    assert!(walk_files(&g.dir.join("staging")).is_empty());
    block_on(g.server.stop()).expect("stop");
}

/// Issue 6: transfers move over the agent channel, so they work when the
/// VM's firewall denies all egress (and DNS) — proven first on a real packet.
#[test]
fn transfers_work_under_a_deny_all_egress_firewall() {
    let firewall = json!({"egress": {"defaultAction": "deny", "rules": []}, "dns": {"mode": "allow", "domains": []}});
    let (status, vm) = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2", "name": "files-denied", "firewall": firewall})),
    );
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().expect("id").to_owned();
    let vm_sh = |cmd: &str| -> Value {
        let (status, out) = call(
            Method::POST,
            &format!("/v1/vms/{id}/exec"),
            Some(json!({"command": ["sh", "-c", cmd], "timeoutSec": 60})),
        );
        assert_eq!(status, StatusCode::OK, "{out}");
        out
    };

    // A listener on the host, reachable from any VM under the default egress
    // allow (the host side of the VM's veth is gateway + 4): here refused.
    let listener = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let probe = format!(
        "gw=$(ip -4 route show default | awk '{{print $3}}'); host=$(python3 -c \"import ipaddress,sys; print(ipaddress.ip_address(sys.argv[1]) + 4)\" $gw); \
         curl -sS --max-time 5 -o /dev/null http://$host:{port}/ && echo reached || echo blocked"
    );
    let out = vm_sh(&probe);
    assert_eq!(
        out["stdout"], "blocked\n",
        "egress deny-all must block the host: {out}"
    );
    drop(listener);

    // Upload: PUT + fetch into the denied VM.
    let data = random_bytes(3 << 20);
    let p = presign("/root/denied/in.bin");
    assert_eq!(
        put(p["uploadUrl"].as_str().expect("u"), data.clone()).0,
        StatusCode::OK
    );
    let (status, res) = call(
        Method::POST,
        &format!("/v1/vms/{id}/files/fetch"),
        Some(json!({"url": p["downloadUrl"], "path": "/root/denied/in.bin", "timeoutSec": 120})),
    );
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(res["exitCode"], 0, "{res}");
    let sum = vm_sh("sha256sum /root/denied/in.bin");
    assert!(
        sum["stdout"]
            .as_str()
            .is_some_and(|s| s.starts_with(&sha256_hex(&data))),
        "{sum}"
    );

    // Download: export out of the denied VM + GET.
    let (status, p2) = call(
        Method::POST,
        &format!("/v1/vms/{id}/files/presign"),
        Some(json!({"path": "/root/denied/in.bin"})),
    );
    assert_eq!(status, StatusCode::OK, "{p2}");
    let (status, ex) = call(
        Method::POST,
        &format!("/v1/vms/{id}/files/export"),
        Some(json!({"url": p2["uploadUrl"], "path": "/root/denied/in.bin", "timeoutSec": 120})),
    );
    assert_eq!(status, StatusCode::OK, "{ex}");
    let (status, got) = get(p2["downloadUrl"].as_str().expect("d"));
    assert_eq!(status, StatusCode::OK);
    assert!(got == data, "downloaded bytes differ");

    let (status, _) = call(Method::DELETE, &format!("/v1/vms/{id}"), None);
    assert!(status.is_success(), "delete: {status}");
}
