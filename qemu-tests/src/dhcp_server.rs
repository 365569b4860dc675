//! A DHCP server for boot tests, on a network of its own: QEMU's `dgram` netdev carries the
//! guest NIC's Ethernet frames as UDP datagrams on the host's loopback, and this answers ARP
//! for its address and DHCP with the options a test chooses (router, DNS, domain, host name,
//! MTU, a short lease), hostile replies first when asked, and counts renewals. QEMU's own
//! DHCP server cannot do this: restricted (`restrict=on`), it leaves out router and DNS, and
//! its lease is a day.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 1);
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 15);
const SERVER_MAC: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0xbb, 0x01];

/// What the server hands out.
#[derive(Debug, Clone)]
pub struct Offer {
    pub lease_seconds: u32,
    pub router: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub domain: Option<String>,
    /// The domain search list (option 119), names compressed as RFC 3397 allows.
    pub search: Vec<String>,
    pub host_name: Option<String>,
    pub mtu: Option<u16>,
    /// Sent before each good OFFER: a reply the client must refuse (a non-contiguous netmask).
    pub hostile_first: bool,
}

impl Default for Offer {
    fn default() -> Self {
        Offer {
            lease_seconds: 3600,
            router: Some(SERVER_IP),
            dns: vec![Ipv4Addr::new(10, 0, 3, 53), Ipv4Addr::new(10, 0, 3, 54)],
            domain: Some("lan.test".into()),
            search: vec!["lan.test".into(), "svc.lan.test".into()],
            host_name: Some("served-node".into()),
            mtu: Some(1400),
            hostile_first: false,
        }
    }
}

/// The running server: its QEMU netdev option and what it saw.
pub struct DhcpServer {
    /// `-netdev` value for the guest's NIC (id n0).
    pub netdev: String,
    pub discovers: Arc<AtomicUsize>,
    /// REQUESTs from a bound client (ciaddr set): renewals and rebinds.
    pub renewals: Arc<AtomicUsize>,
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn ethernet(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend(SERVER_MAC);
    f.extend(ethertype.to_be_bytes());
    f.extend(payload);
    f
}

fn udp_ip(dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut udp = Vec::new();
    udp.extend(67u16.to_be_bytes());
    udp.extend(68u16.to_be_bytes());
    udp.extend(((8 + payload.len()) as u16).to_be_bytes());
    udp.extend(0u16.to_be_bytes()); // no checksum (allowed over IPv4)
    udp.extend(payload);
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + udp.len()) as u16).to_be_bytes());
    ip.extend([0, 0, 0x40, 0, 64, 17, 0, 0]);
    ip.extend(SERVER_IP.octets());
    ip.extend(dst.octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend(udp);
    ip
}

fn option(out: &mut Vec<u8>, code: u8, data: &[u8]) {
    out.push(code);
    out.push(data.len() as u8);
    out.extend(data);
}

/// Names in DNS wire format, a name's tail that was written before replaced by a pointer to it.
fn search_list(names: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut written: Vec<(String, usize)> = Vec::new();
    for name in names {
        let labels: Vec<&str> = name.split('.').collect();
        for i in 0..=labels.len() {
            let tail = labels[i..].join(".");
            if let Some((_, at)) = written
                .iter()
                .find(|(n, _)| *n == tail)
                .filter(|_| i < labels.len())
            {
                out.extend([0xc0 | (at >> 8) as u8, *at as u8]);
                break;
            }
            if i == labels.len() {
                out.push(0);
                break;
            }
            written.push((tail, out.len()));
            out.push(labels[i].len() as u8);
            out.extend(labels[i].as_bytes());
        }
    }
    out
}

/// A DHCP reply to `request` of `kind` (2 OFFER, 5 ACK), with `offer`'s options.
fn reply(request: &[u8], kind: u8, offer: &Offer, hostile: bool) -> Vec<u8> {
    let mut m = vec![0u8; 236];
    m[0] = 2;
    m[1] = 1;
    m[2] = 6;
    m[4..8].copy_from_slice(&request[4..8]);
    m[10..12].copy_from_slice(&request[10..12]);
    m[16..20].copy_from_slice(&CLIENT_IP.octets());
    m[20..24].copy_from_slice(&SERVER_IP.octets());
    m[28..44].copy_from_slice(&request[28..44]);
    m.extend([99, 130, 83, 99]);
    option(&mut m, 53, &[kind]);
    option(&mut m, 54, &SERVER_IP.octets());
    option(&mut m, 51, &offer.lease_seconds.to_be_bytes());
    option(
        &mut m,
        1,
        if hostile {
            &[255, 0, 255, 0]
        } else {
            &[255, 255, 255, 0]
        },
    );
    if let Some(r) = offer.router {
        option(&mut m, 3, &r.octets());
    }
    if !offer.dns.is_empty() {
        let dns: Vec<u8> = offer.dns.iter().flat_map(|d| d.octets()).collect();
        option(&mut m, 6, &dns);
    }
    if let Some(d) = &offer.domain {
        option(&mut m, 15, d.as_bytes());
    }
    if !offer.search.is_empty() {
        option(&mut m, 119, &search_list(&offer.search));
    }
    if let Some(h) = &offer.host_name {
        option(&mut m, 12, h.as_bytes());
    }
    if let Some(mtu) = offer.mtu {
        option(&mut m, 26, &mtu.to_be_bytes());
    }
    m.push(255);
    m
}

/// The DHCP message type and ciaddr of a request.
fn request_kind(dhcp: &[u8]) -> Option<(u8, Ipv4Addr)> {
    if dhcp.len() < 240 || dhcp[0] != 1 || dhcp[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let ciaddr = Ipv4Addr::new(dhcp[12], dhcp[13], dhcp[14], dhcp[15]);
    let mut at = 240;
    while at + 1 < dhcp.len() {
        match dhcp[at] {
            0 => at += 1,
            255 => break,
            code => {
                let len = dhcp[at + 1] as usize;
                if code == 53 && len == 1 && at + 2 < dhcp.len() {
                    return Some((dhcp[at + 2], ciaddr));
                }
                at += 2 + len;
            }
        }
    }
    None
}

impl DhcpServer {
    /// Starts serving; `answer = false` is a link where nothing answers DHCP (ARP still does).
    pub fn start(offer: Offer, answer: bool) -> DhcpServer {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("the test network's socket");
        let ours = socket.local_addr().unwrap().port();
        let qemu_port = crate::support::free_port();
        let netdev = format!(
            "dgram,id=n0,local.type=inet,local.host=127.0.0.1,local.port={qemu_port},remote.type=inet,remote.host=127.0.0.1,remote.port={ours}"
        );
        let discovers = Arc::new(AtomicUsize::new(0));
        let renewals = Arc::new(AtomicUsize::new(0));
        let (d, r) = (discovers.clone(), renewals.clone());
        std::thread::spawn(move || {
            let to_qemu = ("127.0.0.1", qemu_port);
            let mut buf = vec![0u8; 2048];
            while let Ok(n) = socket.recv(&mut buf) {
                let frame = &buf[..n];
                if frame.len() < 14 {
                    continue;
                }
                let src: [u8; 6] = frame[6..12].try_into().unwrap();
                match u16::from_be_bytes([frame[12], frame[13]]) {
                    0x0806 if frame.len() >= 42 && frame[20..22] == [0, 1] => {
                        // An ARP request for our address: the reply.
                        if frame[38..42] != SERVER_IP.octets() {
                            continue;
                        }
                        let mut arp = frame[14..42].to_vec();
                        arp[6..8].copy_from_slice(&[0, 2]);
                        let (sender_mac, sender_ip) =
                            (frame[22..28].to_vec(), frame[28..32].to_vec());
                        arp[8..14].copy_from_slice(&SERVER_MAC);
                        arp[14..18].copy_from_slice(&SERVER_IP.octets());
                        arp[18..24].copy_from_slice(&sender_mac);
                        arp[24..28].copy_from_slice(&sender_ip);
                        let _ = socket.send_to(&ethernet(src, 0x0806, &arp), to_qemu);
                    }
                    0x0800 if answer && frame.len() >= 14 + 28 => {
                        let ip = &frame[14..];
                        let header = ((ip[0] & 0x0f) as usize) * 4;
                        if ip[9] != 17 || ip.len() < header + 8 {
                            continue;
                        }
                        let udp = &ip[header..];
                        if u16::from_be_bytes([udp[2], udp[3]]) != 67 {
                            continue;
                        }
                        let dhcp = &udp[8..];
                        let Some((kind, ciaddr)) = request_kind(dhcp) else {
                            continue;
                        };
                        let (reply_kind, counter) = match kind {
                            1 => (2, &d),
                            3 => (5, &r),
                            _ => continue,
                        };
                        if kind == 1 || !ciaddr.is_unspecified() {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                        // Bound clients get unicast; others the broadcast they asked for.
                        let (mac, to) = if ciaddr.is_unspecified() {
                            ([0xff; 6], Ipv4Addr::BROADCAST)
                        } else {
                            (src, ciaddr)
                        };
                        if offer.hostile_first && kind == 1 {
                            let bad = reply(dhcp, reply_kind, &offer, true);
                            let _ =
                                socket.send_to(&ethernet(mac, 0x0800, &udp_ip(to, &bad)), to_qemu);
                        }
                        let good = reply(dhcp, reply_kind, &offer, false);
                        let _ = socket.send_to(&ethernet(mac, 0x0800, &udp_ip(to, &good)), to_qemu);
                    }
                    _ => {}
                }
            }
        });
        DhcpServer {
            netdev,
            discovers,
            renewals,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_checksum_of_a_known_header() {
        // RFC 1071's example header (checksum field zeroed) sums to 0xb861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&header), 0xb861);
    }

    #[test]
    fn search_lists_are_compressed() {
        let names = ["lan.test".to_string(), "svc.lan.test".to_string()];
        assert_eq!(
            search_list(&names),
            b"\x03lan\x04test\x00\x03svc\xc0\x00".to_vec()
        );
    }
}
