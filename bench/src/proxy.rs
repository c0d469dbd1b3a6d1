//! Services proxy benchmark: each figure beside its floor from the same run.
//!
//! | figure                                     | floor                                          |
//! |--------------------------------------------|------------------------------------------------|
//! | GET /hello through the proxy (keep-alive)  | the same GET straight to the guest's address   |
//! | 256 MiB download through the proxy         | the same download straight to the guest        |
//! | 1000 idle WebSockets through the proxy     | server RSS before they were opened             |
//! | first request to a paused VM (wake)        | a request to the running VM; POST /resume      |
//!
//! The guest runs `tests/guest/http_server.py` (Python, HTTP/1.1 keep-alive).
//! The floor path is the one the proxy's own upstream connections take (host
//! -> the VM's namespace -> its firewall -> the guest), minus the proxy.
//! Targets (issue 12): latency p50 <= 1.2x floor + 0.3 ms; throughput >= 90%
//! of the floor; 1000 idle WebSockets add < 100 MiB to the server's RSS.
//!
//! Run: `cargo run --release -p fastvm-bench --bin bench-proxy -- [requests]`

#[path = "common.rs"]
mod common;

use common::{ms, percentile, Cleanup};

use fastvm_server::proxy::ProxyConfig;
use fastvm_server::ServerConfig;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GUEST_SERVER: &str = include_str!("../../tests/guest/http_server.py");
const DOWNLOAD: u64 = 256 << 20;
const WEBSOCKETS: usize = 1000;

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

struct Api {
    client: reqwest::Client,
    base: String,
    key: String,
}

impl Api {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        anyhow::ensure!(status.is_success(), "{path}: {status} {v}");
        Ok(v)
    }
}

/// Time `n` sequential GETs of `url` (with `host` as Host when given) on one keep-alive client.
async fn latencies(
    client: &reqwest::Client,
    url: &str,
    host: Option<&str>,
    n: usize,
) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut req = client.get(url);
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let resp = req.send().await?;
        anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
        resp.bytes().await?;
        out.push(ms(t.elapsed()));
    }
    Ok(out)
}

/// MB/s of one streamed download of DOWNLOAD bytes.
async fn download(client: &reqwest::Client, url: &str, host: Option<&str>) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut req = client.get(url);
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let mut resp = req.send().await?;
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await? {
        got += chunk.len() as u64;
    }
    anyhow::ensure!(got == DOWNLOAD, "downloaded {got} of {DOWNLOAD} bytes");
    Ok(got as f64 / 1e6 / t.elapsed().as_secs_f64())
}

/// A WebSocket through the proxy, after the guest's greeting frame.
async fn open_websocket(proxy: SocketAddr, host: &str) -> anyhow::Result<TcpStream> {
    let mut ws = TcpStream::connect(proxy).await?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    ws.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        anyhow::ensure!(
            ws.read(&mut byte).await? == 1,
            "the proxy closed the WebSocket handshake"
        );
        head.push(byte[0]);
    }
    anyhow::ensure!(
        head.starts_with(b"HTTP/1.1 101"),
        "handshake answered {}",
        String::from_utf8_lossy(&head)
    );
    let mut hello = [0u8; 7];
    ws.read_exact(&mut hello).await?;
    anyhow::ensure!(&hello[2..] == b"hello", "no greeting frame");
    Ok(ws)
}

fn raise_fd_limit() {
    let want = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: setrlimit with a valid pointer to an initialised struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) };
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "error".into()))
        .try_init();
    raise_fd_limit();
    let requests: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let images: PathBuf = std::env::var_os("FASTVM_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into());
    let dir = std::env::temp_dir().join(format!("fastvm-bench-proxy-{}", std::process::id()));
    let _cleanup = Cleanup(dir.clone());

    let mut cfg = ServerConfig::new(&dir);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.runtime.image_dir = Some(images);
    if let Some(net) = cfg.runtime.network.as_mut() {
        // The guest resolves nothing here: never the host's resolver.
        net.dns_upstream = SocketAddr::from(([127, 0, 0, 1], 9));
    }
    cfg.proxy = Some(ProxyConfig::new("127.0.0.1:0".parse()?));
    let server = fastvm_server::start(cfg).await?;
    let proxy = server
        .proxy_addr()
        .ok_or_else(|| anyhow::anyhow!("no proxy"))?;
    let api = Api {
        client: reqwest::Client::new(),
        base: server.url(),
        key: std::fs::read_to_string(dir.join("admin-api-key"))?
            .trim()
            .to_owned(),
    };

    let vm = api
        .call(
            reqwest::Method::POST,
            "/v1/vms",
            Some(json!({"machineType": "c1m2"})),
        )
        .await?;
    let id = vm["id"].as_str().unwrap_or_default().to_owned();
    anyhow::ensure!(vm["status"] == "running", "VM not running: {vm}");
    let script = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, GUEST_SERVER);
    let start = format!(
        "echo {script} | base64 -d > /root/srv.py && (setsid python3 /root/srv.py 8080 </dev/null >/tmp/srv.log 2>&1 &); \
         for i in $(seq 100); do python3 -c 'import socket; socket.create_connection((\"::1\", 8080), 1)' 2>/dev/null && exit 0; sleep 0.1; done; exit 1"
    );
    let out = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/vms/{id}/exec"),
            Some(json!({"command": ["sh", "-c", start]})),
        )
        .await?;
    anyhow::ensure!(out["exitCode"] == 0, "guest server did not start: {out}");
    let svc = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/vms/{id}/services"),
            Some(json!({"name": "web", "port": 8080})),
        )
        .await?;
    let host = svc["url"]
        .as_str()
        .and_then(|u| u.strip_prefix("http://"))
        .and_then(|u| u.split('/').next())
        .unwrap_or_default()
        .to_owned();
    let ipv6 = api
        .call(reqwest::Method::GET, &format!("/v1/vms/{id}"), None)
        .await?["publicIpv6"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let direct = format!("http://[{ipv6}]:8080");
    let proxied = format!("http://{proxy}");
    let (floor_client, proxy_client) = (reqwest::Client::new(), reqwest::Client::new());
    println!(
        "fast vm proxy bench: requests={requests} download={} MiB websockets={WEBSOCKETS}",
        DOWNLOAD >> 20
    );

    // Latency, interleaved in blocks of 50 so both see the same machine.
    latencies(&floor_client, &format!("{direct}/hello"), None, 50).await?;
    latencies(&proxy_client, &format!("{proxied}/hello"), Some(&host), 50).await?;
    let (mut floor, mut ours) = (Vec::new(), Vec::new());
    for _ in 0..requests.div_ceil(50) {
        floor.extend(latencies(&floor_client, &format!("{direct}/hello"), None, 50).await?);
        ours.extend(latencies(&proxy_client, &format!("{proxied}/hello"), Some(&host), 50).await?);
    }
    let (f50, f99, o50, o99) = (
        percentile(&mut floor, 0.5),
        percentile(&mut floor, 0.99),
        percentile(&mut ours, 0.5),
        percentile(&mut ours, 0.99),
    );
    let target = 1.2 * f50 + 0.3;
    println!(
        "GET /hello (keep-alive)    p50 {o50:>7.3} ms  p99 {o99:>7.3} ms | floor p50 {f50:>7.3} ms  p99 {f99:>7.3} ms | ratio p50 {:.2}x p99 {:.2}x | target p50 <= {target:.3} ms: {}",
        o50 / f50,
        o99 / f99,
        if o50 <= target { "met" } else { "NOT met" }
    );

    // Throughput: 3 downloads each, interleaved; medians.
    let (mut fd, mut od) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        fd.push(
            download(
                &floor_client,
                &format!("{direct}/download?n={DOWNLOAD}"),
                None,
            )
            .await?,
        );
        od.push(
            download(
                &proxy_client,
                &format!("{proxied}/download?n={DOWNLOAD}"),
                Some(&host),
            )
            .await?,
        );
    }
    let (fm, om) = (percentile(&mut fd, 0.5), percentile(&mut od, 0.5));
    println!(
        "256 MiB download           {om:>7.1} MB/s | floor {fm:>7.1} MB/s | ratio {:.2}x | target >= 0.90x: {}",
        om / fm,
        if om / fm >= 0.9 { "met" } else { "NOT met" }
    );

    // 1000 idle WebSockets.
    let before = rss_mib();
    let t = Instant::now();
    let mut sockets = Vec::with_capacity(WEBSOCKETS);
    for _ in 0..WEBSOCKETS {
        sockets.push(open_websocket(proxy, &host).await?);
    }
    let opened = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib();
    println!(
        "{WEBSOCKETS} idle WebSockets        server RSS {before:.1} -> {after:.1} MiB (+{:.1} MiB, {:.1} KiB each) | opened in {:.1} s | target < 100 MiB: {}",
        after - before,
        (after - before) * 1024.0 / WEBSOCKETS as f64,
        opened.as_secs_f64(),
        if after - before < 100.0 { "met" } else { "NOT met" }
    );
    drop(sockets);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Wake-on-traffic: the first request to a paused VM, vs the first request
    // (new connection) to the running VM, and vs POST /resume.
    let (mut wake, mut resume, mut cold) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..5 {
        cold.push(
            latencies(
                &reqwest::Client::new(),
                &format!("{proxied}/hello"),
                Some(&host),
                1,
            )
            .await?[0],
        );
        api.call(reqwest::Method::POST, &format!("/v1/vms/{id}/pause"), None)
            .await?;
        let t = Instant::now();
        api.call(reqwest::Method::POST, &format!("/v1/vms/{id}/resume"), None)
            .await?;
        resume.push(ms(t.elapsed()));
        api.call(reqwest::Method::POST, &format!("/v1/vms/{id}/pause"), None)
            .await?;
        wake.push(
            latencies(
                &reqwest::Client::new(),
                &format!("{proxied}/hello"),
                Some(&host),
                1,
            )
            .await?[0],
        );
    }
    let (w50, r50, c50) = (
        percentile(&mut wake, 0.5),
        percentile(&mut resume, 0.5),
        percentile(&mut cold, 0.5),
    );
    println!(
        "request to a paused VM     p50 {w50:>7.2} ms | same request, VM running (new connection) p50 {c50:>7.2} ms; POST /resume p50 {r50:>7.2} ms | added by waking {:.2} ms",
        w50 - c50
    );
    api.call(reqwest::Method::DELETE, &format!("/v1/vms/{id}"), None)
        .await?;
    server.stop().await?;
    Ok(())
}
