//! Applying [`GuestConfig`]: hostname, VM-wide env vars, clock, entropy.
//! Sent by the host after every (re)connect, which is how a guest restored
//! from a snapshot learns its own identity and the current time.

use crate::session::Shared;
use fastvm_agent_proto::GuestConfig;
use std::io::{self, Write};

pub(crate) fn apply(shared: &Shared, cfg: GuestConfig) -> io::Result<()> {
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
    let mut f = std::fs::OpenOptions::new().write(true).open("/dev/urandom")?;
    f.write_all(entropy)?;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
    // SAFETY: an argument-less ioctl on a valid fd.
    let ret = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if ret != 0 {
        crate::log(&format!("RNDRESEEDCRNG failed: {}", io::Error::last_os_error()));
    }
    Ok(())
}

fn set_hostname(name: &str) -> io::Result<()> {
    let valid = !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !valid {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("invalid hostname {name:?}")));
    }
    // SAFETY: the pointer and length describe a valid byte buffer.
    let ret = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
    let hosts = format!("127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
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
