//! Intel TDX quote (versions 4 and 5) and TDREPORT layout: strict parsing of the header and
//! the TD report body a verifier compares (MRTD, RTMRs, REPORT_DATA, attributes), and the
//! signature data kept as bytes. What the node and the verifier must agree on; the signature
//! chain and the appraisal are `cvm_measure::tdx`'s.

pub const HEADER_LEN: usize = 48;
/// TD 1.0 report body; TD 1.5 adds TEE_TCB_SVN2 and MRSERVICETD.
pub const BODY_LEN_TD10: usize = 584;
pub const BODY_LEN_TD15: usize = 648;
pub const TDREPORT_LEN: usize = 1024;
pub const TEE_TYPE_TDX: u32 = 0x81;
pub const ATTESTATION_KEY_ECDSA_P256: u16 = 2;
pub const INTEL_QE_VENDOR_ID: [u8; 16] = [
    0x93, 0x9a, 0x72, 0x33, 0xf7, 0x9c, 0x4c, 0xa9, 0x94, 0x0a, 0x0d, 0xb3, 0x95, 0x7f, 0x06, 0x07,
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TdxError {
    #[error("the TDX {what} is truncated: {len} bytes, at least {needed} needed")]
    Truncated {
        what: &'static str,
        len: usize,
        needed: usize,
    },
    #[error("TDX quote field {field} is {found}, expected {expected}")]
    Field {
        field: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("TDX quote signature: {0}")]
    Signature(String),
    #[error("TDX {check}: expected {expected}, the quote has {found}")]
    Refused {
        check: &'static str,
        expected: String,
        found: String,
    },
}

/// The measurement fields of a TD (from a quote body or a TDREPORT's TDINFO).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdMeasurements {
    pub td_attributes: u64,
    pub xfam: u64,
    pub mrtd: [u8; 48],
    pub mrconfigid: [u8; 48],
    pub mrowner: [u8; 48],
    pub mrownerconfig: [u8; 48],
    pub rtmr: [[u8; 48]; 4],
    pub report_data: [u8; 64],
}

impl TdMeasurements {
    /// TD attribute bit 0: the TD is debuggable (its memory is readable by the host).
    pub fn debug(&self) -> bool {
        self.td_attributes & 1 != 0
    }
}

/// A parsed quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    pub version: u16,
    /// 2 = TD 1.0 body, 3 = TD 1.5 body (version 5 only; version 4 is always TD 1.0).
    pub body_type: u16,
    pub td: TdMeasurements,
    /// The signature data after the body (ECDSA signature, attestation key, certification
    /// data).
    pub signature_data: Vec<u8>,
    /// Header and body: what the attestation key signed.
    pub signed: Vec<u8>,
}

pub fn array<const N: usize>(bytes: &[u8], at: usize) -> [u8; N] {
    bytes[at..at + N]
        .try_into()
        .expect("bounds checked by the caller")
}

pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(array(b, at))
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(array(b, at))
}

pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(array(b, at))
}

pub fn need(what: &'static str, bytes: &[u8], needed: usize) -> Result<(), TdxError> {
    if bytes.len() < needed {
        return Err(TdxError::Truncated {
            what,
            len: bytes.len(),
            needed,
        });
    }
    Ok(())
}

/// The TD 1.0 report body layout (offsets within the body).
pub fn body_measurements(body: &[u8]) -> TdMeasurements {
    let rtmr = |i: usize| array::<48>(body, 328 + 48 * i);
    TdMeasurements {
        td_attributes: u64_at(body, 120),
        xfam: u64_at(body, 128),
        mrtd: array(body, 136),
        mrconfigid: array(body, 184),
        mrowner: array(body, 232),
        mrownerconfig: array(body, 280),
        rtmr: [rtmr(0), rtmr(1), rtmr(2), rtmr(3)],
        report_data: array(body, 520),
    }
}

impl Quote {
    /// Parses a quote; trailing bytes after the signature data (a fixed-size buffer's zeros)
    /// are allowed only if they are zero.
    pub fn parse(bytes: &[u8]) -> Result<Quote, TdxError> {
        need("quote", bytes, HEADER_LEN)?;
        let field = |field, found: String, expected| {
            Err(TdxError::Field {
                field,
                found,
                expected,
            })
        };
        let version = u16_at(bytes, 0);
        if u16_at(bytes, 2) != ATTESTATION_KEY_ECDSA_P256 {
            return field(
                "attestation_key_type",
                u16_at(bytes, 2).to_string(),
                "2 (ECDSA P-256)",
            );
        }
        if u32_at(bytes, 4) != TEE_TYPE_TDX {
            return field("tee_type", format!("{:#x}", u32_at(bytes, 4)), "0x81 (TDX)");
        }
        if bytes[12..28] != INTEL_QE_VENDOR_ID {
            return field(
                "qe_vendor_id",
                crate::hex(&bytes[12..28]),
                "939a7233f79c4ca9940a0db3957f0607 (Intel)",
            );
        }
        let (body_type, body_at, body_len) = match version {
            4 => (2, HEADER_LEN, BODY_LEN_TD10),
            5 => {
                need("quote", bytes, HEADER_LEN + 6)?;
                let body_type = u16_at(bytes, HEADER_LEN);
                let size = u32_at(bytes, HEADER_LEN + 2) as usize;
                let expected = match body_type {
                    2 => BODY_LEN_TD10,
                    3 => BODY_LEN_TD15,
                    _ => {
                        return field(
                            "body_type",
                            body_type.to_string(),
                            "2 (TD 1.0) or 3 (TD 1.5)",
                        )
                    }
                };
                if size != expected {
                    return field(
                        "body_size",
                        size.to_string(),
                        "584 (TD 1.0) or 648 (TD 1.5)",
                    );
                }
                (body_type, HEADER_LEN + 6, expected)
            }
            _ => return field("version", version.to_string(), "4 or 5"),
        };
        let signature_at = body_at + body_len;
        need("quote", bytes, signature_at + 4)?;
        let signature_len = u32_at(bytes, signature_at) as usize;
        let end = signature_at
            .checked_add(4)
            .and_then(|v| v.checked_add(signature_len))
            .ok_or(TdxError::Truncated {
                what: "quote",
                len: bytes.len(),
                needed: usize::MAX,
            })?;
        need("quote", bytes, end)?;
        // ECDSA signature (64) and attestation key (64) at least.
        if signature_len < 128 {
            return field(
                "signature_data_len",
                signature_len.to_string(),
                "at least 128",
            );
        }
        if bytes[end..].iter().any(|&b| b != 0) {
            return field(
                "trailing bytes",
                "non-zero".into(),
                "nothing (or zeros) after the signature data",
            );
        }
        Ok(Quote {
            version,
            body_type,
            td: body_measurements(&bytes[body_at..body_at + body_len]),
            signature_data: bytes[signature_at + 4..end].to_vec(),
            signed: bytes[..signature_at].to_vec(),
        })
    }

    /// TEE_TCB_SVN: the TDX module's security version numbers (the body's first 16 bytes).
    pub fn tee_tcb_svn(&self) -> [u8; 16] {
        let body_at = if self.version == 5 {
            HEADER_LEN + 6
        } else {
            HEADER_LEN
        };
        array(&self.signed, body_at)
    }
}

/// Parses a TDREPORT (what TDG.MR.REPORT and `/dev/tdx_guest` return): REPORTDATA in the
/// MAC structure, TDINFO at 512.
pub fn parse_tdreport(bytes: &[u8]) -> Result<TdMeasurements, TdxError> {
    if bytes.len() != TDREPORT_LEN {
        return Err(TdxError::Field {
            field: "length",
            found: bytes.len().to_string(),
            expected: "1024",
        });
    }
    let rtmr = |i: usize| array::<48>(bytes, 720 + 48 * i);
    Ok(TdMeasurements {
        td_attributes: u64_at(bytes, 512),
        xfam: u64_at(bytes, 520),
        mrtd: array(bytes, 528),
        mrconfigid: array(bytes, 576),
        mrowner: array(bytes, 624),
        mrownerconfig: array(bytes, 672),
        rtmr: [rtmr(0), rtmr(1), rtmr(2), rtmr(3)],
        report_data: array(bytes, 128),
    })
}
