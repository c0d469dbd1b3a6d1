//! End-to-end tests of services and the proxy: a real server with its proxy
//! (ephemeral ports) over real QEMU guests running a Python HTTP server
//! (`tests/guest/http_server.py`), driven with real HTTP clients.
//!
//! The shared VM keeps the default firewall (ingress deny): everything the
//! proxy reaches, it reaches through the services' auto rules.

use fastvm_e2e::{assert_api_error, block_on, config, data_dir, json_call};
use fastvm_server::proxy::ProxyConfig;
use fastvm_server::{RunningServer, ServerConfig};
use futures::StreamExt;
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const GUEST_SERVER: &str = include_str!("../guest/http_server.py");

struct Env {
    server: RunningServer,
    key: String,
    client: Client,
}

static S: LazyLock<Env> = LazyLock::new(|| {
    let dir = data_dir("services");
    let mut cfg = ServerConfig::new(&dir);
    cfg.runtime = config(&dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    let mut proxy = ProxyConfig::new("127.0.0.1:0".parse().expect("addr"));
    proxy.response_timeout = Duration::from_secs(3);
    cfg.proxy = Some(proxy);
    let server = block_on(fastvm_server::start(cfg)).expect("start server");
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("key")
        .trim()
        .to_owned();
    Env {
        server,
        key,
        client: Client::new(),
    }
});

fn call(method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    block_on(json_call(
        &S.client,
        format!("{}{path}", S.server.url()),
        Some(&S.key),
        method,
        body,
    ))
}

fn proxy_addr() -> SocketAddr {
    S.server.proxy_addr().expect("the proxy runs")
}

fn host(vm: &str, service: &str) -> String {
    format!(
        "{service}--{}.proxy.localhost:{}",
        vm.replace('-', ""),
        proxy_addr().port()
    )
}

/// Launch a VM running the guest HTTP server on 8080 and 8090.
fn launch_with_servers() -> String {
    let (status, vm) = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    let id = vm["id"].as_str().expect("id").to_owned();
    let script = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, GUEST_SERVER);
    let start = format!(
        "echo {script} | base64 -d > /root/srv.py && for p in 8080 8090; do setsid python3 /root/srv.py $p </dev/null >/tmp/srv-$p.log 2>&1 & done; \
         for i in $(seq 100); do python3 -c 'import socket; [socket.create_connection((\"::1\", p), 1).close() for p in (8080, 8090)]' 2>/dev/null && exit 0; sleep 0.1; done; cat /tmp/srv-*.log; exit 1"
    );
    let (status, out) = call(
        Method::POST,
        &format!("/v1/vms/{id}/exec"),
        Some(json!({"command": ["sh", "-c", start], "timeoutSec": 60})),
    );
    assert_eq!(status, StatusCode::OK, "{out}");
    assert_eq!(out["exitCode"], 0, "guest servers did not start: {out}");
    id
}

static VM: LazyLock<String> = LazyLock::new(|| {
    let id = launch_with_servers();
    let (status, svc) = call(
        Method::POST,
        &format!("/v1/vms/{id}/services"),
        Some(json!({"name": "web", "port": 8080})),
    );
    assert_eq!(status, StatusCode::CREATED, "{svc}");
    id
});

/// A request to the proxy for `host`.
fn via_proxy(method: Method, host: &str, path: &str) -> reqwest::RequestBuilder {
    S.client
        .request(method, format!("http://{}{path}", proxy_addr()))
        .header("host", host)
}

#[test]
fn registrations_follow_the_spec() {
    let id = launch_with_servers();
    let base = format!("/v1/vms/{id}/services");
    assert_eq!(call(Method::GET, &base, None), (StatusCode::OK, json!([])));
    let (status, svc) = call(
        Method::POST,
        &base,
        Some(json!({"name": "api-v2", "port": 9000})),
    );
    assert_eq!(status, StatusCode::CREATED, "{svc}");
    assert_eq!(svc["h2c"], false, "h2c defaults to false");
    assert_eq!(
        svc["url"],
        json!(format!("http://{}/", host(&id, "api-v2")))
    );
    assert_api_error(
        &call(
            Method::POST,
            &base,
            Some(json!({"name": "api-v2", "port": 9001})),
        ),
        StatusCode::CONFLICT,
        "SERVICE_EXISTS",
    );
    // PUT: same values are a no-op, other values update, a new name creates.
    let (status, same) = call(
        Method::PUT,
        &format!("{base}/api-v2"),
        Some(json!({"port": 9000})),
    );
    assert_eq!((status, &same), (StatusCode::OK, &svc));
    let (status, changed) = call(
        Method::PUT,
        &format!("{base}/api-v2"),
        Some(json!({"port": 9000, "h2c": true})),
    );
    assert_eq!(
        (status, changed["h2c"].clone()),
        (StatusCode::OK, json!(true))
    );
    assert_eq!(
        call(
            Method::PUT,
            &format!("{base}/grpc"),
            Some(json!({"port": 50051}))
        )
        .0,
        StatusCode::CREATED
    );
    // Validation: names and ports.
    for bad in ["Web", "a--b", "-a", "", "a_b", &"a".repeat(30)] {
        assert_api_error(
            &call(
                Method::POST,
                &base,
                Some(json!({"name": bad, "port": 8080})),
            ),
            StatusCode::BAD_REQUEST,
            "INVALID_SERVICE_NAME",
        );
    }
    for port in [0, 22, 80, 1023, 65536] {
        assert_api_error(
            &call(
                Method::POST,
                &base,
                Some(json!({"name": "p", "port": port})),
            ),
            StatusCode::BAD_REQUEST,
            "INVALID_SERVICE_PORT",
        );
    }
    assert_api_error(
        &call(
            Method::PUT,
            &format!("{base}/Bad"),
            Some(json!({"port": 8080})),
        ),
        StatusCode::BAD_REQUEST,
        "INVALID_SERVICE_NAME",
    );
    // effectiveFirewall: the user policy plus one auto rule per service.
    let (_, vm) = call(Method::GET, &format!("/v1/vms/{id}"), None);
    let rules = vm["effectiveFirewall"]["ingress"]["rules"]
        .as_array()
        .expect("rules")
        .clone();
    assert_eq!(rules.len(), 2, "{rules:?}");
    assert!(rules.contains(&json!({"kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "9000", "action": "allow", "description": "auto: proxy service api-v2"})), "{rules:?}");
    assert_eq!(
        vm["firewall"]["ingress"]["rules"],
        json!([]),
        "the user's policy is untouched"
    );
    // Another org sees nothing.
    let other = block_on(async {
        let store = S.server.state().store();
        let org = store
            .create_org(&format!("other-{}", uuid::Uuid::new_v4()))
            .await
            .expect("org");
        store
            .create_key_for(org, None, "k")
            .await
            .expect("key")
            .token
    });
    let as_other = |m: Method, p: &str, b: Option<Value>| {
        block_on(json_call(
            &S.client,
            format!("{}{p}", S.server.url()),
            Some(&other),
            m,
            b,
        ))
    };
    assert_api_error(
        &as_other(Method::GET, &base, None),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &as_other(
            Method::POST,
            &base,
            Some(json!({"name": "x", "port": 8080})),
        ),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    assert_api_error(
        &as_other(Method::DELETE, &format!("{base}/grpc"), None),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    // Delete, then it is gone; unknown names are 404.
    assert_eq!(
        call(Method::DELETE, &format!("{base}/grpc"), None),
        (StatusCode::OK, json!({"id": "grpc", "deleted": true}))
    );
    assert_api_error(
        &call(Method::DELETE, &format!("{base}/grpc"), None),
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
    );
    // The limit: 16 per VM.
    for i in 0..15 {
        assert_eq!(
            call(
                Method::POST,
                &base,
                Some(json!({"name": format!("s{i}"), "port": 2000 + i}))
            )
            .0,
            StatusCode::CREATED
        );
    }
    assert_api_error(
        &call(
            Method::POST,
            &base,
            Some(json!({"name": "one-too-many", "port": 3000})),
        ),
        StatusCode::CONFLICT,
        "TOO_MANY_SERVICES",
    );
    assert_eq!(
        call(Method::GET, &base, None).1.as_array().map(Vec::len),
        Some(16)
    );
    assert_eq!(
        call(Method::DELETE, &format!("/v1/vms/{id}"), None).0,
        StatusCode::OK
    );
}

#[test]
fn http_streams_both_ways_through_the_proxy() {
    let id = &*VM;
    let h = host(id, "web");
    block_on(async {
        let res = via_proxy(Method::GET, &h, "/hello")
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            res.headers()["x-seen-host"],
            h.as_str(),
            "the guest sees the client's Host"
        );
        assert_eq!(res.headers()["x-seen-forwarded-for"], "127.0.0.1");
        assert_eq!(res.text().await.expect("body"), "hello from 8080");

        // Keep-alive: two requests on one client connection.
        let mut conn = TcpStream::connect(proxy_addr()).await.expect("connect");
        for _ in 0..2 {
            conn.write_all(format!("GET /hello HTTP/1.1\r\nHost: {h}\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let head = read_head(&mut conn).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            let mut body = [0u8; 15];
            conn.read_exact(&mut body).await.expect("body");
            assert_eq!(&body, b"hello from 8080");
        }

        // 256 MiB down and 64 MiB up (chunked), checked byte for byte. (That
        // bodies stream rather than buffer: the SSE test below, and the
        // server's RSS in bench-proxy.)
        let n: u64 = 256 << 20;
        let res = via_proxy(Method::GET, &h, &format!("/download?n={n}"))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), StatusCode::OK);
        let mut stream = res.bytes_stream();
        let (mut got, mut hash) = (0u64, Sha256::new());
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.expect("chunk");
            got += chunk.len() as u64;
            hash.update(&chunk);
        }
        assert_eq!(got, n);
        assert_eq!(hex::encode(hash.finalize()), pattern_sha256(n));
        let up: u64 = 64 << 20;
        let body = futures::stream::iter(
            (0..up / (1 << 20))
                .map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![7u8; 1 << 20]))),
        );
        let res = via_proxy(Method::POST, &h, "/upload")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), StatusCode::OK);
        let echoed: Value = res.json().await.expect("json");
        assert_eq!(echoed["len"], up);
        let mut expected = Sha256::new();
        for _ in 0..up / (1 << 20) {
            expected.update([7u8; 1 << 20]);
        }
        assert_eq!(echoed["sha256"], hex::encode(expected.finalize()));
    });
}

/// sha256 of the guest's /download pattern (byte i = i % 251).
fn pattern_sha256(n: u64) -> String {
    let block: Vec<u8> = (0..251 * 261).map(|i| (i % 251) as u8).collect();
    let mut h = Sha256::new();
    let mut left = n;
    while left > 0 {
        let take = left.min(block.len() as u64) as usize;
        h.update(&block[..take]);
        left -= take as u64;
    }
    hex::encode(h.finalize())
}

async fn read_head(conn: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if conn.read(&mut byte).await.expect("read") == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[test]
fn websocket_and_server_sent_events_pass_through() {
    let id = &*VM;
    let h = host(id, "web");
    block_on(async {
        // WebSocket: upgrade, a text greeting, echoes of text and binary.
        let mut ws = TcpStream::connect(proxy_addr()).await.expect("connect");
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: {h}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        ws.write_all(req.as_bytes()).await.expect("write");
        let head = read_head(&mut ws).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        assert_eq!(ws_read(&mut ws).await, (1, b"hello".to_vec()));
        ws_write(&mut ws, 1, "héllo text".as_bytes()).await;
        assert_eq!(
            ws_read(&mut ws).await,
            (1, "héllo text".as_bytes().to_vec())
        );
        let binary: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
        ws_write(&mut ws, 2, &binary).await;
        assert_eq!(ws_read(&mut ws).await, (2, binary));
        ws_write(&mut ws, 8, &1000u16.to_be_bytes()).await;
        assert_eq!(ws_read(&mut ws).await.0, 8);

        // SSE: each event arrives as the guest flushes it (0.6 s apart), not at the end.
        let res = via_proxy(Method::GET, &h, "/sse")
            .send()
            .await
            .expect("send");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        let mut stream = res.bytes_stream();
        let mut arrivals = Vec::new();
        let mut text = String::new();
        while let Some(chunk) = stream.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
            while arrivals.len() < text.matches("\n\n").count() {
                arrivals.push(Instant::now());
            }
        }
        assert_eq!(arrivals.len(), 3, "{text}");
        for pair in arrivals.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap > Duration::from_millis(300),
                "events arrived {gap:?} apart: buffered ({text})"
            );
        }
    });
}

async fn ws_write(ws: &mut TcpStream, opcode: u8, data: &[u8]) {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut frame = vec![0x80 | opcode];
    match data.len() {
        n if n < 126 => frame.push(0x80 | n as u8),
        n if n < 65536 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    ws.write_all(&frame).await.expect("ws write");
}

async fn ws_read(ws: &mut TcpStream) -> (u8, Vec<u8>) {
    let mut head = [0u8; 2];
    ws.read_exact(&mut head).await.expect("ws head");
    let n = match head[1] & 0x7F {
        126 => u64::from(ws.read_u16().await.expect("len16")),
        127 => ws.read_u64().await.expect("len64"),
        n => u64::from(n),
    };
    let mut data = vec![0u8; n as usize];
    ws.read_exact(&mut data).await.expect("ws payload");
    (head[0] & 0x0F, data)
}

#[test]
fn only_service_ports_are_opened() {
    let id = &*VM;
    let (_, vm) = call(Method::GET, &format!("/v1/vms/{id}"), None);
    let ip: std::net::Ipv6Addr = vm["publicIpv6"]
        .as_str()
        .expect("publicIpv6")
        .parse()
        .expect("ipv6");
    let call = |m: Method, p: &str, b: Option<Value>| {
        json_call(
            &S.client,
            format!("{}{p}", S.server.url()),
            Some(&S.key),
            m,
            b,
        )
    };
    block_on(async {
        let connect = |port: u16| async move {
            tokio::time::timeout(Duration::from_secs(2), TcpStream::connect((ip, port))).await
        };
        // Ingress is deny by default: 8090 listens in the guest but is not a service.
        assert!(
            !matches!(connect(8090).await, Ok(Ok(_))),
            "an unregistered port is reachable"
        );
        // The service port is open to everyone (the auto rule ::/0).
        assert!(
            matches!(connect(8080).await, Ok(Ok(_))),
            "the service port is not reachable"
        );
        // Through the proxy, a service of another port opens that port only
        // while it is registered.
        let base = format!("/v1/vms/{id}/services");
        assert_eq!(
            call(
                Method::POST,
                &base,
                Some(json!({"name": "second", "port": 8090}))
            )
            .await
            .0,
            StatusCode::CREATED
        );
        let res = via_proxy(Method::GET, &host(id, "second"), "/hello")
            .send()
            .await
            .expect("send");
        assert_eq!(res.text().await.expect("body"), "hello from 8090");
        assert!(matches!(connect(8090).await, Ok(Ok(_))));
        assert_eq!(
            call(Method::DELETE, &format!("{base}/second"), None)
                .await
                .0,
            StatusCode::OK
        );
        assert!(
            !matches!(connect(8090).await, Ok(Ok(_))),
            "a deleted service's port stays open"
        );
        let res = via_proxy(Method::GET, &host(id, "second"), "/hello")
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), StatusCode::NOT_FOUND);
    });
}

#[test]
fn bad_requests_and_bad_guests_get_clear_statuses() {
    let id = &*VM;
    let base = format!("/v1/vms/{id}/services");
    assert_eq!(
        call(
            Method::PUT,
            &format!("{base}/nothing"),
            Some(json!({"port": 8099}))
        )
        .0,
        StatusCode::CREATED
    );
    block_on(async {
        let json_error = |res: reqwest::Response| async move {
            let status = res.status();
            let body: Value = res.json().await.unwrap_or(Value::Null);
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_owned(),
            )
        };
        let unknown_vm = host(&uuid::Uuid::new_v4().to_string(), "web");
        assert_eq!(
            json_error(
                via_proxy(Method::GET, &unknown_vm, "/")
                    .send()
                    .await
                    .expect("send")
            )
            .await,
            (StatusCode::NOT_FOUND, "NOT_FOUND".into())
        );
        assert_eq!(
            json_error(
                via_proxy(Method::GET, &host(id, "nope"), "/")
                    .send()
                    .await
                    .expect("send")
            )
            .await,
            (StatusCode::NOT_FOUND, "NOT_FOUND".into())
        );
        assert_eq!(
            json_error(
                via_proxy(Method::GET, "localhost", "/")
                    .send()
                    .await
                    .expect("send")
            )
            .await,
            (StatusCode::NOT_FOUND, "NOT_FOUND".into())
        );
        assert_eq!(
            json_error(
                via_proxy(Method::GET, "bad host!", "/")
                    .send()
                    .await
                    .expect("send")
            )
            .await
            .0,
            StatusCode::BAD_REQUEST
        );
        // Browsers get a page.
        let page = via_proxy(Method::GET, &host(id, "nope"), "/")
            .header("accept", "text/html")
            .send()
            .await
            .expect("send");
        assert_eq!(page.status(), StatusCode::NOT_FOUND);
        assert!(page
            .text()
            .await
            .expect("page")
            .contains("has no service named"));
        // Nothing listens: 502; garbage HTTP: 502; no answer: 504.
        assert_eq!(
            json_error(
                via_proxy(Method::GET, &host(id, "nothing"), "/")
                    .send()
                    .await
                    .expect("send")
            )
            .await,
            (StatusCode::BAD_GATEWAY, "UPSTREAM_REFUSED".into())
        );
        assert_eq!(
            json_error(
                via_proxy(Method::GET, &host(id, "web"), "/garbage")
                    .send()
                    .await
                    .expect("send")
            )
            .await
            .0,
            StatusCode::BAD_GATEWAY
        );
        let started = Instant::now();
        assert_eq!(
            json_error(
                via_proxy(Method::GET, &host(id, "web"), "/hang")
                    .send()
                    .await
                    .expect("send")
            )
            .await,
            (StatusCode::GATEWAY_TIMEOUT, "UPSTREAM_TIMEOUT".into())
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        // A slowloris client holds only its own connection; oversized heads are refused.
        let mut slow = TcpStream::connect(proxy_addr()).await.expect("connect");
        slow.write_all(b"GET / HTTP/1.1\r\nHost: ")
            .await
            .expect("write");
        let mut big = TcpStream::connect(proxy_addr()).await.expect("connect");
        let filler = "x".repeat(100_000);
        let _ = big
            .write_all(
                format!(
                    "GET / HTTP/1.1\r\nHost: {}\r\nX-Big: {filler}\r\n\r\n",
                    host(id, "web")
                )
                .as_bytes(),
            )
            .await;
        let head = read_head(&mut big).await;
        assert!(
            head.starts_with("HTTP/1.1 431"),
            "oversized head answered {head:?}"
        );
        let res = via_proxy(Method::GET, &host(id, "web"), "/hello")
            .send()
            .await
            .expect("send");
        assert_eq!(res.status(), StatusCode::OK, "other traffic is unaffected");
        drop(slow);
    });
    assert_eq!(
        call(Method::DELETE, &format!("{base}/nothing"), None).0,
        StatusCode::OK
    );
}

#[test]
fn a_request_wakes_a_paused_vm_once() {
    let id = launch_with_servers();
    assert_eq!(
        call(
            Method::POST,
            &format!("/v1/vms/{id}/services"),
            Some(json!({"name": "app", "port": 8080}))
        )
        .0,
        StatusCode::CREATED
    );
    let (status, paused) = call(Method::POST, &format!("/v1/vms/{id}/pause"), None);
    assert_eq!(
        (status, paused["status"].clone()),
        (StatusCode::OK, json!("paused"))
    );
    let h = host(&id, "app");
    let results: Vec<(StatusCode, String, Option<String>)> = block_on(async {
        let requests = (0..20).map(|_| async {
            let res = via_proxy(Method::GET, &h, "/hello")
                .send()
                .await
                .expect("send");
            let woke = res
                .headers()
                .get("x-fastvm-woke-ms")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (res.status(), res.text().await.expect("body"), woke)
        });
        futures::future::join_all(requests).await
    });
    for (status, body, _) in &results {
        assert_eq!(
            (*status, body.as_str()),
            (StatusCode::OK, "hello from 8080")
        );
    }
    // Requests that arrived while it was paused or resuming waited (and say
    // how long); later ones found it running. (One resume however many
    // arrive: crates/fastvm-server/tests/fake_worker.rs counts them.)
    let woke: Vec<f64> = results
        .iter()
        .filter_map(|r| r.2.as_deref()?.parse().ok())
        .collect();
    assert!(!woke.is_empty(), "no request woke the VM");
    eprintln!(
        "wake-on-traffic: 20 concurrent requests, waited {:.1}..{:.1} ms",
        woke.iter().cloned().fold(f64::MAX, f64::min),
        woke.iter().cloned().fold(0.0, f64::max)
    );
    let (_, vm) = call(Method::GET, &format!("/v1/vms/{id}"), None);
    assert_eq!(vm["status"], "running");
    // A stopped VM is a 502 with the reason; a deleted one a 404.
    assert_eq!(
        call(Method::DELETE, &format!("/v1/vms/{id}"), None).0,
        StatusCode::OK
    );
    let res = block_on(via_proxy(Method::GET, &h, "/hello").send()).expect("send");
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
}

#[test]
fn snapshots_carry_services() {
    let id = launch_with_servers();
    assert_eq!(
        call(
            Method::POST,
            &format!("/v1/vms/{id}/services"),
            Some(json!({"name": "web", "port": 8080, "h2c": false}))
        )
        .0,
        StatusCode::CREATED
    );
    let (status, snap) = call(
        Method::POST,
        "/v1/snapshots",
        Some(json!({"vmId": id, "name": "with-services"})),
    );
    assert_eq!(status, StatusCode::CREATED, "{snap}");
    assert_eq!(
        snap["services"],
        json!([{"name": "web", "port": 8080, "h2c": false}])
    );
    let (status, clone) = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"snapshotId": snap["id"]})),
    );
    assert_eq!(status, StatusCode::CREATED, "{clone}");
    let cid = clone["id"].as_str().expect("id").to_owned();
    let (_, services) = call(Method::GET, &format!("/v1/vms/{cid}/services"), None);
    assert_eq!(services[0]["name"], "web");
    assert_eq!(
        services[0]["url"],
        json!(format!("http://{}/", host(&cid, "web")))
    );
    // The restored guest's server (restored memory) answers through the proxy.
    let res = block_on(via_proxy(Method::GET, &host(&cid, "web"), "/hello").send()).expect("send");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(block_on(res.text()).expect("body"), "hello from 8080");
    for vm in [&id, &cid] {
        assert_eq!(
            call(Method::DELETE, &format!("/v1/vms/{vm}"), None).0,
            StatusCode::OK
        );
    }
    assert_eq!(
        call(
            Method::DELETE,
            &format!("/v1/snapshots/{}", snap["id"].as_str().expect("id")),
            None
        )
        .0,
        StatusCode::OK
    );
}
