//! End-to-end tests of the snapshot store: real guests, a real
//! S3-compatible server (moto, started here) and two runtimes with separate
//! data dirs (workers A and B). Worker B has its own (empty) image dir, so
//! everything a restore needs (layers, memory, kernel, initramfs, base
//! rootfs) comes from the store.
//!
//! moto is found at `FASTVM_TEST_MOTO`, else `moto_server` on PATH; without
//! it the test fails when `CI` is set and is skipped otherwise.
//!
//! Timings (local vs through the store) are printed with `--nocapture`.

use fastvm_e2e::{block_on, config, data_dir, start_moto, Moto};
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::snapshot_store::{SnapshotStore, StoreSettings};
use fastvm_worker::{Error, ExecRequest, Runtime, VmState};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUCKET: &str = "fastvm-snapshots";
const CAP: usize = 1 << 20;

fn store(moto: &Moto) -> Arc<SnapshotStore> {
    Arc::new(
        SnapshotStore::new(&StoreSettings {
            url: format!("s3://{BUCKET}/cluster-1"),
            endpoint: Some(moto.endpoint.clone()),
            region: Some("us-east-1".into()),
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing-secret".into()),
        })
        .expect("store"),
    )
}

fn sh(rt: &Runtime, vm: &str, cmd: &str) -> String {
    let out = block_on(rt.exec_buffered(vm, &ExecRequest::shell(cmd), CAP)).expect("exec");
    assert_eq!(out.exit_code, 0, "{cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Restore `snapshot` on `rt`; the VM id and the time it took.
fn restore(rt: &Runtime, snapshot: &str) -> (String, Duration) {
    let t = Instant::now();
    let vm = block_on(rt.create(CreateVm {
        snapshot: Some(snapshot.to_owned()),
        ..Default::default()
    }))
    .unwrap_or_else(|e| panic!("restore {snapshot}: {e}"));
    assert_eq!(vm.state, VmState::Running);
    (vm.id, t.elapsed())
}

fn count(store: &SnapshotStore, under: &str) -> usize {
    block_on(store.list(under)).expect("list").len()
}

#[test]
fn snapshots_move_between_workers_through_the_store() {
    let Some(moto) = start_moto("127.0.0.1", &[BUCKET]) else {
        return;
    };
    let a = block_on(Runtime::open(config(&data_dir("store-a")))).expect("runtime A");
    // B: its own data dir and its own, empty, image dir (the default one in its data dir).
    let b_dir = data_dir("store-b");
    let mut b_cfg = config(&b_dir);
    b_cfg.image_dir = None;
    let b = block_on(Runtime::open(b_cfg)).expect("runtime B");
    let (store_a, store_b) = (store(&moto), store(&moto));
    let key = block_on(a.compat_key()).expect("compat key");
    assert_eq!(key, block_on(b.compat_key()).expect("compat key B"));
    eprintln!("compat key: {key}");

    let src = block_on(a.create(CreateVm {
        machine: "c1m2".into(),
        ..Default::default()
    }))
    .expect("boot source on A")
    .id;
    sh(&a, &src, "echo local > /root/file; sync");

    // Baseline: a local snapshot and restore (no store).
    let t = Instant::now();
    let local = block_on(a.snapshot(&src, None)).expect("local snapshot");
    let local_snap = t.elapsed();
    assert_eq!(local.compat_key.as_deref(), Some(key.as_str()));
    let (clone, local_restore) = restore(&a, &local.id);
    assert_eq!(sh(&a, &clone, "cat /root/file"), "local");
    block_on(a.delete(&clone)).expect("delete clone");
    block_on(a.delete_snapshot(&local.id)).expect("delete local snapshot");

    // A failed upload fails the snapshot and leaves nothing locally; the VM runs on.
    let broken = SnapshotStore::new(&StoreSettings {
        url: "s3://no-such-bucket/x".into(),
        endpoint: Some(moto.endpoint.clone()),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing-secret".into()),
    })
    .expect("store");
    a.set_snapshot_store(Some(Arc::new(broken)));
    let failed = block_on(a.snapshot(&src, Some("doomed".into())));
    assert!(matches!(failed, Err(Error::SnapshotStore(_))), "{failed:?}");
    let a_snapshots = a.data_dir().join("snapshots");
    assert_eq!(
        std::fs::read_dir(&a_snapshots)
            .expect("A snapshots")
            .count(),
        0,
        "nothing left locally"
    );
    assert_eq!(sh(&a, &src, "cat /root/file"), "local");

    // Through the store: snapshot 1 uploads everything (image files the
    // first time), snapshot 2 of the same VM only its new top layer.
    a.set_snapshot_store(Some(store_a.clone()));
    sh(&a, &src, "echo payload-1 > /root/file; sync");
    let t = Instant::now();
    let s1 = block_on(a.snapshot(&src, None)).expect("snapshot 1 + upload");
    let up1 = t.elapsed();
    let layers1 = count(&store_a, "layers/");
    assert_eq!(layers1, s1.layers.len(), "{:?}", block_on(store_a.list("")));
    assert_eq!(count(&store_a, "images/"), 3, "kernel, initramfs, rootfs");
    sh(&a, &src, "echo payload-2 > /root/file2; sync");
    let t = Instant::now();
    let s2 = block_on(a.snapshot(&src, None)).expect("snapshot 2 + upload");
    let up2 = t.elapsed();
    // s2's chain is s1's plus one layer: the shared layers are stored once.
    assert_eq!(s2.layers.len(), s1.layers.len() + 1);
    assert_eq!(s2.layers[1..], s1.layers[..]);
    assert_eq!(count(&store_a, "layers/"), layers1 + 1);
    assert_eq!(count(&store_a, "images/"), 3);
    assert_eq!(
        count(&store_a, "snapshots/"),
        6,
        "memory, packed RAM file and snapshot.json, twice"
    );
    assert!(s1.ram.is_some(), "a user snapshot has a RAM file");

    // B restores s1: fetched (with the image files), then restored.
    b.set_snapshot_store(Some(store_b.clone()));
    let (vm1, fetch_restore1) = restore(&b, &s1.id);
    assert_eq!(sh(&b, &vm1, "cat /root/file"), "payload-1");
    assert_eq!(
        sh(&b, &vm1, "test -e /root/file2 && echo yes || echo no"),
        "no"
    );
    // Writes on B work (the fetched chain is a proper backing chain).
    sh(&b, &vm1, "echo on-b > /root/b; sync; cat /root/b");
    block_on(b.delete(&vm1)).expect("delete vm1");
    // Again: the local copy is a cache now.
    let (vm1b, cached_restore) = restore(&b, &s1.id);
    assert_eq!(sh(&b, &vm1b, "cat /root/file"), "payload-1");
    block_on(b.delete(&vm1b)).expect("delete vm1b");

    // s2 on B, two restores at once: one fetch (only its top layer is
    // new), both restore.
    let t = Instant::now();
    let req = || CreateVm {
        snapshot: Some(s2.id.clone()),
        ..Default::default()
    };
    let (x, y) = block_on(async { tokio::join!(b.create(req()), b.create(req())) });
    let fetch_restore2 = t.elapsed();
    let (x, y) = (x.expect("restore s2 (1)").id, y.expect("restore s2 (2)").id);
    for vm in [&x, &y] {
        assert_eq!(
            sh(&b, vm, "cat /root/file /root/file2"),
            "payload-1\npayload-2"
        );
        block_on(b.delete(vm)).expect("delete");
    }
    assert_eq!(b.store_fetches(), 2, "s1 once, s2 once for both restores");
    let b_layers = std::fs::read_dir(b_dir.join("layers"))
        .expect("B layers")
        .count();
    assert_eq!(b_layers, s2.layers.len(), "B holds each layer once");

    // Delete s1 through B: gone from the store (layers stay) and from B.
    block_on(b.delete_snapshot(&s1.id)).expect("delete s1");
    assert_eq!(count(&store_a, "snapshots/"), 3, "s2's three objects");
    assert_eq!(count(&store_a, "layers/"), layers1 + 1, "layers are kept");
    let gone = block_on(b.create(CreateVm {
        snapshot: Some(s1.id.clone()),
        ..Default::default()
    }));
    assert!(matches!(gone, Err(Error::NoSuchSnapshot(_))), "{gone:?}");
    assert!(matches!(
        block_on(b.delete_snapshot(&s1.id)),
        Err(Error::NoSuchSnapshot(_))
    ));

    // An id the store never had.
    let missing = block_on(b.create(CreateVm {
        snapshot: Some("never-taken".into()),
        ..Default::default()
    }));
    assert!(
        matches!(missing, Err(Error::NoSuchSnapshot(_))),
        "{missing:?}"
    );

    // A snapshot of another kind of worker is refused before any download.
    let mut doc = block_on(store_b.get_snapshot(&s2.id)).expect("s2 document");
    doc.record.id = "from-elsewhere".into();
    doc.compat_key = "kvm-q0000000000000000-net1".into();
    block_on(store_b.put_snapshot(&doc)).expect("put document");
    let refused = block_on(b.create(CreateVm {
        snapshot: Some("from-elsewhere".into()),
        ..Default::default()
    }));
    assert!(
        matches!(refused, Err(Error::IncompatibleSnapshot { .. })),
        "{refused:?}"
    );
    block_on(b.delete_snapshot("from-elsewhere")).expect("delete the fake");

    block_on(a.delete(&src)).expect("delete source");
    eprintln!(
        "FIGURES local snapshot {local_snap:?}, local restore {local_restore:?}; \
         snapshot+upload #1 {up1:?} (with image files), #2 {up2:?}; \
         fetch+restore on B #1 {fetch_restore1:?} (with image files), \
         cached restore {cached_restore:?}, 2 concurrent fetch+restore of #2 {fetch_restore2:?}"
    );
}
