//! Sealing to a signed PCR policy against swtpm: a secret sealed with PolicyAuthorize to key K
//! opens with K's signature over PolicyPCR(current PCR 11), for this image and the next one K
//! signs; another key's signature, a signature over another PCR 11, or an image carrying another
//! key are refused by the TPM, by name, and the sealed blob is unchanged. Signatures are made by
//! OpenSSL (as systemd-measure makes them), not by this repository's code.

use std::path::Path;
use std::process::Command;

use cvm_formats::pcrsig::{self, Entry};
use cvm_formats::registers::Bank;
use cvm_formats::tpm::policy_pcr_digest;
use cvm_init::tee::signed_policy::{
    seal_signed, unseal_signed, unseal_with_entry, PolicyKey, SignedPolicyError,
};
use cvm_init::tee::tpm::{Tpm, TpmError};

mod common;
use common::{connect, start_swtpm};

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl is installed by make deps");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A key pair made by OpenSSL: the private key's file name and the public key.
fn keypair(dir: &Path, name: &str, algorithm: &[&str]) -> PolicyKey {
    let file = format!("{name}.pem");
    let mut args = vec!["genpkey"];
    args.extend_from_slice(algorithm);
    args.extend_from_slice(&["-out", &file]);
    openssl(dir, &args);
    let public = openssl(dir, &["pkey", "-in", &file, "-pubout"]);
    PolicyKey::from_pem(&public).expect("OpenSSL's PEM public key")
}

fn rsa(dir: &Path, name: &str) -> PolicyKey {
    keypair(
        dir,
        name,
        &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
    )
}

/// `signer`'s signature over PolicyPCR(pcr11), as an entry naming `key`'s fingerprint.
fn signed(dir: &Path, signer: &str, key: &PolicyKey, pcr11: &[u8]) -> Entry {
    let pol = policy_pcr_digest(&[11], &[pcr11.to_vec()]);
    std::fs::write(dir.join("pol"), pol).unwrap();
    let sig = openssl(
        dir,
        &["dgst", "-sha256", "-sign", &format!("{signer}.pem"), "pol"],
    );
    Entry {
        pcrs: vec![11],
        pkfp: key.fingerprint(),
        pol,
        sig,
    }
}

fn pcr11(port: u16) -> Vec<u8> {
    let mut tpm = Tpm::new(connect(port)).unwrap();
    tpm.read_bank(Bank::Sha256, &[11]).unwrap().remove(0)
}

fn extend11(port: u16, word: &[u8]) {
    let mut tpm = Tpm::new(connect(port)).unwrap();
    tpm.extend(11, |b| b.hash(word)).unwrap();
}

fn code(err: &SignedPolicyError) -> u32 {
    use std::error::Error;
    match err.source().and_then(|s| s.downcast_ref::<TpmError>()) {
        Some(TpmError::Response { code, .. }) => *code,
        _ => panic!("not a TPM refusal: {err:?}"),
    }
}

#[test]
fn signed_policy_opens_for_the_signing_key_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = rsa(d, "k");
    let other = rsa(d, "other");
    let swtpm = start_swtpm(0);
    let port = swtpm.port;
    extend11(port, b"image A");
    let value = pcr11(port);

    let secret = b"a 32-byte state disk unlock key!";
    let blob = seal_signed(&mut connect(port), secret, &k).expect("seal");
    let kept = blob.clone();

    // The UKI's signature file, written and read as the node reads it.
    let file = pcrsig::write(&[signed(d, "k", &k, &value)]);
    let entries = pcrsig::parse(file.as_bytes(), &k.expect()).unwrap();
    let mut t = connect(port);
    let opened = unseal_signed(&mut t, &blob, &k, &entries, &value).expect("unseal");
    assert_eq!(&opened[..], secret);
    assert_eq!(
        &unseal_signed(&mut t, &blob, &k, &entries, &value).expect("unseal twice")[..],
        secret
    );

    // Another key's signature presented as K's: TPM2_VerifySignature refuses it
    // (TPM_RC_SIGNATURE, 0x9b with a parameter number).
    let forged = signed(d, "other", &k, &value);
    let err = unseal_with_entry(&mut t, &blob, &k, &forged).unwrap_err();
    assert!(matches!(err, SignedPolicyError::Verify(_)), "{err}");
    assert_eq!(code(&err) & 0xbf, 0x9b, "{err}");

    // An image that carries another key and that key's valid signature: the TPM verifies it,
    // but the secret is sealed to K's name, so TPM2_Unseal refuses (TPM_RC_POLICY_FAIL).
    let theirs = signed(d, "other", &other, &value);
    let err = unseal_with_entry(&mut t, &blob, &other, &theirs).unwrap_err();
    assert!(matches!(err, SignedPolicyError::Unseal(_)), "{err}");
    assert_eq!(code(&err) & 0xbf, 0x9d, "{err}");
    // And its signature file is refused by the format before that, naming the fingerprint.
    let file = pcrsig::write(&[theirs]);
    let refused = pcrsig::parse(file.as_bytes(), &k.expect()).unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("the fingerprint of another key than the trusted one"),
        "{refused}"
    );

    // K's signature over another PCR 11: no entry for this boot; forced, PolicyAuthorize
    // refuses it (the session's PolicyPCR digest is not the approved one: TPM_RC_VALUE).
    let elsewhere = signed(d, "k", &k, &[0x42; 32]);
    let err =
        unseal_signed(&mut t, &blob, &k, std::slice::from_ref(&elsewhere), &value).unwrap_err();
    assert!(matches!(err, SignedPolicyError::NoEntry { .. }), "{err}");
    let err = unseal_with_entry(&mut t, &blob, &k, &elsewhere).unwrap_err();
    assert!(matches!(err, SignedPolicyError::Authorize(_)), "{err}");
    assert_eq!(code(&err) & 0xbf, 0x84, "{err}");

    // Nothing above changed the sealed blob, and it still opens.
    assert_eq!(blob, kept);
    assert_eq!(
        &unseal_signed(&mut t, &blob, &k, &entries, &value).unwrap()[..],
        secret
    );

    // The next image (PCR 11 moves), signed by K: the same blob opens; the old signature
    // no longer applies.
    drop(t); // swtpm serves one connection at a time
    extend11(port, b"image B");
    let next = pcr11(port);
    let mut t = connect(port);
    assert_ne!(next, value);
    let err = unseal_signed(&mut t, &blob, &k, &entries, &next).unwrap_err();
    assert!(matches!(err, SignedPolicyError::NoEntry { .. }), "{err}");
    let err = unseal_with_entry(&mut t, &blob, &k, &entries[0]).unwrap_err();
    assert!(matches!(err, SignedPolicyError::Authorize(_)), "{err}");
    let upgraded = [signed(d, "k", &k, &next)];
    assert_eq!(
        &unseal_signed(&mut t, &blob, &k, &upgraded, &next).expect("the next image")[..],
        secret
    );
}

#[test]
fn an_ecdsa_p256_key_works_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = keypair(
        d,
        "ec",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let other = keypair(
        d,
        "ec2",
        &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    );
    let swtpm = start_swtpm(1);
    let port = swtpm.port;
    extend11(port, b"image A");
    let value = pcr11(port);
    let secret = b"another secret";
    let blob = seal_signed(&mut connect(port), secret, &k).expect("seal");
    let mut t = connect(port);
    let file = pcrsig::write(&[signed(d, "ec", &k, &value)]);
    let entries = pcrsig::parse(file.as_bytes(), &k.expect()).unwrap();
    assert_eq!(
        &unseal_signed(&mut t, &blob, &k, &entries, &value).expect("unseal")[..],
        secret
    );
    let forged = signed(d, "ec2", &k, &value);
    let err = unseal_with_entry(&mut t, &blob, &k, &forged).unwrap_err();
    assert!(matches!(err, SignedPolicyError::Verify(_)), "{err}");
    let theirs = signed(d, "ec2", &other, &value);
    let err = unseal_with_entry(&mut t, &blob, &other, &theirs).unwrap_err();
    assert!(matches!(err, SignedPolicyError::Unseal(_)), "{err}");
}
