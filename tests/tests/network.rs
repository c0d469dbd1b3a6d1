//! VM networking and the firewall on real packets, with real QEMU guests.
//!
//! The "outside world" is made of network namespaces this test creates (prefix
//! `fvt-`, removed by [`World`]'s Drop even when a check fails):
//!
//! ```text
//!  fvt-web   10.201.1.2  HTTP :80 :8080 :853, DNS :53 udp+tcp (the resolvers' upstream),
//!                        UDP echo :7001 :7002
//!            10.201.1.3  HTTP :80          10.201.1.53  HTTP :443 (a "DoH" endpoint)
//!  fvt-cli   fd00:fa58:2::2  a client connecting to the guests' publicIpv6
//!  host      <host address>:<port>  HTTP (default egress allow must reach it)
//! ```
//!
//! Nothing leaves this machine: every address used is one of these namespaces
//! or the host itself. One test function shares its VMs across checks (TCG on
//! two cores: boots are the cost).

use fastvm_e2e::{block_on, config, data_dir};
use fastvm_types::FirewallPolicy;
use fastvm_worker::net::netns;
use fastvm_worker::runtime::CreateVm;
use fastvm_worker::{ExecRequest, Runtime};
use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::{rdata, RData, Record, RecordType};
use serde_json::json;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const CAP: usize = 1 << 20;
const WEB: &str = "fvt-web";
const CLI: &str = "fvt-cli";

fn sh(cmd: &str) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The simulated outside world; dropping it removes its namespaces.
struct World {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for (ns, veth) in [(WEB, "fvtw-h"), (CLI, "fvtc-h")] {
            let _ = Command::new("ip")
                .args(["link", "del", veth])
                .stderr(std::process::Stdio::null())
                .status();
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// Test DNS data: name -> IPv4.
fn zone(name: &str) -> Option<Ipv4Addr> {
    match name {
        "allowed.test" | "wild.test" => Some(Ipv4Addr::new(10, 201, 1, 2)),
        "other.test" | "a.wild.test" | "b.c.wild.test" => Some(Ipv4Addr::new(10, 201, 1, 3)),
        _ => None,
    }
}

/// The answer of the test zone to the query `bytes`.
fn answer(bytes: &[u8]) -> Option<Vec<u8>> {
    let q = Message::from_vec(bytes).ok()?;
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_recursion_available(true);
    r.add_queries(q.queries().to_vec());
    if let Some(query) = q.queries().first() {
        let name = query
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        match zone(&name) {
            Some(ip) if query.query_type() == RecordType::A => {
                r.add_answer(Record::from_rdata(
                    query.name().clone(),
                    5,
                    RData::A(rdata::A(ip)),
                ));
            }
            Some(_) => {}
            None => {
                r.set_response_code(ResponseCode::NXDomain);
            }
        }
    }
    r.to_vec().ok()
}

async fn serve_dns(sock: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 4096];
    while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
        if let Some(bytes) = answer(&buf[..n]) {
            let _ = sock.send_to(&bytes, peer).await;
        }
    }
}

/// DNS over TCP (length-prefixed messages), one query per connection.
async fn serve_dns_tcp(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut len = [0u8; 2];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
            if s.read_exact(&mut q).await.is_err() {
                return;
            }
            if let Some(a) = answer(&q) {
                let mut out = u16::try_from(a.len()).unwrap_or(0).to_be_bytes().to_vec();
                out.extend_from_slice(&a);
                let _ = s.write_all(&out).await;
            }
        });
    }
}

async fn serve_udp_echo(sock: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 2048];
    while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
        let _ = sock.send_to(&buf[..n], peer).await;
    }
}

/// A minimal HTTP server answering `hello <addr>` on every connection.
async fn serve_http(listener: tokio::net::TcpListener) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let me = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    while let Ok((mut s, _)) = listener.accept().await {
        let body = format!("hello {me}");
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
            let resp = format!(
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

async fn listeners_in(
    ns: &str,
    tcp: Vec<SocketAddr>,
    udp: Vec<SocketAddr>,
) -> (Vec<std::net::TcpListener>, Vec<std::net::UdpSocket>) {
    netns::on_thread_in(ns, move || {
        let mut t = Vec::new();
        for a in tcp {
            let l = std::net::TcpListener::bind(a)?;
            l.set_nonblocking(true)?;
            t.push(l);
        }
        let mut u = Vec::new();
        for a in udp {
            let s = std::net::UdpSocket::bind(a)?;
            s.set_nonblocking(true)?;
            u.push(s);
        }
        Ok((t, u))
    })
    .await
    .expect("sockets in the outside namespace")
}

/// The host's first global IPv4 address not of ours or of this test.
fn host_address() -> Ipv4Addr {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("fvh-") && !l.contains("fvt"))
        .find_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .expect("a global IPv4 address on the host")
}

fn build_world() -> (World, SocketAddr) {
    for (ns, veth) in [(WEB, "fvtw-h"), (CLI, "fvtc-h")] {
        let _ = Command::new("ip")
            .args(["link", "del", veth])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(std::process::Stdio::null())
            .status();
    }
    let mut world = World { tasks: vec![] };
    sh("ip netns add fvt-web && ip link add fvtw-h type veth peer name eth0 netns fvt-web \
        && ip addr add 10.201.1.1/24 dev fvtw-h && ip link set fvtw-h up \
        && ip -n fvt-web addr add 10.201.1.2/24 dev eth0 && ip -n fvt-web addr add 10.201.1.3/24 dev eth0 \
        && ip -n fvt-web addr add 10.201.1.53/24 dev eth0 && ip -n fvt-web link set eth0 up && ip -n fvt-web link set lo up \
        && ip -n fvt-web route add default via 10.201.1.1");
    sh("ip netns add fvt-cli && ip link add fvtc-h type veth peer name eth0 netns fvt-cli \
        && ip addr add fd00:fa58:2::1/64 dev fvtc-h nodad && ip link set fvtc-h up \
        && ip -n fvt-cli addr add fd00:fa58:2::2/64 dev eth0 nodad && ip -n fvt-cli link set eth0 up && ip -n fvt-cli link set lo up \
        && ip -n fvt-cli -6 route add default via fd00:fa58:2::1");
    let tcp: Vec<SocketAddr> = [
        "10.201.1.2:80",
        "10.201.1.2:8080",
        "10.201.1.2:853",
        "10.201.1.3:80",
        "10.201.1.53:443",
    ]
    .iter()
    .map(|s| s.parse().expect("addr"))
    .collect();
    let udp = ["10.201.1.2:53", "10.201.1.2:7001", "10.201.1.2:7002"]
        .iter()
        .map(|s| s.parse().expect("addr"))
        .collect();
    let (mut tcp, udp) = block_on(listeners_in(
        WEB,
        [tcp, vec!["10.201.1.2:53".parse().expect("addr")]].concat(),
        udp,
    ));
    let dns_tcp = tcp.pop().expect("dns tcp listener");
    let host_web = std::net::TcpListener::bind((host_address(), 0)).expect("bind host web server");
    host_web.set_nonblocking(true).expect("nonblocking");
    let host_addr = host_web.local_addr().expect("addr");
    block_on(async {
        for l in tcp.into_iter().chain([host_web]) {
            world.tasks.push(tokio::spawn(serve_http(
                tokio::net::TcpListener::from_std(l).expect("listener"),
            )));
        }
        world.tasks.push(tokio::spawn(serve_dns_tcp(
            tokio::net::TcpListener::from_std(dns_tcp).expect("listener"),
        )));
        for (i, u) in udp.into_iter().enumerate() {
            let u = tokio::net::UdpSocket::from_std(u).expect("udp");
            world.tasks.push(tokio::spawn(async move {
                if i == 0 {
                    serve_dns(u).await
                } else {
                    serve_udp_echo(u).await
                }
            }));
        }
    });
    (world, host_addr)
}

/// A DNS query over TCP (argv: name, server), printing the rcode and the
/// answer count of the response.
const DNS_TCP_PY: &str = r"import socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
q = b'\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00'
q += b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\x00\x00\x01\x00\x01'
s = socket.create_connection((server, 53), 3)
s.sendall(struct.pack('!H', len(q)) + q)
b = b''
while len(b) < 2 or len(b) < 2 + struct.unpack('!H', b[:2])[0]:
    c = s.recv(4096)
    if not c:
        break
    b += c
r = b[2:]
print(r[3] & 15, struct.unpack('!H', r[6:8])[0])
";

struct Vm {
    rt: Arc<Runtime>,
    id: String,
}

impl Vm {
    fn sh(&self, cmd: &str) -> (i32, String) {
        let out = block_on(
            self.rt
                .exec_buffered(&self.id, &ExecRequest::shell(cmd), CAP),
        )
        .expect("exec");
        (
            out.exit_code,
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    }

    /// `curl` from the guest: the body, or None when it failed.
    fn curl(&self, url: &str) -> Option<String> {
        let (code, out) = self.sh(&format!("curl -s -m 3 {url}"));
        (code == 0).then_some(out)
    }

    fn resolves(&self, name: &str) -> Option<String> {
        let (code, out) = self.sh(&format!(
            "getent ahostsv4 {name} | head -n1 | cut -d' ' -f1"
        ));
        (code == 0 && !out.is_empty()).then_some(out)
    }

    /// A UDP datagram to 10.201.1.2:`port` from the guest: the echo, or None.
    fn udp_echo(&self, port: u16) -> Option<String> {
        let (code, out) = self.sh(&format!(
            "python3 -c \"import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);\
             s.connect(('10.201.1.2',{port}));s.send(b'ping{port}');print(s.recv(64).decode())\""
        ));
        (code == 0).then_some(out)
    }

    /// A DNS query (type A) over TCP to the VM's resolver, by python3 with a
    /// hand-built message (the guest image has no dig): `<rcode> <answers>`.
    fn dns_tcp(&self, name: &str) -> Option<String> {
        let gw = gateway_of(&self.rt.get(&self.id).ok()?.private_ipv4);
        let (code, out) = self.sh(&format!(
            "cat > /tmp/dnstcp.py <<'EOF'\n{DNS_TCP_PY}EOF\npython3 /tmp/dnstcp.py {name} {gw}"
        ));
        (code == 0).then_some(out)
    }

    fn firewall(&self, policy: serde_json::Value) -> Duration {
        let policy: FirewallPolicy = serde_json::from_value(policy).expect("policy json");
        let t = Instant::now();
        block_on(self.rt.set_firewall(&self.id, &policy)).expect("set firewall");
        t.elapsed()
    }

    fn public_ipv6(&self) -> String {
        self.rt
            .get(&self.id)
            .expect("vm")
            .public_ipv6
            .expect("a public IPv6")
    }
}

/// A TCP connection from the client namespace to `addr` (2 s timeout).
fn client_connects(addr: SocketAddr) -> bool {
    block_on(netns::on_thread_in(CLI, move || {
        Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
    }))
    .expect("client thread")
}

fn netns_exists(name: &str) -> bool {
    std::path::Path::new("/run/netns").join(name).exists()
}

fn link_exists(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", name])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn network_and_firewall_on_real_packets() {
    let (world, host_web) = build_world();
    let dir = data_dir("network");
    let rt = block_on(Runtime::open(world_config(&dir))).expect("open runtime");
    let t = Instant::now();
    let info = block_on(rt.create(CreateVm {
        machine: "c1m2".into(),
        ..Default::default()
    }))
    .expect("create VM");
    eprintln!("VM up in {:?}: {info:?}", t.elapsed());
    let vm = Vm {
        rt: rt.clone(),
        id: info.id.clone(),
    };

    // Default posture: egress allow reaches the host and the outside; DNS resolves.
    assert_eq!(
        vm.curl(&format!("http://{host_web}/")),
        Some(format!("hello {host_web}")),
        "host web server"
    );
    assert_eq!(
        vm.curl("http://10.201.1.3/").as_deref(),
        Some("hello 10.201.1.3:80")
    );
    assert_eq!(vm.resolves("allowed.test").as_deref(), Some("10.201.1.2"));
    assert_eq!(
        vm.sh("cat /etc/resolv.conf").1,
        format!("nameserver {}", gateway_of(&info.private_ipv4))
    );
    // The guest may not use another resolver directly.
    let direct = "python3 -c \"import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);\
        s.sendto(bytes.fromhex('abcd01000001000000000000076578616d706c650000010001'),('10.201.1.2',53));print(len(s.recv(512)))\"";
    assert_ne!(
        vm.sh(direct).0,
        0,
        "direct DNS to another server must be dropped"
    );

    // Ingress: default deny, then exactly the allowed port.
    vm.sh("for p in 8000 9000; do setsid nohup python3 -m http.server $p --bind :: >/dev/null 2>&1 & done");
    let v6: IpAddr = vm.public_ipv6().parse().expect("ipv6");
    let (p8000, p9000) = (SocketAddr::new(v6, 8000), SocketAddr::new(v6, 9000));
    // Wait for the servers inside the guest (python under TCG), checked from the guest.
    let ready = (0..60).any(|_| vm.sh("curl -s -o /dev/null -m 2 http://[::1]:8000/ && curl -s -o /dev/null -m 2 http://[::1]:9000/").0 == 0);
    assert!(ready, "guest HTTP servers did not start");
    assert!(
        !client_connects(p8000),
        "default ingress deny must block the client"
    );
    let took = vm.firewall(json!({"ingress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "fd00:fa58:2::/64", "protocol": "tcp", "ports": "8000", "action": "allow"}]}}));
    let t = Instant::now();
    assert!(client_connects(p8000), "allow rule must open port 8000");
    eprintln!(
        "ingress rule applied in {took:?}, first connection {:?} later",
        t.elapsed()
    );
    assert!(took < Duration::from_secs(1), "rule change took {took:?}");
    assert!(!client_connects(p9000), "port 9000 must stay closed");
    // A port range.
    vm.firewall(json!({"ingress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "fd00:fa58:2::/64", "protocol": "tcp", "ports": "8500-9500", "action": "allow"}]}}));
    assert!(
        client_connects(p9000),
        "range 8500-9500 must open port 9000"
    );
    assert!(!client_connects(p8000), "port 8000 is outside the range");

    // Egress deny-all with one fqdn allow: only that domain's IP and port.
    vm.firewall(json!({"egress": {"defaultAction": "deny", "rules": [
        {"kind": "fqdn", "value": "allowed.test", "protocol": "tcp", "ports": "80", "action": "allow"}]}}));
    assert_eq!(
        vm.curl("http://allowed.test/").as_deref(),
        Some("hello 10.201.1.2:80")
    );
    assert_eq!(
        vm.curl("http://allowed.test:8080/"),
        None,
        "port not allowed"
    );
    assert_eq!(vm.curl("http://10.201.1.3/"), None, "other IP not allowed");
    assert_eq!(
        vm.curl(&format!("http://{host_web}/")),
        None,
        "host not allowed"
    );

    // UDP: one port to one address under egress deny.
    assert_eq!(vm.udp_echo(7002), None, "UDP denied by default");
    vm.firewall(json!({"egress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "10.201.1.2/32", "protocol": "udp", "ports": "7001", "action": "allow"}]}}));
    assert_eq!(
        vm.udp_echo(7001).as_deref(),
        Some("ping7001"),
        "allowed UDP port"
    );
    assert_eq!(vm.udp_echo(7002), None, "other UDP port blocked");
    assert_eq!(
        vm.curl("http://10.201.1.2/"),
        None,
        "TCP to the same address blocked"
    );

    // Wildcard fqdn rule.
    vm.firewall(json!({"egress": {"defaultAction": "deny", "rules": [
        {"kind": "fqdn", "value": "*.wild.test", "protocol": "tcp", "ports": "80", "action": "allow"}]}}));
    assert_eq!(
        vm.curl("http://a.wild.test/").as_deref(),
        Some("hello 10.201.1.3:80")
    );
    assert_eq!(
        vm.curl("http://wild.test/"),
        None,
        "the apex is not matched by *.wild.test"
    );

    // DNS allow mode with wildcards.
    vm.firewall(json!({"dns": {"mode": "allow", "domains": ["*.wild.test", "allowed.test"]}}));
    assert_eq!(vm.resolves("allowed.test").as_deref(), Some("10.201.1.2"));
    assert_eq!(vm.resolves("b.c.wild.test").as_deref(), Some("10.201.1.3"));
    assert_eq!(
        vm.resolves("wild.test"),
        None,
        "apex not allowed by *.wild.test"
    );
    assert_eq!(vm.resolves("other.test"), None);
    // The same gate over TCP.
    assert_eq!(
        vm.dns_tcp("allowed.test").as_deref(),
        Some("0 1"),
        "allowed name over TCP"
    );
    assert_eq!(
        vm.dns_tcp("other.test").as_deref(),
        Some("3 0"),
        "NXDOMAIN over TCP"
    );
    assert_eq!(
        vm.curl(&format!("http://{host_web}/")),
        Some(format!("hello {host_web}")),
        "egress still default allow"
    );

    // DNS deny mode, and the gate before L4: other.test is NXDOMAIN although
    // egress allows its address.
    vm.firewall(json!({
        "dns": {"mode": "deny", "domains": ["other.test"]},
        "egress": {"defaultAction": "deny", "rules": [
            {"kind": "cidr", "value": "10.201.1.3/32", "protocol": "tcp", "ports": "80", "action": "allow"}]}}));
    assert_eq!(vm.resolves("other.test"), None, "blocked by the dns gate");
    assert_eq!(vm.resolves("allowed.test").as_deref(), Some("10.201.1.2"));
    assert_eq!(
        vm.curl("http://10.201.1.3/").as_deref(),
        Some("hello 10.201.1.3:80"),
        "L4 allows the IP itself"
    );
    assert_eq!(vm.curl("http://other.test/"), None);

    // blockBypass: DoT (TCP 853) and DoH endpoints.
    vm.firewall(json!({}));
    assert!(
        vm.curl("http://10.201.1.2:853/").is_some(),
        "853 open without blockBypass"
    );
    assert!(
        vm.curl("http://10.201.1.53:443/").is_some(),
        "DoH IP open without blockBypass"
    );
    vm.firewall(json!({"dns": {"blockBypass": true}}));
    assert_eq!(vm.curl("http://10.201.1.2:853/"), None, "TCP 853 dropped");
    assert_eq!(vm.curl("http://10.201.1.53:443/"), None, "DoH IP dropped");
    assert!(
        vm.curl("http://10.201.1.2:8080/").is_some(),
        "other traffic unaffected"
    );

    // Clones restored from one snapshot: distinct, working networks.
    vm.firewall(json!({}));
    let snap = block_on(rt.snapshot(&vm.id, None)).expect("snapshot");
    let clones: Vec<Vm> = (0..2)
        .map(|_| {
            let req = CreateVm {
                machine: "c1m2".into(),
                snapshot: Some(snap.id.clone()),
                ..Default::default()
            };
            let info = block_on(rt.create(req)).expect("restore clone");
            Vm {
                rt: rt.clone(),
                id: info.id,
            }
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    for c in clones.iter().chain([&vm]) {
        let i = rt.get(&c.id).expect("info");
        let (mac, v4, v6) = (
            i.mac.clone().expect("mac"),
            i.private_ipv4.clone().expect("v4"),
            i.public_ipv6.clone().expect("v6"),
        );
        assert!(
            seen.insert(mac.clone()) && seen.insert(v4.clone()) && seen.insert(v6.clone()),
            "duplicate address in {i:?}"
        );
        let inside = c.sh("cat /sys/class/net/eth0/address; ip -o addr show dev eth0 scope global");
        assert!(
            inside.1.contains(&mac)
                && inside.1.contains(&format!("{v4}/30"))
                && inside.1.contains(&v6),
            "guest view: {}",
            inside.1
        );
        assert_eq!(
            c.curl("http://10.201.1.3/").as_deref(),
            Some("hello 10.201.1.3:80"),
            "clone {} egress",
            c.id
        );
        assert_eq!(c.resolves("allowed.test").as_deref(), Some("10.201.1.2"));
    }

    // Teardown leaves nothing behind.
    let slots: Vec<(String, String)> = [&vm]
        .into_iter()
        .chain(clones.iter())
        .map(|c| netns_names(&dir, &c.id))
        .collect();
    for c in clones.iter().chain([&vm]) {
        block_on(rt.delete(&c.id)).expect("delete");
    }
    for (ns, veth) in slots {
        assert!(!netns_exists(&ns), "{ns} left behind");
        assert!(!link_exists(&veth), "{veth} left behind");
    }

    readoption();
    drop(world);
    assert!(!netns_exists(WEB) && !netns_exists(CLI));
}

/// A runtime config whose resolvers forward to the outside world's DNS.
fn world_config(dir: &std::path::Path) -> fastvm_worker::RuntimeConfig {
    let mut cfg = config(dir);
    if let Some(net) = cfg.network.as_mut() {
        net.dns_upstream = "10.201.1.2:53".parse().expect("addr");
        net.extra_doh = vec!["10.201.1.53/32".parse().expect("net")];
    }
    cfg
}

/// Worker restart: runtime A (on its own tokio runtime, dropped as a
/// crashed worker would be: resolver sockets and agent connections close,
/// QEMU keeps running) launches a VM with a firewall and a second VM whose
/// directory is removed (and QEMU killed) while no runtime runs. Runtime B
/// on the same data dir removes the second VM's namespace and re-adopts the
/// first: same namespace and addresses, firewall enforced, resolver serving
/// the same gate, `set_firewall` applied, and delete removes everything.
fn readoption() {
    let dir = data_dir("network-adopt");
    let policy: FirewallPolicy = serde_json::from_value(json!({
        "ingress": {"defaultAction": "deny", "rules": [
            {"kind": "cidr", "value": "fd00:fa58:2::/64", "protocol": "tcp", "ports": "8000", "action": "allow"}]},
        "egress": {"defaultAction": "deny", "rules": [
            {"kind": "fqdn", "value": "allowed.test", "protocol": "tcp", "ports": "80", "action": "allow"}]},
        "dns": {"mode": "deny", "domains": ["other.test"]}}))
    .expect("policy");
    let t = Instant::now();
    let (kept, gone) = {
        let rt_a = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let infos = rt_a.block_on(async {
            let a = Runtime::open(world_config(&dir)).await.expect("open A");
            let kept = a.create(CreateVm { machine: "c1m2".into(), firewall: policy, ..Default::default() }).await.expect("create");
            let gone = a.create(CreateVm { machine: "c1m2".into(), ..Default::default() }).await.expect("create");
            let servers = "for p in 8000 9000; do setsid nohup python3 -m http.server $p --bind :: >/dev/null 2>&1 & done";
            a.exec_buffered(&kept.id, &ExecRequest::shell(servers), CAP).await.expect("start servers");
            // A lookup that puts allowed.test's address into the fqdn rule's set.
            let out = a.exec_buffered(&kept.id, &ExecRequest::shell("curl -s -m 3 http://allowed.test/"), CAP).await.expect("curl");
            assert_eq!(out.stdout, b"hello 10.201.1.2:80");
            (kept, gone)
        });
        drop(rt_a);
        infos
    };
    eprintln!("runtime A: two VMs up and dropped in {:?}", t.elapsed());
    let (kept_ns, kept_veth) = netns_names(&dir, &kept.id);
    let (gone_ns, gone_veth) = netns_names(&dir, &gone.id);
    // SAFETY: kill by the pid of a QEMU this test started.
    unsafe { libc::kill(gone.pid.expect("pid") as i32, libc::SIGKILL) };
    std::fs::remove_dir_all(dir.join("vms").join(&gone.id)).expect("remove the VM dir");
    assert!(netns_exists(&gone_ns), "nothing removed the namespace yet");

    let t = Instant::now();
    let b = block_on(Runtime::open(world_config(&dir))).expect("open B");
    eprintln!("runtime B opened (re-adoption) in {:?}", t.elapsed());
    assert!(
        !netns_exists(&gone_ns) && !link_exists(&gone_veth),
        "left-over network of a removed VM"
    );
    let info = b.get(&kept.id).expect("re-adopted VM");
    assert_eq!(info.state, fastvm_worker::VmState::Running);
    assert_eq!(
        (&info.mac, &info.private_ipv4, &info.public_ipv6),
        (&kept.mac, &kept.private_ipv4, &kept.public_ipv6)
    );
    assert_eq!(
        netns_names(&dir, &kept.id),
        (kept_ns.clone(), kept_veth.clone())
    );
    assert!(netns_exists(&kept_ns) && link_exists(&kept_veth));

    let vm = Vm {
        rt: b.clone(),
        id: kept.id.clone(),
    };
    // The fqdn set survived the restart: the address resolved under runtime A
    // is reachable with no new lookup.
    assert_eq!(
        vm.curl("http://10.201.1.2/").as_deref(),
        Some("hello 10.201.1.2:80"),
        "fqdn set carried over"
    );
    // The resolver answers again, through the same gate.
    assert_eq!(
        vm.resolves("other.test"),
        None,
        "still blocked by the dns gate"
    );
    assert_eq!(
        vm.dns_tcp("other.test").as_deref(),
        Some("3 0"),
        "NXDOMAIN over TCP too"
    );
    // Egress: the fqdn allow works again (its set refilled by the new resolver), nothing else.
    assert_eq!(
        vm.curl("http://allowed.test/").as_deref(),
        Some("hello 10.201.1.2:80")
    );
    assert_eq!(
        vm.curl("http://allowed.test:8080/"),
        None,
        "port not allowed"
    );
    assert_eq!(vm.curl("http://10.201.1.3/"), None, "other IP not allowed");
    // Ingress: exactly the allowed port.
    let v6: IpAddr = vm.public_ipv6().parse().expect("ipv6");
    let (p8000, p9000) = (SocketAddr::new(v6, 8000), SocketAddr::new(v6, 9000));
    let ready = (0..60).any(|_| vm.sh("curl -s -o /dev/null -m 2 http://[::1]:8000/ && curl -s -o /dev/null -m 2 http://[::1]:9000/").0 == 0);
    assert!(ready, "guest HTTP servers did not start");
    assert!(client_connects(p8000), "ingress allow still applies");
    assert!(!client_connects(p9000), "ingress deny still applies");
    // set_firewall still reaches the re-adopted VM.
    vm.firewall(json!({"ingress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "fd00:fa58:2::/64", "protocol": "tcp", "ports": "9000", "action": "allow"}]}}));
    assert_eq!(
        vm.curl("http://10.201.1.3/").as_deref(),
        Some("hello 10.201.1.3:80"),
        "egress default allow again"
    );
    assert_eq!(
        vm.resolves("other.test").as_deref(),
        Some("10.201.1.3"),
        "dns gate replaced"
    );
    assert!(
        client_connects(p9000) && !client_connects(p8000),
        "new ingress rule"
    );

    block_on(b.delete(&kept.id)).expect("delete");
    assert!(
        !netns_exists(&kept_ns) && !link_exists(&kept_veth),
        "network of the deleted VM left behind"
    );
}

fn gateway_of(v4: &Option<String>) -> String {
    let ip: Ipv4Addr = v4.as_deref().expect("ipv4").parse().expect("ipv4");
    Ipv4Addr::from(u32::from(ip) - 1).to_string()
}

/// The namespace and host veth of a VM, from its `net.json`.
fn netns_names(dir: &std::path::Path, id: &str) -> (String, String) {
    let rec: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("vms").join(id).join("net.json")).expect("net.json"),
    )
    .expect("json");
    let a = &rec["addressing"];
    (
        a["netns"].as_str().expect("netns").to_owned(),
        a["host_veth"].as_str().expect("veth").to_owned(),
    )
}
