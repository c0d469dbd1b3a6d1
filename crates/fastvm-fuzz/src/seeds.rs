//! Valid inputs of each target's format: the mutator starts from these, so
//! mutations reach past the first length and magic checks. The `cargo fuzz`
//! targets can be seeded with them too (`cargo run -p fastvm-fuzz --example
//! write_seeds` is not needed: libFuzzer finds its way from an empty corpus,
//! these only speed it up).

use bytes::Bytes;
use fastvm_agent_proto::{
    encode, Control, ExecSpec, ExitStatus, Fd, Frame, GuestConfig, NetworkConfig, PtySpec,
};
use std::collections::BTreeMap;

/// One of every control message, with realistic field values.
pub fn control_values() -> Vec<Control> {
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), "/usr/bin:/bin".to_owned());
    vec![
        Control::Hello {
            version: 3,
            nonce: 42,
        },
        Control::HelloAck {
            version: 3,
            nonce: 42,
            agent_version: "0.1.0".into(),
            boot_id: "b00t".into(),
        },
        Control::Configure(GuestConfig {
            hostname: Some("vm-1".into()),
            env: env.clone(),
            time_unix_ns: Some(1_700_000_000_000_000_000),
            entropy: vec![1, 2, 3, 4],
            network: Some(NetworkConfig {
                mac: "02:00:00:00:00:01".into(),
                ipv4: "10.200.0.2/30".into(),
                gateway4: "10.200.0.1".into(),
                ipv6: Some("fd00::2/64".into()),
                ..NetworkConfig::default()
            }),
            exec_defaults: Some(fastvm_agent_proto::ExecDefaults {
                cwd: Some("/app".into()),
                user: Some("1000:1000".into()),
            }),
        }),
        Control::Exec(ExecSpec {
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env,
            cwd: Some("/root".into()),
            timeout_ms: Some(1000),
            stdin: true,
            pty: Some(PtySpec {
                term: "xterm".into(),
                cols: 80,
                rows: 24,
            }),
        }),
        Control::Signal { signal: 15 },
        Control::Resize {
            cols: 100,
            rows: 40,
        },
        Control::Connect {
            host: "localhost".into(),
            port: 8080,
        },
        Control::Cancel,
        Control::Ping,
        Control::Shutdown { reboot: false },
        Control::Ok,
        Control::Error {
            message: "no such file".into(),
        },
        Control::Started { pid: 123 },
        Control::Exit(ExitStatus {
            code: 0,
            signal: None,
            timed_out: false,
            duration_ms: 5,
            error: None,
        }),
    ]
}

/// The JSON of every control message.
pub fn control_messages() -> Vec<Vec<u8>> {
    control_values()
        .iter()
        .filter_map(|c| serde_json::to_vec(c).ok())
        .collect()
}

/// Streams of frames as a guest sends them: SYNC, then a session's worth.
pub fn agent_frames() -> Vec<Vec<u8>> {
    let mut frames = vec![Frame::Sync { nonce: 7 }];
    frames.extend(
        control_values()
            .into_iter()
            .enumerate()
            .map(|(i, msg)| Frame::Control {
                stream: i as u32,
                msg,
            }),
    );
    frames.extend([
        Frame::Data {
            stream: 1,
            fd: Fd::Stdout,
            data: Bytes::from_static(b"hello\n"),
        },
        Frame::Data {
            stream: 1,
            fd: Fd::Stderr,
            data: Bytes::from_static(b"oops\n"),
        },
        Frame::Eof {
            stream: 1,
            fd: Fd::Stdout,
        },
        Frame::Credit {
            stream: 1,
            fd: Fd::Stdin,
            bytes: 65536,
        },
    ]);
    let encoded: Vec<Vec<u8>> = frames
        .into_iter()
        .filter_map(|f| encode(f).ok().map(|b| b.to_vec()))
        .collect();
    let mut seeds = encoded.clone();
    // Whole sessions: a SYNC followed by every frame, and every frame alone after a SYNC.
    seeds.push(encoded.concat());
    let sync = encoded.first().cloned().unwrap_or_default();
    seeds.extend(
        encoded
            .iter()
            .skip(1)
            .map(|f| [sync.as_slice(), f].concat()),
    );
    seeds
}

/// QMP traffic as QEMU sends it after the greeting.
pub fn qmp_lines() -> Vec<Vec<u8>> {
    [
        "{\"return\": {}, \"id\": 0}\n",
        "{\"return\": {}, \"id\": 0}\n{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 1}\n",
        "{\"return\": {}, \"id\": 0}\n{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\n",
        "{\"return\": {}, \"id\": 0}\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}, \"id\": 1}\n",
        "{\"return\": {}, \"id\": 0}\n{\"return\": [], \"id\": 18446744073709551615}\n",
        "{\"error\": {\"desc\": \"no caps\"}, \"id\": 0}\n",
        "{\"return\": {}, \"id\": 0}\n{\"return\": {}, \"id\": 1}",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Tar archives like a guest's export: directories, files, symlinks, hard
/// links, long names (GNU and PAX), and the escapes extraction must refuse.
pub fn tar_archives() -> Vec<Vec<u8>> {
    use tar::EntryType as T;
    let long = format!("{}/f", "d".repeat(120));
    let sets: Vec<Vec<(&str, T, &str)>> = vec![
        vec![
            ("./a/", T::Directory, ""),
            ("./a/f", T::Regular, "hi"),
            ("./l", T::Symlink, "a/f"),
            ("./h", T::Link, "a/f"),
        ],
        vec![
            ("a", T::Symlink, "."),
            ("a/b", T::Symlink, ".."),
            ("a/b/evil", T::Regular, "x"),
        ],
        vec![("l", T::Symlink, "../outside"), ("l/x", T::Regular, "x")],
        vec![("d/", T::Directory, ""), ("d/l", T::Symlink, "../../evil")],
        vec![("h", T::Link, "../evil"), ("fifo", T::Fifo, "")],
        vec![(long.as_str(), T::Regular, "long")],
    ];
    let mut out: Vec<Vec<u8>> = sets.iter().filter_map(|m| tar_of(m).ok()).collect();
    // A PAX-extended header with a long path and a GNU long name.
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(3);
    h.set_mode(0o4755);
    h.set_entry_type(T::Regular);
    if b.append_data(&mut h, format!("{}/x", "p".repeat(200)), &b"abc"[..])
        .is_ok()
    {
        if let Ok(t) = b.into_inner() {
            out.push(t);
        }
    }
    out
}

/// An archive of `(name, kind, body or link target)` members, names written
/// raw (the `tar` crate's setters refuse the escapes we want to test).
pub fn tar_of(members: &[(&str, tar::EntryType, &str)]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        let is_link = matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link);
        let body: &[u8] = if matches!(kind, tar::EntryType::Regular) {
            data.as_bytes()
        } else {
            &[]
        };
        h.set_size(body.len() as u64);
        if is_link {
            let raw = &mut h.as_old_mut().linkname;
            let n = data.len().min(raw.len());
            raw[..n].copy_from_slice(&data.as_bytes()[..n]);
        }
        if name.len() <= 100 {
            let raw = &mut h.as_old_mut().name;
            raw[..name.len()].copy_from_slice(name.as_bytes());
            h.set_cksum();
            b.append(&h, body)?;
        } else {
            b.append_data(&mut h, name, body)?;
        }
    }
    b.into_inner()
}

/// `dns_query` inputs: a guest's query and its upstream's answer (A, AAAA,
/// CNAME, empty, error), as `[query length: u16 LE][query][answer]`.
pub fn dns_exchanges() -> Vec<Vec<u8>> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::str::FromStr;
    let mut out = Vec::new();
    for (name, kind) in [
        ("example.com.", RecordType::A),
        ("www.example.org.", RecordType::AAAA),
        ("a.b.c.example.net.", RecordType::CNAME),
    ] {
        let Ok(qname) = Name::from_str(name) else {
            continue;
        };
        let mut q = Message::new();
        q.set_id(0x1234)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(Query::query(qname.clone(), kind));
        let mut answers: Vec<Message> = Vec::new();
        let mut a = q.clone();
        a.set_message_type(MessageType::Response);
        let data = match kind {
            RecordType::A => RData::A(A::new(93, 184, 216, 34)),
            RecordType::AAAA => RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            _ => RData::CNAME(CNAME(qname.clone())),
        };
        a.add_answer(Record::from_rdata(qname.clone(), 300, data));
        answers.push(a);
        let mut err = q.clone();
        err.set_message_type(MessageType::Response)
            .set_response_code(ResponseCode::ServFail);
        answers.push(err);
        let Ok(query) = q.to_vec() else {
            continue;
        };
        for answer in answers {
            if let Ok(bytes) = answer.to_vec() {
                let len = (query.len() as u16).to_le_bytes();
                out.push([len.as_slice(), &query, &bytes].concat());
            }
        }
        // An upstream answering garbage.
        let len = (query.len() as u16).to_le_bytes();
        out.push([len.as_slice(), &query, b"\x12\x34garbage"].concat());
    }
    out
}
