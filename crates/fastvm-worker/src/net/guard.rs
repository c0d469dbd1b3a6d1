//! The network guard: what a guest can never reach or forge, whatever its
//! firewall policy says. Rendered here, loaded by [`super::Network`].
//!
//! ```text
//!  VM namespace (loaded with the user ruleset, same `nft -f -` transaction):
//!   table netdev fastvm_guard      anti-spoofing, on every frame the guest sends
//!     chain tap_ingress (hook ingress device tap0, policy drop)
//!       ether saddr != <VM MAC> drop
//!       ARP: sender MAC = VM MAC, sender IP = guest IPv4 (or 0.0.0.0)  accept
//!       IPv4: saddr = guest IPv4                                       accept
//!       IPv6: saddr = guest IPv6, :: or fe80::/10 (never forwarded)    accept
//!       anything else (other source, other ethertype): policy drop
//!   table inet fastvm_guard
//!     set deny4 / deny6  169.254.0.0/16, fe80::/10, fd00:ec2::254, loopback, the VM pool
//!                        and prefix (other VMs) and the operator's deny list
//!     chain input   (hook, priority filter - 10)  from tap0: DNS to the
//!                   resolver (gateway IPv4, port 53), the volume NFS server
//!                   (gateway IPv4, TCP 2049) and ICMP; the rest refused
//!     chain forward (hook, priority filter - 10)  from tap0, new connections:
//!                   the exposed host endpoints pass (to the user firewall),
//!                   daddr in deny4/deny6 refused
//!  host namespace (once per host, `Network::open`):
//!   table inet fastvm_guard
//!     chain input   from fvh-*: established/related, neighbour discovery and
//!                   the exposed worker endpoints (sets exposed4/exposed6);
//!                   the rest refused (every host address, any interface)
//!     chain forward fvh-* -> fvh-*: refused (VM to VM through the host)
//! ```
//!
//! Why a user rule cannot open it: a packet passes a netfilter hook only if
//! every base chain registered there accepts it. `accept` ends one base chain
//! (it is not final), `drop`/`reject` are. The guard lives in tables of its
//! own, which user policies never render into, so the guard's refusals hold
//! whatever the user table `inet fastvm` accepts; the priority (before the
//! user's chains) only spares them work. Its own `accept`s only end the guard
//! chain: the user firewall still gets its say.
//!
//! Host addresses are guarded on the host's input path (traffic to the host
//! is not forwarded), by interface name, not by a list of addresses: an
//! address the host gains later is covered at once. The guest's link-local
//! IPv6 source is allowed as a class (it follows the MAC the interface had
//! when it came up, e.g. the golden snapshot's): link-local packets never
//! leave the tap's link, and the namespace accepts only DNS and ICMP.

use super::addr::{Addressing, HOST_VETH_PREFIX, TAP};
use crate::volumes::NFS_PORT;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};

/// Name of the guard tables (netdev and inet in a VM namespace, inet on the host).
pub const TABLE: &str = "fastvm_guard";

/// Operator-listed internal ranges denied by default: RFC 1918, CGNAT and ULA.
pub const DEFAULT_DENY_EGRESS: &[&str] = &[
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
    "fc00::/7",
];

/// Destinations denied whatever the operator lists: link-local (and the
/// cloud metadata services there), the AWS IPv6 metadata address, and
/// loopback (martian when forwarded anyway; stated, not assumed).
const ALWAYS_DENY: &[&str] = &[
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "127.0.0.0/8",
    "::1/128",
];

/// The default of [`GuardConfig::deny_egress`].
pub fn default_deny_egress() -> Vec<IpNet> {
    DEFAULT_DENY_EGRESS
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Worker endpoints on the host that guests may reach (features add theirs
/// here, e.g. a bucket-mount server); everything else on the host is refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuardExceptions {
    /// TCP endpoints (host address and port) open to every guest.
    pub host_tcp: Vec<SocketAddr>,
}

/// What the guard denies besides the fixed ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardConfig {
    /// Internal ranges guests may not reach (`fastvm serve --deny-egress-cidr`).
    pub deny_egress: Vec<IpNet>,
    pub exceptions: GuardExceptions,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            deny_egress: default_deny_egress(),
            exceptions: GuardExceptions::default(),
        }
    }
}

/// The deny sets of a VM: fixed ranges, the VM pool and prefix, the
/// operator's list; merged (nft refuses overlapping interval elements).
fn deny_sets(cfg: &GuardConfig, pool: Ipv4Net, prefix: Ipv6Net) -> (Vec<Ipv4Net>, Vec<Ipv6Net>) {
    let mut v4 = vec![pool.trunc()];
    let mut v6 = vec![prefix.trunc()];
    let fixed = ALWAYS_DENY.iter().filter_map(|s| s.parse::<IpNet>().ok());
    for net in fixed.chain(cfg.deny_egress.iter().copied()) {
        match net.trunc() {
            IpNet::V4(n) => v4.push(n),
            IpNet::V6(n) => v6.push(n),
        }
    }
    (Ipv4Net::aggregate(&v4), Ipv6Net::aggregate(&v6))
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The guard of one VM namespace: recreated atomically (meant to be
/// prepended to the user ruleset, so both load in one transaction).
pub fn render_vm(a: &Addressing, cfg: &GuardConfig, pool: Ipv4Net, prefix: Ipv6Net) -> String {
    let (deny4, deny6) = deny_sets(cfg, pool, prefix);
    let mut out = String::new();
    for family in ["netdev", "inet"] {
        let _ = writeln!(
            out,
            "table {family} {TABLE} {{}}\ndelete table {family} {TABLE}"
        );
    }
    let _ = writeln!(
        out,
        "table netdev {TABLE} {{\n  chain tap_ingress {{\n    \
         type filter hook ingress device \"{TAP}\" priority -500; policy drop;\n    \
         ether saddr != {mac} drop\n    \
         arp saddr ether {mac} arp saddr ip {{ 0.0.0.0, {g4} }} accept\n    \
         ip saddr {g4} accept\n    \
         ip6 saddr {{ ::, fe80::/10, {g6} }} accept\n  }}\n}}",
        mac = a.mac,
        g4 = a.guest4,
        g6 = a.guest6,
    );
    let _ = writeln!(
        out,
        "table inet {TABLE} {{\n  \
         set deny4 {{ type ipv4_addr; flags interval; elements = {{ {} }}; }}\n  \
         set deny6 {{ type ipv6_addr; flags interval; elements = {{ {} }}; }}\n  \
         chain refuse {{\n    meta l4proto tcp reject with tcp reset\n    reject with icmpx type admin-prohibited\n  }}\n  \
         chain input {{\n    type filter hook input priority filter - 10; policy accept;\n    \
         iifname != \"{TAP}\" accept\n    ct state established,related accept\n    \
         ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 accept\n    \
         ip daddr {gw} tcp dport {NFS_PORT} accept\n    \
         meta l4proto {{ icmp, ipv6-icmp }} accept\n    goto refuse\n  }}\n  \
         chain forward {{\n    type filter hook forward priority filter - 10; policy accept;\n    \
         iifname != \"{TAP}\" accept\n    ct state established,related accept\n{exposed}    \
         ip daddr @deny4 goto refuse\n    ip6 daddr @deny6 goto refuse\n  }}\n}}",
        join(&deny4),
        join(&deny6),
        gw = a.gateway4,
        exposed = exposed_rules(&cfg.exceptions),
    );
    out
}

/// Forward rules letting the exposed host endpoints past the deny sets (a
/// host address may be in them, e.g. an RFC 1918 uplink); the host's own
/// guard admits exactly these on its input.
fn exposed_rules(exceptions: &GuardExceptions) -> String {
    let mut out = String::new();
    for ep in &exceptions.host_tcp {
        let family = if ep.is_ipv4() { "ip" } else { "ip6" };
        let _ = writeln!(
            out,
            "    {family} daddr {} tcp dport {} accept",
            ep.ip(),
            ep.port()
        );
    }
    out
}

/// The host-wide guard, recreated atomically: the last runtime opened on a
/// host sets its exceptions (one worker per host in production; every
/// runtime renders the same rules otherwise).
pub fn render_host(exceptions: &GuardExceptions) -> String {
    let vh = format!("{HOST_VETH_PREFIX}*");
    let mut out = format!(
        "table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n  \
         set exposed4 {{ type ipv4_addr . inet_service; }}\n  \
         set exposed6 {{ type ipv6_addr . inet_service; }}\n  \
         chain refuse {{ }}\n  \
         chain input {{ type filter hook input priority filter - 10; policy accept; }}\n  \
         chain forward {{ type filter hook forward priority filter - 10; policy accept; }}\n}}\n"
    );
    for rule in [
        "refuse meta l4proto tcp reject with tcp reset".to_owned(),
        "refuse reject with icmpx type admin-prohibited".to_owned(),
        format!("input iifname != \"{vh}\" accept"),
        "input ct state established,related accept".to_owned(),
        "input icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } ip6 hoplimit 255 accept"
            .to_owned(),
        "input ip daddr . tcp dport @exposed4 accept".to_owned(),
        "input ip6 daddr . tcp dport @exposed6 accept".to_owned(),
        "input goto refuse".to_owned(),
        format!("forward iifname \"{vh}\" oifname \"{vh}\" goto refuse"),
    ] {
        let _ = writeln!(out, "add rule inet {TABLE} {rule}");
    }
    for ep in &exceptions.host_tcp {
        let set = match ep.ip() {
            IpAddr::V4(_) => "exposed4",
            IpAddr::V6(_) => "exposed6",
        };
        let _ = writeln!(
            out,
            "add element inet {TABLE} {set} {{ {} . {} }}",
            ep.ip(),
            ep.port()
        );
    }
    out
}

/// Parse `fastvm serve --deny-egress-cidr` values: none given = the default
/// list, `none` alone = an empty list, otherwise the CIDRs given.
pub fn parse_deny_egress(values: &[String]) -> Result<Vec<IpNet>, String> {
    if values.is_empty() {
        return Ok(default_deny_egress());
    }
    if values.iter().any(|v| v.eq_ignore_ascii_case("none")) {
        if values.len() > 1 {
            return Err("--deny-egress-cidr none cannot be combined with CIDRs".into());
        }
        return Ok(Vec::new());
    }
    values
        .iter()
        .map(|v| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    format!(
                        "--deny-egress-cidr {v:?}: not a CIDR (e.g. 10.0.0.0/8, fc00::/7) or none"
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addressing() -> (Addressing, Ipv4Net, Ipv6Net) {
        let pool: Ipv4Net = "10.200.0.0/16".parse().expect("pool");
        let prefix: Ipv6Net = "fd00:fa57::/64".parse().expect("prefix");
        (Addressing::new(3, "vm-a", pool, prefix), pool, prefix)
    }

    #[test]
    fn vm_guard_pins_sources_and_denies_internal_ranges() {
        let (a, pool, prefix) = addressing();
        let s = render_vm(&a, &GuardConfig::default(), pool, prefix);
        assert!(s.contains(&format!("ether saddr != {} drop", a.mac)), "{s}");
        assert!(s.contains("ip saddr 10.200.0.26 accept"), "{s}");
        assert!(
            s.contains("ip6 saddr { ::, fe80::/10, fd00:fa57::4:2 } accept"),
            "{s}"
        );
        assert!(s.contains("policy drop"), "{s}");
        // Pool and 10/8 merge; the VM prefix and fd00:ec2::254 fall in fc00::/7.
        assert!(
            s.contains("elements = { 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16 }"),
            "{s}"
        );
        assert!(
            s.contains("elements = { ::1/128, fc00::/7, fe80::/10 }"),
            "{s}"
        );
        assert!(
            s.contains("ip daddr 10.200.0.25 meta l4proto { tcp, udp } th dport 53 accept"),
            "{s}"
        );
        // The volume NFS server on the gateway is the only TCP port open to the guest.
        let nfs = "ip daddr 10.200.0.25 tcp dport 2049 accept";
        assert!(s.contains(nfs), "{s}");
        assert!(
            !s.replace(nfs, "").contains("tcp dport"),
            "no exposed endpoint: {s}"
        );
        // Narrowed: the fixed ranges and the VM pool/prefix stay. Exposed
        // endpoints pass before the deny sets.
        let narrow = GuardConfig {
            deny_egress: vec!["172.16.0.0/12".parse().expect("net")],
            exceptions: GuardExceptions {
                host_tcp: vec!["10.0.0.5:9000".parse().expect("ep")],
            },
        };
        let s = render_vm(&a, &narrow, pool, prefix);
        assert!(
            s.contains("elements = { 10.200.0.0/16, 127.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12 }"),
            "{s}"
        );
        assert!(
            s.contains("elements = { ::1/128, fd00:ec2::254/128, fd00:fa57::/64, fe80::/10 }"),
            "{s}"
        );
        assert!(
            s.contains("ip daddr 10.0.0.5 tcp dport 9000 accept\n    ip daddr @deny4 goto refuse"),
            "{s}"
        );
    }

    /// The rendered guard loads in a real namespace (with its tap), twice
    /// (a reload replaces it), with the user ruleset in the same transaction.
    #[tokio::test]
    async fn vm_guard_loads_into_nft() {
        let (a, pool, prefix) = addressing();
        let ns = format!("fvu-guard-{}", std::process::id());
        assert!(
            super::super::netns::add(&ns, || super::super::netns::create_tap(TAP))
                .await
                .expect("netns"),
            "{ns} exists"
        );
        let mut script = render_vm(&a, &GuardConfig::default(), pool, prefix);
        script.push_str(&super::super::nft::render(&Default::default(), &[], &[]));
        let first = super::super::netns::nft(Some(&ns), &script).await;
        let second = super::super::netns::nft(Some(&ns), &script).await;
        let listed = super::super::netns::output(Some(&ns), "nft", &["list", "ruleset"]).await;
        super::super::netns::del(&ns);
        first.expect("load");
        second.expect("reload");
        let listed = String::from_utf8(listed.expect("list")).expect("utf-8");
        assert_eq!(
            listed.matches("table netdev fastvm_guard").count(),
            1,
            "{listed}"
        );
        assert!(listed.contains("ip6 daddr @deny6 goto refuse"), "{listed}");
    }

    #[test]
    fn host_guard_refuses_all_but_exceptions() {
        let s = render_host(&GuardExceptions {
            host_tcp: vec!["192.0.2.1:9000".parse().expect("ep")],
        });
        assert!(s.contains("add rule inet fastvm_guard input iifname != \"fvh-*\" accept"));
        assert!(s.contains("add rule inet fastvm_guard input goto refuse"));
        assert!(s.contains("add element inet fastvm_guard exposed4 { 192.0.2.1 . 9000 }"));
        assert!(s.starts_with("table inet fastvm_guard {}\ndelete table inet fastvm_guard\n"));
    }

    #[test]
    fn deny_egress_flag_values() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parse_deny_egress(&[]).expect("default"),
            default_deny_egress()
        );
        assert_eq!(parse_deny_egress(&v(&["none"])).expect("none"), vec![]);
        assert_eq!(
            parse_deny_egress(&v(&["10.0.0.0/8", "fd00::1"])).expect("list"),
            vec![
                "10.0.0.0/8".parse::<IpNet>().expect("net"),
                "fd00::1/128".parse().expect("net")
            ]
        );
        assert!(parse_deny_egress(&v(&["none", "10.0.0.0/8"])).is_err());
        assert!(parse_deny_egress(&v(&["10.0.0.0/33"])).is_err());
    }
}
