//! `cvm-measure sign-pcr-policy` against `systemd-measure sign` (Debian's systemd, with the
//! libtss2 libraries it loads; scripts/deps.sh installs both): the same key and the same PCR 11
//! give the same `.pcrsig`, byte for byte with RSA (PKCS#1 v1.5 is deterministic); with ECDSA
//! the same policy and fingerprint, and each side's signature verifies under the other's check.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use cvm_formats::pcrsig::{self, Expect};

const SYSTEMD_MEASURE: &str = "/usr/lib/systemd/systemd-measure";
/// Where the node unseals: after `leave-initrd`, before `sysinit`.
const PHASE: &str = "enter-initrd:leave-initrd";

fn run(c: &mut Command) -> Output {
    let out = c.output().expect("the command runs");
    assert!(
        out.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn openssl(dir: &Path, args: &[&str]) -> Output {
    run(Command::new("openssl").current_dir(dir).args(args))
}

fn systemd_sign(dir: &Path, key: &str, extra: &[&str]) -> Vec<u8> {
    run(Command::new(SYSTEMD_MEASURE)
        .current_dir(dir)
        .args([
            "sign",
            "--linux=linux",
            "--initrd=initrd",
            "--osrel=osrel",
            "--cmdline=cmdline",
            "--json=short",
        ])
        .arg(format!("--private-key={key}"))
        .args(extra))
    .stdout
}

fn cvm_measure(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cvm-measure"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// The UKI's sections as files, and cvm-measure's prediction of the key-release point.
fn setup(dir: &Path) {
    for (name, bytes) in [
        ("linux", &b"fake-kernel-bytes"[..]),
        ("initrd", b"fake-initrd"),
        ("osrel", b"ID=cvm-test\n"),
        ("cmdline", b"console=ttyS0 cvm.loglevel=debug"),
    ] {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    let out = cvm_measure(
        dir,
        &[
            "predict",
            "--root-hash",
            &"ab".repeat(32),
            "--linux",
            "linux",
            "--initrd",
            "initrd",
            "--osrel",
            "osrel",
            "--cmdline",
            "console=ttyS0 cvm.loglevel=debug",
            "--at",
            "key-release",
            "--json",
        ],
    );
    assert!(out.status.success());
    std::fs::write(dir.join("predicted.json"), out.stdout).unwrap();
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.pem",
        ],
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.pem",
        ],
    );
}

fn ours(dir: &Path, key: &str) -> Vec<u8> {
    let out = cvm_measure(
        dir,
        &[
            "sign-pcr-policy",
            "--predicted",
            "predicted.json",
            "--private-key",
            key,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn only_entry(json: &[u8], sig_len: std::ops::RangeInclusive<usize>) -> pcrsig::Entry {
    let value: serde_json::Value = serde_json::from_slice(json).unwrap();
    let pkfp: [u8; 32] =
        cvm_formats::verity::parse_hex(value["sha256"][0]["pkfp"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
    let mut entries = pcrsig::parse(
        json,
        &Expect {
            pcrs: &[11],
            pkfp,
            sig_len,
        },
    )
    .unwrap();
    assert_eq!(entries.len(), 1);
    entries.remove(0)
}

#[test]
fn rsa_signature_is_systemd_measures_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let theirs = systemd_sign(
        d,
        "rsa.pem",
        &["--bank=sha256", &format!("--phase={PHASE}")],
    );
    let ours = ours(d, "rsa.pem");
    assert_eq!(
        String::from_utf8_lossy(&ours),
        String::from_utf8_lossy(&theirs)
    );
    // The fingerprint is OpenSSL's over the PKCS#1 public key, as systemd computes it.
    let pkcs1 = openssl(
        d,
        &[
            "rsa",
            "-in",
            "rsa.pem",
            "-RSAPublicKey_out",
            "-outform",
            "DER",
        ],
    );
    let entry = only_entry(&ours, 256..=256);
    assert_eq!(entry.pkfp, pcrsig::key_fingerprint(&pkcs1.stdout));
}

#[test]
fn ecdsa_signatures_verify_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let theirs = only_entry(
        &systemd_sign(d, "ec.pem", &["--bank=sha256", &format!("--phase={PHASE}")]),
        8..=72,
    );
    let ours = only_entry(&ours(d, "ec.pem"), 8..=72);
    assert_eq!(ours.pol, theirs.pol);
    assert_eq!(ours.pkfp, theirs.pkfp);
    // Ours under OpenSSL (systemd's library): SHA-256 over the policy digest, DER ECDSA.
    openssl(d, &["pkey", "-in", "ec.pem", "-pubout", "-out", "ec.pub"]);
    std::fs::write(d.join("pol"), ours.pol).unwrap();
    std::fs::write(d.join("ours.sig"), &ours.sig).unwrap();
    let check = openssl(
        d,
        &[
            "dgst",
            "-sha256",
            "-verify",
            "ec.pub",
            "-signature",
            "ours.sig",
            "pol",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&check.stdout).trim(), "Verified OK");
    // Theirs under the check cvm-measure applies to its own output.
    use p256::ecdsa::signature::Verifier as _;
    use p256::pkcs8::DecodePublicKey as _;
    let public = p256::ecdsa::VerifyingKey::from_public_key_pem(
        &std::fs::read_to_string(d.join("ec.pub")).unwrap(),
    )
    .unwrap();
    let sig = p256::ecdsa::Signature::from_der(&theirs.sig).unwrap();
    public.verify(&theirs.pol, &sig).unwrap();
    // And a signature over another policy does not verify.
    assert!(public.verify(&[0u8; 32], &sig).is_err());
}

/// systemd-measure's default output (four banks, four phases) parses, and its key-release
/// entry is the one cvm-measure signs.
#[test]
fn systemd_measures_default_output_parses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let all = systemd_sign(d, "rsa.pem", &[]);
    let ours = only_entry(&ours(d, "rsa.pem"), 256..=256);
    let entries = pcrsig::parse(
        &all,
        &Expect {
            pcrs: &[11],
            pkfp: ours.pkfp,
            sig_len: 256..=256,
        },
    )
    .unwrap();
    assert_eq!(entries.len(), 4);
    assert_eq!(pcrsig::find(&entries, &ours.pol), Some(&ours));
}

#[test]
fn bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    let stderr = |o: Output| {
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    // The prediction at ready is not where the node unseals.
    let ready = cvm_measure(d, &["predict", "--root-hash", &"ab".repeat(32), "--json"]);
    std::fs::write(d.join("ready.json"), ready.stdout).unwrap();
    let (code, text) = stderr(cvm_measure(
        d,
        &[
            "sign-pcr-policy",
            "--predicted",
            "ready.json",
            "--private-key",
            "rsa.pem",
        ],
    ));
    assert_eq!(code, Some(1));
    assert!(
        text.contains("the prediction ready.json is not the key-release point"),
        "{text}"
    );
    // RSA-3072: not what the node's TPM checks.
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:3072",
            "-out",
            "big.pem",
        ],
    );
    let (code, text) = stderr(cvm_measure(
        d,
        &[
            "sign-pcr-policy",
            "--pcr11",
            &"00".repeat(32),
            "--private-key",
            "big.pem",
        ],
    ));
    assert_eq!(code, Some(1));
    assert!(
        text.contains("the private key big.pem is RSA-3072: expected RSA-2048"),
        "{text}"
    );
    let (code, text) = stderr(cvm_measure(
        d,
        &[
            "sign-pcr-policy",
            "--pcr11",
            "abc\u{1b}[2J",
            "--private-key",
            "rsa.pem",
        ],
    ));
    assert_eq!(code, Some(2));
    assert!(
        text.contains("--pcr11 \"abc\\\\x1b[2J\" is not a sha256 PCR value"),
        "{text}"
    );
    let (code, text) = stderr(cvm_measure(
        d,
        &[
            "sign-pcr-policy",
            "--pcr11",
            &"00".repeat(32),
            "--private-key",
            "osrel",
        ],
    ));
    assert_eq!(code, Some(1));
    assert!(
        text.contains("the private key osrel is not an RSA-2048 or ECDSA P-256"),
        "{text}"
    );
}
