//! Joining a cluster, as far as a test without a real kubelet can follow it: the key broker
//! releases the disk key and a bootstrap kubeconfig (to a memory-only path), the kubelet
//! stand-in reads that kubeconfig from the path its arguments name and reaches the API server in
//! it over TLS, trusting only the kubeconfig's CA, while its certificate directory is on the
//! encrypted state disk and the CNI directories are writable overlays of the image's.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use base64::Engine;
use qemu_tests::broker;
use qemu_tests::guest::FORWARD_ADDRESS;
use qemu_tests::support::{blank_state_disk, must, power_down, prepare_with_files, BOOT};

const TOKEN: &str = "abcdef.0123456789abcdef";

fn config(broker_port: u16) -> String {
    format!(
        r#"
[network]

[kbs]
url = "https://{FORWARD_ADDRESS}:{broker_port}"
resource = "cvm/state-disk/key"
ca = "/etc/cvm/kbs-ca.pem"

[[kbs.file]]
resource = "cvm/kubelet/bootstrap-kubeconfig"
path = "/run/kubernetes/bootstrap-kubelet.conf"

[state]
serial = "cvm-state"
key = "kbs"
binds = ["/var/lib/kubelet"]
overlays = ["/etc/cni/net.d", "/opt/cni/bin"]

[[service]]
name = "kubelet"
path = "/usr/bin/kubelet"
args = [
  "--bootstrap-kubeconfig=/run/kubernetes/bootstrap-kubelet.conf",
  "--kubeconfig=/var/lib/kubelet/kubeconfig",
  "--cert-dir=/var/lib/kubelet/pki",
]
"#
    )
}

/// A kubeadm-shaped bootstrap kubeconfig for the API server at `port`.
fn bootstrap_kubeconfig(ca_pem: &[u8], port: u16) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- cluster:\n    certificate-authority-data: {ca}\n    server: https://{FORWARD_ADDRESS}:{port}\n  name: test\ncontexts:\n- context:\n    cluster: test\n    user: kubelet-bootstrap\n  name: default\ncurrent-context: default\nusers:\n- name: kubelet-bootstrap\n  user:\n    token: {TOKEN}\n"
    )
}

/// A test HTTPS endpoint in the API server's place: records the head of each request it gets
/// over a completed TLS handshake, and answers 200.
fn api_server(listener: TcpListener, chain: &[u8], key: &[u8]) -> Arc<Mutex<Vec<String>>> {
    let config = cvm_kbs::tls::server_config(chain, key).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let conn = cvm_kbs::tls::rustls::ServerConnection::new(config.clone()).unwrap();
            let mut tls = cvm_kbs::tls::rustls::StreamOwned::new(conn, stream);
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
                match tls.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => break,
                }
            }
            if head.ends_with(b"\r\n\r\n") {
                record
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let body = "{\"major\":\"1\",\"minor\":\"32\"}";
                let _ = write!(
                    tls,
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            }
        }
    });
    seen
}

#[test]
fn the_kubelet_bootstraps_from_a_released_kubeconfig_with_its_state_on_the_encrypted_disk() {
    let broker_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let broker_port = broker_listener.local_addr().unwrap().port();
    let api_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let api_port = api_listener.local_addr().unwrap().port();
    let config = config(broker_port);

    // The broker's PKI and the cluster's are separate: the kubelet trusts only the CA in its
    // kubeconfig.
    let broker_keys = tempfile::tempdir().unwrap();
    let (kbs_ca, kbs_chain, kbs_key) = broker::tls_test_pki(broker_keys.path(), FORWARD_ADDRESS);
    let cluster_keys = tempfile::tempdir().unwrap();
    let (cluster_ca, api_chain, api_key) =
        broker::tls_test_pki(cluster_keys.path(), FORWARD_ADDRESS);
    assert_ne!(kbs_ca, cluster_ca);
    let requests = api_server(api_listener, &api_chain, &api_key);

    let chain = broker::snp_test_chain(broker_keys.path());
    let measurement = [0x3cu8; 48];
    let standin = std::fs::read(qemu_tests::Artifacts::get().kubelet_standin)
        .expect("the kubelet stand-in (make test-artifacts)");
    let mut files = broker::snp_emulator_files(&chain, &measurement);
    files.extend([
        ("etc/cvm/kbs-ca.pem", kbs_ca),
        ("usr/bin/kubelet", standin),
        // What the image ships in the CNI directories (Debian's plugins in the node image).
        ("opt/cni/bin/bridge", b"image plugin".to_vec()),
        ("etc/cni/net.d/.keep", Vec::new()),
    ]);
    let prepared = prepare_with_files(&config, &files);
    let resources = tempfile::tempdir().unwrap();
    let dir = resources.path().join("cvm/kubelet");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("bootstrap-kubeconfig"),
        bootstrap_kubeconfig(&cluster_ca, api_port),
    )
    .unwrap();
    let _broker = broker::start_with(
        broker_listener,
        resources.path(),
        broker::snp_emulated_reference(&chain, vec![measurement.to_vec()]),
        &qemu_tests::pseudo_random_bytes(32, 0x51a7e5d15c0ffee1),
        Some(cvm_kbs::tls::server_config(&kbs_chain, &kbs_key).unwrap()),
    );
    let work = tempfile::tempdir().unwrap();
    let disk = blank_state_disk(work.path());
    let mut guest = prepared.boot(
        "join",
        &format!("cvm.tee=snp cvm.test-snp-emulator={}", broker::SNP_EMULATOR),
        |g| {
            g.state_disk(&disk, "cvm-state")
                .forward(broker_port, broker_port)
                .forward(api_port, api_port)
        },
    );
    must(guest.wait_for(
        "kbs: cvm/state-disk/key, cvm/kubelet/bootstrap-kubeconfig released",
        BOOT,
    ));
    must(guest.wait_for(
        "kbs: cvm/kubelet/bootstrap-kubeconfig written to /run/kubernetes/bootstrap-kubelet.conf",
        BOOT,
    ));
    must(guest.wait_for("kubelet-standin: API server", BOOT));
    must(guest.wait_for("cvm-init: ready", BOOT));
    let log = guest.serial_log();
    let line = |needle: &str| {
        log.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
            .to_string()
    };
    // The API server's certificate was checked against the kubeconfig's CA, and the request
    // reached it with the bootstrap token.
    let api = line("kubelet-standin: API server");
    assert!(
        api.contains(&format!(
            "API server https://{FORWARD_ADDRESS}:{api_port} answered over TLS"
        )) && api.contains("HTTP/1.1 200 OK"),
        "{api}"
    );
    let seen = requests.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].starts_with("GET /version HTTP/1.1\r\n"), "{seen:?}");
    assert!(
        seen[0].contains(&format!("Authorization: Bearer {TOKEN}\r\n")),
        "{seen:?}"
    );
    // The certificate directory is on the state disk (ext4 under the bind; the root is erofs).
    let certs = line("kubelet-standin: cert dir");
    assert!(
        certs.contains("cert dir /var/lib/kubelet/pki written, on /dev/")
            && certs.contains("(ext4 at /var/lib/kubelet)"),
        "{certs}"
    );
    // The CNI directories: writable overlays, the image's plugin showing through.
    let net_d = line("kubelet-standin: /etc/cni/net.d");
    assert!(
        net_d.contains("/etc/cni/net.d writable")
            && net_d.contains("overlay overlay at /etc/cni/net.d"),
        "{net_d}"
    );
    let bin = line("kubelet-standin: /opt/cni/bin");
    assert!(
        bin.contains("/opt/cni/bin writable (1 entries, overlay overlay at /opt/cni/bin)"),
        "{bin}"
    );
    // Nobody named the node: it registers under the name its state disk's key gives, not one
    // the host chose (its MAC address).
    let kept = line("cvm-init: node name ");
    let name = kept
        .split("node name ")
        .nth(1)
        .and_then(|rest| rest.trim_end().strip_suffix(" (from the state disk's key)"))
        .unwrap_or_else(|| panic!("{kept}"));
    assert!(
        name.starts_with("node-") && !name.contains("525400"),
        "{name}"
    );
    let registers = line("kubelet-standin: node name");
    assert!(
        registers
            .trim_end()
            .ends_with(&format!("kubelet-standin: node name {name}")),
        "{registers}"
    );
    // The bootstrap token never reaches the console.
    assert!(!log.contains(TOKEN), "the token was printed");
    power_down(&mut guest);
}
