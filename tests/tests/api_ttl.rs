//! End-to-end test of TTL auto-actions over the REST API: a real server (in
//! this process, on an ephemeral port, with its TTL reaper) over real QEMU
//! guests. Two VMs with a 2 s TTL: `pause` ends paused (QEMU stopped but
//! alive, then resumable and usable), `delete` ends gone (QEMU killed).

use fastvm_e2e::{block_on, config, data_dir, process_gone};
use fastvm_server::ServerConfig;
use fastvm_types::VmId;
use fastvm_worker::VmState;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn qemu_pid(dir: &Path, vm: &str) -> u32 {
    let s = std::fs::read_to_string(dir.join("vms").join(vm).join("qemu.pid")).expect("qemu.pid");
    s.trim().parse().expect("pid")
}

#[test]
fn ttl_pause_and_delete_fire_on_real_vms() {
    let dir = data_dir("api-ttl");
    let mut cfg = ServerConfig::new(&dir);
    cfg.runtime = config(&dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    let server = block_on(fastvm_server::start(cfg)).expect("start server");
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("admin-api-key")
        .trim()
        .to_owned();
    let client = Client::new();
    let call = |method: Method, path: &str, body: Option<Value>| -> (StatusCode, Value) {
        block_on(async {
            let mut req = client
                .request(method, format!("{}{path}", server.url()))
                .bearer_auth(&key);
            if let Some(b) = body {
                req = req.json(&b);
            }
            let res = req.send().await.expect("send");
            let status = res.status();
            let bytes = res.bytes().await.expect("body");
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        })
    };

    let launch = |action: &str| -> (String, i64) {
        let (status, vm) = call(
            Method::POST,
            "/v1/vms",
            Some(json!({"machineType": "c1m2", "ttl": {"seconds": 2, "action": action}})),
        );
        assert_eq!(status, StatusCode::CREATED, "{vm}");
        let id = vm["id"].as_str().expect("id").to_owned();
        (
            id,
            vm["expiresAtMs"]
                .as_i64()
                .expect("expiresAtMs while running"),
        )
    };
    let (paused, paused_deadline) = launch("pause");
    let (deleted, deleted_deadline) = launch("delete");
    let deleted_pid = qemu_pid(&dir, &deleted);

    // Each fires within a second of its deadline.
    let wait = |id: &str, want: &str, deadline: i64| {
        let give_up = Instant::now()
            + Duration::from_millis(u64::try_from(deadline + 3000 - now_ms()).unwrap_or(0));
        loop {
            let (status, vm) = call(Method::GET, &format!("/v1/vms/{id}"), None);
            let done = match want {
                "gone" => status == StatusCode::NOT_FOUND,
                s => vm["status"] == json!(s),
            };
            if done {
                let at = now_ms();
                assert!(
                    at <= deadline + 1500,
                    "{id} became {want} at {at}, deadline {deadline}"
                );
                return vm;
            }
            assert!(Instant::now() < give_up, "{id} never became {want}: {vm}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let vm = wait(&paused, "paused", paused_deadline);
    assert_eq!(
        (&vm["expiresAtMs"], &vm["ttlRemainingMs"]),
        (&json!(null), &json!(2000))
    );
    wait(&deleted, "gone", deleted_deadline);

    // The paused VM's QEMU is alive and really stopped; the deleted one's is gone.
    let pid = qemu_pid(&dir, &paused);
    assert!(!process_gone(pid));
    let vm_id: VmId = paused.parse().expect("uuid");
    assert_eq!(
        block_on(
            server
                .state()
                .local_worker()
                .expect("embedded worker")
                .state(vm_id)
        )
        .expect("state"),
        Some(VmState::Paused)
    );
    let (status, err) = call(
        Method::POST,
        &format!("/v1/vms/{paused}/exec"),
        Some(json!({"command": ["true"]})),
    );
    assert_eq!(
        (status, &err["error"]["code"]),
        (StatusCode::CONFLICT, &json!("INVALID_STATE"))
    );
    let give_up = Instant::now() + Duration::from_secs(10);
    while !process_gone(deleted_pid) {
        assert!(
            Instant::now() < give_up,
            "QEMU {deleted_pid} still runs after the TTL delete"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Resumed, it runs commands again with a fresh cycle.
    let (status, vm) = call(Method::POST, &format!("/v1/vms/{paused}/resume"), None);
    assert_eq!(status, StatusCode::OK, "{vm}");
    assert!(vm["expiresAtMs"]
        .as_i64()
        .is_some_and(|e| e - now_ms() > 1000));
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{paused}/exec"),
        Some(json!({"command": ["echo", "back"]})),
    );
    assert_eq!(
        (status, out["stdout"].as_str().map(str::trim)),
        (StatusCode::OK, Some("back")),
        "{out}"
    );
    let (status, _) = call(Method::DELETE, &format!("/v1/vms/{paused}"), None);
    assert_eq!(status, StatusCode::OK);
    block_on(server.stop()).expect("stop");
}
