//! Firewall policy of a VM: three independent axes.
//!
//! ```text
//!   guest ──DNS query──▶ [dns gate: mode + domains] ──NXDOMAIN if blocked
//!     │                          │ resolved IPs of fqdn rules feed nft sets
//!     └──packet──▶ [egress: rules in order, then defaultAction] ──▶ outside
//!   outside ──packet──▶ [ingress: rules in order, then defaultAction] ──▶ guest
//! ```
//!
//! Every block is optional on the wire; [`FirewallPolicy::normalized`] fills the
//! safe defaults (ingress deny, egress allow, dns mode=deny with no domains, so
//! everything resolves). `PUT /firewall` replaces the policy; `PATCH /firewall`
//! replaces only the blocks it carries ([`FirewallPolicy::merge_patch`]).
//! [`FirewallPolicy::validate`] enforces the spec's rules, including rejecting fqdn
//! egress rules the dns gate makes dead.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::common::{codes, show, ValidationError};

/// Allow/deny verb: a direction's default posture and each rule's action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    /// Let the traffic through.
    Allow,
    /// Drop the traffic.
    Deny,
}

/// L4 protocol a rule matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP only.
    Tcp,
    /// UDP only.
    Udp,
    /// Any protocol; `ports` must then be `any`.
    #[default]
    Any,
}

/// Ingress rule kind. Only `cidr`: inbound packets carry no domain to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IngressRuleKind {
    /// Match by source IP/CIDR.
    Cidr,
}

/// Egress rule kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EgressRuleKind {
    /// Match by destination IP/CIDR.
    Cidr,
    /// Match by destination domain (optional leading `*.` wildcard), resolved
    /// through the in-process DNS resolver into a per-rule nft set.
    Fqdn,
}

/// Meaning of `dns.domains`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[schema(as = DNSMode)]
pub enum DnsMode {
    /// Allowlist: only listed domains resolve; others return NXDOMAIN.
    Allow,
    /// Blocklist: listed domains return NXDOMAIN; everything else resolves.
    #[default]
    Deny,
}

fn default_ports() -> String {
    "any".to_string()
}

/// One ingress rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressRule {
    /// Always `cidr`.
    pub kind: IngressRuleKind,
    /// Source CIDR (e.g. `::/0`, `10.0.0.0/8`); IPv4 and IPv6 accepted.
    pub value: String,
    /// `tcp`, `udp` or `any` (default `any`).
    #[serde(default)]
    pub protocol: Protocol,
    /// Single port (`443`), inclusive range (`8080-8090`), or `any` (default).
    /// Must be `any` when protocol is `any`.
    #[serde(default = "default_ports")]
    pub ports: String,
    /// What to do with matching packets.
    pub action: PolicyAction,
    /// Free-form note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// One egress rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    /// `cidr` or `fqdn`.
    pub kind: EgressRuleKind,
    /// For `cidr`, an IPv4 or IPv6 CIDR; for `fqdn`, a domain with an optional
    /// leading `*.` wildcard, reachable through the dns gate.
    pub value: String,
    /// `tcp`, `udp` or `any` (default `any`).
    #[serde(default)]
    pub protocol: Protocol,
    /// Single port (`443`), inclusive range (`8080-8090`), or `any` (default).
    /// Must be `any` when protocol is `any`.
    #[serde(default = "default_ports")]
    pub ports: String,
    /// What to do with matching packets.
    pub action: PolicyAction,
    /// Free-form note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Inbound posture: rules are checked in order, then `defaultAction` applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IngressPolicy {
    /// Action for packets no rule matched (default `deny`).
    #[serde(default = "deny")]
    pub default_action: PolicyAction,
    /// Ordered rules (default none).
    #[serde(default)]
    pub rules: Vec<IngressRule>,
}

/// Outbound posture: rules are checked in order, then `defaultAction` applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressPolicy {
    /// Action for packets no rule matched (default `allow`).
    #[serde(default = "allow")]
    pub default_action: PolicyAction,
    /// Ordered rules (default none).
    #[serde(default)]
    pub rules: Vec<EgressRule>,
}

fn deny() -> PolicyAction {
    PolicyAction::Deny
}

fn allow() -> PolicyAction {
    PolicyAction::Allow
}

impl Default for IngressPolicy {
    /// Deny all inbound traffic.
    fn default() -> Self {
        Self {
            default_action: PolicyAction::Deny,
            rules: Vec::new(),
        }
    }
}

impl Default for EgressPolicy {
    /// Allow all outbound traffic.
    fn default() -> Self {
        Self {
            default_action: PolicyAction::Allow,
            rules: Vec::new(),
        }
    }
}

/// DNS-layer filtering, applied before L4 enforcement. All fields optional.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schema(as = DNSPolicy)]
pub struct DnsPolicy {
    /// `allow` (allowlist) or `deny` (blocklist, default).
    #[serde(default)]
    pub mode: DnsMode,
    /// Domains with an optional leading `*.` wildcard (default none).
    #[serde(default)]
    pub domains: Vec<String>,
    /// When true, deny DoT (TCP 853) and known public DoH endpoints so guests
    /// cannot bypass the resolver (default false).
    #[serde(default)]
    pub block_bypass: bool,
}

/// Top-level firewall policy. Every block is optional; missing blocks mean the
/// safe default (see [`FirewallPolicy::normalized`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FirewallPolicy {
    /// Inbound policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<IngressPolicy>,
    /// Outbound policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressPolicy>,
    /// DNS gate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<DnsPolicy>,
}

impl FirewallPolicy {
    /// The policy with every missing block replaced by its safe default: ingress
    /// deny with no rules, egress allow with no rules, dns mode=deny with no
    /// domains and blockBypass false.
    pub fn normalized(&self) -> FirewallPolicy {
        FirewallPolicy {
            ingress: Some(self.ingress.clone().unwrap_or_default()),
            egress: Some(self.egress.clone().unwrap_or_default()),
            dns: Some(self.dns.clone().unwrap_or_default()),
        }
    }

    /// The policy of a `PATCH /firewall`: each block present in `patch` replaces
    /// the current one, each absent block keeps the current one. The result is
    /// normalized; validate it (dead-rule checks span blocks).
    pub fn merge_patch(&self, patch: FirewallPolicy) -> FirewallPolicy {
        FirewallPolicy {
            ingress: patch.ingress.or_else(|| self.ingress.clone()),
            egress: patch.egress.or_else(|| self.egress.clone()),
            dns: patch.dns.or_else(|| self.dns.clone()),
        }
        .normalized()
    }

    /// The enforced view: this policy (normalized) plus one ingress allow rule
    /// per registered service (`::/0`, tcp, its port), described as
    /// `auto: proxy service <name>`. Auto-rules come before the user's rules.
    pub fn with_service_rules<'a>(
        &self,
        services: impl IntoIterator<Item = (&'a str, u16)>,
    ) -> FirewallPolicy {
        let mut effective = self.normalized();
        if let Some(ingress) = effective.ingress.as_mut() {
            let auto: Vec<IngressRule> = services
                .into_iter()
                .map(|(name, port)| IngressRule {
                    kind: IngressRuleKind::Cidr,
                    value: "::/0".to_string(),
                    protocol: Protocol::Tcp,
                    ports: port.to_string(),
                    action: PolicyAction::Allow,
                    description: Some(format!("auto: proxy service {name}")),
                })
                .collect();
            ingress.rules.splice(0..0, auto);
        }
        effective
    }

    /// Checks every rule of the spec: CIDRs parse, ports parse (and are `any`
    /// when protocol is `any`), fqdn values and dns domains are valid names with
    /// at most a leading `*.` wildcard, and no fqdn egress rule is dead under the
    /// dns gate (code `DEAD_FQDN_RULE`). Missing blocks count as their defaults.
    pub fn validate(&self) -> Result<(), ValidationError> {
        let p = self.normalized();
        let ingress = p.ingress.unwrap_or_default();
        let egress = p.egress.unwrap_or_default();
        let dns = p.dns.unwrap_or_default();

        for (i, rule) in ingress.rules.iter().enumerate() {
            let at = format!("ingress.rules[{i}]");
            parse_cidr(&rule.value).map_err(|e| at_rule(&at, e))?;
            check_ports(rule.protocol, &rule.ports).map_err(|e| at_rule(&at, e))?;
        }
        for (i, domain) in dns.domains.iter().enumerate() {
            validate_domain_pattern(domain).map_err(|msg| {
                ValidationError::new(
                    codes::INVALID_FIREWALL,
                    format!("dns.domains[{i}] {}: {msg}", show(domain)),
                )
            })?;
        }
        for (i, rule) in egress.rules.iter().enumerate() {
            let at = format!("egress.rules[{i}]");
            match rule.kind {
                EgressRuleKind::Cidr => {
                    parse_cidr(&rule.value).map_err(|e| at_rule(&at, e))?;
                }
                EgressRuleKind::Fqdn => {
                    validate_domain_pattern(&rule.value).map_err(|msg| {
                        ValidationError::new(
                            codes::INVALID_FIREWALL,
                            format!("{at}.value {}: {msg}", show(&rule.value)),
                        )
                    })?;
                    check_not_dead(&at, &rule.value, &dns)?;
                }
            }
            check_ports(rule.protocol, &rule.ports).map_err(|e| at_rule(&at, e))?;
        }
        Ok(())
    }
}

fn at_rule(at: &str, e: ValidationError) -> ValidationError {
    ValidationError::new(e.code, format!("{at}.{}", e.message))
}

/// An fqdn rule is dead when the dns gate lets none of its names resolve:
/// in allow mode, no listed domain shares a name with it; in deny mode, one
/// listed domain blocks every name it matches.
fn check_not_dead(at: &str, value: &str, dns: &DnsPolicy) -> Result<(), ValidationError> {
    match dns.mode {
        DnsMode::Allow => {
            if !dns.domains.iter().any(|d| patterns_overlap(d, value)) {
                return Err(ValidationError::new(
                    codes::DEAD_FQDN_RULE,
                    format!(
                        "{at}.value {} can never match: dns.mode is allow and no entry of dns.domains \
                         lets it resolve; add it to dns.domains or remove the rule",
                        show(value)
                    ),
                ));
            }
        }
        DnsMode::Deny => {
            if let Some(d) = dns.domains.iter().find(|d| pattern_covers(d, value)) {
                return Err(ValidationError::new(
                    codes::DEAD_FQDN_RULE,
                    format!(
                        "{at}.value {} can never match: dns.mode is deny and dns.domains entry {} \
                         blocks it; remove that entry or the rule",
                        show(value),
                        show(d)
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Parses a rule's CIDR value (`10.0.0.0/8`, `::/0`). A prefix is required:
/// write `a.b.c.d/32` or `x::y/128` for one host.
pub fn parse_cidr(value: &str) -> Result<IpNet, ValidationError> {
    IpNet::from_str(value).map_err(|_| {
        ValidationError::new(
            codes::INVALID_CIDR,
            format!(
                "value {} is not an IPv4 or IPv6 CIDR; write it like 10.0.0.0/8 or 2001:db8::/32 \
                 (use /32 or /128 for one host)",
                show(value)
            ),
        )
    })
}

/// Ports a rule matches: `any`, one port, or an inclusive range `low-high` with
/// `1 <= low <= high <= 65535`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ports {
    /// Every port.
    Any,
    /// One port.
    Single(u16),
    /// Inclusive range `low..=high`.
    Range(u16, u16),
}

impl Ports {
    /// Parses the wire form (`any`, `443`, `8080-8090`).
    pub fn parse(s: &str) -> Result<Ports, ValidationError> {
        let err = || {
            ValidationError::new(
                codes::INVALID_PORTS,
                format!(
                    "ports {} is invalid; use a port (443), an inclusive range (8080-8090) \
                     with ports in 1-65535 and low <= high, or any",
                    show(s)
                ),
            )
        };
        let port = |p: &str| -> Result<u16, ValidationError> {
            if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(err());
            }
            match p.parse::<u16>() {
                Ok(n) if n >= 1 => Ok(n),
                _ => Err(err()),
            }
        };
        if s == "any" {
            return Ok(Ports::Any);
        }
        match s.split_once('-') {
            None => Ok(Ports::Single(port(s)?)),
            Some((lo, hi)) => {
                let (lo, hi) = (port(lo)?, port(hi)?);
                if lo > hi {
                    return Err(err());
                }
                Ok(Ports::Range(lo, hi))
            }
        }
    }

    /// True when `port` is matched.
    pub fn contains(&self, port: u16) -> bool {
        match *self {
            Ports::Any => true,
            Ports::Single(p) => p == port,
            Ports::Range(lo, hi) => (lo..=hi).contains(&port),
        }
    }
}

impl FromStr for Ports {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ports::parse(s)
    }
}

impl fmt::Display for Ports {
    /// The wire form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::Any => f.write_str("any"),
            Ports::Single(p) => write!(f, "{p}"),
            Ports::Range(lo, hi) => write!(f, "{lo}-{hi}"),
        }
    }
}

fn check_ports(protocol: Protocol, ports: &str) -> Result<Ports, ValidationError> {
    let parsed = Ports::parse(ports)?;
    if protocol == Protocol::Any && parsed != Ports::Any {
        return Err(ValidationError::new(
            codes::INVALID_PORTS,
            format!(
                "ports is {} but protocol is any; set ports to any or pick protocol tcp or udp",
                show(ports)
            ),
        ));
    }
    Ok(parsed)
}

impl IngressRule {
    /// The parsed `ports` (call after [`FirewallPolicy::validate`]).
    pub fn parsed_ports(&self) -> Result<Ports, ValidationError> {
        Ports::parse(&self.ports)
    }
}

impl EgressRule {
    /// The parsed `ports` (call after [`FirewallPolicy::validate`]).
    pub fn parsed_ports(&self) -> Result<Ports, ValidationError> {
        Ports::parse(&self.ports)
    }
}

/// Lowercases and drops one trailing dot.
fn canonical(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// Checks an fqdn rule value or dns domain: an optional leading `*.`, then a
/// DNS name of letters, digits and hyphens (labels 1-63 bytes, no leading or
/// trailing hyphen, at most 253 bytes), one trailing dot tolerated. Bare and
/// non-leading wildcards and IP addresses are rejected. Returns what is wrong.
pub fn validate_domain_pattern(pattern: &str) -> Result<(), String> {
    let body = pattern.strip_suffix('.').unwrap_or(pattern);
    let name = body.strip_prefix("*.").unwrap_or(body);
    if body == "*" || (body.starts_with("*.") && name.is_empty()) {
        return Err("a bare wildcard matches everything; name a suffix like *.example.com".into());
    }
    if name.contains('*') {
        return Err(
            "a wildcard is only allowed as the whole leftmost label (*.example.com)".into(),
        );
    }
    if name.is_empty() {
        return Err("the domain is empty".into());
    }
    if name.parse::<IpAddr>().is_ok() {
        return Err("this is an IP address; use a rule of kind cidr".into());
    }
    if name.len() > 253 {
        return Err("the domain is longer than 253 bytes".into());
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("every label must be 1-63 characters (no empty labels)".into());
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err("labels may only hold letters, digits and hyphens".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("labels may not start or end with a hyphen".into());
        }
    }
    Ok(())
}

/// True when DNS `name` is matched by `pattern`. An exact pattern matches the
/// same name; `*.suffix` matches one or more labels left of `suffix` and never
/// `suffix` itself. Case-insensitive; one trailing dot on either side ignored.
pub fn domain_matches(pattern: &str, name: &str) -> bool {
    let pattern = canonical(pattern);
    let name = canonical(name);
    match pattern.strip_prefix("*.") {
        None => pattern == name,
        Some(suffix) => match name.strip_suffix(suffix) {
            Some(prefix) => prefix.strip_suffix('.').is_some_and(|labels| {
                !labels.is_empty() && labels.split('.').all(|l| !l.is_empty())
            }),
            None => false,
        },
    }
}

/// True when every name matched by `rule` is also matched by `pattern`.
fn pattern_covers(pattern: &str, rule: &str) -> bool {
    let (p, r) = (canonical(pattern), canonical(rule));
    match (p.strip_prefix("*."), r.strip_prefix("*.")) {
        (_, None) => domain_matches(&p, &r),
        (None, Some(_)) => false,
        (Some(ps), Some(rs)) => ps == rs || domain_matches(&p, rs),
    }
}

/// True when some name is matched by both `a` and `b`.
fn patterns_overlap(a: &str, b: &str) -> bool {
    let (a, b) = (canonical(a), canonical(b));
    match (a.strip_prefix("*."), b.strip_prefix("*.")) {
        (None, None) => a == b,
        (Some(_), None) => domain_matches(&a, &b),
        (None, Some(_)) => domain_matches(&b, &a),
        (Some(sa), Some(sb)) => sa == sb || domain_matches(&a, sb) || domain_matches(&b, sa),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn egress_fqdn(value: &str) -> EgressRule {
        EgressRule {
            kind: EgressRuleKind::Fqdn,
            value: value.into(),
            protocol: Protocol::Tcp,
            ports: "443".into(),
            action: PolicyAction::Allow,
            description: None,
        }
    }

    fn ingress_cidr(value: &str, protocol: Protocol, ports: &str) -> IngressRule {
        IngressRule {
            kind: IngressRuleKind::Cidr,
            value: value.into(),
            protocol,
            ports: ports.into(),
            action: PolicyAction::Allow,
            description: None,
        }
    }

    fn with_dns(mode: DnsMode, domains: &[&str], rules: Vec<EgressRule>) -> FirewallPolicy {
        FirewallPolicy {
            ingress: None,
            egress: Some(EgressPolicy {
                default_action: PolicyAction::Deny,
                rules,
            }),
            dns: Some(DnsPolicy {
                mode,
                domains: domains.iter().map(|d| d.to_string()).collect(),
                block_bypass: false,
            }),
        }
    }

    fn code(p: &FirewallPolicy) -> Option<&'static str> {
        p.validate().err().map(|e| e.code)
    }

    #[test]
    fn empty_policy_normalizes_to_safe_defaults() -> Result<(), serde_json::Error> {
        let p: FirewallPolicy = serde_json::from_value(json!({}))?;
        assert_eq!(
            serde_json::to_value(p.normalized())?,
            json!({
                "ingress": {"defaultAction": "deny", "rules": []},
                "egress": {"defaultAction": "allow", "rules": []},
                "dns": {"mode": "deny", "domains": [], "blockBypass": false}
            })
        );
        assert_eq!(p.validate(), Ok(()));
        Ok(())
    }

    #[test]
    fn partial_blocks_get_field_defaults() -> Result<(), serde_json::Error> {
        let p: FirewallPolicy = serde_json::from_value(
            json!({"ingress": {}, "egress": {"rules": []}, "dns": {"mode": "allow"}}),
        )?;
        let n = p.normalized();
        assert_eq!(n.ingress, Some(IngressPolicy::default()));
        assert_eq!(n.egress, Some(EgressPolicy::default()));
        assert_eq!(n.dns.map(|d| d.mode), Some(DnsMode::Allow));
        Ok(())
    }

    #[test]
    fn null_blocks_are_absent() -> Result<(), serde_json::Error> {
        let p: FirewallPolicy =
            serde_json::from_value(json!({"ingress": null, "egress": null, "dns": null}))?;
        assert_eq!(p, FirewallPolicy::default());
        Ok(())
    }

    #[test]
    fn rule_wire_names_and_defaults() -> Result<(), serde_json::Error> {
        let p: FirewallPolicy = serde_json::from_value(json!({
            "ingress": {"defaultAction": "deny", "rules": [
                {"kind": "cidr", "value": "::/0", "protocol": "tcp", "ports": "22", "action": "allow",
                 "description": "ssh"}
            ]},
            "egress": {"defaultAction": "deny", "rules": [
                {"kind": "fqdn", "value": "*.example.com", "action": "allow"}
            ]},
            "dns": {"mode": "deny", "domains": [], "blockBypass": true}
        }))?;
        let egress = p.egress.clone().unwrap_or_default();
        assert_eq!(egress.rules[0].protocol, Protocol::Any);
        assert_eq!(egress.rules[0].ports, "any");
        assert_eq!(p.validate(), Ok(()));
        let v = serde_json::to_value(&p)?;
        assert_eq!(v["dns"]["blockBypass"], json!(true));
        assert_eq!(v["ingress"]["rules"][0]["ports"], json!("22"));
        assert_eq!(v["egress"]["rules"][0]["kind"], json!("fqdn"));
        Ok(())
    }

    #[test]
    fn unknown_fields_and_values_rejected() {
        for bad in [
            json!({"mode": "open"}),
            json!({"ingress": {"defaultAction": "maybe"}}),
            json!({"ingress": {"rules": [{"kind": "fqdn", "value": "a.com", "action": "allow"}]}}),
            json!({"egress": {"rules": [{"kind": "cidr", "value": "::/0"}]}}),
            json!({"egress": {"rules": [{"kind": "cidr", "value": "::/0", "action": "allow", "protocol": "icmp"}]}}),
            json!({"dns": {"blockbypass": true}}),
        ] {
            assert!(
                serde_json::from_value::<FirewallPolicy>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn ports_parse() -> Result<(), ValidationError> {
        assert_eq!(Ports::parse("any")?, Ports::Any);
        assert_eq!(Ports::parse("1")?, Ports::Single(1));
        assert_eq!(Ports::parse("443")?, Ports::Single(443));
        assert_eq!(Ports::parse("65535")?, Ports::Single(65535));
        assert_eq!(Ports::parse("8080-8090")?, Ports::Range(8080, 8090));
        assert_eq!(Ports::parse("1-65535")?, Ports::Range(1, 65535));
        assert_eq!(Ports::parse("80-80")?, Ports::Range(80, 80));
        for bad in [
            "", "0", "65536", "99999", "-1", "+443", " 443", "443 ", "80-", "-80", "90-80", "0-10",
            "10-65536", "1-2-3", "ANY", "all", "80,443", "4 43", "0443443",
        ] {
            assert_eq!(
                Ports::parse(bad).err().map(|e| e.code),
                Some(codes::INVALID_PORTS),
                "{bad}"
            );
        }
        Ok(())
    }

    #[test]
    fn ports_display_round_trips_and_contains() -> Result<(), ValidationError> {
        for s in ["any", "22", "8080-8090"] {
            assert_eq!(Ports::parse(s)?.to_string(), s);
        }
        let r = Ports::Range(10, 20);
        assert!(r.contains(10) && r.contains(20) && !r.contains(9) && !r.contains(21));
        assert!(Ports::Any.contains(1));
        assert!(Ports::Single(5).contains(5) && !Ports::Single(5).contains(6));
        Ok(())
    }

    #[test]
    fn protocol_any_requires_ports_any() {
        let mut p = FirewallPolicy {
            ingress: Some(IngressPolicy {
                default_action: PolicyAction::Deny,
                rules: vec![ingress_cidr("10.0.0.0/8", Protocol::Any, "443")],
            }),
            ..Default::default()
        };
        let e = p.validate().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::INVALID_PORTS));
        assert!(e
            .map(|e| e.message)
            .unwrap_or_default()
            .starts_with("ingress.rules[0]"));
        p.ingress = Some(IngressPolicy {
            default_action: PolicyAction::Deny,
            rules: vec![
                ingress_cidr("10.0.0.0/8", Protocol::Any, "any"),
                ingress_cidr("10.0.0.0/8", Protocol::Tcp, "any"),
                ingress_cidr("10.0.0.0/8", Protocol::Udp, "53"),
            ],
        });
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn bad_ports_names_rule_index() {
        let p = FirewallPolicy {
            ingress: Some(IngressPolicy {
                default_action: PolicyAction::Deny,
                rules: vec![
                    ingress_cidr("10.0.0.0/8", Protocol::Tcp, "22"),
                    ingress_cidr("10.0.0.0/8", Protocol::Tcp, "70000"),
                ],
            }),
            ..Default::default()
        };
        let e = p.validate().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::INVALID_PORTS));
        assert!(e
            .map(|e| e.message)
            .unwrap_or_default()
            .starts_with("ingress.rules[1].ports"));
    }

    #[test]
    fn cidr_values() {
        for good in [
            "10.0.0.0/8",
            "0.0.0.0/0",
            "::/0",
            "2001:db8::/32",
            "192.168.1.1/32",
            "fe80::1/128",
            "10.1.2.3/8",
        ] {
            assert!(parse_cidr(good).is_ok(), "{good}");
        }
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "::/129",
            "example.com",
            "",
            "10.0.0/8",
            " 10.0.0.0/8",
            "10.0.0.0/8 ",
        ] {
            assert_eq!(
                parse_cidr(bad).err().map(|e| e.code),
                Some(codes::INVALID_CIDR),
                "{bad}"
            );
        }
        let p = FirewallPolicy {
            egress: Some(EgressPolicy {
                default_action: PolicyAction::Allow,
                rules: vec![EgressRule {
                    kind: EgressRuleKind::Cidr,
                    value: "1.2.3.4".into(),
                    protocol: Protocol::Any,
                    ports: "any".into(),
                    action: PolicyAction::Deny,
                    description: None,
                }],
            }),
            ..Default::default()
        };
        let e = p.validate().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::INVALID_CIDR));
        assert!(e
            .map(|e| e.message)
            .unwrap_or_default()
            .starts_with("egress.rules[0].value"));
    }

    #[test]
    fn domain_patterns() {
        for good in [
            "example.com",
            "*.example.com",
            "a.b-c.example.com",
            "EXAMPLE.com",
            "example.com.",
            "*.example.com.",
            "localhost",
            "*.com",
            "xn--bcher-kva.example",
            &format!("{}.com", "a".repeat(63)),
        ] {
            assert_eq!(validate_domain_pattern(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "*",
            "*.",
            ".",
            "**.example.com",
            "a.*.example.com",
            "*example.com",
            "example.*",
            "*.*.example.com",
            "-a.example.com",
            "a-.example.com",
            "a..example.com",
            ".example.com",
            "exa mple.com",
            "exa_mple.com",
            "1.2.3.4",
            "::1",
            "example.com..",
            &format!("{}.com", "a".repeat(64)),
            &format!("{}.com", vec!["a".repeat(60); 5].join(".")),
        ] {
            assert!(validate_domain_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wildcard_matching() {
        assert!(domain_matches("*.example.com", "a.example.com"));
        assert!(domain_matches("*.example.com", "a.b.example.com"));
        assert!(!domain_matches("*.example.com", "example.com"));
        assert!(!domain_matches("*.example.com", "badexample.com"));
        assert!(!domain_matches("*.example.com", "a.example.org"));
        assert!(!domain_matches("*.example.com", ".example.com"));
        assert!(domain_matches("*.Example.COM", "A.example.com"));
        assert!(domain_matches("*.example.com.", "a.example.com"));
        assert!(domain_matches("*.example.com", "a.example.com."));
        assert!(domain_matches("example.com", "EXAMPLE.com."));
        assert!(!domain_matches("example.com", "a.example.com"));
        assert!(!domain_matches("a.example.com", "example.com"));
    }

    #[test]
    fn dns_allow_mode_dead_rules() {
        // Covered exactly, by wildcard, or partly (wildcard rule, one listed name).
        for (domains, rule) in [
            (&["api.example.com"][..], "api.example.com"),
            (&["*.example.com"][..], "api.example.com"),
            (&["*.example.com"][..], "*.example.com"),
            (&["*.example.com"][..], "*.api.example.com"),
            (&["api.example.com"][..], "*.example.com"),
            (&["*.api.example.com"][..], "*.example.com"),
            (&["other.org", "API.Example.com."][..], "api.example.com"),
        ] {
            let p = with_dns(DnsMode::Allow, domains, vec![egress_fqdn(rule)]);
            assert_eq!(p.validate(), Ok(()), "{domains:?} {rule}");
        }
        for (domains, rule) in [
            (&[][..], "api.example.com"),
            (&["*.example.com"][..], "example.com"),
            (&["example.com"][..], "api.example.com"),
            (&["example.com"][..], "*.example.com"),
            (&["other.org"][..], "*.example.com"),
        ] {
            let p = with_dns(DnsMode::Allow, domains, vec![egress_fqdn(rule)]);
            assert_eq!(code(&p), Some(codes::DEAD_FQDN_RULE), "{domains:?} {rule}");
        }
    }

    #[test]
    fn dns_deny_mode_dead_rules() {
        for (domains, rule) in [
            (&["api.example.com"][..], "api.example.com"),
            (&["*.example.com"][..], "api.example.com"),
            (&["*.example.com"][..], "*.example.com"),
            (&["*.example.com"][..], "*.a.example.com"),
            (&["x.org", "API.EXAMPLE.COM"][..], "api.example.com."),
        ] {
            let p = with_dns(DnsMode::Deny, domains, vec![egress_fqdn(rule)]);
            assert_eq!(code(&p), Some(codes::DEAD_FQDN_RULE), "{domains:?} {rule}");
        }
        for (domains, rule) in [
            (&[][..], "api.example.com"),
            (&["*.example.com"][..], "example.com"),
            (&["api.example.com"][..], "*.example.com"),
            (&["example.com"][..], "*.example.com"),
            (&["*.a.example.com"][..], "*.example.com"),
        ] {
            let p = with_dns(DnsMode::Deny, domains, vec![egress_fqdn(rule)]);
            assert_eq!(p.validate(), Ok(()), "{domains:?} {rule}");
        }
    }

    #[test]
    fn dead_rule_message_names_rule_index() {
        let p = with_dns(
            DnsMode::Allow,
            &["a.com"],
            vec![egress_fqdn("a.com"), egress_fqdn("b.com")],
        );
        let e = p.validate().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::DEAD_FQDN_RULE));
        assert!(e
            .map(|e| e.message)
            .unwrap_or_default()
            .starts_with("egress.rules[1].value \"b.com\""));
    }

    #[test]
    fn missing_dns_block_means_resolve_everything() {
        let p = FirewallPolicy {
            egress: Some(EgressPolicy {
                default_action: PolicyAction::Deny,
                rules: vec![egress_fqdn("api.example.com")],
            }),
            ..Default::default()
        };
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn invalid_fqdn_and_dns_domain() {
        let p = with_dns(DnsMode::Deny, &[], vec![egress_fqdn("*")]);
        let e = p.validate().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::INVALID_FIREWALL));
        assert!(e
            .map(|e| e.message)
            .unwrap_or_default()
            .starts_with("egress.rules[0].value"));
        let p = with_dns(DnsMode::Deny, &["ok.com", "a.*.com"], vec![]);
        let e = p.validate().err();
        assert_eq!(e.as_ref().map(|e| e.code), Some(codes::INVALID_FIREWALL));
        assert!(e
            .map(|e| e.message)
            .unwrap_or_default()
            .starts_with("dns.domains[1]"));
    }

    #[test]
    fn merge_patch_replaces_given_blocks_only() {
        let current = with_dns(DnsMode::Allow, &["a.com"], vec![egress_fqdn("a.com")]);
        let patch = FirewallPolicy {
            ingress: Some(IngressPolicy {
                default_action: PolicyAction::Allow,
                rules: vec![],
            }),
            ..Default::default()
        };
        let merged = current.merge_patch(patch);
        assert_eq!(
            merged.ingress.map(|i| i.default_action),
            Some(PolicyAction::Allow)
        );
        assert_eq!(merged.egress, current.egress);
        assert_eq!(merged.dns, current.dns);

        // Replacing dns can make the kept egress rule dead: validate the merge.
        let patch = FirewallPolicy {
            dns: Some(DnsPolicy {
                mode: DnsMode::Allow,
                domains: vec!["b.com".into()],
                block_bypass: true,
            }),
            ..Default::default()
        };
        assert_eq!(
            code(&current.merge_patch(patch)),
            Some(codes::DEAD_FQDN_RULE)
        );

        // An empty patch keeps everything (normalized).
        assert_eq!(
            current.merge_patch(FirewallPolicy::default()),
            current.normalized()
        );
    }

    #[test]
    fn service_rules_are_prepended() {
        let user = FirewallPolicy {
            ingress: Some(IngressPolicy {
                default_action: PolicyAction::Deny,
                rules: vec![ingress_cidr("10.0.0.0/8", Protocol::Tcp, "22")],
            }),
            ..Default::default()
        };
        let eff = user.with_service_rules([("web", 8080)]);
        let rules = eff.ingress.map(|i| i.rules).unwrap_or_default();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].value, "::/0");
        assert_eq!(rules[0].ports, "8080");
        assert_eq!(rules[0].protocol, Protocol::Tcp);
        assert_eq!(
            rules[0].description.as_deref(),
            Some("auto: proxy service web")
        );
        assert_eq!(rules[1].ports, "22");
        assert!(eff.egress.is_some() && eff.dns.is_some());
    }
}
