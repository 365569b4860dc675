//! STAND-IN: the first steps of a kubelet joining a cluster, reduced to what a test can
//! observe — not a kubelet's TLS bootstrap. With no rotated kubeconfig yet, it reads the
//! bootstrap kubeconfig its `--bootstrap-kubeconfig` names (only the single-line `server:`,
//! `certificate-authority-data:` and `token:` values a kubeadm bootstrap kubeconfig has: this is
//! no YAML parser), opens TLS to the API server trusting only that CA, and sends one request
//! with the bootstrap token. It also says where its `--cert-dir` is mounted and whether the
//! CNI directories are writable, since a real node needs both.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

/// The directories a CNI DaemonSet writes its configuration and plugins to.
const CNI_DIRS: [&str; 2] = ["/etc/cni/net.d", "/opt/cni/bin"];

pub fn run(args: &[String]) {
    let flag = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(name))
            .map(str::to_string)
    };
    if let Some(dir) = flag("--cert-dir=") {
        println!("kubelet-standin: {}", cert_dir(&dir));
    }
    for dir in CNI_DIRS {
        println!("kubelet-standin: {}", writable(dir));
    }
    match (flag("--kubeconfig="), flag("--bootstrap-kubeconfig=")) {
        (Some(kubeconfig), _) if Path::new(&kubeconfig).exists() => {
            println!("kubelet-standin: credentials found at {kubeconfig}: no bootstrap needed")
        }
        (_, Some(bootstrap)) if !Path::new(&bootstrap).exists() => {
            println!(
                "kubelet-standin: no bootstrap kubeconfig at {bootstrap}: not joining a cluster"
            )
        }
        (_, Some(bootstrap)) => {
            let mut outcome = Err(String::new());
            for _ in 0..10 {
                outcome = contact_api_server(&bootstrap);
                if outcome.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            match outcome {
                Ok(said) => println!("kubelet-standin: {said}"),
                Err(e) => println!("kubelet-standin: bootstrap with {bootstrap} failed: {e}"),
            }
        }
        _ => println!("kubelet-standin: no kubeconfig and no bootstrap kubeconfig"),
    }
}

/// The value of a single-line `key: value` of a kubeconfig, quotes removed.
fn value(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let rest = line.trim_start().strip_prefix(key)?.strip_prefix(':')?;
        Some(rest.trim().trim_matches('"').to_string())
    })
}

fn contact_api_server(path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read it: {e}"))?;
    let server = value(&text, "server").ok_or("no server: line")?;
    let ca = value(&text, "certificate-authority-data").ok_or("no certificate-authority-data")?;
    let token = value(&text, "token").ok_or("no token: line")?;
    let address = server
        .strip_prefix("https://")
        .ok_or_else(|| format!("server {server} is not https://"))?
        .trim_end_matches('/');
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    let ca = base64::engine::general_purpose::STANDARD
        .decode(ca)
        .map_err(|e| format!("certificate-authority-data: {e}"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca) {
        let cert = cert.map_err(|e| format!("certificate-authority-data: {e}"))?;
        roots.add(cert).map_err(|e| format!("the CA: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = ServerName::try_from(host.to_string()).map_err(|e| format!("{host}: {e}"))?;
    let connection =
        rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = TcpStream::connect(address).map_err(|e| format!("connect {address}: {e}"))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    let request = format!(
        "GET /version HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(request.as_bytes())
        .map_err(|e| format!("TLS to {address}: {e}"))?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer);
    let status = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if !status.starts_with("HTTP/1.1 ") {
        return Err(format!("no HTTP answer from {address}"));
    }
    Ok(format!(
        "API server {server} answered over TLS, its certificate checked against the bootstrap \
         kubeconfig's CA, the bootstrap token sent: {status}"
    ))
}

/// Where a directory is mounted: the mount point, source and type of the longest mount point
/// of /proc/self/mountinfo above it.
fn mounted_on(dir: &str) -> Option<(String, String, String)> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let point = *fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            let (fstype, source) = (*fields.get(dash + 1)?, *fields.get(dash + 2)?);
            let under = dir == point
                || point == "/"
                || dir.starts_with(&format!("{}/", point.trim_end_matches('/')));
            under.then(|| (point.to_string(), source.to_string(), fstype.to_string()))
        })
        .max_by_key(|(point, _, _)| point.len())
}

fn cert_dir(dir: &str) -> String {
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(Path::new(dir).join("kubelet-standin-probe"), b"probe"));
    match (written, mounted_on(dir)) {
        (Ok(()), Some((point, source, fstype))) => {
            format!("cert dir {dir} written, on {source} ({fstype} at {point})")
        }
        (Err(e), _) => format!("cert dir {dir} not writable: {e}"),
        (Ok(()), None) => format!("cert dir {dir} written, mount unknown"),
    }
}

fn writable(dir: &str) -> String {
    let probe = Path::new(dir).join(".kubelet-standin-probe");
    let entries = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let (point, source, fstype) = mounted_on(dir).unwrap_or_default();
    match std::fs::write(&probe, b"probe") {
        Ok(()) => {
            let _ = std::fs::remove_file(&probe);
            format!("{dir} writable ({entries} entries, {source} {fstype} at {point})")
        }
        Err(e) => format!("{dir} not writable: {e}"),
    }
}
