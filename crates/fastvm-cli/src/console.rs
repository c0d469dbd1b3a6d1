//! `fastvm console VM`: the VM's login shell in this terminal, over the
//! console WebSocket; `fastvm console --web VM`: the same in a browser.
//!
//! ```text
//!  POST /v1/vms/VM/console-token            -> token (60 s, one use)
//!  --web: print (and open, when a browser is at hand) BASE/console#session=TOKEN
//!  else:  ws(s)://HOST/v1/vms/VM/console?session=TOKEN&cols=C&rows=R
//!         terminal in raw mode (restored on every exit path)
//!         stdin  -> binary frames; `~.` at the start of a line quits, `~~` sends `~`
//!         SIGWINCH -> {"type":"resize","cols":C,"rows":R}
//!         binary frames -> stdout; {"type":"exit","code":N} -> exit code N
//! ```

use crate::client::{Client, ConnectArgs};
use anyhow::{anyhow, bail, Context};
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::Write;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

#[derive(clap::Args)]
pub struct ConsoleArgs {
    /// VM id.
    pub vm: String,
    /// Print (and open, if a browser is available) a web console URL instead.
    #[arg(long)]
    pub web: bool,
    /// The read-only kernel serial console instead of a shell (works when the agent does not).
    #[arg(long)]
    pub serial: bool,
    /// With --web: only print the URL, never start a browser.
    #[arg(long)]
    pub no_open: bool,
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// Returns the exit code of the shell (0 after `~.`).
pub async fn run(args: ConsoleArgs) -> anyhow::Result<i32> {
    let client = Client::new(&args.conn)?;
    let minted = client
        .post(&format!("/v1/vms/{}/console-token", args.vm), &json!({}))
        .await?;
    let token = minted["token"]
        .as_str()
        .ok_or_else(|| anyhow!("the server answered no console token"))?;
    let secs = minted["expiresInSec"].as_u64().unwrap_or(60);
    let source = if args.serial { "&source=serial" } else { "" };
    if args.web {
        let url = format!("{}/console#session={token}{source}", client.base);
        println!("{url}");
        eprintln!("(one use, valid {secs} s; no API key reaches the browser)");
        if !args.no_open {
            open_browser(&url);
        }
        return Ok(0);
    }
    let path = minted["websocketPath"]
        .as_str()
        .ok_or_else(|| anyhow!("the server answered no websocketPath"))?;
    let (cols, rows) = window_size().unwrap_or((80, 24));
    let ws_base = if let Some(rest) = client.base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = client.base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        bail!(
            "the API base URL {} is neither http:// nor https://",
            client.base
        )
    };
    let url = format!("{ws_base}{path}?session={token}&cols={cols}&rows={rows}{source}");
    let request = url
        .into_client_request()
        .context("building the console request")?;
    let ws = match tokio_tungstenite::connect_async(request).await {
        Ok((ws, _)) => ws,
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => {
            let body: Value = res
                .body()
                .as_deref()
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            let code = body
                .pointer("/error/code")
                .and_then(Value::as_str)
                .unwrap_or("HTTP_ERROR");
            let msg = body
                .pointer("/error/message")
                .and_then(Value::as_str)
                .unwrap_or("");
            bail!("{code} ({}): {msg}", res.status())
        }
        Err(e) => {
            return Err(e).with_context(|| format!("cannot open the console at {ws_base}{path}"))
        }
    };
    if !args.serial {
        eprint!(
            "[fastvm] connected to VM {}; type ~. at the start of a line to quit\r\n",
            args.vm
        );
    }
    let raw = RawMode::enter();
    let code = session(ws).await;
    drop(raw);
    code
}

/// Start the desktop's browser on `url` when there is one (never waits for it).
fn open_browser(url: &str) {
    let graphical =
        std::env::var_os("DISPLAY").is_some() || std::env::var_os("WAYLAND_DISPLAY").is_some();
    let opener = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.is_empty())
        .or_else(|| graphical.then(|| "xdg-open".to_owned()));
    if let Some(opener) = opener {
        let started = std::process::Command::new(&opener)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if started.is_err() {
            eprintln!("(could not start {opener}; open the URL yourself)");
        }
    }
}

/// The size of the terminal on stdout, if it is one.
fn window_size() -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into a valid local.
    let rc = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// The terminal of stdin in raw mode while it lives (nothing when stdin is not a terminal).
struct RawMode {
    saved: Option<libc::termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        // SAFETY: isatty has no memory preconditions.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return RawMode { saved: None };
        }
        // SAFETY: a zeroed termios is a valid value to be overwritten by tcgetattr.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: tcgetattr writes into a valid local.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return RawMode { saved: None };
        }
        let saved = t;
        // SAFETY: cfmakeraw and tcsetattr act on a valid local termios.
        unsafe {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t);
        }
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            // SAFETY: restores the termios saved by `enter`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// The `~.` escape: what to send for the bytes typed, and whether to quit.
#[derive(Debug, Default)]
struct Escape {
    /// After a newline (or at the start): a `~` here begins an escape.
    at_line_start: bool,
    /// A `~` was typed at the start of a line; the next byte decides.
    pending_tilde: bool,
}

impl Escape {
    fn new() -> Escape {
        Escape {
            at_line_start: true,
            pending_tilde: false,
        }
    }

    /// The bytes to send for `input`, and true when `~.` was typed.
    fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len() + 1);
        for &b in input {
            if self.pending_tilde {
                self.pending_tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => {
                        out.push(b'~');
                        self.at_line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.at_line_start && b == b'~' {
                self.pending_tilde = true;
                continue;
            }
            out.push(b);
            self.at_line_start = b == b'\r' || b == b'\n';
        }
        (out, false)
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn session(ws: Ws) -> anyhow::Result<i32> {
    let (mut tx, mut rx) = ws.split();
    let mut stdin = tokio::io::stdin();
    let mut stdout = std::io::stdout();
    let mut winch = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        .context("watching the window size")?;
    let mut escape = Escape::new();
    let mut buf = vec![0u8; 16 << 10];
    let mut stdin_open = true;
    let mut exit_code: Option<i32> = None;
    loop {
        tokio::select! {
            n = stdin.read(&mut buf), if stdin_open => {
                let n = n.context("reading the terminal")?;
                if n == 0 {
                    // No more input (a pipe): keep showing output until the shell ends.
                    stdin_open = false;
                    continue;
                }
                let (send, quit) = escape.feed(&buf[..n]);
                if !send.is_empty() {
                    tx.send(Message::Binary(send.into())).await.context("sending to the console")?;
                }
                if quit {
                    let _ = tx.send(Message::Close(None)).await;
                    eprint!("\r\n[fastvm] disconnected\r\n");
                    return Ok(0);
                }
            }
            _ = winch.recv() => {
                if let Some((cols, rows)) = window_size() {
                    let resize = json!({"type": "resize", "cols": cols, "rows": rows}).to_string();
                    tx.send(Message::Text(resize.into())).await.context("sending the window size")?;
                }
            }
            msg = rx.next() => match msg {
                None => return exit_code.ok_or_else(|| anyhow!("the console connection was lost")),
                Some(Err(e)) => return exit_code.ok_or_else(|| anyhow!("the console connection failed: {e}")),
                Some(Ok(Message::Binary(data))) => {
                    stdout.write_all(&data).context("writing to the terminal")?;
                    stdout.flush().context("writing to the terminal")?;
                }
                Some(Ok(Message::Text(text))) => {
                    let msg: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    match msg["type"].as_str() {
                        Some("exit") => exit_code = Some(msg["code"].as_i64().and_then(|c| i32::try_from(c).ok()).unwrap_or(1)),
                        Some("error") => eprint!("\r\n[fastvm] {}\r\n", msg["message"].as_str().unwrap_or("error")),
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                    if let Some(c) = exit_code {
                        return Ok(c);
                    }
                    if code == 1000 {
                        return Ok(0);
                    }
                    bail!("the console was closed ({code}: {reason})")
                }
                Some(Ok(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_quits_only_at_line_start() {
        let mut e = Escape::new();
        assert_eq!(e.feed(b"~."), (vec![], true));
        let mut e = Escape::new();
        assert_eq!(e.feed(b"ls ~.\r"), (b"ls ~.\r".to_vec(), false));
        assert_eq!(e.feed(b"~"), (vec![], false));
        assert_eq!(e.feed(b"."), (vec![], true));
        let mut e = Escape::new();
        assert_eq!(e.feed(b"~~x"), (b"~x".to_vec(), false));
        let mut e = Escape::new();
        assert_eq!(e.feed(b"~a\n~."), (b"~a\n".to_vec(), true));
    }
}
