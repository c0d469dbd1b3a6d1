//! Applying [`GuestConfig`]: hostname, VM-wide env vars, clock, entropy and
//! the network interface. Sent by the host after every (re)connect, which is
//! how a guest restored from a snapshot learns its own identity, addresses
//! and the current time.

use crate::session::Shared;
use fastvm_agent_proto::{GuestConfig, NetworkConfig};
use std::io::{self, Write};

pub(crate) async fn apply(shared: &Shared, cfg: GuestConfig) -> io::Result<()> {
    if let Some(net) = cfg.network.as_ref() {
        apply_network(shared, net).await?;
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

/// True for text that is safe on an `ip -batch` line (addresses, MACs).
fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() || b".:/".contains(&b))
}

/// Set the MAC, replace the global addresses and default routes (one
/// `ip -batch` run) and point `/etc/resolv.conf` at the VM's resolver only.
async fn apply_network(shared: &Shared, net: &NetworkConfig) -> io::Result<()> {
    let dev = guest_interface()?;
    let mut fields = vec![net.mac.as_str(), net.ipv4.as_str(), net.gateway4.as_str()];
    fields.extend(net.ipv6.as_deref());
    fields.extend(net.gateway6.as_deref());
    fields.extend(net.dns.iter().map(String::as_str));
    if let Some(bad) = fields.iter().find(|f| !plain(f)) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid network field {bad:?}"),
        ));
    }
    // No SLAAC, router advertisements or DAD: the host assigns everything.
    for (key, value) in [("accept_ra", "0"), ("autoconf", "0"), ("accept_dad", "0")] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/{key}"), value);
    }
    let mut batch = format!(
        "link set dev {dev} address {mac}\naddr flush dev {dev} scope global\naddr add {v4} dev {dev}\nlink set dev {dev} up\nroute replace default via {gw4} dev {dev}\n",
        mac = net.mac,
        v4 = net.ipv4,
        gw4 = net.gateway4
    );
    if let Some(v6) = net.ipv6.as_deref() {
        batch.push_str(&format!("addr add {v6} dev {dev} nodad\n"));
    }
    if let Some(gw6) = net.gateway6.as_deref() {
        batch.push_str(&format!("route replace default via {gw6} dev {dev}\n"));
    }
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["-batch", "-"])
        .env("PATH", crate::exec::DEFAULT_PATH)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let (mut child, status) = shared.reaper.spawn(&mut cmd)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(batch.as_bytes())?;
    }
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        use std::io::Read;
        let _ = (&mut stderr).take(4096).read_to_string(&mut err);
    }
    let status = status
        .await
        .map_err(|_| io::Error::other("ip: exit status lost"))?;
    if status != 0 {
        return Err(io::Error::other(format!(
            "ip -batch failed ({status}): {}",
            err.trim()
        )));
    }
    let resolv: String = net
        .dns
        .iter()
        .map(|s| format!("nameserver {s}\n"))
        .collect();
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write("/etc/resolv.conf", resolv)?;
    Ok(())
}

fn apply_identity(shared: &Shared, cfg: GuestConfig) -> io::Result<()> {
    if let Some(name) = cfg.hostname.as_deref() {
        set_hostname(name)?;
    }
    if let Ok(mut env) = shared.env.write() {
        *env = cfg.env;
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
