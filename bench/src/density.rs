//! bench-density: what an idle VM costs the host, and what N idle VMs do to
//! the one that works.
//!
//! | figure                              | floor (same run)                          |
//! |-------------------------------------|-------------------------------------------|
//! | host CPU per idle VM (% of a core)  | target < 0.5 % under TCG (floor held: 1 %)|
//! |   QEMU process (main loop, vCPU,    |                                           |
//! |   other threads) + this process     |                                           |
//! |   (the worker: console drain, agent |                                           |
//! |   connection, resolver) / N         |                                           |
//! | guest interrupts per second         | (absolute, from `/proc/interrupts`)       |
//! | PSS / RSS per idle VM               | (absolute; shared pages counted once)     |
//! | exec `true` on one VM, N-1 idle     | exec `true` with that VM alone            |
//!
//! CPU time is read from `/proc/<pid>/stat` (utime + stime, whole process)
//! and `/proc/<pid>/task/<tid>/schedstat` (ns on CPU per thread) before and
//! after a window of idling (default 30 s): it is CPU *consumed*, so a busy
//! host does not inflate it (only the wall-clock latency figures).
//!
//! `cargo run --release -p fastvm-bench --bin bench-density -- [N] [--window SECS] [--runs R] [--no-net]`
//! (default N = 20, 30 s, 200 exec round trips). Launching stops early, with
//! a note, when the host's MemAvailable would drop below 2 GiB.

#[path = "common.rs"]
mod common;

use common::{ms, percentile, Cleanup};
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, Runtime};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Host memory kept free: launching stops before MemAvailable goes below.
const RESERVE_MIB: u64 = 2048;

struct Args {
    n: usize,
    window: Duration,
    runs: usize,
    net: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        n: 20,
        window: Duration::from_secs(30),
        runs: 200,
        net: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut num = |what: &str| -> anyhow::Result<u64> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("{what} needs a whole number"))
        };
        match arg.as_str() {
            "--window" => a.window = Duration::from_secs(num("--window")?),
            "--runs" => a.runs = num("--runs")? as usize,
            "--no-net" => a.net = false,
            n => {
                a.n = n.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "unknown argument {n:?} (want N, --window SECS, --runs R, --no-net)"
                    )
                })?
            }
        }
    }
    anyhow::ensure!(a.n >= 1, "N must be at least 1");
    anyhow::ensure!(
        a.window >= Duration::from_secs(5),
        "--window must be at least 5 s"
    );
    Ok(a)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of process `pid` in seconds (all its threads, dead ones too).
fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the command: state is field 3, utime 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / clock_ticks())
}

/// Nanoseconds on CPU of each live thread of `pid` (tid -> ns).
fn thread_cpu(pid: u32) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let ns = std::fs::read_to_string(t.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()));
        if let Some(ns) = ns {
            out.insert(tid, ns);
        }
    }
    out
}

fn mem_available_mib() -> u64 {
    common::meminfo_mib("MemAvailable")
}

/// One idle window's CPU figures.
struct Window {
    secs: f64,
    /// Per VM: whole-process CPU seconds.
    qemu: Vec<f64>,
    /// Summed over VMs: main thread (tid = pid), the busiest other thread
    /// (the vCPU under TCG), all other threads; CPU seconds.
    main: f64,
    vcpu: f64,
    other: f64,
    /// This process (the worker) CPU seconds.
    worker: f64,
}

impl Window {
    fn pct(&self, cpu_s: f64) -> f64 {
        cpu_s / self.secs * 100.0
    }
}

/// Let every VM idle for `window`, measuring CPU consumed.
async fn idle_window(pids: &[u32], window: Duration) -> Window {
    let me = std::process::id();
    let before: Vec<(Option<f64>, BTreeMap<u32, u64>)> = pids
        .iter()
        .map(|&p| (process_cpu(p), thread_cpu(p)))
        .collect();
    let worker0 = process_cpu(me);
    let t = Instant::now();
    tokio::time::sleep(window).await;
    let secs = t.elapsed().as_secs_f64();
    let worker1 = process_cpu(me);
    let mut w = Window {
        secs,
        qemu: Vec::new(),
        main: 0.0,
        vcpu: 0.0,
        other: 0.0,
        worker: worker1.zip(worker0).map_or(f64::NAN, |(b, a)| b - a),
    };
    for (&pid, (cpu0, threads0)) in pids.iter().zip(before) {
        let cpu1 = process_cpu(pid);
        w.qemu.push(cpu1.zip(cpu0).map_or(f64::NAN, |(b, a)| b - a));
        let mut others: Vec<f64> = Vec::new();
        for (tid, ns1) in thread_cpu(pid) {
            let d = ns1.saturating_sub(threads0.get(&tid).copied().unwrap_or(0)) as f64 / 1e9;
            if tid == pid {
                w.main += d;
            } else {
                others.push(d);
            }
        }
        others.sort_by(|a, b| b.total_cmp(a));
        w.vcpu += others.first().copied().unwrap_or(0.0);
        w.other += others.iter().skip(1).sum::<f64>();
    }
    w
}

/// What the guest counts: interrupts per source, the agent's (PID 1) CPU
/// ticks, and the softirqs.
struct GuestCounters {
    irqs: BTreeMap<String, (u64, String)>,
    agent_ticks: u64,
}

const GUEST_PROBE: &str = "cat /proc/interrupts; echo @@; cat /proc/1/stat";

fn parse_guest(out: &str) -> GuestCounters {
    let (irq_text, agent) = out.split_once("@@").unwrap_or((out, ""));
    let mut irqs = BTreeMap::new();
    for line in irq_text.lines().skip(1) {
        let mut words = line.split_whitespace();
        let Some(label) = words.next() else { continue };
        let mut count = 0u64;
        let mut desc = Vec::new();
        for w in words {
            match (desc.is_empty(), w.parse::<u64>()) {
                (true, Ok(n)) => count += n,
                _ => desc.push(w),
            }
        }
        irqs.insert(
            label.trim_end_matches(':').to_owned(),
            (count, desc.join(" ")),
        );
    }
    let agent_ticks = agent
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            n(11) + n(12)
        })
        .unwrap_or(0);
    GuestCounters { irqs, agent_ticks }
}

async fn guest_counters(rt: &Runtime, id: &str) -> anyhow::Result<GuestCounters> {
    let out = rt
        .exec_buffered(id, &ExecRequest::shell(GUEST_PROBE), 64 << 10)
        .await?;
    anyhow::ensure!(out.exit_code == 0, "guest probe failed: {:?}", out.error);
    Ok(parse_guest(&String::from_utf8_lossy(&out.stdout)))
}

/// p50/p99 of `runs` exec `true` round trips on `id`, in ms.
async fn exec_latency(rt: &Runtime, id: &str, runs: usize) -> anyhow::Result<(f64, f64)> {
    let req = ExecRequest::argv(["true"]);
    for _ in 0..5 {
        rt.exec_buffered(id, &req, 1024).await?;
    }
    let mut v = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let out = rt.exec_buffered(id, &req, 1024).await?;
        v.push(ms(t.elapsed()));
        anyhow::ensure!(out.exit_code == 0, "true failed");
    }
    Ok((percentile(&mut v, 0.5), percentile(&mut v, 0.99)))
}

fn print_window(label: &str, w: &Window, n: usize) {
    let nf = n as f64;
    let qemu: f64 = w.qemu.iter().sum();
    let mut per = w.qemu.clone();
    let max = per.iter().copied().fold(0.0, f64::max);
    println!(
        "{label}: host CPU per idle VM {:.2} % of a core (QEMU {:.2} % + worker {:.2} %) over {:.0} s",
        w.pct((qemu + w.worker) / nf),
        w.pct(qemu / nf),
        w.pct(w.worker / nf),
        w.secs
    );
    println!(
        "    QEMU per VM: p50 {:.2} %  max {max_pct:.2} % | threads per VM: main loop {:.2} %  vCPU {:.2} %  other {:.2} %",
        w.pct(percentile(&mut per, 0.5)),
        w.pct(w.main / nf),
        w.pct(w.vcpu / nf),
        w.pct(w.other / nf),
        max_pct = w.pct(max),
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let args = parse_args()?;
    let (data, mut cfg) = common::bench_config("density");
    let _cleanup = Cleanup(data.clone());
    if !args.net {
        cfg.network = None;
    }
    let rt = Runtime::open(cfg).await?;
    println!(
        "bench-density: accel={} c1m2, N={} idle VMs, window {} s, {} exec round trips, network {}",
        rt.accel(),
        args.n,
        args.window.as_secs(),
        args.runs,
        if args.net { "on" } else { "off" }
    );
    let launch = || {
        rt.create(CreateVm {
            machine: "c1m2".into(),
            ..Default::default()
        })
    };
    let pid_of = |id: &str| -> anyhow::Result<u32> {
        rt.get(id)?
            .pid
            .ok_or_else(|| anyhow::anyhow!("VM {id} has no process"))
    };

    // The floor: one VM alone.
    let first = launch().await?;
    let mut ids = vec![first.id.clone()];
    let floor = exec_latency(&rt, &first.id, args.runs).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let g0 = guest_counters(&rt, &first.id).await?;
    let t_guest = Instant::now();
    let w1 = idle_window(&[pid_of(&first.id)?], args.window).await;
    let g1 = guest_counters(&rt, &first.id).await?;
    let guest_secs = t_guest.elapsed().as_secs_f64();
    print_window("N=1", &w1, 1);
    println!("    guest (the 1 VM), per second over {guest_secs:.0} s:");
    for (label, (c1, desc)) in &g1.irqs {
        let c0 = g0.irqs.get(label).map_or(0, |x| x.0);
        if *c1 > c0 {
            println!(
                "      irq {label:<5} {:>8.2}/s  {desc}",
                (c1 - c0) as f64 / guest_secs
            );
        }
    }
    println!(
        "      agent (PID 1) CPU {:.3} % of the guest's vCPU",
        (g1.agent_ticks.saturating_sub(g0.agent_ticks)) as f64 / 100.0 / guest_secs * 100.0
    );
    let mem_before = mem_available_mib();

    // N VMs.
    let t = Instant::now();
    while ids.len() < args.n {
        if mem_available_mib() < RESERVE_MIB + 512 {
            println!(
                "stopping at {} VMs: MemAvailable {} MiB (reserve {RESERVE_MIB} MiB)",
                ids.len(),
                mem_available_mib()
            );
            break;
        }
        ids.push(launch().await?.id);
    }
    let n = ids.len();
    println!(
        "launched {} more VMs in {:.1} s",
        n - 1,
        t.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pids: Vec<u32> = ids
        .iter()
        .map(|id| pid_of(id))
        .collect::<anyhow::Result<_>>()?;
    let wn = idle_window(&pids, args.window).await;
    print_window(&format!("N={n}"), &wn, n);
    let (mut pss, mut rss) = (Vec::new(), Vec::new());
    for &p in &pids {
        pss.push(common::rollup_mib(p, "Pss:").unwrap_or(f64::NAN));
        rss.push(common::rollup_mib(p, "Rss:").unwrap_or(f64::NAN));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let mem_after = mem_available_mib();
    println!(
        "    memory per idle VM: PSS {:.1} MiB  RSS {:.1} MiB (means of {n}); host MemAvailable fell {:.1} MiB per VM",
        mean(&pss),
        mean(&rss),
        mem_before.saturating_sub(mem_after) as f64 / (n.max(2) - 1) as f64
    );
    let busy = exec_latency(&rt, &first.id, args.runs).await?;
    println!(
        "exec `true` on 1 VM with {} idle: p50 {:.2} ms  p99 {:.2} ms | alone p50 {:.2} ms  p99 {:.2} ms | ratio p50 {:.2}x  p99 {:.2}x",
        n - 1,
        busy.0,
        busy.1,
        floor.0,
        floor.1,
        busy.0 / floor.0,
        busy.1 / floor.1
    );
    let per_vm = |w: &Window, n: usize| w.pct((w.qemu.iter().sum::<f64>() + w.worker) / n as f64);
    println!(
        "host CPU per idle VM: N=1 {:.2} %  N={n} {:.2} % of a core (target < 0.5 %, floor held 1 %) | {n} idle VMs use {:.1} % of one core",
        per_vm(&w1, 1),
        per_vm(&wn, n),
        per_vm(&wn, n) * n as f64
    );
    for id in &ids {
        rt.delete(id).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_probe_parses_interrupts_and_agent_ticks() {
        let out = "           CPU0       \n  4:        120   IO-APIC   4-edge      ttyS0\nLOC:      5000   Local timer interrupts\nERR:          0\n@@\n1 (init) S 0 1 1 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0\n";
        let g = parse_guest(out);
        assert_eq!(g.irqs["4"], (120, "IO-APIC 4-edge ttyS0".to_owned()));
        assert_eq!(g.irqs["LOC"].0, 5000);
        assert_eq!(g.irqs["ERR"].0, 0);
        assert_eq!(g.agent_ticks, 12);
    }
}
