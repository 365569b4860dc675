//! The Trustee key-broker protocol (RCAR, version 0.4.0), the parts both ends share: the
//! message shapes with Trustee's field names, the canonical JSON (RFC 8785) whose hash binds
//! the challenge nonce and the ephemeral key into the hardware evidence, the ephemeral P-256
//! key as a JWK, and the JWE a resource comes back in (ECDH-ES+A256KW, A256GCM).

use std::collections::BTreeMap;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256, Sha384, Sha512};
use zeroize::Zeroize;

pub const PROTOCOL_VERSION: &str = "0.4.0";
const ALG: &str = "ECDH-ES+A256KW";
const ENC: &str = "A256GCM";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KbsError {
    #[error("invalid JSON for canonicalization: {0}")]
    Canonical(String),
    #[error("unsupported hash algorithm {0:?}: expected sha256, sha384 or sha512")]
    Hash(String),
    #[error("invalid JWK: {0}")]
    Jwk(String),
    #[error("invalid JWE: {0}")]
    Jwe(String),
    #[error("the JWE does not decrypt with this key (altered in transit, or for another key)")]
    Decrypt,
}

/// `POST /kbs/v0/auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub version: String,
    pub tee: String,
    #[serde(rename = "extra-params")]
    pub extra_params: Value,
}

/// The answer to `auth`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub nonce: String,
    #[serde(rename = "extra-params", default)]
    pub extra_params: Value,
}

impl Challenge {
    /// The hash the challenge selects (`extra-params.selected-hash-algorithm`; Trustee sends an
    /// empty string there, meaning sha384). The client accepts only `BINDING_HASH`.
    pub fn hash_algorithm(&self) -> &str {
        self.extra_params
            .get("selected-hash-algorithm")
            .and_then(Value::as_str)
            .unwrap_or("sha384")
    }
}

/// The `runtime-data` of `attest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeData {
    pub nonce: String,
    #[serde(rename = "tee-pubkey")]
    pub tee_pubkey: Jwk,
}

/// `tee-evidence` of `attest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeeEvidence {
    pub primary_evidence: Value,
    pub additional_evidence: String,
}

/// `POST /kbs/v0/attest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    #[serde(rename = "init-data", default, skip_serializing_if = "Option::is_none")]
    pub init_data: Option<Value>,
    #[serde(rename = "runtime-data")]
    pub runtime_data: RuntimeData,
    #[serde(rename = "tee-evidence")]
    pub tee_evidence: TeeEvidence,
}

/// An EC P-256 public key as Trustee's client sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwk {
    pub kty: String,
    pub crv: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    pub x: String,
    pub y: String,
}

impl Jwk {
    pub fn from_public(key: &p256::PublicKey) -> Jwk {
        let point = key.to_encoded_point(false);
        Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            alg: Some(ALG.into()),
            x: URL_SAFE_NO_PAD.encode(point.x().expect("uncompressed point")),
            y: URL_SAFE_NO_PAD.encode(point.y().expect("uncompressed point")),
        }
    }

    pub fn public_key(&self) -> Result<p256::PublicKey, KbsError> {
        if self.kty != "EC" || self.crv != "P-256" {
            return Err(KbsError::Jwk(format!(
                "kty {:?} crv {:?}, expected EC P-256",
                self.kty, self.crv
            )));
        }
        if self.alg.as_deref().is_some_and(|a| a != ALG) {
            return Err(KbsError::Jwk(format!("alg {:?}, expected {ALG}", self.alg)));
        }
        let coordinate = |name: &str, value: &str| -> Result<[u8; 32], KbsError> {
            URL_SAFE_NO_PAD
                .decode(value)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or_else(|| KbsError::Jwk(format!("{name} is not 32 bytes of base64url")))
        };
        let point = p256::EncodedPoint::from_affine_coordinates(
            &coordinate("x", &self.x)?.into(),
            &coordinate("y", &self.y)?.into(),
            false,
        );
        Option::from(p256::PublicKey::from_encoded_point(&point))
            .ok_or_else(|| KbsError::Jwk("the point is not on P-256".into()))
    }
}

/// RFC 8785 canonical JSON: object keys sorted by UTF-16 code units, no whitespace, strings
/// escaped minimally. Numbers other than integers are refused (the protocol has none).
pub fn canonical_json(value: &Value) -> Result<String, KbsError> {
    let mut out = String::new();
    write_canonical(value, &mut out)?;
    Ok(out)
}

fn write_canonical(value: &Value, out: &mut String) -> Result<(), KbsError> {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) if n.is_i64() || n.is_u64() => out.push_str(&n.to_string()),
        Value::Number(n) => return Err(KbsError::Canonical(format!("non-integer number {n}"))),
        Value::String(s) => {
            out.push_str(&serde_json::to_string(s).expect("a string serializes"));
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out)?;
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(key).expect("a string serializes"));
                out.push(':');
                write_canonical(&map[key], out)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

/// The hash that binds the runtime data. Trustee's attestation service hashes the runtime data
/// of `snp`, `tdx` and `tpm` evidence with SHA-384 whatever the challenge says (it selects
/// another hash only for IBM SE), so a node binds with nothing else.
pub const BINDING_HASH: &str = "sha384";

/// The 64 bytes a node puts into REPORT_DATA (SNP, TDX) or the quote's qualifying data (vTPM):
/// HASH(JCS({"additional-evidence", "nonce", "tee-pubkey"})), then zeros. With SHA-384 that is
/// the 48-byte digest and 16 zero bytes, which is what Trustee compares: its SNP and TDX
/// verifiers pad the expected 48 bytes to 64 with zeros at the end, its TPM verifier resizes
/// them to 64 the same way.
pub fn report_data(
    runtime: &RuntimeData,
    additional_evidence: &str,
    hash: &str,
) -> Result<[u8; 64], KbsError> {
    let value = serde_json::json!({
        "additional-evidence": additional_evidence,
        "nonce": runtime.nonce,
        "tee-pubkey": runtime.tee_pubkey,
    });
    let canonical = canonical_json(&value)?;
    let digest = match hash {
        "sha256" => Sha256::digest(canonical.as_bytes()).to_vec(),
        "sha384" => Sha384::digest(canonical.as_bytes()).to_vec(),
        "sha512" => Sha512::digest(canonical.as_bytes()).to_vec(),
        other => return Err(KbsError::Hash(other.into())),
    };
    let mut out = [0u8; 64];
    out[..digest.len()].copy_from_slice(&digest);
    Ok(out)
}

/// A 32-byte random nonce, base64 as Trustee sends it.
pub fn new_nonce() -> String {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    STANDARD.encode(bytes)
}

/// A flattened JWE in JSON serialization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jwe {
    pub protected: String,
    pub encrypted_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aad: Option<String>,
    pub iv: String,
    pub ciphertext: String,
    pub tag: String,
}

/// JWA Concat KDF (RFC 7518 §4.6.2) with SHA-256, for keys of at most 256 bits.
pub fn concat_kdf(
    shared: &[u8],
    algorithm: &str,
    apu: &[u8],
    apv: &[u8],
    key_bits: u32,
) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(1u32.to_be_bytes());
    hasher.update(shared);
    for part in [algorithm.as_bytes(), apu, apv] {
        hasher.update((part.len() as u32).to_be_bytes());
        hasher.update(part);
    }
    hasher.update(key_bits.to_be_bytes());
    hasher.finalize()[..(key_bits / 8) as usize].to_vec()
}

fn b64(field: &str, value: &str) -> Result<Vec<u8>, KbsError> {
    URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| KbsError::Jwe(format!("{field} is not base64url")))
}

/// The JWE protected header, byte for byte as Trustee's KBS writes it: `alg`, `enc`, then
/// `epk` with `crv`, `kty`, `x`, `y`, no whitespace. Trustee's client does not use the received
/// base64 as the AAD but re-serialises the header it parsed (alg and enc, then the other
/// members in its map's order, sorted or as received), so only this exact text decrypts there.
/// Written out rather than left to serde_json, whose map order changes with a crate feature
/// (`preserve_order`) that any dependency may switch on. The values are base64url or fixed
/// names: nothing to escape.
fn protected_header(epk: &Jwk) -> String {
    format!(
        r#"{{"alg":"{ALG}","enc":"{ENC}","epk":{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}}}"#,
        epk.crv, epk.kty, epk.x, epk.y
    )
}

/// Encrypts `plaintext` to `recipient` (what the broker does with a resource).
pub fn jwe_encrypt(recipient: &p256::PublicKey, plaintext: &[u8]) -> Jwe {
    let ephemeral = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
    let epk = Jwk::from_public(&ephemeral.public_key());
    let shared = ephemeral.diffie_hellman(recipient);
    let mut kek = concat_kdf(shared.raw_secret_bytes(), ALG, b"", b"", 256);
    let mut cek = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut cek);
    let mut iv = [0u8; 12];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut iv);
    let wrapped = aes_kw::KekAes256::new(kek.as_slice().into())
        .wrap_vec(&cek)
        .expect("a 32-byte key wraps");
    let protected = URL_SAFE_NO_PAD.encode(protected_header(&epk));
    let cipher = aes_gcm::Aes256Gcm::new(cek.as_slice().into());
    let sealed = cipher
        .encrypt(
            iv.as_slice().into(),
            Payload {
                msg: plaintext,
                aad: protected.as_bytes(),
            },
        )
        .expect("AES-GCM encrypts");
    let (ciphertext, tag) = sealed.split_at(sealed.len() - 16);
    kek.zeroize();
    cek.zeroize();
    Jwe {
        protected,
        encrypted_key: URL_SAFE_NO_PAD.encode(wrapped),
        aad: None,
        iv: URL_SAFE_NO_PAD.encode(iv),
        ciphertext: URL_SAFE_NO_PAD.encode(ciphertext),
        tag: URL_SAFE_NO_PAD.encode(tag),
    }
}

/// Decrypts a resource with the node's ephemeral secret. Anything but ECDH-ES+A256KW with
/// A256GCM on P-256 is refused; any altered byte fails the key unwrap or the GCM tag.
pub fn jwe_decrypt(secret: &p256::SecretKey, jwe: &Jwe) -> Result<Vec<u8>, KbsError> {
    #[derive(Deserialize)]
    struct Header {
        alg: String,
        enc: String,
        epk: Jwk,
        #[serde(flatten)]
        _rest: BTreeMap<String, Value>,
    }
    let header: Header = serde_json::from_slice(&b64("protected", &jwe.protected)?)
        .map_err(|e| KbsError::Jwe(format!("protected header: {e}")))?;
    if header.alg != ALG || header.enc != ENC {
        return Err(KbsError::Jwe(format!(
            "alg {:?} enc {:?}, expected {ALG} with {ENC}",
            header.alg, header.enc
        )));
    }
    let epk = header.epk.public_key()?;
    let shared = p256::ecdh::diffie_hellman(secret.to_nonzero_scalar(), epk.as_affine());
    let mut kek = concat_kdf(shared.raw_secret_bytes(), ALG, b"", b"", 256);
    let wrapped = b64("encrypted_key", &jwe.encrypted_key)?;
    let unwrapped = aes_kw::KekAes256::new(kek.as_slice().into()).unwrap_vec(&wrapped);
    kek.zeroize();
    let mut cek = unwrapped.map_err(|_| KbsError::Decrypt)?;
    if cek.len() != 32 {
        cek.zeroize();
        return Err(KbsError::Jwe("the content key is not 256 bits".into()));
    }
    let iv = b64("iv", &jwe.iv)?;
    if iv.len() != 12 {
        cek.zeroize();
        return Err(KbsError::Jwe("iv is not 96 bits".into()));
    }
    let mut sealed = b64("ciphertext", &jwe.ciphertext)?;
    let tag = b64("tag", &jwe.tag)?;
    if tag.len() != 16 {
        cek.zeroize();
        return Err(KbsError::Jwe("tag is not 128 bits".into()));
    }
    sealed.extend_from_slice(&tag);
    let mut aad = jwe.protected.clone();
    if let Some(extra) = &jwe.aad {
        aad.push('.');
        aad.push_str(extra);
    }
    let cipher = aes_gcm::Aes256Gcm::new(cek.as_slice().into());
    cek.zeroize();
    cipher
        .decrypt(
            iv.as_slice().into(),
            Payload {
                msg: &sealed,
                aad: aad.as_bytes(),
            },
        )
        .map_err(|_| KbsError::Decrypt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canonical_json_matches_the_trustee_vector() {
        let value: Value = serde_json::from_str(r#"{"b":1,"a":"test","c":{"d":"e"}}"#).unwrap();
        let canonical = canonical_json(&value).unwrap();
        assert_eq!(canonical, r#"{"a":"test","b":1,"c":{"d":"e"}}"#);
        assert_eq!(
            crate::hex(&Sha384::digest(canonical.as_bytes())),
            "e71ce8e70d814ba6639c3612ebee0ff1f76f650f8dbb5e47157e0f3f525cd22c4597480a186427c813ca941da78870c3"
        );
        assert!(canonical_json(&serde_json::json!(1.5)).is_err());
        // Control characters escaped, non-ASCII kept.
        assert_eq!(
            canonical_json(&serde_json::json!("\u{1}é\"")).unwrap(),
            "\"\\u0001é\\\"\""
        );
    }

    /// RFC 7518 Appendix C: the Concat KDF for ECDH-ES between Alice and Bob.
    #[test]
    fn concat_kdf_matches_rfc7518_appendix_c() {
        let z = [
            158u8, 86, 217, 29, 129, 113, 53, 211, 114, 131, 66, 131, 191, 132, 38, 156, 251, 49,
            110, 163, 218, 128, 106, 72, 246, 218, 167, 121, 140, 254, 144, 196,
        ];
        let key = concat_kdf(&z, "A128GCM", b"Alice", b"Bob", 128);
        assert_eq!(URL_SAFE_NO_PAD.encode(key), "VqqN6vgjbSBcIijNcacQGg");
    }

    #[test]
    fn report_data_binds_nonce_and_key() {
        let secret = p256::SecretKey::random(&mut rand_core::OsRng);
        let runtime = RuntimeData {
            nonce: new_nonce(),
            tee_pubkey: Jwk::from_public(&secret.public_key()),
        };
        let a = report_data(&runtime, "", "sha384").unwrap();
        assert_eq!(&a[48..], &[0u8; 16]);
        let mut other = runtime.clone();
        other.nonce = new_nonce();
        assert_ne!(report_data(&other, "", "sha384").unwrap(), a);
        assert_ne!(report_data(&runtime, "x", "sha384").unwrap(), a);
        assert!(report_data(&runtime, "", "md5").is_err());
        // The JWK round-trips.
        assert_eq!(
            runtime.tee_pubkey.public_key().unwrap(),
            secret.public_key()
        );
    }

    /// The byte layout pinned: SHA-384 (computed outside this code, `sha384sum`) of the
    /// canonical runtime data as Trustee's KBS builds it (`tee-pubkey` as kbs-types re-serialises
    /// an EC key: kty, crv, alg, x, y; the empty `additional-evidence`), then 16 zero bytes.
    #[test]
    fn report_data_is_the_sha384_of_the_canonical_runtime_data_then_zeros() {
        let runtime = RuntimeData {
            nonce: "Oq8VJUn8z4h0cNlpMYNRH5zhDW0nEaglQEVsQ9EHrvo=".into(),
            tee_pubkey: Jwk {
                kty: "EC".into(),
                crv: "P-256".into(),
                alg: Some(ALG.into()),
                x: "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0".into(),
                y: "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps".into(),
            },
        };
        let binding = report_data(&runtime, "", BINDING_HASH).unwrap();
        assert_eq!(
            crate::hex(&binding[..48]),
            "460a98443a6e129e6b939ae2dc5f81d3f7e492e0593647a34dc7bd694c7b214f5640e7b3c52e6fd60d4c1dcdadb01eb4"
        );
        assert_eq!(binding[48..], [0u8; 16]);
    }

    #[test]
    fn a_resource_round_trips_and_any_change_is_detected() {
        let secret = p256::SecretKey::random(&mut rand_core::OsRng);
        let jwe = jwe_encrypt(&secret.public_key(), b"the state-disk key");
        assert_eq!(jwe_decrypt(&secret, &jwe).unwrap(), b"the state-disk key");
        // Another node's key.
        let other = p256::SecretKey::random(&mut rand_core::OsRng);
        assert_eq!(jwe_decrypt(&other, &jwe), Err(KbsError::Decrypt));
        // One character changed in each field.
        let flip = |s: &str| {
            let mut c: Vec<char> = s.chars().collect();
            let i = c.len() / 2;
            c[i] = if c[i] == 'A' { 'B' } else { 'A' };
            c.into_iter().collect::<String>()
        };
        for field in ["encrypted_key", "iv", "ciphertext", "tag", "protected"] {
            let mut altered = jwe.clone();
            let value = match field {
                "encrypted_key" => &mut altered.encrypted_key,
                "iv" => &mut altered.iv,
                "ciphertext" => &mut altered.ciphertext,
                "tag" => &mut altered.tag,
                _ => &mut altered.protected,
            };
            *value = flip(value);
            assert!(jwe_decrypt(&secret, &altered).is_err(), "{field} altered");
        }
        // Another algorithm in the header.
        let mut header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&jwe.protected).unwrap()).unwrap();
        header["alg"] = "RSA1_5".into();
        let mut altered = jwe.clone();
        altered.protected = URL_SAFE_NO_PAD.encode(header.to_string());
        assert!(matches!(
            jwe_decrypt(&secret, &altered),
            Err(KbsError::Jwe(_))
        ));
    }

    /// The header's exact bytes, and the same bytes after the round trip Trustee's client makes
    /// (parse into `alg`, `enc` and a map of the rest, serialise again) to rebuild the AAD.
    #[test]
    fn the_protected_header_is_written_as_trustee_writes_it() {
        let epk = Jwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            alg: Some(ALG.into()),
            x: "gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0".into(),
            y: "SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps".into(),
        };
        assert_eq!(
            protected_header(&epk),
            r#"{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{"crv":"P-256","kty":"EC","x":"gI0GAILBdu7T53akrFmMyGcsF3n5dO7MmwNBHKW5SV0","y":"SLW_xSffzlPWrHEVI30DHM_4egVwt3NQqeUD7nMFpps"}}"#
        );

        #[derive(Serialize, Deserialize)]
        struct ClientHeader {
            alg: String,
            enc: String,
            #[serde(flatten)]
            other: serde_json::Map<String, Value>,
        }
        let secret = p256::SecretKey::random(&mut rand_core::OsRng);
        let jwe = jwe_encrypt(&secret.public_key(), b"x");
        let header = String::from_utf8(URL_SAFE_NO_PAD.decode(&jwe.protected).unwrap()).unwrap();
        let value: Value = serde_json::from_str(&header).unwrap();
        let (x, y) = (&value["epk"]["x"], &value["epk"]["y"]);
        assert_eq!(
            header,
            format!(
                r#"{{"alg":"ECDH-ES+A256KW","enc":"A256GCM","epk":{{"crv":"P-256","kty":"EC","x":{x},"y":{y}}}}}"#
            )
        );
        let reparsed: ClientHeader = serde_json::from_str(&header).unwrap();
        assert_eq!(serde_json::to_string(&reparsed).unwrap(), header);
    }

    #[test]
    fn messages_use_trustee_field_names() {
        let secret = p256::SecretKey::random(&mut rand_core::OsRng);
        let attestation = Attestation {
            init_data: None,
            runtime_data: RuntimeData {
                nonce: "n".into(),
                tee_pubkey: Jwk::from_public(&secret.public_key()),
            },
            tee_evidence: TeeEvidence {
                primary_evidence: serde_json::json!({}),
                additional_evidence: String::new(),
            },
        };
        let text = serde_json::to_string(&attestation).unwrap();
        for name in [
            "\"runtime-data\"",
            "\"tee-pubkey\"",
            "\"tee-evidence\"",
            "\"primary_evidence\"",
            "\"additional_evidence\"",
            "\"alg\":\"ECDH-ES+A256KW\"",
        ] {
            assert!(text.contains(name), "{name} in {text}");
        }
        let request: Request = serde_json::from_str(
            r#"{"version":"0.4.0","tee":"snp","extra-params":{"supported-hash-algorithms":["sha384"]}}"#,
        )
        .unwrap();
        assert_eq!(request.version, PROTOCOL_VERSION);
        let challenge: Challenge = serde_json::from_str(
            r#"{"nonce":"abc","extra-params":{"selected-hash-algorithm":"sha512"}}"#,
        )
        .unwrap();
        assert_eq!(challenge.hash_algorithm(), "sha512");
    }

    proptest! {
        #[test]
        fn arbitrary_jwes_never_panic(
            protected in ".{0,64}", key in "[A-Za-z0-9_-]{0,80}", iv in "[A-Za-z0-9_-]{0,20}",
            text in "[A-Za-z0-9_-]{0,80}", tag in "[A-Za-z0-9_-]{0,30}") {
            let secret = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
            let jwe = Jwe { protected, encrypted_key: key, aad: None, iv, ciphertext: text, tag };
            prop_assert!(jwe_decrypt(&secret, &jwe).is_err());
        }

        #[test]
        fn arbitrary_json_canonicalizes_or_fails_cleanly(text in ".{0,200}") {
            if let Ok(value) = serde_json::from_str::<Value>(&text) {
                if let Ok(canonical) = canonical_json(&value) {
                    let again: Value = serde_json::from_str(&canonical).unwrap();
                    prop_assert_eq!(canonical_json(&again).unwrap(), canonical);
                }
            }
        }
    }
}
