//! A minimal rtnetlink client (a raw `NETLINK_ROUTE` socket), so the agent
//! configures the network itself: guest images need no `ip` (iproute2).
//!
//! ```text
//!  request = nlmsghdr | family header (ifinfomsg / ifaddrmsg / rtmsg) | rtattr*
//!  answer  = NLMSG_ERROR{error: 0 | -errno} (NLM_F_ACK), or for a dump:
//!            messages* .. NLMSG_DONE
//! ```
//!
//! Every request waits for its acknowledgement, so an error names the step
//! that failed and its errno. Numbers are the kernel's ABI
//! (`linux/netlink.h`, `linux/rtnetlink.h`, `linux/if_addr.h`,
//! `linux/if_link.h`), in native byte order; addresses in attributes are in
//! network order (their octets).

use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_ROOT: u16 = 0x100;
const NLM_F_MATCH: u16 = 0x200;
const NLM_F_DUMP: u16 = NLM_F_ROOT | NLM_F_MATCH;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;

const RTM_NEWLINK: u16 = 16;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const RTM_NEWROUTE: u16 = 24;

const IFLA_ADDRESS: u16 = 1;
const IFF_UP: u32 = 0x1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;

const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RT_TABLE_MAIN: u8 = 254;
/// What `ip route` uses by default ("route installed during boot").
const RTPROT_BOOT: u8 = 3;
pub(crate) const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

const AF_UNSPEC: u8 = libc::AF_UNSPEC as u8;
const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;

/// Largest answer we read at once (the kernel's dump chunks are smaller).
const RECV_BUF: usize = 64 << 10;
/// A kernel that does not answer within this is a bug; never hang PID 1 on it.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn family(addr: &IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn octets(addr: &IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// One netlink message under construction.
#[derive(Debug)]
pub(crate) struct Message {
    buf: Vec<u8>,
}

impl Message {
    /// Header (length and sequence number filled in by [`Message::finish`])
    /// followed by the family header `body`.
    fn new(kind: u16, flags: u16, body: &[u8]) -> Message {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_seq
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
        buf.extend_from_slice(body);
        buf.resize(align4(buf.len()), 0);
        Message { buf }
    }

    /// Append one attribute (`rtattr`), padded to 4 bytes.
    fn attr(mut self, kind: u16, data: &[u8]) -> Message {
        let len = 4 + data.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    /// The bytes to send, with length and sequence number.
    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// `struct ifinfomsg`.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0] = AF_UNSPEC;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// `struct ifaddrmsg`.
fn ifaddrmsg(family: u8, prefix: u8, flags: u8, scope: u8, index: u32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = family;
    b[1] = prefix;
    b[2] = flags;
    b[3] = scope;
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b
}

/// `struct rtmsg` of a unicast route in the main table.
fn rtmsg(family: u8, dst_len: u8) -> [u8; 12] {
    [
        family,
        dst_len,
        0, // src_len
        0, // tos
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
        0,
        0,
        0, // rtm_flags
    ]
}

/// `ip link set dev <index> address <mac>`.
pub(crate) fn set_address_msg(index: u32, mac: [u8; 6]) -> Message {
    Message::new(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        &ifinfomsg(index, 0, 0),
    )
    .attr(IFLA_ADDRESS, &mac)
}

/// `ip link set dev <index> up`.
pub(crate) fn link_up_msg(index: u32) -> Message {
    Message::new(
        RTM_NEWLINK,
        NLM_F_REQUEST | NLM_F_ACK,
        &ifinfomsg(index, IFF_UP, IFF_UP),
    )
}

/// `ip addr add <addr>/<prefix> dev <index> [nodad]`.
pub(crate) fn add_address_msg(index: u32, addr: IpAddr, prefix: u8, nodad: bool) -> Message {
    let flags = if nodad { IFA_F_NODAD } else { 0 };
    let bytes = octets(&addr);
    let msg = Message::new(
        RTM_NEWADDR,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        &ifaddrmsg(family(&addr), prefix, flags as u8, RT_SCOPE_UNIVERSE, index),
    )
    .attr(IFA_LOCAL, &bytes)
    .attr(IFA_ADDRESS, &bytes);
    if nodad {
        msg.attr(IFA_FLAGS, &flags.to_ne_bytes())
    } else {
        msg
    }
}

/// `ip route replace default via <gateway> dev <index>`.
pub(crate) fn default_route_msg(index: u32, gateway: IpAddr) -> Message {
    Message::new(
        RTM_NEWROUTE,
        NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        &rtmsg(family(&gateway), 0),
    )
    .attr(RTA_GATEWAY, &octets(&gateway))
    .attr(RTA_OIF, &index.to_ne_bytes())
}

/// One address of an interface, as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AddrEntry {
    pub(crate) family: u8,
    pub(crate) prefix: u8,
    pub(crate) scope: u8,
    pub(crate) index: u32,
    pub(crate) local: Option<Vec<u8>>,
    pub(crate) address: Option<Vec<u8>>,
}

impl AddrEntry {
    /// The request deleting this address (`ip addr del`).
    pub(crate) fn delete_msg(&self) -> Message {
        let mut msg = Message::new(
            RTM_DELADDR,
            NLM_F_REQUEST | NLM_F_ACK,
            &ifaddrmsg(self.family, self.prefix, 0, self.scope, self.index),
        );
        if let Some(local) = &self.local {
            msg = msg.attr(IFA_LOCAL, local);
        }
        if let Some(address) = &self.address {
            msg = msg.attr(IFA_ADDRESS, address);
        }
        msg
    }

    /// Printable address, for error messages.
    fn text(&self) -> String {
        let raw = self.local.as_ref().or(self.address.as_ref());
        match raw.map(Vec::as_slice) {
            Some(&[a, b, c, d]) => {
                format!("{}/{}", std::net::Ipv4Addr::new(a, b, c, d), self.prefix)
            }
            Some(b) if b.len() == 16 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(b);
                format!("{}/{}", std::net::Ipv6Addr::from(o), self.prefix)
            }
            _ => "?".to_owned(),
        }
    }
}

/// Split a buffer into (type, flags-less) messages: `(type, seq, payload)`.
/// Stops at a truncated or malformed header.
pub(crate) fn split_messages(buf: &[u8]) -> Vec<(u16, u32, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while buf.len() - at >= NLMSG_HDRLEN {
        let h = &buf[at..];
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        if len < NLMSG_HDRLEN || len > h.len() {
            break;
        }
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        out.push((kind, seq, &h[NLMSG_HDRLEN..len]));
        at += align4(len).min(buf.len() - at);
    }
    out
}

/// Attributes `(type, data)` of a message body after its family header.
pub(crate) fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff; // minus NLA_F_NESTED / NET_BYTEORDER
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        b = &b[align4(len).min(b.len())..];
    }
    out
}

/// Parse an `RTM_NEWADDR` payload (ifaddrmsg + attributes).
pub(crate) fn parse_addr(payload: &[u8]) -> Option<AddrEntry> {
    if payload.len() < 8 {
        return None;
    }
    let mut entry = AddrEntry {
        family: payload[0],
        prefix: payload[1],
        scope: payload[3],
        index: u32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]),
        local: None,
        address: None,
    };
    for (kind, data) in attributes(&payload[8..]) {
        match kind {
            IFA_LOCAL => entry.local = Some(data.to_vec()),
            IFA_ADDRESS => entry.address = Some(data.to_vec()),
            _ => {}
        }
    }
    Some(entry)
}

/// The errno of an `NLMSG_ERROR` payload: `Ok(())` for an acknowledgement.
pub(crate) fn parse_error(payload: &[u8]) -> io::Result<()> {
    if payload.len() < 4 {
        return Err(io::Error::other("netlink: short error message"));
    }
    let code = i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
    if code == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(code.saturating_neg()))
    }
}

/// A `NETLINK_ROUTE` socket.
pub(crate) struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    pub(crate) fn open() -> io::Result<Netlink> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("netlink socket: {e}")));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_nl is valid (pid 0: the kernel assigns one).
        let mut sa: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `sa` is a valid sockaddr_nl of the size given.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&sa as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if ret != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("netlink bind: {e}")));
        }
        let tv = libc::timeval {
            tv_sec: RECV_TIMEOUT.as_secs() as _,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval from a valid pointer.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Netlink { fd, seq: 0 })
    }

    fn send(&mut self, msg: Message) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let bytes = msg.finish(seq);
        // SAFETY: the buffer is valid for its length; the socket is bound and
        // an unconnected netlink socket sends to the kernel.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(seq)
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: the buffer is valid for its length. MSG_TRUNC: the
            // result is the datagram's real length, so truncation shows.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "netlink: no answer from the kernel",
                        ))
                    }
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n > buf.len() {
                return Err(io::Error::other(format!(
                    "netlink: answer of {n} bytes truncated"
                )));
            }
            return Ok(n);
        }
    }

    /// Send a request and wait for its acknowledgement.
    pub(crate) fn request(&mut self, msg: Message) -> io::Result<()> {
        let seq = self.send(msg)?;
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, s, payload) in split_messages(&buf[..n]) {
                if s == seq && kind == NLMSG_ERROR {
                    return parse_error(payload);
                }
            }
        }
    }

    /// Every address of every interface (`RTM_GETADDR` dump).
    pub(crate) fn addresses(&mut self) -> io::Result<Vec<AddrEntry>> {
        let req = Message::new(
            RTM_GETADDR,
            NLM_F_REQUEST | NLM_F_DUMP,
            &ifaddrmsg(AF_UNSPEC, 0, 0, 0, 0),
        );
        let seq = self.send(req)?;
        let mut buf = vec![0u8; RECV_BUF];
        let mut out = Vec::new();
        loop {
            let n = self.recv(&mut buf)?;
            for (kind, s, payload) in split_messages(&buf[..n]) {
                if s != seq {
                    continue;
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        parse_error(payload)?;
                        return Ok(out);
                    }
                    RTM_NEWADDR => out.extend(parse_addr(payload)),
                    _ => {}
                }
            }
        }
    }
}

/// Index of the interface `name`.
pub(crate) fn if_index(name: &str) -> io::Result<u32> {
    let c = std::ffi::CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: a valid C string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("interface {name}: {e}")));
    }
    Ok(index)
}

/// Prefix `what` to an error.
fn step<T>(what: &str, r: io::Result<T>) -> io::Result<T> {
    r.map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))
}

/// `ip link set dev <name> up`.
pub(crate) fn link_up(name: &str) -> io::Result<()> {
    let index = if_index(name)?;
    let mut nl = Netlink::open()?;
    step(&format!("set {name} up"), nl.request(link_up_msg(index)))
}

/// The addressing [`configure`] applies, already parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Addressing {
    pub(crate) mac: [u8; 6],
    pub(crate) ipv4: (std::net::Ipv4Addr, u8),
    pub(crate) gateway4: std::net::Ipv4Addr,
    pub(crate) ipv6: Option<(std::net::Ipv6Addr, u8)>,
    pub(crate) gateway6: Option<std::net::Ipv6Addr>,
}

/// What `ip -batch` did before: set the MAC, flush the global addresses (v4
/// and v6), add the IPv4 address, link up, default route, IPv6 address
/// (without DAD) and its default route. Each failure names its step.
pub(crate) fn configure(dev: &str, a: &Addressing) -> io::Result<()> {
    let index = if_index(dev)?;
    let mut nl = Netlink::open()?;
    let mac = a
        .mac
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    step(
        &format!("set the MAC of {dev} to {mac}"),
        nl.request(set_address_msg(index, a.mac)),
    )?;
    let addrs = step(&format!("list the addresses of {dev}"), nl.addresses())?;
    for entry in addrs
        .iter()
        .filter(|e| e.index == index && e.scope == RT_SCOPE_UNIVERSE)
    {
        match nl.request(entry.delete_msg()) {
            // Gone already (a primary's secondaries go with it).
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
            r => step(&format!("flush address {} of {dev}", entry.text()), r)?,
        }
    }
    let (v4, p4) = a.ipv4;
    step(
        &format!("add address {v4}/{p4} to {dev}"),
        nl.request(add_address_msg(index, IpAddr::V4(v4), p4, false)),
    )?;
    step(&format!("set {dev} up"), nl.request(link_up_msg(index)))?;
    step(
        &format!("replace the default route via {} dev {dev}", a.gateway4),
        nl.request(default_route_msg(index, IpAddr::V4(a.gateway4))),
    )?;
    if let Some((v6, p6)) = a.ipv6 {
        step(
            &format!("add address {v6}/{p6} to {dev}"),
            nl.request(add_address_msg(index, IpAddr::V6(v6), p6, true)),
        )?;
    }
    if let Some(gw6) = a.gateway6 {
        step(
            &format!("replace the default route via {gw6} dev {dev}"),
            nl.request(default_route_msg(index, IpAddr::V6(gw6))),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn set_address_encodes_ifinfomsg_and_a_padded_mac() {
        let b = set_address_msg(3, [2, 0, 0, 0, 0, 1]).finish(7);
        // 16 header + 16 ifinfomsg + rtattr(4 + 6, padded to 12).
        assert_eq!(b.len(), 44);
        assert_eq!(u32_at(&b, 0), 44);
        assert_eq!(u16_at(&b, 4), RTM_NEWLINK);
        assert_eq!(u16_at(&b, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&b, 8), 7);
        assert_eq!(u32_at(&b, 12), 0);
        assert_eq!(b[16], AF_UNSPEC);
        assert_eq!(u32_at(&b, 20), 3);
        assert_eq!((u32_at(&b, 24), u32_at(&b, 28)), (0, 0));
        assert_eq!(u16_at(&b, 32), 10);
        assert_eq!(u16_at(&b, 34), IFLA_ADDRESS);
        assert_eq!(&b[36..42], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&b[42..44], &[0, 0]);
    }

    #[test]
    fn link_up_sets_and_masks_iff_up() {
        let b = link_up_msg(2).finish(1);
        assert_eq!(b.len(), 32);
        assert_eq!(u32_at(&b, 20), 2);
        assert_eq!(u32_at(&b, 24), IFF_UP);
        assert_eq!(u32_at(&b, 28), IFF_UP);
    }

    #[test]
    fn ipv4_address_has_local_and_address() {
        let b = add_address_msg(2, IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2)), 30, false).finish(1);
        assert_eq!(
            u16_at(&b, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u16_at(&b, 4), RTM_NEWADDR);
        assert_eq!(&b[16..20], &[AF_INET, 30, 0, RT_SCOPE_UNIVERSE]);
        assert_eq!(u32_at(&b, 20), 2);
        let attrs = attributes(&b[24..]);
        assert_eq!(
            attrs,
            vec![
                (IFA_LOCAL, &[10u8, 200, 0, 2][..]),
                (IFA_ADDRESS, &[10u8, 200, 0, 2][..])
            ]
        );
        assert_eq!(b.len(), 24 + 8 + 8);
    }

    #[test]
    fn ipv6_address_without_dad() {
        let a: Ipv6Addr = "fd00::2".parse().expect("must succeed");
        let b = add_address_msg(2, IpAddr::V6(a), 126, true).finish(1);
        assert_eq!(&b[16..20], &[AF_INET6, 126, IFA_F_NODAD as u8, 0]);
        let attrs = attributes(&b[24..]);
        assert_eq!(attrs.len(), 3);
        assert_eq!(attrs[0], (IFA_LOCAL, &a.octets()[..]));
        assert_eq!(attrs[1], (IFA_ADDRESS, &a.octets()[..]));
        assert_eq!(attrs[2], (IFA_FLAGS, &IFA_F_NODAD.to_ne_bytes()[..]));
        assert_eq!(b.len(), 24 + 20 + 20 + 8);
    }

    #[test]
    fn default_route_replaces_in_the_main_table() {
        let b = default_route_msg(5, IpAddr::V4(Ipv4Addr::new(10, 200, 0, 1))).finish(9);
        assert_eq!(u16_at(&b, 4), RTM_NEWROUTE);
        assert_eq!(
            u16_at(&b, 6),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
        );
        assert_eq!(
            &b[16..28],
            &[
                AF_INET,
                0,
                0,
                0,
                RT_TABLE_MAIN,
                RTPROT_BOOT,
                0,
                RTN_UNICAST,
                0,
                0,
                0,
                0
            ]
        );
        let attrs = attributes(&b[28..]);
        assert_eq!(attrs[0], (RTA_GATEWAY, &[10u8, 200, 0, 1][..]));
        assert_eq!(attrs[1], (RTA_OIF, &5u32.to_ne_bytes()[..]));
        let gw6: Ipv6Addr = "fd00::1".parse().expect("must succeed");
        let b = default_route_msg(5, IpAddr::V6(gw6)).finish(9);
        assert_eq!(b[16], AF_INET6);
        assert_eq!(attributes(&b[28..])[0], (RTA_GATEWAY, &gw6.octets()[..]));
    }

    #[test]
    fn dumped_address_round_trips_into_its_delete() {
        let add = add_address_msg(4, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)), 24, false).finish(3);
        let msgs = split_messages(&add);
        assert_eq!(msgs.len(), 1);
        let (kind, seq, payload) = msgs[0];
        assert_eq!((kind, seq), (RTM_NEWADDR, 3));
        let entry = parse_addr(payload).expect("parse");
        assert_eq!(entry.index, 4);
        assert_eq!(entry.prefix, 24);
        assert_eq!(entry.scope, RT_SCOPE_UNIVERSE);
        assert_eq!(entry.text(), "192.0.2.7/24");
        let del = entry.delete_msg().finish(4);
        assert_eq!(u16_at(&del, 4), RTM_DELADDR);
        assert_eq!(u16_at(&del, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(&del[24..], &add[24..]);
    }

    #[test]
    fn split_messages_walks_several_and_stops_at_garbage() {
        let mut buf = link_up_msg(1).finish(1);
        buf.extend(set_address_msg(1, [0; 6]).finish(2));
        buf.extend([0xff, 0, 0, 0, 1]); // a header claiming more than is there
        let msgs = split_messages(&buf);
        assert_eq!(msgs.len(), 2);
        assert_eq!((msgs[0].0, msgs[0].1), (RTM_NEWLINK, 1));
        assert_eq!((msgs[1].0, msgs[1].1), (RTM_NEWLINK, 2));
        assert!(split_messages(&[0u8; 16]).is_empty());
    }

    #[test]
    fn error_payload_is_an_errno() {
        assert!(parse_error(&0i32.to_ne_bytes()).is_ok());
        let e = parse_error(&(-libc::EEXIST).to_ne_bytes()).expect_err("must fail");
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(parse_error(&[0, 0]).is_err());
    }

    /// On the test host: the loopback exists and a dump parses (no change made).
    #[test]
    fn dump_addresses_of_this_host() {
        let Ok(mut nl) = Netlink::open() else { return };
        let addrs = nl.addresses().expect("dump");
        assert!(if_index("lo").expect("lo") > 0);
        assert!(addrs
            .iter()
            .all(|a| a.index > 0 && a.local.is_some() || a.address.is_some()));
    }

    fn ip(args: &[&str]) -> Option<String> {
        let out = std::process::Command::new("ip").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The whole configuration on a veth interface in a network namespace
    /// of this test's thread (root and iproute2 only to set up and check;
    /// skipped without them). Applied twice: a restored guest gets it again.
    #[test]
    fn configure_a_veth_in_a_private_namespace() {
        // SAFETY: unshare of the calling thread's network namespace only.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!("skipped: no network namespace (not root?)");
            return;
        }
        if ip(&[
            "link", "add", "fvt0", "type", "veth", "peer", "name", "fvt1",
        ])
        .is_none()
        {
            eprintln!("skipped: no veth interfaces (or no iproute2)");
            return;
        }
        ip(&["link", "set", "fvt1", "up"]).expect("peer up");
        link_up("lo").expect("lo up");
        assert!(ip(&["link", "show", "lo"]).expect("ip").contains("UP"));
        // Stale addresses of a snapshot's previous life: flushed.
        let _ = std::fs::write("/proc/sys/net/ipv6/conf/fvt0/accept_dad", "0");
        ip(&["addr", "add", "192.0.2.9/24", "dev", "fvt0"]).expect("old v4");
        ip(&["addr", "add", "192.0.2.10/24", "dev", "fvt0"]).expect("old v4 secondary");
        ip(&["addr", "add", "2001:db8::9/64", "dev", "fvt0", "nodad"]).expect("old v6");
        let a = Addressing {
            mac: [2, 0, 0x0a, 0xc8, 0, 2],
            ipv4: (Ipv4Addr::new(10, 200, 0, 2), 30),
            gateway4: Ipv4Addr::new(10, 200, 0, 1),
            ipv6: Some(("fd00:fa57::2".parse().expect("v6"), 126)),
            gateway6: Some("fd00:fa57::1".parse().expect("v6")),
        };
        for _ in 0..2 {
            configure("fvt0", &a).expect("configure");
            let link = ip(&["link", "show", "fvt0"]).expect("ip");
            assert!(link.contains("02:00:0a:c8:00:02"), "{link}");
            assert!(link.contains(",UP"), "{link}");
            let addrs = ip(&["addr", "show", "dev", "fvt0", "scope", "global"]).expect("ip");
            assert!(addrs.contains("inet 10.200.0.2/30"), "{addrs}");
            assert!(addrs.contains("inet6 fd00:fa57::2/126"), "{addrs}");
            assert!(!addrs.contains("192.0.2."), "{addrs}");
            assert!(!addrs.contains("2001:db8::9"), "{addrs}");
            assert!(addrs.contains("nodad"), "{addrs}");
            let r4 = ip(&["route", "show", "default"]).expect("ip");
            assert_eq!(r4.trim(), "default via 10.200.0.1 dev fvt0");
            let r6 = ip(&["-6", "route", "show", "default"]).expect("ip");
            assert!(r6.starts_with("default via fd00:fa57::1 dev fvt0 "), "{r6}");
        }
        // A failing step says which one and why.
        let mut bad = a.clone();
        bad.gateway4 = Ipv4Addr::new(203, 0, 113, 1);
        let e = configure("fvt0", &bad).expect_err("unreachable gateway");
        eprintln!("{e}");
        assert!(
            e.to_string()
                .starts_with("replace the default route via 203.0.113.1 dev fvt0: "),
            "{e}"
        );
        assert!(
            e.raw_os_error().is_none() && e.to_string().contains("os error"),
            "{e}"
        );
        let e = configure("nosuch0", &a).expect_err("no interface");
        eprintln!("{e}");
        assert!(e.to_string().contains("nosuch0"), "{e}");
    }
}
