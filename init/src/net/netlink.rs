//! The few rtnetlink requests the node's network needs: list the links, bring one up with an
//! MTU, add and remove IPv4 addresses, add routes. Messages are built and parsed here (no
//! crate): each is a header, a fixed struct and type-length attributes, all bounds-checked.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_CREATE: u16 = 0x400;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_CARRIER: u16 = 33;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const AF_INET: u8 = 2;
const IFF_UP: u32 = 0x1;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_STATIC: u8 = 4;
const RTPROT_DHCP: u8 = 16;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RTN_UNICAST: u8 = 1;
/// ARPHRD_ETHER and ARPHRD_LOOPBACK.
pub const LINK_ETHER: u16 = 1;
pub const LINK_LOOPBACK: u16 = 772;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("cannot open a netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("netlink {request}")]
    Io {
        request: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink {request}: the kernel refused it")]
    Refused {
        request: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("netlink {request}: malformed reply: {detail}")]
    Malformed {
        request: &'static str,
        detail: String,
    },
}

/// One network interface as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// ARPHRD_* (1 ethernet, 772 loopback).
    pub kind: u16,
    pub up: bool,
    pub carrier: bool,
    pub mac: Vec<u8>,
    pub mtu: u32,
}

/// How a route or address came to be (shown by `ip route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Static,
    Dhcp,
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// A request: header, fixed part, attributes.
struct Message {
    bytes: Vec<u8>,
}

impl Message {
    fn new(kind: u16, flags: u16, fixed: &[u8]) -> Message {
        let mut bytes = vec![0u8; 16];
        bytes[4..6].copy_from_slice(&kind.to_ne_bytes());
        bytes[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
        bytes.extend(fixed);
        bytes.resize(align(bytes.len()), 0);
        Message { bytes }
    }

    fn attr(mut self, kind: u16, data: &[u8]) -> Message {
        self.bytes.extend(((4 + data.len()) as u16).to_ne_bytes());
        self.bytes.extend(kind.to_ne_bytes());
        self.bytes.extend(data);
        self.bytes.resize(align(self.bytes.len()), 0);
        self
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.bytes[0..4].copy_from_slice(&len.to_ne_bytes());
        self.bytes[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.bytes
    }
}

fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut m = vec![0u8; 16];
    m[0] = 0; // AF_UNSPEC
    m[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    m[8..12].copy_from_slice(&flags.to_ne_bytes());
    m[12..16].copy_from_slice(&change.to_ne_bytes());
    m
}

fn ifaddrmsg(index: u32, prefix: u8) -> Vec<u8> {
    let mut m = vec![AF_INET, prefix, 0, RT_SCOPE_UNIVERSE];
    m.extend(index.to_ne_bytes());
    m
}

fn rtmsg(dst_len: u8, origin: Origin, scope: u8) -> Vec<u8> {
    let protocol = match origin {
        Origin::Static => RTPROT_STATIC,
        Origin::Dhcp => RTPROT_DHCP,
    };
    let mut m = vec![
        AF_INET,
        dst_len,
        0,
        0,
        RT_TABLE_MAIN,
        protocol,
        scope,
        RTN_UNICAST,
    ];
    m.extend(0u32.to_ne_bytes());
    m
}

/// Splits a buffer of netlink messages: (type, payload after the header).
fn messages(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
        if len < 16 || at + len > buf.len() {
            return Err(format!(
                "message at {at} claims {len} bytes of {}",
                buf.len()
            ));
        }
        let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap());
        out.push((kind, &buf[at + 16..at + len]));
        at += align(len);
    }
    Ok(out)
}

/// The attributes after a fixed part: (type, data).
fn attributes(payload: &[u8], fixed: usize) -> Result<Vec<(u16, &[u8])>, String> {
    let mut out = Vec::new();
    let mut at = fixed;
    while at + 4 <= payload.len() {
        let len = u16::from_ne_bytes(payload[at..at + 2].try_into().unwrap()) as usize;
        let kind = u16::from_ne_bytes(payload[at + 2..at + 4].try_into().unwrap()) & 0x3fff;
        if len < 4 || at + len > payload.len() {
            return Err(format!(
                "attribute at {at} claims {len} bytes of {}",
                payload.len()
            ));
        }
        out.push((kind, &payload[at + 4..at + len]));
        at += align(len);
    }
    Ok(out)
}

/// Parses one RTM_NEWLINK message (the dump's replies).
fn parse_link(payload: &[u8]) -> Result<Link, String> {
    if payload.len() < 16 {
        return Err(format!("ifinfomsg of {} bytes", payload.len()));
    }
    let kind = u16::from_ne_bytes(payload[2..4].try_into().unwrap());
    let index = i32::from_ne_bytes(payload[4..8].try_into().unwrap()) as u32;
    let flags = u32::from_ne_bytes(payload[8..12].try_into().unwrap());
    let mut link = Link {
        index,
        name: String::new(),
        kind,
        up: flags & IFF_UP != 0,
        carrier: false,
        mac: Vec::new(),
        mtu: 0,
    };
    for (attr, data) in attributes(payload, 16)? {
        match attr {
            IFLA_IFNAME => {
                link.name = String::from_utf8_lossy(data.split(|&b| b == 0).next().unwrap_or(&[]))
                    .into_owned()
            }
            IFLA_ADDRESS => link.mac = data.to_vec(),
            IFLA_CARRIER => link.carrier = data.first() == Some(&1),
            IFLA_MTU if data.len() == 4 => link.mtu = u32::from_ne_bytes(data.try_into().unwrap()),
            _ => {}
        }
    }
    Ok(link)
}

/// An rtnetlink socket.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

/// A netlink socket of `kind` (raw, datagram) for `protocol` (route, kobject uevents).
pub fn netlink_socket(kind: SockType, protocol: SockProtocol) -> std::io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Netlink,
        kind,
        SockFlag::SOCK_CLOEXEC,
        protocol,
    )?)
}

impl Netlink {
    pub fn open() -> Result<Netlink, NetlinkError> {
        let fd = netlink_socket(SockType::Raw, SockProtocol::NetlinkRoute)
            .map_err(NetlinkError::Socket)?;
        Ok(Netlink { fd, seq: 1 })
    }

    /// Sends a request and collects the replies up to the ACK (or the end of a dump).
    fn call(
        &mut self,
        request: &'static str,
        message: Message,
    ) -> Result<Vec<Vec<u8>>, NetlinkError> {
        self.seq += 1;
        let bytes = message.finish(self.seq);
        let io = |source| NetlinkError::Io { request, source };
        // Port 0, no groups: the kernel.
        sendto(
            self.fd.as_raw_fd(),
            &bytes,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .map_err(|e| io(e.into()))?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io(e.into())),
            };
            let malformed = |detail| NetlinkError::Malformed { request, detail };
            for (kind, payload) in messages(&buf[..n as usize]).map_err(malformed)? {
                match kind {
                    NLMSG_ERROR => {
                        let code = payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .ok_or_else(|| malformed("short error message".into()))?;
                        if code == 0 {
                            return Ok(replies);
                        }
                        return Err(NetlinkError::Refused {
                            request,
                            source: std::io::Error::from_raw_os_error(-code),
                        });
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(payload.to_vec()),
                }
            }
        }
    }

    /// Every interface.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let replies = self.call(
            "list the links",
            Message::new(RTM_GETLINK, NLM_F_DUMP, &ifinfomsg(0, 0, 0)),
        )?;
        replies
            .iter()
            .map(|p| {
                parse_link(p).map_err(|detail| NetlinkError::Malformed {
                    request: "list the links",
                    detail,
                })
            })
            .collect()
    }

    /// Brings a link up, with an MTU when given.
    pub fn set_up(&mut self, index: u32, mtu: Option<u32>) -> Result<(), NetlinkError> {
        let mut m = Message::new(RTM_NEWLINK, NLM_F_ACK, &ifinfomsg(index, IFF_UP, IFF_UP));
        if let Some(mtu) = mtu {
            m = m.attr(IFLA_MTU, &mtu.to_ne_bytes());
        }
        self.call("bring a link up", m).map(drop)
    }

    /// Adds (or replaces) an IPv4 address with its prefix and broadcast address.
    pub fn add_address(
        &mut self,
        index: u32,
        address: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let mask = super::prefix_mask(prefix);
        let broadcast = Ipv4Addr::from(u32::from(address) | !mask);
        let m = Message::new(
            RTM_NEWADDR,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &ifaddrmsg(index, prefix),
        )
        .attr(IFA_LOCAL, &address.octets())
        .attr(IFA_ADDRESS, &address.octets())
        .attr(IFA_BROADCAST, &broadcast.octets());
        self.call("add an address", m).map(drop)
    }

    pub fn remove_address(
        &mut self,
        index: u32,
        address: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let m = Message::new(RTM_DELADDR, NLM_F_ACK, &ifaddrmsg(index, prefix))
            .attr(IFA_LOCAL, &address.octets())
            .attr(IFA_ADDRESS, &address.octets());
        self.call("remove an address", m).map(drop)
    }

    /// A route to `destination/prefix` through `gateway` (None: on the link itself).
    pub fn add_route(
        &mut self,
        index: u32,
        destination: Ipv4Addr,
        prefix: u8,
        gateway: Option<Ipv4Addr>,
        origin: Origin,
    ) -> Result<(), NetlinkError> {
        let scope = if gateway.is_some() {
            RT_SCOPE_UNIVERSE
        } else {
            RT_SCOPE_LINK
        };
        let mut m = Message::new(
            RTM_NEWROUTE,
            NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
            &rtmsg(prefix, origin, scope),
        )
        .attr(RTA_OIF, &index.to_ne_bytes());
        if prefix > 0 {
            m = m.attr(RTA_DST, &destination.octets());
        }
        if let Some(gateway) = gateway {
            m = m.attr(RTA_GATEWAY, &gateway.octets());
        }
        self.call("add a route", m).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_framed_and_aligned() {
        let m = Message::new(RTM_NEWADDR, NLM_F_ACK, &ifaddrmsg(3, 24))
            .attr(IFA_LOCAL, &[10, 0, 2, 15])
            .attr(IFLA_IFNAME, b"eth0\0")
            .finish(7);
        assert_eq!(m.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWADDR);
        assert_eq!(
            u16::from_ne_bytes(m[6..8].try_into().unwrap()),
            NLM_F_ACK | NLM_F_REQUEST
        );
        assert_eq!(u32::from_ne_bytes(m[8..12].try_into().unwrap()), 7);
        assert_eq!(&m[16..20], &[AF_INET, 24, 0, 0]);
        let attrs = attributes(&m[16..], 8).unwrap();
        assert_eq!(
            attrs,
            vec![
                (IFA_LOCAL, &[10, 0, 2, 15][..]),
                (IFLA_IFNAME, &b"eth0\0"[..])
            ]
        );
    }

    #[test]
    fn link_replies_parse_and_bad_lengths_are_refused() {
        let reply = Message::new(RTM_NEWLINK, 0, &ifinfomsg(2, IFF_UP, 0))
            .attr(IFLA_IFNAME, b"eth0\0")
            .attr(IFLA_ADDRESS, &[0x52, 0x54, 0, 0x12, 0x34, 0x56])
            .attr(IFLA_CARRIER, &[1])
            .attr(IFLA_MTU, &1500u32.to_ne_bytes())
            .finish(1);
        let parsed = messages(&reply).unwrap();
        assert_eq!(parsed.len(), 1);
        let mut link = parse_link(parsed[0].1).unwrap();
        link.kind = LINK_ETHER;
        assert_eq!(link.name, "eth0");
        assert_eq!(link.index, 2);
        assert!(link.up && link.carrier);
        assert_eq!(link.mtu, 1500);
        assert_eq!(link.mac, vec![0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        let mut bad = reply.clone();
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(messages(&bad).unwrap_err().contains("claims 1000"));
        let mut bad_attr = reply.clone();
        bad_attr[32..34].copy_from_slice(&200u16.to_ne_bytes());
        assert!(parse_link(messages(&bad_attr).unwrap()[0].1).is_err());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_replies_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            if let Ok(list) = messages(&bytes) {
                for (_, payload) in list {
                    let _ = parse_link(payload);
                }
            }
        }
    }
}
