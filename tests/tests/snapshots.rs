//! End-to-end tests of snapshots and restores with real guests.

use fastvm_e2e::{block_on, runtime};
use fastvm_worker::runtime::{CreateVm, SnapshotRecord};
use fastvm_worker::{ExecOutput, ExecRequest, Runtime, VmState};
use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

const CAP: usize = 1 << 20;

/// A source VM running a counter in the background, with a file written,
/// and a snapshot of it.
struct Fixture {
    rt: Arc<Runtime>,
    source: String,
    snap: SnapshotRecord,
}

static FIX: LazyLock<Fixture> = LazyLock::new(|| {
    let rt = runtime("snapshots");
    let env = BTreeMap::from([("SNAP_ENV".to_owned(), "from-source".to_owned())]);
    let vm = block_on(rt.create(CreateVm {
        machine: "c1m2".into(),
        hostname: Some("source".into()),
        env,
        ..Default::default()
    }))
    .expect("boot source");
    // 48 MiB of random bytes in tmpfs: guest RAM only, checked by hash in clones.
    let setup = "head -c 48M /dev/urandom > /dev/shm/blob; sha256sum /dev/shm/blob > /root/blob.sha; \
                 echo payload > /root/file; \
                 nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /tmp/counter.new; mv /tmp/counter.new /tmp/counter; sleep 0.1; done' >/dev/null 2>&1 & \
                 sleep 1; cat /tmp/counter";
    let out = block_on(rt.exec_buffered(&vm.id, &ExecRequest::shell(setup), CAP)).expect("setup");
    assert_eq!(out.exit_code, 0, "{out:?}");
    let start = Instant::now();
    let snap = block_on(rt.snapshot(&vm.id, None)).expect("snapshot");
    eprintln!("snapshot {} taken in {:?}", snap.id, start.elapsed());
    Fixture {
        rt: rt.clone(),
        source: vm.id,
        snap,
    }
});

fn run(rt: &Runtime, id: &str, cmd: &str) -> ExecOutput {
    block_on(rt.exec_buffered(id, &ExecRequest::shell(cmd), CAP)).expect("exec")
}

fn text(o: &ExecOutput) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_owned()
}

fn restore(fix: &Fixture) -> String {
    let t = Instant::now();
    let vm = block_on(fix.rt.create(CreateVm {
        snapshot: Some(fix.snap.id.clone()),
        ..Default::default()
    }))
    .expect("restore");
    eprintln!("restored {} in {:?}", vm.id, t.elapsed());
    assert_eq!(vm.state, VmState::Running);
    vm.id
}

#[test]
fn restore_keeps_processes_files_env_and_memory() {
    let fix = &*FIX;
    let clone = restore(fix);
    let c1: u64 = text(&run(&fix.rt, &clone, "cat /tmp/counter"))
        .parse()
        .expect("counter");
    // The counter kept its value across the restore (memory intact), not restarted from 1...
    assert!(c1 >= 5, "counter restarted: {c1}");
    std::thread::sleep(Duration::from_millis(800));
    // ...and the process still runs.
    let c2: u64 = text(&run(&fix.rt, &clone, "cat /tmp/counter"))
        .parse()
        .expect("counter");
    assert!(
        c2 > c1,
        "counter process not running after restore: {c1} -> {c2}"
    );
    assert_eq!(text(&run(&fix.rt, &clone, "cat /root/file")), "payload");
    assert_eq!(text(&run(&fix.rt, &clone, "echo $SNAP_ENV")), "from-source");
    block_on(fix.rt.delete(&clone)).expect("delete clone");
}

/// The idle-cost settings (issue 20) are in the golden snapshot every launch
/// restores, and survive a user snapshot and its restore: the guest booted
/// with them (watchdog off, no proactive compaction, 10 s VM statistics) and
/// the machine's PIT choice travels with the snapshot's launch spec.
#[test]
fn restored_guests_keep_the_idle_settings() {
    let fix = &*FIX;
    let accel = fix.rt.accel();
    assert_eq!(
        fix.snap.launch.pit,
        fastvm_worker::qemu::pit_needed(accel),
        "the snapshot records the machine's PIT choice"
    );
    let clone = restore(fix);
    let probe = "cat /proc/sys/kernel/watchdog /proc/sys/vm/compaction_proactiveness \
                 /proc/sys/vm/stat_interval; cat /proc/cmdline";
    for id in [&fix.source, &clone] {
        let out = run(&fix.rt, id, probe);
        assert_eq!(out.exit_code, 0, "{out:?}");
        let t = text(&out);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[..3], ["0", "0", "10"], "{t}");
        let timer_check_skipped = lines[3].split(' ').any(|w| w == "no_timer_check");
        assert_eq!(
            timer_check_skipped, !fix.snap.launch.pit,
            "no_timer_check exactly when the PIT is gone: {t}"
        );
    }
    block_on(fix.rt.delete(&clone)).expect("delete clone");
}

#[test]
fn clones_are_independent_of_each_other_and_the_source() {
    let fix = &*FIX;
    let (a, b) = (restore(fix), restore(fix));
    run(&fix.rt, &a, "echo A > /root/x; sync");
    run(&fix.rt, &b, "echo B > /root/x; sync");
    assert_eq!(text(&run(&fix.rt, &a, "cat /root/x")), "A");
    assert_eq!(text(&run(&fix.rt, &b, "cat /root/x")), "B");
    assert_eq!(
        run(&fix.rt, &fix.source, "cat /root/x").exit_code,
        1,
        "clone writes leaked into the source"
    );
    run(&fix.rt, &fix.source, "echo S > /root/y; sync");
    assert_eq!(
        run(&fix.rt, &a, "cat /root/y").exit_code,
        1,
        "source writes leaked into a clone"
    );
    for id in [a, b] {
        block_on(fix.rt.delete(&id)).expect("delete");
    }
}

#[test]
fn clones_get_their_own_identity_clock_and_randomness() {
    let fix = &*FIX;
    let (a, b) = (restore(fix), restore(fix));
    let ha = text(&run(&fix.rt, &a, "hostname"));
    let hb = text(&run(&fix.rt, &b, "hostname"));
    assert_ne!(ha, "source");
    assert_ne!(ha, hb);
    assert_eq!(ha, format!("vm-{}", a.split('-').next().expect("id")));
    let ra = text(&run(&fix.rt, &a, "head -c 16 /dev/urandom | od -An -tx1"));
    let rb = text(&run(&fix.rt, &b, "head -c 16 /dev/urandom | od -An -tx1"));
    assert_ne!(ra, rb, "clones share their random stream");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs() as i64;
    let guest: i64 = text(&run(&fix.rt, &a, "date +%s")).parse().expect("date");
    assert!(
        (guest - now).abs() <= 5,
        "guest clock {guest} vs host {now}"
    );
    for id in [a, b] {
        block_on(fix.rt.delete(&id)).expect("delete");
    }
}

#[test]
fn source_keeps_running_after_snapshot() {
    let fix = &*FIX;
    assert_eq!(
        fix.rt.get(&fix.source).expect("source").state,
        VmState::Running
    );
    let c1: u64 = text(&run(&fix.rt, &fix.source, "cat /tmp/counter"))
        .parse()
        .expect("counter");
    std::thread::sleep(Duration::from_millis(500));
    let c2: u64 = text(&run(&fix.rt, &fix.source, "cat /tmp/counter"))
        .parse()
        .expect("counter");
    assert!(c2 > c1);
    assert_eq!(text(&run(&fix.rt, &fix.source, "hostname")), "source");
}

/// The disk chain a VM's spec.json records (writable layer first).
fn layers_of(rt: &Runtime, id: &str) -> Vec<std::path::PathBuf> {
    let spec = std::fs::read(rt.vm_dir(id).expect("vm dir").join("spec.json")).expect("spec.json");
    let v: serde_json::Value = serde_json::from_slice(&spec).expect("json");
    v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l.as_str().expect("path").into())
        .collect()
}

#[test]
fn deleting_a_snapshot_keeps_its_clones_and_reclaims_layers_later() {
    let fix = &*FIX;
    // c: a clone of the fixture; s2: a snapshot of c; d: a clone of s2.
    let c = restore(fix);
    run(&fix.rt, &c, "echo from-c > /root/c; sync");
    let s2 = block_on(fix.rt.snapshot(&c, None)).expect("snapshot of a clone");
    let d = block_on(fix.rt.create(CreateVm {
        snapshot: Some(s2.id.clone()),
        ..Default::default()
    }))
    .expect("restore")
    .id;
    block_on(fix.rt.delete_snapshot(&s2.id)).expect("delete snapshot");
    assert!(fix.rt.snapshot_record(&s2.id).is_err());
    assert!(block_on(fix.rt.create(CreateVm {
        snapshot: Some(s2.id.clone()),
        ..Default::default()
    }))
    .is_err());
    let (c_top, frozen, d_top) = (
        layers_of(&fix.rt, &c)[0].clone(),
        s2.layers[0].clone(),
        layers_of(&fix.rt, &d)[0].clone(),
    );
    block_on(fix.rt.delete(&c)).expect("delete c");
    assert!(!c_top.exists(), "c's writable layer must go with c");
    assert!(
        frozen.exists(),
        "the frozen layer d stands on must stay after its snapshot and source are gone"
    );
    assert_eq!(
        text(&run(&fix.rt, &d, "cat /root/c /root/file")),
        "from-c\npayload"
    );
    // d's base (s2's RAM file) is gone: its capture cannot read the pages
    // d did not write from it and migrates the RAM instead; either way the
    // snapshot holds d's memory and disk.
    run(&fix.rt, &d, "echo in-ram-of-d > /dev/shm/d");
    let s3 =
        block_on(fix.rt.snapshot(&d, None)).expect("snapshot of a clone of a deleted snapshot");
    let e = block_on(fix.rt.create(CreateVm {
        snapshot: Some(s3.id.clone()),
        ..Default::default()
    }))
    .expect("restore")
    .id;
    assert_eq!(
        text(&run(&fix.rt, &e, "cat /dev/shm/d /root/c /root/file; sha256sum -c /root/blob.sha >/dev/null && echo blob-ok")),
        "in-ram-of-d\nfrom-c\npayload\nblob-ok"
    );
    block_on(fix.rt.delete(&e)).expect("delete e");
    block_on(fix.rt.delete_snapshot(&s3.id)).expect("delete s3");
    block_on(fix.rt.delete(&d)).expect("delete d");
    assert!(
        !d_top.exists() && !frozen.exists(),
        "d's layer and the orphaned frozen layer must be reclaimed"
    );
    // The fixture's own chain is untouched.
    assert!(fix.snap.layers.iter().all(|l| l.exists()));
}

#[test]
fn paused_vm_can_be_snapshotted() {
    let fix = &*FIX;
    let vm = restore(fix);
    block_on(fix.rt.pause(&vm)).expect("pause");
    let snap = block_on(fix.rt.snapshot(&vm, None)).expect("snapshot paused VM");
    assert_eq!(fix.rt.get(&vm).expect("vm").state, VmState::Paused);
    block_on(fix.rt.resume(&vm)).expect("resume");
    assert_eq!(text(&run(&fix.rt, &vm, "cat /root/file")), "payload");
    let clone = block_on(fix.rt.create(CreateVm {
        snapshot: Some(snap.id.clone()),
        ..Default::default()
    }))
    .expect("restore")
    .id;
    assert_eq!(text(&run(&fix.rt, &clone, "cat /root/file")), "payload");
    for id in [vm, clone] {
        block_on(fix.rt.delete(&id)).expect("delete");
    }
    block_on(fix.rt.delete_snapshot(&snap.id)).expect("delete snapshot");
}

#[test]
fn corrupt_snapshot_state_is_an_error_not_a_hang() {
    let fix = &*FIX;
    let snap = block_on(fix.rt.snapshot(&fix.source, None)).expect("snapshot");
    std::fs::write(&snap.memory, b"garbage, not a migration stream").expect("corrupt");
    let start = Instant::now();
    let err = block_on(fix.rt.create(CreateVm {
        snapshot: Some(snap.id.clone()),
        ..Default::default()
    }))
    .expect_err("restore must fail");
    assert!(start.elapsed() < Duration::from_secs(60));
    assert!(
        err.to_string().contains("restore failed") || err.to_string().contains("exited"),
        "{err}"
    );
    block_on(fix.rt.delete_snapshot(&snap.id)).expect("delete snapshot");
}

/// Blocks a file has on disk (holes take none).
fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

#[test]
fn user_snapshot_ram_is_a_file_clones_map_copy_on_write() {
    let fix = &*FIX;
    // The RAM went into its own sparse file, the stream kept the rest.
    let ram = fix
        .snap
        .ram
        .as_ref()
        .expect("a user snapshot has a RAM file");
    let len = std::fs::metadata(ram).expect("ram file").len();
    assert_eq!(len, 2048 << 20, "RAM file as large as the guest's RAM");
    let (data, stream) = (
        allocated(ram),
        std::fs::metadata(&fix.snap.memory).expect("memory").len(),
    );
    eprintln!(
        "RAM file {} MiB allocated of {} MiB; stream {} KiB",
        data >> 20,
        len >> 20,
        stream >> 10
    );
    assert!(
        data >= 48 << 20,
        "the tmpfs blob is in the RAM file: {data}"
    );
    assert!(data < len / 2, "untouched RAM left as holes: {data}");
    assert!(
        stream < 8 << 20,
        "the stream holds no RAM pages: {stream} bytes"
    );
    // Clones see the RAM as captured; one clone's writes stay its own.
    let (a, b) = (restore(fix), restore(fix));
    for id in [&a, &b] {
        let ok = run(&fix.rt, id, "sha256sum -c /root/blob.sha");
        assert_eq!(
            ok.exit_code, 0,
            "tmpfs content differs after restore: {ok:?}"
        );
    }
    run(&fix.rt, &a, "head -c 48M /dev/zero > /dev/shm/blob");
    assert_eq!(run(&fix.rt, &a, "sha256sum -c /root/blob.sha").exit_code, 1);
    assert_eq!(
        run(&fix.rt, &b, "sha256sum -c /root/blob.sha").exit_code,
        0,
        "a clone's RAM writes leaked"
    );
    assert_eq!(
        run(&fix.rt, &fix.source, "sha256sum -c /root/blob.sha").exit_code,
        0
    );
    // A snapshot of a clone (whose RAM is a mapping of the first file) is
    // a RAM file of its own and restores with the clone's changes.
    let from_process = fastvm_worker::qemu::ram_captures_from_process();
    let t = Instant::now();
    let snap_a = block_on(fix.rt.snapshot(&a, None)).expect("snapshot of a clone");
    eprintln!("snapshot of a clone taken in {:?}", t.elapsed());
    // Its RAM was read from the process (base file + written pages), not
    // migrated (which reads every page; see ram_capture).
    assert!(
        fastvm_worker::qemu::ram_captures_from_process() > from_process,
        "the capture of a restored VM migrated its RAM"
    );
    let c = block_on(fix.rt.create(CreateVm {
        snapshot: Some(snap_a.id.clone()),
        ..Default::default()
    }))
    .expect("restore the clone's snapshot")
    .id;
    assert_eq!(run(&fix.rt, &c, "sha256sum -c /root/blob.sha").exit_code, 1);
    assert_eq!(
        text(&run(&fix.rt, &c, "head -c 4 /dev/shm/blob | od -An -tx1")),
        "00 00 00 00"
    );
    // A missing RAM file is a clear error.
    let ram_a = snap_a.ram.clone().expect("ram");
    std::fs::rename(&ram_a, ram_a.with_extension("moved")).expect("move");
    let err = block_on(fix.rt.create(CreateVm {
        snapshot: Some(snap_a.id.clone()),
        ..Default::default()
    }))
    .expect_err("restore without the RAM file");
    assert!(err.to_string().contains("RAM file is missing"), "{err}");
    std::fs::rename(ram_a.with_extension("moved"), &ram_a).expect("move back");
    for id in [a, b, c] {
        block_on(fix.rt.delete(&id)).expect("delete");
    }
    block_on(fix.rt.delete_snapshot(&snap_a.id)).expect("delete snapshot");
}
