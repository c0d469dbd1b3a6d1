//! End-to-end tests of QEMU confinement with real guests: each VM's QEMU
//! runs as its own uid without capabilities under seccomp, in its own
//! cgroup with limits from the machine type, reaches only its own files,
//! and keeps its console log capped; the VM lifecycle still works.

use fastvm_e2e::{block_on, config, data_dir, json_call, kill_vms_in, runtime};
use fastvm_worker::cgroup::{Cgroups, IoDevice, Limits};
use fastvm_worker::console::LOG_CAP;
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, MachineType, Runtime, VmState};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

const CAP: usize = 1 << 20;

/// One runtime with two VMs, shared by the tests that cannot disturb each other.
static SHARED: LazyLock<(Arc<Runtime>, String, String)> = LazyLock::new(|| {
    let rt = runtime("confinement");
    let vm = || CreateVm {
        machine: "c1m2".into(),
        ..Default::default()
    };
    let a = block_on(rt.create(vm())).expect("launch A").id;
    let b = block_on(rt.create(vm())).expect("launch B").id;
    (rt, a, b)
});

fn create(rt: &Runtime) -> String {
    block_on(rt.create(CreateVm {
        machine: "c1m2".into(),
        ..Default::default()
    }))
    .expect("launch")
    .id
}

fn spec(rt: &Runtime, id: &str) -> Value {
    let path = rt.vm_dir(id).expect("vm dir").join("spec.json");
    serde_json::from_slice(&std::fs::read(path).expect("spec.json")).expect("spec json")
}

fn uid_of(rt: &Runtime, id: &str) -> u32 {
    spec(rt, id)["launch"]["uid"]
        .as_u64()
        .and_then(|u| u32::try_from(u).ok())
        .expect("VM has a uid")
}

fn pid_of(rt: &Runtime, id: &str) -> u32 {
    rt.get(id).expect("vm").pid.expect("pid")
}

/// The value of `field:` in /proc/<pid>/status.
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Run `argv` as `uid` (gid = uid, no groups, no capabilities).
fn as_uid(uid: u32, argv: &[&str]) -> std::process::Output {
    let id = uid.to_string();
    std::process::Command::new("setpriv")
        .args([
            "--reuid",
            &id,
            "--regid",
            &id,
            "--clear-groups",
            "--inh-caps=-all",
            "--",
        ])
        .args(argv)
        .output()
        .expect("run setpriv")
}

fn assert_denied(uid: u32, argv: &[&str]) {
    let out = as_uid(uid, argv);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Permission denied"),
        "uid {uid} ran {argv:?}: status {}, stderr {err}",
        out.status
    );
}

fn exec(rt: &Runtime, id: &str, cmd: &str) -> String {
    let out = block_on(rt.exec_buffered(id, &ExecRequest::shell(cmd), CAP)).expect("exec");
    assert_eq!(
        out.exit_code,
        0,
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn qemu_runs_as_its_own_uid_without_capabilities_under_seccomp() {
    let (rt, a, b) = &*SHARED;
    let (ua, ub) = (uid_of(rt, a), uid_of(rt, b));
    assert_ne!(ua, ub);
    for (id, uid) in [(a, ua), (b, ub)] {
        assert!(uid >= fastvm_worker::jail::UID_BASE, "{uid}");
        let pid = pid_of(rt, id);
        let u = uid.to_string();
        assert_eq!(status_field(pid, "Uid"), [u.as_str(); 4].join(" "));
        assert_eq!(status_field(pid, "Gid"), [u.as_str(); 4].join(" "));
        assert_eq!(status_field(pid, "Groups"), "");
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        assert_eq!(status_field(pid, "CapPrm"), "0000000000000000");
        assert_eq!(status_field(pid, "CapAmb"), "0000000000000000");
        assert_eq!(status_field(pid, "Seccomp"), "2");
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        // Only the fds of the jail's layout cross exec (no inherited leftovers).
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|l| l.to_string_lossy().into_owned())
            .collect();
        assert!(!fds.iter().any(|l| l.starts_with("pipe:")), "{fds:?}");
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        assert!(cmdline.contains(fastvm_worker::qemu::SANDBOX), "{cmdline}");
        assert!(!cmdline.contains("exec:"), "{cmdline}");
    }
}

#[test]
fn qemu_is_in_its_own_cgroup_with_the_machine_type_limits() {
    let (rt, a, _) = &*SHARED;
    let pid = pid_of(rt, a);
    let m = MachineType::lookup("c1m2").expect("c1m2");
    // Every launch is a restore onto a sealed RAM copy: guest RAM counts twice.
    let want = Limits::for_restored_vm(m.vcpus, m.memory_mib, rt.accel());
    let overhead = fastvm_worker::cgroup::overhead_mib(rt.accel());
    assert_eq!(
        want.memory_max,
        (2 * u64::from(m.memory_mib) + overhead) << 20
    );
    let cgroups = Cgroups::setup();
    let dirs = cgroups.dirs(a);
    assert!(
        !dirs.is_empty(),
        "no cgroup controllers usable: {cgroups:?}"
    );
    let read = |dir: &Path, f: &str| {
        std::fs::read_to_string(dir.join(f))
            .unwrap_or_else(|e| panic!("{}/{f}: {e}", dir.display()))
            .trim()
            .to_owned()
    };
    for dir in &dirs {
        let procs = read(dir, "cgroup.procs");
        assert!(
            procs.lines().any(|p| p == pid.to_string()),
            "{pid} not in {}: {procs}",
            dir.display()
        );
    }
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    match &cgroups {
        Cgroups::V2 { .. } => {
            let dir = &dirs[0];
            assert!(own.contains(&format!("/vm-{a}")), "{own}");
            assert_eq!(read(dir, "memory.max"), want.memory_max.to_string());
            assert_eq!(read(dir, "memory.swap.max"), "0");
            assert_eq!(read(dir, "pids.max"), want.pids_max.to_string());
            assert_eq!(
                read(dir, "cpu.max"),
                format!("{} 100000", want.cpu_quota_us)
            );
            if let (Some(d), true) = (IoDevice::of_dir(rt.data_dir()), dir.join("io.max").exists())
            {
                assert_eq!(
                    read(dir, "io.max"),
                    format!(
                        "{}:{} rbps={} wbps={} riops={} wiops={}",
                        d.major, d.minor, want.io_bps, want.io_bps, want.io_iops, want.io_iops
                    )
                );
            }
        }
        Cgroups::V1 { parents } => {
            for ((ctrl, _), dir) in parents.iter().zip(&dirs) {
                let line = own
                    .lines()
                    .find(|l| {
                        l.split(':')
                            .nth(1)
                            .is_some_and(|c| c.split(',').any(|c| c == *ctrl))
                    })
                    .unwrap_or_default();
                assert!(line.ends_with(&format!("/vm-{a}")), "{ctrl}: {own}");
                match *ctrl {
                    "memory" => assert_eq!(
                        read(dir, "memory.limit_in_bytes"),
                        want.memory_max.to_string()
                    ),
                    "pids" => assert_eq!(read(dir, "pids.max"), want.pids_max.to_string()),
                    // Disk caps on the data dir's disk (none when it is on no block device).
                    "blkio" => {
                        if let Some(d) = IoDevice::of_dir(rt.data_dir()) {
                            for (file, v) in [
                                ("blkio.throttle.read_bps_device", want.io_bps),
                                ("blkio.throttle.write_bps_device", want.io_bps),
                                ("blkio.throttle.read_iops_device", want.io_iops),
                                ("blkio.throttle.write_iops_device", want.io_iops),
                            ] {
                                assert_eq!(read(dir, file), format!("{}:{} {v}", d.major, d.minor));
                            }
                        }
                    }
                    "cpu" => {
                        assert_eq!(read(dir, "cpu.cfs_quota_us"), want.cpu_quota_us.to_string());
                        assert_eq!(read(dir, "cpu.cfs_period_us"), "100000");
                    }
                    _ => {}
                }
            }
        }
        Cgroups::Off { reason } => panic!("no cgroup limits: {reason}"),
    }
}

/// A guest may use all of its RAM: its first writes to pages that were
/// holes in the RAM image also add zero pages to the shared sealed copy,
/// charged to its cgroup, and that must not get its QEMU killed.
#[test]
fn a_guest_using_most_of_its_ram_is_not_killed_by_its_cgroup() {
    let (rt, _, _) = &*SHARED;
    let id = create(rt);
    let pid = pid_of(rt, &id);
    // 1.6 GiB of fresh guest pages in a tmpfs of a 2 GiB guest.
    let out = exec(
        rt,
        &id,
        "mkdir -p /mnt/fill && mount -t tmpfs -o size=1700m fill /mnt/fill \
         && dd if=/dev/zero of=/mnt/fill/zeros bs=1M count=1600 2>/dev/null \
         && du -m /mnt/fill/zeros | cut -f1",
    );
    assert_eq!(out.trim(), "1600");
    assert_eq!(exec(rt, &id, "echo alive").trim(), "alive");
    assert_eq!(rt.get(&id).expect("vm").pid, Some(pid), "same QEMU");
    assert_eq!(rt.get(&id).expect("vm").state, VmState::Running);
    block_on(rt.delete(&id)).expect("delete");
}

#[test]
fn a_vm_uid_reaches_only_its_own_files() {
    let (rt, a, b) = &*SHARED;
    let ua = uid_of(rt, a);
    let disk = |id: &str| {
        spec(rt, id)["layers"][0]
            .as_str()
            .expect("layer")
            .to_owned()
    };
    // Its own writable layer: readable (the check below can fail for the right reason).
    let own = as_uid(ua, &["head", "-c", "4", &disk(a)]);
    assert!(own.status.success(), "{:?}", own);
    assert_eq!(own.stdout, b"QFI\xfb");
    // Another VM's layer, directory and records; the data dir's listing.
    let dir_b = rt.vm_dir(b).expect("dir");
    let dir_b_spec = dir_b.join("spec.json");
    let data = rt.data_dir().to_path_buf();
    for argv in [
        vec!["cat", &disk(b)],
        vec!["cat", dir_b_spec.to_str().expect("utf8")],
        vec!["ls", dir_b.to_str().expect("utf8")],
        vec!["ls", data.to_str().expect("utf8")],
        vec!["ls", data.join("layers").to_str().expect("utf8")],
    ] {
        assert_denied(ua, &argv);
    }
    // Its own VM dir's root-owned records and logs are closed to it too.
    for f in [
        "spec.json",
        "net.json",
        "console.log",
        "qemu.log",
        "qemu.pid",
    ] {
        let path = rt.vm_dir(a).expect("dir").join(f);
        assert!(path.is_file(), "{}", path.display());
        assert_denied(ua, &["cat", path.to_str().expect("utf8")]);
    }
    // Golden RAM images are root's alone (restores get a sealed copy).
    let golden: Vec<PathBuf> = std::fs::read_dir(data.join("golden"))
        .expect("golden dir")
        .flatten()
        .map(|e| e.path().join("ram"))
        .filter(|p| p.is_file())
        .collect();
    assert!(!golden.is_empty());
    for ram in golden {
        let meta = std::fs::metadata(&ram).expect("ram");
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (0, 0o600),
            "{}",
            ram.display()
        );
        assert_denied(ua, &["head", "-c", "1", ram.to_str().expect("utf8")]);
    }
}

#[test]
fn lifecycle_works_confined_and_cgroups_go_with_the_vm() {
    let (rt, _, _) = &*SHARED;
    let id = create(rt);
    exec(rt, &id, "echo confined > /root/marker");
    block_on(rt.pause(&id)).expect("pause");
    assert_eq!(rt.get(&id).expect("vm").state, VmState::Paused);
    block_on(rt.resume(&id)).expect("resume");
    let snap = block_on(rt.snapshot(&id, None)).expect("snapshot");
    // The frozen layer is read-only for every VM now; the VM writes to a new one it owns.
    let frozen = std::fs::metadata(&snap.layers[0]).expect("frozen layer");
    assert_eq!((frozen.uid(), frozen.mode() & 0o777), (0, 0o644));
    let top = spec(rt, &id)["layers"][0].as_str().expect("top").to_owned();
    let top_meta = std::fs::metadata(&top).expect("top layer");
    assert_eq!(top_meta.uid(), uid_of(rt, &id));
    assert_eq!(top_meta.mode() & 0o777, 0o600);
    assert_eq!(exec(rt, &id, "cat /root/marker"), "confined\n");
    let restored = block_on(rt.create(CreateVm {
        machine: "c1m2".into(),
        snapshot: Some(snap.id.clone()),
        ..Default::default()
    }))
    .expect("restore")
    .id;
    assert_eq!(exec(rt, &restored, "cat /root/marker"), "confined\n");
    assert_ne!(uid_of(rt, &restored), uid_of(rt, &id));
    let dirs = Cgroups::setup().dirs(&restored);
    assert!(dirs.iter().all(|d| d.is_dir()));
    block_on(rt.delete(&restored)).expect("delete");
    block_on(rt.delete(&id)).expect("delete");
    wait_until("the cgroups to go", Duration::from_secs(30), || {
        dirs.iter().all(|d| !d.exists())
    });
}

#[test]
fn a_console_flood_leaves_the_log_under_its_cap() {
    let (rt, _, _) = &*SHARED;
    let id = create(rt);
    let dir = rt.vm_dir(&id).expect("dir");
    exec(
        rt,
        &id,
        "setsid sh -c 'cat /dev/urandom | base64 > /dev/ttyS0' </dev/null >/dev/null 2>&1 & echo",
    );
    // Until the log rotated at least twice over (more than 2 MiB written).
    let mut rotations = 0;
    let mut last_ino = 0;
    let deadline = Instant::now() + Duration::from_secs(600);
    while rotations < 3 {
        assert!(Instant::now() < deadline, "the flood never filled the log");
        if let Ok(m) = std::fs::metadata(dir.join("console.log")) {
            assert!(m.len() <= LOG_CAP, "console.log is {} bytes", m.len());
            if m.ino() != last_ino {
                rotations += 1;
                last_ino = m.ino();
            }
        }
        if let Ok(m) = std::fs::metadata(dir.join("console.log.1")) {
            assert!(m.len() <= LOG_CAP, "console.log.1 is {} bytes", m.len());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Still a working VM, and a bounded tail for readers.
    assert_eq!(exec(rt, &id, "echo alive"), "alive\n");
    let files: u64 = ["console.log", "console.log.1"]
        .iter()
        .map(|f| std::fs::metadata(dir.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    assert!(files <= 2 * LOG_CAP, "{files}");
    block_on(rt.delete(&id)).expect("delete");
}

/// A restarted worker re-adopts confined VMs: same uid, same cgroup, exec works.
#[test]
fn restart_readopts_confined_vms() {
    let dir = data_dir("confinement-restart");
    let (id, pid, uid) = {
        let rt_a = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("rt");
        let ids = rt_a.block_on(async {
            let a = Runtime::open(config(&dir)).await.expect("open A");
            let info = a
                .create(CreateVm {
                    machine: "c1m2".into(),
                    ..Default::default()
                })
                .await
                .expect("launch");
            let uid = uid_of(&a, &info.id);
            (info.id, info.pid.expect("pid"), uid)
        });
        drop(rt_a);
        ids
    };
    let b = block_on(Runtime::open(config(&dir))).expect("open B");
    assert_eq!(b.get(&id).expect("vm").state, VmState::Running);
    assert_eq!(pid_of(&b, &id), pid);
    assert_eq!(uid_of(&b, &id), uid);
    assert_eq!(
        status_field(pid, "Uid").split(' ').next(),
        Some(uid.to_string().as_str())
    );
    assert_eq!(exec(&b, &id, "echo adopted"), "adopted\n");
    let dirs = Cgroups::setup().dirs(&id);
    for d in &dirs {
        let procs = std::fs::read_to_string(d.join("cgroup.procs")).expect("procs");
        assert!(
            procs.lines().any(|p| p == pid.to_string()),
            "{}",
            d.display()
        );
    }
    block_on(b.delete(&id)).expect("delete");
    wait_until("the cgroups to go", Duration::from_secs(30), || {
        dirs.iter().all(|d| !d.exists())
    });
    kill_vms_in(&dir);
}

/// The control plane's database next to the VMs is closed to VM uids.
#[test]
fn the_database_is_closed_to_vm_uids() {
    let dir = data_dir("confinement-server");
    let mut cfg = fastvm_server::ServerConfig::new(&dir);
    cfg.runtime = config(&dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(600);
    let server = block_on(fastvm_server::start(cfg)).expect("start server");
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("admin key")
        .trim()
        .to_owned();
    let (status, vm) = block_on(json_call(
        &Client::new(),
        format!("{}/v1/vms", server.url()),
        Some(&key),
        Method::POST,
        Some(json!({"machineType": "c1m2"})),
    ));
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().expect("id");
    let record: Value = serde_json::from_slice(
        &std::fs::read(dir.join("vms").join(id).join("spec.json")).expect("spec.json"),
    )
    .expect("json");
    let uid = record["launch"]["uid"].as_u64().expect("uid") as u32;
    let db = dir.join("fastvm.db");
    assert!(db.is_file());
    assert_denied(uid, &["cat", db.to_str().expect("utf8")]);
    assert_denied(
        uid,
        &["cat", dir.join("admin-api-key").to_str().expect("utf8")],
    );
    kill_vms_in(&dir);
}
