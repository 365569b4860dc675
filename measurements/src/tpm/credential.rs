//! Admitting a vTPM attestation key through its TPM's endorsement (credential activation,
//! TPM 2.0 Part 1 "Credential Protection"): the broker checks that the node's endorsement key
//! (EK) certificate chains to a CA it is configured with, then makes a credential in software
//! (TPM2_MakeCredential) to that EK, bound to the attestation key's (AK's) name. Only a TPM
//! holding both the EK's private key and a loaded object of that name recovers the secret
//! (TPM2_ActivateCredential); the node mixes it into the qualifying data its quote signs
//! (`qualifying_data`), so that a quote verifies only when the AK lives beside the certified EK.
//!
//! Supported: the RSA-2048 EK of the TCG default template (EK Credential Profile, template
//! L-1: SHA-256 name, AES-128-CFB), whose certificate the TPM keeps at NV index 0x01c00002.
//! The AK must be an ECC P-256 restricted signing key created in the TPM (fixedTPM,
//! fixedParent, sensitiveDataOrigin), so that it signs only structures the TPM generated.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use hmac::{Hmac, Mac};
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use sha2::{Digest, Sha256, Sha384, Sha512};
use x509_cert::der::{Decode, Encode};
use zeroize::Zeroizing;

pub use cvm_formats::tpm::{qualifying_data, EK_RSA_CERT_INDEX};
/// Bytes of the credential secret (the EK's name algorithm's digest size).
pub const SECRET_LEN: usize = 32;

const ALG_ECC: u16 = 0x0023;
const ALG_SHA256: u16 = 0x000b;
const ALG_NULL: u16 = 0x0010;
const ALG_ECDSA: u16 = 0x0018;
const CURVE_NIST_P256: u16 = 0x0003;
const FIXED_TPM: u32 = 1 << 1;
const FIXED_PARENT: u32 = 1 << 4;
const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const RESTRICTED: u32 = 1 << 16;
const DECRYPT: u32 = 1 << 17;
const SIGN: u32 = 1 << 18;
/// How many CA certificates an EK certificate's chain may pass through.
const MAX_CHAIN: usize = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("the attestation key's public area is refused: {0}")]
    AkPublic(String),
    #[error("the EK certificate is refused: {0}")]
    Certificate(String),
    #[error("the EK certificate does not chain to a CA this broker is configured with: {0}")]
    Untrusted(String),
    #[error("cannot encrypt the credential seed to the EK: {0}")]
    Encrypt(String),
}

/// An attestation key as the TPM describes it (a TPMT_PUBLIC), with its TPM name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AkPublic {
    /// The P-256 point, 32 bytes each.
    pub x: Vec<u8>,
    pub y: Vec<u8>,
    /// nameAlg (SHA-256) followed by SHA-256 of the TPMT_PUBLIC.
    pub name: Vec<u8>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CredentialError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end =
            end.ok_or_else(|| CredentialError::AkPublic(format!("truncated at byte {}", self.at)))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, CredentialError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, CredentialError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], CredentialError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// Parses an attestation key's TPMT_PUBLIC and checks that it is one the TPM only uses to sign
/// what it generated (a quote), and that could not have been imported from outside the TPM.
pub fn parse_ak_public(public: &[u8]) -> Result<AkPublic, CredentialError> {
    let bad = |what: String| Err(CredentialError::AkPublic(what));
    let mut r = Reader {
        bytes: public,
        at: 0,
    };
    let kind = r.u16()?;
    let name_alg = r.u16()?;
    if kind != ALG_ECC || name_alg != ALG_SHA256 {
        return bad(format!(
            "type {kind:#x} name algorithm {name_alg:#x}, expected ECC (0x23) with SHA-256 (0xb)"
        ));
    }
    let attributes = r.u32()?;
    let required = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
    if attributes & required != required || attributes & DECRYPT != 0 {
        return bad(format!(
            "attributes {attributes:#010x}, expected fixedTPM, fixedParent, sensitiveDataOrigin, restricted and sign without decrypt"
        ));
    }
    r.tpm2b()?; // authPolicy
    let symmetric = r.u16()?;
    let scheme = r.u16()?;
    let hash = if scheme == ALG_NULL { 0 } else { r.u16()? };
    let curve = r.u16()?;
    let kdf = r.u16()?;
    if symmetric != ALG_NULL
        || scheme != ALG_ECDSA
        || hash != ALG_SHA256
        || curve != CURVE_NIST_P256
        || kdf != ALG_NULL
    {
        return bad(format!(
            "symmetric {symmetric:#x} scheme {scheme:#x}/{hash:#x} curve {curve:#x} kdf {kdf:#x}, expected an ECDSA-SHA-256 P-256 signing key"
        ));
    }
    let x = r.tpm2b()?;
    let y = r.tpm2b()?;
    if x.len() > 32 || y.len() > 32 || r.at != public.len() {
        return bad("the point is not two P-256 coordinates ending the structure".into());
    }
    let pad = |v: &[u8]| {
        let mut out = vec![0u8; 32 - v.len()];
        out.extend_from_slice(v);
        out
    };
    let mut name = ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(&Sha256::digest(public));
    Ok(AkPublic {
        x: pad(x),
        y: pad(y),
        name,
    })
}

/// KDFa of TPM 2.0 Part 1 (SP 800-108 counter mode with HMAC-SHA-256); `label` without its
/// terminating NUL, which is added here.
pub fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut counter = 1u32;
    while out.len() * 8 < bits as usize {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key");
        mac.update(&counter.to_be_bytes());
        mac.update(label.as_bytes());
        mac.update(&[0]);
        mac.update(context_u);
        mac.update(context_v);
        mac.update(&bits.to_be_bytes());
        out.extend_from_slice(&mac.finalize().into_bytes());
        counter += 1;
    }
    out.truncate(bits.div_ceil(8) as usize);
    out
}

/// A credential for TPM2_ActivateCredential: the TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
/// buffers (without their size fields).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub id_object: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
}

/// TPM2_MakeCredential in software to an RSA EK of the default template (SHA-256 name
/// algorithm, AES-128-CFB): a random seed encrypted with RSA-OAEP (SHA-256, label
/// "IDENTITY"), the credential `secret` encrypted with the seed's storage key and bound by HMAC
/// to `ak_name`.
pub fn make_credential(
    ek: &rsa::RsaPublicKey,
    ak_name: &[u8],
    secret: &[u8],
) -> Result<Credential, CredentialError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, seed.as_mut());
    let padding = rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0");
    let encrypted_secret = ek
        .encrypt(&mut rand_core::OsRng, padding, seed.as_ref())
        .map_err(|e| CredentialError::Encrypt(e.to_string()))?;
    let symmetric = Zeroizing::new(kdfa(seed.as_ref(), "STORAGE", ak_name, &[], 128));
    let mut encrypted = Zeroizing::new(Vec::with_capacity(2 + secret.len()));
    encrypted.extend_from_slice(&(secret.len() as u16).to_be_bytes());
    encrypted.extend_from_slice(secret);
    cfb_mode::Encryptor::<aes::Aes128>::new(symmetric.as_slice().into(), &[0u8; 16].into())
        .encrypt(encrypted.as_mut_slice());
    let hmac_key = Zeroizing::new(kdfa(seed.as_ref(), "INTEGRITY", &[], &[], 256));
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&hmac_key).expect("HMAC takes any key");
    mac.update(&encrypted);
    mac.update(ak_name);
    let integrity = mac.finalize().into_bytes();
    let mut id_object = (integrity.len() as u16).to_be_bytes().to_vec();
    id_object.extend_from_slice(&integrity);
    id_object.extend_from_slice(&encrypted);
    Ok(Credential {
        id_object,
        encrypted_secret,
    })
}

enum IssuerKey {
    Rsa(rsa::RsaPublicKey),
    P256(p256::ecdsa::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
}

fn public_key(cert: &x509_cert::Certificate) -> Result<IssuerKey, String> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let subject = cert.tbs_certificate.subject.to_string();
    match spki.algorithm.oid.to_string().as_str() {
        "1.2.840.113549.1.1.1" => {
            let der = spki.to_der().map_err(|e| e.to_string())?;
            rsa::RsaPublicKey::from_public_key_der(&der)
                .map(IssuerKey::Rsa)
                .map_err(|e| format!("{subject}: RSA key: {e}"))
        }
        "1.2.840.10045.2.1" => {
            let point = spki.subject_public_key.raw_bytes();
            if let Ok(k) = p256::ecdsa::VerifyingKey::from_sec1_bytes(point) {
                Ok(IssuerKey::P256(k))
            } else {
                p384::ecdsa::VerifyingKey::from_sec1_bytes(point)
                    .map(IssuerKey::P384)
                    .map_err(|_| format!("{subject}: not a P-256 or P-384 key"))
            }
        }
        other => Err(format!(
            "{subject}: key algorithm {other} (expected RSA or EC)"
        )),
    }
}

/// Checks `issuer`'s signature over `cert` (RSA PKCS#1 v1.5 with SHA-256/384/512, ECDSA
/// P-256/SHA-256 or P-384/SHA-384).
fn verify_signature(
    cert: &x509_cert::Certificate,
    issuer: &x509_cert::Certificate,
) -> Result<(), String> {
    let signed = cert.tbs_certificate.to_der().map_err(|e| e.to_string())?;
    let signature = cert
        .signature
        .as_bytes()
        .ok_or("the signature is not whole bytes")?;
    let algorithm = cert.signature_algorithm.oid.to_string();
    let fails = || {
        format!(
            "{}'s signature does not verify",
            issuer.tbs_certificate.subject
        )
    };
    match (algorithm.as_str(), public_key(issuer)?) {
        ("1.2.840.113549.1.1.11", IssuerKey::Rsa(k)) => {
            rsa::pkcs1v15::VerifyingKey::<Sha256>::new(k).verify(
                &signed,
                &rsa::pkcs1v15::Signature::try_from(signature).map_err(|_| fails())?,
            )
        }
        ("1.2.840.113549.1.1.12", IssuerKey::Rsa(k)) => {
            rsa::pkcs1v15::VerifyingKey::<Sha384>::new(k).verify(
                &signed,
                &rsa::pkcs1v15::Signature::try_from(signature).map_err(|_| fails())?,
            )
        }
        ("1.2.840.113549.1.1.13", IssuerKey::Rsa(k)) => {
            rsa::pkcs1v15::VerifyingKey::<Sha512>::new(k).verify(
                &signed,
                &rsa::pkcs1v15::Signature::try_from(signature).map_err(|_| fails())?,
            )
        }
        ("1.2.840.10045.4.3.2", IssuerKey::P256(k)) => k.verify(
            &signed,
            &p256::ecdsa::Signature::from_der(signature).map_err(|_| fails())?,
        ),
        ("1.2.840.10045.4.3.3", IssuerKey::P384(k)) => k.verify(
            &signed,
            &p384::ecdsa::Signature::from_der(signature).map_err(|_| fails())?,
        ),
        (other, _) => {
            return Err(format!(
                "signature algorithm {other} with {}'s key is not supported",
                issuer.tbs_certificate.subject
            ))
        }
    }
    .map_err(|_| fails())
}

fn within_validity(cert: &x509_cert::Certificate, now: std::time::Duration) -> Result<(), String> {
    let validity = &cert.tbs_certificate.validity;
    if now < validity.not_before.to_unix_duration() || now > validity.not_after.to_unix_duration() {
        return Err(format!(
            "{} is not valid now (valid from {} to {} seconds since the epoch)",
            cert.tbs_certificate.subject,
            validity.not_before.to_unix_duration().as_secs(),
            validity.not_after.to_unix_duration().as_secs()
        ));
    }
    Ok(())
}

fn is_ca(cert: &x509_cert::Certificate) -> bool {
    cert.tbs_certificate
        .extensions
        .iter()
        .flatten()
        .filter(|e| e.extn_id.to_string() == "2.5.29.19")
        .filter_map(|e| {
            x509_cert::ext::pkix::BasicConstraints::from_der(e.extn_value.as_bytes()).ok()
        })
        .any(|b| b.ca)
}

/// The RSA key of an EK certificate (DER) that chains, through CA certificates among `cas`
/// (DER), to a self-signed one among them; every certificate valid at `now` (since the epoch,
/// by the broker's clock).
pub fn certified_ek(
    cert_der: &[u8],
    cas: &[Vec<u8>],
    now: std::time::Duration,
) -> Result<rsa::RsaPublicKey, CredentialError> {
    let cert = x509_cert::Certificate::from_der(cert_der)
        .map_err(|e| CredentialError::Certificate(format!("not an X.509 certificate: {e}")))?;
    let ek = match public_key(&cert).map_err(CredentialError::Certificate)? {
        IssuerKey::Rsa(k) if rsa::traits::PublicKeyParts::size(&k) == 256 => k,
        _ => {
            return Err(CredentialError::Certificate(
                "its key is not RSA-2048 (the default EK template)".into(),
            ))
        }
    };
    let untrusted = CredentialError::Untrusted;
    if cas.is_empty() {
        return Err(untrusted(
            "no EK CA is configured (kbs-serve --ek-ca)".into(),
        ));
    }
    let cas: Vec<x509_cert::Certificate> = cas
        .iter()
        .map(|der| x509_cert::Certificate::from_der(der))
        .collect::<Result<_, _>>()
        .map_err(|e| untrusted(format!("a configured CA is not a certificate: {e}")))?;
    within_validity(&cert, now).map_err(CredentialError::Certificate)?;
    let mut current = cert;
    for _ in 0..MAX_CHAIN {
        let issuer_name = &current.tbs_certificate.issuer;
        let mut reasons = Vec::new();
        let issuer = cas.iter().find(|ca| {
            if ca.tbs_certificate.subject != *issuer_name {
                return false;
            }
            match verify_signature(&current, ca)
                .and_then(|_| within_validity(ca, now))
                .and_then(|_| {
                    is_ca(ca)
                        .then_some(())
                        .ok_or(format!("{} is not a CA", ca.tbs_certificate.subject))
                }) {
                Ok(()) => true,
                Err(why) => {
                    reasons.push(why);
                    false
                }
            }
        });
        let Some(issuer) = issuer else {
            return Err(untrusted(if reasons.is_empty() {
                format!("its issuer {issuer_name} is not a configured CA")
            } else {
                reasons.join("; ")
            }));
        };
        if issuer.tbs_certificate.subject == issuer.tbs_certificate.issuer {
            verify_signature(issuer, issuer).map_err(untrusted)?;
            return Ok(ek);
        }
        current = issuer.clone();
    }
    Err(untrusted(format!(
        "no self-signed configured CA within {MAX_CHAIN} certificates"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TPMT_PUBLIC like the init's attestation key, with `attributes`.
    fn ak(attributes: u32) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&ALG_ECC.to_be_bytes());
        p.extend_from_slice(&ALG_SHA256.to_be_bytes());
        p.extend_from_slice(&attributes.to_be_bytes());
        p.extend_from_slice(&0u16.to_be_bytes());
        for v in [ALG_NULL, ALG_ECDSA, ALG_SHA256, CURVE_NIST_P256, ALG_NULL] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        for c in [1u8, 2] {
            p.extend_from_slice(&32u16.to_be_bytes());
            p.extend_from_slice(&[c; 32]);
        }
        p
    }

    #[test]
    fn attestation_keys_that_could_sign_anything_or_come_from_outside_are_refused() {
        let good = parse_ak_public(&ak(0x0005_0072)).unwrap();
        assert_eq!(good.x, vec![1; 32]);
        assert_eq!(&good.name[..2], &[0, 0x0b]);
        assert_eq!(&good.name[2..], Sha256::digest(ak(0x0005_0072)).as_slice());
        // Not restricted (signs any digest), not fixedTPM (importable), also decrypt.
        for attributes in [0x0004_0072, 0x0005_0070, 0x0007_0072] {
            assert!(matches!(
                parse_ak_public(&ak(attributes)),
                Err(CredentialError::AkPublic(_))
            ));
        }
        let mut trailing = ak(0x0005_0072);
        trailing.push(0);
        assert!(parse_ak_public(&trailing).is_err());
        assert!(parse_ak_public(&ak(0x0005_0072)[..20]).is_err());
    }

    /// KDFa's shape: counter, label with its NUL, contexts, the length in bits; truncated.
    #[test]
    fn kdfa_is_counter_mode_hmac() {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"seed").unwrap();
        mac.update(&[0, 0, 0, 1]);
        mac.update(b"STORAGE\0");
        mac.update(b"name");
        mac.update(&128u32.to_be_bytes());
        let first = mac.finalize().into_bytes();
        assert_eq!(kdfa(b"seed", "STORAGE", b"name", &[], 128), &first[..16]);
        assert_eq!(kdfa(b"seed", "INTEGRITY", &[], &[], 512).len(), 64);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_public_areas_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let _ = parse_ak_public(&bytes);
        }
    }
}
