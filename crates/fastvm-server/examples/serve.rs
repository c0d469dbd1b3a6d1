//! A bare `serve` for development and API fuzzing before (or without) the
//! `fastvm` CLI: `cargo run -p fastvm-server --example serve -- DATA_DIR [ADDR]`.
//! `FASTVM_DATABASE_URL` selects PostgreSQL; Ctrl-C (or SIGTERM) stops it,
//! leaving VMs running.

use fastvm_server::ServerConfig;
use std::path::PathBuf;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let mut args = std::env::args().skip(1);
    let data_dir = PathBuf::from(
        args.next()
            .ok_or_else(|| anyhow::anyhow!("usage: serve DATA_DIR [ADDR]"))?,
    );
    let mut cfg = ServerConfig::new(&data_dir);
    if let Some(addr) = args.next() {
        cfg.listen = addr.parse()?;
    }
    cfg.database_url = std::env::var("FASTVM_DATABASE_URL").ok();
    if let Some(images) = std::env::var_os("FASTVM_IMAGE_DIR") {
        cfg.runtime.image_dir = Some(PathBuf::from(images));
    }
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    fastvm_server::serve(cfg, shutdown).await
}
