//! End-to-end tests of the SSH gateway and `/v1/me/ssh-keys`: a real server,
//! real QEMU guests and OpenSSH's own `ssh`, `scp`, `sftp` and `ssh-keygen`
//! (Debian `openssh-client`). Every client runs with `-F /dev/null`, a temp
//! HOME, its own known_hosts (the gateway's key from `GET /v1/ssh-gateway`)
//! and `IdentitiesOnly`, so nothing of the machine's `~/.ssh` is read or
//! written. The shared VM runs under a deny-all firewall (ingress and egress):
//! everything reaches it over the agent channel.
//!
//! Failed-auth tests bind their clients to other loopback addresses
//! (127.0.0.2, 127.0.0.3) so the per-address limit never hits the others.

use fastvm_e2e::{assert_api_error, block_on, config, data_dir, json_call};
use fastvm_server::{RunningServer, ServerConfig};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

/// Failed authentications allowed per address and minute in this server.
const AUTH_BUDGET: u32 = 4;

struct Api {
    server: RunningServer,
    key: String,
    client: Client,
    /// Temp HOME of the ssh clients: keys and known_hosts.
    home: tempfile::TempDir,
    port: u16,
}

static A: LazyLock<Api> = LazyLock::new(|| {
    let dir = data_dir("ssh");
    let mut cfg = ServerConfig::new(&dir);
    cfg.runtime = config(&dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    let mut ssh = fastvm_server::ssh::SshConfig::new("127.0.0.1:0".parse().expect("addr"));
    ssh.keepalive_interval = Duration::from_secs(2);
    ssh.auth_failures_per_window = AUTH_BUDGET;
    cfg.ssh = Some(ssh);
    let server = block_on(fastvm_server::start(cfg)).expect("start server");
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("admin key")
        .trim()
        .to_owned();
    let port = server.ssh_addr().expect("ssh gateway").port();
    let home = tempfile::tempdir().expect("temp home");
    for name in ["good", "stranger", "other"] {
        keygen(home.path(), name, "ed25519", None);
    }
    let api = Api {
        server,
        key,
        client: Client::new(),
        home,
        port,
    };
    // Trust the gateway's host key (and only it).
    let (status, info) = block_on(call_as(
        &api,
        &api.key,
        Method::GET,
        "/v1/ssh-gateway",
        None,
    ));
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["port"], json!(port));
    let mut known = String::new();
    for k in info["hostKeys"].as_array().expect("hostKeys") {
        known.push_str(&format!(
            "[127.0.0.1]:{port} {}\n",
            k.as_str().expect("key")
        ));
    }
    std::fs::write(api.home.path().join("known_hosts"), known).expect("known_hosts");
    api
});

fn keygen(dir: &Path, name: &str, kind: &str, bits: Option<u32>) -> PathBuf {
    let path = dir.join(name);
    let mut cmd = Command::new("ssh-keygen");
    cmd.args([
        "-q",
        "-N",
        "",
        "-C",
        &format!("{name}@test"),
        "-t",
        kind,
        "-f",
    ])
    .arg(&path);
    if let Some(b) = bits {
        cmd.args(["-b", &b.to_string()]);
    }
    let st = cmd.status().expect("ssh-keygen (install openssh-client)");
    assert!(st.success());
    path
}

fn pubkey(name: &str) -> String {
    std::fs::read_to_string(A.home.path().join(format!("{name}.pub"))).expect("pub key")
}

async fn call_as(
    a: &Api,
    key: &str,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    json_call(
        &a.client,
        format!("{}{path}", a.server.url()),
        Some(key),
        method,
        body,
    )
    .await
}

async fn call(method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    call_as(&A, &A.key, method, path, body).await
}

async fn launch(body: Value) -> String {
    let (status, vm) = call(Method::POST, "/v1/vms", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    vm["id"].as_str().expect("id").to_owned()
}

/// The shared VM, under a deny-all firewall, with the key `good` registered.
static VM: LazyLock<String> = LazyLock::new(|| {
    LazyLock::force(&A);
    block_on(async {
        let (status, body) = call(
            Method::POST,
            "/v1/me/ssh-keys",
            Some(json!({"publicKey": pubkey("good"), "name": "good"})),
        )
        .await;
        assert!(
            status == StatusCode::CREATED || status == StatusCode::CONFLICT,
            "{body}"
        );
        launch(json!({
            "machineType": "c1m2",
            "firewall": {"ingress": {"defaultAction": "deny"}, "egress": {"defaultAction": "deny"}}
        }))
        .await
    })
});

fn setup() -> &'static str {
    LazyLock::force(&VM);
    VM.as_str()
}

/// `ssh`/`scp`/`sftp` with this test's isolation options.
fn client(program: &str, identity: &str, bind: &str) -> Command {
    let home = A.home.path();
    let mut cmd = Command::new(program);
    cmd.env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .args(["-F", "/dev/null"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            home.join("known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-o",
        ])
        .arg(format!("BindAddress={bind}"))
        .arg("-i")
        .arg(home.join(identity));
    if program == "ssh" {
        cmd.arg("-p");
    } else {
        cmd.arg("-P");
    }
    cmd.arg(A.port.to_string());
    cmd
}

fn ssh(identity: &str, vm: &str, args: &[&str]) -> Command {
    let mut cmd = client("ssh", identity, "127.0.0.1");
    cmd.args(args).arg(format!("{vm}@127.0.0.1"));
    cmd
}

fn run(cmd: &mut Command, stdin: &[u8]) -> Output {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn ssh client");
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let out = child.wait_with_output().expect("wait");
    let _ = feeder.join();
    out
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn keys_api_rules() {
    LazyLock::force(&A);
    block_on(async {
        let key = pubkey("other");
        let (status, added) = call(
            Method::POST,
            "/v1/me/ssh-keys",
            Some(json!({"publicKey": format!("  {key}"), "name": "laptop"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{added}");
        // Comment stripped; fingerprint as ssh-keygen -lf prints it.
        let canonical: Vec<&str> = key.split_whitespace().take(2).collect();
        assert_eq!(added["publicKey"], json!(canonical.join(" ")));
        let lf = Command::new("ssh-keygen")
            .arg("-lf")
            .arg(A.home.path().join("other.pub"))
            .output()
            .expect("ssh-keygen -lf");
        let fp = added["fingerprint"]
            .as_str()
            .expect("fingerprint")
            .to_owned();
        assert!(
            text(&lf.stdout).contains(&fp),
            "{} vs {fp}",
            text(&lf.stdout)
        );
        assert_eq!(added["name"], json!("laptop"));
        assert!(added["createdAt"].as_str().is_some());
        let (_, list) = call(Method::GET, "/v1/me/ssh-keys", None).await;
        assert!(list["keys"]
            .as_array()
            .expect("keys")
            .iter()
            .any(|k| k["fingerprint"] == json!(fp)));
        // Duplicate: 409.
        let dup = call(
            Method::POST,
            "/v1/me/ssh-keys",
            Some(json!({"publicKey": key})),
        )
        .await;
        assert_api_error(&dup, StatusCode::CONFLICT, "SSH_KEY_EXISTS");
        // Bad keys: 400 INVALID_SSH_KEY.
        let rsa1024 = keygen(A.home.path(), "weak", "rsa", Some(1024));
        let weak = std::fs::read_to_string(rsa1024.with_extension("pub")).expect("weak pub");
        for bad in [
            "not a key".to_owned(),
            format!("{key}\n{key}"),
            weak,
            "ssh-dss AAAAB3NzaC1kc3M=".to_owned(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAAQE=".to_owned(),
        ] {
            let res = call(
                Method::POST,
                "/v1/me/ssh-keys",
                Some(json!({"publicKey": bad})),
            )
            .await;
            assert_api_error(&res, StatusCode::BAD_REQUEST, "INVALID_SSH_KEY");
        }
        let res = call(Method::POST, "/v1/me/ssh-keys", Some(json!({"name": "x"}))).await;
        assert_api_error(&res, StatusCode::BAD_REQUEST, "INVALID_REQUEST");
        // Delete by URL-encoded fingerprint, once.
        let enc: String = fp
            .chars()
            .map(|c| match c {
                ':' => "%3A".to_owned(),
                '+' => "%2B".to_owned(),
                '/' => "%2F".to_owned(),
                c => c.to_string(),
            })
            .collect();
        let (status, del) = call(Method::DELETE, &format!("/v1/me/ssh-keys/{enc}"), None).await;
        assert_eq!(status, StatusCode::OK, "{del}");
        assert_eq!(del, json!({"id": fp, "deleted": true}));
        let again = call(Method::DELETE, &format!("/v1/me/ssh-keys/{enc}"), None).await;
        assert_api_error(&again, StatusCode::NOT_FOUND, "NOT_FOUND");
        // An org key without a user has no SSH keys.
        let store = A.server.state().store();
        let org = fastvm_server::default_org(store)
            .await
            .expect("org")
            .expect("default org");
        let orgkey = store.create_key(org, "ci").await.expect("org key");
        let res = call_as(&A, &orgkey.token, Method::GET, "/v1/me/ssh-keys", None).await;
        assert_api_error(&res, StatusCode::FORBIDDEN, "NO_USER");
    });
}

#[test]
fn exec_stdio_and_exit_codes() {
    let vm = setup();
    let out = run(
        ssh("good", vm, &[]).arg("echo out; echo err >&2; exit 3"),
        b"",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert_eq!(text(&out.stderr), "err\n");
    // stdin to EOF, then output and status (half-close).
    let input: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let out = run(ssh("good", vm, &[]).arg("wc -c; exit 0"), &input);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "300000");
    // Bytes through `cat` both ways, unchanged.
    let out = run(ssh("good", vm, &[]).arg("cat"), &input);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        out.stdout == input,
        "cat changed {} bytes into {}",
        input.len(),
        out.stdout.len()
    );
    // A command that does not exist: 127, as sshd would.
    let out = run(ssh("good", vm, &[]).arg("no-such-command-x"), b"");
    assert_eq!(out.status.code(), Some(127));
}

/// `ssh -t` on a real local terminal (a PTY this test owns): the guest's
/// terminal gets its size, follows a resize (SIGWINCH -> window-change),
/// Ctrl-C interrupts the foreground job only, and `exit 7` is ssh's status.
#[test]
fn pty_shell_resize_ctrl_c_and_exit_status() {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt as _;
    let vm = setup();
    let set_size = |fd: i32, rows: u16, cols: u16| {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
    };
    let (mut master_fd, mut slave_fd) = (-1, -1);
    // SAFETY: openpty writes two fds into the given ints; the other pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master_fd,
            &mut slave_fd,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    // SAFETY: openpty returned two fresh fds that nothing else owns.
    let (master, slave) = unsafe {
        (
            OwnedFd::from_raw_fd(master_fd),
            OwnedFd::from_raw_fd(slave_fd),
        )
    };
    set_size(master.as_raw_fd(), 30, 100);
    let mut cmd = ssh("good", vm, &["-t"]);
    cmd.stdin(slave.try_clone().expect("dup"))
        .stdout(slave.try_clone().expect("dup"))
        .stderr(slave.try_clone().expect("dup"));
    // SAFETY: between fork and exec: setsid and TIOCSCTTY on fd 0 are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            libc::ioctl(0, libc::TIOCSCTTY, 0);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("ssh -t");
    drop(slave);
    let mut writer = std::fs::File::from(master.try_clone().expect("dup"));
    let mut reader = std::fs::File::from(master.try_clone().expect("dup"));
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = |needle: &str, within: Duration| {
        let until = Instant::now() + within;
        loop {
            if let Some(at) = text(&seen).find(needle) {
                let s = text(&seen);
                seen.drain(..at + needle.len());
                return s;
            }
            let left = until.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.extend(b),
                Err(_) => panic!("{needle:?} not seen; got {:?}", text(&seen)),
            }
        }
    };
    writer
        .write_all(b"echo SZ-$(stty size | tr ' ' x)-$(tty | cut -c1-8)\n")
        .expect("type");
    wait_for("SZ-30x100-/dev/pts", Duration::from_secs(60));
    set_size(master.as_raw_fd(), 50, 132);
    let mut resized = false;
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        writer
            .write_all(b"echo RS-$(stty size | tr ' ' x)-END\n")
            .expect("type");
        let got = wait_for("-END", Duration::from_secs(30));
        if got.contains("RS-50x132-END") {
            resized = true;
            break;
        }
    }
    assert!(resized, "the guest never saw 50x132");
    // Ctrl-C reaches `sleep` (the terminal's foreground job), not the shell.
    writer.write_all(b"sleep 100\n").expect("type");
    std::thread::sleep(Duration::from_millis(1500));
    writer.write_all(b"\x03").expect("ctrl-c");
    writer.write_all(b"echo after-$?-x\n").expect("type");
    wait_for("after-130-x", Duration::from_secs(30));
    writer.write_all(b"exit 7\n").expect("type");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(7));
}

#[test]
fn scp_and_sftp_round_trips() {
    let vm = setup();
    let dir = tempfile::tempdir().expect("tmp");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let local = dir.path().join("up.bin");
    std::fs::write(&local, &data).expect("write");
    let target = format!("{vm}@127.0.0.1:/root/up.bin");
    let out = run(
        &mut {
            let mut c = client("scp", "good", "127.0.0.1");
            c.arg(&local).arg(&target);
            c
        },
        b"",
    );
    assert!(out.status.success(), "scp up: {}", text(&out.stderr));
    let back = dir.path().join("back.bin");
    let out = run(
        &mut {
            let mut c = client("scp", "good", "127.0.0.1");
            c.arg(&target).arg(&back);
            c
        },
        b"",
    );
    assert!(out.status.success(), "scp down: {}", text(&out.stderr));
    assert!(
        std::fs::read(&back).expect("back") == data,
        "scp round trip changed the file"
    );
    // sftp: mkdir, put, ls, get, rm.
    let batch = dir.path().join("batch");
    let got = dir.path().join("got.bin");
    std::fs::write(
        &batch,
        format!(
            "mkdir /root/sftp-dir\nput {} /root/sftp-dir/f.bin\nls -l /root/sftp-dir\nget /root/sftp-dir/f.bin {}\nrm /root/sftp-dir/f.bin\nrmdir /root/sftp-dir\n",
            local.display(),
            got.display()
        ),
    )
    .expect("batch");
    let out = run(
        &mut {
            let mut c = client("sftp", "good", "127.0.0.1");
            c.arg("-b").arg(&batch).arg(format!("{vm}@127.0.0.1"));
            c
        },
        b"",
    );
    assert!(
        out.status.success(),
        "sftp: {} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(text(&out.stdout).contains("f.bin"), "{}", text(&out.stdout));
    assert!(std::fs::read(&got).expect("got") == data);
}

#[test]
fn local_forward_to_a_loopback_port_in_the_guest() {
    let vm = setup();
    let out = run(
        ssh("good", vm, &[]).arg(
            "mkdir -p /root/www && echo hello-from-guest > /root/www/index.html && cd /root/www && (setsid python3 -m http.server 8765 --bind 127.0.0.1 >/dev/null 2>&1 &) ; sleep 1; echo started",
        ),
        b"",
    );
    assert!(
        text(&out.stdout).contains("started"),
        "{}",
        text(&out.stderr)
    );
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().expect("addr").port()
    };
    let mut fwd = ssh(
        "good",
        vm,
        &["-N", "-L", &format!("127.0.0.1:{port}:127.0.0.1:8765")],
    );
    fwd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = fwd.spawn().expect("ssh -L");
    let until = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let got = block_on(async {
            let r = reqwest::get(format!("http://127.0.0.1:{port}/index.html"))
                .await
                .ok()?;
            r.text().await.ok()
        });
        match got {
            Some(b) if b.contains("hello-from-guest") => break b,
            _ if Instant::now() > until => panic!("no answer through -L: {got:?}"),
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    };
    assert!(body.contains("hello-from-guest"));
    // Several connections at once.
    let answers = block_on(async {
        let gets = (0..5).map(|_| async {
            reqwest::get(format!("http://127.0.0.1:{port}/index.html"))
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        });
        futures::future::join_all(gets).await
    });
    assert_eq!(answers, vec![200; 5]);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn paused_vm_is_woken() {
    setup();
    let vm = block_on(launch(json!({"machineType": "c1m2"})));
    let (status, body) = block_on(call(Method::POST, &format!("/v1/vms/{vm}/pause"), None));
    assert_eq!(status, StatusCode::OK, "{body}");
    let t0 = Instant::now();
    let out = run(ssh("good", &vm, &[]).arg("echo awake"), b"");
    assert_eq!(text(&out.stdout), "awake\n", "{}", text(&out.stderr));
    eprintln!("ssh to a paused VM answered in {:?}", t0.elapsed());
    let (_, got) = block_on(call(Method::GET, &format!("/v1/vms/{vm}"), None));
    assert_eq!(got["status"], json!("running"));
    let _ = block_on(call(Method::DELETE, &format!("/v1/vms/{vm}"), None));
}

/// Unknown key, unknown VM, another org's VM: one and the same refusal.
#[test]
fn auth_failures_look_alike() {
    let vm = setup();
    // Another org with its own user, key and VM.
    let (other_vm, other_key_registered) = block_on(async {
        let store = A.server.state().store();
        let org = store.create_org("ssh-other").await.expect("org");
        let user = store.create_user(org, "eve").await.expect("user");
        let key = store
            .create_key_for(org, Some(user), "eve")
            .await
            .expect("key");
        let res = call_as(
            &A,
            &key.token,
            Method::POST,
            "/v1/me/ssh-keys",
            Some(json!({"publicKey": pubkey("other")})),
        )
        .await;
        assert_eq!(res.0, StatusCode::CREATED, "{}", res.1);
        let (status, v) = call_as(
            &A,
            &key.token,
            Method::POST,
            "/v1/vms",
            Some(json!({"machineType": "c1m2"})),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{v}");
        (v["id"].as_str().expect("id").to_owned(), true)
    });
    assert!(other_key_registered);
    let attempt = |identity: &str, target: &str| {
        let mut c = client("ssh", identity, "127.0.0.3");
        c.arg(format!("{target}@127.0.0.1")).arg("true");
        run(&mut c, b"")
    };
    let cases = [
        ("stranger", vm.to_owned()),                // unknown key
        ("good", uuid::Uuid::new_v4().to_string()), // unknown VM
        ("good", other_vm.clone()),                 // another org's VM
        ("other", vm.to_owned()),                   // key of another org's user
        ("good", "not-a-vm".to_owned()),            // not even an id
    ];
    let mut errors = Vec::new();
    for (identity, target) in &cases {
        let out = attempt(identity, target);
        assert_eq!(out.status.code(), Some(255), "{identity}@{target}");
        let err = text(&out.stderr).replace(target.as_str(), "VM");
        assert!(err.contains("Permission denied (publickey)"), "{err}");
        errors.push(err);
        // Stay under this address's budget: these cases are about the answer.
        if errors.len() as u32 + 1 >= AUTH_BUDGET {
            break;
        }
    }
    assert!(errors.windows(2).all(|w| w[0] == w[1]), "{errors:?}");
    // The other org's user reaches its own VM with its key.
    let out = run(ssh("other", &other_vm, &[]).arg("echo mine"), b"");
    assert_eq!(text(&out.stdout), "mine\n", "{}", text(&out.stderr));
}

#[test]
fn failed_auths_are_rate_limited_per_address() {
    let vm = setup();
    let from = |identity: &str, bind: &str| {
        let mut c = client("ssh", identity, bind);
        c.arg(format!("{vm}@127.0.0.1")).arg("echo ok");
        run(&mut c, b"")
    };
    // A fresh address: the good key works, then strangers burn the budget.
    assert_eq!(text(&from("good", "127.0.0.2").stdout), "ok\n");
    for _ in 0..AUTH_BUDGET {
        assert_eq!(from("stranger", "127.0.0.2").status.code(), Some(255));
    }
    let refused = from("good", "127.0.0.2");
    assert_eq!(refused.status.code(), Some(255), "the limit did not apply");
    // Other addresses are unaffected.
    assert_eq!(text(&from("good", "127.0.0.1").stdout), "ok\n");
}

#[test]
fn keepalives_keep_a_quiet_session() {
    let vm = setup();
    // Client keepalives every second and server keepalives every 2 s, over
    // 7 s of silence: both sides answer, the session survives.
    let out = run(
        ssh(
            "good",
            vm,
            &["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=2"],
        )
        .arg("sleep 7; echo still-here"),
        b"",
    );
    assert_eq!(text(&out.stdout), "still-here\n", "{}", text(&out.stderr));
}

#[test]
fn garbage_and_silent_clients_do_not_hurt_others() {
    let vm = setup();
    let addr = A.server.ssh_addr().expect("ssh");
    // Garbage instead of an SSH banner, and a client that sends nothing.
    let mut junk = std::net::TcpStream::connect(addr).expect("connect");
    let _ = junk.write_all(&[0xff; 100_000]);
    let _silent = std::net::TcpStream::connect(addr).expect("connect");
    // A client that never reads a flood of output.
    let mut flood = ssh("good", vm, &[]);
    flood
        .arg("head -c 200000000 /dev/zero")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut flooder = flood.spawn().expect("flood");
    std::thread::sleep(Duration::from_secs(3));
    let out = run(ssh("good", vm, &[]).arg("echo fine"), b"");
    assert_eq!(text(&out.stdout), "fine\n", "{}", text(&out.stderr));
    let _ = flooder.kill();
    let _ = flooder.wait();
}
