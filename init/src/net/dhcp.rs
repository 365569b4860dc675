//! DHCPv4 messages (RFC 2131, options RFC 2132): the client's DISCOVER and REQUEST, and a strict
//! reader of the server's replies. The host runs the DHCP server, so everything in a reply is
//! untrusted: every option's length is checked against its code and the message, values are
//! checked for range (unicast addresses, a contiguous netmask, host names of DNS labels), option
//! overload (52) is refused, and nothing here decides anything security-relevant. Written here
//! rather than taken from a crate: the maintained one pulls a DNS library and more into a
//! static PID 1 whose size is a goal, for the few dozen lines of format this needs.

use std::net::Ipv4Addr;

const BOOTREQUEST: u8 = 1;
const BOOTREPLY: u8 = 2;
const HTYPE_ETHER: u8 = 1;
const COOKIE: [u8; 4] = [99, 130, 83, 99];
const FIXED: usize = 236;
/// BOOTP's minimum message size: some servers drop shorter requests.
const MIN_REQUEST: usize = 300;
const FLAG_BROADCAST: u16 = 0x8000;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_HOST_NAME: u8 = 12;
const OPT_DOMAIN_NAME: u8 = 15;
const OPT_MTU: u8 = 26;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_OVERLOAD: u8 = 52;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_PARAMETERS: u8 = 55;
const OPT_MAX_SIZE: u8 = 57;
const OPT_RENEWAL_TIME: u8 = 58;
const OPT_REBINDING_TIME: u8 = 59;
const OPT_CLIENT_ID: u8 = 61;
const OPT_DOMAIN_SEARCH: u8 = 119;
const OPT_END: u8 = 255;

/// At most this many name servers go to resolv.conf (the resolver reads three).
pub const MAX_DNS: usize = 3;
/// At most this many search domains go to resolv.conf (older resolvers read six).
pub const MAX_SEARCH: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Discover = 1,
    Offer = 2,
    Request = 3,
    Decline = 4,
    Ack = 5,
    Nak = 6,
    Release = 7,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DhcpError {
    #[error("{len} bytes: shorter than a DHCP message (240)")]
    Short { len: usize },
    #[error("not a reply for this client: {0}")]
    NotOurs(String),
    #[error("option {code} at byte {at}: {len} bytes run past the end of the message ({end})")]
    OptionBounds {
        code: u8,
        at: usize,
        len: usize,
        end: usize,
    },
    #[error("option {code} ({name}) has {len} bytes, expected {expected}")]
    OptionLength {
        code: u8,
        name: &'static str,
        len: usize,
        expected: &'static str,
    },
    #[error("option 52 (overload) is not accepted: options must fit in the options field")]
    Overload,
    #[error("the options end without an end option (255)")]
    NoEnd,
    #[error("no option {code} ({name}), which a {kind:?} needs")]
    Missing {
        code: u8,
        name: &'static str,
        kind: MessageType,
    },
    #[error("{what} {value} is not acceptable: {why}")]
    Value {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

/// What the client sends.
pub struct Request<'a> {
    pub kind: MessageType,
    pub xid: u32,
    pub mac: [u8; 6],
    /// Seconds since the client began (the `secs` field).
    pub secs: u16,
    /// Our address when renewing or rebinding (ciaddr), else unspecified.
    pub client_address: Option<Ipv4Addr>,
    /// Option 50: in a REQUEST while selecting, the offered address.
    pub requested: Option<Ipv4Addr>,
    /// Option 54: in a REQUEST while selecting, the chosen server.
    pub server: Option<Ipv4Addr>,
    /// Option 12, when the node's name is known before the lease.
    pub host_name: Option<&'a str>,
}

impl Request<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut m = vec![0u8; FIXED];
        m[0] = BOOTREQUEST;
        m[1] = HTYPE_ETHER;
        m[2] = 6;
        m[4..8].copy_from_slice(&self.xid.to_be_bytes());
        m[8..10].copy_from_slice(&self.secs.to_be_bytes());
        // Replies broadcast until we have an address: the kernel drops unicast to an address
        // the interface does not have yet.
        if self.client_address.is_none() {
            m[10..12].copy_from_slice(&FLAG_BROADCAST.to_be_bytes());
        }
        if let Some(ciaddr) = self.client_address {
            m[12..16].copy_from_slice(&ciaddr.octets());
        }
        m[28..34].copy_from_slice(&self.mac);
        m.extend(COOKIE);
        m.extend([OPT_MESSAGE_TYPE, 1, self.kind as u8]);
        m.extend([OPT_CLIENT_ID, 7, HTYPE_ETHER]);
        m.extend(self.mac);
        if let Some(ip) = self.requested {
            m.extend([OPT_REQUESTED_IP, 4]);
            m.extend(ip.octets());
        }
        if let Some(ip) = self.server {
            m.extend([OPT_SERVER_ID, 4]);
            m.extend(ip.octets());
        }
        if let Some(name) = self.host_name.filter(|n| n.len() <= 63) {
            m.extend([OPT_HOST_NAME, name.len() as u8]);
            m.extend(name.as_bytes());
        }
        m.extend([OPT_MAX_SIZE, 2]);
        m.extend(1500u16.to_be_bytes());
        let wanted = [
            OPT_SUBNET_MASK,
            OPT_ROUTER,
            OPT_DNS,
            OPT_HOST_NAME,
            OPT_DOMAIN_NAME,
            OPT_DOMAIN_SEARCH,
            OPT_MTU,
            OPT_LEASE_TIME,
            OPT_SERVER_ID,
            OPT_RENEWAL_TIME,
            OPT_REBINDING_TIME,
        ];
        m.extend([OPT_PARAMETERS, wanted.len() as u8]);
        m.extend(wanted);
        m.push(OPT_END);
        if m.len() < MIN_REQUEST {
            m.resize(MIN_REQUEST, OPT_PAD);
        }
        m
    }
}

/// A reply, checked: its kind and the lease it offers or grants (none for a NAK).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub kind: MessageType,
    pub server: Option<Ipv4Addr>,
    pub lease: Option<Lease>,
    /// Values the reply carried that were left out, with the reason (for the log).
    pub ignored: Vec<String>,
}

/// What a lease configures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// The domain search list (option 119), in the server's order.
    pub search: Vec<String>,
    pub host_name: Option<String>,
    pub mtu: Option<u16>,
    pub server: Ipv4Addr,
    /// Seconds; u32::MAX is infinite.
    pub lease_time: u32,
    pub renew_after: u32,
    pub rebind_after: u32,
}

fn option_name(code: u8) -> &'static str {
    match code {
        OPT_SUBNET_MASK => "subnet mask",
        OPT_ROUTER => "router",
        OPT_DNS => "DNS servers",
        OPT_HOST_NAME => "host name",
        OPT_DOMAIN_NAME => "domain name",
        OPT_DOMAIN_SEARCH => "domain search list",
        OPT_MTU => "interface MTU",
        OPT_LEASE_TIME => "lease time",
        OPT_MESSAGE_TYPE => "message type",
        OPT_SERVER_ID => "server identifier",
        OPT_RENEWAL_TIME => "renewal time",
        OPT_REBINDING_TIME => "rebinding time",
        _ => "option",
    }
}

/// A unicast IPv4 address a host may have or talk to.
fn unicast(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_loopback()
        || ip.octets()[0] >= 240)
}

/// A host or domain name of DNS labels: 1–63 of [A-Za-z0-9-] each, no hyphen at either end,
/// at most 253 in all.
pub fn valid_dns_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The names of a domain search list (option 119, RFC 3397): DNS wire-format names, where a
/// name may end in a pointer (two bytes, top bits set) to a name earlier in the option's data.
/// Pointers must point backwards, so a list cannot loop; every name must be of DNS labels.
pub fn domain_search_list(data: &[u8]) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let (name, next) = wire_name(data, at)?;
        if !valid_dns_name(&name) {
            return Err(format!("name at byte {at} {name:?}: not of DNS labels"));
        }
        names.push(name.to_ascii_lowercase());
        at = next;
    }
    Ok(names)
}

/// The name at `start`, and where the next one begins.
fn wire_name(data: &[u8], start: usize) -> Result<(String, usize), String> {
    let mut labels: Vec<&[u8]> = Vec::new();
    let mut at = start;
    let mut next = None;
    let mut length = 0;
    let mut floor = start;
    loop {
        let &len = data
            .get(at)
            .ok_or_else(|| format!("name at byte {start}: runs past the end ({})", data.len()))?;
        match len {
            0 => {
                let end = next.unwrap_or(at + 1);
                let text: Vec<String> = labels
                    .iter()
                    .map(|l| String::from_utf8_lossy(l).into_owned())
                    .collect();
                return Ok((text.join("."), end));
            }
            1..=63 => {
                let label = data.get(at + 1..at + 1 + len as usize).ok_or_else(|| {
                    format!(
                        "label at byte {at}: {len} bytes run past the end ({})",
                        data.len()
                    )
                })?;
                length += len as usize + 1;
                if length > 254 {
                    return Err(format!("name at byte {start}: longer than 253 characters"));
                }
                labels.push(label);
                at += 1 + len as usize;
            }
            0xc0..=0xff => {
                let low = *data
                    .get(at + 1)
                    .ok_or_else(|| format!("pointer at byte {at}: cut off"))?;
                let target = ((len as usize & 0x3f) << 8) | low as usize;
                // Each jump lands before the one before it (the first before this name), so
                // the jumps end.
                if target >= floor {
                    return Err(format!(
                        "pointer at byte {at} to byte {target}: not to an earlier name"
                    ));
                }
                floor = target;
                next.get_or_insert(at + 2);
                at = target;
            }
            _ => {
                return Err(format!(
                    "label at byte {at}: length byte {len:#04x} is reserved"
                ))
            }
        }
    }
}

/// The options of a message, RFC 3396 concatenation for a code that appears more than once.
fn options(bytes: &[u8]) -> Result<Vec<(u8, Vec<u8>)>, DhcpError> {
    let mut out: Vec<(u8, Vec<u8>)> = Vec::new();
    let mut at = FIXED + 4;
    loop {
        let Some(&code) = bytes.get(at) else {
            return Err(DhcpError::NoEnd);
        };
        match code {
            OPT_PAD => at += 1,
            OPT_END => return Ok(out),
            _ => {
                let len = *bytes.get(at + 1).ok_or(DhcpError::OptionBounds {
                    code,
                    at,
                    len: 1,
                    end: bytes.len(),
                })? as usize;
                let data = bytes
                    .get(at + 2..at + 2 + len)
                    .ok_or(DhcpError::OptionBounds {
                        code,
                        at,
                        len,
                        end: bytes.len(),
                    })?;
                if code == OPT_OVERLOAD {
                    return Err(DhcpError::Overload);
                }
                match out.iter_mut().find(|(c, _)| *c == code) {
                    Some((_, existing)) => existing.extend(data),
                    None => out.push((code, data.to_vec())),
                }
                at += 2 + len;
            }
        }
    }
}

fn exact<const N: usize>(code: u8, data: &[u8]) -> Result<[u8; N], DhcpError> {
    data.try_into().map_err(|_| DhcpError::OptionLength {
        code,
        name: option_name(code),
        len: data.len(),
        expected: match N {
            1 => "1",
            2 => "2",
            4 => "4",
            _ => "a fixed length",
        },
    })
}

/// Reads a reply to the request with this transaction ID and hardware address.
pub fn parse_reply(bytes: &[u8], xid: u32, mac: &[u8; 6]) -> Result<Reply, DhcpError> {
    if bytes.len() < FIXED + 4 {
        return Err(DhcpError::Short { len: bytes.len() });
    }
    let not_ours = |why: String| Err(DhcpError::NotOurs(why));
    if bytes[0] != BOOTREPLY || bytes[1] != HTYPE_ETHER || bytes[2] != 6 {
        return not_ours(format!(
            "op {} htype {} hlen {} (expected a BOOTREPLY for ethernet)",
            bytes[0], bytes[1], bytes[2]
        ));
    }
    let their_xid = u32::from_be_bytes(bytes[4..8].try_into().unwrap());
    if their_xid != xid {
        return not_ours(format!(
            "transaction {their_xid:#010x}, ours is {xid:#010x}"
        ));
    }
    if &bytes[28..34] != mac {
        return not_ours("another client's hardware address".into());
    }
    if bytes[FIXED..FIXED + 4] != COOKIE {
        return not_ours("no DHCP magic cookie".into());
    }
    let options = options(bytes)?;
    let get = |code: u8| {
        options
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, d)| d.as_slice())
    };
    let kind = match get(OPT_MESSAGE_TYPE)
        .map(|d| exact::<1>(OPT_MESSAGE_TYPE, d))
        .transpose()?
    {
        Some([2]) => MessageType::Offer,
        Some([5]) => MessageType::Ack,
        Some([6]) => MessageType::Nak,
        Some([other]) => {
            return Err(DhcpError::Value {
                what: "message type",
                value: other.to_string(),
                why: "a client receives OFFER (2), ACK (5) or NAK (6)",
            })
        }
        None => return not_ours("no message type: a BOOTP reply, not DHCP".into()),
    };
    let address_option = |code: u8| -> Result<Option<Ipv4Addr>, DhcpError> {
        get(code)
            .map(|d| exact::<4>(code, d).map(Ipv4Addr::from))
            .transpose()
    };
    let server = address_option(OPT_SERVER_ID)?;
    if kind == MessageType::Nak {
        return Ok(Reply {
            kind,
            server,
            lease: None,
            ignored: Vec::new(),
        });
    }
    let missing = |code: u8| DhcpError::Missing {
        code,
        name: option_name(code),
        kind,
    };
    let server = server.ok_or_else(|| missing(OPT_SERVER_ID))?;
    let value = |what: &'static str, value: String, why: &'static str| DhcpError::Value {
        what,
        value,
        why,
    };
    if !unicast(server) {
        return Err(value(
            "server identifier",
            server.to_string(),
            "not a unicast address",
        ));
    }
    let address = Ipv4Addr::from(<[u8; 4]>::try_from(&bytes[16..20]).unwrap());
    if !unicast(address) {
        return Err(value(
            "offered address",
            address.to_string(),
            "not a unicast address",
        ));
    }
    let mask = address_option(OPT_SUBNET_MASK)?.ok_or_else(|| missing(OPT_SUBNET_MASK))?;
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    if bits.checked_shl(prefix).unwrap_or(0) != 0 || prefix == 0 {
        return Err(value(
            "subnet mask",
            mask.to_string(),
            "not a contiguous netmask of 1 to 32 bits",
        ));
    }
    let lease_time = u32::from_be_bytes(exact::<4>(
        OPT_LEASE_TIME,
        get(OPT_LEASE_TIME).ok_or_else(|| missing(OPT_LEASE_TIME))?,
    )?);
    if lease_time == 0 {
        return Err(value("lease time", "0".into(), "a lease of no time"));
    }
    let mut ignored = Vec::new();
    let router = match get(OPT_ROUTER) {
        None => None,
        Some(d) if d.is_empty() || d.len() % 4 != 0 => {
            return Err(DhcpError::OptionLength {
                code: OPT_ROUTER,
                name: "router",
                len: d.len(),
                expected: "a multiple of 4",
            })
        }
        Some(d) => {
            let first = Ipv4Addr::from(<[u8; 4]>::try_from(&d[..4]).unwrap());
            if unicast(first) && first != address {
                Some(first)
            } else {
                ignored.push(format!(
                    "router {first}: not a unicast address other than ours"
                ));
                None
            }
        }
    };
    let mut dns = Vec::new();
    if let Some(d) = get(OPT_DNS) {
        if d.is_empty() || d.len() % 4 != 0 {
            return Err(DhcpError::OptionLength {
                code: OPT_DNS,
                name: "DNS servers",
                len: d.len(),
                expected: "a multiple of 4",
            });
        }
        for chunk in d.chunks(4) {
            let ip = Ipv4Addr::from(<[u8; 4]>::try_from(chunk).unwrap());
            if !unicast(ip) {
                ignored.push(format!("DNS server {ip}: not a unicast address"));
            } else if dns.len() == MAX_DNS {
                ignored.push(format!("DNS server {ip}: more than {MAX_DNS}"));
            } else if !dns.contains(&ip) {
                dns.push(ip);
            }
        }
    }
    let mut name = |code: u8, max: usize| -> Option<String> {
        let data = get(code)?;
        let text = std::str::from_utf8(data)
            .ok()
            .map(|t| t.trim_end_matches('\0'));
        match text {
            Some(t) if t.len() <= max && valid_dns_name(t) => Some(t.to_ascii_lowercase()),
            _ => {
                ignored.push(format!(
                    "{} {:?}: not a name of DNS labels up to {max} characters",
                    option_name(code),
                    String::from_utf8_lossy(data)
                ));
                None
            }
        }
    };
    // A host name becomes the kernel's (64 bytes at most); a domain goes to resolv.conf.
    let host_name = name(OPT_HOST_NAME, 64);
    let domain = name(OPT_DOMAIN_NAME, 253);
    let mut search = Vec::new();
    if let Some(data) = get(OPT_DOMAIN_SEARCH) {
        match domain_search_list(data) {
            Ok(names) => {
                for name in names {
                    if search.contains(&name) {
                        continue;
                    }
                    if search.len() == MAX_SEARCH {
                        ignored.push(format!("search domain {name}: more than {MAX_SEARCH}"));
                    } else {
                        search.push(name);
                    }
                }
            }
            Err(reason) => ignored.push(format!("domain search list: {reason}")),
        }
    }
    let mtu = match get(OPT_MTU).map(|d| exact::<2>(OPT_MTU, d)).transpose()? {
        Some(b) => {
            let mtu = u16::from_be_bytes(b);
            if mtu >= 576 {
                Some(mtu)
            } else {
                ignored.push(format!("interface MTU {mtu}: below 576"));
                None
            }
        }
        None => None,
    };
    let seconds = |code: u8| -> Result<Option<u32>, DhcpError> {
        get(code)
            .map(|d| exact::<4>(code, d).map(u32::from_be_bytes))
            .transpose()
    };
    let default_renew = (lease_time as u64 / 2) as u32;
    let default_rebind = (lease_time as u64 * 7 / 8) as u32;
    let (mut renew_after, mut rebind_after) = (
        seconds(OPT_RENEWAL_TIME)?.unwrap_or(default_renew),
        seconds(OPT_REBINDING_TIME)?.unwrap_or(default_rebind),
    );
    if !(renew_after < rebind_after && rebind_after < lease_time) && lease_time != u32::MAX {
        ignored.push(format!(
            "renewal {renew_after} s / rebinding {rebind_after} s: not within the {lease_time} s lease in order"
        ));
        (renew_after, rebind_after) = (default_renew, default_rebind);
    }
    Ok(Reply {
        kind,
        server: Some(server),
        lease: Some(Lease {
            address,
            prefix: prefix as u8,
            router,
            dns,
            domain,
            search,
            host_name,
            mtu,
            server,
            lease_time,
            renew_after,
            rebind_after,
        }),
        ignored,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

    /// A reply as a server sends it, with these options (code, data).
    pub fn reply(kind: u8, xid: u32, yiaddr: [u8; 4], extra: &[(u8, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![0u8; FIXED];
        m[0] = BOOTREPLY;
        m[1] = 1;
        m[2] = 6;
        m[4..8].copy_from_slice(&xid.to_be_bytes());
        m[16..20].copy_from_slice(&yiaddr);
        m[28..34].copy_from_slice(&MAC);
        m.extend(COOKIE);
        m.extend([OPT_MESSAGE_TYPE, 1, kind]);
        for (code, data) in extra {
            m.push(*code);
            m.push(data.len() as u8);
            m.extend(data);
        }
        m.push(OPT_END);
        m
    }

    /// QEMU's user network, as its DHCP server answers.
    pub fn slirp_options() -> Vec<(u8, Vec<u8>)> {
        vec![
            (OPT_SERVER_ID, vec![10, 0, 2, 2]),
            (OPT_LEASE_TIME, 86400u32.to_be_bytes().to_vec()),
            (OPT_SUBNET_MASK, vec![255, 255, 255, 0]),
            (OPT_ROUTER, vec![10, 0, 2, 2]),
            (OPT_DNS, vec![10, 0, 2, 3]),
            (OPT_HOST_NAME, b"node-a".to_vec()),
            (OPT_DOMAIN_NAME, b"cluster.test".to_vec()),
        ]
    }

    #[test]
    fn requests_carry_what_the_server_needs() {
        let r = Request {
            kind: MessageType::Request,
            xid: 0x1234_5678,
            mac: MAC,
            secs: 3,
            client_address: None,
            requested: Some(Ipv4Addr::new(10, 0, 2, 15)),
            server: Some(Ipv4Addr::new(10, 0, 2, 2)),
            host_name: Some("node-a"),
        }
        .encode();
        assert!(r.len() >= MIN_REQUEST);
        assert_eq!(&r[4..8], &0x1234_5678u32.to_be_bytes());
        assert_eq!(&r[10..12], &FLAG_BROADCAST.to_be_bytes());
        assert_eq!(&r[28..34], &MAC);
        assert_eq!(&r[236..240], &COOKIE);
        let opts = options(&r).unwrap();
        let get = |c: u8| opts.iter().find(|(k, _)| *k == c).unwrap().1.clone();
        assert_eq!(get(OPT_MESSAGE_TYPE), vec![3]);
        assert_eq!(get(OPT_REQUESTED_IP), vec![10, 0, 2, 15]);
        assert_eq!(get(OPT_SERVER_ID), vec![10, 0, 2, 2]);
        assert_eq!(get(OPT_HOST_NAME), b"node-a".to_vec());
        // Renewing: from our address, no broadcast flag.
        let renew = Request {
            kind: MessageType::Request,
            xid: 1,
            mac: MAC,
            secs: 0,
            client_address: Some(Ipv4Addr::new(10, 0, 2, 15)),
            requested: None,
            server: None,
            host_name: None,
        }
        .encode();
        assert_eq!(&renew[10..12], &[0, 0]);
        assert_eq!(&renew[12..16], &[10, 0, 2, 15]);
    }

    #[test]
    fn an_ack_gives_a_checked_lease() {
        let r = parse_reply(&reply(5, 7, [10, 0, 2, 15], &slirp_options()), 7, &MAC).unwrap();
        assert_eq!(r.kind, MessageType::Ack);
        let lease = r.lease.unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(lease.prefix, 24);
        assert_eq!(lease.router, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(lease.dns, vec![Ipv4Addr::new(10, 0, 2, 3)]);
        assert_eq!(lease.host_name.as_deref(), Some("node-a"));
        assert_eq!(lease.domain.as_deref(), Some("cluster.test"));
        assert_eq!((lease.renew_after, lease.rebind_after), (43200, 75600));
        assert!(r.ignored.is_empty());
        // RFC 3396: a long option split in two is one value.
        let mut split = slirp_options();
        split.retain(|(c, _)| *c != OPT_DNS);
        split.push((OPT_DNS, vec![10, 0, 2, 3]));
        split.push((OPT_DNS, vec![10, 0, 2, 4]));
        let lease = parse_reply(&reply(5, 7, [10, 0, 2, 15], &split), 7, &MAC)
            .unwrap()
            .lease
            .unwrap();
        assert_eq!(lease.dns.len(), 2);
    }

    #[test]
    fn hostile_replies_are_refused_or_trimmed_by_name() {
        let with = |code: u8, data: Vec<u8>| {
            let mut o = slirp_options();
            o.retain(|(c, _)| *c != code);
            o.push((code, data));
            reply(5, 7, [10, 0, 2, 15], &o)
        };
        let refused = |bytes: Vec<u8>| parse_reply(&bytes, 7, &MAC).unwrap_err().to_string();
        assert!(refused(with(OPT_SUBNET_MASK, vec![255, 0, 255, 0])).contains("contiguous"));
        assert!(refused(with(OPT_SUBNET_MASK, vec![255, 255])).contains("has 2 bytes"));
        assert!(refused(with(OPT_LEASE_TIME, vec![0; 4])).contains("lease of no time"));
        assert!(refused(with(OPT_SERVER_ID, vec![255, 255, 255, 255])).contains("unicast"));
        assert!(refused(with(OPT_OVERLOAD, vec![3])).contains("overload"));
        assert!(refused(with(OPT_DNS, vec![1, 2, 3])).contains("multiple of 4"));
        assert!(refused(reply(5, 7, [224, 0, 0, 1], &slirp_options())).contains("offered address"));
        assert!(refused(reply(5, 8, [10, 0, 2, 15], &slirp_options())).contains("transaction"));
        let mut no_end = reply(5, 7, [10, 0, 2, 15], &slirp_options());
        no_end.pop();
        assert!(refused(no_end).contains("end option"));
        let mut past_end = reply(5, 7, [10, 0, 2, 15], &[]);
        past_end.pop();
        past_end.extend([OPT_DNS, 200, 1, 2]);
        assert!(refused(past_end).contains("run past the end"));
        // Values that are only left out, and say why.
        let long_name = "a".repeat(64) + ".test";
        let r = parse_reply(&with(OPT_HOST_NAME, long_name.into_bytes()), 7, &MAC).unwrap();
        assert_eq!(r.lease.as_ref().unwrap().host_name, None);
        assert!(r.ignored[0].contains("host name"), "{:?}", r.ignored);
        let r = parse_reply(&with(OPT_HOST_NAME, b"bad_name;rm".to_vec()), 7, &MAC).unwrap();
        assert_eq!(r.lease.unwrap().host_name, None);
        let r = parse_reply(&with(OPT_MTU, 68u16.to_be_bytes().to_vec()), 7, &MAC).unwrap();
        assert_eq!(r.lease.unwrap().mtu, None);
        let many: Vec<u8> = (1..=5).flat_map(|i| [10, 0, 2, i]).collect();
        let r = parse_reply(&with(OPT_DNS, many), 7, &MAC).unwrap();
        assert_eq!(r.lease.unwrap().dns.len(), MAX_DNS);
        let r = parse_reply(
            &with(OPT_RENEWAL_TIME, 90000u32.to_be_bytes().to_vec()),
            7,
            &MAC,
        )
        .unwrap();
        assert_eq!(r.lease.unwrap().renew_after, 43200);
        // A NAK needs nothing else.
        let nak = parse_reply(&reply(6, 7, [0; 4], &[]), 7, &MAC).unwrap();
        assert_eq!((nak.kind, nak.lease), (MessageType::Nak, None));
    }

    #[test]
    fn domain_search_lists_are_read_with_their_pointers() {
        // RFC 3397's own example: eng.apple.com and marketing.apple.com, the second ending in a
        // pointer to "apple.com" inside the first.
        let mut list = b"\x03eng\x05apple\x03com\x00".to_vec();
        list.extend(b"\x09marketing\xc0\x04");
        assert_eq!(
            domain_search_list(&list).unwrap(),
            ["eng.apple.com", "marketing.apple.com"]
        );
        // Chains of pointers, each further back.
        let mut chain = b"\x04test\x00\x03lan\xc0\x00".to_vec();
        chain.extend(b"\x03svc\xc0\x06");
        assert_eq!(
            domain_search_list(&chain).unwrap(),
            ["test", "lan.test", "svc.lan.test"]
        );
        let refused = |data: &[u8]| domain_search_list(data).unwrap_err();
        // A pointer to itself, forwards, or back into its own name would loop or read ahead.
        assert!(refused(b"\x01a\xc0\x00").contains("not to an earlier name"));
        assert!(refused(b"\x01a\xc0\x05\x00\x00\x00").contains("not to an earlier name"));
        // A pointer into an earlier name whose own pointer leads back past the jump.
        let mut sneaky = b"\x01a\x00".to_vec(); // 0..3
        sneaky.extend(b"\x01b\xc0\x00"); // 3..7: b.a
        sneaky.extend(b"\xc0\x05"); // 7: into "b"'s pointer at 5, which goes to 0 (< 5): ends
        assert_eq!(domain_search_list(&sneaky).unwrap(), ["a", "b.a", "a"]);
        let mut looping = b"\x01a\x00".to_vec(); // 0..3
        looping.extend(b"\x01b\xc0\x03"); // 3..7: pointer at 5 to its own name: refused
        assert!(refused(&looping).contains("pointer at byte 5 to byte 3"));
        assert!(refused(b"\x05abc").contains("run past the end"));
        assert!(refused(b"\x03abc").contains("runs past the end"));
        assert!(refused(b"\x03abc\xc0").contains("cut off"));
        assert!(refused(b"\x41abc\x00").contains("reserved"));
        assert!(refused(b"\x03a_b\x00").contains("not of DNS labels"));
        assert!(refused(b"\x00").contains("not of DNS labels"));
        let long: Vec<u8> = (0..5)
            .flat_map(|_| [&[63u8][..], &[b'a'; 63][..]].concat())
            .chain([0])
            .collect();
        assert!(refused(&long).contains("longer than 253"));
    }

    #[test]
    fn the_search_list_reaches_the_lease_trimmed() {
        let mut options = slirp_options();
        let mut list = Vec::new();
        for name in [
            "a.test", "b.test", "a.test", "c.test", "d.test", "e.test", "f.test", "g.test",
        ] {
            for label in name.split('.') {
                list.push(label.len() as u8);
                list.extend(label.as_bytes());
            }
            list.push(0);
        }
        options.push((OPT_DOMAIN_SEARCH, list));
        let r = parse_reply(&reply(5, 7, [10, 0, 2, 15], &options), 7, &MAC).unwrap();
        assert_eq!(
            r.lease.unwrap().search,
            ["a.test", "b.test", "c.test", "d.test", "e.test", "f.test"]
        );
        assert_eq!(r.ignored, ["search domain g.test: more than 6"]);
        let mut bad = slirp_options();
        bad.push((OPT_DOMAIN_SEARCH, b"\x01a\xc0\x00".to_vec()));
        let r = parse_reply(&reply(5, 7, [10, 0, 2, 15], &bad), 7, &MAC).unwrap();
        assert!(r.lease.unwrap().search.is_empty());
        assert!(r.ignored[0].starts_with("domain search list: pointer at byte 2"));
    }

    #[test]
    fn dns_names() {
        for good in ["node-a", "a.b.c", "x1", "cluster.local"] {
            assert!(valid_dns_name(good), "{good}");
        }
        for bad in ["", "-a", "a-", "a..b", "a_b", "a b", &"a".repeat(64)] {
            assert!(!valid_dns_name(bad), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn arbitrary_search_lists_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = domain_search_list(&bytes);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..700)) {
            let _ = parse_reply(&bytes, 7, &MAC);
        }

        #[test]
        fn arbitrary_options_never_panic(options in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..20)) {
            let _ = parse_reply(&reply(5, 7, [10, 0, 2, 15], &options), 7, &MAC);
            let _ = parse_reply(&reply(2, 7, [10, 0, 2, 15], &options), 7, &MAC);
        }
    }
}
