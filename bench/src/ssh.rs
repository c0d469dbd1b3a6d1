//! bench-ssh: the SSH gateway beside floors measured in the same run.
//!
//! - Keystroke echo: one byte typed into `cat` on a PTY over `ssh -tt`
//!   (OpenSSH client -> gateway -> agent PTY -> back), against the same byte
//!   through a stdin-fed exec of `cat` over the agent channel in process
//!   (`Worker::exec_with_input`): what the gateway and the SSH client add.
//! - Upload of a file (256 MiB by default) with `scp` (SFTP protocol ->
//!   sftp-server in the guest), against `fastvm cp` (HTTP + staging + agent)
//!   when `target/release/fastvm` (or FASTVM_BIN) exists, and against the raw
//!   agent-channel floor (exec `cat > file` fed from the file in process).
//!
//! `cargo run --release -p fastvm-bench --bin bench-ssh -- [KEYSTROKES] [MIB]`

use fastvm_server::ServerConfig;
use fastvm_worker::{ExecEvent, ExecRequest};
use futures::StreamExt;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(self.0.join("data/vms")) {
            for e in entries.flatten() {
                if let Some(pid) = std::fs::read_to_string(e.path().join("qemu.pid"))
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    // SAFETY: kill by the pid of a QEMU this benchmark started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ssh_base(program: &str, home: &Path, port: u16) -> Command {
    let mut c = Command::new(program);
    c.env("HOME", home)
        .env_remove("SSH_AUTH_SOCK")
        .args(["-F", "/dev/null", "-o"])
        .arg(format!(
            "UserKnownHostsFile={}",
            home.join("known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            "-i",
        ])
        .arg(home.join("id"))
        .arg(if program == "ssh" { "-p" } else { "-P" })
        .arg(port.to_string());
    c
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let keystrokes: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let mib: u64 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let root = std::env::temp_dir().join(format!("fastvm-bench-ssh-{}", std::process::id()));
    let _cleanup = Cleanup(root.clone());
    std::fs::create_dir_all(&root)?;
    let data = root.join("data");
    let home = root.join("home");
    std::fs::create_dir_all(&home)?;
    let mut cfg = ServerConfig::new(&data);
    cfg.runtime.image_dir = Some(
        std::env::var_os("FASTVM_TEST_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| "/var/tmp/fastvm-test-images".into()),
    );
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.launch_wait = Duration::from_secs(600);
    cfg.ssh = Some(fastvm_server::ssh::SshConfig::new("127.0.0.1:0".parse()?));
    let server = fastvm_server::start(cfg).await?;
    let port = server
        .ssh_addr()
        .ok_or_else(|| anyhow::anyhow!("no gateway"))?
        .port();
    let key = std::fs::read_to_string(data.join("admin-api-key"))?
        .trim()
        .to_owned();
    let http = reqwest::Client::new();
    let st = Command::new("ssh-keygen")
        .args(["-q", "-N", "", "-t", "ed25519", "-f"])
        .arg(home.join("id"))
        .status()?;
    anyhow::ensure!(st.success(), "ssh-keygen failed");
    let pubkey = std::fs::read_to_string(home.join("id.pub"))?;
    let added: Value = http
        .post(format!("{}/v1/me/ssh-keys", server.url()))
        .bearer_auth(&key)
        .json(&json!({"publicKey": pubkey}))
        .send()
        .await?
        .json()
        .await?;
    anyhow::ensure!(added["fingerprint"].is_string(), "add key: {added}");
    let gw: Value = http
        .get(format!("{}/v1/ssh-gateway", server.url()))
        .bearer_auth(&key)
        .send()
        .await?
        .json()
        .await?;
    let host_key = gw["hostKeys"][0].as_str().unwrap_or_default().to_owned();
    std::fs::write(
        home.join("known_hosts"),
        format!("[127.0.0.1]:{port} {host_key}\n"),
    )?;
    let vm: Value = http
        .post(format!("{}/v1/vms", server.url()))
        .bearer_auth(&key)
        .json(&json!({"machineType": "c1m2"}))
        .send()
        .await?
        .json()
        .await?;
    let vm_id: fastvm_types::VmId = vm["id"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("launch failed: {vm}"))?
        .parse()?;
    let worker = server
        .state()
        .local_worker()
        .expect("embedded worker")
        .clone();

    // --- keystroke echo over SSH (blocking I/O on a thread) ---
    let (h, p, target) = (home.clone(), port, format!("{vm_id}@127.0.0.1"));
    let over_ssh = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f64>> {
        let mut c = ssh_base("ssh", &h, p);
        c.args(["-tt", &target, "stty raw -echo; echo READY; cat"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = c.spawn()?;
        let mut input = child.stdin.take().ok_or_else(|| anyhow::anyhow!("stdin"))?;
        let mut output = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("stdout"))?;
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !String::from_utf8_lossy(&seen).contains("READY") {
            let n = output.read(&mut buf)?;
            anyhow::ensure!(n > 0, "ssh ended: {:?}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        std::thread::sleep(Duration::from_millis(300));
        let mut times = Vec::new();
        for i in 0..keystrokes + 10 {
            let byte = b'a' + (i % 26) as u8;
            let t = Instant::now();
            input.write_all(&[byte])?;
            input.flush()?;
            loop {
                let n = output.read(&mut buf[..1])?;
                anyhow::ensure!(n == 1, "ssh ended");
                if buf[0] == byte {
                    break;
                }
            }
            if i >= 10 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        Ok(times)
    })
    .await??;

    // --- floor: the same byte through a stdin-fed `cat` over the agent channel ---
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let input =
        futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
        );
    let mut events = worker
        .exec_with_input(vm_id, ExecRequest::argv(["cat"]), Box::pin(input))
        .await?;
    let mut floor = Vec::new();
    for i in 0..keystrokes + 10 {
        let byte = b'a' + (i % 26) as u8;
        let t = Instant::now();
        tx.send(bytes::Bytes::copy_from_slice(&[byte])).await?;
        loop {
            match events.next().await {
                Some(Ok(ExecEvent::Stdout(d))) if d.contains(&byte) => break,
                Some(Ok(_)) => {}
                other => anyhow::bail!("cat ended: {other:?}"),
            }
        }
        if i >= 10 {
            floor.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    drop(tx);
    drop(events);

    // --- upload: scp vs fastvm cp vs the raw agent channel ---
    let size = mib << 20;
    let local = root.join("payload.bin");
    {
        let mut f = std::fs::File::create(&local)?;
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut chunk = vec![0u8; 1 << 20];
        for _ in 0..mib {
            for b in chunk.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            f.write_all(&chunk)?;
        }
    }
    let (h, p, l, v) = (home.clone(), port, local.clone(), vm_id);
    let scp_secs = tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let mut c = ssh_base("scp", &h, p);
        c.arg(&l).arg(format!("{v}@127.0.0.1:/root/scp.bin"));
        let t = Instant::now();
        let st = c.status()?;
        anyhow::ensure!(st.success(), "scp failed");
        Ok(t.elapsed().as_secs_f64())
    })
    .await??;
    let t = Instant::now();
    let file = tokio::fs::File::open(&local).await?;
    let stream = tokio_util_stream(file);
    let mut ev = worker
        .exec_with_input(
            vm_id,
            ExecRequest::argv(["sh", "-c", "cat > /root/floor.bin"]),
            stream,
        )
        .await?;
    while let Some(e) = ev.next().await {
        if let ExecEvent::Exit(st) = e? {
            anyhow::ensure!(st.code == 0, "floor upload failed: {st:?}");
            break;
        }
    }
    let floor_secs = t.elapsed().as_secs_f64();
    let bin = std::env::var_os("FASTVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/fastvm")
        });
    let cp_secs = if bin.is_file() {
        let t = Instant::now();
        let st = Command::new(&bin)
            .args(["cp", "-q"])
            .arg(&local)
            .arg(format!("{vm_id}:/root/cp.bin"))
            .env("FASTVM_BASE_URL", server.url())
            .env("FASTVM_API_KEY", &key)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "fastvm cp failed");
        Some(t.elapsed().as_secs_f64())
    } else {
        None
    };

    let (mut a, mut b) = (over_ssh, floor);
    println!("bench-ssh: c1m2 guest, TCG, {keystrokes} keystrokes, {mib} MiB upload");
    println!(
        "keystroke echo over ssh -tt   p50 {:7.2} ms  p99 {:7.2} ms",
        pct(&mut a, 0.5),
        pct(&mut a, 0.99)
    );
    println!(
        "floor: exec cat, agent chan   p50 {:7.2} ms  p99 {:7.2} ms   ratio p50 {:.2}x",
        pct(&mut b, 0.5),
        pct(&mut b, 0.99),
        pct(&mut a, 0.5) / pct(&mut b, 0.5)
    );
    let mb = size as f64 / 1e6;
    println!(
        "scp upload                    {:7.2} s  {:6.1} MB/s",
        scp_secs,
        mb / scp_secs
    );
    if let Some(cp) = cp_secs {
        println!(
            "fastvm cp upload              {:7.2} s  {:6.1} MB/s   scp/cp time ratio {:.2}x",
            cp,
            mb / cp,
            scp_secs / cp
        );
    } else {
        println!("fastvm cp upload              (skipped: build target/release/fastvm or set FASTVM_BIN)");
    }
    println!(
        "floor: exec cat > file        {:7.2} s  {:6.1} MB/s   scp/floor time ratio {:.2}x",
        floor_secs,
        mb / floor_secs,
        scp_secs / floor_secs
    );
    server.stop().await?;
    Ok(())
}

/// A file as a byte stream of 64 KiB chunks.
fn tokio_util_stream(file: tokio::fs::File) -> fastvm_server::worker::ByteStream {
    use tokio::io::AsyncReadExt;
    Box::pin(futures::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 64 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    }))
}
