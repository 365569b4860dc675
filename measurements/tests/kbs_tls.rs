//! The key-broker client over TLS against the reference broker serving TLS: trusted only
//! through the pinned CA (for the right name) or the pinned public key.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use cvm_kbs::client::{get_resource, ClientError, Endpoint};
use cvm_kbs::tls::{client_config, public_key_sha256, server_config, Pin};
use cvm_measure::broker::{serve_with, Broker, Reference};

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A CA and a server certificate for 127.0.0.1 signed by it; returns (ca.pem, chain, key).
fn pki(dir: &Path, name: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let ca = format!("{name}-ca");
    let (ca_key, ca_pem, ca_subject) = (
        format!("{ca}.key"),
        format!("{ca}.pem"),
        format!("/CN={ca}"),
    );
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend([
        "-keyout",
        &ca_key,
        "-out",
        &ca_pem,
        "-subj",
        &ca_subject,
        "-days",
        "2",
    ]);
    openssl(dir, &args);
    let server = format!("{name}-server");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    let (key, pem, cakey, capem) = (
        format!("{server}.key"),
        format!("{server}.pem"),
        format!("{ca}.key"),
        format!("{ca}.pem"),
    );
    args.extend([
        "-keyout",
        &key,
        "-out",
        &pem,
        "-subj",
        "/CN=kbs",
        "-days",
        "2",
        "-CA",
        &capem,
        "-CAkey",
        &cakey,
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-addext",
        "basicConstraints=critical,CA:FALSE",
    ]);
    openssl(dir, &args);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    (read(&capem), read(&pem), read(&key))
}

fn start(chain: &[u8], key: &[u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let broker = Arc::new(Broker::new("/nonexistent".into(), Reference::default()));
    let tls = server_config(chain, key).unwrap();
    std::thread::spawn(move || serve_with(listener, broker, Some(tls)));
    port
}

/// Asks for a resource with empty evidence: a TLS failure is `Tls`; a working channel gets as
/// far as the broker refusing the evidence at `attest`.
fn ask(address: &str, pin: &Pin) -> Result<Vec<u8>, ClientError> {
    let endpoint = Endpoint {
        address: address.into(),
        tls: Some(client_config(pin).unwrap()),
    };
    get_resource(&endpoint, "tpm", "a/b/c", &mut |_| {
        Ok(serde_json::json!({}))
    })
}

fn reached_the_broker(result: Result<Vec<u8>, ClientError>) {
    match result {
        Err(ClientError::Refused { step: "attest", .. }) => {}
        other => panic!("expected the broker to refuse the evidence, got {other:?}"),
    }
}

fn tls_refused(result: Result<Vec<u8>, ClientError>, why: &str) {
    match result {
        Err(e @ ClientError::Tls { .. }) => {
            let chain = format!("{e}: {}", std::error::Error::source(&e).unwrap());
            assert!(chain.contains(why), "{chain}");
        }
        other => panic!("expected a TLS refusal ({why}), got {other:?}"),
    }
}

#[test]
fn only_the_pinned_ca_or_key_is_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, chain, key) = pki(dir.path(), "good");
    let (other_ca, other_chain, _) = pki(dir.path(), "other");
    let port = start(&chain, &key);
    let address = format!("127.0.0.1:{port}");

    reached_the_broker(ask(&address, &Pin::Ca(ca.clone())));
    tls_refused(ask(&address, &Pin::Ca(other_ca)), "UnknownIssuer");
    // The right CA, but the certificate is not for this name.
    tls_refused(
        ask(&format!("localhost:{port}"), &Pin::Ca(ca)),
        "not valid for name",
    );

    // The public key pin agrees with openssl's SubjectPublicKeyInfo digest.
    let der = openssl(
        dir.path(),
        &["x509", "-in", "good-server.pem", "-outform", "DER"],
    );
    let pin = public_key_sha256(&der).unwrap();
    let spki = openssl(
        dir.path(),
        &[
            "pkey",
            "-in",
            "good-server.key",
            "-pubout",
            "-outform",
            "DER",
        ],
    );
    use sha2::Digest;
    assert_eq!(pin.to_vec(), sha2::Sha256::digest(&spki).to_vec());
    reached_the_broker(ask(&address, &Pin::PublicKeySha256(pin)));
    let other_der = openssl(
        dir.path(),
        &["x509", "-in", "other-server.pem", "-outform", "DER"],
    );
    let _ = other_chain;
    let other_pin = public_key_sha256(&other_der).unwrap();
    tls_refused(
        ask(&address, &Pin::PublicKeySha256(other_pin)),
        "is not the pinned one",
    );

    // A plain-HTTP client gets no answer it can use from a TLS broker.
    let plain = get_resource(&Endpoint::plain(&address), "tpm", "a/b/c", &mut |_| {
        Ok(serde_json::json!({}))
    });
    assert!(
        matches!(
            plain,
            Err(ClientError::Http { .. }) | Err(ClientError::Protocol { .. })
        ),
        "{plain:?}"
    );
}

#[test]
fn bad_tls_material_is_named() {
    let err = client_config(&Pin::Ca(b"not a pem".to_vec())).unwrap_err();
    assert!(err.to_string().contains("the pinned CA"), "{err}");
    let err = server_config(b"", b"").unwrap_err();
    assert!(err.to_string().contains("certificate chain"), "{err}");
}

/// Each key-exchange group the node offers works alone (the broker chooses): P-256 is the
/// node's own (RustCrypto's, not ring's), the others ring's; the P-256 CA and server
/// certificates are checked by the node's P-256 verifier on the way.
#[test]
fn every_offered_group_completes_a_handshake() {
    use cvm_kbs::tls::rustls;
    use rustls::crypto::ring::{default_provider, kx_group};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let dir = tempfile::tempdir().unwrap();
    let (ca, chain, key) = pki(dir.path(), "groups");
    for (name, group) in [
        ("secp256r1", kx_group::SECP256R1),
        ("secp384r1", kx_group::SECP384R1),
        ("x25519", kx_group::X25519),
    ] {
        let mut provider = default_provider();
        provider.kx_groups = vec![group];
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain)
            .collect::<Result<_, _>>()
            .unwrap();
        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, PrivateKeyDer::from_pem_slice(&key).unwrap())
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let broker = Arc::new(Broker::new("/nonexistent".into(), Reference::default()));
        std::thread::spawn(move || serve_with(listener, broker, Some(Arc::new(tls))));
        let address = format!("127.0.0.1:{port}");
        eprintln!("key exchange {name}");
        reached_the_broker(ask(&address, &Pin::Ca(ca.clone())));
    }
}
