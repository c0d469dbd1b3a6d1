//! A hostile guest next to a tenant of another org (issue 17): the hostile VM,
//! root in its guest, floods its agent channel through an exec whose client
//! stops reading, floods its serial console, spoofs packets from raw sockets,
//! writes its disk as fast as it can and fork-bombs itself, all at once. The
//! victim VM of the other org must keep answering exec the whole time, the
//! server's memory must stay bounded, the hostile VM's footprint on the host
//! must stay within its limits, and deleting the hostile VM must work.
//!
//! The victim's exec latency is printed beside its baseline (figures, not
//! assertions: performance is measured in `bench/`); what is asserted is that
//! every exec answers, correctly.

use fastvm_e2e::{block_on, config, data_dir, json_call, rss_bytes};
use fastvm_server::{RunningServer, ServerConfig};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// How long the hostile VM attacks while the victim is measured.
const ATTACK: Duration = Duration::from_secs(40);
/// Growth of this process's RSS (the server runs in it) we accept during the attack.
const RSS_GROWTH_LIMIT: u64 = 256 << 20;

struct Tenant {
    key: String,
}

struct Env {
    server: RunningServer,
    client: Client,
}

impl Env {
    async fn call(
        &self,
        t: &Tenant,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        json_call(
            &self.client,
            format!("{}{path}", self.server.url()),
            Some(&t.key),
            method,
            body,
        )
        .await
    }

    async fn launch(&self, t: &Tenant) -> String {
        let (status, vm) = self
            .call(
                t,
                Method::POST,
                "/v1/vms",
                Some(json!({"machineType": "c1m2"})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{vm}");
        vm["id"].as_str().expect("id").to_owned()
    }

    /// Run `sh -c cmd`; the status and the result body.
    async fn sh(&self, t: &Tenant, vm: &str, cmd: &str, timeout_sec: u64) -> (StatusCode, Value) {
        self.call(
            t,
            Method::POST,
            &format!("/v1/vms/{vm}/exec"),
            Some(json!({"command": ["sh", "-c", cmd], "timeoutSec": timeout_sec})),
        )
        .await
    }

    /// Start `cmd` detached in the guest (it outlives the exec).
    async fn background(&self, t: &Tenant, vm: &str, cmd: &str) {
        let (status, out) = self
            .sh(
                t,
                vm,
                &format!("setsid sh -c '{cmd}' </dev/null >/dev/null 2>&1 & echo started"),
                60,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert_eq!(out["stdout"], json!("started\n"), "{out}");
    }
}

/// One exec on the victim: it answers, with the right output; its duration.
async fn victim_exec(env: &Env, t: &Tenant, vm: &str, n: usize) -> Duration {
    let started = Instant::now();
    let (status, out) = env.sh(t, vm, &format!("echo victim-{n}"), 120).await;
    assert_eq!(status, StatusCode::OK, "victim exec {n}: {out}");
    assert_eq!(
        out["stdout"],
        json!(format!("victim-{n}\n")),
        "victim exec {n}: {out}"
    );
    assert_eq!(out["exitCode"], json!(0), "victim exec {n}: {out}");
    started.elapsed()
}

fn p50(mut d: Vec<Duration>) -> Duration {
    d.sort();
    d.get(d.len() / 2).copied().unwrap_or_default()
}

/// Allocated bytes of a file (not its apparent size).
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Allocated bytes of the files of a directory (not recursive).
fn total_allocated(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| allocated(&e.path()))
        .sum()
}

/// The largest file of a directory, and its allocated size.
fn largest_file(dir: &std::path::Path) -> (String, u64) {
    let mut best = (String::new(), 0);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let size = allocated(&e.path());
        if size > best.1 {
            best = (e.file_name().to_string_lossy().into_owned(), size);
        }
    }
    best
}

#[test]
fn a_hostile_guest_does_not_reach_its_neighbour() {
    let dir = data_dir("hostile");
    let mut cfg = ServerConfig::new(&dir);
    cfg.runtime = config(&dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    let server = block_on(fastvm_server::start(cfg)).expect("start server");
    let env = Env {
        server,
        client: Client::new(),
    };
    let (hostile, victim) = block_on(async {
        let store = env.server.state().store();
        let mut keys = Vec::new();
        for name in ["hostile-org", "victim-org"] {
            let org = store.create_org(name).await.expect("org");
            keys.push(Tenant {
                key: store.create_key(org, "test").await.expect("key").token,
            });
        }
        let victim = keys.pop().expect("victim");
        let hostile = keys.pop().expect("hostile");
        (hostile, victim)
    });

    block_on(async {
        let (h, v) = tokio::join!(env.launch(&hostile), env.launch(&victim));

        // The other org's VM is invisible to each tenant.
        let (status, _) = env
            .call(&hostile, Method::GET, &format!("/v1/vms/{v}"), None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        let mut baseline = Vec::new();
        for n in 0..10 {
            baseline.push(victim_exec(&env, &victim, &v, n).await);
        }
        let rss_before = rss_bytes();

        // 1. The agent channel: an exec writing stdout as fast as it can, whose
        //    client reads the head of the response and then stops reading.
        let flood = env
            .client
            .post(format!("{}/v1/vms/{h}/exec", env.server.url()))
            .bearer_auth(&hostile.key)
            .header("accept", "application/x-ndjson")
            .json(&json!({"command": ["sh", "-c", "cat /dev/zero"], "timeoutSec": 600}))
            .send()
            .await
            .expect("flood exec");
        assert_eq!(flood.status(), StatusCode::OK);
        // 2. The serial console, 3. spoofed packets (IPv4 and IPv6 sources of
        //    other hosts, from raw sockets), 4. the disk.
        env.background(
            &hostile,
            &h,
            "while :; do head -c 1048576 /dev/urandom | base64 > /dev/ttyS0; done",
        )
        .await;
        let spoof = concat!(
            "import socket, struct\n",
            "s4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)\n",
            "def ip4(src, dst, payload):\n",
            "    udp = struct.pack('!HHHH', 4444, 5555, 8 + len(payload), 0) + payload\n",
            "    hdr = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,\n",
            "                      socket.inet_aton(src), socket.inet_aton(dst))\n",
            "    return hdr + udp\n",
            "while True:\n",
            "    for src in ('10.0.0.1', '192.0.2.7', '127.0.0.1'):\n",
            "        try:\n",
            "            s4.sendto(ip4(src, '198.51.100.9', b'spoof' * 100), ('198.51.100.9', 0))\n",
            "        except OSError:\n",
            "            pass\n",
        );
        let (status, out) = env
            .sh(
                &hostile,
                &h,
                &format!("cat > /root/spoof.py <<'EOF'\n{spoof}EOF\necho ok"),
                60,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        env.background(&hostile, &h, "python3 /root/spoof.py").await;
        env.background(&hostile, &h, "dd if=/dev/zero of=/root/fill bs=1M")
            .await;
        // The attacks run (else the test proves nothing): the spoofer, the console
        // flood and dd are alive, and the disk fills.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (status, out) = env
            .sh(
                &hostile,
                &h,
                "pgrep -f spoof.py >/dev/null && pgrep -x dd >/dev/null && pgrep -x base64 >/dev/null && stat -c %s /root/fill",
                60,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        assert_eq!(out["exitCode"], json!(0), "an attack is not running: {out}");
        let filled: u64 = out["stdout"]
            .as_str()
            .unwrap_or("")
            .trim()
            .parse()
            .unwrap_or(0);
        assert!(filled > 0, "dd wrote nothing: {out}");
        // 5. Last, a fork bomb (after it the hostile guest may not answer at all).
        env.background(&hostile, &h, "f() { f | f & }; f").await;

        // The victim, the whole time.
        let mut during = Vec::new();
        let mut peak_rss = rss_before;
        let attack_started = Instant::now();
        let mut n = 100;
        while attack_started.elapsed() < ATTACK {
            during.push(victim_exec(&env, &victim, &v, n).await);
            peak_rss = peak_rss.max(rss_bytes());
            n += 1;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }

        // Disks are qcow2 layers under <data>/layers; the VM's own files (console
        // log, sockets, spec) under <data>/vms/<id>.
        let (disk, disk_size) = largest_file(&dir.join("layers"));
        let vm_files = total_allocated(&dir.join("vms").join(&h));
        println!(
            "victim exec p50: {:?} before, {:?} during the attack ({} execs, ratio {:.2}); \
             server RSS {} MiB before, peak {} MiB; largest disk layer {disk} = {} MiB; \
             the hostile VM's own files {} KiB",
            p50(baseline.clone()),
            p50(during.clone()),
            during.len(),
            p50(during.clone()).as_secs_f64() / p50(baseline).as_secs_f64().max(1e-9),
            rss_before >> 20,
            peak_rss >> 20,
            disk_size >> 20,
            vm_files >> 10,
        );
        assert!(
            peak_rss.saturating_sub(rss_before) < RSS_GROWTH_LIMIT,
            "the server's RSS grew by {} MiB during the attack",
            (peak_rss - rss_before) >> 20
        );
        // The hostile VM's disk is bounded by its size (10 GiB and metadata).
        assert!(disk_size < 11 << 30, "{disk} holds {} MiB", disk_size >> 20);
        // The console log is capped, whatever the guest writes to its serial port.
        assert!(
            vm_files < 16 << 20,
            "the hostile VM's directory holds {} MiB",
            vm_files >> 20
        );

        // The hostile VM can be deleted, flood and all; the victim carries on.
        drop(flood);
        let (status, body) = env
            .call(&hostile, Method::DELETE, &format!("/v1/vms/{h}"), None)
            .await;
        assert!(
            status.is_success(),
            "delete of the hostile VM: {status} {body}"
        );
        victim_exec(&env, &victim, &v, 1).await;
        let (status, _) = env
            .call(&victim, Method::DELETE, &format!("/v1/vms/{v}"), None)
            .await;
        assert!(status.is_success());
    });
}
