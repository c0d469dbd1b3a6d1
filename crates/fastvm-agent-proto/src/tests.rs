use super::*;
use proptest::prelude::*;

fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Ok(Some(f)) = codec.decode(buf) {
        out.push(f);
    }
    out
}

fn sample_frames() -> Vec<Frame> {
    vec![
        Frame::Sync { nonce: 7 },
        Frame::Control {
            stream: 0,
            msg: Control::Hello {
                version: PROTOCOL_VERSION,
                nonce: 7,
            },
        },
        Frame::Control {
            stream: 3,
            msg: Control::Exec(ExecSpec {
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: BTreeMap::from([("A".into(), "b".into())]),
                cwd: Some("/tmp".into()),
                timeout_ms: Some(1000),
                stdin: false,
                pty: None,
            }),
        },
        Frame::Control {
            stream: 4,
            msg: Control::Exec(ExecSpec {
                argv: vec![],
                env: BTreeMap::new(),
                cwd: None,
                timeout_ms: None,
                stdin: true,
                pty: Some(PtySpec {
                    term: "xterm-256color".into(),
                    cols: 120,
                    rows: 40,
                }),
            }),
        },
        Frame::Control {
            stream: 4,
            msg: Control::Resize { cols: 80, rows: 24 },
        },
        Frame::Control {
            stream: 5,
            msg: Control::Connect {
                host: "localhost".into(),
                port: 22,
            },
        },
        Frame::Data {
            stream: 3,
            fd: Fd::Stdout,
            data: Bytes::from_static(b"hi\n\x00\xff"),
        },
        Frame::Eof {
            stream: 3,
            fd: Fd::Stdout,
        },
        Frame::Credit {
            stream: 3,
            fd: Fd::Stderr,
            bytes: 65536,
        },
        Frame::Control {
            stream: 3,
            msg: Control::Exit(ExitStatus {
                code: 0,
                signal: None,
                timed_out: false,
                duration_ms: 4,
                error: None,
            }),
        },
    ]
}

#[test]
fn round_trip_in_one_buffer() {
    let mut codec = FrameCodec::new();
    let mut buf = BytesMut::new();
    for f in sample_frames() {
        codec.encode(f, &mut buf).expect("encode");
    }
    let got = decode_all(&mut FrameCodec::new(), &mut buf);
    assert_eq!(got, sample_frames());
}

#[test]
fn garbage_before_sync_is_skipped() {
    let mut buf = BytesMut::from(&b"\x00garbage from an old session FVMSYN"[..]);
    buf.extend_from_slice(&encode(Frame::Sync { nonce: 1 }).expect("encode"));
    buf.extend_from_slice(
        &encode(Frame::Eof {
            stream: 1,
            fd: Fd::Stderr,
        })
        .expect("encode"),
    );
    let got = decode_all(&mut FrameCodec::new(), &mut buf);
    assert_eq!(
        got,
        vec![
            Frame::Sync { nonce: 1 },
            Frame::Eof {
                stream: 1,
                fd: Fd::Stderr
            }
        ]
    );
}

#[test]
fn frames_before_first_sync_are_dropped() {
    let mut buf = encode(Frame::Eof {
        stream: 1,
        fd: Fd::Stdout,
    })
    .expect("encode");
    let got = decode_all(&mut FrameCodec::new(), &mut buf);
    assert!(got.is_empty());
}

#[test]
fn oversized_length_desyncs_without_allocating() {
    let mut codec = FrameCodec::new();
    let mut buf = encode(Frame::Sync { nonce: 1 }).expect("encode");
    buf.put_u16_le(FRAME_MAGIC);
    buf.put_u8(KIND_DATA);
    buf.put_u32_le(1);
    buf.put_u32_le(u32::MAX);
    let got = decode_all(&mut codec, &mut buf);
    assert!(matches!(
        got.as_slice(),
        [Frame::Sync { .. }, Frame::Invalid { .. }]
    ));
    assert!(!codec.is_synced());
    assert!(buf.capacity() < 1 << 16);
}

#[test]
fn bad_control_json_keeps_sync() {
    let mut codec = FrameCodec::new();
    let mut buf = encode(Frame::Sync { nonce: 1 }).expect("encode");
    let json = br#"{"type":"no_such_message"}"#;
    put_header(&mut buf, KIND_CONTROL, 5, json.len()).expect("header");
    buf.put_slice(json);
    buf.extend_from_slice(
        &encode(Frame::Eof {
            stream: 5,
            fd: Fd::Stdout,
        })
        .expect("encode"),
    );
    let got = decode_all(&mut codec, &mut buf);
    assert_eq!(got.len(), 3);
    assert!(matches!(got[1], Frame::Invalid { .. }));
    assert_eq!(
        got[2],
        Frame::Eof {
            stream: 5,
            fd: Fd::Stdout
        }
    );
}

/// Schema snapshot: the JSON of control messages is the cross-version contract.
/// Changing it requires bumping PROTOCOL_VERSION and updating this test.
/// v2 added `exec.pty` (absent when unused, so v1 execs are byte-identical)
/// and `resize`; v3 added `connect`; v4 added `mount` and `unmount`.
/// Optional `configure` fields absent when unset (`network`,
/// `exec_defaults`) need no new version: older peers' messages are unchanged.
#[test]
fn control_schema_snapshot() {
    assert_eq!(
        (
            PROTOCOL_VERSION,
            MIN_PROTOCOL_VERSION,
            PTY_PROTOCOL_VERSION,
            CONNECT_PROTOCOL_VERSION,
            MOUNT_PROTOCOL_VERSION
        ),
        (4, 1, 2, 3, 4)
    );
    let cases: Vec<(Control, &str)> = vec![
        (
            Control::Hello {
                version: 1,
                nonce: 9,
            },
            r#"{"type":"hello","version":1,"nonce":9}"#,
        ),
        (
            Control::HelloAck {
                version: 1,
                nonce: 9,
                agent_version: "0.1.0".into(),
                boot_id: "b".into(),
            },
            r#"{"type":"hello_ack","version":1,"nonce":9,"agent_version":"0.1.0","boot_id":"b"}"#,
        ),
        (
            Control::Configure(GuestConfig {
                hostname: Some("h".into()),
                env: BTreeMap::from([("K".into(), "v".into())]),
                time_unix_ns: Some(5),
                entropy: vec![1, 2],
                network: None,
                exec_defaults: None,
            }),
            r#"{"type":"configure","hostname":"h","env":{"K":"v"},"time_unix_ns":5,"entropy":[1,2]}"#,
        ),
        (
            Control::Configure(GuestConfig {
                exec_defaults: Some(ExecDefaults {
                    cwd: Some("/app".into()),
                    user: Some("nobody:nogroup".into()),
                }),
                ..Default::default()
            }),
            r#"{"type":"configure","hostname":null,"env":{},"time_unix_ns":null,"entropy":[],"exec_defaults":{"cwd":"/app","user":"nobody:nogroup"}}"#,
        ),
        (
            Control::Configure(GuestConfig {
                exec_defaults: Some(ExecDefaults::default()),
                ..Default::default()
            }),
            r#"{"type":"configure","hostname":null,"env":{},"time_unix_ns":null,"entropy":[],"exec_defaults":{}}"#,
        ),
        (
            Control::Configure(GuestConfig {
                network: Some(NetworkConfig {
                    mac: "02:00:00:00:00:01".into(),
                    ipv4: "10.200.0.2/30".into(),
                    gateway4: "10.200.0.1".into(),
                    ipv6: Some("fd00::2/126".into()),
                    gateway6: Some("fd00::1".into()),
                    dns: vec!["10.200.0.1".into()],
                }),
                ..Default::default()
            }),
            r#"{"type":"configure","hostname":null,"env":{},"time_unix_ns":null,"entropy":[],"network":{"mac":"02:00:00:00:00:01","ipv4":"10.200.0.2/30","gateway4":"10.200.0.1","ipv6":"fd00::2/126","gateway6":"fd00::1","dns":["10.200.0.1"]}}"#,
        ),
        (
            Control::Exec(ExecSpec {
                argv: vec!["true".into()],
                env: BTreeMap::new(),
                cwd: None,
                timeout_ms: None,
                stdin: false,
                pty: None,
            }),
            r#"{"type":"exec","argv":["true"],"env":{},"cwd":null,"timeout_ms":null,"stdin":false}"#,
        ),
        (
            Control::Exec(ExecSpec {
                argv: vec![],
                env: BTreeMap::new(),
                cwd: None,
                timeout_ms: None,
                stdin: true,
                pty: Some(PtySpec {
                    term: "xterm-256color".into(),
                    cols: 80,
                    rows: 24,
                }),
            }),
            r#"{"type":"exec","argv":[],"env":{},"cwd":null,"timeout_ms":null,"stdin":true,"pty":{"term":"xterm-256color","cols":80,"rows":24}}"#,
        ),
        (
            Control::Resize {
                cols: 132,
                rows: 43,
            },
            r#"{"type":"resize","cols":132,"rows":43}"#,
        ),
        (
            Control::Signal { signal: 9 },
            r#"{"type":"signal","signal":9}"#,
        ),
        (
            Control::Connect {
                host: "127.0.0.1".into(),
                port: 8080,
            },
            r#"{"type":"connect","host":"127.0.0.1","port":8080}"#,
        ),
        (
            Control::Mount {
                source: "10.0.0.1:/vol_x".into(),
                target: "/mnt/x".into(),
                fstype: "nfs".into(),
                options: "vers=3".into(),
                read_only: true,
            },
            r#"{"type":"mount","source":"10.0.0.1:/vol_x","target":"/mnt/x","fstype":"nfs","options":"vers=3","read_only":true}"#,
        ),
        (
            Control::Unmount {
                target: "/mnt/x".into(),
                lazy: false,
            },
            r#"{"type":"unmount","target":"/mnt/x","lazy":false}"#,
        ),
        (Control::Cancel, r#"{"type":"cancel"}"#),
        (Control::Ping, r#"{"type":"ping"}"#),
        (
            Control::Shutdown { reboot: false },
            r#"{"type":"shutdown","reboot":false}"#,
        ),
        (Control::Ok, r#"{"type":"ok"}"#),
        (
            Control::Error {
                message: "m".into(),
            },
            r#"{"type":"error","message":"m"}"#,
        ),
        (
            Control::Started { pid: 42 },
            r#"{"type":"started","pid":42}"#,
        ),
        (
            Control::Exit(ExitStatus {
                code: 137,
                signal: Some(9),
                timed_out: true,
                duration_ms: 10,
                error: None,
            }),
            r#"{"type":"exit","code":137,"signal":9,"timed_out":true,"duration_ms":10,"error":null}"#,
        ),
    ];
    for (msg, want) in cases {
        assert_eq!(serde_json::to_string(&msg).expect("json"), want);
        assert_eq!(serde_json::from_str::<Control>(want).expect("parse"), msg);
    }
}

/// Older hosts send `configure` without `exec_defaults` (and older agents
/// ignore it): both directions decode.
#[test]
fn exec_defaults_are_optional_on_the_wire() {
    let old = r#"{"type":"configure","hostname":"h","env":{},"time_unix_ns":1,"entropy":[]}"#;
    match serde_json::from_str::<Control>(old).expect("parse") {
        Control::Configure(cfg) => assert_eq!(cfg.exec_defaults, None),
        other => panic!("{other:?}"),
    }
    let partial = r#"{"type":"configure","exec_defaults":{"user":"1000"}}"#;
    match serde_json::from_str::<Control>(partial).expect("parse") {
        Control::Configure(cfg) => assert_eq!(
            cfg.exec_defaults,
            Some(ExecDefaults {
                cwd: None,
                user: Some("1000".into())
            })
        ),
        other => panic!("{other:?}"),
    }
}

/// Regression: a real wall clock (> 2^53 ns) must survive the tagged-enum
/// decoding path (it once did not, as a u128, and the agent never answered).
#[test]
fn configure_with_real_clock_decodes() {
    let now = 1_795_912_296_454_660_339u64;
    let msg = Control::Configure(GuestConfig {
        time_unix_ns: Some(now),
        ..Default::default()
    });
    let mut buf = encode(Frame::Sync { nonce: 1 }).expect("encode");
    buf.extend_from_slice(
        &encode(Frame::Control {
            stream: 2,
            msg: msg.clone(),
        })
        .expect("encode"),
    );
    let got = decode_all(&mut FrameCodec::new(), &mut buf);
    assert_eq!(got[1], Frame::Control { stream: 2, msg });
}

proptest! {
    /// Whatever a (possibly hostile) guest sends, the decoder neither panics
    /// nor holds more than one maximal frame in memory.
    #[test]
    fn arbitrary_bytes_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..600), 0..20), sync_first in any::<bool>()) {
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        if sync_first {
            buf.extend_from_slice(&encode(Frame::Sync { nonce: 0 }).expect("encode"));
        }
        for c in chunks {
            buf.extend_from_slice(&c);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
            prop_assert!(buf.len() <= HEADER_LEN + MAX_PAYLOAD + SYNC_LEN);
        }
    }

    /// Any split of a valid stream into reads yields the same frames.
    #[test]
    fn split_reads_round_trip(cuts in proptest::collection::vec(0usize..400, 0..12), payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut frames = sample_frames();
        frames.push(Frame::Data { stream: 9, fd: Fd::Stderr, data: Bytes::from(payload) });
        let mut wire = BytesMut::new();
        for f in frames.clone() {
            FrameCodec::new().encode(f, &mut wire).expect("encode");
        }
        let wire = wire.freeze();
        let mut points: Vec<usize> = cuts.into_iter().map(|c| c.min(wire.len())).collect();
        points.push(wire.len());
        points.sort_unstable();
        let mut codec = FrameCodec::new();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut at = 0;
        for p in points {
            buf.extend_from_slice(&wire[at..p]);
            at = p;
            got.extend(decode_all(&mut codec, &mut buf));
        }
        prop_assert_eq!(got, frames);
    }
}
