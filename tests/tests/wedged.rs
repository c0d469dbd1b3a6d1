//! End-to-end tests of failure containment on real QEMU guests:
//!
//! * a wedged QEMU (`kill -STOP`) fails its own VM only: pause and exec on
//!   it answer 504 `VM_UNRESPONSIVE` within the QMP budget, its status
//!   becomes `error` with a message, while other VMs launch, exec and are
//!   deleted, and the TTL reaper keeps reaping; deleting it kills it;
//! * a client hanging up mid-pause or mid-delete does not abandon the
//!   transition (the VM ends paused / gone, and the store agrees);
//! * a golden snapshot whose files are damaged is rebuilt once, shared by
//!   concurrent launches.
//!
//! Durations are printed (not asserted): performance belongs in bench/.

use fastvm_e2e::{block_on, config, data_dir, process_gone};
use fastvm_server::ServerConfig;
use fastvm_types::VmId;
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, Runtime, VmState};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn qemu_pid(dir: &Path, vm: &str) -> u32 {
    let s = std::fs::read_to_string(dir.join("vms").join(vm).join("qemu.pid")).expect("qemu.pid");
    s.trim().parse().expect("pid")
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill has no memory preconditions; the pid is a QEMU of this test's data dir.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// A server on an ephemeral port over a fresh data dir, with its admin key.
struct Api {
    dir: PathBuf,
    server: fastvm_server::RunningServer,
    key: String,
    client: Client,
}

impl Api {
    fn start(name: &str) -> Api {
        let dir = data_dir(name);
        let mut cfg = ServerConfig::new(&dir);
        cfg.runtime = config(&dir);
        cfg.listen = "127.0.0.1:0".parse().expect("addr");
        cfg.launch_wait = Duration::from_secs(300);
        let server = block_on(fastvm_server::start(cfg)).expect("start server");
        let key = std::fs::read_to_string(dir.join("admin-api-key"))
            .expect("admin-api-key")
            .trim()
            .to_owned();
        Api {
            dir,
            server,
            key,
            client: Client::new(),
        }
    }

    fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        block_on(async {
            let mut req = self
                .client
                .request(method, format!("{}{path}", self.server.url()))
                .bearer_auth(&self.key);
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
    }

    fn launch(&self, body: Value) -> String {
        let (status, vm) = self.call(Method::POST, "/v1/vms", Some(body));
        assert_eq!(status, StatusCode::CREATED, "{vm}");
        assert_eq!(vm["status"], json!("running"), "{vm}");
        vm["id"].as_str().expect("id").to_owned()
    }

    fn exec_echo(&self, id: &str, word: &str) {
        let (status, out) = self.call(
            Method::POST,
            &format!("/v1/vms/{id}/exec"),
            Some(json!({"command": ["echo", word]})),
        );
        assert_eq!(
            (status, out["stdout"].as_str().map(str::trim)),
            (StatusCode::OK, Some(word)),
            "{out}"
        );
    }

    fn get(&self, id: &str) -> (StatusCode, Value) {
        self.call(Method::GET, &format!("/v1/vms/{id}"), None)
    }

    /// Poll GET until `done` accepts the answer (at most `within`).
    fn wait_for(
        &self,
        id: &str,
        within: Duration,
        what: &str,
        done: impl Fn(StatusCode, &Value) -> bool,
    ) -> Value {
        let give_up = Instant::now() + within;
        loop {
            let (status, vm) = self.get(id);
            if done(status, &vm) {
                return vm;
            }
            assert!(
                Instant::now() < give_up,
                "{id} never became {what}: {status} {vm}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Send `method path` on a raw connection and hang up right after the
    /// request is written, without reading the answer.
    fn send_and_hang_up(&self, method: &str, path: &str) {
        let mut s = std::net::TcpStream::connect(self.server.addr()).expect("connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
            self.server.addr(),
            self.key
        );
        s.write_all(req.as_bytes()).expect("write");
        s.flush().expect("flush");
        // Let the server start the handler, then go away.
        std::thread::sleep(Duration::from_millis(300));
        let _ = s.shutdown(std::net::Shutdown::Both);
    }

    fn worker_state(&self, id: &str) -> Option<VmState> {
        let vm_id: VmId = id.parse().expect("uuid");
        block_on(
            self.server
                .state()
                .local_worker()
                .expect("embedded worker")
                .state(vm_id),
        )
        .expect("state")
    }
}

fn assert_code(res: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(res.0, status, "{}", res.1);
    assert_eq!(res.1["error"]["code"], json!(code), "{}", res.1);
}

#[test]
fn a_wedged_qemu_fails_only_its_own_vm() {
    let api = Api::start("wedged");
    let wedged = api.launch(json!({"machineType": "c1m2"}));
    let stuck = api.launch(json!({"machineType": "c1m2"}));
    api.exec_echo(&wedged, "alive");
    api.exec_echo(&stuck, "alive");

    // Pause of a stopped QEMU: 504 VM_UNRESPONSIVE, the VM is error with a message.
    let pid = qemu_pid(&api.dir, &wedged);
    signal(pid, libc::SIGSTOP);
    let t0 = Instant::now();
    let res = api.call(Method::POST, &format!("/v1/vms/{wedged}/pause"), None);
    let pause_took = t0.elapsed();
    assert_code(&res, StatusCode::GATEWAY_TIMEOUT, "VM_UNRESPONSIVE");
    let (_, vm) = api.get(&wedged);
    assert_eq!(vm["status"], json!("error"), "{vm}");
    let message = vm["statusMessage"].as_str().unwrap_or_default();
    assert!(message.contains("stopped responding"), "{vm}");
    assert!(matches!(api.worker_state(&wedged), Some(VmState::Error(_))));
    // From then on it is refused at once (409), not waited for.
    let res = api.call(
        Method::POST,
        &format!("/v1/vms/{wedged}/exec"),
        Some(json!({"command": ["true"]})),
    );
    assert_code(&res, StatusCode::CONFLICT, "INVALID_STATE");

    // Exec on another stopped QEMU: 504 VM_UNRESPONSIVE too.
    let stuck_pid = qemu_pid(&api.dir, &stuck);
    signal(stuck_pid, libc::SIGSTOP);
    let t0 = Instant::now();
    let res = api.call(
        Method::POST,
        &format!("/v1/vms/{stuck}/exec"),
        Some(json!({"command": ["echo", "never"]})),
    );
    let exec_took = t0.elapsed();
    assert_code(&res, StatusCode::GATEWAY_TIMEOUT, "VM_UNRESPONSIVE");
    let (_, vm) = api.get(&stuck);
    assert_eq!(vm["status"], json!("error"), "{vm}");
    println!("wedged VM marked error: pause answered in {pause_took:?}, exec in {exec_took:?}");

    // Both stay stopped; meanwhile another VM launches, runs and is deleted.
    let t0 = Instant::now();
    let other = api.launch(json!({"machineType": "c1m2"}));
    api.exec_echo(&other, "unaffected");
    let (_, vm) = api.get(&other);
    assert_eq!(vm["status"], json!("running"));
    let (status, _) = api.call(Method::DELETE, &format!("/v1/vms/{other}"), None);
    assert_eq!(status, StatusCode::OK);
    println!(
        "other VM launched, exec'd and deleted in {:?} beside two wedged ones",
        t0.elapsed()
    );

    // The TTL reaper: a wedged VM due for a TTL pause beside a healthy VM
    // due for a TTL delete a second later. The healthy one is reaped while
    // the wedged one's pause is still waiting out its QMP budget (5 s).
    let wedged_ttl = api.launch(json!({"machineType": "c1m2"}));
    let reaped = api.launch(json!({"machineType": "c1m2"}));
    let wedged_ttl_pid = qemu_pid(&api.dir, &wedged_ttl);
    let reaped_pid = qemu_pid(&api.dir, &reaped);
    signal(wedged_ttl_pid, libc::SIGSTOP);
    let (status, vm) = api.call(
        Method::PATCH,
        &format!("/v1/vms/{wedged_ttl}"),
        Some(json!({"ttl": {"seconds": 1, "action": "pause"}})),
    );
    assert_eq!(status, StatusCode::OK, "{vm}");
    let (status, vm) = api.call(
        Method::PATCH,
        &format!("/v1/vms/{reaped}"),
        Some(json!({"ttl": {"seconds": 2, "action": "delete"}})),
    );
    assert_eq!(status, StatusCode::OK, "{vm}");
    api.wait_for(&wedged_ttl, Duration::from_secs(10), "pausing", |_, vm| {
        vm["status"] == json!("pausing")
    });
    api.wait_for(&reaped, Duration::from_secs(30), "deleted", |s, _| {
        s == StatusCode::NOT_FOUND
    });
    let (_, vm) = api.get(&wedged_ttl);
    assert_eq!(
        vm["status"],
        json!("pausing"),
        "the reaper waited for the wedged VM: {vm}"
    );
    let vm = api.wait_for(&wedged_ttl, Duration::from_secs(30), "error", |_, vm| {
        vm["status"] == json!("error")
    });
    assert!(vm["statusMessage"]
        .as_str()
        .is_some_and(|m| m.contains("stopped responding")));
    let give_up = Instant::now() + Duration::from_secs(15);
    while !process_gone(reaped_pid) {
        assert!(
            Instant::now() < give_up,
            "reaped QEMU {reaped_pid} still runs"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Deleting a wedged VM kills its QEMU.
    for (id, pid) in [
        (&wedged, pid),
        (&stuck, stuck_pid),
        (&wedged_ttl, wedged_ttl_pid),
    ] {
        let t0 = Instant::now();
        let (status, body) = api.call(Method::DELETE, &format!("/v1/vms/{id}"), None);
        assert_eq!(status, StatusCode::OK, "{body}");
        println!("wedged VM deleted in {:?}", t0.elapsed());
        let give_up = Instant::now() + Duration::from_secs(15);
        while !process_gone(pid) {
            assert!(
                Instant::now() < give_up,
                "wedged QEMU {pid} survived its delete"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(api.get(id).0, StatusCode::NOT_FOUND);
    }
    block_on(api.server.stop()).expect("stop");
}

#[test]
fn transitions_finish_when_the_client_hangs_up() {
    let api = Api::start("hangup");
    let vm = api.launch(json!({"machineType": "c1m2"}));
    let pid = qemu_pid(&api.dir, &vm);

    // QEMU stopped for a second: the pause is in flight when the client goes.
    signal(pid, libc::SIGSTOP);
    api.send_and_hang_up("POST", &format!("/v1/vms/{vm}/pause"));
    let (_, row) = api.get(&vm);
    assert_eq!(row["status"], json!("pausing"), "{row}");
    std::thread::sleep(Duration::from_millis(700));
    signal(pid, libc::SIGCONT);
    api.wait_for(&vm, Duration::from_secs(30), "paused", |_, row| {
        row["status"] == json!("paused")
    });
    assert_eq!(api.worker_state(&vm), Some(VmState::Paused));

    // Resume, likewise.
    signal(pid, libc::SIGSTOP);
    api.send_and_hang_up("POST", &format!("/v1/vms/{vm}/resume"));
    std::thread::sleep(Duration::from_millis(700));
    signal(pid, libc::SIGCONT);
    api.wait_for(&vm, Duration::from_secs(30), "running", |_, row| {
        row["status"] == json!("running")
    });
    assert_eq!(api.worker_state(&vm), Some(VmState::Running));
    api.exec_echo(&vm, "resumed");

    // Delete: the VM ends gone, its row deleted and its QEMU killed.
    signal(pid, libc::SIGSTOP);
    api.send_and_hang_up("DELETE", &format!("/v1/vms/{vm}"));
    std::thread::sleep(Duration::from_millis(700));
    signal(pid, libc::SIGCONT);
    api.wait_for(&vm, Duration::from_secs(30), "deleted", |s, _| {
        s == StatusCode::NOT_FOUND
    });
    assert_eq!(api.worker_state(&vm), None);
    let give_up = Instant::now() + Duration::from_secs(15);
    while !process_gone(pid) {
        assert!(Instant::now() < give_up, "QEMU {pid} survived the delete");
        std::thread::sleep(Duration::from_millis(50));
    }
    block_on(api.server.stop()).expect("stop");
}

fn golden_dirs(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("golden"))
        .expect("golden dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("snapshot.json").is_file())
        .collect()
}

#[test]
fn a_damaged_golden_snapshot_is_rebuilt_once() {
    let dir = data_dir("golden-rebuild");
    let rt: std::sync::Arc<Runtime> = block_on(Runtime::open(config(&dir))).expect("open");
    let create = |rt: &std::sync::Arc<Runtime>| {
        let rt = rt.clone();
        async move {
            rt.create(CreateVm {
                machine: "c1m2".into(),
                ..Default::default()
            })
            .await
        }
    };
    let first = block_on(create(&rt)).expect("first launch");
    assert_eq!(rt.golden_builds(), 1);
    block_on(rt.delete(&first.id)).expect("delete");

    // The key names the QEMU build (version + binary hash) and CPU model.
    let goldens = golden_dirs(&dir);
    assert_eq!(goldens.len(), 1, "{goldens:?}");
    let name = goldens[0]
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let build = name.rsplit('-').next().unwrap_or_default();
    assert!(
        build.len() == 17 && build.starts_with('q'),
        "no QEMU build in golden key {name}"
    );

    // Damage its device state: restores of it fail in QEMU.
    let memory = goldens[0].join("memory");
    let len = std::fs::metadata(&memory).expect("memory").len();
    std::fs::write(
        &memory,
        vec![0x5a; usize::try_from(len).unwrap_or(4096).max(4096)],
    )
    .expect("corrupt");

    // Two concurrent launches: both run, after exactly one rebuild.
    let (a, b) = block_on(async { tokio::join!(create(&rt), create(&rt)) });
    let (a, b) = (a.expect("launch a"), b.expect("launch b"));
    assert_eq!(rt.golden_builds(), 2, "one rebuild, shared");
    for vm in [&a, &b] {
        assert_eq!(vm.state, VmState::Running);
        let out = block_on(rt.exec_buffered(
            &vm.id,
            &ExecRequest {
                argv: vec!["echo".into(), "rebuilt".into()],
                ..Default::default()
            },
            1 << 16,
        ))
        .expect("exec");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "rebuilt");
    }
    assert_ne!(
        std::fs::read(&memory).expect("memory").first(),
        Some(&0x5a),
        "the golden snapshot was not rebuilt"
    );
    // Later launches use the rebuilt one without another build.
    let c = block_on(create(&rt)).expect("third launch");
    assert_eq!(rt.golden_builds(), 2);
    for vm in [a, b, c] {
        block_on(rt.delete(&vm.id)).expect("delete");
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = std::process::Command::new(cmd)
        .args(args)
        .status()
        .expect("spawn");
    assert!(st.success(), "{cmd} {args:?}: {st}");
}

#[test]
fn a_firewall_the_worker_cannot_enforce_is_refused_not_stored() {
    let api = Api::start("fw-refused");
    let vm = api.launch(json!({"machineType": "c1m2"}));
    let path = format!("/v1/vms/{vm}/firewall");
    let first = json!({"ingress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "8080", "action": "allow"}]}});
    let (status, body) = api.call(Method::PUT, &path, Some(first));
    assert_eq!(status, StatusCode::OK, "{body}");
    let stored = body["firewall"].clone();
    let vm_id: VmId = vm.parse().expect("uuid");
    let enforced = || {
        block_on(
            api.server
                .state()
                .local_worker()
                .expect("embedded worker")
                .enforced_firewall(vm_id),
        )
        .expect("enforced")
    };
    let effective = |v: &Value| -> fastvm_types::FirewallPolicy {
        serde_json::from_value(v["effectiveFirewall"].clone()).expect("effectiveFirewall")
    };
    assert_eq!(enforced(), Some(effective(&body)));

    // Take the VM's namespace away from the worker (QEMU keeps it alive):
    // nft cannot run in it, so the new policy cannot be enforced.
    let net: Value = serde_json::from_slice(
        &std::fs::read(api.dir.join("vms").join(&vm).join("net.json")).expect("net.json"),
    )
    .expect("net.json");
    let netns = net["addressing"]["netns"]
        .as_str()
        .expect("netns")
        .to_owned();
    let mount = format!("/run/netns/{netns}");
    run("umount", &[&mount]);
    std::fs::remove_file(&mount).expect("unlink netns");
    let res = api.call(
        Method::PUT,
        &path,
        Some(json!({"egress": {"defaultAction": "deny"}})),
    );
    assert_code(
        &res,
        StatusCode::SERVICE_UNAVAILABLE,
        "FIREWALL_NOT_ENFORCED",
    );
    let (_, now) = api.get(&vm);
    assert_eq!(now["firewall"], stored, "a refused policy was stored");
    // The worker could not re-apply the old one either: it says it knows of nothing enforced.
    assert_eq!(enforced(), None);

    // The namespace comes back; the reconciler enforces the stored policy.
    let pid = qemu_pid(&api.dir, &vm);
    std::fs::write(&mount, b"").expect("mount point");
    run("mount", &["--bind", &format!("/proc/{pid}/ns/net"), &mount]);
    block_on(api.server.state().reconcile_on_start()).expect("reconcile");
    assert_eq!(enforced(), Some(effective(&now)));
    api.exec_echo(&vm, "still-here");
    let (status, _) = api.call(Method::DELETE, &format!("/v1/vms/{vm}"), None);
    assert_eq!(status, StatusCode::OK);
    assert!(!Path::new(&mount).exists(), "namespace left behind");
    block_on(api.server.stop()).expect("stop");
}
