//! End-to-end tests of the S3 staging backend: a real S3-compatible server
//! (moto, from PyPI) started here, the real Fast VM server staging in it,
//! and one shared real guest.
//!
//! moto is found at `FASTVM_TEST_MOTO` (scripts/test points it at the venv's
//! `moto_server`), else `moto_server` on PATH. Without it the tests fail
//! when `CI` is set and are skipped (with a printed reason) otherwise.
//!
//! Server S caps uploads at 16 MiB; server G (no VM, its own key prefix)
//! proves the staging GC.

use fastvm_e2e::{
    assert_api_error, block_on, config, data_dir, json_call, moto_binary, start_moto, Moto,
};
use fastvm_server::staging::s3::{S3Config, S3Staging};
use fastvm_server::staging::{ObjectKey, StagingStore as _};
use fastvm_server::{RunningServer, ServerConfig};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::process::Command;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

const CAP: u64 = 16 << 20;
const BUCKET: &str = "fastvm-staging";

static MOTO: LazyLock<Option<Moto>> = LazyLock::new(|| start_moto("127.0.0.1", &[BUCKET]));

fn s3_config(endpoint: &str, prefix: &str) -> S3Config {
    S3Config {
        endpoint: Some(endpoint.to_owned()),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        access_key_id: "testing".into(),
        secret_access_key: "testing-secret".into(),
        prefix: prefix.into(),
    }
}

struct Api {
    server: RunningServer,
    key: String,
    client: Client,
    endpoint: String,
}

fn start(name: &str, prefix: &str, tweak: impl FnOnce(&mut ServerConfig)) -> Option<Api> {
    let endpoint = MOTO.as_ref()?.endpoint.clone();
    let dir: PathBuf = data_dir(name);
    let mut cfg = ServerConfig::new(&dir);
    cfg.runtime = config(&dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    cfg.staging.max_upload_bytes = Some(CAP);
    cfg.staging.s3 = Some(s3_config(&endpoint, prefix));
    tweak(&mut cfg);
    let server = block_on(fastvm_server::start(cfg)).expect("start server");
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("admin key")
        .trim()
        .to_owned();
    Some(Api {
        server,
        key,
        client: Client::new(),
        endpoint,
    })
}

static S: LazyLock<Option<Api>> = LazyLock::new(|| start("files-s3", "fastvm", |_| {}));

/// The shared server, or `None` (skip) when moto is missing outside CI.
fn s() -> Option<&'static Api> {
    S.as_ref()
}

fn call(method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let s = s().expect("server");
    block_on(json_call(
        &s.client,
        format!("{}{path}", s.server.url()),
        Some(&s.key),
        method,
        body,
    ))
}

static VM: LazyLock<String> = LazyLock::new(|| {
    let (status, vm) = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2", "name": "files-s3"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    vm["id"].as_str().expect("id").to_owned()
});

fn sh(cmd: &str) -> Value {
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{}/exec", *VM),
        Some(json!({"command": ["sh", "-c", cmd], "timeoutSec": 300})),
    );
    assert_eq!(status, StatusCode::OK, "{out}");
    out
}

/// (uploadUrl, downloadUrl) of a new staging object of the VM.
fn presign(path: &str) -> (String, String) {
    let (status, p) = call(
        Method::POST,
        &format!("/v1/vms/{}/files/presign", *VM),
        Some(json!({"path": path})),
    );
    assert_eq!(status, StatusCode::OK, "{p}");
    assert_eq!(p["maxUploadBytes"], json!(CAP));
    (
        p["uploadUrl"].as_str().expect("uploadUrl").to_owned(),
        p["downloadUrl"].as_str().expect("downloadUrl").to_owned(),
    )
}

fn put(url: &str, body: Vec<u8>) -> StatusCode {
    let s = s().expect("server");
    block_on(async {
        s.client
            .put(url)
            // Not pooled: a refused upload ends its connection (see bounds.rs).
            .header("connection", "close")
            .header("content-type", "application/octet-stream")
            .body(body)
            .send()
            .await
            .expect("put")
            .status()
    })
}

fn get(url: &str) -> (StatusCode, Vec<u8>) {
    let s = s().expect("server");
    block_on(async {
        let res = s.client.get(url).send().await.expect("get");
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

fn default_org() -> String {
    let s = s().expect("server");
    block_on(async {
        fastvm_server::default_org(s.server.state().store())
            .await
            .expect("org")
            .expect("default org")
            .to_string()
    })
}

/// A store with the server's credentials, to mint URLs the server did not.
fn same_credentials(prefix: &str) -> S3Staging {
    S3Staging::new(&s3_config(&s().expect("server").endpoint, prefix)).expect("S3 staging")
}

#[test]
fn presigned_urls_are_real_s3_urls() {
    let Some(s) = s() else { return };
    let (up, down) = presign("/root/p");
    for u in [&up, &down] {
        assert!(
            u.starts_with(&format!(
                "{}/{BUCKET}/fastvm/{}/{}/",
                s.endpoint,
                default_org(),
                *VM
            )),
            "{u}"
        );
        assert!(
            u.contains("X-Amz-Signature=") && u.contains("X-Amz-Expires=3600"),
            "{u}"
        );
    }
    assert_ne!(up, down);
}

#[test]
fn upload_then_fetch_round_trips() {
    if s().is_none() {
        return;
    }
    let data = random_bytes(3 << 20 | 123);
    let (up, down) = presign("/root/in/up.bin");
    assert_eq!(put(&up, data.clone()), StatusCode::OK);
    let (status, out) = fetch(&down, "/root/in/up.bin");
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exitCode"], 0, "{out}");
    let got = sh("sha256sum /root/in/up.bin | cut -d' ' -f1; stat -c %s /root/in/up.bin");
    assert_eq!(
        got["stdout"],
        json!(format!("{}\n{}\n", sha256_hex(&data), data.len())),
        "{got}"
    );
}

#[test]
fn export_then_download_round_trips() {
    if s().is_none() {
        return;
    }
    // 12 MiB + a tail: more than one multipart part.
    let out = sh(
        "head -c 12582977 /dev/urandom > /root/out.bin && sha256sum /root/out.bin | cut -d' ' -f1",
    );
    let want = out["stdout"].as_str().expect("sha").trim().to_owned();
    let (up, down) = presign("/root/out.bin");
    let (status, res) = export(&up, "/root/out.bin");
    assert_eq!(status, StatusCode::OK, "{res}");
    assert_eq!(res["kind"], json!("file"));
    assert_eq!(res["sizeBytes"], json!(12_582_977));
    let (status, body) = get(&down);
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), 12_582_977);
    assert_eq!(sha256_hex(&body), want);
    // An empty file exports as an empty object.
    sh(": > /root/empty");
    let (up, down) = presign("/root/empty");
    let (status, res) = export(&up, "/root/empty");
    assert_eq!(
        (status, res["sizeBytes"].clone()),
        (StatusCode::OK, json!(0)),
        "{res}"
    );
    assert_eq!(get(&down), (StatusCode::OK, Vec::new()));
}

#[test]
fn foreign_tampered_and_expired_urls_are_refused() {
    let Some(s) = s() else { return };
    let (up, down) = presign("/root/u");
    // Wrong direction.
    assert_api_error(
        &fetch(&up, "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    assert_api_error(
        &export(&down, "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_EXPORT_URL",
    );
    // Nothing uploaded yet.
    assert_api_error(
        &fetch(&down, "/root/u"),
        StatusCode::NOT_FOUND,
        "STAGING_OBJECT_NOT_FOUND",
    );
    // Tampered key (another object of this VM), signature, expiry.
    let object = down
        .split('?')
        .next()
        .and_then(|u| u.rsplit('/').next())
        .expect("object")
        .to_owned();
    let other_object = uuid::Uuid::new_v4().to_string();
    assert_api_error(
        &fetch(&down.replace(&object, &other_object), "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    assert_api_error(
        &export(&up.replace(&object, &other_object), "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_EXPORT_URL",
    );
    let flipped = if down.ends_with('0') { '1' } else { '0' };
    let sig_flipped = format!("{}{flipped}", &down[..down.len() - 1]);
    assert_api_error(
        &fetch(&sig_flipped, "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    assert_api_error(
        &fetch(
            &down.replace("X-Amz-Expires=3600", "X-Amz-Expires=7200"),
            "/root/u",
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    // Another bucket or endpoint, or not S3 at all.
    assert_api_error(
        &fetch(&down.replace(BUCKET, "other-bucket"), "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    assert_api_error(
        &fetch(&down.replace(&s.endpoint, "http://127.0.0.1:1"), "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    assert_api_error(
        &fetch(&format!("{}/v1/staging/abc.def", s.server.url()), "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    // Validly signed for another VM (export) or another org (fetch).
    let mint = same_credentials("fastvm");
    let org = default_org();
    let other_vm = ObjectKey {
        org: org.clone(),
        vm: uuid::Uuid::new_v4().to_string(),
        object: uuid::Uuid::new_v4().to_string(),
    };
    let urls = block_on(mint.presign(&other_vm, CAP, Duration::from_secs(600))).expect("presign");
    assert_api_error(
        &export(&urls.upload_url, "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_EXPORT_URL",
    );
    let other_org = ObjectKey {
        org: uuid::Uuid::new_v4().to_string(),
        vm: VM.clone(),
        object: uuid::Uuid::new_v4().to_string(),
    };
    let urls = block_on(mint.presign(&other_org, CAP, Duration::from_secs(600))).expect("presign");
    let res = fetch(&urls.download_url, "/root/u");
    assert_api_error(&res, StatusCode::BAD_REQUEST, "INVALID_FETCH_URL");
    assert!(
        res.1["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("another org")),
        "{:?}",
        res.1
    );
    // Outside the configured prefix.
    let outside = same_credentials("elsewhere");
    let ours = ObjectKey {
        org: org.clone(),
        vm: VM.clone(),
        object: uuid::Uuid::new_v4().to_string(),
    };
    let urls = block_on(outside.presign(&ours, CAP, Duration::from_secs(600))).expect("presign");
    assert_api_error(
        &fetch(&urls.download_url, "/root/u"),
        StatusCode::BAD_REQUEST,
        "INVALID_FETCH_URL",
    );
    // Expired: signed with the right credentials for 1 s.
    let urls = block_on(mint.presign(&ours, CAP, Duration::from_secs(1))).expect("presign");
    std::thread::sleep(Duration::from_secs(3));
    assert_api_error(
        &fetch(&urls.download_url, "/root/u"),
        StatusCode::BAD_REQUEST,
        "SIGNED_URL_EXPIRED",
    );
    assert_api_error(
        &export(&urls.upload_url, "/root"),
        StatusCode::BAD_REQUEST,
        "SIGNED_URL_EXPIRED",
    );
}

#[test]
fn over_cap_objects_are_refused() {
    if s().is_none() {
        return;
    }
    // A presigned PUT cannot be capped: S3 stores it, fetch refuses it.
    let (up, down) = presign("/root/big");
    assert_eq!(put(&up, vec![7u8; (CAP + 1) as usize]), StatusCode::OK);
    let res = fetch(&down, "/root/big");
    assert_api_error(&res, StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE");
    assert_eq!(sh("test -e /root/big; echo $?")["stdout"], json!("1\n"));
    // Export stops at the cap and leaves no object.
    sh(&format!("head -c {} /dev/zero > /root/big2", CAP + 1));
    let (up, down) = presign("/root/big2");
    assert_api_error(
        &export(&up, "/root/big2"),
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
    );
    assert_eq!(get(&down).0, StatusCode::NOT_FOUND);
}

#[test]
fn staging_gc_deletes_old_objects() {
    let Some(g) = start("files-s3-gc", "gc-test", |cfg| {
        cfg.staging.max_age = Duration::from_secs(2)
    }) else {
        return;
    };
    let mint = S3Staging::new(&s3_config(&g.endpoint, "gc-test")).expect("S3 staging");
    let key = ObjectKey {
        org: uuid::Uuid::new_v4().to_string(),
        vm: uuid::Uuid::new_v4().to_string(),
        object: uuid::Uuid::new_v4().to_string(),
    };
    let urls = block_on(mint.presign(&key, 100, Duration::from_secs(600))).expect("presign");
    let client = Client::new();
    assert_eq!(
        block_on(client.put(&urls.upload_url).body("hello").send())
            .expect("put")
            .status(),
        StatusCode::OK
    );
    let got = block_on(async {
        client
            .get(&urls.download_url)
            .send()
            .await
            .expect("get")
            .bytes()
            .await
            .expect("body")
    });
    assert_eq!(&got[..], b"hello");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let status = block_on(client.get(&urls.download_url).send())
            .expect("get")
            .status();
        if status == StatusCode::NOT_FOUND {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the object outlived max_age by 30 s (GET: {status})"
        );
    }
    block_on(g.server.stop()).expect("stop");
}

/// The `fastvm` client binary: `FASTVM_BIN`, else `<repo>/target/release/fastvm`
/// (scripts/test builds it first). Missing: fail under `CI`, skip otherwise.
fn fastvm_binary() -> Option<PathBuf> {
    let bin = std::env::var_os("FASTVM_BIN").map_or_else(
        || {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../target/release/fastvm"
            ))
        },
        PathBuf::from,
    );
    if bin.is_file() {
        return Some(bin);
    }
    let why = format!(
        "{} not found (cargo build --release -p fastvm-cli, or set FASTVM_BIN)",
        bin.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}; CI is set, so this is a failure");
    }
    eprintln!("skipping the `fastvm cp` S3 test: {why}");
    None
}

/// A tree with what makes tar sizes tricky: names over 100 bytes (GNU
/// long-name / pax headers), a long symlink target, empty files and
/// directories, modes, non-ASCII names, a file over a multipart-free size.
fn tricky_tree(root: &std::path::Path) {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let deep = root.join("d".repeat(90)).join("e".repeat(60));
    std::fs::create_dir_all(&deep).expect("mkdir");
    std::fs::write(deep.join("f".repeat(200)), random_bytes(70_000)).expect("long name");
    std::fs::write(root.join("big.bin"), random_bytes(3 << 20 | 77)).expect("big");
    std::fs::write(root.join("empty"), b"").expect("empty");
    std::fs::write(root.join("exact512"), random_bytes(512)).expect("512");
    std::fs::write(root.join("w".repeat(99)), b"99 + ./ = 101").expect("99");
    std::fs::create_dir(root.join("empty dir")).expect("empty dir");
    std::fs::write(root.join("naïve – 日本語.txt"), "non-ascii").expect("utf8");
    let exe = root.join("run.sh");
    std::fs::write(&exe, "#!/bin/sh\n").expect("exe");
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    symlink("empty", root.join("link")).expect("symlink");
    symlink("z".repeat(150), root.join("dangling-long-link")).expect("long symlink");
}

/// Type, mode, name, symlink target and content hash of every entry, sorted:
/// the same script runs locally and in the VM.
const LISTING: &str = "cd \"$1\" && { find . -mindepth 1 -printf '%y %m %p -> %l\\n'; find . -type f -exec sha256sum {} +; } | LC_ALL=C sort";

fn local_listing(dir: &std::path::Path) -> String {
    let out = Command::new("sh")
        .args(["-c", LISTING, "sh"])
        .arg(dir)
        .output()
        .expect("local find");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8")
}

fn vm_listing(dir: &str) -> String {
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{}/exec", *VM),
        Some(json!({"command": ["sh", "-c", LISTING, "sh", dir], "timeoutSec": 300})),
    );
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exitCode"], 0, "{out}");
    out["stdout"].as_str().expect("stdout").to_owned()
}

fn fastvm_cp(bin: &std::path::Path, src: &str, dst: &str) {
    let s = s().expect("server");
    let out = Command::new(bin)
        .args(["cp", "--quiet", src, dst])
        .env("FASTVM_BASE_URL", s.server.url())
        .env("FASTVM_API_KEY", &s.key)
        .output()
        .expect("fastvm cp");
    assert!(
        out.status.success(),
        "fastvm cp {src} {dst}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Directory uploads PUT a tar sized before streaming (Content-Length), which
/// S3 presigned PUTs require; before, moto stored an empty object.
#[test]
fn directory_round_trips_through_s3_with_fastvm_cp() {
    if s().is_none() {
        return;
    }
    let Some(bin) = fastvm_binary() else { return };
    let tmp = tempfile::tempdir().expect("tmp");
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).expect("src");
    tricky_tree(&src);
    let want = local_listing(&src);
    assert!(
        want.contains(&"f".repeat(200)) && want.contains("naïve"),
        "{want}"
    );
    fastvm_cp(
        &bin,
        src.to_str().expect("path"),
        &format!("{}:/root/cp dir", *VM),
    );
    assert_eq!(vm_listing("/root/cp dir"), want);
    // Back through export (multipart upload to S3) and the checked extraction.
    let back = tmp.path().join("back");
    fastvm_cp(
        &bin,
        &format!("{}:/root/cp dir", *VM),
        back.to_str().expect("path"),
    );
    assert_eq!(local_listing(&back), want);
    // The Python SDK's upload (sync) makes the same archive, when its venv is at hand.
    let python = moto_binary()
        .and_then(|m| m.parent().map(|d| d.join("python3")))
        .filter(|p| p.is_file());
    let Some(python) = python else {
        eprintln!("skipping the SDK part: no venv python next to moto_server");
        return;
    };
    let s = s().expect("server");
    let script = "import sys; from fastvm import FastvmClient; FastvmClient(base_url=sys.argv[1], api_key=sys.argv[2]).upload(sys.argv[3], sys.argv[4], '/root/sdk dir')";
    let out = Command::new(&python)
        .args(["-c", script, &s.server.url(), &s.key, VM.as_str()])
        .arg(&src)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "SDK upload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(vm_listing("/root/sdk dir"), want);
}
