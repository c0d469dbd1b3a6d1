//! Cost of one VM's network setup and teardown, without QEMU: `Network::create`
//! (namespace, veth, tap, addresses, routes, sysctls, nft ruleset, resolver
//! sockets) and `Network::destroy`, N times in a row.
//!
//! Run: `cargo run --release -p fastvm-bench --bin bench-net-setup -- [runs]`
//! (root; default 30 runs; `RUST_LOG=fastvm_worker::net=debug` prints the
//! phases of every create). The resolvers' upstream is 127.0.0.1:9: nothing
//! is sent anywhere.

use fastvm_worker::net::{NetConfig, Network};
use std::time::Instant;

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(((v.len().max(1) - 1) as f64 * p).round() as usize)
        .copied()
        .unwrap_or(f64::NAN)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .try_init();
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = std::env::temp_dir().join(format!("fastvm-bench-netsetup-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = NetConfig {
        dns_upstream: "127.0.0.1:9".parse()?,
        ..NetConfig::default()
    };
    let net = Network::open(cfg, &dir).await?;
    let policy = fastvm_types::FirewallPolicy::default();
    let (mut create, mut destroy) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let t = Instant::now();
        let vm = net.create(&format!("bench-{i}"), &policy).await?;
        create.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        net.destroy(&vm).await;
        destroy.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("bench-net-setup: {runs} runs");
    println!(
        "network create   p50 {:>7.1} ms  p99 {:>7.1} ms",
        pct(&mut create, 0.5),
        pct(&mut create, 0.99)
    );
    println!(
        "network destroy  p50 {:>7.1} ms  p99 {:>7.1} ms",
        pct(&mut destroy, 0.5),
        pct(&mut destroy, 0.99)
    );
    Ok(())
}
