//! bench-remote: what the internal worker API costs. The same runtime is
//! driven in process (`LocalWorker`, the embedded worker of `fastvm serve`:
//! the floor) and through `RemoteWorker` over loopback HTTP to the worker
//! API (`fastvm_worker_api::service`), alternating, in one run:
//!
//! | figure        | what                                                    |
//! |---------------|---------------------------------------------------------|
//! | launch        | `Worker::create` of a c1m2 from the golden snapshot      |
//! | exec `true`   | `Worker::exec` to the exit event                         |
//! | exec 16 MiB   | `head -c 16M /dev/zero` streamed to the consumer         |
//!
//! Loopback hides the network: on real hosts add one RTT per call (two for
//! streams: the upgrade, then the OPEN frame).
//!
//! `cargo run --release -p fastvm-bench --bin bench-remote -- [LAUNCHES] [EXECS]`
//! (defaults 10 and 100).

#[path = "common.rs"]
mod common;

use common::{ms, percentile, Cleanup};
use fastvm_types::{FirewallPolicy, VmId};
use fastvm_worker::{LocalWorker, Runtime, RuntimeConfig};
use fastvm_worker_api::cluster::worker_token;
use fastvm_worker_api::service::{router, ExpectedToken};
use fastvm_worker_api::{
    ExecEvent, ExecRequest, MachineType, RemoteWorker, VmSpec, Worker, WorkerEndpoint,
};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;

fn spec() -> anyhow::Result<VmSpec> {
    Ok(VmSpec {
        id: VmId::new_v4(),
        machine: MachineType::lookup("c1m2")?,
        hostname: "bench".into(),
        env: Default::default(),
        snapshot: None,
        firewall: FirewallPolicy::default(),
    })
}

/// Run `cmd`, consume its output; the bytes seen.
async fn exec(w: &dyn Worker, vm: VmId, cmd: &str) -> anyhow::Result<usize> {
    let mut ev = w.exec(vm, ExecRequest::shell(cmd)).await?;
    let mut n = 0;
    while let Some(e) = ev.next().await {
        match e? {
            ExecEvent::Stdout(d) | ExecEvent::Stderr(d) => n += d.len(),
            ExecEvent::Exit(st) => {
                anyhow::ensure!(st.code == 0, "{cmd}: exit {}", st.code);
                return Ok(n);
            }
        }
    }
    anyhow::bail!("{cmd}: no exit")
}

fn line(what: &str, local: &mut [f64], remote: &mut [f64]) {
    let (l50, r50) = (percentile(local, 0.5), percentile(remote, 0.5));
    let (l99, r99) = (percentile(local, 0.99), percentile(remote, 0.99));
    println!(
        "{what:<14} embedded p50 {l50:>8.2} ms p99 {l99:>8.2} ms | remote p50 {r50:>8.2} ms p99 {r99:>8.2} ms | ratio p50 {:.2}x",
        r50 / l50
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    common::init_tracing();
    let mut args = std::env::args().skip(1);
    let launches: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let execs: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
    let data = std::env::temp_dir().join(format!("fastvm-bench-remote-{}", std::process::id()));
    let _cleanup = Cleanup(data.clone());
    let mut cfg = RuntimeConfig::new(&data);
    cfg.image_dir = std::env::var_os("FASTVM_IMAGE_DIR").map(Into::into);
    let runtime = Runtime::open(cfg).await?;
    let local: Arc<dyn Worker> = Arc::new(LocalWorker::with_id(runtime, "wk_bench"));
    let expected = ExpectedToken::default();
    expected.set(Some(worker_token("bench", "wk_bench", 1)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let app = router(local.clone(), expected);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let remote = RemoteWorker::new(WorkerEndpoint {
        id: "wk_bench".into(),
        address,
        token: worker_token("bench", "wk_bench", 1),
        generation: 1,
    })?;

    // Warm: the golden snapshot (and its sealed RAM copy) exist before timing.
    let warm = spec()?;
    local.create(warm.clone()).await?;
    local.delete(warm.id).await?;

    let (mut l_launch, mut r_launch) = (Vec::new(), Vec::new());
    for _ in 0..launches {
        for (w, out) in [
            (&*local, &mut l_launch),
            (&remote as &dyn Worker, &mut r_launch),
        ] {
            let s = spec()?;
            let t = Instant::now();
            w.create(s.clone()).await?;
            out.push(ms(t.elapsed()));
            w.delete(s.id).await?;
        }
    }
    let vm = spec()?;
    local.create(vm.clone()).await?;
    let (mut l_exec, mut r_exec) = (Vec::new(), Vec::new());
    for _ in 0..execs {
        for (w, out) in [
            (&*local, &mut l_exec),
            (&remote as &dyn Worker, &mut r_exec),
        ] {
            let t = Instant::now();
            exec(w, vm.id, "true").await?;
            out.push(ms(t.elapsed()));
        }
    }
    let (mut l_big, mut r_big) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        for (w, out) in [(&*local, &mut l_big), (&remote as &dyn Worker, &mut r_big)] {
            let t = Instant::now();
            let n = exec(w, vm.id, "head -c 16777216 /dev/zero").await?;
            anyhow::ensure!(n == 16 << 20, "short read: {n}");
            out.push(ms(t.elapsed()));
        }
    }
    local.delete(vm.id).await?;
    println!("bench-remote: {launches} launches, {execs} execs, 3 x 16 MiB streams each way (embedded = floor)");
    line("launch", &mut l_launch, &mut r_launch);
    line("exec true", &mut l_exec, &mut r_exec);
    line("exec 16 MiB", &mut l_big, &mut r_big);
    Ok(())
}
