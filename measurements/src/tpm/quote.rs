//! Verifying a TPM 2.0 quote: the TPMS_ATTEST structure parsed strictly, its ECDSA P-256
//! signature checked with the attestation key, the qualifying data compared with the expected
//! binding, and the PCR digest compared with the expected sha256 PCR values.
//!
//! Whom the attestation key belongs to is a separate question, answered by credential
//! activation with the TPM's certified endorsement key (`credential`).

use p256::ecdsa::signature::Verifier;
use sha2::{Digest, Sha256};

const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const ALG_SHA256: u16 = 0x000b;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuoteError {
    #[error("the quote is truncated at byte {0}")]
    Truncated(usize),
    #[error("quote field {field} is {found}, expected {expected}")]
    Field {
        field: &'static str,
        found: String,
        expected: String,
    },
    #[error("invalid attestation key: {0}")]
    Key(String),
    #[error("the quote's signature does not verify with the attestation key")]
    Signature,
    #[error(
        "the quote's qualifying data is not the expected binding (replayed or for another session)"
    )]
    Binding,
    #[error("the quoted PCR digest does not match the expected PCR values")]
    PcrDigest,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], QuoteError> {
        let s = self
            .bytes
            .get(self.at..self.at + n)
            .ok_or(QuoteError::Truncated(self.at))?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, QuoteError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, QuoteError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, QuoteError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn tpm2b(&mut self) -> Result<&'a [u8], QuoteError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
}

/// What a quote says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attest {
    pub extra_data: Vec<u8>,
    /// The PCRs of the sha256 bank it covers, ascending.
    pub pcrs: Vec<u32>,
    pub pcr_digest: Vec<u8>,
    pub reset_count: u32,
    pub restart_count: u32,
}

/// Parses a TPMS_ATTEST of type quote with one sha256 PCR selection; nothing may follow it.
pub fn parse_attest(bytes: &[u8]) -> Result<Attest, QuoteError> {
    let mut r = Reader { bytes, at: 0 };
    let field = |field, found: String, expected: &str| {
        Err(QuoteError::Field {
            field,
            found,
            expected: expected.into(),
        })
    };
    let magic = r.u32()?;
    if magic != TPM_GENERATED_VALUE {
        return field("magic", format!("{magic:#x}"), "0xff544347 (TPM_GENERATED)");
    }
    let kind = r.u16()?;
    if kind != TPM_ST_ATTEST_QUOTE {
        return field("type", format!("{kind:#x}"), "0x8018 (quote)");
    }
    r.tpm2b()?; // qualifiedSigner
    let extra_data = r.tpm2b()?.to_vec();
    let _clock = r.take(8)?;
    let reset_count = r.u32()?;
    let restart_count = r.u32()?;
    let _safe = r.u8()?;
    let _firmware = r.take(8)?;
    let selections = r.u32()?;
    if selections != 1 {
        return field(
            "pcrSelect.count",
            selections.to_string(),
            "1 (the sha256 bank)",
        );
    }
    let bank = r.u16()?;
    if bank != ALG_SHA256 {
        return field("pcrSelect.hash", format!("{bank:#x}"), "0x000b (sha256)");
    }
    let size = r.u8()? as usize;
    let bitmap = r.take(size)?;
    let pcrs = (0..size * 8)
        .filter(|&i| bitmap[i / 8] & (1 << (i % 8)) != 0)
        .map(|i| i as u32)
        .collect();
    let pcr_digest = r.tpm2b()?.to_vec();
    if r.at != bytes.len() {
        return field(
            "length",
            bytes.len().to_string(),
            &format!("{} (nothing after the quote info)", r.at),
        );
    }
    Ok(Attest {
        extra_data,
        pcrs,
        pcr_digest,
        reset_count,
        restart_count,
    })
}

/// Verifies a quote: signature with the attestation key (P-256 point x, y), the binding, the
/// selection and the digest of the expected sha256 values of `pcrs` (ascending).
pub fn verify(
    attest: &[u8],
    r: &[u8],
    s: &[u8],
    key: (&[u8], &[u8]),
    expected_extra: &[u8],
    pcrs: &[u32],
    values: &[Vec<u8>],
) -> Result<Attest, QuoteError> {
    let point = |v: &[u8]| -> Result<[u8; 32], QuoteError> {
        let mut out = [0u8; 32];
        if v.len() > 32 {
            return Err(QuoteError::Key("coordinate longer than 32 bytes".into()));
        }
        out[32 - v.len()..].copy_from_slice(v);
        Ok(out)
    };
    let encoded = p256::EncodedPoint::from_affine_coordinates(
        &point(key.0)?.into(),
        &point(key.1)?.into(),
        false,
    );
    let key = p256::ecdsa::VerifyingKey::from_encoded_point(&encoded)
        .map_err(|e| QuoteError::Key(e.to_string()))?;
    let scalar = |v: &[u8]| -> Result<[u8; 32], QuoteError> {
        let mut out = [0u8; 32];
        if v.len() > 32 {
            return Err(QuoteError::Signature);
        }
        out[32 - v.len()..].copy_from_slice(v);
        Ok(out)
    };
    let signature = p256::ecdsa::Signature::from_scalars(scalar(r)?, scalar(s)?)
        .map_err(|_| QuoteError::Signature)?;
    key.verify(attest, &signature)
        .map_err(|_| QuoteError::Signature)?;
    let parsed = parse_attest(attest)?;
    if parsed.extra_data != expected_extra {
        return Err(QuoteError::Binding);
    }
    if parsed.pcrs != pcrs {
        return Err(QuoteError::Field {
            field: "pcrSelect",
            found: format!("{:?}", parsed.pcrs),
            expected: format!("{pcrs:?}"),
        });
    }
    let mut digest = Sha256::new();
    for v in values {
        digest.update(v);
    }
    if digest.finalize().as_slice() != parsed.pcr_digest {
        return Err(QuoteError::PcrDigest);
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_attest_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_attest(&bytes);
        }
    }

    #[test]
    fn fields_are_named() {
        let mut a = Vec::new();
        a.extend_from_slice(&0xff54_4347u32.to_be_bytes());
        a.extend_from_slice(&0x8017u16.to_be_bytes());
        assert!(matches!(
            parse_attest(&a),
            Err(QuoteError::Field { field: "type", .. })
        ));
        assert_eq!(parse_attest(&a[..3]), Err(QuoteError::Truncated(0)));
    }
}
