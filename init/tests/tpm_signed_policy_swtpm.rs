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
    let key = PolicyKey::from_pem(&public).expect("OpenSSL's PEM public key");
    // The fingerprint is systemd's: SHA-256 of i2d_PublicKey (PKCS#1 for RSA, the point for EC).
    let raw = match key {
        PolicyKey::Rsa2048 { .. } => openssl(
            dir,
            &["rsa", "-in", &file, "-RSAPublicKey_out", "-outform", "DER"],
        ),
        PolicyKey::P256 { .. } => {
            let der = openssl(dir, &["pkey", "-in", &file, "-pubout", "-outform", "DER"]);
            der[der.len() - 65..].to_vec()
        }
    };
    assert_eq!(key.fingerprint(), pcrsig::key_fingerprint(&raw));
    key
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

/// The `tpm` key source with `tpm_policy = "signed"` through a LUKS2 header: image A formats
/// (sealing and checking its own unseal first), image B of the same key opens, image C of
/// another key is refused with the reason, and the header's bytes are unchanged.
#[test]
fn signed_key_source_round_trip_through_a_luks2_header() {
    use cvm_init::disk::luks2::{self, FormatInput, KdfPolicy, Policy};
    use cvm_init::keys::{KeyError, KeySource, TpmSigned};

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let k = rsa(d, "k");
    let c = rsa(d, "c");
    let swtpm = start_swtpm(2);
    let port = swtpm.port;
    extend11(port, b"image A");
    let a = pcr11(port);
    let source = |key: &PolicyKey, signer: &str, value: &[u8]| {
        let file = pcrsig::write(&[signed(d, signer, key, value)]);
        TpmSigned {
            transport: connect(port),
            key: key.clone(),
            entries: pcrsig::parse(file.as_bytes(), &key.expect()).unwrap(),
            pcr11: value.to_vec(),
        }
    };
    let provisioned = {
        let mut image_a = source(&k, "k", &a);
        image_a.provision().expect("image A seals")
    };
    let policy = Policy {
        integrity: false,
        kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
    };
    let volume_key = [9u8; 64];
    let head = luks2::format(FormatInput {
        policy,
        uuid: "11111111-2222-4333-8444-555555555555",
        secret: &provisioned.secret,
        volume_key: &volume_key,
        label: "cvm-state",
        token: provisioned.token.as_deref(),
        random: &mut luks2::kernel_random,
    })
    .unwrap();
    let kept = head.clone();
    let header = luks2::parse(&head[..2 * luks2::HDR_SIZE as usize], 64 << 20, &policy).unwrap();
    let token = header.metadata.tokens.0.get("0");
    assert_eq!(token.unwrap().kind, "cvm-tpm2-signed");
    let unlock = |secret: &[u8]| {
        luks2::unlock(&header, secret, &mut |offset, buf| {
            buf.copy_from_slice(&head[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
    };

    // Image B: another PCR 11, signed by the same key.
    extend11(port, b"image B");
    let b = pcr11(port);
    let secret = source(&k, "k", &b).recover(token).expect("image B opens");
    assert_eq!(&unlock(&secret).unwrap()[..], &volume_key[..]);

    // Image C: signed by another key, which it carries.
    let err = source(&c, "c", &b).recover(token).err().unwrap();
    assert!(
        matches!(err, KeyError::Signed(SignedPolicyError::Unseal(_))),
        "{err}"
    );
    // An unsigned image (no entry for this PCR 11) is refused before the TPM.
    let mut unsigned = source(&k, "k", &a);
    unsigned.pcr11 = b.clone();
    let err = unsigned.recover(token).err().unwrap();
    drop(unsigned); // swtpm serves one connection at a time
    assert!(
        matches!(err, KeyError::Signed(SignedPolicyError::NoEntry { .. })),
        "{err}"
    );
    assert_eq!(head, kept);

    // A source whose own signature does not open what it sealed formats nothing.
    let mut wrong = source(&k, "c", &b);
    wrong.entries[0].pkfp = k.fingerprint();
    let err = wrong.provision().err().unwrap();
    assert!(matches!(err, KeyError::SignedSelfCheck(_)), "{err}");
}
