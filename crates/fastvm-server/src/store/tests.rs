//! One suite for the store, run against SQLite always and against PostgreSQL
//! when `FASTVM_TEST_PG_URL` is set (e.g. `export FASTVM_TEST_PG_URL=$(scripts/start-postgres)`);
//! under `CI` a missing URL fails the test.
//! Each PostgreSQL run works in a throwaway database created (and dropped)
//! through that URL, so runs never see each other's rows.

use super::*;
use fastvm_types::snapshot::{SnapshotService, SnapshotStatus};
use fastvm_types::{FirewallPolicy, SnapshotId, Ttl, TtlAction, VmId, VmStatus};
use sqlx::postgres::PgConnectOptions;
use sqlx::PgConnection;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn sample_vm(org: OrgId) -> VmRecord {
    VmRecord {
        id: VmId::new_v4(),
        org_id: org,
        worker_id: "local".into(),
        name: "dev box".into(),
        machine_name: "c1m2".into(),
        source_name: String::new(),
        cpu: 1,
        memory_mib: 2048,
        disk_gib: 10,
        status: VmStatus::Provisioning,
        status_message: None,
        firewall: FirewallPolicy::default(),
        public_ipv6: None,
        services: vec![],
        metadata: [("team".to_owned(), "infra".to_owned())].into(),
        env_vars: [("A".to_owned(), "1".to_owned())].into(),
        ttl: Some(Ttl {
            seconds: 60,
            action: TtlAction::Delete,
        }),
        expires_at_ms: None,
        ttl_remaining_ms: None,
        created_at_ms: now_ms(),
        paused_at_ms: None,
        deleted_at_ms: None,
        version: 0,
    }
}

/// The whole suite, on one store.
async fn suite(store: &Store) -> TestResult {
    store.ping().await?;
    orgs_and_keys(store).await?;
    vms_roundtrip_and_scoping(store).await?;
    vm_list_entries_pages(store).await?;
    vm_list_generations(store).await?;
    optimistic_concurrency(store).await?;
    snapshots_roundtrip_and_scoping(store).await?;
    quotas_limits_and_usage(store).await?;
    ttl_queries(store).await?;
    console_tokens_single_use(store).await?;
    ssh_keys_per_user(store).await?;
    volumes_and_attachments(store).await?;
    bucket_mount_rows(store).await?;
    snapshot_import_rows(store).await?;
    Ok(())
}

async fn snapshot_import_rows(store: &Store) -> TestResult {
    use fastvm_types::snapshot_import::{
        SnapshotImportEvent, SnapshotImportSourceType, SnapshotImportSourceView,
        SnapshotImportStatus as S,
    };
    let org = store.create_org("import-org").await?;
    let other = store.create_org("import-other").await?;
    let mut rec = SnapshotImportRecord {
        id: fastvm_types::SnapshotImportId::new_v4(),
        org_id: org,
        name: "busybox".into(),
        status: S::Pending,
        source: SnapshotImportSourceView {
            source_type: SnapshotImportSourceType::Image,
            image: Some("127.0.0.1:5000/busybox:1".into()),
            platform: None,
            registry_username: Some("puller".into()),
            registry_host: None,
            dockerfile_path: None,
            build_args: None,
            target: None,
            context_size_bytes: None,
        },
        events: vec![SnapshotImportEvent {
            phase: "preparing".into(),
            status: "started".into(),
            timestamp_ms: 1,
            message: None,
        }],
        logs: String::new(),
        worker_id: None,
        snapshot_id: Some(SnapshotId::new_v4()),
        error: None,
        machine_name: "c1m2".into(),
        cpu: 1,
        memory_mib: 2048,
        disk_gib: 10,
        created_at_ms: 5,
        started_at_ms: None,
        updated_at_ms: 5,
        finished_at_ms: None,
    };
    store.insert_snapshot_import(&rec).await?;
    assert_eq!(
        store.get_snapshot_import(org, rec.id).await?,
        Some(rec.clone())
    );
    assert_eq!(
        store.get_snapshot_import(other, rec.id).await?,
        None,
        "scoped by org"
    );
    assert_eq!(store.list_snapshot_imports(org).await?.len(), 1);
    assert!(store
        .snapshot_imports_in_flight()
        .await?
        .iter()
        .any(|r| r.id == rec.id));
    let as_vm: VmId = rec.id.to_string().parse()?;
    assert!(store.is_import_in_flight(as_vm).await?);
    assert!(!store.is_import_in_flight(VmId::new_v4()).await?);
    // In flight, it holds its VM's resources and the snapshot it will add.
    let usage = store.quota_usage(org).await?;
    assert_eq!(
        (
            usage.vcpu,
            usage.memory_mib,
            usage.disk_gib,
            usage.snapshot_count
        ),
        (1, 2048, 10, 1)
    );
    let usage = store.quota_usage(other).await?;
    assert_eq!((usage.vcpu, usage.snapshot_count), (0, 0), "scoped by org");
    // An import in flight cannot be deleted.
    assert!(!store.mark_snapshot_import_deleted(org, rec.id).await?);
    rec.status = S::Running;
    rec.worker_id = Some("local".into());
    rec.logs = "layer 1/1: 3 entries\n".into();
    rec.started_at_ms = Some(7);
    assert!(store.save_import_progress(&rec).await?);
    rec.status = S::Cancelled;
    rec.finished_at_ms = Some(9);
    assert!(store.save_import_progress(&rec).await?);
    // Terminal: progress no longer lands.
    let mut late = rec.clone();
    late.status = S::Succeeded;
    assert!(!store.save_import_progress(&late).await?);
    let got = store
        .get_snapshot_import(org, rec.id)
        .await?
        .ok_or("gone")?;
    assert_eq!(
        (got.status, got.logs.as_str(), got.started_at_ms),
        (S::Cancelled, "layer 1/1: 3 entries\n", Some(7))
    );
    assert!(!store
        .snapshot_imports_in_flight()
        .await?
        .iter()
        .any(|r| r.id == rec.id));
    let usage = store.quota_usage(org).await?;
    assert_eq!((usage.vcpu, usage.snapshot_count), (0, 0), "settled");
    assert!(!store.mark_snapshot_import_deleted(other, rec.id).await?);
    assert!(store.mark_snapshot_import_deleted(org, rec.id).await?);
    assert_eq!(store.get_snapshot_import(org, rec.id).await?, None);
    assert!(store.list_snapshot_imports(org).await?.is_empty());
    Ok(())
}

async fn bucket_mount_rows(store: &Store) -> TestResult {
    use fastvm_types::volume::MountStatus;
    let org = store.create_org("bucket-org").await?;
    let other = store.create_org("bucket-other").await?;
    let (vm, vm2) = (VmId::new_v4(), VmId::new_v4());
    let m = store
        .insert_bucket_mount(&BucketMountRecord {
            id: "bm_00000000000000000000aa".into(),
            vm_id: vm,
            org_id: org,
            bucket_uri: "s3://bucket-one/p".into(),
            mount_path: "/mnt/b".into(),
            read_only: true,
            mount_status: MountStatus::Pending,
            status_message: None,
            created_at_ms: 0,
        })
        .await?;
    assert!(m.created_at_ms > 0);
    assert_eq!(
        store.get_bucket_mount(org, vm, &m.id).await?,
        Some(m.clone())
    );
    assert_eq!(
        store.get_bucket_mount(other, vm, &m.id).await?,
        None,
        "scoped by org"
    );
    assert_eq!(
        store.get_bucket_mount(org, vm2, &m.id).await?,
        None,
        "scoped by VM"
    );
    store
        .set_bucket_mount_status(vm, &m.id, MountStatus::Failed, Some("no such bucket"))
        .await?;
    let got = store
        .get_bucket_mount(org, vm, &m.id)
        .await?
        .ok_or("gone")?;
    assert_eq!(
        (
            got.mount_status,
            got.status_message.as_deref(),
            got.read_only
        ),
        (MountStatus::Failed, Some("no such bucket"), true)
    );
    let m2 = store
        .insert_bucket_mount(&BucketMountRecord {
            id: "bm_00000000000000000000bb".into(),
            vm_id: vm2,
            ..m.clone()
        })
        .await?;
    let by_vm = store.bucket_mounts_of_vms(&[vm, vm2]).await?;
    assert_eq!(
        (by_vm[&vm].len(), by_vm[&vm2][0].id.as_str()),
        (1, m2.id.as_str())
    );
    assert!(store.delete_bucket_mount(vm, &m.id).await?);
    assert!(!store.delete_bucket_mount(vm, &m.id).await?);
    store.delete_bucket_mounts_of_vm(vm2).await?;
    assert!(store.bucket_mounts_of_vm(vm2).await?.is_empty());
    Ok(())
}

async fn volumes_and_attachments(store: &Store) -> TestResult {
    use fastvm_types::volume::{AccessMode, MountStatus, VolumeStatus};
    let org = store.create_org("volume-org").await?;
    let other = store.create_org("volume-other").await?;
    let v = store
        .insert_volume(&VolumeRecord {
            id: "vol_00000000000000000000aa".into(),
            org_id: org,
            name: "data".into(),
            access_mode: AccessMode::Rw,
            size_gib: 10,
            pending_size_gib: 0,
            status: VolumeStatus::Creating,
            worker_id: Some("local".into()),
            created_at_ms: 0,
        })
        .await?;
    assert!(v.created_at_ms > 0);
    assert_eq!(store.get_volume(other, &v.id).await?, None, "scoped by org");
    // A resize in flight counts its larger size against the quota.
    let mut grown = VolumeRecord {
        status: VolumeStatus::Ready,
        pending_size_gib: 25,
        ..v.clone()
    };
    store.save_volume(&grown).await?;
    assert_eq!(store.volume_usage(org).await?, (1, 25));
    let usage = store.quota_usage(org).await?;
    assert_eq!((usage.volume_count, usage.volume_gib), (1, 25));
    grown.pending_size_gib = 0;
    store.save_volume(&grown).await?;
    assert_eq!(store.get_volume(org, &v.id).await?, Some(grown.clone()));
    assert_eq!(store.list_volumes(org).await?.len(), 1);

    let vm = VmId::new_v4();
    let att = AttachmentRecord {
        vm_id: vm,
        volume_id: v.id.clone(),
        org_id: org,
        mount_path: "/mnt/data".into(),
        read_only: true,
        mount_status: MountStatus::Pending,
        status_message: None,
        created_at_ms: 0,
    };
    store.insert_attachment(&att).await?;
    // The same volume, or the same path, twice on one VM: conflict.
    assert!(matches!(
        store.insert_attachment(&att).await,
        Err(StoreError::Conflict(_))
    ));
    store
        .set_attachment_status(vm, &v.id, MountStatus::Failed, Some("why"))
        .await?;
    let got = store.attachments_of_vm(vm).await?;
    assert_eq!(got.len(), 1);
    assert_eq!(
        (
            got[0].read_only,
            got[0].mount_status,
            got[0].status_message.as_deref()
        ),
        (true, MountStatus::Failed, Some("why"))
    );
    assert_eq!(store.attachments_of_volume(&v.id).await?.len(), 1);
    store.delete_attachments_of_vm(vm).await?;
    assert!(store.attachments_of_volume(&v.id).await?.is_empty());
    assert!(store.delete_volume_row(org, &v.id).await?);
    assert_eq!(store.volume_usage(org).await?, (0, 0));
    Ok(())
}

async fn orgs_and_keys(store: &Store) -> TestResult {
    assert_eq!(store.org_count().await?, 0);
    let org = store.create_org("acme").await?;
    assert_eq!(store.org_by_name("acme").await?, Some(org));
    assert_eq!(store.org_by_name("nope").await?, None);
    assert!(matches!(
        store.create_org("acme").await,
        Err(StoreError::Conflict(_))
    ));
    let user = store.create_user(org, "alice").await?;

    let k1 = store.create_key_for(org, Some(user), "ci").await?;
    let k2 = store.create_key(org, "laptop").await?;
    assert!(k1.token.starts_with("fvm_") && k1.token != k2.token);
    assert_eq!(k1.info.prefix, crate::auth::token_prefix(&k1.token));
    assert!(matches!(
        store.create_key(OrgId::new_v4(), "x").await,
        Err(StoreError::NotFound(_))
    ));

    assert_eq!(
        store.authenticate(&k1.token).await?.map(|k| k.org_id),
        Some(org)
    );
    assert_eq!(store.authenticate("fvm_0000").await?, None);
    // The key's user comes back with it (SSH keys are per user).
    assert_eq!(
        store.authenticate(&k1.token).await?.and_then(|k| k.user_id),
        Some(user)
    );
    assert_eq!(
        store.authenticate(&k2.token).await?.map(|k| k.user_id),
        Some(None)
    );

    let keys = store.list_keys(Some(org)).await?;
    let mut names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["ci", "laptop"]);
    let other = store.create_org("other").await?;
    assert!(store.list_keys(Some(other)).await?.is_empty());
    assert_eq!(store.list_keys(None).await?.len(), 2);

    // Revoke by id, then by prefix; revoked keys stop authenticating but stay listed.
    let revoked = store.revoke_key(&k1.info.id.to_string()).await?;
    assert!(revoked.revoked_at_ms.is_some());
    assert_eq!(store.authenticate(&k1.token).await?, None);
    assert!(store
        .revoke_key(&k2.info.prefix)
        .await?
        .revoked_at_ms
        .is_some());
    assert_eq!(store.authenticate(&k2.token).await?, None);
    assert!(matches!(
        store.revoke_key("fvm_nothing").await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.list_keys(Some(org)).await?.len(), 2);
    Ok(())
}

/// `list_vm_entries` (what GET /v1/vms reads), its keyset pages and `get_vms`.
async fn vm_list_entries_pages(store: &Store) -> TestResult {
    let org = store.create_org("list-org").await?;
    let other = store.create_org("list-other").await?;
    // 25 VMs, in groups of 3 sharing a creation time (ties break by id).
    let mut vms = Vec::new();
    for i in 0..25i64 {
        let mut vm = sample_vm(org);
        vm.created_at_ms = 1_000 + i / 3;
        vm.status = if i % 2 == 0 {
            VmStatus::Running
        } else {
            VmStatus::Stopped
        };
        vm.version = i;
        store.insert_vm(&vm).await?;
        vms.push(vm);
    }
    store.insert_vm(&sample_vm(other)).await?;
    vms.sort_by_key(|v| (v.created_at_ms, v.id.to_string()));
    let order: Vec<VmId> = vms.iter().map(|v| v.id).collect();

    let all = store.list_vm_entries(org, None, None, None).await?;
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), order);
    let first = &all[0];
    assert_eq!(
        (
            first.version,
            first.status,
            first.created_at_ms,
            first.worker_id.as_str()
        ),
        (vms[0].version, vms[0].status, vms[0].created_at_ms, "local")
    );
    assert!(store
        .list_vm_entries(OrgId::new_v4(), None, None, None)
        .await?
        .is_empty());

    // Pages of 4 cover the list once, in order.
    let mut walked = Vec::new();
    let mut after = None;
    loop {
        let page = store.list_vm_entries(org, None, after, Some(4)).await?;
        assert!(page.len() <= 4);
        walked.extend(page.iter().map(|e| e.id));
        match page.last() {
            Some(last) if page.len() == 4 => after = Some(last.cursor()),
            _ => break,
        }
    }
    assert_eq!(walked, order);

    // With a status filter, pages hold only that status.
    let running = store
        .list_vm_entries(org, Some(VmStatus::Running), None, Some(5))
        .await?;
    assert_eq!(running.len(), 5);
    assert!(running.iter().all(|e| e.status == VmStatus::Running));
    let rest = store
        .list_vm_entries(
            org,
            Some(VmStatus::Running),
            running.last().map(VmListEntry::cursor),
            None,
        )
        .await?;
    assert_eq!(running.len() + rest.len(), 13);

    // A deleted VM leaves the list; one created later lands at its end.
    let mut gone = vms[3].clone();
    gone.deleted_at_ms = Some(now_ms());
    assert!(store.update_vm(&mut gone).await?);
    let mut late = sample_vm(org);
    late.created_at_ms = 5_000;
    store.insert_vm(&late).await?;
    let after_change = store
        .list_vm_entries(org, None, Some(all[2].cursor()), None)
        .await?;
    let mut expected: Vec<VmId> = order[3..]
        .iter()
        .copied()
        .filter(|id| *id != gone.id)
        .collect();
    expected.push(late.id);
    assert_eq!(
        after_change.iter().map(|e| e.id).collect::<Vec<_>>(),
        expected
    );

    // get_vms: full rows of the org's live VMs among the ids.
    let stranger = store.list_vm_entries(other, None, None, None).await?[0].id;
    let ids = [order[0], order[1], gone.id, stranger, VmId::new_v4()];
    let mut got: Vec<VmId> = store
        .get_vms(org, &ids)
        .await?
        .iter()
        .map(|v| v.id)
        .collect();
    got.sort_by_key(|id| order.iter().position(|o| o == id));
    assert_eq!(got, [order[0], order[1]]);
    assert_eq!(store.get_vms(org, &[]).await?, vec![]);
    // More ids than one IN list holds (24 live ones among 325).
    let mut many = order.clone();
    many.extend((0..300).map(|_| VmId::new_v4()));
    assert_eq!(store.get_vms(org, &many).await?.len(), 24);

    // Setting the public IPv6 bumps the version only when it changes.
    let id = order[0];
    let v0 = store.get_vm(org, id).await?.map(|v| v.version);
    store.set_vm_public_ipv6(id, Some("fd00::1")).await?;
    let v1 = store.get_vm(org, id).await?.map(|v| v.version);
    store.set_vm_public_ipv6(id, Some("fd00::1")).await?;
    let v2 = store.get_vm(org, id).await?.map(|v| v.version);
    store.set_vm_public_ipv6(id, None).await?;
    let v3 = store.get_vm(org, id).await?;
    assert_eq!(v1, v0.map(|v| v + 1));
    assert_eq!(v2, v1);
    assert_eq!(
        v3.map(|v| (v.version, v.public_ipv6)),
        Some((v0.unwrap_or_default() + 2, None))
    );
    Ok(())
}

async fn vms_roundtrip_and_scoping(store: &Store) -> TestResult {
    let org = store.create_org("vms-org").await?;
    let other = store.create_org("vms-other").await?;
    let vm = sample_vm(org);
    store.insert_vm(&vm).await?;
    assert_eq!(store.get_vm(org, vm.id).await?, Some(vm.clone()));
    // Another org never sees it.
    assert_eq!(store.get_vm(other, vm.id).await?, None);
    assert!(store.list_vms(other, None).await?.is_empty());

    let mut second = sample_vm(org);
    second.created_at_ms = vm.created_at_ms + 1;
    second.status = VmStatus::Running;
    second.ttl = None;
    second.firewall = serde_json::from_value(
        serde_json::json!({"egress": {"defaultAction": "deny", "rules": []}}),
    )?;
    store.insert_vm(&second).await?;
    assert_eq!(store.get_vm(org, second.id).await?, Some(second.clone()));

    let all = store.list_vms(org, None).await?;
    assert_eq!(
        all.iter().map(|v| v.id).collect::<Vec<_>>(),
        [vm.id, second.id]
    );
    assert_eq!(store.list_vms(org, Some(VmStatus::Running)).await?.len(), 1);
    assert!(store
        .list_vms(org, Some(VmStatus::Paused))
        .await?
        .is_empty());
    assert_eq!(store.list_live_vms_on("local").await?.len(), 2);
    assert!(store.list_live_vms_on("elsewhere").await?.is_empty());

    // Deleted rows disappear from org-scoped reads but stay for background work.
    let mut gone = second.clone();
    gone.status = VmStatus::Deleting;
    gone.deleted_at_ms = Some(now_ms());
    assert!(store.update_vm(&mut gone).await?);
    assert_eq!(store.get_vm(org, second.id).await?, None);
    assert_eq!(store.list_vms(org, None).await?.len(), 1);
    assert_eq!(
        store
            .get_vm_unscoped(second.id)
            .await?
            .and_then(|v| v.deleted_at_ms),
        gone.deleted_at_ms
    );
    Ok(())
}

/// Every write of a VM row moves its org's list generation (triggers), and
/// nothing else does.
async fn vm_list_generations(store: &Store) -> TestResult {
    let org = store.create_org("gen-org").await?;
    let other = store.create_org("gen-other").await?;
    assert_eq!(store.vm_list_generation(org).await?, 0);
    let vm = sample_vm(org);
    store.insert_vm(&vm).await?;
    let g1 = store.vm_list_generation(org).await?;
    assert_ne!(g1, 0, "an insert moves it");
    store.insert_vm(&sample_vm(other)).await?;
    assert_eq!(
        store.vm_list_generation(org).await?,
        g1,
        "another org's insert does not"
    );
    let mut running = vm.clone();
    running.status = VmStatus::Running;
    assert!(store.update_vm(&mut running).await?);
    let g2 = store.vm_list_generation(org).await?;
    assert_ne!(g2, g1, "an update moves it");
    // A stale write changes no row: nothing moves.
    let mut stale = vm.clone();
    stale.status = VmStatus::Paused;
    assert!(!store.update_vm(&mut stale).await?);
    assert_eq!(store.vm_list_generation(org).await?, g2);
    // Reads do not move it.
    store.list_vm_entries(org, None, None, None).await?;
    store.get_vm(org, vm.id).await?;
    assert_eq!(store.vm_list_generation(org).await?, g2);
    // A soft delete is an update.
    running.deleted_at_ms = Some(now_ms());
    running.status = VmStatus::Deleting;
    assert!(store.update_vm(&mut running).await?);
    assert_ne!(store.vm_list_generation(org).await?, g2);
    Ok(())
}

async fn optimistic_concurrency(store: &Store) -> TestResult {
    let org = store.create_org("cas-org").await?;
    let vm = sample_vm(org);
    store.insert_vm(&vm).await?;
    let mut a = vm.clone();
    let mut b = vm.clone();
    a.status = VmStatus::Running;
    a.expires_at_ms = Some(123);
    assert!(store.update_vm(&mut a).await?);
    assert_eq!(a.version, 1);
    // b read the old version: its write is refused.
    b.name = "late".into();
    assert!(!store.update_vm(&mut b).await?);
    let now = store.get_vm(org, vm.id).await?.ok_or("vm")?;
    assert_eq!(
        (
            now.status,
            now.name.as_str(),
            now.expires_at_ms,
            now.version
        ),
        (VmStatus::Running, "dev box", Some(123), 1)
    );
    // A write through another org's id is refused too.
    let mut foreign = now.clone();
    foreign.org_id = OrgId::new_v4();
    foreign.name = "stolen".into();
    assert!(!store.update_vm(&mut foreign).await?);
    Ok(())
}

fn sample_snapshot(org: OrgId, vm: VmId) -> SnapshotRecord {
    SnapshotRecord {
        id: SnapshotId::new_v4(),
        org_id: org,
        vm_id: vm,
        worker_id: "local".into(),
        name: "base image".into(),
        status: SnapshotStatus::Creating,
        status_message: None,
        machine_name: "c2m4".into(),
        cpu: 2,
        memory_mib: 4096,
        disk_gib: 10,
        metadata: [("team".to_owned(), "infra".to_owned())].into(),
        env_vars: [("A".to_owned(), "1".to_owned())].into(),
        firewall: FirewallPolicy::default(),
        services: vec![],
        volumes: vec![],
        bucket_mounts: vec![],
        created_at_ms: now_ms(),
        deleted_at_ms: None,
        compat_key: None,
        stored: false,
    }
}

async fn snapshots_roundtrip_and_scoping(store: &Store) -> TestResult {
    let org = store.create_org("snap-org").await?;
    let other = store.create_org("snap-other").await?;
    let vm = VmId::new_v4();
    let mut s = sample_snapshot(org, vm);
    s.firewall = serde_json::from_value(
        serde_json::json!({"egress": {"defaultAction": "deny", "rules": []}}),
    )?;
    s.services = vec![SnapshotService {
        name: "web".into(),
        port: 8080,
        h2c: true,
    }];
    store.insert_snapshot(&s).await?;
    assert_eq!(store.get_snapshot(org, s.id).await?, Some(s.clone()));
    // Another org never sees or changes it.
    assert_eq!(store.get_snapshot(other, s.id).await?, None);
    assert!(store.list_snapshots(other).await?.is_empty());
    assert!(!store.rename_snapshot(other, s.id, "stolen").await?);
    assert!(!store.mark_snapshot_deleted(other, s.id, now_ms()).await?);

    // Status moves only from the expected status.
    assert_eq!(
        store
            .list_snapshots_in(SnapshotStatus::Creating)
            .await?
            .iter()
            .map(|x| x.id)
            .collect::<Vec<_>>(),
        [s.id]
    );
    assert!(
        !store
            .set_snapshot_status(
                s.id,
                SnapshotStatus::Ready,
                SnapshotStatus::Error,
                Some("x")
            )
            .await?
    );
    assert!(
        store
            .set_snapshot_status(s.id, SnapshotStatus::Creating, SnapshotStatus::Ready, None)
            .await?
    );
    assert!(store
        .list_snapshots_in(SnapshotStatus::Creating)
        .await?
        .is_empty());
    let mut second = sample_snapshot(org, vm);
    second.created_at_ms = s.created_at_ms + 1;
    second.status = SnapshotStatus::Error;
    second.status_message = Some("disk full".into());
    store.insert_snapshot(&second).await?;
    assert_eq!(
        store
            .get_snapshot(org, second.id)
            .await?
            .and_then(|x| x.status_message),
        Some("disk full".into())
    );

    assert!(store.rename_snapshot(org, s.id, "renamed").await?);
    let got = store.get_snapshot(org, s.id).await?.ok_or("snapshot")?;
    assert_eq!(
        (got.name.as_str(), got.status, got.services.len()),
        ("renamed", SnapshotStatus::Ready, 1)
    );
    assert_eq!(
        store
            .list_snapshots(org)
            .await?
            .iter()
            .map(|x| x.id)
            .collect::<Vec<_>>(),
        [s.id, second.id]
    );

    // Deleted rows disappear from org-scoped reads but stay for background work.
    let at = now_ms();
    assert!(store.mark_snapshot_deleted(org, s.id, at).await?);
    assert!(
        !store.mark_snapshot_deleted(org, s.id, at).await?,
        "deleting twice"
    );
    assert_eq!(store.get_snapshot(org, s.id).await?, None);
    assert!(!store.rename_snapshot(org, s.id, "late").await?);
    assert!(
        !store
            .set_snapshot_status(s.id, SnapshotStatus::Ready, SnapshotStatus::Error, None)
            .await?
    );
    assert_eq!(
        store
            .list_snapshots(org)
            .await?
            .iter()
            .map(|x| x.id)
            .collect::<Vec<_>>(),
        [second.id]
    );
    assert_eq!(
        store
            .get_snapshot_unscoped(s.id)
            .await?
            .and_then(|x| x.deleted_at_ms),
        Some(at)
    );
    assert_eq!(
        store.get_snapshot_unscoped(SnapshotId::new_v4()).await?,
        None
    );
    Ok(())
}

async fn quotas_limits_and_usage(store: &Store) -> TestResult {
    use fastvm_types::quota::OrgQuotaValues;
    let org = store.create_org("quota-org").await?;
    assert_eq!(store.quota_limits(org).await?, DEFAULT_QUOTA);
    assert_eq!(store.quota_usage(org).await?, OrgQuotaValues::default());
    // Partial changes keep the other limits.
    let l = store
        .set_quota(
            org,
            QuotaPatch {
                vcpu: Some(4),
                snapshot_count: Some(2),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        l,
        OrgQuotaValues {
            vcpu: 4,
            snapshot_count: 2,
            ..DEFAULT_QUOTA
        }
    );
    let l = store
        .set_quota(
            org,
            QuotaPatch {
                memory_mib: Some(1024),
                vcpu: Some(5),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(
        l,
        OrgQuotaValues {
            vcpu: 5,
            memory_mib: 1024,
            snapshot_count: 2,
            ..DEFAULT_QUOTA
        }
    );
    assert_eq!(store.quota_limits(org).await?, l);
    let all = OrgQuotaValues {
        vcpu: 1,
        memory_mib: 2,
        disk_gib: 3,
        snapshot_count: 4,
        volume_count: 5,
        volume_gib: 6,
    };
    assert_eq!(store.set_quota(org, QuotaPatch::all(all)).await?, all);
    assert!(matches!(
        store
            .set_quota(OrgId::new_v4(), QuotaPatch::default())
            .await,
        Err(StoreError::NotFound(_))
    ));

    // Usage: live VMs except stopped/error; paused ones count; other orgs do not.
    let mut counted = 0u64;
    for status in VmStatus::ALL {
        let mut vm = sample_vm(org);
        vm.status = status;
        store.insert_vm(&vm).await?;
        if !matches!(status, VmStatus::Stopped | VmStatus::Error) {
            counted += 1;
        }
    }
    let mut deleted = sample_vm(org);
    deleted.status = VmStatus::Running;
    deleted.deleted_at_ms = Some(now_ms());
    store.insert_vm(&deleted).await?;
    let other = store.create_org("quota-other").await?;
    store.insert_vm(&sample_vm(other)).await?;
    let vm = sample_vm(org);
    store.insert_snapshot(&sample_snapshot(org, vm.id)).await?;
    let gone = sample_snapshot(org, vm.id);
    store.insert_snapshot(&gone).await?;
    assert!(store.mark_snapshot_deleted(org, gone.id, now_ms()).await?);
    let u = store.quota_usage(org).await?;
    assert_eq!(
        u,
        OrgQuotaValues {
            vcpu: counted,
            memory_mib: counted * 2048,
            disk_gib: counted * 10,
            snapshot_count: 1,
            volume_count: 0,
            volume_gib: 0
        }
    );
    assert!(counted >= 5);
    assert_eq!(store.quota_usage(other).await?.vcpu, 1);
    // The other org keeps the defaults.
    assert_eq!(store.quota_limits(other).await?, DEFAULT_QUOTA);
    Ok(())
}

async fn ttl_queries(store: &Store) -> TestResult {
    let org = store.org_by_name("acme").await?.ok_or("acme")?;
    let worker = "ttl-worker";
    assert_eq!(store.next_ttl_deadline(worker).await?, None);
    let mk = |status: VmStatus, expires: Option<i64>| {
        let mut vm = sample_vm(org);
        vm.worker_id = worker.into();
        vm.status = status;
        vm.expires_at_ms = expires;
        vm
    };
    let due = mk(VmStatus::Running, Some(1_000));
    let later = mk(VmStatus::Running, Some(5_000));
    let paused = mk(VmStatus::Paused, Some(500));
    let mut gone = mk(VmStatus::Running, Some(600));
    gone.deleted_at_ms = Some(1);
    for v in [&due, &later, &paused, &gone, &mk(VmStatus::Running, None)] {
        store.insert_vm(v).await?;
    }
    assert_eq!(store.next_ttl_deadline(worker).await?, Some(1_000));
    assert_eq!(
        store
            .list_ttl_due(worker, 2_000)
            .await?
            .iter()
            .map(|v| v.id)
            .collect::<Vec<_>>(),
        [due.id]
    );
    assert_eq!(store.list_ttl_due(worker, 5_000).await?.len(), 2);
    assert!(store.list_ttl_due("elsewhere", i64::MAX).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn store_suite_sqlite() -> TestResult {
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path(), None).await?;
    assert_eq!(store.backend(), Backend::Sqlite);
    suite(&store).await?;
    store.close().await;
    // WAL mode is on, and reopening (migrations already applied) keeps the data.
    let store = Store::open(dir.path(), None).await?;
    assert_eq!(store.org_count().await?, 21);
    let mode: String = sqlx::query("PRAGMA journal_mode")
        .fetch_one(&store.pool)
        .await?
        .try_get(0)?;
    assert_eq!(mode.to_lowercase(), "wal");
    Ok(())
}

#[tokio::test]
async fn store_suite_postgres() -> TestResult {
    let Ok(url) = std::env::var("FASTVM_TEST_PG_URL") else {
        // One policy for missing dependencies: fail under CI, never a silent pass.
        if std::env::var_os("CI").is_some() {
            return Err("FASTVM_TEST_PG_URL is not set under CI: the PostgreSQL run of the store suite cannot run (scripts/start-postgres)".into());
        }
        eprintln!("FASTVM_TEST_PG_URL is not set: skipping the PostgreSQL run of the store suite (CI fails instead)");
        return Ok(());
    };
    let admin_opts: PgConnectOptions = url.parse()?;
    let db = format!("fastvm_t_{}", uuid::Uuid::new_v4().simple());
    let mut admin = PgConnection::connect_with(&admin_opts).await?;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await?;
    let result = async {
        let test_url = admin_opts.clone().database(&db).to_url_lossy().to_string();
        let store = Store::open(Path::new("/nonexistent"), Some(&test_url)).await?;
        assert_eq!(store.backend(), Backend::Postgres);
        suite(&store).await?;
        store.close().await;
        // Reopen: migrations are idempotent, data is kept.
        let store = Store::open(Path::new("/nonexistent"), Some(&test_url)).await?;
        assert_eq!(store.org_count().await?, 21);
        store.close().await;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    result
}

async fn ssh_keys_per_user(store: &Store) -> TestResult {
    let org = store.create_org("ssh-org").await?;
    let other_org = store.create_org("ssh-other").await?;
    let alice = store.create_user(org, "alice").await?;
    let bob = store.create_user(other_org, "bob").await?;
    let key = |user, org, fp: &str| SshKeyRecord {
        user_id: user,
        org_id: org,
        fingerprint: fp.into(),
        key_type: "ssh-ed25519".into(),
        public_key: format!("ssh-ed25519 {fp}"),
        name: "laptop".into(),
        created_at_ms: 0,
    };
    let added = store.add_ssh_key(key(alice, org, "SHA256:a")).await?;
    assert!(added.created_at_ms > 0);
    // The same key for the same user: a conflict; for another user: fine.
    assert!(matches!(
        store.add_ssh_key(key(alice, org, "SHA256:a")).await,
        Err(AddSshKeyError::Exists(_))
    ));
    store.add_ssh_key(key(bob, other_org, "SHA256:a")).await?;
    store.add_ssh_key(key(alice, org, "SHA256:b")).await?;
    let mine = store.list_ssh_keys(alice).await?;
    assert_eq!(
        mine.iter()
            .map(|k| k.fingerprint.as_str())
            .collect::<Vec<_>>(),
        ["SHA256:a", "SHA256:b"]
    );
    assert_eq!(mine[0], added);
    let owners = store.ssh_key_owners("SHA256:a").await?;
    assert_eq!(owners.len(), 2);
    assert!(owners
        .iter()
        .any(|k| k.user_id == bob && k.org_id == other_org));
    assert!(store.ssh_key_owners("SHA256:zzz").await?.is_empty());
    // Bob cannot delete Alice's key; Alice can, once.
    assert!(!store.delete_ssh_key(bob, "SHA256:b").await?);
    assert!(store.delete_ssh_key(alice, "SHA256:b").await?);
    assert!(!store.delete_ssh_key(alice, "SHA256:b").await?);
    assert_eq!(store.list_ssh_keys(bob).await?.len(), 1);
    // The per-user limit.
    for i in 1..MAX_SSH_KEYS_PER_USER {
        store
            .add_ssh_key(key(alice, org, &format!("SHA256:n{i}")))
            .await?;
    }
    assert!(matches!(
        store.add_ssh_key(key(alice, org, "SHA256:last")).await,
        Err(AddSshKeyError::TooMany)
    ));
    Ok(())
}

async fn console_tokens_single_use(store: &Store) -> TestResult {
    // An existing org (the suite counts orgs at the end).
    let org = store.org_by_name("acme").await?.ok_or("no org acme")?;
    let key = store.create_key(org, "console").await?;
    let vm = VmId::new_v4();
    let token = crate::auth::new_token();
    store
        .insert_console_token(&token, vm, org, key.info.id, now_ms() + 60_000)
        .await?;
    // Only the hash is stored.
    let raw: Option<String> =
        sqlx::query_scalar("SELECT token_hash FROM console_tokens WHERE token_hash = $1")
            .bind(&token)
            .fetch_optional(&store.pool)
            .await?;
    assert!(raw.is_none());
    let first = store.redeem_console_token(&token).await?;
    assert!(
        matches!(&first, Redeemed::Fresh(r) if r.vm_id == vm && r.org_id == org && r.key_id == key.info.id && r.used_at_ms.is_some()),
        "{first:?}"
    );
    assert!(
        matches!(store.redeem_console_token(&token).await?, Redeemed::AlreadyUsed(r) if r.vm_id == vm)
    );
    assert_eq!(
        store.redeem_console_token("fvm_nope").await?,
        Redeemed::Unknown
    );
    // Concurrent redeems of one token: exactly one wins.
    let t2 = crate::auth::new_token();
    store
        .insert_console_token(&t2, vm, org, key.info.id, now_ms() + 60_000)
        .await?;
    let results = futures::future::join_all((0..8).map(|_| store.redeem_console_token(&t2))).await;
    let fresh = results
        .iter()
        .filter(|r| matches!(r, Ok(Redeemed::Fresh(_))))
        .count();
    assert_eq!(fresh, 1, "{results:?}");
    // Tokens expired over an hour ago are forgotten at the next mint.
    let old = crate::auth::new_token();
    store
        .insert_console_token(&old, vm, org, key.info.id, now_ms() - 2 * 3600 * 1000)
        .await?;
    store
        .insert_console_token(
            &crate::auth::new_token(),
            vm,
            org,
            key.info.id,
            now_ms() + 60_000,
        )
        .await?;
    assert_eq!(store.redeem_console_token(&old).await?, Redeemed::Unknown);
    assert!(store.key_is_active(key.info.id).await?);
    store.revoke_key(&key.info.id.to_string()).await?;
    assert!(!store.key_is_active(key.info.id).await?);
    Ok(())
}

/// Authentications are cached (keys.rs): a revocation through the same
/// store handle is effective at once, one through another handle on the
/// same database (`fastvm keys revoke`, another control plane) within
/// KEY_CACHE_TTL.
#[tokio::test]
async fn cached_keys_follow_revocations() -> TestResult {
    let dir = tempfile::tempdir()?;
    let server = Store::open(dir.path(), None).await?;
    let org = server.create_org("keys").await?;
    let a = server.create_key(org, "a").await?;
    let b = server.create_key(org, "b").await?;
    for k in [&a, &b] {
        assert_eq!(
            server.authenticate(&k.token).await?.map(|i| i.id),
            Some(k.info.id)
        );
    }
    // This handle revokes b: refused at the next request.
    server.revoke_key(&b.info.id.to_string()).await?;
    assert_eq!(server.authenticate(&b.token).await?, None);
    // Another handle (the CLI) revokes a: refused within the TTL.
    let cli = Store::open(dir.path(), None).await?;
    cli.revoke_key(&a.info.prefix).await?;
    let start = std::time::Instant::now();
    while server.authenticate(&a.token).await?.is_some() {
        assert!(
            start.elapsed() < KEY_CACHE_TTL + Duration::from_millis(500),
            "a key revoked elsewhere still authenticates after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Unknown tokens are refused (and not remembered).
    assert_eq!(server.authenticate(&crate::auth::new_token()).await?, None);
    Ok(())
}
