//! Intel TDX quotes (versions 4 and 5) and TDREPORTs: strict parsing of the header and the TD
//! report body a verifier compares (MRTD, RTMRs, REPORT_DATA, attributes), and the quote's
//! signature checked as far as the quote itself allows: the attestation key's signature over
//! header and body, the QE report binding that key, the QE report signed by the PCK key, and
//! the PCK chain up to the pinned Intel SGX Root CA. What needs Intel's collateral (TCB info
//! and status, QE identity, revocation lists) is not checked here, and the result says so.

pub use cvm_formats::tdx::*;

pub mod launch;
pub mod rtmr;

fn refused(check: &'static str, expected: impl ToString, found: impl ToString) -> TdxError {
    TdxError::Refused {
        check,
        expected: expected.to_string(),
        found: found.to_string(),
    }
}

/// The quoting enclave a verifier accepts a QE report from. A host that runs its own enclave
/// on the platform gets its attestation key certified by the real PCK too (the PCK signs any
/// enclave's report), so the enclave's identity must be pinned. The defaults are Intel's TD
/// quoting enclave as Intel's TD_QE identity names it (the real quotes in the test data carry
/// the same MRSIGNER and ISVPRODID, ISVSVN 4 to 7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QeIdentity {
    pub mrsigner: [u8; 32],
    pub isvprodid: u16,
    pub min_isvsvn: u16,
}

/// MRSIGNER of Intel's TD quoting enclave.
pub const INTEL_TD_QE_MRSIGNER: [u8; 32] = [
    0xdc, 0x9e, 0x2a, 0x7c, 0x6f, 0x94, 0x8f, 0x17, 0x47, 0x4e, 0x34, 0xa7, 0xfc, 0x43, 0xed, 0x03,
    0x0f, 0x7c, 0x15, 0x63, 0xf1, 0xba, 0xbd, 0xdf, 0x63, 0x40, 0xc8, 0x2e, 0x0e, 0x54, 0xa8, 0xc5,
];
/// ISVPRODID of Intel's TD quoting enclave (the SGX one is 1).
pub const INTEL_TD_QE_ISVPRODID: u16 = 2;
/// The lowest ISVSVN accepted by default (the oldest the real quotes in the test data carry);
/// an operator raises it with `tdx_qe_min_isvsvn`.
pub const INTEL_TD_QE_MIN_ISVSVN: u16 = 4;

impl Default for QeIdentity {
    fn default() -> QeIdentity {
        QeIdentity {
            mrsigner: INTEL_TD_QE_MRSIGNER,
            isvprodid: INTEL_TD_QE_ISVPRODID,
            min_isvsvn: INTEL_TD_QE_MIN_ISVSVN,
        }
    }
}

/// What the quote's own signature chain is checked against: the pinned Intel root (and, for
/// tests or an offline store, extra roots by their DER) and the quoting enclave's identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trust {
    pub extra_roots: Vec<Vec<u8>>,
    pub qe: QeIdentity,
}

/// The identity fields of the QE report (an SGX report body).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QeReport {
    pub attributes_flags: u64,
    pub mrenclave: [u8; 32],
    pub mrsigner: [u8; 32],
    pub isvprodid: u16,
    pub isvsvn: u16,
}

impl QeReport {
    fn parse(report: &[u8]) -> QeReport {
        QeReport {
            attributes_flags: u64_at(report, 48),
            mrenclave: array(report, 64),
            mrsigner: array(report, 128),
            isvprodid: u16_at(report, 256),
            isvsvn: u16_at(report, 258),
        }
    }

    /// Checks the enclave against the pinned identity: MRSIGNER, ISVPRODID, not a debug
    /// enclave (SGX attribute DEBUG, bit 1), ISVSVN at least the minimum.
    pub fn check(&self, pinned: &QeIdentity) -> Result<(), TdxError> {
        if self.mrsigner != pinned.mrsigner {
            return Err(refused(
                "qe.mrsigner",
                cvm_formats::hex(&pinned.mrsigner),
                cvm_formats::hex(&self.mrsigner),
            ));
        }
        if self.isvprodid != pinned.isvprodid {
            return Err(refused("qe.isvprodid", pinned.isvprodid, self.isvprodid));
        }
        if self.attributes_flags & 2 != 0 {
            return Err(refused(
                "qe.debug",
                "a production enclave (attribute DEBUG clear)",
                format!("attributes {:#x}", self.attributes_flags),
            ));
        }
        if self.isvsvn < pinned.min_isvsvn {
            return Err(refused(
                "qe.isvsvn",
                format!("at least {}", pinned.min_isvsvn),
                self.isvsvn,
            ));
        }
        Ok(())
    }
}

/// TD attribute bits 7:0 (TUD): any of them set means the TD is under debug.
const TD_ATTRIBUTES_TUD: u64 = 0xff;
/// TD attribute bit 28: EPT violations are not turned into #VE for the TD (a TD without it can
/// be made to take #VE on pages the host removes, where a guest kernel may fall into paths it
/// does not expect).
pub const TD_ATTRIBUTES_SEPT_VE_DISABLE: u64 = 1 << 28;
/// TD attribute bit 29: the TD may be migrated (by a migration TD the host chooses).
pub const TD_ATTRIBUTES_MIGRATABLE: u64 = 1 << 29;

/// What the reference requires of the TD's attributes and configuration registers beyond its
/// measurements; `None` is not checked, except that without `td_attributes` the defaults
/// apply: no debug bits, SEPT_VE_DISABLE set, not migratable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TdRequirements {
    pub td_attributes: Option<u64>,
    pub xfam: Option<u64>,
    pub mrconfigid: Option<[u8; 48]>,
    pub mrowner: Option<[u8; 48]>,
    pub mrownerconfig: Option<[u8; 48]>,
}

/// Checks the TD's attributes and the configuration registers the reference names.
pub fn appraise_td(td: &TdMeasurements, required: &TdRequirements) -> Result<(), TdxError> {
    let attributes = td.td_attributes;
    if attributes & TD_ATTRIBUTES_TUD != 0 {
        return Err(refused(
            "td_attributes.debug",
            "no debug bits (7:0 clear)",
            format!("{attributes:#x}"),
        ));
    }
    match required.td_attributes {
        Some(expected) if expected != attributes => {
            return Err(refused(
                "td_attributes",
                format!("{expected:#x}"),
                format!("{attributes:#x}"),
            ))
        }
        Some(_) => {}
        None => {
            if attributes & TD_ATTRIBUTES_SEPT_VE_DISABLE == 0 {
                return Err(refused(
                    "td_attributes.sept_ve_disable",
                    "SEPT_VE_DISABLE (bit 28) set",
                    format!("{attributes:#x}"),
                ));
            }
            if attributes & TD_ATTRIBUTES_MIGRATABLE != 0 {
                return Err(refused(
                    "td_attributes.migratable",
                    "not migratable (bit 29 clear)",
                    format!("{attributes:#x}"),
                ));
            }
        }
    }
    if let Some(expected) = required.xfam {
        if expected != td.xfam {
            return Err(refused(
                "xfam",
                format!("{expected:#x}"),
                format!("{:#x}", td.xfam),
            ));
        }
    }
    for (check, expected, found) in [
        ("mrconfigid", &required.mrconfigid, &td.mrconfigid),
        ("mrowner", &required.mrowner, &td.mrowner),
        ("mrownerconfig", &required.mrownerconfig, &td.mrownerconfig),
    ] {
        if let Some(expected) = expected {
            if expected != found {
                return Err(refused(
                    check,
                    cvm_formats::hex(expected),
                    cvm_formats::hex(found),
                ));
            }
        }
    }
    Ok(())
}
/// The SGX report body of the quoting enclave and where its REPORTDATA is.
const QE_REPORT_LEN: usize = 384;
const QE_REPORT_DATA_AT: usize = 320;
/// sha256 of the Intel SGX Root CA certificate (DER), as Intel publishes it and as the PCK
/// chains of real quotes end.
const INTEL_SGX_ROOT_CA_SHA256: [u8; 32] = [
    0x44, 0xa0, 0x19, 0x6b, 0x2b, 0x99, 0xf8, 0x89, 0xb8, 0xe1, 0x49, 0xe9, 0x5b, 0x80, 0x7a, 0x35,
    0x0e, 0x74, 0x24, 0x96, 0x43, 0x99, 0xe8, 0x85, 0xa7, 0xcb, 0xb8, 0xcc, 0xfa, 0xb6, 0x74, 0xd3,
];

/// What a quote's own signature data proved, and what it could not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureChecked {
    pub pck_subject: String,
    pub qe: QeReport,
}

impl SignatureChecked {
    /// The checks that need Intel's collateral, which an offline verifier does not have.
    pub const NOT_CHECKED: &'static str = "TCB status (TCB info), the QE's TCB level beyond the pinned minimum ISVSVN, and certificate revocation need Intel's collateral and are not checked";
}
/// The quote signature check, beside the layout (`cvm_formats::tdx::Quote`) it reads.
pub trait VerifyQuote {
    /// Checks the signature chain the quote carries, up to the pinned Intel SGX Root CA, and
    /// that the QE report comes from Intel's TD quoting enclave.
    fn verify_signature(&self) -> Result<SignatureChecked, TdxError>;
    /// The same against `trust`: its extra roots beside Intel's, its quoting enclave.
    fn verify_signature_with(&self, trust: &Trust) -> Result<SignatureChecked, TdxError>;
}

impl VerifyQuote for Quote {
    /// Checks the signature chain the quote carries, up to the pinned Intel SGX Root CA, and
    /// that the QE report comes from Intel's TD quoting enclave.
    fn verify_signature(&self) -> Result<SignatureChecked, TdxError> {
        self.verify_signature_with(&Trust::default())
    }

    /// The same against `trust`: its extra roots beside Intel's, its quoting enclave.
    fn verify_signature_with(&self, trust: &Trust) -> Result<SignatureChecked, TdxError> {
        use p256::ecdsa::signature::Verifier;
        use p256::ecdsa::{Signature, VerifyingKey};
        let bad = |why: String| TdxError::Signature(why);
        let data = &self.signature_data;
        let take = |at: usize, len: usize, what: &str| {
            data.get(at..at + len).ok_or_else(|| {
                bad(format!(
                    "the signature data ends inside the {what} (byte {at})"
                ))
            })
        };
        let quote_signature = Signature::from_slice(take(0, 64, "quote signature")?)
            .map_err(|_| bad("the quote signature is not an ECDSA P-256 signature".into()))?;
        let attestation_key_raw = take(64, 64, "attestation key")?;
        let attestation_key =
            VerifyingKey::from_sec1_bytes(&[&[0x04], attestation_key_raw].concat())
                .map_err(|_| bad("the attestation key is not a P-256 point".into()))?;
        attestation_key
            .verify(&self.signed, &quote_signature)
            .map_err(|_| {
                bad(
                    "the attestation key's signature over the header and body does not verify"
                        .into(),
                )
            })?;
        let cert_type = u16::from_le_bytes(
            take(128, 2, "certification data type")?
                .try_into()
                .expect("2"),
        );
        if cert_type != 6 {
            return Err(bad(format!(
                "certification data type {cert_type}, expected 6 (QE report)"
            )));
        }
        let cert_len = u32::from_le_bytes(
            take(130, 4, "certification data size")?
                .try_into()
                .expect("4"),
        ) as usize;
        let cert = take(134, cert_len, "certification data")?;
        let at = |at: usize, len: usize, what: &str| {
            cert.get(at..at + len).ok_or_else(|| {
                bad(format!(
                    "the QE certification data ends inside the {what} (byte {at})"
                ))
            })
        };
        let qe_report = at(0, QE_REPORT_LEN, "QE report")?;
        let qe_signature = Signature::from_slice(at(QE_REPORT_LEN, 64, "QE report signature")?)
            .map_err(|_| bad("the QE report signature is not an ECDSA P-256 signature".into()))?;
        let auth_len = u16::from_le_bytes(
            at(QE_REPORT_LEN + 64, 2, "authentication data size")?
                .try_into()
                .expect("2"),
        ) as usize;
        let auth = at(QE_REPORT_LEN + 66, auth_len, "authentication data")?;
        let inner_at = QE_REPORT_LEN + 66 + auth_len;
        let inner_type =
            u16::from_le_bytes(at(inner_at, 2, "PCK data type")?.try_into().expect("2"));
        if inner_type != 5 {
            return Err(bad(format!(
                "PCK certification data type {inner_type}, expected 5 (PEM chain)"
            )));
        }
        let inner_len =
            u32::from_le_bytes(at(inner_at + 2, 4, "PCK data size")?.try_into().expect("4"))
                as usize;
        let pem = at(inner_at + 6, inner_len, "PCK certificate chain")?;
        // The QE binds the attestation key: REPORTDATA = SHA-256(key || authentication data) || 0.
        use sha2::Digest;
        let expected: [u8; 32] = sha2::Sha256::new()
            .chain_update(attestation_key_raw)
            .chain_update(auth)
            .finalize()
            .into();
        let report_data = &qe_report[QE_REPORT_DATA_AT..QE_REPORT_DATA_AT + 64];
        if report_data[..32] != expected || report_data[32..].iter().any(|&b| b != 0) {
            return Err(bad("the QE report does not bind the attestation key".into()));
        }
        let chain = crate::x509::pem_chain(pem).map_err(bad)?;
        let [pck, platform_ca, root] = &chain[..] else {
            return Err(bad(format!("the PCK chain has {} certificates, expected 3 (PCK, platform or processor CA, root)", chain.len())));
        };
        let root_fingerprint: [u8; 32] = sha2::Sha256::digest(root.der()).into();
        if root_fingerprint != INTEL_SGX_ROOT_CA_SHA256
            && !trust.extra_roots.iter().any(|r| r[..] == *root.der())
        {
            return Err(bad(format!(
                "the chain's root (sha256 {}) is not the Intel SGX Root CA",
                cvm_formats::hex(&root_fingerprint)
            )));
        }
        root.verify_issued_by(root)
            .map_err(|e| bad(format!("the root: {e}")))?;
        platform_ca
            .verify_issued_by(root)
            .map_err(|e| bad(format!("the PCK CA: {e}")))?;
        pck.verify_issued_by(platform_ca)
            .map_err(|e| bad(format!("the PCK certificate: {e}")))?;
        pck.p256_key()
            .map_err(bad)?
            .verify(qe_report, &qe_signature)
            .map_err(
                |_| bad("the QE report's signature does not verify with the PCK key".into()),
            )?;
        // Only now is the QE report known to be the platform's: whose enclave made it.
        let qe = QeReport::parse(qe_report);
        qe.check(&trust.qe)?;
        Ok(SignatureChecked {
            pck_subject: pck.subject(),
            qe,
        })
    }
}
/// Quotes signed by a chain of the test's own keys (root, PCK CA, PCK, attestation key), laid
/// out as real quotes are: the certificates are the real chain's with their keys replaced, so
/// only the keys (and the root's fingerprint) differ from Intel's.
#[cfg(test)]
pub(crate) mod test_chain {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::SigningKey;
    use sha2::Digest;
    use x509_cert::der::{Decode, Encode};

    pub struct TestChain {
        keys: [SigningKey; 3],
        ders: [Vec<u8>; 3],
    }

    fn point(key: &SigningKey) -> Vec<u8> {
        key.verifying_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    impl TestChain {
        /// Root, PCK CA and PCK with fresh keys, each signed by the one above.
        pub fn new() -> TestChain {
            let real =
                Quote::parse(&crate::testdata::read("tdx/gtg_cos-113-tdx-quote.dat")).unwrap();
            let pem = split(&real).pem;
            let text = std::str::from_utf8(&pem).unwrap();
            let ders: Vec<Vec<u8>> = text
                .split("-----BEGIN CERTIFICATE-----")
                .filter_map(|b| b.split("-----END CERTIFICATE-----").next())
                .filter(|b| !b.trim().trim_end_matches('\0').is_empty())
                .map(|b| {
                    let b64: String = b.chars().filter(|c| !c.is_whitespace()).collect();
                    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()
                })
                .collect();
            assert_eq!(ders.len(), 3);
            let keys = [0, 1, 2].map(|_| SigningKey::random(&mut rand_core::OsRng));
            // The chain is PCK, CA, root: certificate i is signed by key i + 1 (the root by its own).
            let resign = |der: &[u8], key: &SigningKey, issuer: &SigningKey| {
                let mut cert = x509_cert::Certificate::from_der(der).unwrap();
                cert.tbs_certificate
                    .subject_public_key_info
                    .subject_public_key =
                    x509_cert::der::asn1::BitString::from_bytes(&point(key)).unwrap();
                let tbs = cert.tbs_certificate.to_der().unwrap();
                let signature: p256::ecdsa::Signature = issuer.sign(&tbs);
                cert.signature =
                    x509_cert::der::asn1::BitString::from_bytes(signature.to_der().as_bytes())
                        .unwrap();
                cert.to_der().unwrap()
            };
            let [pck, ca, root] = &keys;
            TestChain {
                ders: [
                    resign(&ders[0], pck, ca),
                    resign(&ders[1], ca, root),
                    resign(&ders[2], root, root),
                ],
                keys: keys.clone(),
            }
        }

        /// The root's DER, to trust it (`Trust::extra_roots`).
        pub fn root(&self) -> Vec<u8> {
            self.ders[2].clone()
        }

        /// The real quote's header and body (with `report_data`) signed by a fresh attestation
        /// key, whose QE report (the real one's, changed by `qe`) the test PCK signs.
        pub fn quote(&self, report_data: &[u8; 64], qe: impl Fn(&mut [u8])) -> Vec<u8> {
            let raw = crate::testdata::read("tdx/gtg_cos-113-tdx-quote.dat");
            let real = Quote::parse(&raw).unwrap();
            let parts = split(&real);
            let mut signed = real.signed.clone();
            signed[HEADER_LEN + 520..HEADER_LEN + 584].copy_from_slice(report_data);
            let ak = SigningKey::random(&mut rand_core::OsRng);
            let ak_raw = point(&ak)[1..].to_vec();
            let quote_signature: p256::ecdsa::Signature = ak.sign(&signed);
            let mut qe_report = parts.qe_report.clone();
            qe(&mut qe_report);
            let binding: [u8; 32] = sha2::Sha256::new()
                .chain_update(&ak_raw)
                .chain_update(&parts.auth)
                .finalize()
                .into();
            qe_report[QE_REPORT_DATA_AT..QE_REPORT_DATA_AT + 32].copy_from_slice(&binding);
            qe_report[QE_REPORT_DATA_AT + 32..QE_REPORT_DATA_AT + 64].fill(0);
            let qe_signature: p256::ecdsa::Signature = self.keys[0].sign(&qe_report);
            let pem: String = self
                .ders
                .iter()
                .map(|d| {
                    format!(
                        "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
                        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, d)
                    )
                })
                .collect();
            let mut cert = qe_report;
            cert.extend_from_slice(&qe_signature.to_bytes());
            cert.extend_from_slice(&(parts.auth.len() as u16).to_le_bytes());
            cert.extend_from_slice(&parts.auth);
            cert.extend_from_slice(&5u16.to_le_bytes());
            cert.extend_from_slice(&(pem.len() as u32).to_le_bytes());
            cert.extend_from_slice(pem.as_bytes());
            let mut data = quote_signature.to_bytes().to_vec();
            data.extend_from_slice(&ak_raw);
            data.extend_from_slice(&6u16.to_le_bytes());
            data.extend_from_slice(&(cert.len() as u32).to_le_bytes());
            data.extend_from_slice(&cert);
            let mut quote = signed;
            quote.extend_from_slice(&(data.len() as u32).to_le_bytes());
            quote.extend_from_slice(&data);
            quote
        }
    }

    struct Parts {
        qe_report: Vec<u8>,
        auth: Vec<u8>,
        pem: Vec<u8>,
    }

    fn split(quote: &Quote) -> Parts {
        let d = &quote.signature_data;
        let cert = &d[134..];
        let auth_len = u16_at(cert, QE_REPORT_LEN + 64) as usize;
        let auth = cert[QE_REPORT_LEN + 66..QE_REPORT_LEN + 66 + auth_len].to_vec();
        let inner = QE_REPORT_LEN + 66 + auth_len;
        let pem_len = u32_at(cert, inner + 2) as usize;
        Parts {
            qe_report: cert[..QE_REPORT_LEN].to_vec(),
            auth,
            pem: cert[inner + 6..inner + 6 + pem_len].to_vec(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn testdata(path: &str) -> Vec<u8> {
        crate::testdata::read(path)
    }

    #[test]
    fn real_quotes_parse() {
        let cos = Quote::parse(&testdata("tdx/gtg_cos-113-tdx-quote.dat")).unwrap();
        assert_eq!((cos.version, cos.body_type), (4, 2));
        assert!(cvm_formats::hex(&cos.td.rtmr[0]).starts_with("3fa2f61f"));
        assert!(cvm_formats::hex(&cos.td.rtmr[1]).starts_with("f62dbc07"));
        assert!(cvm_formats::hex(&cos.td.rtmr[2]).starts_with("4969684d"));
        // The report data used for that quote.
        assert_eq!(cos.td.report_data.to_vec(), testdata("tdx/gtg_nonce.dat"));
        assert!(!cos.td.debug());
        // This sample carries text after its signature data, which is refused; without it the
        // quote parses.
        let prod = testdata("tdx/gtg_tdx_prod_quote_SPR_E4.dat");
        assert!(matches!(
            Quote::parse(&prod),
            Err(TdxError::Field {
                field: "trailing bytes",
                ..
            })
        ));
        let prod = Quote::parse(&prod[..prod.len() - 39]).unwrap();
        assert_eq!(prod.version, 4);
        let v5 = Quote::parse(&testdata("tdx/gtg_quote_v5_sample.dat")).unwrap();
        assert_eq!((v5.version, v5.body_type), (5, 3));
    }

    #[test]
    fn real_quote_signatures_verify_up_to_the_intel_root_and_a_changed_byte_does_not() {
        let prod = testdata("tdx/gtg_tdx_prod_quote_SPR_E4.dat");
        let prod = &prod[..prod.len() - 39];
        for raw in [
            testdata("tdx/gtg_cos-113-tdx-quote.dat"),
            prod.to_vec(),
            testdata("tdx/gtg_quote_v5_sample.dat"),
        ] {
            let quote = Quote::parse(&raw).unwrap();
            let checked = quote.verify_signature().unwrap();
            assert!(
                checked.pck_subject.contains("Intel SGX PCK Certificate"),
                "{checked:?}"
            );
            // A byte of the body (RTMR 2), of the attestation key, of the QE report, of the
            // QE report signature, of the authentication data, of the chain.
            let sig_at = quote.signed.len() + 4;
            for at in [
                HEADER_LEN + 400,
                8,
                sig_at + 70,
                sig_at + 134 + 100,
                sig_at + 134 + 400,
                sig_at + 134 + 460,
                sig_at + 134 + 900,
            ] {
                let mut bad = raw.clone();
                bad[at] ^= 1;
                let verdict = Quote::parse(&bad).and_then(|q| q.verify_signature());
                assert!(verdict.is_err(), "byte {at} changed, still verified");
            }
        }
    }

    #[test]
    fn rtmrs_equal_the_ccel_replay() {
        let log = crate::uefi::tcglog::parse(&testdata("tdx/gtg_ccel_data.dat")).unwrap();
        let replayed = log.replay_ccel().unwrap();
        let quote = Quote::parse(&testdata("tdx/gtg_cos-113-tdx-quote.dat")).unwrap();
        for i in 0..3 {
            assert_eq!(replayed.rtmr[i], quote.td.rtmr[i].to_vec(), "RTMR{i}");
        }
    }

    #[test]
    fn a_tdreport_parses() {
        // A sample whose TDINFO holds only attributes and XFAM.
        let report = parse_tdreport(&testdata("tdx/gtg_report.dat")).unwrap();
        assert_eq!(report.td_attributes, 0xa6dc655ad3251e0d);
        assert_eq!(report.xfam, 0x46ca4d1ecadd7247);
        assert!(matches!(
            parse_tdreport(&[0u8; 100]),
            Err(TdxError::Field {
                field: "length",
                ..
            })
        ));
    }

    #[test]
    fn damaged_quotes_are_named() {
        let quote = testdata("tdx/gtg_cos-113-tdx-quote.dat");
        for (at, value, name) in [
            (0usize, 3u8, "version"),
            (2, 3, "attestation_key_type"),
            (4, 0, "tee_type"),
            (12, 0, "qe_vendor_id"),
        ] {
            let mut bad = quote.clone();
            bad[at] = value;
            match Quote::parse(&bad) {
                Err(TdxError::Field { field, .. }) => assert_eq!(field, name),
                other => panic!("byte {at}: {other:?}"),
            }
        }
        assert!(matches!(
            Quote::parse(&quote[..600]),
            Err(TdxError::Truncated { .. })
        ));
        let mut trailing = quote.clone();
        trailing.push(1);
        assert!(Quote::parse(&trailing).is_err());
    }

    #[test]
    fn the_quoting_enclave_is_pinned_to_intels_td_qe() {
        use test_chain::TestChain;
        let chain = TestChain::new();
        let trusting = Trust {
            extra_roots: vec![chain.root()],
            ..Default::default()
        };
        let verify =
            |raw: &[u8], trust: &Trust| Quote::parse(raw).unwrap().verify_signature_with(trust);
        // Intel's enclave identity (the real QE report's), signed by the trusted test chain.
        let good = chain.quote(&[7; 64], |_| {});
        let checked = verify(&good, &trusting).unwrap();
        assert_eq!(checked.qe.mrsigner, INTEL_TD_QE_MRSIGNER);
        // The same chain, not configured: only Intel's root is.
        let why = verify(&good, &Trust::default()).unwrap_err().to_string();
        assert!(why.contains("is not the Intel SGX Root CA"), "{why}");
        // Another enclave, certified by the same (trusted) platform key.
        let other_signer = chain.quote(&[7; 64], |qe| qe[128] ^= 0xff);
        match verify(&other_signer, &trusting) {
            Err(TdxError::Refused {
                check,
                expected,
                found,
            }) => {
                assert_eq!(check, "qe.mrsigner");
                assert_eq!(expected, cvm_formats::hex(&INTEL_TD_QE_MRSIGNER));
                assert!(found.starts_with("239e2a7c"), "{found}");
            }
            other => panic!("{other:?}"),
        }
        let refused_by = |change: &dyn Fn(&mut [u8]), trust: &Trust| match verify(
            &chain.quote(&[7; 64], change),
            trust,
        ) {
            Err(TdxError::Refused { check, .. }) => check,
            other => panic!("{other:?}"),
        };
        // The SGX QE (product 1), a debug enclave, an older one.
        assert_eq!(refused_by(&|qe| qe[256] = 1, &trusting), "qe.isvprodid");
        assert_eq!(refused_by(&|qe| qe[48] |= 2, &trusting), "qe.debug");
        assert_eq!(refused_by(&|qe| qe[258] = 3, &trusting), "qe.isvsvn");
        let newer = Trust {
            qe: QeIdentity {
                min_isvsvn: 7,
                ..Default::default()
            },
            ..trusting.clone()
        };
        assert_eq!(refused_by(&|_| {}, &newer), "qe.isvsvn");
        // The real quotes come from Intel's enclave.
        for name in [
            "tdx/gtg_cos-113-tdx-quote.dat",
            "tdx/gtg_quote_v5_sample.dat",
        ] {
            let checked = verify(&testdata(name), &Trust::default()).unwrap();
            assert_eq!(
                (checked.qe.mrsigner, checked.qe.isvprodid),
                (INTEL_TD_QE_MRSIGNER, INTEL_TD_QE_ISVPRODID)
            );
        }
    }

    #[test]
    fn td_attributes_and_named_registers_are_checked() {
        let cos = Quote::parse(&testdata("tdx/gtg_cos-113-tdx-quote.dat"))
            .unwrap()
            .td;
        assert_eq!(cos.td_attributes, TD_ATTRIBUTES_SEPT_VE_DISABLE);
        appraise_td(&cos, &TdRequirements::default()).unwrap();
        let check = |td: &TdMeasurements, required: &TdRequirements| match appraise_td(td, required)
        {
            Err(TdxError::Refused { check, .. }) => check,
            other => panic!("{other:?}"),
        };
        let with = |attributes: u64| TdMeasurements {
            td_attributes: attributes,
            ..cos.clone()
        };
        let default = TdRequirements::default();
        assert_eq!(check(&with(0), &default), "td_attributes.sept_ve_disable");
        assert_eq!(
            check(&with(1 << 28 | 1 << 29), &default),
            "td_attributes.migratable"
        );
        assert_eq!(
            check(&with(1 << 28 | 1 << 2), &default),
            "td_attributes.debug"
        );
        // Named exactly: only that value passes (debug bits never do).
        let exact = TdRequirements {
            td_attributes: Some(1 << 28 | 1 << 30),
            ..Default::default()
        };
        assert_eq!(check(&cos, &exact), "td_attributes");
        appraise_td(&with(1 << 28 | 1 << 30), &exact).unwrap();
        for (required, name) in [
            (
                TdRequirements {
                    xfam: Some(0x61ae7),
                    ..Default::default()
                },
                "xfam",
            ),
            (
                TdRequirements {
                    mrconfigid: Some([1; 48]),
                    ..Default::default()
                },
                "mrconfigid",
            ),
            (
                TdRequirements {
                    mrowner: Some([1; 48]),
                    ..Default::default()
                },
                "mrowner",
            ),
            (
                TdRequirements {
                    mrownerconfig: Some([1; 48]),
                    ..Default::default()
                },
                "mrownerconfig",
            ),
        ] {
            assert_eq!(check(&cos, &required), name);
        }
        let matching = TdRequirements {
            td_attributes: Some(cos.td_attributes),
            xfam: Some(cos.xfam),
            mrconfigid: Some(cos.mrconfigid),
            mrowner: Some(cos.mrowner),
            mrownerconfig: Some(cos.mrownerconfig),
        };
        appraise_td(&cos, &matching).unwrap();
        // The production sample runs without SEPT_VE_DISABLE: refused by default.
        let prod = testdata("tdx/gtg_tdx_prod_quote_SPR_E4.dat");
        let prod = Quote::parse(&prod[..prod.len() - 39]).unwrap().td;
        assert_eq!(check(&prod, &default), "td_attributes.sept_ve_disable");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Quote::parse(&bytes);
            let _ = parse_tdreport(&bytes);
        }

        #[test]
        fn random_signature_data_never_verifies_nor_panics(
            data in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let mut quote = Quote::parse(&testdata("tdx/gtg_cos-113-tdx-quote.dat")).unwrap();
            quote.signature_data = data;
            prop_assert!(quote.verify_signature().is_err());
        }

        #[test]
        fn a_quote_with_a_random_signature_length_never_panics(len in any::<u32>()) {
            let mut quote = testdata("tdx/gtg_cos-113-tdx-quote.dat");
            quote[HEADER_LEN + BODY_LEN_TD10..HEADER_LEN + BODY_LEN_TD10 + 4]
                .copy_from_slice(&len.to_le_bytes());
            let _ = Quote::parse(&quote);
        }
    }
}
