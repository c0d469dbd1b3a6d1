//! Addressing of one VM's network: a slot number maps to every name and
//! address, so a slot recorded in `net.json` is all re-adoption needs.
//!
//! ```text
//!  slot i, IPv4 pool P (default 10.200.0.0/16), block B = P + 8*i (a /29):
//!    B+1  gateway on tap0 (netns)     B+2  guest eth0        (B/30 on the tap)
//!    B+5  fvh-<i> (host side veth)    B+6  veth0 (netns)     (B+4/30 on the veth)
//!  IPv6 prefix Q (default fd00:fa57::/64), block C = Q + ((i+1) << 16):
//!    C+1 gateway, C+2 guest = publicIpv6 (C/126);  C+5 host veth, C+6 netns veth
//! ```

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Prefix of every network namespace the worker creates (`fvm-<slot hex>`).
pub const NETNS_PREFIX: &str = "fvm-";
/// Prefix of the host side of every VM veth pair (`fvh-<slot hex>`).
pub const HOST_VETH_PREFIX: &str = "fvh-";
/// The tap device QEMU opens, inside the VM's namespace.
pub const TAP: &str = "tap0";
/// The namespace side of the veth pair.
pub const NS_VETH: &str = "veth0";

/// Everything about one VM's network that follows from its slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addressing {
    pub slot: u32,
    pub netns: String,
    pub host_veth: String,
    pub mac: String,
    pub gateway4: Ipv4Addr,
    pub guest4: Ipv4Addr,
    pub host_veth4: Ipv4Addr,
    pub ns_veth4: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    pub guest6: Ipv6Addr,
    pub host_veth6: Ipv6Addr,
    pub ns_veth6: Ipv6Addr,
}

/// Number of VM slots in `pool` (one /29 each).
pub fn slots(pool: Ipv4Net) -> u32 {
    let bits = 32u32.saturating_sub(u32::from(pool.prefix_len()));
    if bits < 3 {
        0
    } else {
        1u32.checked_shl(bits - 3).unwrap_or(u32::MAX).min(1 << 16)
    }
}

/// The namespace name of `slot`.
pub fn netns_name(slot: u32) -> String {
    format!("{NETNS_PREFIX}{slot:04x}")
}

/// The slot of a namespace or host veth name of ours.
pub fn parse_slot(name: &str) -> Option<u32> {
    let hex = name
        .strip_prefix(NETNS_PREFIX)
        .or_else(|| name.strip_prefix(HOST_VETH_PREFIX))?;
    if hex.len() != 4 {
        return None;
    }
    u32::from_str_radix(hex, 16).ok()
}

/// A locally administered unicast MAC derived from the VM id.
pub fn mac_for(vm_id: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(vm_id.as_bytes());
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        h[0], h[1], h[2], h[3], h[4]
    )
}

impl Addressing {
    pub fn new(slot: u32, vm_id: &str, pool: Ipv4Net, prefix6: Ipv6Net) -> Addressing {
        let b = u32::from(pool.network()).wrapping_add(slot.wrapping_mul(8));
        let v4 = |n: u32| Ipv4Addr::from(b.wrapping_add(n));
        let c = u128::from(prefix6.network()).wrapping_add(u128::from(slot + 1) << 16);
        let v6 = |n: u128| Ipv6Addr::from(c.wrapping_add(n));
        Addressing {
            slot,
            netns: netns_name(slot),
            host_veth: format!("{HOST_VETH_PREFIX}{slot:04x}"),
            mac: mac_for(vm_id),
            gateway4: v4(1),
            guest4: v4(2),
            host_veth4: v4(5),
            ns_veth4: v4(6),
            gateway6: v6(1),
            guest6: v6(2),
            host_veth6: v6(5),
            ns_veth6: v6(6),
        }
    }

    /// The guest's IPv4 subnet on the tap (a /30).
    pub fn guest_net4(&self) -> Ipv4Net {
        Ipv4Net::new(self.gateway4, 30)
            .map(|n| n.trunc())
            .unwrap_or_default()
    }

    /// The guest's IPv6 subnet on the tap (a /126).
    pub fn guest_net6(&self) -> Ipv6Net {
        Ipv6Net::new(self.gateway6, 126)
            .map(|n| n.trunc())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_map_to_disjoint_blocks() {
        let pool: Ipv4Net = "10.200.0.0/16".parse().expect("pool");
        let prefix: Ipv6Net = "fd00:fa57::/64".parse().expect("prefix");
        assert_eq!(slots(pool), 8192);
        let a = Addressing::new(0, "a", pool, prefix);
        let b = Addressing::new(1, "b", pool, prefix);
        assert_eq!(a.guest4.to_string(), "10.200.0.2");
        assert_eq!(b.gateway4.to_string(), "10.200.0.9");
        assert_eq!(a.guest6.to_string(), "fd00:fa57::1:2");
        assert_eq!(b.guest6.to_string(), "fd00:fa57::2:2");
        assert_eq!(a.guest_net4().to_string(), "10.200.0.0/30");
        assert_eq!(a.netns, "fvm-0000");
        assert_eq!(parse_slot("fvh-00ff"), Some(255));
        assert_ne!(a.mac, b.mac);
        assert!(a.mac.starts_with("02:"));
    }
}
