//! VM networking and the firewall on real packets, with real QEMU guests.
//!
//! The "outside world" is made of network namespaces this test creates (prefix
//! `fvt-`, removed by [`World`]'s Drop even when a check fails):
//!
//! ```text
//!  fvt-web   198.51.100.2  HTTP :80 :8080 :853, DNS :53 udp+tcp (the resolvers' upstream),
//!                          UDP echo :7001 :7002, UDP sink :7003 (spoofing checks)
//!            198.51.100.3  HTTP :80          198.51.100.53  HTTP :443 (a "DoH" endpoint)
//!            2001:db8:fa5::2  UDP sink :7003
//!            10.201.1.2  HTTP :80 (an RFC 1918 address: guarded by default)
//!            169.254.169.254  HTTP :80 (metadata; the host routes it there for
//!                        the VM pool only, `ip rule` table 7417)
//!  fvt-cli   fd00:fa58:2::2  a client connecting to the guests' publicIpv6
//!  host      HTTP on every address (0.0.0.0 and ::), an extra interface fvtd0
//!            203.0.113.9 / 2001:db8:fa6::9: the guard must keep guests off all of it
//! ```
//!
//! Nothing leaves this machine: every address used is one of these namespaces
//! or the host itself (documentation and private ranges, routed locally). One test function shares its VMs across checks (TCG on
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
    /// Payloads the UDP sinks (:7003) received.
    sunk: Arc<std::sync::Mutex<Vec<String>>>,
    /// Port of the host's HTTP server (every host address).
    host_port: u16,
    /// Port of a second host server, the "worker endpoint" the guard exposes
    /// on the host's uplink address only.
    exposed_port: u16,
}

impl Drop for World {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        let _ = Command::new("sh")
            .arg("-c")
            .arg(HOST_UNDO)
            .stderr(std::process::Stdio::null())
            .status();
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
        "allowed.test" | "wild.test" => Some(Ipv4Addr::new(198, 51, 100, 2)),
        "other.test" | "a.wild.test" | "b.c.wild.test" => Some(Ipv4Addr::new(198, 51, 100, 3)),
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

/// Records the payload of every datagram.
async fn serve_udp_sink(sock: tokio::net::UdpSocket, sunk: Arc<std::sync::Mutex<Vec<String>>>) {
    let mut buf = vec![0u8; 2048];
    while let Ok((n, _)) = sock.recv_from(&mut buf).await {
        if let Ok(mut v) = sunk.lock() {
            v.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
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

/// Undoes the host side of the world (extra interface, metadata route).
const HOST_UNDO: &str = "ip link del fvtd0; ip rule del pref 7417; ip route flush table 7417";

fn build_world() -> (World, SocketAddr) {
    let _ = Command::new("sh")
        .arg("-c")
        .arg(HOST_UNDO)
        .stderr(std::process::Stdio::null())
        .status();
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
    // Removes whatever part of it exists when a step below fails.
    let mut world = World {
        tasks: vec![],
        sunk: Default::default(),
        host_port: 0,
        exposed_port: 0,
    };
    sh("ip netns add fvt-web && ip link add fvtw-h type veth peer name eth0 netns fvt-web \
        && ip addr add 198.51.100.1/24 dev fvtw-h && ip addr add 10.201.1.1/24 dev fvtw-h \
        && ip addr add 2001:db8:fa5::1/64 dev fvtw-h nodad && ip link set fvtw-h up \
        && ip -n fvt-web addr add 198.51.100.2/24 dev eth0 && ip -n fvt-web addr add 198.51.100.3/24 dev eth0 \
        && ip -n fvt-web addr add 198.51.100.53/24 dev eth0 && ip -n fvt-web addr add 10.201.1.2/24 dev eth0 \
        && ip -n fvt-web addr add 169.254.169.254/32 dev eth0 && ip -n fvt-web addr add 2001:db8:fa5::2/64 dev eth0 nodad \
        && ip -n fvt-web link set eth0 up && ip -n fvt-web link set lo up \
        && ip -n fvt-web route add default via 198.51.100.1 && ip -n fvt-web -6 route add default via 2001:db8:fa5::1");
    // Metadata: routed to fvt-web for the VM pool only (the host's own
    // 169.254.169.254, if any, is untouched).
    sh("ip route add 169.254.169.254/32 dev fvtw-h table 7417 \
        && ip rule add pref 7417 from 10.200.0.0/16 to 169.254.169.254 lookup 7417");
    // Another host interface (a veth pair: not every kernel has dummy).
    sh("ip link add fvtd0 type veth peer name fvtd1 && ip addr add 203.0.113.9/32 dev fvtd0 \
        && ip addr add 2001:db8:fa6::9/128 dev fvtd0 nodad && ip link set fvtd1 up && ip link set fvtd0 up");
    sh("ip netns add fvt-cli && ip link add fvtc-h type veth peer name eth0 netns fvt-cli \
        && ip addr add fd00:fa58:2::1/64 dev fvtc-h nodad && ip link set fvtc-h up \
        && ip -n fvt-cli addr add fd00:fa58:2::2/64 dev eth0 nodad && ip -n fvt-cli link set eth0 up && ip -n fvt-cli link set lo up \
        && ip -n fvt-cli -6 route add default via fd00:fa58:2::1");
    let tcp: Vec<SocketAddr> = [
        "198.51.100.2:80",
        "198.51.100.2:8080",
        "198.51.100.2:853",
        "198.51.100.3:80",
        "198.51.100.53:443",
        "10.201.1.2:80",
        "169.254.169.254:80",
    ]
    .iter()
    .map(|s| s.parse().expect("addr"))
    .collect();
    let udp = [
        "198.51.100.2:53",
        "198.51.100.2:7001",
        "198.51.100.2:7002",
        "198.51.100.2:7003",
        "[2001:db8:fa5::2]:7003",
    ]
    .iter()
    .map(|s| s.parse().expect("addr"))
    .collect();
    let (mut tcp, udp) = block_on(listeners_in(
        WEB,
        [tcp, vec!["198.51.100.2:53".parse().expect("addr")]].concat(),
        udp,
    ));
    let dns_tcp = tcp.pop().expect("dns tcp listener");
    // The host's server listens on every address, IPv4 and IPv6 (a dual-stack
    // socket; the checks below make sure both answer).
    let host_web = std::net::TcpListener::bind("[::]:0").expect("bind host web server");
    let host_port = host_web.local_addr().expect("addr").port();
    world.host_port = host_port;
    let exposed = std::net::TcpListener::bind("[::]:0").expect("bind exposed host server");
    world.exposed_port = exposed.local_addr().expect("addr").port();
    let host_addr = SocketAddr::new(IpAddr::V4(host_address()), host_port);
    block_on(async {
        for l in tcp.into_iter().chain([host_web, exposed]) {
            l.set_nonblocking(true).expect("nonblocking");
            world.tasks.push(tokio::spawn(serve_http(
                tokio::net::TcpListener::from_std(l).expect("listener"),
            )));
        }
        world.tasks.push(tokio::spawn(serve_dns_tcp(
            tokio::net::TcpListener::from_std(dns_tcp).expect("listener"),
        )));
        for (i, u) in udp.into_iter().enumerate() {
            let u = tokio::net::UdpSocket::from_std(u).expect("udp");
            let sunk = world.sunk.clone();
            world.tasks.push(tokio::spawn(async move {
                match i {
                    0 => serve_dns(u).await,
                    1 | 2 => serve_udp_echo(u).await,
                    _ => serve_udp_sink(u, sunk).await,
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

/// Spoofing from the guest (argv: gateway IPv4, own IPv4, own IPv6, forged
/// IPv4, forged IPv6): UDP to the sinks (198.51.100.2 and 2001:db8:fa5::2,
/// port 7003) in raw Ethernet frames (AF_PACKET) with a forged IPv4 source,
/// a forged IPv6 source and a forged MAC, then the same with its own
/// addresses (raw frames and ordinary sockets). The forged ones go first:
/// once an own one arrives, a forged one that passed would have too.
const SPOOF_PY: &str = r"import socket, struct, sys, time
gw4, src4, src6, forged4, forged6 = sys.argv[1:6]
dst4, dst6 = '198.51.100.2', '2001:db8:fa5::2'
def csum(b):
    b += b'\0' * (len(b) % 2)
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
def udp4(src, dst, data):
    u = struct.pack('!HHHH', 40000, 7003, 8 + len(data), 0) + data
    h = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(u), 1, 0, 64, 17, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    return h[:10] + struct.pack('!H', csum(h)) + h[12:] + u
def udp6(src, dst, data):
    s, d = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)
    n = 8 + len(data)
    u = struct.pack('!HHHH', 40000, 7003, n, 0) + data
    c = csum(s + d + struct.pack('!I3xB', n, 17) + u) or 0xffff
    return struct.pack('!IHBB', 6 << 28, n, 17, 64) + s + d + u[:6] + struct.pack('!H', c) + u[8:]
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'arp', (gw4, 53))
gwmac = None
for _ in range(50):
    for line in open('/proc/net/arp').read().splitlines()[1:]:
        f = line.split()
        if f[0] == gw4 and f[2] == '0x2':
            gwmac = bytes.fromhex(f[3].replace(':', ''))
    if gwmac:
        break
    time.sleep(0.1)
own = bytes.fromhex(open('/sys/class/net/eth0/address').read().strip().replace(':', ''))
fake = bytes.fromhex('020000fafe01')
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind(('eth0', 0))
def frame(mac, v6, pkt):
    f = gwmac + mac + struct.pack('!H', 0x86dd if v6 else 0x0800) + pkt
    raw.send(f + b'\0' * max(0, 60 - len(f)))
frame(own, False, udp4(forged4, dst4, b'forged-ip4'))
frame(own, True, udp6(forged6, dst6, b'forged-ip6'))
frame(fake, False, udp4(src4, dst4, b'forged-mac4'))
frame(fake, True, udp6(src6, dst6, b'forged-mac6'))
time.sleep(0.2)
frame(own, False, udp4(src4, dst4, b'raw4-own'))
frame(own, True, udp6(src6, dst6, b'raw6-own'))
socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'sock4', (dst4, 7003))
socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).sendto(b'sock6', (dst6, 7003))
print('sent')
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

    /// A UDP datagram to 198.51.100.2:`port` from the guest: the echo, or None.
    fn udp_echo(&self, port: u16) -> Option<String> {
        let (code, out) = self.sh(&format!(
            "python3 -c \"import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);\
             s.connect(('198.51.100.2',{port}));s.send(b'ping{port}');print(s.recv(64).decode())\""
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

    /// Which of `urls` answer from the guest (curl, 3 s each), in one exec.
    fn open_urls(&self, urls: &[String]) -> Vec<String> {
        let (_, out) = self.sh(&format!(
            "for u in {}; do curl -gs -m 3 -o /dev/null \"$u\" && echo \"$u\"; done; true",
            urls.join(" ")
        ));
        out.lines().map(str::to_owned).collect()
    }

    fn public_ipv6(&self) -> String {
        self.rt
            .get(&self.id)
            .expect("vm")
            .public_ipv6
            .expect("a public IPv6")
    }
}

/// `addr` + `n`.
fn plus4(addr: &str, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(addr.parse::<Ipv4Addr>().expect("ipv4")) + n)
}

fn plus6(addr: &str, n: u128) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from(u128::from(addr.parse::<std::net::Ipv6Addr>().expect("ipv6")) + n)
}

/// The host's global IPv6 addresses not of ours or of this test.
fn host_ipv6_addresses() -> Vec<std::net::Ipv6Addr> {
    let out = Command::new("ip")
        .args(["-6", "-o", "addr", "show", "scope", "global"])
        .output()
        .expect("ip addr");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.contains("fvh-") && !l.contains("fvt"))
        .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .collect()
}

/// What the guard keeps every guest of this test off, as URLs with a server
/// behind (checked here from the host side, so a failure to block is
/// visible): the host's HTTP server on each host address (its uplink, the
/// extra interface fvtd0, its global IPv6, the VM's host-side veth), the metadata
/// address and the RFC 1918 server.
fn guarded_urls(world: &World, vm: &Vm) -> Vec<String> {
    let info = vm.rt.get(&vm.id).expect("vm");
    let (v4, v6) = (
        info.private_ipv4.expect("ipv4"),
        info.public_ipv6.expect("ipv6"),
    );
    let p = world.host_port;
    let mut host: Vec<SocketAddr> = vec![
        SocketAddr::new(IpAddr::V4(host_address()), p),
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)), p),
        SocketAddr::new("2001:db8:fa6::9".parse().expect("ip"), p),
        SocketAddr::new(IpAddr::V4(plus4(&v4, 3)), p),
        SocketAddr::new(IpAddr::V6(plus6(&v6, 3)), p),
    ];
    host.extend(
        host_ipv6_addresses()
            .into_iter()
            .map(|a| SocketAddr::new(IpAddr::V6(a), p)),
    );
    for a in &host {
        assert!(
            std::net::TcpStream::connect_timeout(a, Duration::from_secs(2)).is_ok(),
            "the host's server does not answer on {a}"
        );
    }
    let served_outside = block_on(netns::on_thread_in(WEB, || {
        Ok(["169.254.169.254:80", "10.201.1.2:80"].iter().all(|a| {
            a.parse().is_ok_and(|a| {
                std::net::TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok()
            })
        }))
    }))
    .expect("web thread");
    assert!(served_outside, "metadata and RFC 1918 servers not up");
    host.iter()
        .map(|a| format!("http://{a}/"))
        .chain([
            "http://169.254.169.254/".into(),
            "http://10.201.1.2/".into(),
        ])
        .collect()
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
    let exposed = SocketAddr::new(IpAddr::V4(host_address()), world.exposed_port);
    let rt = block_on(Runtime::open(world_config(&dir, vec![exposed]))).expect("open runtime");
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

    // Default posture: egress allow reaches the outside, not the host; DNS resolves.
    assert_eq!(
        vm.curl(&format!("http://{host_web}/")),
        None,
        "host web server"
    );
    assert_eq!(
        vm.curl("http://198.51.100.3/").as_deref(),
        Some("hello 198.51.100.3:80")
    );
    assert_eq!(vm.resolves("allowed.test").as_deref(), Some("198.51.100.2"));
    assert_eq!(
        vm.sh("cat /etc/resolv.conf").1,
        format!("nameserver {}", gateway_of(&info.private_ipv4))
    );
    // The guest may not use another resolver directly.
    let direct = "python3 -c \"import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(2);\
        s.sendto(bytes.fromhex('abcd01000001000000000000076578616d706c650000010001'),('198.51.100.2',53));print(len(s.recv(512)))\"";
    assert_ne!(
        vm.sh(direct).0,
        0,
        "direct DNS to another server must be dropped"
    );

    // The guard: with egress allow, every host address, metadata and the
    // RFC 1918 range stay closed while the outside world and the exposed
    // endpoint (that address and port only) answer; user rules allowing them
    // explicitly change nothing.
    let outside = "http://198.51.100.3/".to_owned();
    let exposed_url = format!("http://{exposed}/");
    let mut guarded = guarded_urls(&world, &vm);
    guarded.push(format!("http://203.0.113.9:{}/", world.exposed_port));
    let probe: Vec<String> = guarded
        .iter()
        .cloned()
        .chain([exposed_url.clone(), outside.clone()])
        .collect();
    let expected = vec![exposed_url, outside.clone()];
    assert_eq!(vm.open_urls(&probe), expected, "guarded: {guarded:?}");
    let host_net = format!("{}/32", host_web.ip());
    vm.firewall(json!({"egress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "0.0.0.0/0", "action": "allow"},
        {"kind": "cidr", "value": "::/0", "action": "allow"},
        {"kind": "cidr", "value": host_net, "action": "allow"},
        {"kind": "cidr", "value": "169.254.169.254/32", "action": "allow"}]},
        "ingress": {"defaultAction": "allow"}}));
    assert_eq!(
        vm.open_urls(&probe),
        expected,
        "user rules opened the guard"
    );
    vm.firewall(json!({}));

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
        Some("hello 198.51.100.2:80")
    );
    assert_eq!(
        vm.curl("http://allowed.test:8080/"),
        None,
        "port not allowed"
    );
    assert_eq!(
        vm.curl("http://198.51.100.3/"),
        None,
        "other IP not allowed"
    );
    assert_eq!(
        vm.curl(&format!("http://{host_web}/")),
        None,
        "host not allowed"
    );

    // UDP: one port to one address under egress deny.
    assert_eq!(vm.udp_echo(7002), None, "UDP denied by default");
    vm.firewall(json!({"egress": {"defaultAction": "deny", "rules": [
        {"kind": "cidr", "value": "198.51.100.2/32", "protocol": "udp", "ports": "7001", "action": "allow"}]}}));
    assert_eq!(
        vm.udp_echo(7001).as_deref(),
        Some("ping7001"),
        "allowed UDP port"
    );
    assert_eq!(vm.udp_echo(7002), None, "other UDP port blocked");
    assert_eq!(
        vm.curl("http://198.51.100.2/"),
        None,
        "TCP to the same address blocked"
    );

    // Wildcard fqdn rule.
    vm.firewall(json!({"egress": {"defaultAction": "deny", "rules": [
        {"kind": "fqdn", "value": "*.wild.test", "protocol": "tcp", "ports": "80", "action": "allow"}]}}));
    assert_eq!(
        vm.curl("http://a.wild.test/").as_deref(),
        Some("hello 198.51.100.3:80")
    );
    assert_eq!(
        vm.curl("http://wild.test/"),
        None,
        "the apex is not matched by *.wild.test"
    );

    // DNS allow mode with wildcards.
    vm.firewall(json!({"dns": {"mode": "allow", "domains": ["*.wild.test", "allowed.test"]}}));
    assert_eq!(vm.resolves("allowed.test").as_deref(), Some("198.51.100.2"));
    assert_eq!(
        vm.resolves("b.c.wild.test").as_deref(),
        Some("198.51.100.3")
    );
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
        vm.curl("http://198.51.100.3/").as_deref(),
        Some("hello 198.51.100.3:80"),
        "egress still default allow"
    );

    // DNS deny mode, and the gate before L4: other.test is NXDOMAIN although
    // egress allows its address.
    vm.firewall(json!({
        "dns": {"mode": "deny", "domains": ["other.test"]},
        "egress": {"defaultAction": "deny", "rules": [
            {"kind": "cidr", "value": "198.51.100.3/32", "protocol": "tcp", "ports": "80", "action": "allow"}]}}));
    assert_eq!(vm.resolves("other.test"), None, "blocked by the dns gate");
    assert_eq!(vm.resolves("allowed.test").as_deref(), Some("198.51.100.2"));
    assert_eq!(
        vm.curl("http://198.51.100.3/").as_deref(),
        Some("hello 198.51.100.3:80"),
        "L4 allows the IP itself"
    );
    assert_eq!(vm.curl("http://other.test/"), None);

    // blockBypass: DoT (TCP 853) and DoH endpoints.
    vm.firewall(json!({}));
    assert!(
        vm.curl("http://198.51.100.2:853/").is_some(),
        "853 open without blockBypass"
    );
    assert!(
        vm.curl("http://198.51.100.53:443/").is_some(),
        "DoH IP open without blockBypass"
    );
    vm.firewall(json!({"dns": {"blockBypass": true}}));
    assert_eq!(vm.curl("http://198.51.100.2:853/"), None, "TCP 853 dropped");
    assert_eq!(vm.curl("http://198.51.100.53:443/"), None, "DoH IP dropped");
    assert!(
        vm.curl("http://198.51.100.2:8080/").is_some(),
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
            c.curl("http://198.51.100.3/").as_deref(),
            Some("hello 198.51.100.3:80"),
            "clone {} egress",
            c.id
        );
        assert_eq!(c.resolves("allowed.test").as_deref(), Some("198.51.100.2"));
    }

    // Other VMs: not reachable, even with ingress and egress allowing all
    // (fvt-cli, outside, does reach vm's server).
    vm.firewall(json!({"ingress": {"defaultAction": "allow"}}));
    assert!(client_connects(p8000), "vm's server answers the outside");
    let other = &clones[0];
    let vm_info = rt.get(&vm.id).expect("vm");
    let vm_urls = vec![
        format!("http://{}:8000/", vm_info.private_ipv4.clone().expect("v4")),
        format!("http://[{}]:8000/", vm.public_ipv6()),
        "http://198.51.100.3/".to_owned(),
    ];
    assert_eq!(
        other.open_urls(&vm_urls),
        vec!["http://198.51.100.3/".to_owned()],
        "another VM reached"
    );

    // Anti-spoofing: raw frames from the guest with another VM's addresses
    // or a forged MAC never leave the namespace; its own ones do.
    let other_info = rt.get(&other.id).expect("other");
    let (code, out) = vm.sh(&format!(
        "cat > /tmp/spoof.py <<'EOF'\n{SPOOF_PY}EOF\npython3 /tmp/spoof.py {} {} {} {} {} 2>&1",
        gateway_of(&vm_info.private_ipv4),
        vm_info.private_ipv4.clone().expect("v4"),
        vm.public_ipv6(),
        other_info.private_ipv4.clone().expect("v4"),
        other_info.public_ipv6.clone().expect("v6"),
    ));
    assert_eq!((code, out.as_str()), (0, "sent"), "spoof script");
    let own = ["raw4-own", "raw6-own", "sock4", "sock6"];
    let sunk = || world.sunk.lock().map(|v| v.clone()).unwrap_or_default();
    for _ in 0..100 {
        if own.iter().all(|o| sunk().iter().any(|s| s == o)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let got = sunk();
    for o in own {
        assert!(got.iter().any(|s| s == o), "{o} not received: {got:?}");
    }
    assert!(
        !got.iter().any(|s| s.starts_with("forged")),
        "a spoofed packet got through: {got:?}"
    );

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

/// A runtime config whose resolvers forward to the outside world's DNS,
/// with `exposed` host endpoints open to guests.
fn world_config(dir: &std::path::Path, exposed: Vec<SocketAddr>) -> fastvm_worker::RuntimeConfig {
    let mut cfg = config(dir);
    if let Some(net) = cfg.network.as_mut() {
        net.dns_upstream = "198.51.100.2:53".parse().expect("addr");
        net.extra_doh = vec!["198.51.100.53/32".parse().expect("net")];
        net.guard.exceptions.host_tcp = exposed;
    }
    cfg
}

/// [`world_config`] with the operator's deny list narrowed to 172.16.0.0/12
/// (as `fastvm serve --deny-egress-cidr 172.16.0.0/12`): 10.0.0.0/8 opens.
fn narrowed_config(dir: &std::path::Path) -> fastvm_worker::RuntimeConfig {
    let mut cfg = world_config(dir, Vec::new());
    if let Some(net) = cfg.network.as_mut() {
        net.guard.deny_egress = vec!["172.16.0.0/12".parse().expect("net")];
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
/// Both run with a narrowed `--deny-egress-cidr`: the RFC 1918 server that
/// the default list keeps closed answers, metadata stays closed.
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
            let a = Runtime::open(narrowed_config(&dir)).await.expect("open A");
            let kept = a.create(CreateVm { machine: "c1m2".into(), firewall: policy, ..Default::default() }).await.expect("create");
            let gone = a.create(CreateVm { machine: "c1m2".into(), ..Default::default() }).await.expect("create");
            let servers = "for p in 8000 9000; do setsid nohup python3 -m http.server $p --bind :: >/dev/null 2>&1 & done";
            a.exec_buffered(&kept.id, &ExecRequest::shell(servers), CAP).await.expect("start servers");
            // A lookup that puts allowed.test's address into the fqdn rule's set.
            let out = a.exec_buffered(&kept.id, &ExecRequest::shell("curl -s -m 3 http://allowed.test/"), CAP).await.expect("curl");
            assert_eq!(out.stdout, b"hello 198.51.100.2:80");
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
    let b = block_on(Runtime::open(narrowed_config(&dir))).expect("open B");
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
        vm.curl("http://198.51.100.2/").as_deref(),
        Some("hello 198.51.100.2:80"),
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
        Some("hello 198.51.100.2:80")
    );
    assert_eq!(
        vm.curl("http://allowed.test:8080/"),
        None,
        "port not allowed"
    );
    assert_eq!(
        vm.curl("http://198.51.100.3/"),
        None,
        "other IP not allowed"
    );
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
        vm.curl("http://198.51.100.3/").as_deref(),
        Some("hello 198.51.100.3:80"),
        "egress default allow again"
    );
    assert_eq!(
        vm.resolves("other.test").as_deref(),
        Some("198.51.100.3"),
        "dns gate replaced"
    );
    assert!(
        client_connects(p9000) && !client_connects(p8000),
        "new ingress rule"
    );
    assert_eq!(
        vm.curl("http://10.201.1.2/").as_deref(),
        Some("hello 10.201.1.2:80"),
        "10.0.0.0/8 is not in the narrowed deny list"
    );
    assert_eq!(
        vm.curl("http://169.254.169.254/"),
        None,
        "metadata is always denied"
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
