//! End-to-end tests of the worker runtime with real QEMU guests (TCG here).

use fastvm_e2e::{block_on, config, data_dir, kill_vms_in, rss_bytes, runtime};
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecEvent, ExecRequest, Runtime, VmState};
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

const CAP: usize = 4 << 20;

/// One VM shared by every test that cannot disturb the others.
static SHARED: LazyLock<(Arc<Runtime>, String)> = LazyLock::new(|| {
    let rt = runtime("shared");
    let env = BTreeMap::from([("FASTVM_TEST_VAR".to_owned(), "hello world".to_owned())]);
    let req = CreateVm {
        machine: "c1m2".into(),
        hostname: Some("shared-vm".into()),
        env,
        ..Default::default()
    };
    let start = Instant::now();
    let info = block_on(rt.create(req)).expect("boot shared VM");
    eprintln!("shared VM {} booted in {:?}", info.id, start.elapsed());
    (rt, info.id)
});

fn run(cmd: &str) -> fastvm_worker::ExecOutput {
    let (rt, id) = &*SHARED;
    block_on(rt.exec_buffered(id, &ExecRequest::shell(cmd), CAP)).expect("exec")
}

#[test]
fn echo_hi() {
    let out = run("echo hi");
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(out.exit_code, 0);
    assert!(!out.timed_out && !out.stdout_truncated);
}

#[test]
fn nonzero_exit_and_stderr() {
    let out = run("echo oops >&2; exit 42");
    assert_eq!(out.exit_code, 42);
    assert_eq!(out.stderr, b"oops\n");
    assert!(out.stdout.is_empty());
}

#[test]
fn argv_is_passed_verbatim() {
    let (rt, id) = &*SHARED;
    let req = ExecRequest::argv(["printf", "%s|", "a b", "$HOME", "'q'"]);
    let out = block_on(rt.exec_buffered(id, &req, CAP)).expect("exec");
    assert_eq!(out.stdout, b"a b|$HOME|'q'|");
}

#[test]
fn binary_output_is_byte_exact() {
    let out = run("python3 -c 'import sys; sys.stdout.buffer.write(bytes(range(256))*4)'");
    let want: Vec<u8> = (0..4).flat_map(|_| 0u8..=255).collect();
    assert_eq!(out.stdout, want);
}

#[test]
fn spawn_failure_is_a_result() {
    let (rt, id) = &*SHARED;
    let out =
        block_on(rt.exec_buffered(id, &ExecRequest::argv(["/no/such/binary"]), CAP)).expect("exec");
    assert_eq!(out.exit_code, 127);
    assert!(
        out.error.as_deref().unwrap_or("").contains("No such file"),
        "{:?}",
        out.error
    );
}

#[test]
fn env_vars_and_hostname_reach_every_exec() {
    let out = run("echo \"$FASTVM_TEST_VAR\"; hostname; cat /proc/1/comm");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines, ["hello world", "shared-vm", "init"], "{text}");
}

#[test]
fn per_exec_env_and_cwd() {
    let (rt, id) = &*SHARED;
    let mut req = ExecRequest::shell("echo $X; pwd");
    req.env.insert("X".into(), "y".into());
    req.cwd = Some("/tmp".into());
    let out = block_on(rt.exec_buffered(id, &req, CAP)).expect("exec");
    assert_eq!(out.stdout, b"y\n/tmp\n");
}

#[test]
fn timeout_kills_the_process_group() {
    let (rt, id) = &*SHARED;
    let req = ExecRequest::shell("sleep 300 & sleep 301; echo never")
        .with_timeout(Duration::from_secs(2));
    let start = Instant::now();
    let out = block_on(rt.exec_buffered(id, &req, CAP)).expect("exec");
    assert!(out.timed_out);
    assert_ne!(out.exit_code, 0);
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(out.stdout.is_empty());
    // Both sleeps were in the killed group.
    let left = run("ps -eo args | grep -c '^sleep 30[01]$' || true");
    assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "0");
}

#[test]
fn buffered_output_is_capped_and_flagged() {
    let out = run("head -c 5000000 /dev/zero; head -c 10 /dev/zero >&2");
    assert_eq!(out.stdout.len(), CAP);
    assert!(out.stdout_truncated);
    assert_eq!(out.stderr.len(), 10);
    assert!(!out.stderr_truncated);
    assert_eq!(out.exit_code, 0);
}

#[test]
fn sixty_four_mib_streamed_with_flat_memory() {
    let (rt, id) = &*SHARED;
    // RSS is the whole test process's, and other tests run beside this one
    // (a few MiB of noise): stream much more than the bound, so a host that
    // buffered the output would show it whatever the noise.
    let total = 64usize << 20;
    let before = rss_bytes();
    let (got, peak, code) = block_on(async {
        let mut stream = rt
            .exec(
                id,
                &ExecRequest::shell(&format!("head -c {total} /dev/urandom")),
            )
            .await
            .expect("exec");
        let (mut got, mut peak, mut n, mut code) = (0usize, 0u64, 0u32, None);
        while let Some(ev) = stream.next().await {
            match ev.expect("event") {
                ExecEvent::Stdout(d) => got += d.len(),
                ExecEvent::Stderr(_) => {}
                ExecEvent::Exit(s) => code = Some(s.code),
            }
            n += 1;
            // A slow consumer at first: the guest must wait, not the host buffer.
            if n < 20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            peak = peak.max(rss_bytes());
        }
        (got, peak, code)
    });
    assert_eq!(got, total);
    assert_eq!(code, Some(0));
    let growth = peak.saturating_sub(before);
    eprintln!("streamed {total} bytes; test process RSS grew by {growth} bytes");
    assert!(
        growth < 24 << 20,
        "RSS grew by {growth} bytes while streaming {total} bytes"
    );
}

#[test]
fn eight_concurrent_execs() {
    let (rt, id) = &*SHARED;
    let outs = block_on(async {
        let mut tasks = Vec::new();
        for i in 0..8 {
            let (rt, id) = (rt.clone(), id.clone());
            tasks.push(tokio::spawn(async move {
                let req = ExecRequest::shell(&format!("sleep 1; echo task-{i}; echo err-{i} >&2"));
                rt.exec_buffered(&id, &req, CAP).await
            }));
        }
        let mut outs = Vec::new();
        for t in tasks {
            outs.push(t.await.expect("join").expect("exec"));
        }
        outs
    });
    for (i, out) in outs.iter().enumerate() {
        assert_eq!(out.stdout, format!("task-{i}\n").as_bytes());
        assert_eq!(out.stderr, format!("err-{i}\n").as_bytes());
    }
}

#[test]
fn dropping_a_stream_cancels_the_process() {
    let (rt, id) = &*SHARED;
    block_on(async {
        let mut s = rt
            .exec(id, &ExecRequest::shell("echo started; exec sleep 250"))
            .await
            .expect("exec");
        assert!(matches!(s.next().await, Some(Ok(ExecEvent::Stdout(_)))));
        drop(s);
    });
    std::thread::sleep(Duration::from_millis(500));
    let left = run("ps -eo args | grep -c '^sleep 250$' || true");
    assert_eq!(String::from_utf8_lossy(&left.stdout).trim(), "0");
}

#[test]
fn unknown_machine_type_is_a_clear_error() {
    let (rt, _) = &*SHARED;
    let err = block_on(rt.create(CreateVm {
        machine: "c3m7".into(),
        ..Default::default()
    }))
    .expect_err("unknown type");
    assert!(err.to_string().contains("unknown machine type"), "{err}");
}

/// A worker restart re-adopts running VMs (exec works again) and reports
/// the ones whose QEMU died meanwhile as stopped; a QEMU killed from outside
/// while the worker runs is noticed too.
#[test]
fn restart_readopts_and_dead_vms_are_stopped() {
    let dir = data_dir("restart");
    // Worker A on its own tokio runtime: dropping that runtime closes every
    // connection A had, as a crashed worker process would.
    let (alive, doomed) = {
        let rt_a = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("rt");
        let ids = rt_a.block_on(async {
            let a = Runtime::open(config(&dir)).await.expect("open A");
            let (v1, v2) = tokio::join!(
                a.create(CreateVm {
                    machine: "c1m2".into(),
                    ..Default::default()
                }),
                a.create(CreateVm {
                    machine: "c1m2".into(),
                    ..Default::default()
                }),
            );
            let v1 = v1.expect("boot v1");
            a.exec_buffered(
                &v1.id,
                &ExecRequest::shell("echo before > /root/marker"),
                CAP,
            )
            .await
            .expect("write marker");
            (v1.id, v2.expect("boot v2"))
        });
        drop(rt_a);
        ids
    };
    // QEMU of v2 dies while no worker runs.
    let pid = doomed.pid.expect("pid") as i32;
    // SAFETY: kill by the pid of a QEMU this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));

    let b = block_on(Runtime::open(config(&dir))).expect("open B");
    assert_eq!(b.get(&alive).expect("v1").state, VmState::Running);
    assert_eq!(b.get(&doomed.id).expect("v2").state, VmState::Stopped);
    let out = block_on(b.exec_buffered(&alive, &ExecRequest::shell("cat /root/marker"), CAP))
        .expect("exec after restart");
    assert_eq!(out.stdout, b"before\n");

    // Killed from outside while worker B watches.
    let pid = b.get(&alive).expect("v1").pid.expect("pid") as i32;
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while b.get(&alive).expect("v1").state == VmState::Running && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(b.get(&alive).expect("v1").state, VmState::Stopped);
    assert!(block_on(b.exec_buffered(&alive, &ExecRequest::shell("true"), CAP)).is_err());
    kill_vms_in(&dir);
}

#[test]
fn pause_resume_and_delete() {
    let rt = runtime("lifecycle");
    let vm = block_on(rt.create(CreateVm {
        machine: "c1m2".into(),
        ..Default::default()
    }))
    .expect("boot");
    // A busy guest, then paused: its QEMU must stop burning CPU.
    block_on(rt.exec_buffered(
        &vm.id,
        &ExecRequest::shell("nohup sh -c 'while :; do :; done' >/dev/null 2>&1 &"),
        CAP,
    ))
    .expect("spin");
    assert_eq!(
        block_on(rt.pause(&vm.id)).expect("pause").state,
        VmState::Paused
    );
    let pid = vm.pid.expect("pid");
    let cpu_ticks = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let fields: Vec<u64> = stat
            .rsplit_once(')')
            .expect("comm")
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().expect("tick"))
            .collect();
        fields[0] + fields[1]
    };
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let used = cpu_ticks() - before;
    assert!(
        used <= 5,
        "paused VM used {used} CPU ticks (1/100 s) in 1 s"
    );
    assert!(block_on(rt.exec_buffered(&vm.id, &ExecRequest::shell("true"), CAP)).is_err());
    assert!(
        block_on(rt.pause(&vm.id)).is_err(),
        "pausing twice is an error"
    );
    assert_eq!(
        block_on(rt.resume(&vm.id)).expect("resume").state,
        VmState::Running
    );
    let out =
        block_on(rt.exec_buffered(&vm.id, &ExecRequest::shell("echo back"), CAP)).expect("exec");
    assert_eq!(out.stdout, b"back\n");
    let pid = vm.pid.expect("pid");
    block_on(rt.delete(&vm.id)).expect("delete");
    assert!(rt.get(&vm.id).is_err());
    assert!(
        fastvm_e2e::process_gone(pid),
        "QEMU {pid} still runs after delete"
    );
}

#[test]
fn clean_shutdown_stops_the_vm() {
    let rt = runtime("shutdown");
    let vm = block_on(rt.create(CreateVm {
        machine: "c1m2".into(),
        ..Default::default()
    }))
    .expect("boot");
    let info = block_on(rt.stop(&vm.id)).expect("stop");
    assert_eq!(info.state, VmState::Stopped);
    assert_eq!(info.pid, None);
}
