//! The VM's resolver: the only name server the guest is given, listening on
//! its gateway address (UDP and TCP port 53) inside the VM's namespace.
//!
//! ```text
//!  guest query ─▶ parse (hickory-proto; malformed: dropped, never a panic)
//!      │  dns gate: mode=allow -> only listed domains; mode=deny -> all but listed
//!      ├─ blocked ─▶ NXDOMAIN
//!      └─ allowed ─▶ forward to the upstream (from the host namespace)
//!                     ─▶ A/AAAA of names matching an fqdn egress rule are queued
//!                        for that rule's nft sets (TTL, floor 30 s); the answer
//!                        goes back to the guest only once they are in ─▶ answer
//! ```
//!
//! Set updates are batched per VM by one writer task ([`SetWriter`]): it takes
//! what is queued (bounded queue, at most [`MAX_BATCH`] updates), runs one
//! `nft -f -` for all of it, then releases the waiting answers, and runs at
//! most once per [`MIN_NFT_INTERVAL`]: a guest flooding its resolver costs one
//! nft process per interval, and only its own answers wait.
//!
//! The sockets are created on a thread that has entered the namespace and are
//! then driven by tokio; the upstream sockets are ordinary host sockets.
//! Recent answers are remembered (bounded) so that a policy change can put
//! the addresses of new fqdn rules into their sets at once.

use super::netns;
use super::nft::{self, SetElement};
use crate::error::Result;
use fastvm_types::firewall::{domain_matches, DnsMode, EgressRuleKind, FirewallPolicy};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::RData;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Lowest TTL given to a set element, so a 0-TTL answer is still usable.
pub const TTL_FLOOR_SECS: u32 = 30;
/// Highest TTL given to a set element.
pub const TTL_CAP_SECS: u32 = 86_400;
/// Queries answered at once per VM; more are dropped (the guest retries).
const MAX_IN_FLIGHT: usize = 64;
/// Names remembered for re-feeding sets after a policy change.
const CACHE_NAMES: usize = 1024;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// Set updates applied by one nft run at most.
pub const MAX_BATCH: usize = 64;
/// Shortest time between two nft runs of one VM's set writer.
pub const MIN_NFT_INTERVAL: Duration = Duration::from_millis(50);

/// Addresses for the sets of fqdn rules, and who waits for them.
struct SetUpdate {
    rules: Vec<usize>,
    ips: Vec<IpAddr>,
    ttl_secs: u32,
    done: tokio::sync::oneshot::Sender<()>,
}

impl SetUpdate {
    fn script(&self) -> String {
        self.rules
            .iter()
            .map(|r| nft::add_elements(*r, &self.ips, self.ttl_secs))
            .collect()
    }
}

/// The per-VM queue of fqdn set updates and the count of nft runs it made.
struct SetWriter {
    tx: tokio::sync::mpsc::Sender<SetUpdate>,
    nft_runs: Arc<AtomicU64>,
}

impl SetWriter {
    /// The queue and its writer task (to be aborted with the resolver).
    fn start(netns: String) -> (SetWriter, tokio::task::JoinHandle<()>) {
        // Every query in flight queues at most one update.
        let (tx, rx) = tokio::sync::mpsc::channel(MAX_IN_FLIGHT);
        let nft_runs = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(write_sets(netns, rx, nft_runs.clone()));
        (SetWriter { tx, nft_runs }, task)
    }
}

/// One nft run per batch of queued updates, at most one per
/// [`MIN_NFT_INTERVAL`]; the waiting answers are released after it. A batch
/// that fails (e.g. a set that a policy change removed meanwhile) is retried
/// update by update, so one stale update does not lose the others.
async fn write_sets(
    netns: String,
    mut rx: tokio::sync::mpsc::Receiver<SetUpdate>,
    runs: Arc<AtomicU64>,
) {
    let mut last: Option<tokio::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        if let Some(t) = last {
            // Updates queued meanwhile join this batch.
            tokio::time::sleep_until(t + MIN_NFT_INTERVAL).await;
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(u) => batch.push(u),
                Err(_) => break,
            }
        }
        last = Some(tokio::time::Instant::now());
        let script: String = batch.iter().map(SetUpdate::script).collect();
        runs.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = netns::nft(Some(&netns), &script).await {
            if batch.len() == 1 {
                tracing::warn!(%netns, error = %e, "adding resolved addresses to fqdn sets failed");
            } else {
                for u in &batch {
                    runs.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = netns::nft(Some(&netns), &u.script()).await {
                        tracing::warn!(%netns, error = %e, "adding resolved addresses to fqdn sets failed");
                    }
                }
            }
        }
        for u in batch {
            let _ = u.done.send(());
        }
    }
}

/// The dns gate and the fqdn rules of one policy.
#[derive(Debug, Clone, Default)]
struct Gate {
    mode: DnsMode,
    domains: Vec<String>,
    /// (egress rule index, pattern) of every fqdn rule.
    fqdn: Vec<(usize, String)>,
}

impl Gate {
    fn of(policy: &FirewallPolicy) -> Gate {
        let p = policy.normalized();
        let dns = p.dns.unwrap_or_default();
        let fqdn = p
            .egress
            .unwrap_or_default()
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == EgressRuleKind::Fqdn)
            .map(|(i, r)| (i, r.value.clone()))
            .collect();
        Gate {
            mode: dns.mode,
            domains: dns.domains,
            fqdn,
        }
    }

    /// The dns gate: may `name` resolve?
    fn allows(&self, name: &str) -> bool {
        let listed = self.domains.iter().any(|d| domain_matches(d, name));
        match self.mode {
            DnsMode::Allow => listed,
            DnsMode::Deny => !listed,
        }
    }
}

struct Cached {
    ips: Vec<IpAddr>,
    expires: Instant,
}

pub struct Resolver {
    netns: String,
    upstream: SocketAddr,
    gate: RwLock<Gate>,
    cache: Mutex<HashMap<String, Cached>>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    in_flight: Arc<tokio::sync::Semaphore>,
    sets: SetWriter,
}

impl Resolver {
    /// A resolver without sockets (see [`Resolver::start`]) and its set writer.
    fn new(netns: &str, upstream: SocketAddr, policy: &FirewallPolicy) -> Arc<Resolver> {
        let (sets, writer) = SetWriter::start(netns.to_owned());
        Arc::new(Resolver {
            netns: netns.to_owned(),
            upstream,
            gate: RwLock::new(Gate::of(policy)),
            cache: Mutex::new(HashMap::new()),
            tasks: Mutex::new(vec![writer]),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT)),
            sets,
        })
    }

    /// A resolver with no sockets and no namespace, answering through
    /// [`Resolver::answer`] only: for tests and the `dns_query` fuzz target
    /// (crates/fastvm-fuzz). Its fqdn set updates have no namespace to go to.
    pub fn detached(upstream: SocketAddr, policy: &FirewallPolicy) -> Arc<Resolver> {
        Resolver::new("", upstream, policy)
    }

    /// nft processes run so far to add resolved addresses to fqdn sets.
    pub fn set_update_runs(&self) -> u64 {
        self.sets.nft_runs.load(Ordering::Relaxed)
    }

    /// Listen on `bind`:53 (UDP and TCP) inside `netns`.
    pub async fn start(
        netns: &str,
        bind: Ipv4Addr,
        upstream: SocketAddr,
        policy: &FirewallPolicy,
    ) -> Result<Arc<Resolver>> {
        let addr = SocketAddr::new(IpAddr::V4(bind), 53);
        let (udp, tcp) = netns::on_thread_in(netns, move || {
            let udp = std::net::UdpSocket::bind(addr)?;
            udp.set_nonblocking(true)?;
            let tcp = std::net::TcpListener::bind(addr)?;
            tcp.set_nonblocking(true)?;
            Ok((udp, tcp))
        })
        .await?;
        let map = |e: std::io::Error| crate::error::Error::Network(format!("resolver socket: {e}"));
        let udp = Arc::new(UdpSocket::from_std(udp).map_err(map)?);
        let tcp = TcpListener::from_std(tcp).map_err(map)?;
        let r = Resolver::new(netns, upstream, policy);
        let t1 = tokio::spawn(serve_udp(r.clone(), udp));
        let t2 = tokio::spawn(serve_tcp(r.clone(), tcp));
        if let Ok(mut t) = r.tasks.lock() {
            t.extend([t1, t2]);
        }
        Ok(r)
    }

    /// Switch to the dns gate and fqdn rules of `policy`.
    pub fn set_policy(&self, policy: &FirewallPolicy) {
        if let Ok(mut g) = self.gate.write() {
            *g = Gate::of(policy);
        }
    }

    /// Close the sockets.
    pub fn stop(&self) {
        if let Ok(mut t) = self.tasks.lock() {
            for task in t.drain(..) {
                task.abort();
            }
        }
    }

    /// Remembered answers that the fqdn rules of `policy` match, with the
    /// time each has left.
    pub fn known_elements(&self, policy: &FirewallPolicy) -> Vec<SetElement> {
        let gate = Gate::of(policy);
        let now = Instant::now();
        let Ok(cache) = self.cache.lock() else {
            return vec![];
        };
        let mut out = Vec::new();
        for (name, c) in cache.iter() {
            let left = c.expires.saturating_duration_since(now).as_secs() as u32;
            if left == 0 {
                continue;
            }
            for (rule, pattern) in &gate.fqdn {
                if domain_matches(pattern, name) {
                    out.extend(c.ips.iter().map(|ip| SetElement {
                        rule: *rule,
                        ip: *ip,
                        ttl_secs: left,
                    }));
                }
            }
        }
        out
    }

    /// The answer to one query from the guest, or `None` to stay silent.
    pub async fn answer(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        let msg = Message::from_vec(query).ok()?;
        if msg.message_type() != MessageType::Query {
            return None;
        }
        if msg.op_code() != OpCode::Query || msg.queries().len() != 1 {
            return reply(&msg, ResponseCode::NotImp);
        }
        let name = msg.queries()[0].name().to_ascii();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let allowed = self.gate.read().map(|g| g.allows(&name)).unwrap_or(false);
        if !allowed {
            return reply(&msg, ResponseCode::NXDomain);
        }
        let upstream = if tcp {
            forward_tcp(self.upstream, query).await
        } else {
            forward_udp(self.upstream, query, msg.id()).await
        };
        let answer = match upstream {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(netns = %self.netns, %name, error = %e, "upstream DNS failed");
                return reply(&msg, ResponseCode::ServFail);
            }
        };
        let Ok(parsed) = Message::from_vec(&answer) else {
            return reply(&msg, ResponseCode::ServFail);
        };
        if parsed.id() != msg.id() {
            return reply(&msg, ResponseCode::ServFail);
        }
        let mut ips: Vec<(IpAddr, u32)> = Vec::new();
        for rec in parsed.answers() {
            match rec.data() {
                Some(RData::A(a)) => ips.push((IpAddr::V4(a.0), rec.ttl())),
                Some(RData::AAAA(a)) => ips.push((IpAddr::V6(a.0), rec.ttl())),
                _ => {}
            }
        }
        if !ips.is_empty() {
            self.feed(&name, &ips).await;
        }
        Some(answer)
    }

    /// Put the addresses of `name` into the sets of every fqdn rule matching
    /// it (awaited: the guest may connect as soon as it has the answer). The
    /// writer batches them with the other queries' (see [`SetWriter`]).
    async fn feed(&self, name: &str, ips: &[(IpAddr, u32)]) {
        let ttl = ips
            .iter()
            .map(|(_, t)| *t)
            .min()
            .unwrap_or(0)
            .clamp(TTL_FLOOR_SECS, TTL_CAP_SECS);
        let addrs: Vec<IpAddr> = ips.iter().map(|(ip, _)| *ip).collect();
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_NAMES {
                let now = Instant::now();
                cache.retain(|_, c| c.expires > now);
                if cache.len() >= CACHE_NAMES {
                    cache.clear();
                }
            }
            cache.insert(
                name.to_owned(),
                Cached {
                    ips: addrs.clone(),
                    expires: Instant::now() + Duration::from_secs(u64::from(ttl)),
                },
            );
        }
        let rules: Vec<usize> = match self.gate.read() {
            Ok(g) => g
                .fqdn
                .iter()
                .filter(|(_, p)| domain_matches(p, name))
                .map(|(i, _)| *i)
                .collect(),
            Err(_) => vec![],
        };
        if rules.is_empty() {
            return;
        }
        let (done, added) = tokio::sync::oneshot::channel();
        let update = SetUpdate {
            rules,
            ips: addrs,
            ttl_secs: ttl,
            done,
        };
        // Queue full: wait (bounded by the queries in flight). Writer gone
        // (resolver stopped): the VM's network is going away.
        if self.sets.tx.send(update).await.is_ok() {
            let _ = added.await;
        }
    }
}

/// A header-only answer to `msg` with `code`.
fn reply(msg: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut r = Message::new();
    r.set_id(msg.id())
        .set_message_type(MessageType::Response)
        .set_op_code(msg.op_code())
        .set_recursion_desired(msg.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    r.add_queries(msg.queries().to_vec());
    r.to_vec().ok()
}

async fn forward_udp(upstream: SocketAddr, query: &[u8], id: u16) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = if upstream.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(upstream).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    let deadline = tokio::time::Instant::now() + UPSTREAM_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream timed out")
            })??;
        // Stray datagrams (wrong id) are ignored until the deadline.
        if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut s = TcpStream::connect(upstream).await?;
        let len =
            u16::try_from(query.len()).map_err(|_| std::io::Error::other("query too long"))?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(query).await?;
        read_framed(&mut s).await
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream timed out"))?
}

/// One length-prefixed DNS message of a TCP stream.
async fn read_framed(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    Ok(buf)
}

async fn serve_udp(r: Arc<Resolver>, sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(permit) = r.in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let query = buf[..n].to_vec();
        let (r, sock) = (r.clone(), sock.clone());
        tokio::spawn(async move {
            if let Some(answer) = r.answer(&query, false).await {
                let _ = sock.send_to(&answer, peer).await;
            }
            drop(permit);
        });
    }
}

async fn serve_tcp(r: Arc<Resolver>, listener: TcpListener) {
    loop {
        let Ok((mut s, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let Ok(permit) = r.in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let r = r.clone();
        tokio::spawn(async move {
            // A connection may carry several queries; idle ones are closed after 10 s.
            while let Ok(Ok(query)) =
                tokio::time::timeout(Duration::from_secs(10), read_framed(&mut s)).await
            {
                let Some(answer) = r.answer(&query, true).await else {
                    break;
                };
                let Ok(len) = u16::try_from(answer.len()) else {
                    break;
                };
                if s.write_all(&len.to_be_bytes()).await.is_err()
                    || s.write_all(&answer).await.is_err()
                {
                    break;
                }
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::{Name, RecordType};
    use serde_json::json;

    fn query(name: &str) -> Vec<u8> {
        let mut m = Message::new();
        m.set_id(7)
            .set_message_type(MessageType::Query)
            .set_recursion_desired(true);
        m.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        m.to_vec().expect("encode")
    }

    fn resolver(policy: serde_json::Value) -> Arc<Resolver> {
        let policy: FirewallPolicy = serde_json::from_value(policy).expect("policy");
        // Nothing listens there: an allowed name gets SERVFAIL, quickly.
        Resolver::new("none", "127.0.0.1:9".parse().expect("addr"), &policy)
    }

    /// An upstream that holds the first `n` queries, then answers them all
    /// (A = 192.0.2.<i+1> for `q<i>.batch.test`), and later ones at once.
    async fn held_upstream(n: usize) -> SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind upstream");
        let addr = sock.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            let mut buf = vec![0u8; 4096];
            while let Ok((len, peer)) = sock.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..len]) else {
                    continue;
                };
                held.push((q, peer));
                if held.len() < n {
                    continue;
                }
                for (q, peer) in held.drain(..) {
                    let name = q.queries()[0].name().clone();
                    let i: u8 = name.to_ascii()[1..]
                        .split('.')
                        .next()
                        .and_then(|i| i.parse().ok())
                        .unwrap_or(0);
                    let mut r = Message::new();
                    r.set_id(q.id()).set_message_type(MessageType::Response);
                    r.add_queries(q.queries().to_vec());
                    r.add_answer(hickory_proto::rr::Record::from_rdata(
                        name,
                        60,
                        RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(192, 0, 2, i + 1))),
                    ));
                    let _ = sock.send_to(&r.to_vec().expect("encode"), peer).await;
                }
            }
        });
        addr
    }

    /// Many answers matching an fqdn rule: few nft runs, and every address
    /// is in the rule's set (real nft, in a namespace of this test) by the
    /// time its answer is released.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fqdn_set_updates_are_batched() {
        const N: usize = 200;
        let ns = format!("fvu-dns-{}", std::process::id());
        assert!(
            netns::add(&ns, || Ok(())).await.expect("netns"),
            "{ns} exists"
        );
        let policy: FirewallPolicy = serde_json::from_value(json!({"egress": {"rules": [
            {"kind": "fqdn", "value": "*.batch.test", "action": "allow"}]}}))
        .expect("policy");
        let loaded = netns::nft(Some(&ns), &nft::render(&policy, &[], &[])).await;
        let r = Resolver::new(&ns, held_upstream(N).await, &policy);
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..N {
            let r = r.clone();
            tasks.spawn(async move {
                let answer = r.answer(&query(&format!("q{i}.batch.test.")), false).await;
                let ns = r.netns.clone();
                // The address is in the set when the answer is released.
                let set = netns::output(
                    Some(&ns),
                    "nft",
                    &["list", "set", "inet", "fastvm", "fq0_4"],
                )
                .await;
                (
                    answer,
                    set.map(|s| {
                        String::from_utf8_lossy(&s).contains(&format!("192.0.2.{} ", i + 1))
                    }),
                )
            });
        }
        let mut results = Vec::new();
        while let Some(res) = tasks.join_next().await {
            results.push(res.expect("task"));
        }
        let runs = r.set_update_runs();
        eprintln!("{N} answers matching an fqdn rule: {runs} nft runs");
        r.stop();
        netns::del(&ns);
        loaded.expect("load ruleset");
        for (answer, in_set) in results {
            assert_eq!(code(answer), ResponseCode::NoError);
            assert!(
                in_set.expect("list set"),
                "address missing from the set at answer time"
            );
        }
        // At most MAX_BATCH updates per run: at least ceil(N / 64) = 4 runs.
        assert!(
            (4..=N / 10).contains(&usize::try_from(runs).unwrap_or(usize::MAX)),
            "{runs} nft runs for {N} answers"
        );
    }

    fn code(answer: Option<Vec<u8>>) -> ResponseCode {
        Message::from_vec(&answer.expect("an answer"))
            .expect("parse")
            .response_code()
    }

    #[tokio::test]
    async fn gate_allow_mode_and_wildcards() {
        let r = resolver(json!({"dns": {"mode": "allow", "domains": ["*.ok.test", "exact.test"]}}));
        assert_eq!(
            code(r.answer(&query("blocked.test."), false).await),
            ResponseCode::NXDomain
        );
        assert_eq!(
            code(r.answer(&query("ok.test."), false).await),
            ResponseCode::NXDomain,
            "apex is not matched by *."
        );
        assert_ne!(
            code(r.answer(&query("a.b.ok.test."), false).await),
            ResponseCode::NXDomain
        );
        assert_ne!(
            code(r.answer(&query("EXACT.test."), false).await),
            ResponseCode::NXDomain
        );
    }

    #[tokio::test]
    async fn gate_deny_mode() {
        let r = resolver(json!({"dns": {"mode": "deny", "domains": ["bad.test"]}}));
        assert_eq!(
            code(r.answer(&query("bad.test."), false).await),
            ResponseCode::NXDomain
        );
        assert_eq!(
            code(r.answer(&query("good.test."), false).await),
            ResponseCode::ServFail
        );
    }

    #[tokio::test]
    async fn garbage_is_dropped_not_fatal() {
        let r = resolver(json!({}));
        for junk in [&b""[..], &b"\x00"[..], &[0xffu8; 12][..], &[0u8; 600][..]] {
            let _ = r.answer(junk, false).await;
        }
        let mut truncated = query("x.test.");
        truncated.truncate(truncated.len() - 3);
        assert!(r.answer(&truncated, false).await.is_none());
    }
}
