//! Volumes end to end at the worker: real guests mount volumes served by
//! the worker over NFSv3 (crates/fastvm-worker/src/volumes), share them,
//! respect read-only attachments and size limits, and let go of them.
//! (The server's file system alone, including hostile names and forged
//! handles, is unit-tested in crates/fastvm-worker/src/volumes/tests.rs.)

use fastvm_e2e::{block_on, runtime};
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecOutput, ExecRequest, Runtime};
use std::sync::Arc;
use std::time::{Duration, Instant};

const VOL: &str = "vol_00112233445566778899aa";
const MIB: u64 = 1 << 20;

fn sh(rt: &Runtime, vm: &str, cmd: &str) -> ExecOutput {
    block_on(rt.exec_buffered(vm, &ExecRequest::shell(cmd), 1 << 20)).expect("exec")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn ok(rt: &Runtime, vm: &str, cmd: &str) -> String {
    let out = sh(rt, vm, cmd);
    assert_eq!(
        out.exit_code,
        0,
        "{cmd}: stdout {} stderr {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn boot(rt: &Arc<Runtime>, name: &str) -> String {
    let req = CreateVm {
        machine: "c1m2".into(),
        hostname: Some(name.into()),
        ..Default::default()
    };
    block_on(rt.create(req)).expect("boot").id
}

#[test]
fn a_volume_shared_by_two_guests_read_only_sized_and_detached() {
    let rt = runtime("volumes");
    let (a, b) = (boot(&rt, "vol-a"), boot(&rt, "vol-b"));
    rt.create_volume(VOL, 8 * MIB, false)
        .expect("create volume");

    // Hot attach to two running VMs: read-write in one, read-only in the other.
    let t = Instant::now();
    block_on(rt.attach_volume(&a, VOL, "/mnt/shared", false)).expect("attach rw");
    eprintln!(
        "attach (first: starts the VM's NFS server) {:?}",
        t.elapsed()
    );
    block_on(rt.attach_volume(&b, VOL, "/data/shared", true)).expect("attach ro");
    assert!(ok(&rt, &a, "grep ' /mnt/shared ' /proc/mounts").contains("nfs"));

    // A write in one guest is seen by the other (close-to-open consistency).
    ok(
        &rt,
        &a,
        "echo hello from a > /mnt/shared/greeting && mkdir -p /mnt/shared/d/e",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = sh(&rt, &b, "cat /data/shared/greeting");
        if out.exit_code == 0 {
            assert_eq!(text(&out.stdout), "hello from a\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "b never saw a's file: {}",
            text(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // On the host, in the volume's directory.
    // The read-only attachment refuses writes (the server refuses them too).
    let out = sh(&rt, &b, "echo no > /data/shared/nope");
    assert_ne!(out.exit_code, 0);
    assert!(
        text(&out.stderr).contains("Read-only"),
        "{}",
        text(&out.stderr)
    );
    // Renames, appends, symlinks (stored as text, resolved by the guest).
    ok(
        &rt,
        &a,
        "cd /mnt/shared && echo more >> greeting && mv greeting d/e/g && ln -s /etc etc-link \
         && test \"$(readlink etc-link)\" = /etc && test -f etc-link/hostname",
    );
    assert_eq!(ok(&rt, &a, "cat /mnt/shared/d/e/g"), "hello from a\nmore\n");

    // The size is a limit: 8 MiB do not hold 12 MiB...
    let out = sh(
        &rt,
        &a,
        "dd if=/dev/zero of=/mnt/shared/big bs=1M count=12 conv=fsync 2>&1",
    );
    assert_ne!(out.exit_code, 0, "12 MiB fit in 8: {}", text(&out.stdout));
    assert!(
        text(&out.stdout).contains("No space left"),
        "{}",
        text(&out.stdout)
    );
    ok(&rt, &a, "rm -f /mnt/shared/big");
    // ...until the volume grows, online: no remount.
    rt.update_volume(VOL, 32 * MIB, false).expect("grow");
    ok(
        &rt,
        &a,
        "dd if=/dev/zero of=/mnt/shared/big bs=1M count=12 conv=fsync 2>&1",
    );
    let used = rt.volume_used_bytes(VOL).expect("used");
    assert!(used >= 12 * MIB, "used {used}");

    // Deleting the volume is refused while it is attached.
    assert!(block_on(rt.delete_volume(VOL)).is_err());

    // Detach while a process holds a file open: a warning, the VM keeps running.
    ok(&rt, &a, "cd /mnt/shared && (sleep 600 < big &) ; sleep 0.2");
    let warning = block_on(rt.detach_volume(&a, VOL)).expect("detach a");
    assert!(
        matches!(warning, Some(fastvm_worker_api::DetachNote::Busy(_))),
        "no busy note for a busy mount: {warning:?}"
    );
    eprintln!("detach warning: {warning:?}");
    assert_eq!(ok(&rt, &a, "echo alive"), "alive\n");
    assert!(!ok(&rt, &a, "cat /proc/mounts").contains("/mnt/shared"));
    // The other VM still has it; a clean detach has no warning.
    assert_eq!(
        ok(&rt, &b, "cat /data/shared/d/e/g"),
        "hello from a\nmore\n"
    );
    assert_eq!(block_on(rt.detach_volume(&b, VOL)).expect("detach b"), None);
    assert!(
        block_on(rt.detach_volume(&b, VOL)).is_err(),
        "detached twice"
    );

    // The data outlives the VMs: a new VM attaches it and reads it.
    block_on(rt.delete(&a)).expect("delete a");
    let c = boot(&rt, "vol-c");
    block_on(rt.attach_volume(&c, VOL, "/mnt/again", false)).expect("attach c");
    assert_eq!(ok(&rt, &c, "cat /mnt/again/d/e/g"), "hello from a\nmore\n");
    block_on(rt.detach_volume(&c, VOL)).expect("detach c");
    block_on(rt.delete_volume(VOL)).expect("delete volume");
    assert!(block_on(rt.attach_volume(&c, VOL, "/mnt/gone", false)).is_err());
    for vm in [&b, &c] {
        block_on(rt.delete(vm)).expect("delete");
    }
}
