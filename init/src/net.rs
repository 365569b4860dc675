//! A static IPv4 address on one interface, from the measured configuration: what the `kbs`
//! key source needs to reach its key broker. (DHCP and the rest of a node's network are the
//! network issue's.) Interface flags, address, netmask and the default route are set with the
//! classic socket ioctls.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The interface, as the kernel names it (`eth0`).
    pub interface: String,
    /// `a.b.c.d/len`.
    pub address: String,
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("network.address {0:?} is not an IPv4 address with a prefix length (a.b.c.d/len)")]
    Address(String),
    #[error("network.interface {0:?} is not 1 to 15 characters of [A-Za-z0-9_.-]")]
    Name(String),
    #[error("no network interface {name} appeared within 5 s (seen: {seen})")]
    Missing { name: String, seen: String },
    #[error("cannot {what} on {interface}")]
    Ioctl {
        what: &'static str,
        interface: String,
        #[source]
        source: std::io::Error,
    },
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
    let mask = u32::MAX << (32 - len);
    Ok((address, Ipv4Addr::from(mask)))
}

fn valid_name(name: &str) -> bool {
    (1..16).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn sockaddr(address: Ipv4Addr) -> nix::libc::sockaddr {
    let inet = nix::libc::sockaddr_in {
        sin_family: nix::libc::AF_INET as nix::libc::sa_family_t,
        sin_port: 0,
        sin_addr: nix::libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is plain
    // data; the kernel reads the AF_INET family and interprets the bytes as sockaddr_in.
    unsafe { std::mem::transmute::<nix::libc::sockaddr_in, nix::libc::sockaddr>(inet) }
}

fn ifreq(name: &str) -> nix::libc::ifreq {
    // SAFETY: ifreq is plain data for which all zeros is a valid value.
    let mut req: nix::libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as nix::libc::c_char;
    }
    req
}

struct Socket(std::os::fd::OwnedFd);

impl Socket {
    fn new() -> std::io::Result<Socket> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned at once.
        let fd = unsafe {
            nix::libc::socket(
                nix::libc::AF_INET,
                nix::libc::SOCK_DGRAM | nix::libc::SOCK_CLOEXEC,
                0,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by socket(2) and is owned by nothing else.
        Ok(Socket(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) }))
    }

    fn ioctl<T>(&self, request: u64, arg: &mut T) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: `arg` is the structure this request expects (ifreq or rtentry), valid and
        // exclusively borrowed for the call.
        if unsafe {
            nix::libc::ioctl(
                self.0.as_raw_fd(),
                request as nix::libc::Ioctl,
                arg as *mut T,
            )
        } < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn up(&self, name: &str) -> std::io::Result<()> {
        let mut req = ifreq(name);
        self.ioctl(nix::libc::SIOCGIFFLAGS, &mut req)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        unsafe {
            req.ifr_ifru.ifru_flags |= (nix::libc::IFF_UP | nix::libc::IFF_RUNNING) as i16;
        }
        self.ioctl(nix::libc::SIOCSIFFLAGS, &mut req)
    }
}

/// Waits for the interface, brings up `lo` and it, and sets the address, netmask and default
/// route.
pub fn bring_up(cfg: &NetworkConfig) -> Result<(), NetError> {
    if !valid_name(&cfg.interface) {
        return Err(NetError::Name(cfg.interface.clone()));
    }
    let (address, mask) = parse_cidr(&cfg.address)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let sys = Path::new("/sys/class/net").join(&cfg.interface);
    while !sys.exists() {
        if Instant::now() > deadline {
            let mut seen: Vec<String> = std::fs::read_dir("/sys/class/net")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            seen.sort();
            return Err(NetError::Missing {
                name: cfg.interface.clone(),
                seen: seen.join(", "),
            });
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let fail = |what: &'static str| {
        let interface = cfg.interface.clone();
        move |source| NetError::Ioctl {
            what,
            interface,
            source,
        }
    };
    let socket = Socket::new().map_err(fail("open a socket"))?;
    socket.up("lo").map_err(fail("bring up lo before"))?;
    let mut req = ifreq(&cfg.interface);
    req.ifr_ifru.ifru_addr = sockaddr(address);
    socket
        .ioctl(nix::libc::SIOCSIFADDR, &mut req)
        .map_err(fail("set the address"))?;
    let mut req = ifreq(&cfg.interface);
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    socket
        .ioctl(nix::libc::SIOCSIFNETMASK, &mut req)
        .map_err(fail("set the netmask"))?;
    socket
        .up(&cfg.interface)
        .map_err(fail("bring up the interface"))?;
    if let Some(gateway) = cfg.gateway {
        // SAFETY: rtentry is plain data for which all zeros is a valid value.
        let mut route: nix::libc::rtentry = unsafe { std::mem::zeroed() };
        route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr(gateway);
        route.rt_flags = nix::libc::RTF_UP | nix::libc::RTF_GATEWAY;
        socket
            .ioctl(nix::libc::SIOCADDRT, &mut route)
            .map_err(fail("add the default route"))?;
    }
    log::info!(
        "network: {} has {}{}",
        cfg.interface,
        cfg.address,
        cfg.gateway
            .map(|g| format!(", default route via {g}"))
            .unwrap_or_default()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
