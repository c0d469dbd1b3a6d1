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
