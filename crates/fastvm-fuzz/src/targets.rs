//! The fuzz targets. Each takes arbitrary bytes and panics when a property
//! does not hold; "does not panic, does not hang, stays bounded" is the
//! least each checks.
//!
//! | target            | code under test                         | properties beyond no panic                         |
//! |-------------------|-----------------------------------------|----------------------------------------------------|
//! | `agent_frames`    | `FrameCodec` (agent-proto), both ends   | progress, bounded buffer, decoded frames round-trip |
//! | `control_message` | `Control` JSON (agent-proto)            | accepted messages round-trip                       |
//! | `qmp_reader`      | `Qmp` (worker) against a fake QEMU      | connect/execute end when QEMU closes, never hang   |
//! | `dns_query`       | the VM resolver's `answer` (worker),    | an answer is a DNS message with the query's id,    |
//! |                   | its upstream answering with fuzz bytes  | never a hang                                       |
//! | `tar_unpack`      | `untar::safe_unpack` (CLI)              | nothing outside the destination, no devices,       |
//! |                   |                                         | no setuid bits, no symlink pointing out            |

use bytes::BytesMut;
use fastvm_agent_proto::{encode, Control, Frame, FrameCodec, HEADER_LEN, MAX_PAYLOAD, SYNC_MAGIC};
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::codec::Decoder;

/// Frames as a guest sends them, fed to the host's decoder in chunks whose
/// size the first input byte picks (1 to 64 bytes), like reads of a serial port.
pub fn agent_frames(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    for piece in rest.chunks(chunk) {
        buf.extend_from_slice(piece);
        let mut stalled = 0;
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if buf.len() == before {
                        // A desync reports without consuming; the next call must advance.
                        stalled += 1;
                        assert!(
                            stalled <= 2,
                            "the decoder reports frames without consuming input"
                        );
                    } else {
                        stalled = 0;
                    }
                    round_trip(frame);
                }
                Ok(None) => break,
                Err(e) => panic!("the decoder returned an I/O error on in-memory input: {e}"),
            }
        }
        assert!(
            buf.len() <= HEADER_LEN + MAX_PAYLOAD + chunk,
            "the decoder holds {} bytes, more than one frame",
            buf.len()
        );
    }
    // The end of the stream with a partial frame buffered is not an error either.
    let _ = codec.decode_eof(&mut buf);
}

/// A decoded frame encodes back and decodes to itself.
fn round_trip(frame: Frame) {
    if matches!(frame, Frame::Invalid { .. }) {
        return;
    }
    let bytes = match encode(frame.clone()) {
        Ok(b) => b,
        Err(e) => panic!("a decoded frame does not encode: {e} ({frame:?})"),
    };
    let mut again = BytesMut::new();
    if !matches!(frame, Frame::Sync { .. }) {
        again.extend_from_slice(&SYNC_MAGIC);
        again.extend_from_slice(&0u64.to_le_bytes());
    }
    again.extend_from_slice(&bytes);
    let mut codec = FrameCodec::new();
    let mut decoded = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut again) {
        decoded.push(f);
    }
    let last = decoded.pop();
    assert_eq!(last.as_ref(), Some(&frame), "frame did not round-trip");
}

/// A control message's JSON: what parses serializes and parses back to itself.
pub fn control_message(data: &[u8]) {
    let Ok(msg) = serde_json::from_slice::<Control>(data) else {
        return;
    };
    let json = match serde_json::to_vec(&msg) {
        Ok(j) => j,
        Err(e) => panic!("a parsed control message does not serialize: {e} ({msg:?})"),
    };
    let back: Control = match serde_json::from_slice(&json) {
        Ok(m) => m,
        Err(e) => panic!("a serialized control message does not parse: {e}"),
    };
    assert_eq!(back, msg, "control message did not round-trip");
    // Whatever parsed is sendable in a frame, or refused with a typed error.
    let _ = encode(Frame::Control { stream: 1, msg });
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("tokio runtime: {e}"))
    })
}

/// How long a QMP exchange with a fake QEMU that closed may take before it
/// counts as a hang (the real thing answers in microseconds).
const QMP_HANG: Duration = Duration::from_secs(5);

/// The worker's QMP client against a fake QEMU that sends the greeting,
/// then `data`, then closes: connecting and one command must end (with a
/// value or an error), never hang.
pub fn qmp_reader(data: &[u8]) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let path = dir.path().join("qmp.sock");
    let data = data.to_vec();
    let len = data.len();
    runtime().block_on(async move {
        use tokio::io::AsyncWriteExt;
        let listener = match tokio::net::UnixListener::bind(&path) {
            Ok(l) => l,
            Err(e) => panic!("bind {}: {e}", path.display()),
        };
        let fake = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .await?;
            s.write_all(&data).await?;
            s.shutdown().await
        });
        let client = async {
            let qmp = fastvm_worker::qmp::Qmp::connect(&path).await?;
            let r = qmp.execute("query-status", None).await;
            qmp.wait_closed().await;
            r
        };
        let outcome = tokio::time::timeout(QMP_HANG, client).await;
        fake.abort();
        assert!(
            outcome.is_ok(),
            "the QMP client hung after QEMU sent {len} bytes and closed the socket"
        );
    });
}

/// The upstream DNS server of the `dns_query` target: answers every query
/// with the bytes in `NEXT` (the query's id written over the first two).
struct FakeUpstream {
    addr: std::net::SocketAddr,
    next: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

fn fake_upstream() -> &'static FakeUpstream {
    static UP: OnceLock<FakeUpstream> = OnceLock::new();
    UP.get_or_init(|| {
        let next = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let answers = next.clone();
        let sock = runtime().block_on(async {
            match tokio::net::UdpSocket::bind("127.0.0.1:0").await {
                Ok(s) => s,
                Err(e) => panic!("fake upstream: {e}"),
            }
        });
        let addr = match sock.local_addr() {
            Ok(a) => a,
            Err(e) => panic!("fake upstream: {e}"),
        };
        runtime().spawn(async move {
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                let mut answer = answers.lock().map(|a| a.clone()).unwrap_or_default();
                // The query's id first: an answer with another id is ignored by the
                // resolver until its upstream timeout, which only costs time here.
                if n >= 2 {
                    if answer.len() < 2 {
                        answer.resize(2, 0);
                    }
                    answer[..2].copy_from_slice(&buf[..2]);
                }
                let _ = sock.send_to(&answer, from).await;
            }
        });
        FakeUpstream { addr, next }
    })
}

/// A query from the guest to its VM's resolver, whose upstream answers with
/// fuzz bytes. Input: two bytes of query length, the query, then the answer.
pub fn dns_query(data: &[u8]) {
    use hickory_proto::op::Message;
    if data.len() < 2 {
        return;
    }
    let qlen = usize::from(u16::from_le_bytes([data[0], data[1]])) % 512;
    let rest = &data[2..];
    let (query, answer) = rest.split_at(qlen.min(rest.len()));
    let up = fake_upstream();
    if let Ok(mut next) = up.next.lock() {
        *next = answer.to_vec();
    }
    let query = query.to_vec();
    let reply = runtime().block_on(async {
        let resolver = fastvm_worker::net::dns::Resolver::detached(
            up.addr,
            &fastvm_types::firewall::FirewallPolicy::default(),
        );
        let reply = tokio::time::timeout(QMP_HANG, resolver.answer(&query, false)).await;
        resolver.stop();
        reply
    });
    let Ok(reply) = reply else {
        panic!("the resolver hung on a query of {} bytes", query.len());
    };
    if let Some(reply) = reply {
        let parsed = match Message::from_vec(&reply) {
            Ok(m) => m,
            Err(e) => panic!("the resolver answered bytes that are not a DNS message: {e}"),
        };
        let id = query
            .get(..2)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        assert_eq!(parsed.id(), id, "the answer's id is not the query's");
    }
}

/// A guest-written tar stream extracted by `fastvm cp VM:DIR LOCAL`.
pub fn tar_unpack(data: &[u8]) {
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("tempdir: {e}"),
    };
    let dest = dir.path().join("out");
    // Refusals are expected; the properties are about what is on disk after.
    let _ = fastvm_cli::untar::safe_unpack(data, &dest);
    let outside: Vec<_> = std::fs::read_dir(dir.path())
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        outside.iter().all(|n| n == "out"),
        "extraction wrote outside the destination: {outside:?}"
    );
    if dest.exists() {
        check_tree(&dest, Path::new(""));
    }
}

/// Everything under `root/rel`: regular files, directories and inward symlinks only.
fn check_tree(root: &Path, rel: &Path) {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let Ok(entries) = std::fs::read_dir(root.join(rel)) else {
        return;
    };
    for entry in entries.flatten() {
        let rel_path = rel.join(entry.file_name());
        let Ok(meta) = std::fs::symlink_metadata(root.join(&rel_path)) else {
            continue;
        };
        let ft = meta.file_type();
        assert!(
            !(ft.is_block_device() || ft.is_char_device() || ft.is_fifo() || ft.is_socket()),
            "extraction created a device, FIFO or socket: {}",
            rel_path.display()
        );
        assert_eq!(
            meta.permissions().mode() & 0o7000,
            0,
            "extraction kept a setuid/setgid/sticky bit on {}",
            rel_path.display()
        );
        if ft.is_symlink() {
            let target = std::fs::read_link(root.join(&rel_path)).unwrap_or_default();
            let parent = rel_path.parent().unwrap_or(Path::new(""));
            assert!(
                stays_inside(&parent.join(&target)),
                "symlink {} -> {} points outside the destination",
                rel_path.display(),
                target.display()
            );
        } else if ft.is_dir() {
            check_tree(root, &rel_path);
        }
    }
}

/// `rel` (relative to the destination) never climbs above it, lexically.
fn stays_inside(rel: &Path) -> bool {
    let mut depth: Vec<PathBuf> = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => depth.push(PathBuf::from(n)),
            Component::CurDir => {}
            Component::ParentDir => {
                if depth.pop().is_none() {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_passes() {
        for s in crate::seeds::agent_frames() {
            agent_frames(&[[7u8].as_slice(), &s].concat());
        }
        for s in crate::seeds::control_messages() {
            control_message(&s);
        }
        for s in crate::seeds::qmp_lines() {
            qmp_reader(&s);
        }
        for s in crate::seeds::tar_archives() {
            tar_unpack(&s);
        }
        for s in crate::seeds::dns_exchanges() {
            dns_query(&s);
        }
    }

    #[test]
    fn seeds_decode_to_real_frames() {
        let all = crate::seeds::agent_frames();
        let session = all
            .iter()
            .max_by_key(|s| s.len())
            .cloned()
            .unwrap_or_default();
        let mut buf = BytesMut::from(&session[..]);
        let mut codec = FrameCodec::new();
        let mut n = 0;
        while let Ok(Some(f)) = codec.decode(&mut buf) {
            assert!(!matches!(f, Frame::Invalid { .. }), "{f:?}");
            n += 1;
        }
        assert!(n > 10, "only {n} frames");
    }

    #[test]
    fn symlink_escape_check() {
        assert!(stays_inside(Path::new("a/../b")));
        assert!(!stays_inside(Path::new("a/../../b")));
        assert!(!stays_inside(Path::new("/etc")));
    }
}
