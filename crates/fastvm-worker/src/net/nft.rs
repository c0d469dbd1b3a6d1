//! The VM's nftables ruleset, rendered from its [`FirewallPolicy`] and loaded
//! atomically (`nft -f -` in the VM's namespace, one transaction that deletes
//! and recreates table `inet fastvm`).
//!
//! ```text
//!  table inet fastvm
//!    set fq<i>_4 / fq<i>_6     one pair per fqdn egress rule i (flags timeout),
//!                              filled by the resolver with the answer's TTL
//!    set doh4 / doh6           known public DoH endpoints (blockBypass only)
//!    chain input   (hook)      guest -> netns: DNS to the resolver, the volume NFS server (TCP 2049) and ICMP only
//!    chain forward (hook, policy drop)
//!       ct established,related accept; invalid drop
//!       tap0 -> veth0: jump egress      veth0 -> tap0: jump ingress
//!    chain egress              DNS (53) to anything but the resolver: drop;
//!                              blockBypass: TCP 853 and DoH IPs: drop;
//!                              rules in order; defaultAction
//!    chain ingress             rules in order; defaultAction
//!    chain egress_deny         an egress deny: TCP reset / ICMP admin-prohibited
//! ```
//!
//! Ingress denies drop silently; egress denies reject, so a program in the
//! guest fails at once instead of waiting for a timeout.

use super::addr::{NS_VETH, TAP};
use crate::volumes::NFS_PORT;
use fastvm_types::firewall::{EgressRuleKind, FirewallPolicy, PolicyAction, Ports, Protocol};
use ipnet::IpNet;
use std::fmt::Write;
use std::net::IpAddr;

/// Well-known public DNS-over-HTTPS endpoints, dropped under `blockBypass`:
/// Cloudflare, Google, Quad9, OpenDNS, AdGuard, CleanBrowsing, NextDNS anycast.
pub const KNOWN_DOH: &[&str] = &[
    "1.1.1.1/32",
    "1.0.0.1/32",
    "2606:4700:4700::1111/128",
    "2606:4700:4700::1001/128",
    "8.8.8.8/32",
    "8.8.4.4/32",
    "2001:4860:4860::8888/128",
    "2001:4860:4860::8844/128",
    "9.9.9.9/32",
    "149.112.112.112/32",
    "2620:fe::fe/128",
    "2620:fe::9/128",
    "208.67.222.222/32",
    "208.67.220.220/32",
    "2620:119:35::35/128",
    "2620:119:53::53/128",
    "94.140.14.14/32",
    "94.140.15.15/32",
    "185.228.168.9/32",
    "185.228.169.9/32",
    "45.90.28.0/24",
    "45.90.30.0/24",
];

/// Name of the table in every VM namespace.
pub const TABLE: &str = "fastvm";

/// The names of the sets of fqdn egress rule `index`.
pub fn fqdn_sets(index: usize) -> (String, String) {
    (format!("fq{index}_4"), format!("fq{index}_6"))
}

/// An address the resolver saw for an fqdn rule, still valid for `ttl_secs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElement {
    pub rule: usize,
    pub ip: IpAddr,
    pub ttl_secs: u32,
}

fn l4(protocol: Protocol, ports: Ports, dir: &str) -> String {
    let proto = match protocol {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Any => return String::new(),
    };
    match ports {
        Ports::Any => format!(" meta l4proto {proto}"),
        Ports::Single(p) => format!(" {proto} {dir} {p}"),
        Ports::Range(lo, hi) => format!(" {proto} {dir} {lo}-{hi}"),
    }
}

fn cidr_match(value: &str, field: &str) -> Option<String> {
    let net: IpNet = value.parse().ok()?;
    Some(match net.trunc() {
        IpNet::V4(n) => format!("ip {field} {n}"),
        IpNet::V6(n) => format!("ip6 {field} {n}"),
    })
}

fn set_decl(out: &mut String, name: &str, v6: bool, flags: &str, elements: &[String]) {
    let ty = if v6 { "ipv6_addr" } else { "ipv4_addr" };
    let _ = write!(out, "  set {name} {{ type {ty}; flags {flags};");
    if !elements.is_empty() {
        let _ = write!(out, " elements = {{ {} }};", elements.join(", "));
    }
    out.push_str(" }\n");
}

/// The whole ruleset for `policy` (validated), with `known` resolver
/// answers put back into the fqdn sets and `extra_doh` added to the DoH sets.
pub fn render(policy: &FirewallPolicy, known: &[SetElement], extra_doh: &[IpNet]) -> String {
    let p = policy.normalized();
    let ingress = p.ingress.unwrap_or_default();
    let egress = p.egress.unwrap_or_default();
    let dns = p.dns.unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{"
    );

    if dns.block_bypass {
        let all: Vec<IpNet> = KNOWN_DOH
            .iter()
            .filter_map(|s| s.parse().ok())
            .chain(extra_doh.iter().copied())
            .collect();
        let v4: Vec<String> = all
            .iter()
            .filter(|n| matches!(n, IpNet::V4(_)))
            .map(|n| n.trunc().to_string())
            .collect();
        let v6: Vec<String> = all
            .iter()
            .filter(|n| matches!(n, IpNet::V6(_)))
            .map(|n| n.trunc().to_string())
            .collect();
        set_decl(&mut out, "doh4", false, "interval", &v4);
        set_decl(&mut out, "doh6", true, "interval", &v6);
    }
    for (i, rule) in egress.rules.iter().enumerate() {
        if rule.kind != EgressRuleKind::Fqdn {
            continue;
        }
        let (s4, s6) = fqdn_sets(i);
        let elems = |v6: bool| -> Vec<String> {
            let mut seen = std::collections::BTreeSet::new();
            known
                .iter()
                .filter(|e| {
                    e.rule == i && e.ip.is_ipv6() == v6 && e.ttl_secs > 0 && seen.insert(e.ip)
                })
                .map(|e| format!("{} timeout {}s", e.ip, e.ttl_secs))
                .collect()
        };
        set_decl(&mut out, &s4, false, "timeout", &elems(false));
        set_decl(&mut out, &s6, true, "timeout", &elems(true));
    }

    let _ = writeln!(
        out,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n    ct state established,related accept\n    \
         iifname \"{TAP}\" meta l4proto {{ tcp, udp }} th dport 53 accept\n    \
         iifname \"{TAP}\" tcp dport {NFS_PORT} accept\n    \
         iifname \"{TAP}\" meta l4proto {{ icmp, ipv6-icmp }} accept\n    iifname \"{TAP}\" drop\n    \
         iifname \"{NS_VETH}\" meta l4proto {{ icmp, ipv6-icmp }} accept\n    iifname \"{NS_VETH}\" drop\n  }}"
    );
    let _ = writeln!(
        out,
        "  chain forward {{\n    type filter hook forward priority filter; policy drop;\n    ct state established,related accept\n    \
         ct state invalid drop\n    iifname \"{TAP}\" oifname \"{NS_VETH}\" jump egress\n    \
         iifname \"{NS_VETH}\" oifname \"{TAP}\" jump ingress\n  }}"
    );
    out.push_str("  chain egress_deny {\n    meta l4proto tcp reject with tcp reset\n    reject with icmpx type admin-prohibited\n  }\n");

    // Egress.
    out.push_str("  chain egress {\n    meta l4proto { tcp, udp } th dport 53 drop\n");
    if dns.block_bypass {
        out.push_str("    tcp dport 853 drop\n    ip daddr @doh4 drop\n    ip6 daddr @doh6 drop\n");
    }
    let egress_verdict = |a: PolicyAction| match a {
        PolicyAction::Allow => "accept",
        PolicyAction::Deny => "goto egress_deny",
    };
    for (i, rule) in egress.rules.iter().enumerate() {
        let Ok(ports) = rule.parsed_ports() else {
            continue;
        };
        let l4 = l4(rule.protocol, ports, "dport");
        let verdict = egress_verdict(rule.action);
        match rule.kind {
            EgressRuleKind::Cidr => {
                if let Some(m) = cidr_match(&rule.value, "daddr") {
                    let _ = writeln!(out, "    {m}{l4} {verdict}");
                }
            }
            EgressRuleKind::Fqdn => {
                let (s4, s6) = fqdn_sets(i);
                let _ = writeln!(out, "    ip daddr @{s4}{l4} {verdict}");
                let _ = writeln!(out, "    ip6 daddr @{s6}{l4} {verdict}");
            }
        }
    }
    let _ = writeln!(out, "    {}\n  }}", egress_verdict(egress.default_action));

    // Ingress.
    out.push_str("  chain ingress {\n");
    let ingress_verdict = |a: PolicyAction| match a {
        PolicyAction::Allow => "accept",
        PolicyAction::Deny => "drop",
    };
    for rule in &ingress.rules {
        let Ok(ports) = rule.parsed_ports() else {
            continue;
        };
        if let Some(m) = cidr_match(&rule.value, "saddr") {
            let _ = writeln!(
                out,
                "    {m}{} {}",
                l4(rule.protocol, ports, "dport"),
                ingress_verdict(rule.action)
            );
        }
    }
    let _ = writeln!(out, "    {}\n  }}", ingress_verdict(ingress.default_action));
    out.push_str("}\n");
    out
}

/// Commands adding `ips` to the sets of fqdn rule `rule` for `ttl_secs`,
/// refreshing the timeout of elements already there (add, delete, add with
/// the timeout, in one transaction).
pub fn add_elements(rule: usize, ips: &[IpAddr], ttl_secs: u32) -> String {
    let (s4, s6) = fqdn_sets(rule);
    let mut out = String::new();
    for ip in ips {
        let set = if ip.is_ipv6() { &s6 } else { &s4 };
        let _ = writeln!(
            out,
            "add element inet {TABLE} {set} {{ {ip} }}\ndelete element inet {TABLE} {set} {{ {ip} }}\n\
             add element inet {TABLE} {set} {{ {ip} timeout {ttl_secs}s }}"
        );
    }
    out
}

/// The elements still held by the fqdn sets of a loaded table, from
/// `nft -j list sets inet` (each with the time it has left): what a
/// re-adopting worker carries into the ruleset it reloads.
pub fn loaded_set_elements(json: &[u8]) -> Vec<SetElement> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in doc["nftables"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let set = &item["set"];
        if set["table"].as_str() != Some(TABLE) {
            continue;
        }
        let Some(rule) = set["name"]
            .as_str()
            .and_then(|n| n.strip_prefix("fq"))
            .and_then(|n| n.split_once('_'))
            .and_then(|(i, _)| i.parse().ok())
        else {
            continue;
        };
        for e in set["elem"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let (Some(ip), Some(left)) = (
                e["elem"]["val"].as_str().and_then(|v| v.parse().ok()),
                e["elem"]["expires"].as_u64(),
            ) else {
                continue;
            };
            out.push(SetElement {
                rule,
                ip,
                ttl_secs: u32::try_from(left).unwrap_or(u32::MAX),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_rules_in_order_with_sets() {
        let policy: FirewallPolicy = serde_json::from_value(json!({
            "ingress": {"defaultAction": "deny", "rules": [
                {"kind": "cidr", "value": "2001:db8::1/64", "protocol": "tcp", "ports": "8080", "action": "allow"}]},
            "egress": {"defaultAction": "deny", "rules": [
                {"kind": "cidr", "value": "10.0.0.0/8", "protocol": "udp", "ports": "1000-2000", "action": "deny"},
                {"kind": "fqdn", "value": "*.example.com", "protocol": "tcp", "ports": "443", "action": "allow"}]},
            "dns": {"blockBypass": true}
        }))
        .expect("policy");
        let known = [SetElement {
            rule: 1,
            ip: "192.0.2.7".parse().expect("ip"),
            ttl_secs: 60,
        }];
        let s = render(&policy, &known, &[]);
        assert!(
            s.contains("ip6 saddr 2001:db8::/64 tcp dport 8080 accept"),
            "{s}"
        );
        assert!(
            s.contains("ip daddr 10.0.0.0/8 udp dport 1000-2000 goto egress_deny"),
            "{s}"
        );
        assert!(s.contains("set fq1_4 { type ipv4_addr; flags timeout; elements = { 192.0.2.7 timeout 60s }; }"), "{s}");
        assert!(s.contains("ip daddr @fq1_4 tcp dport 443 accept"), "{s}");
        assert!(s.contains("tcp dport 853 drop"), "{s}");
        assert!(s.contains("elements = { 1.1.1.1/32"), "{s}");
        let egress_end = s.find("  chain ingress").expect("ingress chain");
        let listed = br#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", "name": "fq3_4", "table": "fastvm",
            "type": "ipv4_addr", "flags": ["timeout"], "elem": [{"elem": {"val": "10.1.2.3", "timeout": 60, "expires": 59}}]}},
            {"set": {"family": "inet", "name": "doh4", "table": "fastvm", "elem": [{"prefix": {"addr": "1.1.1.1", "len": 32}}]}}]}"#;
        assert_eq!(
            loaded_set_elements(listed),
            vec![SetElement {
                rule: 3,
                ip: "10.1.2.3".parse().expect("ip"),
                ttl_secs: 59
            }]
        );
        assert!(
            s[..egress_end]
                .trim_end()
                .ends_with("goto egress_deny\n  }"),
            "{s}"
        );
    }
}
