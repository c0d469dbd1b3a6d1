//! Concurrent launches and fork: what many launches at once cost against
//! one, in the same run.
//!
//! | figure                                   | floor                                    |
//! |------------------------------------------|------------------------------------------|
//! | N concurrent launches from machine type  | one launch, p50 of this run (target: 10 at once <= 3x) |
//! | 50 concurrent launches                   | (all must succeed; time and failures)    |
//! | fork 10: capture + 10 restores sharing   | 10 concurrent launches from an existing  |
//! | its RAM, snapshot deleted                | snapshot of the same VM                  |
//! | PSS per forked VM                        | PSS per VM of the 10 launched ones       |
//! | capture of an idle c1m2 / c2m4 / c4m8, RAM from the process | the same VM's captures migrating the RAM (before); does it grow with RAM size? |
//!
//! Run: `cargo run --release -p fastvm-bench --bin bench-launches -- [runs] [wide]`
//! (defaults: 10 single launches, 50 for the wide round). `RUST_LOG=fastvm_worker=debug`
//! shows each launch's phases.

#[path = "common.rs"]
mod common;

use common::{meminfo_mib, ms, percentile, Cleanup};
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, Runtime};
use std::sync::Arc;
use std::time::Instant;

fn machine() -> CreateVm {
    CreateVm {
        machine: "c1m2".into(),
        ..Default::default()
    }
}

fn from_snapshot(id: &str) -> CreateVm {
    CreateVm {
        snapshot: Some(id.to_owned()),
        ..Default::default()
    }
}

/// Launch `reqs` at once; (wall time ms, ids of those that run, failures).
async fn at_once(rt: &Arc<Runtime>, reqs: Vec<CreateVm>) -> (f64, Vec<String>, Vec<String>) {
    let t = Instant::now();
    let tasks: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let rt = rt.clone();
            tokio::spawn(async move { rt.create(r).await })
        })
        .collect();
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for t in tasks {
        match t.await {
            Ok(Ok(vm)) => ok.push(vm.id),
            Ok(Err(e)) => failed.push(e.to_string()),
            Err(e) => failed.push(e.to_string()),
        }
    }
    (ms(t.elapsed()), ok, failed)
}

/// CPU time (ms) of process `pid` so far (utime + stime).
fn cpu_ms_of(pid: &str) -> f64 {
    let (user, sys) = user_sys_ms_of(pid);
    user + sys
}

/// (utime, stime) in ms of process `pid` so far.
fn user_sys_ms_of(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces), 1-based 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) * 1000.0 / hz, ticks(12) * 1000.0 / hz)
}

/// CPU time (ms) of this process's reaped children (qemu-img, ip, nft, ...).
fn children_cpu_ms() -> f64 {
    // SAFETY: getrusage writes into a valid struct.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1000.0 + tv.tv_usec as f64 / 1000.0;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Mean PSS (MiB) of the QEMUs of `ids`.
fn mean_pss(rt: &Runtime, ids: &[String]) -> f64 {
    let total: f64 = ids
        .iter()
        .map(|id| {
            let pid = rt.get(id).ok().and_then(|v| v.pid).unwrap_or(0);
            common::rollup_mib(pid, "Pss:").unwrap_or(f64::NAN)
        })
        .sum();
    total / ids.len().max(1) as f64
}

async fn delete_all(rt: &Runtime, ids: Vec<String>) -> anyhow::Result<()> {
    for id in ids {
        rt.delete(&id).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let wide: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(50);
    let (data, cfg) = common::bench_config("launches");
    let _cleanup = Cleanup(data.clone());
    let rt: Arc<Runtime> = Runtime::open(cfg).await?;
    rt.golden_snapshot("c1m2").await?;
    println!(
        "fast vm launch bench: accel={} runs={runs} wide={wide} machine=c1m2",
        rt.accel()
    );

    // One launch at a time: the floor.
    let mut single = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let vm = rt.create(machine()).await?;
        single.push(ms(t.elapsed()));
        rt.delete(&vm.id).await?;
    }
    let one = percentile(&mut single, 0.5);
    println!("single launch:               p50 {one:>8.1} ms (floor of the rows below)");

    for n in [2usize, 5, 10] {
        let (own0, kids0) = (cpu_ms_of("self"), children_cpu_ms());
        let (all, ok, failed) = at_once(&rt, (0..n).map(|_| machine()).collect()).await;
        let (own, kids) = (cpu_ms_of("self") - own0, children_cpu_ms() - kids0);
        let (qemu_user, qemu_sys) = ok
            .iter()
            .filter_map(|id| rt.get(id).ok().and_then(|v| v.pid))
            .map(|pid| user_sys_ms_of(&pid.to_string()))
            .fold((0.0, 0.0), |(u, s), (du, ds)| (u + du, s + ds));
        let qemu = qemu_user + qemu_sys;
        let per = (own + kids + qemu) / n as f64;
        println!(
            "{n:>2} concurrent launches:      all running in {all:>8.1} ms | ratio {:.2}x of one (target for 10: <= 3x) | failed {}",
            all / one,
            failed.len()
        );
        println!(
            "   CPU per launch {per:.1} ms (QEMU {:.1} = user {:.1} + system {:.1}, worker {:.1}, helpers {:.1}); {n} x that on 2 cores = {:.1} ms = {:.2}x of one",
            qemu / n as f64,
            qemu_user / n as f64,
            qemu_sys / n as f64,
            own / n as f64,
            kids / n as f64,
            per * n as f64 / 2.0,
            per * n as f64 / 2.0 / one
        );
        delete_all(&rt, ok).await?;
    }

    // Fork vs launches from an existing snapshot, same source.
    let src = rt.create(machine()).await?;
    rt.exec_buffered(
        &src.id,
        &ExecRequest::shell("head -c 64M /dev/urandom > /dev/shm/data"),
        1024,
    )
    .await?;
    let snap = rt.snapshot(&src.id, None).await?;
    // Its sealed RAM copy is made in the background after the capture: let
    // it finish so that this row measures restores only.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (from_snap, launched, failed) =
        at_once(&rt, (0..10).map(|_| from_snapshot(&snap.id)).collect()).await;
    anyhow::ensure!(
        failed.is_empty(),
        "launches from the snapshot failed: {failed:?}"
    );
    let pss_launched = mean_pss(&rt, &launched);
    delete_all(&rt, launched).await?;
    let t = Instant::now();
    let hidden = rt.snapshot(&src.id, None).await?;
    let capture = ms(t.elapsed());
    let (_, forked, failed) =
        at_once(&rt, (0..10).map(|_| from_snapshot(&hidden.id)).collect()).await;
    rt.delete_snapshot(&hidden.id).await?;
    let fork = ms(t.elapsed());
    anyhow::ensure!(failed.is_empty(), "fork restores failed: {failed:?}");
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let pss_forked = mean_pss(&rt, &forked);
    println!(
        "fork 10 (capture {capture:.1} ms + 10 restores): {fork:>8.1} ms | 10 launches from a snapshot {from_snap:>8.1} ms | ratio {:.2}x",
        fork / from_snap
    );
    println!("PSS per VM: forked {pss_forked:.1} MiB | launched from the snapshot {pss_launched:.1} MiB (64 MiB of tmpfs data each)");
    delete_all(&rt, forked).await?;
    rt.delete(&src.id).await?;
    rt.delete_snapshot(&snap.id).await?;

    // Capture time against guest RAM size: the same idle guest on machine
    // types with 2, 4 and 8 GiB (untouched RAM is zero pages: holes). Three
    // captures taking the RAM from the process (what a worker does), then,
    // as the comparison, three migrating it (every page read by QEMU).
    for m in ["c1m2", "c2m4", "c4m8"] {
        let vm = rt
            .create(CreateVm {
                machine: m.into(),
                ..Default::default()
            })
            .await?;
        for from_process in [true, false] {
            fastvm_worker::qemu::set_ram_from_process(from_process);
            let done0 = fastvm_worker::qemu::ram_captures_from_process();
            let mut times = Vec::new();
            let mut data_mib = 0;
            let mut shmem_growth = Vec::new();
            for _ in 0..3 {
                let before = meminfo_mib("Shmem") as i64;
                let t = Instant::now();
                let s = rt.snapshot(&vm.id, None).await?;
                times.push(ms(t.elapsed()));
                shmem_growth.push(meminfo_mib("Shmem") as i64 - before);
                data_mib = s
                    .ram
                    .as_ref()
                    .and_then(|r| std::fs::metadata(r).ok())
                    .map_or(0, |m| {
                        (std::os::unix::fs::MetadataExt::blocks(&m) * 512) >> 20
                    });
                rt.delete_snapshot(&s.id).await?;
                // The sealed copy of the snapshot's RAM is made in the
                // background after a capture: not during the next one.
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
            let took = fastvm_worker::qemu::ram_captures_from_process() - done0;
            // A migration reads every page of the VM's sealed RAM copy
            // through its private mapping: its holes become shmem zero pages.
            println!(
                "capture of an idle {m}, RAM {}: 1st / 2nd / 3rd {:.1} / {:.1} / {:.1} ms, p50 {:>7.1} ms (RAM file {data_mib} MiB of data; shmem +{} / +{} / +{} MiB; {took} of 3 from the process)",
                if from_process { "from the process" } else { "migrated (before)" },
                times[0],
                times[1],
                times[2],
                percentile(&mut times.clone(), 0.5),
                shmem_growth[0],
                shmem_growth[1],
                shmem_growth[2],
            );
        }
        fastvm_worker::qemu::set_ram_from_process(true);
        rt.delete(&vm.id).await?;
    }

    // Many at once: all must succeed.
    let (all, ok, failed) = at_once(&rt, (0..wide).map(|_| machine()).collect()).await;
    println!(
        "{wide} concurrent launches:      {} running in {all:>8.1} ms ({:.2}x of one), {} failed{}",
        ok.len(),
        all / one,
        failed.len(),
        failed.first().map(|e| format!(": {e}")).unwrap_or_default()
    );
    delete_all(&rt, ok).await?;
    Ok(())
}
