//! The internal worker API end to end: a real guest on a `LocalWorker`
//! served by `fastvm_worker_api::service` on a loopback port, driven only
//! through `RemoteWorker` (what a control plane of a cluster uses). Every
//! method of the `Worker` trait crosses the wire here: unary calls, exec
//! streams (with and without stdin, cancellation by dropping), terminals,
//! tunnels into the guest, the serial console, snapshots, and the fencing of
//! a stale token.

use fastvm_e2e::{block_on, runtime};
use fastvm_types::{FirewallPolicy, SnapshotId, VmId};
use fastvm_worker::LocalWorker;
use fastvm_worker_api::cluster::worker_token;
use fastvm_worker_api::service::{router, ExpectedToken};
use fastvm_worker_api::{
    ExecEvent, ExecRequest, MachineType, PtyEvent, PtyInput, PtySpec, RemoteWorker, VmSpec,
    VmState, Worker, WorkerEndpoint, WorkerError,
};
use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "test-cluster-secret";

fn remote(addr: std::net::SocketAddr, generation: i64) -> RemoteWorker {
    RemoteWorker::new(WorkerEndpoint {
        id: "wk_remote".into(),
        address: format!("http://{addr}"),
        token: worker_token(SECRET, "wk_remote", generation),
        generation,
    })
    .expect("client")
}

/// Everything an exec printed, and its exit code.
async fn collect(
    mut ev: fastvm_worker_api::ExecEvents,
) -> (Vec<u8>, Vec<u8>, Result<i32, WorkerError>) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    while let Some(e) = ev.next().await {
        match e {
            Ok(ExecEvent::Stdout(d)) => out.extend_from_slice(&d),
            Ok(ExecEvent::Stderr(d)) => err.extend_from_slice(&d),
            Ok(ExecEvent::Exit(st)) => return (out, err, Ok(st.code)),
            Err(e) => return (out, err, Err(e)),
        }
    }
    (out, err, Err(WorkerError::Failed("no exit".into())))
}

async fn sh(w: &RemoteWorker, vm: VmId, cmd: &str) -> (String, i32) {
    let (out, err, code) = collect(w.exec(vm, ExecRequest::shell(cmd)).await.expect("exec")).await;
    let code = code.expect("exit");
    assert!(
        err.is_empty() || code != 0,
        "{}",
        String::from_utf8_lossy(&err)
    );
    (String::from_utf8_lossy(&out).into_owned(), code)
}

#[test]
fn every_worker_operation_crosses_the_wire() {
    if std::env::var_os("FASTVM_E2E").is_none() && std::env::var_os("CI").is_none() {
        eprintln!("FASTVM_E2E is not set: skipping (needs QEMU)");
        return;
    }
    let rt = runtime("remote-worker");
    block_on(async {
        let local: Arc<dyn Worker> = Arc::new(LocalWorker::with_id(rt.clone(), "wk_remote"));
        let expected = ExpectedToken::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = router(local, expected.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });

        // Before registration every call is refused.
        let w = remote(addr, 1);
        assert!(
            matches!(w.list().await, Err(WorkerError::Unreachable(m)) if m.contains("not registered"))
        );
        expected.set(Some(worker_token(SECRET, "wk_remote", 1)));
        assert_eq!(w.list().await.expect("list"), vec![]);

        // Create, with env and an ingress-open firewall (for `connect`).
        let vm = VmId::new_v4();
        let mut env = std::collections::BTreeMap::new();
        env.insert("GREETING".to_owned(), "over-the-wire".to_owned());
        let firewall: FirewallPolicy =
            serde_json::from_value(serde_json::json!({"ingress": {"defaultAction": "allow"}}))
                .expect("policy");
        let t = Instant::now();
        w.create(VmSpec {
            id: vm,
            machine: MachineType::lookup("c1m2").expect("c1m2"),
            hostname: "remote-vm".into(),
            env,
            snapshot: None,
            firewall: firewall.clone(),
        })
        .await
        .expect("create");
        eprintln!("remote create: {:?}", t.elapsed());
        assert_eq!(w.state(vm).await.expect("state"), Some(VmState::Running));
        assert_eq!(w.state(VmId::new_v4()).await.expect("state"), None);
        assert_eq!(w.list().await.expect("list"), vec![(vm, VmState::Running)]);

        // Buffered-style exec: stdout, stderr, exit code, env, hostname.
        let (out, err, code) = collect(
            w.exec(
                vm,
                ExecRequest::shell("echo $GREETING $(hostname); echo oops >&2; exit 3"),
            )
            .await
            .expect("exec"),
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&out), "over-the-wire remote-vm\n");
        assert_eq!(String::from_utf8_lossy(&err), "oops\n");
        assert_eq!(code.expect("exit"), 3);
        // Errors keep their kind across the wire.
        assert!(matches!(
            w.exec(vm, ExecRequest::argv([""])).await.err(),
            Some(WorkerError::InvalidExec(_))
        ));
        assert!(matches!(
            w.exec(VmId::new_v4(), ExecRequest::shell("true"))
                .await
                .err(),
            Some(WorkerError::NotFound(_))
        ));

        // 3 MB of output, split over many frames, byte exact.
        let (out, _, code) = collect(
            w.exec(
                vm,
                ExecRequest::shell("head -c 3000000 /dev/zero | tr '\\0' a"),
            )
            .await
            .expect("exec"),
        )
        .await;
        assert_eq!(code.expect("exit"), 0);
        assert_eq!(out.len(), 3_000_000);
        assert!(out.iter().all(|b| *b == b'a'));

        // Stdin: 3 MiB in, its hash out.
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> = (0..3u8)
            .map(|i| Ok(bytes::Bytes::from(vec![b'x' + i; 1 << 20])))
            .collect();
        let mut want = sha2::Sha256::default();
        for c in chunks.iter().flatten() {
            sha2::Digest::update(&mut want, c);
        }
        let want = hex::encode(sha2::Digest::finalize(want));
        let events = w
            .exec_with_input(
                vm,
                ExecRequest::argv(["sha256sum"]),
                Box::pin(futures::stream::iter(chunks)),
            )
            .await
            .expect("exec with input");
        let (out, _, code) = collect(events).await;
        assert_eq!(code.expect("exit"), 0);
        assert!(
            String::from_utf8_lossy(&out).starts_with(&want),
            "{}",
            String::from_utf8_lossy(&out)
        );

        // An input that fails mid-way kills the process: the events end with an error.
        let failing = futures::stream::iter(vec![
            Ok(bytes::Bytes::from_static(b"partial")),
            Err(std::io::Error::other("the upload broke")),
        ]);
        let events = w
            .exec_with_input(
                vm,
                ExecRequest::shell("cat > /tmp/partial; echo done"),
                Box::pin(failing),
            )
            .await
            .expect("exec with input");
        let (out, _, code) = collect(events).await;
        assert!(
            code.is_err(),
            "a failed input must not look complete: {:?} {:?}",
            String::from_utf8_lossy(&out),
            code
        );

        // Dropping a stream cancels the process in the guest.
        let mut ev = w
            .exec(vm, ExecRequest::shell("echo started; exec sleep 300"))
            .await
            .expect("exec");
        assert!(matches!(ev.next().await, Some(Ok(ExecEvent::Stdout(_)))));
        drop(ev);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (out, _) = sh(&w, vm, "pgrep -x sleep || true").await;
            if out.trim().is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sleep still runs after the stream was dropped: {out}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }

        // A terminal: keystrokes in, output out, resize, exit code.
        let pty = w
            .open_pty(
                vm,
                PtySpec {
                    argv: vec!["sh".into()],
                    env: Default::default(),
                    term: "xterm".into(),
                    cols: 80,
                    rows: 24,
                },
            )
            .await
            .expect("pty");
        let mut events = pty.events;
        pty.input
            .send(PtyInput::Resize {
                cols: 100,
                rows: 30,
            })
            .await
            .expect("resize");
        pty.input
            .send(PtyInput::Data("stty size; echo hi-$((6*7))\n".into()))
            .await
            .expect("type");
        let mut seen = String::new();
        while !(seen.contains("hi-42") && seen.contains("30 100")) {
            match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
                Ok(Some(Ok(PtyEvent::Output(d)))) => seen.push_str(&String::from_utf8_lossy(&d)),
                other => panic!("terminal output: {other:?}; seen {seen:?}"),
            }
        }
        pty.input
            .send(PtyInput::Data("exit 5\n".into()))
            .await
            .expect("type");
        let exit = loop {
            match tokio::time::timeout(Duration::from_secs(20), events.next()).await {
                Ok(Some(Ok(PtyEvent::Output(_)))) => {}
                Ok(Some(Ok(PtyEvent::Exit(x)))) => break x,
                other => panic!("terminal exit: {other:?}"),
            }
        };
        assert_eq!(exit.code, 5);

        // Tunnels: a guest server reached through `connect` (the VM's network
        // address) and `open_guest_tcp` (dialed by the agent, to 127.0.0.1).
        let (_, code) = sh(
            &w,
            vm,
            "cat > /root/echo.py <<'PY'\nimport socket,sys\ns=socket.socket(socket.AF_INET6);s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0);s.bind(('::',7000));s.listen(8)\nwhile True:\n c,_=s.accept();d=b''\n while True:\n  b=c.recv(65536)\n  if not b: break\n  d+=b\n c.sendall(b'got '+str(len(d)).encode());c.close()\nPY\nsetsid python3 /root/echo.py </dev/null >/dev/null 2>&1 & \
             for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 7000), 1).close()' 2>/dev/null && exit 0; sleep 0.1; done; exit 1",
        )
        .await;
        assert_eq!(code, 0, "guest echo server did not start");
        for (how, mut s) in [
            ("connect", w.connect(vm, 7000).await.expect("connect")),
            (
                "guest tcp",
                w.open_guest_tcp(vm, "127.0.0.1", 7000)
                    .await
                    .expect("guest tcp"),
            ),
        ] {
            s.write_all(&vec![1u8; 100_000]).await.expect("write");
            s.shutdown().await.expect("half-close");
            let mut got = String::new();
            s.read_to_string(&mut got).await.expect("read");
            assert_eq!(got, "got 100000", "{how}");
        }
        assert!(matches!(
            w.open_guest_tcp(vm, "127.0.0.1", 7001).await.err(),
            Some(WorkerError::ConnectRefused(_))
        ));

        // The serial console: what the guest writes to ttyS0 streams out.
        let mut serial = w.open_serial(vm, 64 * 1024).await.expect("serial");
        sh(&w, vm, "echo serial-marker-$((40+2)) > /dev/ttyS0").await;
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("serial-marker-42") {
            match tokio::time::timeout(Duration::from_secs(10), serial.next()).await {
                Ok(Some(Ok(b))) => seen.extend_from_slice(&b),
                other => panic!(
                    "serial console: {other:?}; seen {:?}",
                    String::from_utf8_lossy(&seen)
                ),
            }
        }
        drop(serial);

        // Firewall, IPv6, stats.
        assert_eq!(
            w.enforced_firewall(vm).await.expect("enforced"),
            Some(firewall.clone())
        );
        w.set_firewall(vm, &FirewallPolicy::default())
            .await
            .expect("set firewall");
        assert_eq!(
            w.enforced_firewall(vm).await.expect("enforced"),
            Some(FirewallPolicy::default())
        );
        assert!(w.public_ipv6(vm).await.expect("ipv6").is_some());
        w.stats().await.expect("stats");

        // Volumes: create, attach (a real NFS mount in the guest), use, detach, delete.
        let vol = "vol_0a1b2c3d4e5f60718293a4";
        w.put_volume(vol, 64 << 20, false)
            .await
            .expect("put volume");
        w.attach_volume(vm, vol, "/mnt/remote", false)
            .await
            .expect("attach volume");
        assert_eq!(
            sh(
                &w,
                vm,
                "echo over the wire > /mnt/remote/f && cat /mnt/remote/f"
            )
            .await,
            ("over the wire\n".to_owned(), 0)
        );
        assert!(w.volume_used_bytes(vol).await.expect("used") > 0);
        assert!(matches!(
            w.delete_volume(vol).await,
            Err(WorkerError::Volume(m)) if m.contains("attached")
        ));
        assert_eq!(w.detach_volume(vm, vol).await.expect("detach"), None);
        assert!(matches!(
            w.detach_volume(vm, vol).await,
            Err(WorkerError::Volume(_))
        ));
        w.delete_volume(vol).await.expect("delete volume");
        assert!(matches!(
            w.put_volume("vol_x/../../etc", 1, false).await,
            Err(WorkerError::Volume(_))
        ));

        // Pause, resume, snapshot.
        w.pause(vm).await.expect("pause");
        assert_eq!(w.state(vm).await.expect("state"), Some(VmState::Paused));
        assert!(matches!(w.pause(vm).await, Err(WorkerError::WrongState(_))));
        w.resume(vm).await.expect("resume");
        let snap = SnapshotId::new_v4();
        w.snapshot(vm, snap).await.expect("snapshot");
        w.delete_snapshot(snap).await.expect("delete snapshot");

        // Fencing: after a re-registration (generation 2), the old token is refused.
        expected.set(Some(worker_token(SECRET, "wk_remote", 2)));
        assert!(
            matches!(w.state(vm).await, Err(WorkerError::Unreachable(m)) if m.contains("stale"))
        );
        assert!(matches!(
            w.delete(vm).await,
            Err(WorkerError::Unreachable(_))
        ));
        let w2 = remote(addr, 2);
        assert_eq!(w2.state(vm).await.expect("state"), Some(VmState::Running));

        // Delete; a second delete is fine.
        w2.delete(vm).await.expect("delete");
        w2.delete(vm).await.expect("delete again");
        assert_eq!(w2.list().await.expect("list"), vec![]);

        // A worker that is down is Unreachable, quickly.
        let t = Instant::now();
        let gone = RemoteWorker::new(WorkerEndpoint {
            id: "wk_gone".into(),
            address: "http://127.0.0.1:9".into(),
            token: "x".into(),
            generation: 1,
        })
        .expect("client");
        assert!(matches!(
            gone.list().await,
            Err(WorkerError::Unreachable(_))
        ));
        assert!(t.elapsed() < Duration::from_secs(5));
    });
}

/// The test images' registry: `oci_registry.py serve` (the SDK e2e tests'
/// helper) with the ready-made images pushed; stopped (SIGTERM) on drop.
struct TestRegistry {
    child: std::process::Child,
    host: String,
    images: serde_json::Value,
}

impl TestRegistry {
    fn start() -> Option<TestRegistry> {
        let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let python = repo.join(".venv/bin/python");
        if !python.is_file() || !std::path::Path::new("/usr/bin/docker-registry").is_file() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI: the import test needs .venv (httpx) and docker-registry (scripts/test sets them up)"
            );
            eprintln!("no .venv or docker-registry: skipping the import test");
            return None;
        }
        let mut child = std::process::Command::new(python)
            .arg(repo.join("sdk/python/tests/e2e/oci_registry.py"))
            .arg("serve")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start oci_registry.py serve");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout");
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .expect("registry refs");
        let refs: serde_json::Value = serde_json::from_str(&line).expect("refs JSON");
        Some(TestRegistry {
            child,
            host: refs["host"].as_str().expect("host").to_owned(),
            images: refs["images"].clone(),
        })
    }
    fn image(&self, name: &str) -> String {
        self.images[name].as_str().expect("image").to_owned()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        // SAFETY: kill by the pid of the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

#[test]
fn image_imports_cross_the_wire() {
    if std::env::var_os("FASTVM_E2E").is_none() && std::env::var_os("CI").is_none() {
        eprintln!("FASTVM_E2E is not set: skipping (needs QEMU)");
        return;
    }
    let Some(registry) = TestRegistry::start() else {
        return;
    };
    let dir = fastvm_e2e::data_dir("remote-import");
    let mut cfg = fastvm_e2e::config(&dir);
    cfg.insecure_registries = vec![registry.host.clone()];
    let rt = block_on(fastvm_worker::Runtime::open(cfg)).expect("open runtime");
    block_on(async {
        let local: Arc<dyn Worker> = Arc::new(LocalWorker::with_id(rt.clone(), "wk_remote"));
        let expected = ExpectedToken::default();
        expected.set(Some(worker_token(SECRET, "wk_remote", 1)));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, router(local, expected)).await });
        let w = remote(addr, 1);
        let machine = MachineType::lookup("c1m2").expect("c1m2");

        // An import: its notes arrive as they happen, the result at the end.
        let notes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink_notes = notes.clone();
        let sink: fastvm_worker_api::ImportSink = Arc::new(move |n| {
            if let Ok(mut v) = sink_notes.lock() {
                v.push(n);
            }
        });
        let (import_id, snapshot) = (VmId::new_v4(), SnapshotId::new_v4());
        let job = |id: VmId, snapshot: SnapshotId, image: String| fastvm_worker_api::ImageImport {
            import_id: id.to_string(),
            snapshot,
            image,
            platform: None,
            registry_username: None,
            registry_password: None,
            machine,
            disk_gib: 2,
        };
        let done = w
            .import_image(job(import_id, snapshot, registry.image("busybox")), sink)
            .await
            .expect("import over the wire");
        assert!(done.manifest_digest.starts_with("sha256:"));
        assert_eq!(done.user.as_deref(), Some("app"));
        let phases: Vec<String> = notes
            .lock()
            .expect("notes")
            .iter()
            .filter_map(|n| match n {
                fastvm_worker_api::ImportNote::Event { phase, status, .. } => {
                    Some(format!("{phase}:{status}"))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            phases,
            [
                "pull:started",
                "pull:completed",
                "export:started",
                "export:completed",
                "saving:started",
                "saving:completed",
                "warming:started",
                "warming:completed"
            ]
        );
        // Its snapshot restores like any other, with the image's defaults.
        let vm = VmId::new_v4();
        w.create(VmSpec {
            id: vm,
            machine,
            hostname: "imported".into(),
            env: Default::default(),
            snapshot: Some(snapshot),
            firewall: FirewallPolicy::default(),
        })
        .await
        .expect("restore the imported snapshot");
        assert_eq!(
            sh(&w, vm, "id -un; pwd").await,
            ("app\n/home/app\n".into(), 0)
        );
        w.delete(vm).await.expect("delete");

        // Errors keep their kind: an Import error with the registry's answer.
        let err = w
            .import_image(
                job(
                    VmId::new_v4(),
                    SnapshotId::new_v4(),
                    format!("{}/nope:1", registry.host),
                ),
                Arc::new(|_| {}),
            )
            .await
            .expect_err("a missing image");
        assert!(
            matches!(&err, WorkerError::Import(m) if m.contains("not found")),
            "{err:?}"
        );

        // Dropping the call (a cancelled import) stops the worker's import:
        // its build VM and scratch directory go.
        let cancelled = VmId::new_v4();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink: fastvm_worker_api::ImportSink = Arc::new(move |n| {
            let _ = tx.send(n);
        });
        let import = w.import_image(
            job(cancelled, SnapshotId::new_v4(), registry.image("layered")),
            sink,
        );
        tokio::select! {
            r = import => panic!("the import ended before its cancel: {r:?}"),
            _ = async {
                while let Some(n) = rx.recv().await {
                    if matches!(&n, fastvm_worker_api::ImportNote::Event { phase, status, .. } if phase == "saving" && status == "started") {
                        break;
                    }
                }
            } => {}
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while dir.join("vms").join(cancelled.to_string()).exists()
            || dir.join("imports").join(cancelled.to_string()).exists()
        {
            assert!(
                Instant::now() < deadline,
                "the cancelled import left its files"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(rt.list().is_empty(), "no VM left: {:?}", rt.list());
        w.delete_snapshot(snapshot).await.expect("delete snapshot");

        // A Dockerfile build: the context streams after the OPEN frame, the
        // builder VM pulls nothing itself (the FROM image is on a loopback
        // registry only this host reaches).
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default();
        zip.start_file("Dockerfile", opts).expect("zip");
        std::io::Write::write_all(
            &mut zip,
            format!(
                "FROM {}\nUSER root\nCOPY note.txt /note.txt\nRUN echo built >> /note.txt\n",
                registry.image("busybox")
            )
            .as_bytes(),
        )
        .expect("zip");
        zip.start_file("note.txt", opts).expect("zip");
        std::io::Write::write_all(&mut zip, b"from the context\n").expect("zip");
        let context = zip.finish().expect("zip").into_inner();
        let built_snapshot = SnapshotId::new_v4();
        let build = fastvm_worker_api::DockerfileImport {
            import_id: VmId::new_v4().to_string(),
            snapshot: built_snapshot,
            dockerfile_path: "Dockerfile".into(),
            build_args: Default::default(),
            target: None,
            registry_host: None,
            registry_username: None,
            registry_password: None,
            context_bytes: context.len() as u64,
            machine,
            disk_gib: 2,
        };
        let body: fastvm_worker_api::ByteStream =
            Box::pin(futures::stream::iter(vec![Ok(bytes::Bytes::from(context))]));
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let sink_log = log.clone();
        let built = w
            .build_dockerfile(
                build,
                body,
                Arc::new(move |n| {
                    if let (fastvm_worker_api::ImportNote::Log { line }, Ok(mut l)) =
                        (n, sink_log.lock())
                    {
                        l.push_str(&line);
                        l.push('\n');
                    }
                }),
            )
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "build over the wire: {e:?}\n{}",
                    log.lock().map(|l| l.clone()).unwrap_or_default()
                )
            });
        assert!(built.manifest_digest.starts_with("sha256:"));
        let vm = VmId::new_v4();
        w.create(VmSpec {
            id: vm,
            machine,
            hostname: "built".into(),
            env: Default::default(),
            snapshot: Some(built_snapshot),
            firewall: FirewallPolicy::default(),
        })
        .await
        .expect("restore the built snapshot");
        assert_eq!(
            sh(&w, vm, "cat /note.txt; id -un").await,
            ("from the context\nbuilt\nroot\n".into(), 0)
        );
        w.delete(vm).await.expect("delete");
        w.delete_snapshot(built_snapshot)
            .await
            .expect("delete snapshot");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !rt.list().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the builder VM stayed: {:?}",
                rt.list()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    drop(registry);
}
