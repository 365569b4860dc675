//! The node's network, before anything needs it: loopback, the primary interface (named, or
//! the first ethernet), its link and carrier, an address from DHCP (renewed for as long as the
//! node runs) or from the configuration, routes, resolv.conf and hosts where containerd and
//! the kubelet read them, and the host name. The host runs the network and its DHCP server:
//! what it says is validated (`dhcp`), logged, and decides nothing security-relevant (the key
//! broker's identity comes from the measured configuration).

pub mod client;
pub mod dhcp;
pub mod files;
pub mod netlink;
pub mod node_name;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use self::client::{Client, ClientError, Wire};
use self::dhcp::Lease;
use self::netlink::{Link, Netlink, NetlinkError, Origin, LINK_ETHER, LINK_LOOPBACK};

/// `[network]` of the configuration file. With `address` the interface is configured
/// statically; without it, by DHCP.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The interface, as the kernel names it (`eth0`); default the first ethernet interface.
    #[serde(default)]
    pub interface: Option<String>,
    /// A static `a.b.c.d/len` (no DHCP).
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// Name servers: with a static address, or instead of those DHCP gives.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
    /// Search domains for resolv.conf (DHCP's domain otherwise).
    #[serde(default)]
    pub search: Vec<String>,
    /// The host name, unless `cvm.hostname=` gives one; else (with `hostname_from_dhcp`)
    /// DHCP's, else one the node derives from its state disk's key.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Take the host name DHCP offers when neither the command line nor `hostname` names the
    /// node. Off by default: the host answers DHCP, and the host name becomes the node's
    /// Kubernetes identity, so the host would choose which node this one claims to be.
    #[serde(default)]
    pub hostname_from_dhcp: bool,
    #[serde(default)]
    pub mtu: Option<u16>,
    /// What the boot does when no DHCP server answers within `dhcp_timeout_s`.
    #[serde(default)]
    pub on_no_lease: NoLease,
    /// Seconds to wait for the interface to appear and its carrier (default 10).
    #[serde(default)]
    pub link_timeout_s: Option<u64>,
    /// Seconds of DHCP before `on_no_lease` applies (default 30).
    #[serde(default)]
    pub dhcp_timeout_s: Option<u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NoLease {
    /// Keep asking; the boot waits (and says so on every attempt).
    #[default]
    Wait,
    /// Go on without network, and keep asking in the background.
    Continue,
    /// Stop the boot.
    Fail,
}

/// What the kernel command line adds (measured with it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetOptions {
    pub interface: Option<String>,
    pub hostname: Option<String>,
    /// Test builds: leases are cut to this many seconds, so renewals happen within a test.
    pub lease_cap: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network.address {0:?} is not an IPv4 address with a prefix length (a.b.c.d/len)")]
    Address(String),
    #[error("network interface name {0:?} is not 1 to 15 characters of [A-Za-z0-9_.-]")]
    Name(String),
    #[error("no network interface {name} appeared within {waited:?} (seen: {seen})")]
    Missing {
        name: String,
        waited: Duration,
        seen: String,
    },
    #[error("no ethernet interface appeared within {waited:?} (seen: {seen})")]
    NoEthernet { waited: Duration, seen: String },
    #[error("no DHCP lease on {interface} and network.on_no_lease is \"fail\"")]
    NoLease {
        interface: String,
        #[source]
        source: ClientError,
    },
    #[error("cannot open the DHCP socket on {interface}")]
    Socket {
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Files(#[from] files::FilesError),
}

/// Parses `a.b.c.d/len` into the address and its netmask.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, Ipv4Addr), NetError> {
    let bad = || NetError::Address(text.to_string());
    let (address, len) = text.split_once('/').ok_or_else(bad)?;
    let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
    let len: u32 = len.parse().map_err(|_| bad())?;
    if !(1..=32).contains(&len) {
        return Err(bad());
    }
    Ok((address, Ipv4Addr::from(prefix_mask(len as u8))))
}

pub fn valid_name(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The `[network]` rules: (field, value, what was expected) for each value that breaks one.
pub fn check_config(cfg: &NetworkConfig) -> Vec<(&'static str, String, &'static str)> {
    let mut bad = Vec::new();
    if let Some(a) = &cfg.address {
        if parse_cidr(a).is_err() {
            bad.push(("network.address", a.clone(), "a.b.c.d/len"));
        }
    }
    if let (None, Some(gateway)) = (&cfg.address, cfg.gateway) {
        bad.push((
            "network.gateway",
            gateway.to_string(),
            "no gateway without a static address (DHCP gives the router)",
        ));
    }
    if let Some(i) = &cfg.interface {
        if !valid_name(i) {
            bad.push((
                "network.interface",
                i.clone(),
                "1 to 15 characters of [A-Za-z0-9_.-]",
            ));
        }
    }
    if let Some(h) = &cfg.hostname {
        if h.len() > 64 || !dhcp::valid_dns_name(h) {
            bad.push((
                "network.hostname",
                h.clone(),
                "DNS labels, at most 64 characters",
            ));
        }
    }
    for s in &cfg.search {
        if !dhcp::valid_dns_name(s) {
            bad.push(("network.search", s.clone(), "domain names of DNS labels"));
        }
    }
    if cfg.dns.len() > dhcp::MAX_DNS {
        bad.push((
            "network.dns",
            format!("{} servers", cfg.dns.len()),
            "at most 3 name servers",
        ));
    }
    if let Some(m) = cfg.mtu {
        if m < 576 {
            bad.push(("network.mtu", m.to_string(), "at least 576"));
        }
    }
    for (field, value) in [
        ("network.link_timeout_s", cfg.link_timeout_s),
        ("network.dhcp_timeout_s", cfg.dhcp_timeout_s),
    ] {
        if let Some(v) = value {
            if !(1..=3600).contains(&v) {
                bad.push((field, v.to_string(), "1 to 3600 seconds"));
            }
        }
    }
    bad
}

/// The first ethernet interface by index: the primary one unless another is named.
fn first_ethernet(links: &[Link]) -> Option<&Link> {
    links
        .iter()
        .filter(|l| l.kind == LINK_ETHER && l.mac.len() == 6)
        .min_by_key(|l| l.index)
}

fn names(links: &[Link]) -> String {
    let mut names: Vec<&str> = links.iter().map(|l| l.name.as_str()).collect();
    names.sort();
    names.join(", ")
}

/// Finds the interface (by name, or the first ethernet by index), waiting for it to appear.
fn find_interface(nl: &mut Netlink, name: Option<&str>, wait: Duration) -> Result<Link, NetError> {
    let deadline = Instant::now() + wait;
    loop {
        let links = nl.links()?;
        let found = match name {
            Some(name) => links.iter().find(|l| l.name == name),
            None => first_ethernet(&links),
        };
        if let Some(link) = found {
            return Ok(link.clone());
        }
        if Instant::now() >= deadline {
            return Err(match name {
                Some(name) => NetError::Missing {
                    name: name.to_string(),
                    waited: wait,
                    seen: names(&links),
                },
                None => NetError::NoEthernet {
                    waited: wait,
                    seen: names(&links),
                },
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits for the carrier; false when it does not come within `wait`.
fn wait_for_carrier(nl: &mut Netlink, index: u32, wait: Duration) -> Result<bool, NetError> {
    let deadline = Instant::now() + wait;
    loop {
        if nl.links()?.iter().any(|l| l.index == index && l.carrier) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// DHCP over a UDP socket bound to port 68 on the interface: broadcasts leave through it
/// before it has an address, and replies are broadcast until then (the request asks so).
struct UdpWire(UdpSocket);

impl UdpWire {
    fn open(interface: &str) -> std::io::Result<UdpWire> {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 68))?;
        socket.set_broadcast(true)?;
        if interface.contains('\0') {
            return Err(std::io::ErrorKind::InvalidInput.into());
        }
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::BindToDevice,
            &std::ffi::OsString::from(interface),
        )?;
        Ok(UdpWire(socket))
    }
}

impl Wire for UdpWire {
    fn send(&mut self, message: &[u8], to: Option<Ipv4Addr>) -> std::io::Result<()> {
        self.0
            .send_to(message, (to.unwrap_or(Ipv4Addr::BROADCAST), 67))
            .map(drop)
    }

    fn recv(&mut self, timeout: Duration) -> std::io::Result<Option<Vec<u8>>> {
        self.0
            .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))?;
        let mut buf = vec![0u8; 1500];
        match self.0.recv_from(&mut buf) {
            Ok((n, _)) => {
                buf.truncate(n);
                Ok(Some(buf))
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
}

/// The netmask of a prefix length (0 to 32).
pub fn prefix_mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

/// Sets the address and the routes of a lease (or of the static configuration).
fn apply_address(
    nl: &mut Netlink,
    index: u32,
    address: Ipv4Addr,
    prefix: u8,
    router: Option<Ipv4Addr>,
    origin: Origin,
) -> Result<(), NetError> {
    nl.add_address(index, address, prefix)?;
    if let Some(router) = router {
        let mask = prefix_mask(prefix);
        if u32::from(router) & mask != u32::from(address) & mask {
            // A router outside the subnet (clouds hand out /32s): reachable on the link.
            nl.add_route(index, router, 32, None, origin)?;
        }
        nl.add_route(index, Ipv4Addr::UNSPECIFIED, 0, Some(router), origin)?;
    }
    Ok(())
}

/// Where the node's name came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameFrom {
    CmdLine,
    Config,
    Dhcp,
    /// Nobody named the node: [`node_name::generate`], replaced in the state phase by the name
    /// the state disk's key gives.
    Generated,
}

impl std::fmt::Display for NameFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NameFrom::CmdLine => "from cvm.hostname",
            NameFrom::Config => "from network.hostname",
            NameFrom::Dhcp => "from DHCP",
            NameFrom::Generated => "generated by the node",
        })
    }
}

/// The host name: the command line's, the configuration's, DHCP's (only with
/// `network.hostname_from_dhcp = true`: the host answers DHCP), else one the node generates.
/// Never the MAC address: the host chooses it.
fn choose_hostname(
    options: &NetOptions,
    cfg: Option<&NetworkConfig>,
    dhcp: Option<&str>,
) -> (String, NameFrom) {
    if let Some(name) = &options.hostname {
        return (name.clone(), NameFrom::CmdLine);
    }
    if let Some(name) = cfg.and_then(|c| c.hostname.clone()) {
        return (name, NameFrom::Config);
    }
    let dhcp_allowed = cfg.is_some_and(|c| c.hostname_from_dhcp);
    match dhcp {
        Some(name) if dhcp_allowed => {
            return (
                name.split('.').next().unwrap_or(name).to_string(),
                NameFrom::Dhcp,
            );
        }
        Some(name) => log::info!(
            "network: DHCP offers the host name {name}, not used (network.hostname_from_dhcp is off)"
        ),
        None => {}
    }
    (node_name::generate(), NameFrom::Generated)
}

/// The shortest lease the node keeps, in seconds. A shorter lease (or a renewal time of a few
/// seconds) would have the node renew in a tight loop at the host's bidding; it is treated as
/// a lease of this length, renewed at half of it.
pub const MIN_LEASE: u32 = 60;

/// Applies the floor to a lease, and the test hook's cut (`cvm.test-dhcp-lease=`), which is
/// the only thing that lowers the floor (to the cut).
fn bound_lease(mut lease: Lease, cap: Option<u32>) -> Lease {
    let floor = cap.map_or(MIN_LEASE, |cap| cap.min(MIN_LEASE));
    if let Some(cap) = cap {
        if lease.lease_time > cap {
            lease.lease_time = cap;
            lease.renew_after = cap / 2;
            lease.rebind_after = cap * 7 / 8;
        }
    }
    if lease.lease_time < floor {
        log::warn!(
            "network: a DHCP lease of {} s is below the floor; kept as {floor} s",
            lease.lease_time
        );
        lease.lease_time = floor;
        lease.renew_after = floor / 2;
        lease.rebind_after = floor * 7 / 8;
    }
    // A long lease with a renewal time of seconds: renew no sooner than at half the floor
    // (still before rebinding, which stays before the lease's end).
    if lease.renew_after < floor / 2 {
        lease.renew_after = floor / 2;
        lease.rebind_after = lease.rebind_after.max(floor * 7 / 8);
    }
    lease
}

/// Everything a lease configures, and the files that follow from it.
struct Applied {
    interface: String,
    index: u32,
    mac: [u8; 6],
    /// The name sent in DHCP requests: a configured one (or DHCP's own), never a generated one.
    dhcp_name: Option<String>,
    cfg: NetworkConfig,
}

impl Applied {
    /// The DHCP client of the lease threads, named as the node now is.
    fn client(&self) -> Client<'_> {
        Client {
            mac: self.mac,
            host_name: self.dhcp_name.as_deref(),
            log_rejected: &log_rejected,
        }
    }

    fn apply(
        &self,
        nl: &mut Netlink,
        lease: &Lease,
        previous: Option<&Lease>,
    ) -> Result<(), NetError> {
        if self.cfg.mtu.is_none() {
            if let Some(mtu) = lease.mtu {
                nl.set_up(self.index, Some(mtu as u32))?;
            }
        }
        apply_address(
            nl,
            self.index,
            lease.address,
            lease.prefix,
            lease.router,
            Origin::Dhcp,
        )?;
        if let Some(old) =
            previous.filter(|old| old.address != lease.address || old.prefix != lease.prefix)
        {
            nl.remove_address(self.index, old.address, old.prefix)?;
        }
        let dns = if self.cfg.dns.is_empty() {
            lease.dns.clone()
        } else {
            self.cfg.dns.clone()
        };
        // The configuration's list, else the server's search list, else its domain.
        let search = if !self.cfg.search.is_empty() {
            self.cfg.search.clone()
        } else if !lease.search.is_empty() {
            lease.search.clone()
        } else {
            lease.domain.iter().cloned().collect()
        };
        files::write(
            &files::Resolver {
                nameservers: dns,
                search,
                source: format!("DHCP on {}", self.interface),
            },
            Some(lease.address),
        )?;
        Ok(())
    }
}

fn describe(lease: &Lease) -> String {
    format!(
        "{}/{}{}{}, DNS {}, lease {} s (renewal after {} s)",
        lease.address,
        lease.prefix,
        lease
            .router
            .map(|r| format!(" via {r}"))
            .unwrap_or_default(),
        lease.mtu.map(|m| format!(", MTU {m}")).unwrap_or_default(),
        if lease.dns.is_empty() {
            "none".to_string()
        } else {
            lease
                .dns
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        },
        lease.lease_time,
        lease.renew_after,
    )
}

fn log_rejected(line: String) {
    log::warn!("network: {line}");
}

/// Keeps the lease for as long as the node runs: renewing at T1 (unicast to the server),
/// rebinding at T2 (broadcast), and past expiry still asking while keeping the address — a
/// host that stops answering must not take the node off the network.
fn keep_lease(mut wire: UdpWire, mut lease: Lease, applied: Applied, cap: Option<u32>) {
    let mut nl = match Netlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            log::error!(
                "network: the lease keeper cannot open netlink: {}",
                crate::logger::chain(&e)
            );
            return;
        }
    };
    let client = applied.client();
    let mut granted = Instant::now();
    loop {
        let at = |secs: u32| granted + Duration::from_secs(secs as u64);
        let (renew, rebind, expiry) = (
            at(lease.renew_after),
            at(lease.rebind_after),
            at(lease.lease_time),
        );
        if lease.lease_time == u32::MAX {
            return; // an infinite lease
        }
        std::thread::sleep(renew.saturating_duration_since(Instant::now()));
        let result = match client.extend(&mut wire, &lease, false, rebind) {
            Ok(new) => Ok(new),
            Err(ClientError::NoAnswer(_)) if Instant::now() < expiry => {
                log::warn!(
                    "network: no answer from {} to renew {}; asking every server",
                    lease.server,
                    lease.address
                );
                client.extend(&mut wire, &lease, true, expiry)
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(new) => {
                let new = bound_lease(new, cap);
                match applied.apply(&mut nl, &new, Some(&lease)) {
                    Ok(()) => log::info!(
                        "network: lease renewed on {}: {}",
                        applied.interface,
                        describe(&new)
                    ),
                    Err(e) => log::error!(
                        "network: cannot apply the renewed lease: {}",
                        crate::logger::chain(&e)
                    ),
                }
                lease = new;
                granted = Instant::now();
            }
            Err(e) => {
                log::error!(
                    "network: the lease of {} on {} was not renewed ({}); keeping the address and asking again in 30 s",
                    lease.address,
                    applied.interface,
                    crate::logger::chain(&e)
                );
                std::thread::sleep(Duration::from_secs(30));
                // Ask again as if at T1 of a fresh lease of the same length.
                granted = Instant::now() - Duration::from_secs(lease.renew_after as u64);
            }
        }
    }
}

/// Waits for a first lease in the background and applies it (`on_no_lease = "continue"`).
fn lease_later(mut wire: UdpWire, applied: Applied, cap: Option<u32>) {
    let client = applied.client();
    loop {
        match client.acquire(&mut wire, Duration::from_secs(60)) {
            Ok(lease) => {
                let lease = bound_lease(lease, cap);
                match Netlink::open()
                    .map_err(NetError::from)
                    .and_then(|mut nl| applied.apply(&mut nl, &lease, None))
                {
                    Ok(()) => {
                        log::info!(
                            "network: {} has {} (late)",
                            applied.interface,
                            describe(&lease)
                        );
                        return keep_lease(wire, lease, applied, cap);
                    }
                    Err(e) => log::error!(
                        "network: cannot apply the lease: {}",
                        crate::logger::chain(&e)
                    ),
                }
            }
            Err(e) => log::warn!(
                "network: still no lease on {}: {}",
                applied.interface,
                crate::logger::chain(&e)
            ),
        }
    }
}

/// Brings the network up: loopback always; with a `[network]` section the interface, by DHCP
/// or statically, and the resolver files and host name.
pub fn bring_up(cfg: Option<&NetworkConfig>, options: &NetOptions) -> Result<NameFrom, NetError> {
    let started = Instant::now();
    let mut nl = Netlink::open()?;
    let links = nl.links()?;
    if let Some(lo) = links.iter().find(|l| l.kind == LINK_LOOPBACK) {
        nl.set_up(lo.index, None)?;
    }
    let Some(cfg) = cfg else {
        let (hostname, from) = choose_hostname(options, None, None);
        files::set_hostname(&hostname)?;
        files::write(&files::Resolver::default(), None)?;
        log::info!("network: loopback only (no [network] in the configuration); host name {hostname} ({from})");
        return Ok(from);
    };
    let name = options.interface.as_deref().or(cfg.interface.as_deref());
    if let Some(name) = name {
        if !valid_name(name) {
            return Err(NetError::Name(name.to_string()));
        }
    }
    let link_wait = Duration::from_secs(cfg.link_timeout_s.unwrap_or(10));
    let interface = find_interface(&mut nl, name, link_wait)?;
    let mac: [u8; 6] = interface.mac.as_slice().try_into().unwrap_or([0; 6]);
    nl.set_up(interface.index, cfg.mtu.map(u32::from))?;
    let carrier = wait_for_carrier(&mut nl, interface.index, link_wait)?;
    if !carrier {
        log::warn!(
            "network: {} has no carrier after {link_wait:?}; trying anyway",
            interface.name
        );
    }
    if let Some(address) = &cfg.address {
        let (address, mask) = parse_cidr(address)?;
        let prefix = u32::from(mask).leading_ones() as u8;
        apply_address(
            &mut nl,
            interface.index,
            address,
            prefix,
            cfg.gateway,
            Origin::Static,
        )?;
        let (hostname, from) = choose_hostname(options, Some(cfg), None);
        files::set_hostname(&hostname)?;
        files::write(
            &files::Resolver {
                nameservers: cfg.dns.clone(),
                search: cfg.search.clone(),
                source: "the configuration".into(),
            },
            Some(address),
        )?;
        log::info!(
            "network: {} has {}/{prefix}{} (static), host name {hostname} ({from}), in {} ms",
            interface.name,
            address,
            cfg.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
            started.elapsed().as_millis()
        );
        return Ok(from);
    }
    let mut wire = UdpWire::open(&interface.name).map_err(|source| NetError::Socket {
        interface: interface.name.clone(),
        source,
    })?;
    let early_name = options.hostname.clone().or(cfg.hostname.clone());
    let client = Client {
        mac,
        host_name: early_name.as_deref(),
        log_rejected: &log_rejected,
    };
    let dhcp_wait = Duration::from_secs(cfg.dhcp_timeout_s.unwrap_or(30));
    let lease = loop {
        match client.acquire(&mut wire, dhcp_wait) {
            Ok(lease) => break Some(bound_lease(lease, options.lease_cap)),
            Err(e) => match cfg.on_no_lease {
                NoLease::Fail => {
                    return Err(NetError::NoLease { interface: interface.name.clone(), source: e })
                }
                NoLease::Wait => log::warn!(
                    "network: no DHCP lease on {} yet ({}); asking again (network.on_no_lease = \"wait\")",
                    interface.name,
                    crate::logger::chain(&e)
                ),
                NoLease::Continue => {
                    log::warn!(
                        "network: no DHCP lease on {} ({}); continuing without network and asking again in the background (network.on_no_lease = \"continue\")",
                        interface.name,
                        crate::logger::chain(&e)
                    );
                    break None;
                }
            },
        }
    };
    let (hostname, from) = choose_hostname(
        options,
        Some(cfg),
        lease.as_ref().and_then(|l| l.host_name.as_deref()),
    );
    files::set_hostname(&hostname)?;
    let applied = Applied {
        interface: interface.name.clone(),
        index: interface.index,
        mac,
        // A generated name is the node's own business, and may change in the state phase.
        dhcp_name: (from != NameFrom::Generated).then(|| hostname.clone()),
        cfg: cfg.clone(),
    };
    let cap = options.lease_cap;
    match lease {
        Some(lease) => {
            applied.apply(&mut nl, &lease, None)?;
            log::info!(
                "network: {} has {} from {}, host name {hostname} ({from}), in {} ms",
                interface.name,
                describe(&lease),
                lease.server,
                started.elapsed().as_millis()
            );
            std::thread::Builder::new()
                .name("dhcp".into())
                .spawn(move || keep_lease(wire, lease, applied, cap))
                .map_err(|source| NetError::Socket {
                    interface: interface.name.clone(),
                    source,
                })?;
        }
        None => {
            files::write(&files::Resolver::default(), None)?;
            std::thread::Builder::new()
                .name("dhcp".into())
                .spawn(move || lease_later(wire, applied, cap))
                .map_err(|source| NetError::Socket {
                    interface: interface.name.clone(),
                    source,
                })?;
        }
    }
    Ok(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_in_order_of_precedence_and_never_the_hosts_choice() {
        let cfg = NetworkConfig {
            hostname: Some("from-config".into()),
            ..Default::default()
        };
        let cmdline = NetOptions {
            hostname: Some("from-cmdline".into()),
            ..Default::default()
        };
        let none = NetOptions::default();
        let pick =
            |o: &NetOptions, c: Option<&NetworkConfig>, d: Option<&str>| choose_hostname(o, c, d);
        assert_eq!(
            pick(&cmdline, Some(&cfg), Some("dhcp")),
            ("from-cmdline".into(), NameFrom::CmdLine)
        );
        assert_eq!(
            pick(&none, Some(&cfg), Some("dhcp")),
            ("from-config".into(), NameFrom::Config)
        );
        let generated = |(name, from): (String, NameFrom)| {
            from == NameFrom::Generated && name.starts_with("node-") && dhcp::valid_dns_name(&name)
        };
        assert!(generated(pick(&none, None, None)));
        // The host answers DHCP: its name is used only when the configuration says so.
        let plain = NetworkConfig::default();
        let from_dhcp = NetworkConfig {
            hostname_from_dhcp: true,
            ..Default::default()
        };
        assert!(generated(pick(&none, None, Some("dhcp.lan.test"))));
        assert!(generated(pick(&none, Some(&plain), Some("dhcp.lan.test"))));
        assert_eq!(
            pick(&none, Some(&from_dhcp), Some("dhcp.lan.test")),
            ("dhcp".into(), NameFrom::Dhcp)
        );
        // The measured names still come first.
        let both = NetworkConfig {
            hostname_from_dhcp: true,
            ..cfg.clone()
        };
        assert_eq!(pick(&none, Some(&both), Some("dhcp")).0, "from-config");
    }

    fn lease(lease_time: u32, renew_after: u32, rebind_after: u32) -> Lease {
        Lease {
            address: Ipv4Addr::new(10, 0, 2, 15),
            prefix: 24,
            router: None,
            dns: Vec::new(),
            domain: None,
            search: Vec::new(),
            host_name: None,
            mtu: None,
            server: Ipv4Addr::new(10, 0, 2, 2),
            lease_time,
            renew_after,
            rebind_after,
        }
    }

    fn timing(l: &Lease) -> (u32, u32, u32) {
        (l.lease_time, l.renew_after, l.rebind_after)
    }

    #[test]
    fn short_leases_are_kept_as_the_floor() {
        // A 1-second lease: renewed at the floor's T1 (30 s), rebinding at its T2 (52 s).
        assert_eq!(timing(&bound_lease(lease(1, 0, 0), None)), (60, 30, 52));
        assert_eq!(timing(&bound_lease(lease(59, 29, 51), None)), (60, 30, 52));
        // A long lease whose renewal time is seconds: renewal no sooner than the floor's T1.
        assert_eq!(
            timing(&bound_lease(lease(3600, 1, 2), None)),
            (3600, 30, 52)
        );
        assert_eq!(
            timing(&bound_lease(lease(3600, 1, 3000), None)),
            (3600, 30, 3000)
        );
        // Leases at or above the floor, and infinite ones, stay as granted.
        assert_eq!(timing(&bound_lease(lease(60, 30, 52), None)), (60, 30, 52));
        assert_eq!(
            timing(&bound_lease(lease(86400, 43200, 75600), None)),
            (86400, 43200, 75600)
        );
        assert_eq!(
            timing(&bound_lease(
                lease(u32::MAX, u32::MAX / 2, u32::MAX / 8 * 7),
                None
            ))
            .0,
            u32::MAX
        );
        // Only the test hook lowers the floor, to its cut.
        assert_eq!(
            timing(&bound_lease(lease(3600, 1800, 3150), Some(6))),
            (6, 3, 5)
        );
        assert_eq!(timing(&bound_lease(lease(1, 0, 0), Some(6))), (6, 3, 5));
        assert_eq!(
            timing(&bound_lease(lease(1, 0, 0), Some(600))),
            (60, 30, 52)
        );
    }

    #[test]
    fn cidr_parses_strictly() {
        assert_eq!(
            parse_cidr("10.0.2.15/24").unwrap(),
            (
                "10.0.2.15".parse().unwrap(),
                "255.255.255.0".parse().unwrap()
            )
        );
        assert_eq!(
            parse_cidr("192.168.1.1/32").unwrap().1,
            Ipv4Addr::new(255, 255, 255, 255)
        );
        for bad in [
            "10.0.2.15",
            "10.0.2.15/0",
            "10.0.2.15/33",
            "10.0.2/24",
            "x/24",
        ] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
        assert!(valid_name("eth0") && !valid_name("") && !valid_name("a/b"));
    }
}
