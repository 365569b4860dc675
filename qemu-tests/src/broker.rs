//! The reference key broker for test and demo guests: reference values predicted for an
//! image, a node's swtpm manufactured with an EK certificate from a test CA (which the broker
//! is configured with), its attestation key read before the first boot, and a broker thread on
//! the host's loopback (which a test forwards to the guest, `Guest::forward`).

use std::net::TcpListener;
use std::path::Path;
use std::sync::Arc;

use cvm_formats::registers::Bank;
use cvm_measure::broker::{serve_with, Broker, Reference};
use cvm_measure::predict::{predict_key_release, Inputs};

use crate::guest::BASE_CMDLINE;
use crate::TestImage;

/// The PCRs the `kbs` key source quotes.
pub const QUOTED_PCRS: [u32; 2] = [11, 15];

/// The registers a node booted from `image` with `config` has when it asks for its key (and
/// cvm-init's own part of RTMR 2 then, for a TDX launch).
pub fn key_release_reference(image: &TestImage, config: &str) -> Reference {
    let cmdline = format!("{BASE_CMDLINE} {}", image.roothash_option());
    let registers = predict_key_release(&Inputs {
        cmdline: cmdline.into_bytes(),
        root_hash: image.root.tree.root_hash,
        config_file: Some(config.as_bytes().to_vec()),
        ..Default::default()
    });
    Reference {
        pcrs: QUOTED_PCRS
            .iter()
            .map(|&p| (p, registers.pcr(Bank::Sha256, p as usize).to_vec()))
            .collect(),
        tdx_init_rtmr2: Some(registers.rtmr[2].clone()),
        ..Default::default()
    }
}

/// Manufactures the swtpm whose state is in `state` (unless it already holds a TPM) with an EK
/// certificate from the test CA in `ca` (made on first use); returns the CA's certificates
/// (DER, root first) for the broker's `ek_cas`.
pub fn certified_tpm(state: &Path, ca: &Path) -> Result<Vec<Vec<u8>>, String> {
    if !state.join("tpm2-00.permall").exists() {
        std::fs::create_dir_all(state).map_err(|e| e.to_string())?;
        cvm_init::tee::tpm::manufacture_swtpm(state, ca).map_err(|e| e.to_string())?;
    }
    let pem = cvm_init::tee::tpm::swtpm_ca_pem(ca)
        .map_err(|e| format!("the test EK CA in {}: {e}", ca.display()))?;
    Ok(cvm_measure::x509::pem_chain(&pem)?
        .iter()
        .map(|c| c.der().to_vec())
        .collect())
}

/// Reads the attestation key of the vTPM whose state is in `dir` (creating the TPM if the
/// directory is empty), as an operator registers a node before its first boot.
pub fn attestation_key(dir: &Path) -> Result<(Vec<u8>, Vec<u8>), String> {
    let port = {
        let probe = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        probe.local_addr().map_err(|e| e.to_string())?.port()
    };
    let mut swtpm = cvm_init::tee::tpm::spawn_swtpm(dir, port)
        .map_err(|e| format!("cannot start swtpm: {e}"))?;
    let result = cvm_init::tee::tpm::TcpTransport::connect(port)
        .map_err(|e| format!("swtpm did not listen: {e}"))
        .and_then(|mut t| {
            cvm_init::tee::quote::quote(&mut t, &[0; 64], &QUOTED_PCRS)
                .map_err(|e| crate::chain(&e))
        });
    // SIGTERM: swtpm writes its state out before it exits.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(swtpm.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = swtpm.wait();
    let quote = result?;
    Ok((quote.ak_x, quote.ak_y))
}

/// Starts a broker for `reference` on `listener`, with the state-disk secret `secret` as
/// resource `cvm/state-disk/key` under `resources`.
pub fn start(
    listener: TcpListener,
    resources: &Path,
    reference: Reference,
    secret: &[u8],
) -> Arc<Broker> {
    start_with(listener, resources, reference, secret, None)
}

/// The same over TLS with `tls`.
pub fn start_with(
    listener: TcpListener,
    resources: &Path,
    reference: Reference,
    secret: &[u8],
    tls: Option<Arc<cvm_kbs::tls::rustls::ServerConfig>>,
) -> Arc<Broker> {
    let dir = resources.join("cvm/state-disk");
    std::fs::create_dir_all(&dir).expect("the broker's resource directory");
    std::fs::write(dir.join("key"), secret).expect("the broker's resource");
    let broker = Arc::new(Broker::new(resources.to_path_buf(), reference));
    let serving = broker.clone();
    std::thread::spawn(move || serve_with(listener, serving, tls));
    broker
}

/// A certificate chain shaped like AMD's (RSA-4096 ARK and ASK signing with RSA-PSS SHA-384, a
/// P-384 VCEK), made with openssl for tests: a broker trusts it only when configured with it.
pub struct SnpTestChain {
    /// The ASK then the ARK, PEM (`kbs-serve --snp-chain`).
    pub ask_ark_pem: Vec<u8>,
    pub vcek_der: Vec<u8>,
    /// The VCEK's private scalar (48 bytes).
    pub vcek_scalar: Vec<u8>,
}

impl SnpTestChain {
    pub fn trusted(&self) -> cvm_measure::snp::TrustedChain {
        let text = String::from_utf8_lossy(&self.ask_ark_pem).into_owned();
        let (ask, ark) = text
            .split_once("-----END CERTIFICATE-----")
            .expect("two certificates");
        let ask = format!("{ask}-----END CERTIFICATE-----\n");
        let cert = |pem: &str| cvm_measure::snp::certificate(pem.trim_start().as_bytes()).unwrap();
        cvm_measure::snp::TrustedChain {
            ask: cert(&ask),
            ark: cert(ark),
        }
    }
}

/// Runs openssl in `dir` and returns its output; a failure panics with its message (test
/// material only).
pub fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
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

pub fn snp_test_chain(dir: &Path) -> SnpTestChain {
    let openssl = |args: &[&str]| openssl(dir, args);
    let pss = [
        "-sha384",
        "-sigopt",
        "rsa_padding_mode:pss",
        "-sigopt",
        "rsa_pss_saltlen:48",
    ];
    let with_pss = |mut args: Vec<&'static str>| {
        args.extend(pss);
        args
    };
    openssl(&with_pss(vec![
        "req",
        "-x509",
        "-newkey",
        "rsa:4096",
        "-nodes",
        "-keyout",
        "ark.key",
        "-out",
        "ark.pem",
        "-subj",
        "/CN=ARK-Test",
        "-days",
        "2",
    ]));
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "rsa:4096",
        "-nodes",
        "-keyout",
        "ask.key",
        "-out",
        "ask.csr",
        "-subj",
        "/CN=SEV-Test",
    ]);
    openssl(&with_pss(vec![
        "x509",
        "-req",
        "-in",
        "ask.csr",
        "-CA",
        "ark.pem",
        "-CAkey",
        "ark.key",
        "-out",
        "ask.pem",
        "-days",
        "2",
        "-set_serial",
        "1",
    ]));
    openssl(&[
        "ecparam",
        "-name",
        "secp384r1",
        "-genkey",
        "-noout",
        "-out",
        "vcek.key",
    ]);
    openssl(&[
        "ec",
        "-in",
        "vcek.key",
        "-outform",
        "DER",
        "-out",
        "vcek.key.der",
    ]);
    openssl(&[
        "req",
        "-new",
        "-key",
        "vcek.key",
        "-out",
        "vcek.csr",
        "-subj",
        "/CN=SEV-VCEK-Test",
    ]);
    openssl(&with_pss(vec![
        "x509",
        "-req",
        "-in",
        "vcek.csr",
        "-CA",
        "ask.pem",
        "-CAkey",
        "ask.key",
        "-out",
        "vcek.der",
        "-outform",
        "DER",
        "-days",
        "2",
        "-set_serial",
        "2",
    ]));
    let read = |name: &str| std::fs::read(dir.join(name)).expect("openssl wrote it");
    // SEC1 ECPrivateKey: SEQUENCE (30 81 a4) { INTEGER 1 (02 01 01), OCTET STRING (04 30) <48> ...
    let sec1 = read("vcek.key.der");
    assert_eq!(
        &sec1[3..8],
        &[0x02, 0x01, 0x01, 0x04, 0x30],
        "SEC1 P-384 key layout"
    );
    let mut ask_ark_pem = read("ask.pem");
    ask_ark_pem.extend(read("ark.pem"));
    SnpTestChain {
        ask_ark_pem,
        vcek_der: read("vcek.der"),
        vcek_scalar: sec1[8..56].to_vec(),
    }
}

/// Where the test build's emulated configfs-tsm provider finds its key and launch digest
/// (`cvm.test-snp-emulator=`).
pub const SNP_EMULATOR: &str = "/usr/lib/cvm-test/snp";

/// The root's files for the emulated SNP provider: the VCEK's key and certificate of `chain`
/// and the launch digest its reports carry.
pub fn snp_emulator_files(
    chain: &SnpTestChain,
    measurement: &[u8],
) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "usr/lib/cvm-test/snp/vcek.key",
            cvm_formats::hex(&chain.vcek_scalar).into_bytes(),
        ),
        ("usr/lib/cvm-test/snp/vcek.der", chain.vcek_der.clone()),
        (
            "usr/lib/cvm-test/snp/measurement",
            cvm_formats::hex(measurement).into_bytes(),
        ),
    ]
}

/// A reference that trusts `chain` and these launch digests, with no minimum TCB: the
/// emulated provider's reports carry a zero TCB.
pub fn snp_emulated_reference(chain: &SnpTestChain, measurements: Vec<Vec<u8>>) -> Reference {
    Reference {
        snp_chains: vec![chain.trusted()],
        snp_measurements: measurements,
        snp_requirements: cvm_measure::snp::Requirements {
            min_tcb: cvm_measure::snp::MinimumTcb::Waived,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// A CA and a broker certificate for `ip` (EC P-256, two days), made with openssl: (CA PEM,
/// broker certificate PEM, broker key PEM).
pub fn tls_test_pki(dir: &Path, ip: &str) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let run = |args: &[&str]| openssl(dir, args);
    let p256 = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-days",
        "2",
    ];
    run(&[
        &[
            "req",
            "-x509",
            "-keyout",
            "tls-ca.key",
            "-out",
            "tls-ca.pem",
            "-subj",
            "/CN=test broker CA",
        ][..],
        &p256[..],
    ]
    .concat());
    let san = format!("subjectAltName=IP:{ip}");
    run(&[
        &[
            "req",
            "-x509",
            "-keyout",
            "tls.key",
            "-out",
            "tls.pem",
            "-subj",
            "/CN=test broker",
            "-CA",
            "tls-ca.pem",
            "-CAkey",
            "tls-ca.key",
            "-addext",
            &san,
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ][..],
        &p256[..],
    ]
    .concat());
    let read = |f: &str| std::fs::read(dir.join(f)).expect("openssl wrote it");
    (read("tls-ca.pem"), read("tls.pem"), read("tls.key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_signed_by_the_test_chain_pass_the_broker_only_when_it_trusts_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let chain = snp_test_chain(dir.path());
        let key = p384::ecdsa::SigningKey::from_slice(&chain.vcek_scalar).unwrap();
        let (measurement, binding) = ([0x42u8; 48], [0x17u8; 64]);
        let raw = cvm_formats::snp::test_report(&key, &measurement, &binding, 0x30000);
        let evidence = cvm_formats::snp::trustee_evidence(
            &cvm_formats::snp::Report::parse(&raw).unwrap(),
            Some(vec![cvm_formats::snp::CertTableEntry {
                cert_type: cvm_formats::snp::CertType::VCEK,
                data: chain.vcek_der.clone(),
            }]),
        )
        .unwrap();
        let reference = Reference {
            snp_measurements: vec![measurement.to_vec()],
            // Test reports carry a zero TCB.
            snp_requirements: cvm_measure::snp::Requirements {
                min_tcb: cvm_measure::snp::MinimumTcb::Waived,
                ..Default::default()
            },
            ..Default::default()
        };
        let untrusting = Broker::new(dir.path().into(), reference.clone());
        let why = untrusting
            .verify_snp(&evidence, &binding)
            .unwrap_err()
            .to_string();
        assert!(why.contains("does not chain"), "{why}");
        let trusting = Broker::new(
            dir.path().into(),
            Reference {
                snp_chains: vec![chain.trusted()],
                ..reference
            },
        );
        trusting.verify_snp(&evidence, &binding).unwrap();
        let why = trusting
            .verify_snp(&evidence, &[0; 64])
            .unwrap_err()
            .to_string();
        assert!(why.contains("replayed"), "{why}");
    }
}
