//! Applying [`GuestConfig`]: hostname, VM-wide env vars, clock, entropy and
//! the network interface. Sent by the host after every (re)connect, which is
//! how a guest restored from a snapshot learns its own identity, addresses
//! and the current time.

use crate::netlink;
use crate::session::Shared;
use fastvm_agent_proto::{GuestConfig, NetworkConfig};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::DirBuilderExt;

pub(crate) async fn apply(shared: &Shared, cfg: GuestConfig) -> io::Result<()> {
    if let Some(net) = cfg.network.as_ref() {
        apply_network(net).await?;
    }
    apply_identity(shared, cfg)
}

/// The first interface that is not `lo` (virtio-net: `eth0` without udev).
fn guest_interface() -> io::Result<String> {
    let mut names: Vec<String> = std::fs::read_dir("/sys/class/net")?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "lo")
        .collect();
    names.sort();
    names
        .into_iter()
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no network interface"))
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `address/prefix` (a bare address is a host route's length, as `ip` takes it).
fn parse_cidr<A: std::str::FromStr>(s: &str, max: u8) -> Option<(A, u8)> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| *p <= max)?),
        None => (s, max),
    };
    Some((addr.parse().ok()?, prefix))
}

fn invalid(field: &str, value: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("invalid network field {field}: {value:?}"),
    )
}

/// Parse and check every field before anything is changed.
fn parse_network(net: &NetworkConfig) -> io::Result<(netlink::Addressing, Vec<IpAddr>)> {
    let mac = parse_mac(&net.mac).ok_or_else(|| invalid("mac", &net.mac))?;
    let ipv4 = parse_cidr::<Ipv4Addr>(&net.ipv4, 32).ok_or_else(|| invalid("ipv4", &net.ipv4))?;
    let gateway4: Ipv4Addr = net
        .gateway4
        .parse()
        .map_err(|_| invalid("gateway4", &net.gateway4))?;
    let ipv6 = match net.ipv6.as_deref() {
        Some(s) => Some(parse_cidr::<Ipv6Addr>(s, 128).ok_or_else(|| invalid("ipv6", s))?),
        None => None,
    };
    let gateway6 = match net.gateway6.as_deref() {
        Some(s) => Some(s.parse::<Ipv6Addr>().map_err(|_| invalid("gateway6", s))?),
        None => None,
    };
    let dns = net
        .dns
        .iter()
        .map(|s| s.parse::<IpAddr>().map_err(|_| invalid("dns", s)))
        .collect::<io::Result<Vec<_>>>()?;
    let addressing = netlink::Addressing {
        mac,
        ipv4,
        gateway4,
        ipv6,
        gateway6,
    };
    Ok((addressing, dns))
}

/// Set the MAC, replace the global addresses and default routes (netlink,
/// see [`netlink::configure`]) and point `/etc/resolv.conf` at the VM's
/// resolver only.
async fn apply_network(net: &NetworkConfig) -> io::Result<()> {
    let (addressing, dns) = parse_network(net)?;
    let dev = guest_interface()?;
    // No SLAAC, router advertisements or DAD: the host assigns everything.
    for (key, value) in [("accept_ra", "0"), ("autoconf", "0"), ("accept_dad", "0")] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/{key}"), value);
    }
    // A MAC change waits for the device (virtio control queue): off the session loop.
    let ifname = dev.clone();
    tokio::task::spawn_blocking(move || netlink::configure(&ifname, &addressing))
        .await
        .map_err(|e| io::Error::other(format!("network task: {e}")))?
        .map_err(|e| io::Error::new(e.kind(), format!("network of {dev}: {e}")))?;
    write_resolv_conf(&dns);
    Ok(())
}

/// `mkdir -p /etc` (0755): a minimal image may have none.
fn ensure_etc() -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create("/etc")
}

/// Best effort: an image may have no /etc, a read-only or odd /etc (a
/// dangling symlink for resolv.conf). The network itself is up either way.
fn write_resolv_conf(dns: &[IpAddr]) {
    let resolv: String = dns.iter().map(|s| format!("nameserver {s}\n")).collect();
    let done = ensure_etc().and_then(|()| {
        // A symlink (systemd-resolved's stub) is replaced, never followed.
        let _ = std::fs::remove_file("/etc/resolv.conf");
        std::fs::write("/etc/resolv.conf", resolv)
    });
    if let Err(e) = done {
        crate::log(&format!("cannot write /etc/resolv.conf: {e}"));
    }
}

fn apply_identity(shared: &Shared, cfg: GuestConfig) -> io::Result<()> {
    if let Some(name) = cfg.hostname.as_deref() {
        set_hostname(name)?;
    }
    if let Ok(mut env) = shared.env.write() {
        *env = cfg.env;
    }
    if let Ok(mut defaults) = shared.exec_defaults.write() {
        *defaults = cfg.exec_defaults;
    }
    if let Some(ns) = cfg.time_unix_ns {
        set_clock(ns)?;
    }
    if !cfg.entropy.is_empty() {
        reseed_rng(&cfg.entropy)?;
    }
    Ok(())
}

/// Mix host entropy into the pool and force the CRNG to reseed from it, so
/// that clones restored from one snapshot stop sharing random streams.
fn reseed_rng(entropy: &[u8]) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    f.write_all(entropy)?;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
                                                 // SAFETY: an argument-less ioctl on a valid fd.
    let ret = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if ret != 0 {
        crate::log(&format!(
            "RNDRESEEDCRNG failed: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn set_hostname(name: &str) -> io::Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid hostname {name:?}"),
        ));
    }
    // SAFETY: the pointer and length describe a valid byte buffer.
    let ret = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = ensure_etc();
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    let hosts = format!(
        "127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    );
    let _ = std::fs::write("/etc/hosts", hosts);
    Ok(())
}

fn set_clock(unix_ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (unix_ns / 1_000_000_000) as _,
        tv_nsec: (unix_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: ts is a valid timespec.
    let ret = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> NetworkConfig {
        NetworkConfig {
            mac: "02:00:0a:c8:00:02".into(),
            ipv4: "10.200.0.2/30".into(),
            gateway4: "10.200.0.1".into(),
            ipv6: Some("fd00:fa57::2/126".into()),
            gateway6: Some("fd00:fa57::1".into()),
            dns: vec!["10.200.0.1".into(), "fd00:fa57::1".into()],
        }
    }

    #[test]
    fn a_full_config_parses() {
        let (a, dns) = parse_network(&net()).expect("parse");
        assert_eq!(a.mac, [2, 0, 0x0a, 0xc8, 0, 2]);
        assert_eq!(a.ipv4, (Ipv4Addr::new(10, 200, 0, 2), 30));
        assert_eq!(a.gateway4, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(
            a.ipv6,
            Some(("fd00:fa57::2".parse().expect("must succeed"), 126))
        );
        assert_eq!(
            a.gateway6,
            Some("fd00:fa57::1".parse().expect("must succeed"))
        );
        assert_eq!(dns.len(), 2);
    }

    #[test]
    fn bare_addresses_are_host_prefixes() {
        assert_eq!(
            parse_cidr::<Ipv4Addr>("10.0.0.1", 32),
            Some((Ipv4Addr::new(10, 0, 0, 1), 32))
        );
        assert_eq!(
            parse_cidr::<Ipv6Addr>("fd00::1", 128),
            Some(("fd00::1".parse().expect("must succeed"), 128))
        );
    }

    #[test]
    fn bad_fields_are_named() {
        type Mutate = fn(&mut NetworkConfig);
        let cases: Vec<(Mutate, &str)> = vec![
            (|n| n.mac = "02:00:00:00:00".into(), "mac"),
            (|n| n.mac = "02:00:00:00:00:01:02".into(), "mac"),
            (|n| n.mac = "02:00:00:00:00:zz".into(), "mac"),
            (|n| n.mac = "2:00:00:00:00:01".into(), "mac"),
            (|n| n.ipv4 = "10.200.0.2/33".into(), "ipv4"),
            (|n| n.ipv4 = "fd00::2/64".into(), "ipv4"),
            (|n| n.ipv4 = "10.200.0.2/30\nlink del eth0".into(), "ipv4"),
            (|n| n.gateway4 = "".into(), "gateway4"),
            (|n| n.ipv6 = Some("fd00::2/129".into()), "ipv6"),
            (|n| n.ipv6 = Some("10.0.0.1/8".into()), "ipv6"),
            (|n| n.gateway6 = Some("10.0.0.1".into()), "gateway6"),
            (|n| n.dns = vec!["resolver.example".into()], "dns"),
        ];
        for (mutate, field) in cases {
            let mut n = net();
            mutate(&mut n);
            let e = parse_network(&n).expect_err(field);
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(
                e.to_string()
                    .starts_with(&format!("invalid network field {field}:")),
                "{e}"
            );
        }
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("AA:bb:00:11:22:ff"),
            Some([0xaa, 0xbb, 0, 0x11, 0x22, 0xff])
        );
        assert_eq!(parse_mac(""), None);
        assert_eq!(parse_mac("aa:bb:00:11:22:+f"), None);
    }
}
