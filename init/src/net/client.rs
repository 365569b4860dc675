//! The DHCP client's exchanges, over a small `Wire` trait so that they are unit-tested without
//! a network: DISCOVER → OFFER → REQUEST → ACK for a new lease, and REQUEST → ACK to renew
//! (unicast to the server) or rebind (broadcast). Retransmissions back off from 1 s to 8 s.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::dhcp::{parse_reply, Lease, MessageType, Request};

/// Sends and receives DHCP messages on one interface.
pub trait Wire {
    /// To the server's address, or broadcast when `None`.
    fn send(&mut self, message: &[u8], to: Option<Ipv4Addr>) -> std::io::Result<()>;
    /// One datagram, or `None` when `timeout` passes first.
    fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>>;
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no DHCP answer within {0:?}")]
    NoAnswer(Duration),
    #[error("the server refused the request (DHCPNAK from {0})")]
    Nak(String),
    #[error("cannot send or receive DHCP messages")]
    Io(#[source] std::io::Error),
}

/// Who we are to the server.
pub struct Client<'a> {
    pub mac: [u8; 6],
    pub host_name: Option<&'a str>,
    /// Logs each reply that was not used, and why.
    pub log_rejected: &'a dyn Fn(String),
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_secs(1u64 << attempt.min(3))
}

fn new_xid() -> u32 {
    let mut b = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut b);
    }
    u32::from_ne_bytes(b) ^ std::process::id()
}

impl Client<'_> {
    /// A message of this client's: (kind, transaction, seconds since it began, our address
    /// when bound, the offered address and chosen server when selecting).
    fn message(
        &self,
        kind: MessageType,
        xid: u32,
        secs: u16,
        client_address: Option<Ipv4Addr>,
        selecting: Option<(Ipv4Addr, Ipv4Addr)>,
    ) -> Vec<u8> {
        Request {
            kind,
            xid,
            mac: self.mac,
            secs,
            client_address,
            requested: selecting.map(|(address, _)| address),
            server: selecting.map(|(_, server)| server),
            host_name: self.host_name,
        }
        .encode()
    }

    /// Sends `request` until a reply of one of `kinds` for `xid` arrives or `deadline` passes.
    fn exchange(
        &self,
        wire: &mut dyn Wire,
        request: &dyn Fn(u16) -> Vec<u8>,
        to: Option<Ipv4Addr>,
        xid: u32,
        deadline: Instant,
        started: Instant,
    ) -> Result<Option<super::dhcp::Reply>, ClientError> {
        let mut attempt = 0;
        while Instant::now() < deadline {
            let secs = started.elapsed().as_secs().min(u16::MAX as u64) as u16;
            wire.send(&request(secs), to).map_err(ClientError::Io)?;
            let wait_until = (Instant::now() + backoff(attempt)).min(deadline);
            attempt += 1;
            loop {
                let left = wait_until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                let Some(bytes) = wire.recv(left).map_err(ClientError::Io)? else {
                    continue; // the loop ends when the wait is over
                };
                match parse_reply(&bytes, xid, &self.mac) {
                    Ok(reply) => {
                        for why in &reply.ignored {
                            (self.log_rejected)(format!("left out of the reply: {why}"));
                        }
                        return Ok(Some(reply));
                    }
                    // Other clients' traffic is normal on a shared segment: only say it at
                    // debug level; malformed replies for us are worth a line.
                    Err(super::dhcp::DhcpError::NotOurs(why)) => {
                        log::debug!("network: ignoring a DHCP message: {why}")
                    }
                    Err(e) => (self.log_rejected)(format!("refused a DHCP reply: {e}")),
                }
            }
        }
        Ok(None)
    }

    /// A new lease: DISCOVER, the first acceptable OFFER, REQUEST, ACK.
    pub fn acquire(&self, wire: &mut dyn Wire, within: Duration) -> Result<Lease, ClientError> {
        let started = Instant::now();
        let deadline = started + within;
        loop {
            let xid = new_xid();
            let discover = |secs| self.message(MessageType::Discover, xid, secs, None, None);
            let offer = match self.exchange(wire, &discover, None, xid, deadline, started)? {
                None => return Err(ClientError::NoAnswer(within)),
                Some(r) if r.kind == MessageType::Offer && r.lease.is_some() => r.lease.unwrap(),
                Some(r) => {
                    (self.log_rejected)(format!("expected an OFFER, got a {:?}", r.kind));
                    continue;
                }
            };
            let selecting = Some((offer.address, offer.server));
            let request = |secs| self.message(MessageType::Request, xid, secs, None, selecting);
            // The REQUEST gets a few tries; then the whole exchange starts over.
            let ack_deadline = (Instant::now() + Duration::from_secs(8)).min(deadline);
            match self.exchange(wire, &request, None, xid, ack_deadline, started)? {
                Some(r) if r.kind == MessageType::Ack && r.lease.is_some() => {
                    return Ok(r.lease.unwrap())
                }
                Some(r) if r.kind == MessageType::Nak => {
                    (self.log_rejected)(format!(
                        "DHCPNAK for {} from {}: starting over",
                        offer.address,
                        r.server.map(|s| s.to_string()).unwrap_or("?".into())
                    ));
                }
                _ if Instant::now() >= deadline => return Err(ClientError::NoAnswer(within)),
                _ => {}
            }
        }
    }

    /// Extends `lease`: a REQUEST from its address, to its server (renewing) or to everyone
    /// (rebinding), until `deadline`.
    pub fn extend(
        &self,
        wire: &mut dyn Wire,
        lease: &Lease,
        rebinding: bool,
        deadline: Instant,
    ) -> Result<Lease, ClientError> {
        let started = Instant::now();
        let xid = new_xid();
        let request =
            |secs| self.message(MessageType::Request, xid, secs, Some(lease.address), None);
        let to = if rebinding { None } else { Some(lease.server) };
        match self.exchange(wire, &request, to, xid, deadline, started)? {
            Some(r) if r.kind == MessageType::Ack && r.lease.is_some() => Ok(r.lease.unwrap()),
            Some(r) if r.kind == MessageType::Nak => Err(ClientError::Nak(
                r.server.map(|s| s.to_string()).unwrap_or("?".into()),
            )),
            _ => Err(ClientError::NoAnswer(
                deadline.saturating_duration_since(started),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::dhcp::tests::{reply, slirp_options, MAC};
    use super::*;
    use std::collections::VecDeque;

    /// A scripted server: answers each request with what `respond` returns.
    struct Scripted<F: FnMut(&[u8]) -> Vec<Vec<u8>>> {
        respond: F,
        queue: VecDeque<Vec<u8>>,
        sent: Vec<(Vec<u8>, Option<Ipv4Addr>)>,
    }

    impl<F: FnMut(&[u8]) -> Vec<Vec<u8>>> Wire for Scripted<F> {
        fn send(&mut self, m: &[u8], to: Option<Ipv4Addr>) -> std::io::Result<()> {
            self.sent.push((m.to_vec(), to));
            self.queue.extend((self.respond)(m));
            Ok(())
        }
        fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
            match self.queue.pop_front() {
                Some(m) => Ok(Some(m)),
                None => {
                    std::thread::sleep(timeout.min(Duration::from_millis(5)));
                    Ok(None)
                }
            }
        }
    }

    fn xid_and_type(m: &[u8]) -> (u32, u8) {
        (u32::from_be_bytes(m[4..8].try_into().unwrap()), m[242])
    }

    fn client(log: &dyn Fn(String)) -> Client<'_> {
        Client {
            mac: MAC,
            host_name: None,
            log_rejected: log,
        }
    }

    #[test]
    fn discover_offer_request_ack() {
        let log = |_: String| {};
        let mut wire = Scripted {
            respond: |m: &[u8]| {
                let (xid, kind) = xid_and_type(m);
                let answer = if kind == 1 { 2 } else { 5 };
                // A stranger's reply first: ignored.
                vec![
                    reply(answer, xid ^ 1, [10, 0, 2, 99], &slirp_options()),
                    reply(answer, xid, [10, 0, 2, 15], &slirp_options()),
                ]
            },
            queue: VecDeque::new(),
            sent: Vec::new(),
        };
        let lease = client(&log)
            .acquire(&mut wire, Duration::from_secs(5))
            .unwrap();
        assert_eq!(lease.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(wire.sent.len(), 2);
        assert!(wire.sent.iter().all(|(_, to)| to.is_none()));
        // Renewing goes to the server, rebinding to everyone.
        let mut renewals = Scripted {
            respond: |m: &[u8]| {
                vec![reply(
                    5,
                    xid_and_type(m).0,
                    [10, 0, 2, 15],
                    &slirp_options(),
                )]
            },
            queue: VecDeque::new(),
            sent: Vec::new(),
        };
        let c = client(&log);
        let soon = Instant::now() + Duration::from_secs(2);
        c.extend(&mut renewals, &lease, false, soon).unwrap();
        c.extend(&mut renewals, &lease, true, soon).unwrap();
        assert_eq!(renewals.sent[0].1, Some(Ipv4Addr::new(10, 0, 2, 2)));
        assert_eq!(renewals.sent[1].1, None);
        assert_eq!(&renewals.sent[0].0[12..16], &[10, 0, 2, 15]);
    }

    #[test]
    fn silence_times_out_and_a_nak_is_reported() {
        let log = |_: String| {};
        let mut silent = Scripted {
            respond: |_: &[u8]| Vec::new(),
            queue: VecDeque::new(),
            sent: Vec::new(),
        };
        let started = Instant::now();
        let e = client(&log)
            .acquire(&mut silent, Duration::from_millis(1500))
            .unwrap_err();
        assert!(matches!(e, ClientError::NoAnswer(_)));
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(silent.sent.len(), 2, "sent at 0 s and after 1 s");
        let mut nak = Scripted {
            respond: |m: &[u8]| {
                vec![reply(
                    6,
                    xid_and_type(m).0,
                    [0; 4],
                    &[(54, vec![10, 0, 2, 2])],
                )]
            },
            queue: VecDeque::new(),
            sent: Vec::new(),
        };
        let lease = parse_reply(&reply(5, 1, [10, 0, 2, 15], &slirp_options()), 1, &MAC)
            .unwrap()
            .lease
            .unwrap();
        let e = client(&log)
            .extend(
                &mut nak,
                &lease,
                false,
                Instant::now() + Duration::from_secs(1),
            )
            .unwrap_err();
        assert!(e.to_string().contains("DHCPNAK from 10.0.2.2"), "{e}");
    }

    #[test]
    fn malformed_replies_are_logged_and_skipped() {
        let logged = std::cell::RefCell::new(Vec::new());
        let log = |line: String| logged.borrow_mut().push(line);
        let mut wire = Scripted {
            respond: |m: &[u8]| {
                let (xid, kind) = xid_and_type(m);
                let answer = if kind == 1 { 2 } else { 5 };
                let mut bad = slirp_options();
                bad.push((1, vec![255, 0, 255, 0]));
                bad.retain(|(c, d)| *c != 1 || d[1] == 0);
                vec![
                    reply(answer, xid, [10, 0, 2, 15], &bad),
                    reply(answer, xid, [10, 0, 2, 15], &slirp_options()),
                ]
            },
            queue: VecDeque::new(),
            sent: Vec::new(),
        };
        client(&log)
            .acquire(&mut wire, Duration::from_secs(5))
            .unwrap();
        let logged = logged.borrow();
        assert!(
            logged
                .iter()
                .any(|l| l.contains("refused a DHCP reply") && l.contains("contiguous")),
            "{logged:?}"
        );
    }
}
