//! Sealing to a signed PCR policy (systemd's model for surviving an image upgrade): the secret's
//! policy is TPM2_PolicyAuthorize to the operator's public key (its TPM name, empty policyRef),
//! so any PCR 11 value the key signed opens it. Unsealing loads the public key
//! (TPM2_LoadExternal), has the TPM check the signature over the PolicyPCR digest of the
//! current PCR 11 (TPM2_VerifySignature, giving a ticket), then runs PolicyPCR and
//! PolicyAuthorize with that ticket on the session. The signature file is the UKI's `.pcrsig`
//! (`cvm_formats::pcrsig`); the public key its `.pcrpkey` (PEM SubjectPublicKeyInfo).
//!
//! The public key is read by a small strict DER reader here rather than a crate: the static
//! PID 1 needs two fixed shapes (RSA-2048, ECDSA P-256), and the TPM checks the signature.

use base64::Engine as _;
use cvm_formats::pcrsig::{self, Entry, Expect};
use cvm_formats::tpm::policy_pcr_digest;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::seal::{
    call, flush, policy_pcr, seal_to_policy, unseal_with, Out, SealedBlob, ALG_NULL, ALG_SHA256,
    TPM_ST_NO_SESSIONS,
};
use super::tpm::{self, TpmError, Transport};

/// The PCR a signed policy covers: the UKI's sections and the boot phases.
pub const SIGNED_PCRS: [u32; 1] = [11];

const TPM_CC_POLICY_AUTHORIZE: u32 = 0x16a;
const TPM_CC_LOAD_EXTERNAL: u32 = 0x167;
const TPM_CC_VERIFY_SIGNATURE: u32 = 0x177;
const TPM_CC_UNSEAL: u32 = 0x15e;
const TPM_RH_OWNER: u32 = 0x4000_0001;
const TPM_ALG_RSA: u16 = 0x0001;
const TPM_ALG_ECC: u16 = 0x0023;
const TPM_ALG_RSASSA: u16 = 0x0014;
const TPM_ALG_ECDSA: u16 = 0x0018;
const TPM_ECC_NIST_P256: u16 = 0x0003;
/// userWithAuth, decrypt, sign: the attributes systemd gives the key it loads.
const KEY_ATTRIBUTES: u32 = 0x0006_0040;

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

#[derive(Debug, thiserror::Error)]
pub enum SignedPolicyError {
    #[error("the PCR public key is not a PEM public key (-----BEGIN PUBLIC KEY-----)")]
    Pem,
    #[error("the PCR public key is more than {0} bytes, too long for an RSA-2048 or P-256 key")]
    TooLong(usize),
    #[error("the PCR public key is malformed DER: {0}")]
    Der(&'static str),
    #[error("the PCR public key is not RSA-2048 or ECDSA P-256 ({0})")]
    KeyType(&'static str),
    #[error(transparent)]
    Signature(#[from] pcrsig::PcrSigError),
    #[error("the PCR signature has no entry for the current PCR 11 {pcr11} (policy {policy}): this image was not signed for this boot")]
    NoEntry { pcr11: String, policy: String },
    #[error("the PCR signature also signs PCR 11 after the `{phase}` phase (policy {policy}): with it a process on the running node could unseal the disk's secret again; sign the key-release point only (systemd-measure sign --phase=enter-initrd:leave-initrd)")]
    LaterPhase { phase: &'static str, policy: String },
    #[error("the PCR signature's ECDSA signature is not DER (r, s)")]
    EcdsaDer,
    #[error("the TPM did not load the PCR public key (TPM2_LoadExternal)")]
    Load(#[source] TpmError),
    #[error("the TPM loaded the PCR public key under another name than computed")]
    Name,
    #[error("the TPM refused the PCR policy signature (TPM2_VerifySignature): not made by this key over this policy")]
    Verify(#[source] TpmError),
    #[error("the TPM refused the signed policy for the current PCRs (TPM2_PolicyAuthorize)")]
    Authorize(#[source] TpmError),
    #[error("the TPM refused to unseal: the secret is sealed to another signing key or policy (TPM2_Unseal)")]
    Unseal(#[source] TpmError),
    #[error(transparent)]
    Tpm(#[from] TpmError),
}

/// The operator's public key, as the TPM will load it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyKey {
    /// The modulus (256 bytes) and the public exponent.
    Rsa2048 { n: Vec<u8>, e: u32 },
    /// The point's coordinates.
    P256 { x: [u8; 32], y: [u8; 32] },
}

/// One DER element: (tag, contents, rest). Definite, minimal lengths only.
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), SignedPolicyError> {
    let short = SignedPolicyError::Der("truncated");
    let (&tag, rest) = input.split_first().ok_or(short)?;
    let (&first, rest) = rest
        .split_first()
        .ok_or(SignedPolicyError::Der("truncated"))?;
    let (len, rest) = match first {
        n if n < 0x80 => (n as usize, rest),
        0x81 => match rest.split_first() {
            Some((&n, r)) if n >= 0x80 => (n as usize, r),
            _ => return Err(SignedPolicyError::Der("non-minimal length")),
        },
        0x82 => match rest {
            [a, b, r @ ..] if *a != 0 => (((*a as usize) << 8) | *b as usize, r),
            _ => return Err(SignedPolicyError::Der("non-minimal length")),
        },
        _ => return Err(SignedPolicyError::Der("unsupported length")),
    };
    if rest.len() < len {
        return Err(SignedPolicyError::Der("truncated"));
    }
    Ok((tag, &rest[..len], &rest[len..]))
}

fn expect_tlv(input: &[u8], want: u8) -> Result<(&[u8], &[u8]), SignedPolicyError> {
    match tlv(input)? {
        (tag, body, rest) if tag == want => Ok((body, rest)),
        _ => Err(SignedPolicyError::Der("unexpected element")),
    }
}

/// A positive DER INTEGER's magnitude, without the sign byte.
fn unsigned(body: &[u8]) -> Result<&[u8], SignedPolicyError> {
    match body {
        [] => Err(SignedPolicyError::Der("empty integer")),
        [0, next, ..] if *next < 0x80 => Err(SignedPolicyError::Der("non-minimal integer")),
        [0, rest @ ..] if !rest.is_empty() => Ok(rest),
        [first, ..] if *first >= 0x80 => Err(SignedPolicyError::Der("negative integer")),
        _ => Ok(body),
    }
}

impl PolicyKey {
    /// Reads a PEM SubjectPublicKeyInfo (the UKI's `.pcrpkey`).
    pub fn from_pem(text: &[u8]) -> Result<Self, SignedPolicyError> {
        let text = std::str::from_utf8(text).map_err(|_| SignedPolicyError::Pem)?;
        let body = text
            .trim_end_matches('\n')
            .strip_prefix("-----BEGIN PUBLIC KEY-----\n")
            .and_then(|t| t.strip_suffix("\n-----END PUBLIC KEY-----"))
            .ok_or(SignedPolicyError::Pem)?;
        let b64: String = body.split('\n').collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|_| SignedPolicyError::Pem)?;
        Self::from_spki_der(&der)
    }

    /// Reads a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, SignedPolicyError> {
        let (spki, rest) = expect_tlv(der, 0x30)?;
        if !rest.is_empty() {
            return Err(SignedPolicyError::Der("trailing bytes"));
        }
        let (alg, rest) = expect_tlv(spki, 0x30)?;
        let (bits, rest) = expect_tlv(rest, 0x03)?;
        if !rest.is_empty() {
            return Err(SignedPolicyError::Der("trailing bytes"));
        }
        let key = match bits {
            [0, key @ ..] => key,
            _ => return Err(SignedPolicyError::Der("bit string with unused bits")),
        };
        let (oid, params) = expect_tlv(alg, 0x06)?;
        if oid == OID_RSA {
            if params != [0x05, 0x00] {
                return Err(SignedPolicyError::Der("RSA parameters are not NULL"));
            }
            let (seq, rest) = expect_tlv(key, 0x30)?;
            if !rest.is_empty() {
                return Err(SignedPolicyError::Der("trailing bytes"));
            }
            let (n, rest) = expect_tlv(seq, 0x02)?;
            let (e, rest) = expect_tlv(rest, 0x02)?;
            if !rest.is_empty() {
                return Err(SignedPolicyError::Der("trailing bytes"));
            }
            let (n, e) = (unsigned(n)?, unsigned(e)?);
            if n.len() != 256 || n[0] < 0x80 {
                return Err(SignedPolicyError::KeyType("an RSA key of another size"));
            }
            if e.len() > 4 {
                return Err(SignedPolicyError::KeyType("an RSA exponent over 32 bits"));
            }
            let e = e.iter().fold(0u32, |a, &b| (a << 8) | b as u32);
            if e < 3 || e % 2 == 0 {
                return Err(SignedPolicyError::KeyType("an invalid RSA exponent"));
            }
            Ok(PolicyKey::Rsa2048 { n: n.to_vec(), e })
        } else if oid == OID_EC {
            let (curve, rest) = expect_tlv(params, 0x06)?;
            if curve != OID_P256 || !rest.is_empty() {
                return Err(SignedPolicyError::KeyType("an EC key on another curve"));
            }
            match key {
                [4, point @ ..] if point.len() == 64 => Ok(PolicyKey::P256 {
                    x: point[..32].try_into().unwrap(),
                    y: point[32..].try_into().unwrap(),
                }),
                _ => Err(SignedPolicyError::KeyType(
                    "an EC point that is not uncompressed",
                )),
            }
        } else {
            Err(SignedPolicyError::KeyType("another algorithm"))
        }
    }

    /// systemd's `pkfp`: SHA-256 of the key as `i2d_PublicKey` writes it.
    pub fn fingerprint(&self) -> [u8; 32] {
        let raw = match self {
            PolicyKey::Rsa2048 { n, e } => {
                // RSAPublicKey ::= SEQUENCE { INTEGER n, INTEGER e }, minimal encodings.
                let int = |v: &[u8]| {
                    let v = &v[v.iter().take_while(|&&b| b == 0).count().min(v.len() - 1)..];
                    let mut out = vec![0x02];
                    let pad = v[0] >= 0x80;
                    der_len(&mut out, v.len() + pad as usize);
                    if pad {
                        out.push(0);
                    }
                    out.extend_from_slice(v);
                    out
                };
                let body = [int(n), int(&e.to_be_bytes())].concat();
                let mut out = vec![0x30];
                der_len(&mut out, body.len());
                out.extend_from_slice(&body);
                out
            }
            PolicyKey::P256 { x, y } => [&[4u8][..], x, y].concat(),
        };
        pcrsig::key_fingerprint(&raw)
    }

    /// The TPMT_PUBLIC the key is loaded as.
    pub fn public_area(&self) -> Vec<u8> {
        let mut p = Out::default();
        match self {
            PolicyKey::Rsa2048 { n, e } => {
                p.u16(TPM_ALG_RSA)
                    .u16(ALG_SHA256)
                    .u32(KEY_ATTRIBUTES)
                    .tpm2b(&[])
                    .u16(ALG_NULL) // symmetric
                    .u16(ALG_NULL) // scheme
                    .u16(2048)
                    .u32(if *e == 65537 { 0 } else { *e })
                    .tpm2b(n);
            }
            PolicyKey::P256 { x, y } => {
                p.u16(TPM_ALG_ECC)
                    .u16(ALG_SHA256)
                    .u32(KEY_ATTRIBUTES)
                    .tpm2b(&[])
                    .u16(ALG_NULL) // symmetric
                    .u16(ALG_NULL) // scheme
                    .u16(TPM_ECC_NIST_P256)
                    .u16(ALG_NULL) // kdf
                    .tpm2b(x)
                    .tpm2b(y);
            }
        }
        p.0
    }

    /// The key's TPM name: nameAlg, then SHA-256 of its public area.
    pub fn name(&self) -> Vec<u8> {
        let mut name = ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(&Sha256::digest(self.public_area()));
        name
    }

    /// What a signature file must hold for this key.
    pub fn expect(&self) -> Expect<'static> {
        Expect {
            pcrs: &SIGNED_PCRS,
            pkfp: self.fingerprint(),
            sig_len: match self {
                PolicyKey::Rsa2048 { .. } => 256..=256,
                PolicyKey::P256 { .. } => 8..=72,
            },
        }
    }

    /// The TPMT_SIGNATURE of a `.pcrsig` signature.
    fn signature(&self, sig: &[u8]) -> Result<Vec<u8>, SignedPolicyError> {
        let mut s = Out::default();
        match self {
            PolicyKey::Rsa2048 { .. } => {
                s.u16(TPM_ALG_RSASSA).u16(ALG_SHA256).tpm2b(sig);
            }
            PolicyKey::P256 { .. } => {
                let bad = |_| SignedPolicyError::EcdsaDer;
                let (seq, rest) = expect_tlv(sig, 0x30).map_err(bad)?;
                let (r, rest2) = expect_tlv(seq, 0x02).map_err(bad)?;
                let (sv, rest3) = expect_tlv(rest2, 0x02).map_err(bad)?;
                if !rest.is_empty() || !rest3.is_empty() {
                    return Err(SignedPolicyError::EcdsaDer);
                }
                let scalar = |v: &[u8]| -> Result<[u8; 32], SignedPolicyError> {
                    let v = unsigned(v).map_err(bad)?;
                    if v.len() > 32 {
                        return Err(SignedPolicyError::EcdsaDer);
                    }
                    let mut out = [0u8; 32];
                    out[32 - v.len()..].copy_from_slice(v);
                    Ok(out)
                };
                s.u16(TPM_ALG_ECDSA)
                    .u16(ALG_SHA256)
                    .tpm2b(&scalar(r)?)
                    .tpm2b(&scalar(sv)?);
            }
        }
        Ok(s.0)
    }
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    match len {
        0..=0x7f => out.push(len as u8),
        0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
        _ => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
    }
}

/// The policy digest a secret sealed to `key` carries: PolicyAuthorize(key's name) with an
/// empty policyRef, from a zero digest.
pub fn authorize_policy(key: &PolicyKey) -> [u8; 32] {
    let first: [u8; 32] = Sha256::new()
        .chain_update([0u8; 32])
        .chain_update(TPM_CC_POLICY_AUTHORIZE.to_be_bytes())
        .chain_update(key.name())
        .finalize()
        .into();
    // The policyRef step: H(digest ‖ policyRef), the reference empty.
    Sha256::digest(first).into()
}

/// Seals `secret` (at most 128 bytes) so that a policy signed by `key` opens it.
pub fn seal_signed<T: Transport>(
    t: &mut T,
    secret: &[u8],
    key: &PolicyKey,
) -> Result<SealedBlob, TpmError> {
    seal_to_policy(t, secret, &SIGNED_PCRS, &authorize_policy(key))
}

/// Unseals with the entry of `entries` that signs the PolicyPCR of `pcr11` (the current sha256
/// PCR 11). Refused before the TPM when no entry matches.
pub fn unseal_signed<T: Transport>(
    t: &mut T,
    blob: &SealedBlob,
    key: &PolicyKey,
    entries: &[Entry],
    pcr11: &[u8],
) -> Result<Zeroizing<Vec<u8>>, SignedPolicyError> {
    let policy = policy_pcr_digest(&SIGNED_PCRS, &[pcr11.to_vec()]);
    let entry = pcrsig::find(entries, &policy).ok_or_else(|| SignedPolicyError::NoEntry {
        pcr11: cvm_formats::hex(pcr11),
        policy: cvm_formats::hex(&policy),
    })?;
    refuse_later_phases(entries, pcr11)?;
    unseal_with_entry(t, blob, key, entry)
}

/// After the key release this boot extends PCR 11 with `sysinit` and later `ready`; the TPM
/// would honour a signature for those values too, so that anything running on the node could
/// unseal the secret again. systemd-measure signs them by default: such a file is refused.
fn refuse_later_phases(entries: &[Entry], pcr11: &[u8]) -> Result<(), SignedPolicyError> {
    use cvm_formats::event::{Event, Phase};
    use cvm_formats::registers::Bank;
    let mut value = pcr11.to_vec();
    for phase in [Phase::Sysinit, Phase::Ready] {
        value = Bank::Sha256.extend(&value, &Event::Phase(phase).digest(Bank::Sha256));
        let policy = policy_pcr_digest(&SIGNED_PCRS, &[value.clone()]);
        if pcrsig::find(entries, &policy).is_some() {
            return Err(SignedPolicyError::LaterPhase {
                phase: phase.word(),
                policy: cvm_formats::hex(&policy),
            });
        }
    }
    Ok(())
}

/// Unseals with one signed policy, whatever the current PCRs: the TPM is the judge.
pub fn unseal_with_entry<T: Transport>(
    t: &mut T,
    blob: &SealedBlob,
    key: &PolicyKey,
    entry: &Entry,
) -> Result<Zeroizing<Vec<u8>>, SignedPolicyError> {
    let signature = key.signature(&entry.sig)?;
    // TPM2_LoadExternal of the public part, in the owner hierarchy (a key in the null
    // hierarchy gets a null ticket, which PolicyAuthorize refuses).
    let mut l = Out::default();
    l.u16(0).tpm2b(&key.public_area()).u32(TPM_RH_OWNER);
    let reply =
        call(t, TPM_ST_NO_SESSIONS, TPM_CC_LOAD_EXTERNAL, &l.0).map_err(SignedPolicyError::Load)?;
    let mut r = tpm::response(TPM_CC_LOAD_EXTERNAL, &reply)?;
    let handle = r.u32()?;
    let name = key.name();
    if r.tpm2b()? != name.as_slice() {
        flush(t, handle);
        return Err(SignedPolicyError::Name);
    }
    // The TPM checks the signature over H(approvedPolicy ‖ policyRef) and returns a ticket.
    let a_hash = Sha256::digest(entry.pol);
    let mut v = Out::default();
    v.u32(handle).tpm2b(&a_hash).bytes(&signature);
    let verified = call(t, TPM_ST_NO_SESSIONS, TPM_CC_VERIFY_SIGNATURE, &v.0);
    flush(t, handle);
    let reply = verified.map_err(SignedPolicyError::Verify)?;
    let mut r = tpm::response(TPM_CC_VERIFY_SIGNATURE, &reply)?;
    let mut ticket = Out::default();
    ticket.u16(r.u16()?).u32(r.u32()?).tpm2b(r.tpm2b()?);
    let unsealed = unseal_with(t, blob, |t, session| {
        policy_pcr(t, session, &SIGNED_PCRS)?;
        let mut a = Out::default();
        a.u32(session)
            .tpm2b(&entry.pol)
            .tpm2b(&[])
            .tpm2b(&name)
            .bytes(&ticket.0);
        call(t, TPM_ST_NO_SESSIONS, TPM_CC_POLICY_AUTHORIZE, &a.0)
            .map(drop)
            .map_err(SignedPolicyError::Authorize)
    });
    unsealed.map_err(|e| match e {
        SignedPolicyError::Tpm(e @ TpmError::Response { command, .. })
            if command == TPM_CC_UNSEAL =>
        {
            SignedPolicyError::Unseal(e)
        }
        e => e,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// A P-256 public key (the test key of the swtpm test, any valid point will do here).
    fn ec_key() -> PolicyKey {
        PolicyKey::P256 {
            x: [0x11; 32],
            y: [0x22; 32],
        }
    }

    fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
        let int = |v: &[u8]| {
            let mut o = vec![0x02];
            der_len(&mut o, v.len());
            o.extend_from_slice(v);
            o
        };
        let seq = |tag: u8, body: Vec<u8>| {
            let mut o = vec![tag];
            der_len(&mut o, body.len());
            o.extend(body);
            o
        };
        let key = seq(0x30, [int(n), int(e)].concat());
        let alg = seq(0x30, [&[0x06, 9][..], OID_RSA, &[5, 0]].concat());
        let bits = seq(0x03, [&[0u8][..], &key].concat());
        seq(0x30, [alg, bits].concat())
    }

    #[test]
    fn rsa_keys_are_read_strictly() {
        let mut n = vec![0u8];
        n.extend([0xc5; 256]);
        let der = rsa_spki(&n, &[1, 0, 1]);
        let key = PolicyKey::from_spki_der(&der).unwrap();
        assert_eq!(
            key,
            PolicyKey::Rsa2048 {
                n: vec![0xc5; 256],
                e: 65537
            }
        );
        // The fingerprint hashes the RSAPublicKey inside the bit string, as systemd does.
        let inner = &der[der.len() - 270..];
        assert_eq!(inner[0], 0x30);
        assert_eq!(key.fingerprint(), pcrsig::key_fingerprint(inner));
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&der)
        );
        assert_eq!(PolicyKey::from_pem(pem.as_bytes()).unwrap(), key);
        // RSA-1024, an even exponent, a trailing byte, a negative modulus.
        let short = rsa_spki(&n[..129], &[1, 0, 1]);
        assert!(matches!(
            PolicyKey::from_spki_der(&short),
            Err(SignedPolicyError::KeyType(_))
        ));
        assert!(matches!(
            PolicyKey::from_spki_der(&rsa_spki(&n, &[2])),
            Err(SignedPolicyError::KeyType(_))
        ));
        let mut trailing = der.clone();
        trailing.push(0);
        assert!(matches!(
            PolicyKey::from_spki_der(&trailing),
            Err(SignedPolicyError::Der(_))
        ));
        assert!(matches!(
            PolicyKey::from_spki_der(&rsa_spki(&n[1..], &[1, 0, 1])),
            Err(SignedPolicyError::Der("negative integer"))
        ));
        assert!(matches!(
            PolicyKey::from_pem(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(SignedPolicyError::Pem)
        ));
        for cut in 0..der.len() {
            assert!(
                PolicyKey::from_spki_der(&der[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn authorize_policy_follows_the_key_name() {
        let key = ec_key();
        assert_eq!(key.name().len(), 34);
        assert_eq!(&key.name()[..2], &[0, 0x0b]);
        let other = PolicyKey::P256 {
            x: [0x11; 32],
            y: [0x23; 32],
        };
        assert_ne!(authorize_policy(&key), authorize_policy(&other));
        // PolicyAuthorize from zero, then the empty policyRef step.
        let mut h = Sha256::new();
        h.update([0u8; 32]);
        h.update([0, 0, 1, 0x6a]);
        h.update(key.name());
        let first: [u8; 32] = h.finalize().into();
        assert_eq!(
            authorize_policy(&key),
            <[u8; 32]>::from(Sha256::digest(first))
        );
    }

    /// A TPM that records command codes, answers each with `answer`, and fails `fail`.
    struct FakeTpm {
        log: Rc<RefCell<Vec<u32>>>,
        name: Vec<u8>,
        fail: Option<u32>,
    }

    impl Transport for FakeTpm {
        fn transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>> {
            let code = u32::from_be_bytes(command[6..10].try_into().unwrap());
            self.log.borrow_mut().push(code);
            let mut body = Vec::new();
            let rc = if self.fail == Some(code) { 0x9a2 } else { 0 };
            if rc == 0 {
                match code {
                    TPM_CC_LOAD_EXTERNAL => {
                        body.extend([0x80, 0, 0, 9]);
                        body.extend((self.name.len() as u16).to_be_bytes());
                        body.extend(&self.name);
                    }
                    TPM_CC_VERIFY_SIGNATURE => {
                        body.extend([0x80, 0x22, 0x40, 0, 0, 1, 0, 2, 0xaa, 0xbb]);
                    }
                    0x131 | 0x157 | 0x176 => body.extend([0x80, 0, 0, 1]),
                    TPM_CC_UNSEAL => body.extend([0, 0, 0, 5, 0, 3, b'k', b'e', b'y']),
                    _ => {}
                }
            }
            let mut reply = 0x8001u16.to_be_bytes().to_vec();
            reply.extend(((10 + body.len()) as u32).to_be_bytes());
            reply.extend((rc as u32).to_be_bytes());
            reply.extend(body);
            Ok(reply)
        }
    }

    fn entry_for(key: &PolicyKey, pcr11: &[u8]) -> Entry {
        // A DER ECDSA signature (r = 1, s = 2): the fake TPM accepts anything.
        Entry {
            pcrs: vec![11],
            pkfp: key.fingerprint(),
            pol: policy_pcr_digest(&SIGNED_PCRS, &[pcr11.to_vec()]),
            sig: vec![0x30, 6, 2, 1, 1, 2, 1, 2],
        }
    }

    fn fake(key: &PolicyKey, fail: Option<u32>) -> (FakeTpm, Rc<RefCell<Vec<u32>>>) {
        let log = Rc::new(RefCell::new(Vec::new()));
        let t = FakeTpm {
            log: log.clone(),
            name: key.name(),
            fail,
        };
        (t, log)
    }

    fn blob() -> SealedBlob {
        SealedBlob {
            private: vec![1],
            public: vec![2],
            pcrs: vec![11],
        }
    }

    #[test]
    fn unseal_runs_verify_then_pcr_then_authorize() {
        let key = ec_key();
        let (mut t, log) = fake(&key, None);
        let pcr11 = [7u8; 32];
        let secret =
            unseal_signed(&mut t, &blob(), &key, &[entry_for(&key, &pcr11)], &pcr11).unwrap();
        assert_eq!(&secret[..], b"key");
        let codes: Vec<u32> = log
            .borrow()
            .iter()
            .copied()
            .filter(|&c| c != 0x165)
            .collect();
        assert_eq!(
            codes,
            [
                TPM_CC_LOAD_EXTERNAL,
                TPM_CC_VERIFY_SIGNATURE,
                0x131,
                0x157,
                0x176,
                0x17f,
                TPM_CC_POLICY_AUTHORIZE,
                TPM_CC_UNSEAL
            ]
        );
    }

    /// A file that also signs PCR 11 after `sysinit` or `ready` (systemd-measure's default
    /// phases) is refused before the TPM is asked, naming the phase.
    #[test]
    fn signatures_of_later_phases_are_refused_before_the_tpm() {
        use cvm_formats::registers::Bank;
        let key = ec_key();
        let pcr11 = [7u8; 32];
        let sysinit = Bank::Sha256.extend(&pcr11, &Bank::Sha256.hash(b"sysinit"));
        let ready = Bank::Sha256.extend(&sysinit, &Bank::Sha256.hash(b"ready"));
        for (later, phase) in [(&sysinit, "sysinit"), (&ready, "ready")] {
            let (mut t, log) = fake(&key, None);
            let entries = [entry_for(&key, &pcr11), entry_for(&key, later)];
            let err = unseal_signed(&mut t, &blob(), &key, &entries, &pcr11).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!(
                    "the PCR signature also signs PCR 11 after the `{phase}` phase"
                )),
                "{err}"
            );
            assert!(log.borrow().is_empty(), "the TPM was asked");
        }
        // The key-release point alone, and other values besides it, are accepted.
        let (mut t, _) = fake(&key, None);
        let entries = [entry_for(&key, &pcr11), entry_for(&key, &[9; 32])];
        assert!(unseal_signed(&mut t, &blob(), &key, &entries, &pcr11).is_ok());
    }

    #[test]
    fn refusals_are_named_and_stop_before_unseal() {
        let key = ec_key();
        let pcr11 = [7u8; 32];
        // No entry for the current PCR 11: the TPM is not even asked.
        let (mut t, log) = fake(&key, None);
        let err =
            unseal_signed(&mut t, &blob(), &key, &[entry_for(&key, &[8; 32])], &pcr11).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the PCR signature has no entry for the current PCR 11 0707"),
            "{err}"
        );
        assert!(log.borrow().is_empty());
        for (fail, name) in [
            (TPM_CC_VERIFY_SIGNATURE, "TPM2_VerifySignature"),
            (TPM_CC_POLICY_AUTHORIZE, "TPM2_PolicyAuthorize"),
            (TPM_CC_UNSEAL, "TPM2_Unseal"),
        ] {
            let (mut t, log) = fake(&key, Some(fail));
            let err = unseal_signed(&mut t, &blob(), &key, &[entry_for(&key, &pcr11)], &pcr11)
                .unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
            if fail != TPM_CC_UNSEAL {
                assert!(!log.borrow().contains(&TPM_CC_UNSEAL));
            }
        }
        // The TPM names the key differently than computed: stop.
        let (mut t, _) = fake(&key, None);
        t.name[5] ^= 1;
        assert!(matches!(
            unseal_signed(&mut t, &blob(), &key, &[entry_for(&key, &pcr11)], &pcr11),
            Err(SignedPolicyError::Name)
        ));
        // A signature that is not DER ECDSA.
        let mut bad = entry_for(&key, &pcr11);
        bad.sig = vec![0x30, 3, 2, 1];
        let (mut t, _) = fake(&key, None);
        assert!(matches!(
            unseal_with_entry(&mut t, &blob(), &key, &bad),
            Err(SignedPolicyError::EcdsaDer)
        ));
    }
}
