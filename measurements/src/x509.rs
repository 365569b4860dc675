//! The little X.509 an offline TDX verifier needs: PEM chains, ECDSA P-256 with SHA-256
//! signatures between certificates, the P-256 key of a certificate. Nothing else is accepted.

use base64::Engine;
use p256::ecdsa::signature::Verifier;
use x509_cert::der::{Decode, Encode};

/// ecdsa-with-SHA256.
const ECDSA_WITH_SHA256: &str = "1.2.840.10045.4.3.2";
const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
const END: &str = "-----END CERTIFICATE-----";

pub struct Cert {
    der: Vec<u8>,
    parsed: x509_cert::Certificate,
}

impl Cert {
    pub fn from_der(der: &[u8]) -> Result<Cert, String> {
        let parsed = x509_cert::Certificate::from_der(der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        Ok(Cert {
            der: der.to_vec(),
            parsed,
        })
    }

    pub fn der(&self) -> &[u8] {
        &self.der
    }

    pub fn subject(&self) -> String {
        self.parsed.tbs_certificate.subject.to_string()
    }

    /// The certificate's P-256 public key.
    pub fn p256_key(&self) -> Result<p256::ecdsa::VerifyingKey, String> {
        let point = self
            .parsed
            .tbs_certificate
            .subject_public_key_info
            .subject_public_key
            .raw_bytes();
        p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
            .map_err(|_| format!("{}: not a P-256 public key", self.subject()))
    }

    /// Checks that `issuer` signed this certificate (its name and its ECDSA P-256 SHA-256
    /// signature over the to-be-signed part).
    pub fn verify_issued_by(&self, issuer: &Cert) -> Result<(), String> {
        let tbs = &self.parsed.tbs_certificate;
        if tbs.issuer != issuer.parsed.tbs_certificate.subject {
            return Err(format!(
                "issued by {}, not by {}",
                tbs.issuer,
                issuer.subject()
            ));
        }
        let algorithm = self.parsed.signature_algorithm.oid.to_string();
        if algorithm != ECDSA_WITH_SHA256 {
            return Err(format!(
                "signature algorithm {algorithm}, expected {ECDSA_WITH_SHA256} (ECDSA with SHA-256)"
            ));
        }
        let signature = self
            .parsed
            .signature
            .as_bytes()
            .and_then(|b| p256::ecdsa::Signature::from_der(b).ok())
            .ok_or("the signature is not a DER ECDSA signature")?;
        let signed = tbs.to_der().map_err(|e| e.to_string())?;
        issuer
            .p256_key()?
            .verify(&signed, &signature)
            .map_err(|_| format!("{}'s signature does not verify", issuer.subject()))
    }
}

/// The certificates of a PEM chain, in order; anything but certificates (and whitespace or a
/// trailing NUL) between them is refused.
pub fn pem_chain(pem: &[u8]) -> Result<Vec<Cert>, String> {
    let text = std::str::from_utf8(pem).map_err(|_| "the PEM chain is not text".to_string())?;
    let mut rest = text.trim_end_matches('\0').trim();
    let mut chain = Vec::new();
    while !rest.is_empty() {
        let body = rest
            .strip_prefix(BEGIN)
            .ok_or_else(|| format!("expected {BEGIN} at certificate {}", chain.len()))?;
        let (body, after) = body
            .split_once(END)
            .ok_or_else(|| format!("certificate {} has no {END}", chain.len()))?;
        let base64: String = body.chars().filter(|c| !c.is_whitespace()).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(base64)
            .map_err(|_| format!("certificate {} is not base64", chain.len()))?;
        chain.push(Cert::from_der(&der).map_err(|e| format!("certificate {}: {e}", chain.len()))?);
        rest = after.trim();
    }
    Ok(chain)
}
