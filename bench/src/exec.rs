//! bench-exec: the agent channel's costs on one running VM, for comparing a
//! change of the channel (e.g. issue 17's bounded inboxes) before and after.
//!
//! | figure                         | what                                                     |
//! |--------------------------------|----------------------------------------------------------|
//! | exec `true`                    | `Runtime::exec_buffered` round trip (floor: a ping)       |
//! | stdout stream                  | `head -c SIZE /dev/zero` read through an `ExecStream`     |
//! | stdin stream                   | SIZE bytes written to `cat > /dev/null` via `StdinWriter` |
//!
//! `cargo run --release -p fastvm-bench --bin bench-exec -- [RUNS] [MIB]`
//! (default 100 round trips, 64 MiB streams; each stream figure is the median
//! of 3).

#[path = "common.rs"]
mod common;

use bytes::Bytes;
use common::{ms, percentile, Cleanup};
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecEvent, ExecRequest, Runtime};
use std::time::Instant;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let mut args = std::env::args().skip(1);
    let runs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
    let mib: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(64);
    let (data, mut cfg) = common::bench_config("exec");
    let _cleanup = Cleanup(data.clone());
    cfg.network = None;
    let rt = Runtime::open(cfg).await?;
    let vm = rt
        .create(CreateVm {
            machine: "c1m2".into(),
            ..Default::default()
        })
        .await?;
    println!(
        "bench-exec: accel={} c1m2, {runs} round trips, {mib} MiB streams",
        rt.accel()
    );

    // Exec round trip beside a ping, interleaved.
    let req = ExecRequest::argv(["true"]);
    for _ in 0..5 {
        rt.exec_buffered(&vm.id, &req, 1024).await?;
    }
    let (mut ours, mut floor) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        rt.ping(&vm.id).await?;
        floor.push(ms(t.elapsed()));
        let t = Instant::now();
        let out = rt.exec_buffered(&vm.id, &req, 1024).await?;
        ours.push(ms(t.elapsed()));
        anyhow::ensure!(out.exit_code == 0, "true failed");
    }
    println!(
        "exec `true`      p50 {:>7.2} ms  p99 {:>7.2} ms | ping p50 {:>6.2} ms  p99 {:>6.2} ms",
        percentile(&mut ours, 0.5),
        percentile(&mut ours, 0.99),
        percentile(&mut floor, 0.5),
        percentile(&mut floor, 0.99)
    );

    // Guest -> host: stdout through the window.
    let size = mib << 20;
    let mut rates = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let mut stream = rt
            .exec(
                &vm.id,
                &ExecRequest::shell(&format!("head -c {size} /dev/zero")),
            )
            .await?;
        let mut got = 0usize;
        while let Some(ev) = stream.next().await {
            match ev? {
                ExecEvent::Stdout(d) => got += d.len(),
                ExecEvent::Stderr(_) => {}
                ExecEvent::Exit(s) => anyhow::ensure!(s.code == 0, "head failed: {s:?}"),
            }
        }
        anyhow::ensure!(got == size, "got {got} of {size} bytes");
        rates.push(size as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    println!(
        "stdout stream    {:>7.1} MB/s (median of 3: {rates:.1?})",
        percentile(&mut rates, 0.5)
    );

    // Host -> guest: stdin under the agent's credit.
    let mut rates = Vec::new();
    let chunk = Bytes::from(vec![b'x'; 256 << 10]);
    for _ in 0..3 {
        let t = Instant::now();
        let mut stream = rt
            .exec(&vm.id, &ExecRequest::shell("cat > /dev/null").with_stdin())
            .await?;
        let mut stdin = stream
            .take_stdin()
            .ok_or_else(|| anyhow::anyhow!("no stdin"))?;
        let chunk = chunk.clone();
        let writer = tokio::spawn(async move {
            for _ in 0..size / chunk.len() {
                stdin.write(chunk.clone()).await?;
            }
            stdin.finish().await
        });
        while let Some(ev) = stream.next().await {
            if let ExecEvent::Exit(s) = ev? {
                anyhow::ensure!(s.code == 0, "cat failed: {s:?}");
            }
        }
        writer.await??;
        rates.push(size as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    println!(
        "stdin stream     {:>7.1} MB/s (median of 3: {rates:.1?})",
        percentile(&mut rates, 0.5)
    );
    rt.delete(&vm.id).await?;
    Ok(())
}
