//! Service host names: `<name>--<vmIdHex>.proxy.<domain>[:port]`.

use fastvm_types::service::validate_service_name;
use fastvm_types::VmId;

/// What a Host header names.
#[derive(Debug, PartialEq, Eq)]
pub enum Target {
    /// Service `name` of VM `vm`.
    Service { vm: VmId, name: String },
    /// A well-formed host outside `proxy.<domain>`, or a label that is not
    /// `<name>--<32 hex>`: no such service.
    NotAService(String),
}

/// Why a Host header cannot be routed at all.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the request has no Host header")]
    Missing,
    #[error("the Host header is not a valid host name")]
    Malformed,
}

/// Parse `host` (a Host header or an `:authority`, port allowed) against
/// the proxy domain `domain` (lowercase, no leading dot).
pub fn parse(host: Option<&str>, domain: &str) -> Result<Target, HostError> {
    let host = host.ok_or(HostError::Missing)?.trim();
    let name = strip_port(host)
        .ok_or(HostError::Malformed)?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if name.is_empty()
        || name.len() > 253
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(HostError::Malformed);
    }
    let suffix = format!(".proxy.{domain}");
    let Some(label) = name.strip_suffix(&suffix) else {
        return Ok(Target::NotAService(name));
    };
    let Some((service, hex)) = label.split_once("--") else {
        return Ok(Target::NotAService(name));
    };
    let is_hex = hex.len() == 32
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if !is_hex || validate_service_name(service).is_err() {
        return Ok(Target::NotAService(name));
    }
    match hex.parse::<VmId>() {
        Ok(vm) => Ok(Target::Service {
            vm,
            name: service.to_owned(),
        }),
        Err(_) => Ok(Target::NotAService(name)),
    }
}

/// `host[:port]` without its port; `None` for a bracketed IPv6 literal or a
/// bad port.
fn strip_port(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        return None;
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.parse::<u16>().is_ok() => Some(h),
        Some(_) => None,
        None => Some(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM: &str = "0b9c7a3e1d2f4c5b8a9e0f1e2d3c4b5a";

    #[test]
    fn service_hosts() {
        let vm: VmId = VM.parse().expect("uuid");
        for host in [
            format!("web--{VM}.proxy.localhost:8081"),
            format!("web--{VM}.proxy.localhost"),
            format!("WEB--{}.Proxy.LocalHost.", VM.to_uppercase()),
        ] {
            assert_eq!(
                parse(Some(&host), "localhost"),
                Ok(Target::Service {
                    vm,
                    name: "web".into()
                }),
                "{host}"
            );
        }
        assert_eq!(
            parse(
                Some(&format!("api-v2--{VM}.proxy.example.com")),
                "example.com"
            ),
            Ok(Target::Service {
                vm,
                name: "api-v2".into()
            })
        );
    }

    #[test]
    fn not_services() {
        for host in [
            "localhost:8081".to_owned(),
            format!("web--{VM}.proxy.example.com"),
            format!("web-{VM}.proxy.localhost"),
            format!("web--{}.proxy.localhost", &VM[1..]),
            format!("web--{VM}x.proxy.localhost"),
            format!("-web--{VM}.proxy.localhost"),
            format!("a.web--{VM}.proxy.localhost"),
            format!("web--{VM}--x.proxy.localhost"),
            format!("--{VM}.proxy.localhost"),
        ] {
            assert!(
                matches!(parse(Some(&host), "localhost"), Ok(Target::NotAService(_))),
                "{host}"
            );
        }
    }

    #[test]
    fn malformed() {
        assert_eq!(parse(None, "localhost"), Err(HostError::Missing));
        for host in [
            "",
            "a b",
            "web:99999",
            "[::1]:8081",
            "x/y",
            "é.proxy.localhost",
            "a:b:c",
        ] {
            assert_eq!(
                parse(Some(host), "localhost"),
                Err(HostError::Malformed),
                "{host:?}"
            );
        }
        assert_eq!(
            parse(Some(&"a".repeat(300)), "localhost"),
            Err(HostError::Malformed)
        );
    }
}
