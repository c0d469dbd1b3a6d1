//! End-to-end tests of the console: tokens, the WebSocket terminal on the
//! guest's login shell (PTY run by the agent) and the serial console, over a
//! real server and real QEMU guests, driven with a WebSocket client.
//!
//! The server runs with short console timings (token 4 s, idle 20 s, send
//! 5 s, ping 2 s) so expiry, idling and a client that never reads can be seen
//! in seconds. One shared VM serves every test that cannot disturb others;
//! the wake and token-binding tests launch their own.

use fastvm_e2e::{assert_api_error, block_on, config, data_dir, json_call};
use fastvm_server::console::ConsoleConfig;
use fastvm_server::{RunningServer, ServerConfig};
use futures::{SinkExt, StreamExt};
use reqwest::{Client, Method, StatusCode};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const TOKEN_TTL: Duration = Duration::from_secs(4);
/// Long enough for a loaded TCG guest to start python3 without output.
const IDLE: Duration = Duration::from_secs(20);
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

struct Api {
    server: RunningServer,
    _dir: PathBuf,
    key: String,
    client: Client,
}

static A: LazyLock<Api> = LazyLock::new(|| {
    let dir = data_dir("console");
    let mut cfg = ServerConfig::new(&dir);
    cfg.runtime = config(&dir);
    cfg.listen = "127.0.0.1:0".parse().expect("addr");
    cfg.launch_wait = Duration::from_secs(300);
    cfg.console = ConsoleConfig {
        token_ttl: TOKEN_TTL,
        idle_timeout: IDLE,
        ping_interval: Duration::from_secs(2),
        send_timeout: SEND_TIMEOUT,
    };
    let server = block_on(fastvm_server::start(cfg)).expect("start server");
    let key = std::fs::read_to_string(dir.join("admin-api-key"))
        .expect("admin key")
        .trim()
        .to_owned();
    Api {
        server,
        _dir: dir,
        key,
        client: Client::new(),
    }
});

async fn call(method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
    let a = &*A;
    json_call(
        &a.client,
        format!("{}{path}", a.server.url()),
        Some(&a.key),
        method,
        body,
    )
    .await
}

async fn launch() -> String {
    let (status, vm) = call(
        Method::POST,
        "/v1/vms",
        Some(json!({"machineType": "c1m2"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{vm}");
    vm["id"].as_str().expect("id").to_owned()
}

/// The shared VM.
static VM: LazyLock<String> = LazyLock::new(|| {
    LazyLock::force(&A);
    block_on(launch())
});

/// Start the server and the shared VM outside any async context (their
/// initialisers block on the shared runtime).
fn setup() {
    LazyLock::force(&VM);
}

async fn mint(vm: &str) -> Value {
    let (status, body) = call(Method::POST, &format!("/v1/vms/{vm}/console-token"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn ws_url(path: &str, query: &str) -> String {
    format!("ws://{}{path}?{query}", A.server.addr())
}

/// A refused upgrade: its status and JSON body.
async fn refused(url: &str) -> (StatusCode, Value) {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => panic!("the upgrade of {url} was accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let status = StatusCode::from_u16(res.status().as_u16()).expect("status");
            let body = res
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            (status, body)
        }
        Err(e) => panic!("unexpected error for {url}: {e}"),
    }
}

/// A console session seen from the client.
struct Term {
    ws: Ws,
    out: Vec<u8>,
    seen: usize,
    texts: Vec<Value>,
    close: Option<Option<CloseFrame>>,
}

impl Term {
    /// Mint a token for `vm` and open its console with `extra` query parameters.
    async fn open(vm: &str, extra: &str) -> Term {
        let t = mint(vm).await;
        let url = ws_url(
            t["websocketPath"].as_str().expect("path"),
            &format!("session={}{extra}", t["token"].as_str().expect("token")),
        );
        let (ws, res) = tokio_tungstenite::connect_async(url)
            .await
            .expect("console upgrade");
        assert_eq!(res.status().as_u16(), 101);
        let mut term = Term {
            ws,
            out: Vec::new(),
            seen: 0,
            texts: Vec::new(),
            close: None,
        };
        let ready = term.text("ready", Duration::from_secs(30)).await;
        assert_eq!(ready["vmId"], json!(vm));
        term
    }

    /// Read one message; false once the connection is over.
    async fn pump(&mut self, until: Instant) -> bool {
        if self.close.is_some() {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.ws.next()).await {
            Err(_) => true,
            Ok(None) | Ok(Some(Err(_))) => {
                self.close = Some(None);
                false
            }
            Ok(Some(Ok(msg))) => {
                match msg {
                    Message::Binary(b) => self.out.extend_from_slice(&b),
                    Message::Text(t) => self
                        .texts
                        .push(serde_json::from_str(t.as_str()).expect("control message is JSON")),
                    Message::Close(f) => self.close = Some(f),
                    _ => {}
                }
                true
            }
        }
    }

    /// Wait for `needle` in the output after what earlier waits consumed.
    async fn expect(&mut self, needle: &str, within: Duration) -> String {
        let until = Instant::now() + within;
        loop {
            if let Some(at) = find(&self.out[self.seen..], needle.as_bytes()) {
                let got =
                    String::from_utf8_lossy(&self.out[self.seen..self.seen + at + needle.len()])
                        .into_owned();
                self.seen += at + needle.len();
                return got;
            }
            if Instant::now() >= until || !self.pump(until).await {
                panic!(
                    "{needle:?} not seen within {within:?}; output: {:?}; messages: {:?}; close: {:?}; agent log: {}",
                    String::from_utf8_lossy(&self.out[self.seen..]),
                    self.texts,
                    self.close,
                    agent_log()
                );
            }
        }
    }

    /// Wait for a control message of `kind`.
    async fn text(&mut self, kind: &str, within: Duration) -> Value {
        let until = Instant::now() + within;
        loop {
            if let Some(i) = self.texts.iter().position(|t| t["type"] == kind) {
                return self.texts.remove(i);
            }
            if Instant::now() >= until || !self.pump(until).await {
                panic!(
                    "no {kind:?} message within {within:?}; got {:?}, close {:?}",
                    self.texts, self.close
                );
            }
        }
    }

    /// Wait for the server's close frame: its code and reason.
    async fn closed(&mut self, within: Duration) -> (u16, String) {
        let until = Instant::now() + within;
        while self.close.is_none() && Instant::now() < until {
            self.pump(until).await;
        }
        match &self.close {
            Some(Some(f)) => (u16::from(f.code), f.reason.to_string()),
            other => panic!("no close frame within {within:?}: {other:?}"),
        }
    }

    async fn type_in(&mut self, keys: &str) {
        self.ws
            .send(Message::Binary(keys.as_bytes().to_vec().into()))
            .await
            .expect("send keys");
    }

    async fn resize(&mut self, cols: u16, rows: u16) {
        self.ws
            .send(Message::Text(
                json!({"type": "resize", "cols": cols, "rows": rows})
                    .to_string()
                    .into(),
            ))
            .await
            .expect("send resize");
    }

    /// Run a shell line and wait for `want` in its output.
    async fn run(&mut self, line: &str, want: &str) -> String {
        self.type_in(&format!("{line}\r")).await;
        self.expect(want, Duration::from_secs(30)).await
    }

    async fn prompt(&mut self) {
        self.expect("# ", Duration::from_secs(30)).await;
    }
}

/// The agent's lines in the shared VM's console log (for failure messages).
fn agent_log() -> String {
    let path = A._dir.join("vms").join(&*VM).join("console.log");
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("fastvm-agent")).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[test]
fn token_is_minted_with_the_spec_shape() {
    setup();
    block_on(async {
        let t = mint(&VM).await;
        assert!(
            t["token"]
                .as_str()
                .is_some_and(|s| s.starts_with("fvc_") && s.len() == 68),
            "{t}"
        );
        assert_eq!(t["expiresInSec"], json!(TOKEN_TTL.as_secs()));
        assert_eq!(
            t["websocketPath"],
            json!(format!("/v1/vms/{}/console", *VM))
        );
        // Unknown VM, bad id, no key.
        let res = call(
            Method::POST,
            &format!("/v1/vms/{}/console-token", uuid::Uuid::new_v4()),
            None,
        )
        .await;
        assert_api_error(&res, StatusCode::NOT_FOUND, "NOT_FOUND");
        let res = json_call(
            &A.client,
            format!("{}/v1/vms/{}/console-token", A.server.url(), *VM),
            None,
            Method::POST,
            None,
        )
        .await;
        assert_api_error(&res, StatusCode::UNAUTHORIZED, "UNAUTHENTICATED");
    });
}

#[test]
fn token_rules_refuse_the_upgrade_with_a_clear_status() {
    setup();
    block_on(async {
        let vm = &*VM;
        let path = format!("/v1/vms/{vm}/console");
        // A plain GET is refused before the token is spent; the token still works after.
        let t = mint(vm).await;
        let token = t["token"].as_str().expect("token").to_owned();
        let res = json_call(
            &A.client,
            format!("{}{path}?session={token}", A.server.url()),
            None,
            Method::GET,
            None,
        )
        .await;
        assert_api_error(&res, StatusCode::BAD_REQUEST, "WEBSOCKET_REQUIRED");
        let (ws, _) = tokio_tungstenite::connect_async(ws_url(&path, &format!("session={token}")))
            .await
            .expect("upgrade after a plain GET");
        drop(ws);
        // Reused.
        let res = refused(&ws_url(&path, &format!("session={token}"))).await;
        assert_api_error(&res, StatusCode::UNAUTHORIZED, "CONSOLE_TOKEN_USED");
        // Missing, garbage, unknown.
        assert_api_error(
            &refused(&ws_url(&path, "source=pty")).await,
            StatusCode::UNAUTHORIZED,
            "CONSOLE_TOKEN_INVALID",
        );
        assert_api_error(
            &refused(&ws_url(&path, "session=garbage")).await,
            StatusCode::UNAUTHORIZED,
            "CONSOLE_TOKEN_INVALID",
        );
        let unknown = format!("fvc_{}", "0".repeat(64));
        assert_api_error(
            &refused(&ws_url(&path, &format!("session={unknown}"))).await,
            StatusCode::UNAUTHORIZED,
            "CONSOLE_TOKEN_INVALID",
        );
        // Bad query values.
        let t = mint(vm).await;
        let q = format!(
            "session={}&source=telnet",
            t["token"].as_str().expect("token")
        );
        assert_api_error(
            &refused(&ws_url(&path, &q)).await,
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        );
        let q = format!("session={}&cols=0", t["token"].as_str().expect("token"));
        assert_api_error(
            &refused(&ws_url(&path, &q)).await,
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        );
        // Expired.
        let t = mint(vm).await;
        tokio::time::sleep(TOKEN_TTL + Duration::from_millis(500)).await;
        let q = format!("session={}", t["token"].as_str().expect("token"));
        let res = refused(&ws_url(&path, &q)).await;
        assert_api_error(&res, StatusCode::UNAUTHORIZED, "CONSOLE_TOKEN_EXPIRED");
        // Minted by a key that was revoked since.
        let store = A.server.state().store();
        let org = fastvm_server::default_org(store)
            .await
            .expect("org")
            .expect("default org");
        let other = store.create_key(org, "console-revoked").await.expect("key");
        let (status, t) = json_call(
            &A.client,
            format!("{}/v1/vms/{vm}/console-token", A.server.url()),
            Some(&other.token),
            Method::POST,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{t}");
        store
            .revoke_key(&other.info.id.to_string())
            .await
            .expect("revoke");
        let q = format!("session={}", t["token"].as_str().expect("token"));
        assert_api_error(
            &refused(&ws_url(&path, &q)).await,
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
        );
    });
}

#[test]
fn a_token_opens_only_its_own_vm() {
    setup();
    block_on(async {
        let other = launch().await;
        let t = mint(&VM).await;
        let q = format!("session={}", t["token"].as_str().expect("token"));
        let res = refused(&ws_url(&format!("/v1/vms/{other}/console"), &q)).await;
        assert_api_error(&res, StatusCode::FORBIDDEN, "CONSOLE_TOKEN_WRONG_VM");
        // The page's path takes the VM from the token.
        let t = mint(&other).await;
        let q = format!("session={}", t["token"].as_str().expect("token"));
        let (ws, _) = tokio_tungstenite::connect_async(ws_url("/v1/console", &q))
            .await
            .expect("upgrade");
        let mut term = Term {
            ws,
            out: Vec::new(),
            seen: 0,
            texts: Vec::new(),
            close: None,
        };
        assert_eq!(
            term.text("ready", Duration::from_secs(30)).await["vmId"],
            json!(other)
        );
        let (status, _) = call(Method::DELETE, &format!("/v1/vms/{other}"), None).await;
        assert!(status.is_success());
    });
}

#[test]
fn shell_runs_with_utf8_colours_and_exit_status() {
    setup();
    block_on(async {
        let mut term = Term::open(&VM, "").await;
        term.prompt().await;
        term.run("echo $((6*7))", "42\r\n").await;
        term.run(
            "echo \"$TERM $SHELL $HOME\"; tty",
            "xterm-256color /bin/bash /root",
        )
        .await;
        term.expect("/dev/pts/", Duration::from_secs(10)).await;
        // UTF-8 both ways: the guest echoes what we typed and prints its own.
        term.run("printf 'caf\\303\\251 %s\\n' ü", "café ü").await;
        term.run("printf '\\033[31mred\\033[0m\\n'", "\x1b[31mred\x1b[0m")
            .await;
        term.type_in("exit 3\r").await;
        let exit = term.text("exit", Duration::from_secs(30)).await;
        assert_eq!(exit["code"], json!(3), "{exit}");
        let (code, reason) = term.closed(Duration::from_secs(10)).await;
        assert_eq!(code, 1000, "{reason}");
    });
}

#[test]
fn resize_changes_stty_size() {
    setup();
    block_on(async {
        let mut term = Term::open(&VM, "&cols=100&rows=30").await;
        term.prompt().await;
        term.run("stty size", "30 100").await;
        term.resize(132, 43).await;
        term.run("stty size", "43 132").await;
        // The foreground program is told (SIGWINCH) and sees the new size.
        // bash hands the terminal to a job right around its start: a resize
        // landing before that signals bash instead, so a program that has not
        // heard of it after a while gets another size (a user would too).
        let waiter = "python3 -c \"import os, signal, time; signal.signal(signal.SIGWINCH, lambda *a: (os.write(1, b'winched %d %d\\n' % os.get_terminal_size(0)), os._exit(0))); os.write(1, b'ready %d\\n' % (6 * 7)); time.sleep(60)\"";
        term.run(waiter, "ready 42").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut size = (90u16, 20u16);
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            term.resize(size.0, size.1).await;
            let until = Instant::now() + Duration::from_secs(8);
            while find(&term.out[term.seen..], b"winched").is_none()
                && Instant::now() < until
                && term.pump(until).await
            {}
            if find(&term.out[term.seen..], b"winched").is_some() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no SIGWINCH reached the foreground program: {:?} {:?}",
                term.texts,
                term.close
            );
            size = (size.0 + 1, size.1 + 1);
        }
        term.expect(
            &format!("winched {} {}", size.0, size.1),
            Duration::from_secs(10),
        )
        .await;
        term.prompt().await;
        term.run("stty size", &format!("{} {}", size.1, size.0))
            .await;
    });
}

#[test]
fn ctrl_c_interrupts_and_job_control_works() {
    setup();
    block_on(async {
        let mut term = Term::open(&VM, "").await;
        term.prompt().await;
        term.type_in("sleep 60; echo not-$((1+1))-interrupted\r")
            .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        term.type_in("\x03").await;
        term.run("echo back-$((40+2))", "back-42").await;
        assert!(find(&term.out, b"not-2-interrupted").is_none());
        // Job control: a background job, listed, brought back and interrupted.
        term.run("sleep 120 & jobs", "Running").await;
        term.type_in("fg\r").await;
        term.expect("sleep 120", Duration::from_secs(10)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        term.type_in("\x03").await;
        // Nothing left: the interrupted job is gone.
        term.run("jobs | wc -l; echo jobs-$((5+5))", "\r0\r\njobs-10")
            .await;
    });
}

#[test]
fn two_consoles_at_once_are_independent() {
    setup();
    block_on(async {
        let (mut a, mut b) = tokio::join!(Term::open(&VM, ""), Term::open(&VM, ""));
        tokio::join!(a.prompt(), b.prompt());
        a.run("export WHO=first; tty", "/dev/pts/").await;
        b.run("echo who=${WHO:-unset}", "who=unset").await;
        let (x, y) = tokio::join!(
            a.run("echo $WHO-$((1+1))", "first-2"),
            b.run("echo b-$((2+2))", "b-4")
        );
        assert!(x.contains("first-2") && y.contains("b-4"));
    });
}

#[test]
fn garbage_and_oversized_frames_get_clear_close_codes() {
    setup();
    block_on(async {
        let mut bystander = Term::open(&VM, "").await;
        bystander.prompt().await;
        let cases: Vec<(Message, u16)> = vec![
            (Message::Text("garbage".into()), 1007),
            (
                Message::Text(r#"{"type":"resize","cols":0,"rows":24}"#.into()),
                1007,
            ),
            (Message::Text(r#"{"type":"reboot"}"#.into()), 1007),
            (
                Message::Text(
                    format!(
                        "{{\"type\":\"resize\",\"pad\":\"{}\"}}",
                        "x".repeat(8 << 10)
                    )
                    .into(),
                ),
                1009,
            ),
            (Message::Binary(vec![b'a'; 100 << 10].into()), 1009),
            (Message::Binary(vec![b'a'; 2 << 20].into()), 1009),
        ];
        for (msg, want) in cases {
            let shown = format!("{msg:?}").chars().take(60).collect::<String>();
            let mut term = Term::open(&VM, "").await;
            let _ = term.ws.send(msg).await;
            let (code, reason) = term.closed(Duration::from_secs(20)).await;
            assert_eq!(code, want, "{shown}: {reason}");
            assert!(!reason.is_empty(), "{shown}");
        }
        // The other console never noticed.
        bystander.run("echo still-$((3*3))", "still-9").await;
    });
}

#[test]
fn a_client_that_never_reads_stalls_only_itself() {
    setup();
    block_on(async {
        let rss_before = fastvm_e2e::rss_bytes();
        let mut hog = Term::open(&VM, "").await;
        hog.prompt().await;
        hog.type_in("yes console-flood\r").await;
        // Never read `hog` again. Another console goes on meanwhile.
        let mut other = Term::open(&VM, "").await;
        other.prompt().await;
        for i in 0..3 {
            other
                .run(
                    &format!("echo alive-{i}-$(({i}+{i}))"),
                    &format!("alive-{i}-{}\r", 2 * i),
                )
                .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        // The stuck connection is dropped after the send timeout and its shell
        // hung up: `yes` is gone.
        let deadline = Instant::now() + SEND_TIMEOUT + Duration::from_secs(30);
        loop {
            let seen = other
                .run("echo \"floods=$(pgrep -xc yes)=$((7*6))\"", "=42")
                .await;
            if seen.ends_with("floods=0=42") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the flood still runs long after the send timeout"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let grown = fastvm_e2e::rss_bytes().saturating_sub(rss_before);
        assert!(
            grown < 64 << 20,
            "the test process grew by {grown} bytes while a client did not read"
        );
        drop(hog);
    });
}

#[test]
fn idle_console_is_closed() {
    setup();
    block_on(async {
        let mut term = Term::open(&VM, "").await;
        term.prompt().await;
        let started = Instant::now();
        let (code, reason) = term.closed(IDLE + Duration::from_secs(10)).await;
        assert_eq!(code, 4000, "{reason}");
        assert!(started.elapsed() >= IDLE - Duration::from_secs(1));
        let err = term.text("error", Duration::from_secs(1)).await;
        assert_eq!(err["code"], json!("IDLE_TIMEOUT"));
    });
}

#[test]
fn serial_console_tails_and_follows_read_only() {
    setup();
    block_on(async {
        let vm = &*VM;
        let (status, out) = call(
            Method::POST,
            &format!("/v1/vms/{vm}/exec"),
            Some(json!({"command": ["sh", "-c", "echo serial-before-$((5*5)) > /dev/ttyS0"]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{out}");
        let mut term = Term::open(vm, "&source=serial").await;
        term.expect("serial-before-25", Duration::from_secs(10))
            .await;
        let (status, _) = call(
            Method::POST,
            &format!("/v1/vms/{vm}/exec"),
            Some(json!({"command": ["sh", "-c", "echo serial-after-$((6*6)) > /dev/ttyS0"]})),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        term.expect("serial-after-36", Duration::from_secs(10))
            .await;
        term.type_in("ls\r").await;
        let err = term.text("error", Duration::from_secs(10)).await;
        assert_eq!(err["code"], json!("READ_ONLY"), "{err}");
    });
}

#[test]
fn consoles_to_a_paused_vm_resume_it_once() {
    setup();
    block_on(async {
        let vm = launch().await;
        let (status, body) = call(Method::POST, &format!("/v1/vms/{vm}/pause"), None).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "paused");
        // Three consoles at once: every one gets a shell, the VM is resumed once.
        let (mut a, mut b, mut c) = tokio::join!(
            Term::open(&vm, ""),
            Term::open(&vm, ""),
            Term::open(&vm, "&source=serial")
        );
        tokio::join!(a.prompt(), b.prompt());
        a.run("echo woke-$((1+2))", "woke-3").await;
        b.run("echo woke-$((2+2))", "woke-4").await;
        let (_, v) = call(Method::GET, &format!("/v1/vms/{vm}"), None).await;
        assert_eq!(v["status"], "running", "{v}");
        drop(c.ws.close(None).await);
        let (status, _) = call(Method::DELETE, &format!("/v1/vms/{vm}"), None).await;
        assert!(status.is_success());
        // Deleting the VM ends its consoles.
        let (code, _) = a.closed(Duration::from_secs(30)).await;
        assert!(code == 1000 || code == 1011, "{code}");
    });
}
