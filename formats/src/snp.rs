//! SEV-SNP attestation report layout: a strict parser over the raw 1184 bytes (typed access
//! to the fields, the original bytes kept for the signature check), the certificate table of
//! an extended report, and Trustee's `snp` evidence JSON. What the node and the verifier must
//! agree on; the signature and certificate chain checks are `cvm_measure::snp`'s.
//!
//! On the wire (Trustee's `snp` evidence) the report travels as the serde form of the `sev`
//! crate's `AttestationReport`; the broker encodes it back to the 1184 bytes and checks the
//! signature over those. A re-encoding that differs from what the firmware signed can only fail
//! the signature, never pass it.

pub const REPORT_LEN: usize = 0x4a0;
/// The signed part: everything before the signature.
pub const SIGNED_LEN: usize = 0x2a0;
const SIGNATURE_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// R and S are 72-byte little-endian fields of which P-384 uses 48 bytes.
pub const COMPONENT_FIELD: usize = 72;
pub const COMPONENT_LEN: usize = 48;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnpError {
    #[error("an SNP report is {REPORT_LEN} bytes, not {0}")]
    Length(usize),
    #[error("SNP report field {field} is {found}, expected {expected}")]
    Field {
        field: &'static str,
        found: String,
        expected: &'static str,
    },
    #[error("the SNP report's signature does not verify with this endorsement key")]
    Signature,
    #[error("invalid endorsement key certificate: {0}")]
    Certificate(String),
    #[error("the endorsement key certificate does not chain to AMD's Milan, Genoa or Turin root, nor to a configured one")]
    Chain,
    #[error("SNP certificate table: {0}")]
    CertTable(String),
    #[error("snp evidence: {0}")]
    Evidence(String),
}

/// A parsed report: typed access to the fields a verifier checks, over the original bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    raw: Vec<u8>,
}

impl Report {
    /// Parses and checks the structure (length, version, signature algorithm, VMPL, the
    /// unused bytes of the signature).
    pub fn parse(raw: &[u8]) -> Result<Report, SnpError> {
        if raw.len() != REPORT_LEN {
            return Err(SnpError::Length(raw.len()));
        }
        let report = Report { raw: raw.to_vec() };
        let field = |field, found: u64, expected| {
            Err(SnpError::Field {
                field,
                found: found.to_string(),
                expected,
            })
        };
        if !(2..=5).contains(&report.version()) {
            return field("version", report.version().into(), "2 to 5");
        }
        if report.u32_at(0x34) != SIGNATURE_ALGO_ECDSA_P384_SHA384 {
            return field(
                "signature_algo",
                report.u32_at(0x34).into(),
                "1 (ECDSA P-384 with SHA-384)",
            );
        }
        if report.vmpl() > 3 {
            return field("vmpl", report.vmpl().into(), "0 to 3");
        }
        let signature = &raw[SIGNED_LEN..];
        let padding_is_zero = signature[COMPONENT_LEN..COMPONENT_FIELD]
            .iter()
            .chain(&signature[COMPONENT_FIELD + COMPONENT_LEN..])
            .all(|&b| b == 0);
        if !padding_is_zero {
            return Err(SnpError::Field {
                field: "signature",
                found: "non-zero bytes beyond R and S".into(),
                expected: "zeros after the 48 bytes of R and of S",
            });
        }
        Ok(report)
    }

    fn u32_at(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.raw[offset..offset + 4].try_into().expect("4 bytes"))
    }

    fn u64_at(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.raw[offset..offset + 8].try_into().expect("8 bytes"))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.raw
    }
    pub fn version(&self) -> u32 {
        self.u32_at(0)
    }
    pub fn guest_svn(&self) -> u32 {
        self.u32_at(0x4)
    }
    pub fn policy(&self) -> u64 {
        self.u64_at(0x8)
    }
    pub fn vmpl(&self) -> u32 {
        self.u32_at(0x30)
    }
    /// 0 = VCEK, 1 = VLEK (signer_info bits 4:2).
    pub fn signing_key(&self) -> u32 {
        (self.u32_at(0x48) >> 2) & 0x7
    }
    pub fn report_data(&self) -> &[u8] {
        &self.raw[0x50..0x90]
    }
    /// The launch digest.
    pub fn measurement(&self) -> &[u8] {
        &self.raw[0x90..0xc0]
    }
    pub fn host_data(&self) -> &[u8] {
        &self.raw[0xc0..0xe0]
    }
    pub fn reported_tcb(&self) -> u64 {
        self.u64_at(0x180)
    }
    pub fn chip_id(&self) -> &[u8] {
        &self.raw[0x1a0..0x1e0]
    }
    /// Guest policy bit 19.
    pub fn debug_allowed(&self) -> bool {
        self.policy() & (1 << 19) != 0
    }
}

/// A TCB version decoded for a product line (Turin moved the fields).
pub fn decode_tcb(tcb: u64, product: &str) -> serde_json::Value {
    let b = tcb.to_le_bytes();
    if product == "Turin" {
        serde_json::json!({"fmc": b[0], "bootloader": b[1], "tee": b[2], "snp": b[3], "microcode": b[7]})
    } else {
        serde_json::json!({"bootloader": b[0], "tee": b[1], "snp": b[6], "microcode": b[7]})
    }
}

/// The guest policy's fields.
pub fn decode_policy(policy: u64) -> serde_json::Value {
    let bit = |n: u32| policy & (1 << n) != 0;
    serde_json::json!({
        "abi_minor": policy & 0xff,
        "abi_major": (policy >> 8) & 0xff,
        "smt": bit(16),
        "migrate_ma": bit(18),
        "debug": bit(19),
        "single_socket": bit(20),
        "cxl_allowed": bit(21),
        "mem_aes_256_xts": bit(22),
        "rapl_disabled": bit(23),
        "ciphertext_hiding": bit(24),
        "page_swap_disabled": bit(25),
    })
}

impl Report {
    pub fn current_tcb(&self) -> u64 {
        self.u64_at(0x38)
    }
    pub fn launch_tcb(&self) -> u64 {
        self.u64_at(0x1f0)
    }
    pub fn committed_tcb(&self) -> u64 {
        self.u64_at(0x1e0)
    }
    pub fn platform_info(&self) -> u64 {
        self.u64_at(0x40)
    }
    pub fn id_key_digest(&self) -> &[u8] {
        &self.raw[0xe0..0x110]
    }
    pub fn report_id(&self) -> &[u8] {
        &self.raw[0x140..0x160]
    }
    /// The firmware version (major.minor.build) the report was made with.
    pub fn firmware_version(&self) -> String {
        format!(
            "{}.{}.{}",
            self.raw[0x1ea], self.raw[0x1e9], self.raw[0x1e8]
        )
    }

    /// What a verifier reads off the report, as JSON (`product` decodes the TCB fields).
    pub fn claims(&self, product: &str) -> serde_json::Value {
        serde_json::json!({
            "version": self.version(),
            "guest_svn": self.guest_svn(),
            "policy": format!("{:#x}", self.policy()),
            "policy_decoded": decode_policy(self.policy()),
            "vmpl": self.vmpl(),
            "signing_key": if self.signing_key() == 0 { "VCEK" } else { "VLEK" },
            "platform_info": format!("{:#x}", self.platform_info()),
            "measurement": crate::hex(self.measurement()),
            "report_data": crate::hex(self.report_data()),
            "host_data": crate::hex(self.host_data()),
            "id_key_digest": crate::hex(self.id_key_digest()),
            "report_id": crate::hex(self.report_id()),
            "chip_id": crate::hex(self.chip_id()),
            "firmware": self.firmware_version(),
            "current_tcb": decode_tcb(self.current_tcb(), product),
            "reported_tcb": decode_tcb(self.reported_tcb(), product),
            "committed_tcb": decode_tcb(self.committed_tcb(), product),
            "launch_tcb": decode_tcb(self.launch_tcb(), product),
        })
    }
}

/// The four TCB components an SNP verifier compares (SPL values), whatever the product line's
/// A version-3 report laid out and signed as the SNP firmware does, by `key`. For the test
/// build's emulated report provider and for tests: a real report is signed by the AMD secure
/// processor with a key no guest holds.
pub fn test_report(
    key: &p384::ecdsa::SigningKey,
    measurement: &[u8; 48],
    report_data: &[u8; 64],
    policy: u64,
) -> Vec<u8> {
    let mut raw = vec![0u8; REPORT_LEN];
    raw[0] = 3;
    raw[0x8..0x10].copy_from_slice(&policy.to_le_bytes());
    raw[0x34] = 1;
    raw[0x50..0x90].copy_from_slice(report_data);
    raw[0x90..0xc0].copy_from_slice(measurement);
    // CPUID family 19h, model 01h, stepping 1: a Milan processor (v3 reports name it).
    raw[0x188..0x18b].copy_from_slice(&[0x19, 0x01, 0x01]);
    sign_test_report(key, &mut raw);
    raw
}

/// Signs a report's first `SIGNED_LEN` bytes with `key` as the firmware does (tests change a
/// field of `test_report`'s output and sign again).
pub fn sign_test_report(key: &p384::ecdsa::SigningKey, raw: &mut [u8]) {
    use p384::ecdsa::signature::Signer;
    let signature: p384::ecdsa::Signature = key.sign(&raw[..SIGNED_LEN]);
    let (r, s) = signature.split_bytes();
    for (field, component) in [(SIGNED_LEN, r), (SIGNED_LEN + COMPONENT_FIELD, s)] {
        let mut le = component.to_vec();
        le.reverse();
        raw[field..field + COMPONENT_LEN].copy_from_slice(&le);
    }
}

pub use sev::firmware::host::{CertTableEntry, CertType};

/// GUIDs of the certificate table (extended report, configfs-tsm `auxblob`), in table order
/// of bytes.
const CERT_GUIDS: [(&str, CertType); 4] = [
    ("63da758de6644564adc5f4b93be8accd", CertType::VCEK),
    ("a8074bc2a25a483eaae639c045a0b8a1", CertType::VLEK),
    ("4ab7b379bbac4fe4a02f05aef327c782", CertType::ASK),
    ("c0b406a4a803495297433fb6014cd0ae", CertType::ARK),
];
const CERT_ENTRY_LEN: usize = 24;
/// No real table comes near this; a bound so that hostile input cannot ask for more.
const CERT_TABLE_MAX: usize = 64 * 1024;

fn guid_bytes(hex: &str) -> [u8; 16] {
    crate::verity::parse_hex(hex)
        .and_then(|v| v.try_into().ok())
        .expect("GUID constants are 16 bytes of hex")
}

/// Parses a certificate table: 24-byte entries `{GUID, u32 offset, u32 length}` up to an
/// all-zero entry, offsets from the start of the table. Unknown GUIDs are kept as `OTHER`;
/// an entry outside the buffer, overlapping the entries, or a table without its terminator is
/// refused.
pub fn parse_cert_table(table: &[u8]) -> Result<Vec<CertTableEntry>, SnpError> {
    let bad = |why: String| Err(SnpError::CertTable(why));
    if table.len() > CERT_TABLE_MAX {
        return bad(format!("{} bytes, at most {CERT_TABLE_MAX}", table.len()));
    }
    let mut entries = Vec::new();
    let mut at = 0;
    loop {
        let Some(entry) = table.get(at..at + CERT_ENTRY_LEN) else {
            return bad(format!(
                "no terminating all-zero entry before byte {}",
                table.len()
            ));
        };
        if entry.iter().all(|&b| b == 0) {
            break;
        }
        let guid: [u8; 16] = entry[..16].try_into().expect("16 bytes");
        let offset = u32::from_le_bytes(entry[16..20].try_into().expect("4 bytes")) as usize;
        let length = u32::from_le_bytes(entry[20..24].try_into().expect("4 bytes")) as usize;
        let Some(data) = offset
            .checked_add(length)
            .and_then(|end| table.get(offset..end))
        else {
            return bad(format!(
                "entry {} points at bytes {offset}+{length}, past the table's {} bytes",
                entries.len(),
                table.len()
            ));
        };
        let kind = CERT_GUIDS
            .iter()
            .find(|(hex, _)| guid_bytes(hex) == guid)
            .map(|(_, kind)| kind.clone())
            .unwrap_or_else(|| CertType::OTHER(uuid::Uuid::from_bytes(guid)));
        entries.push(CertTableEntry {
            cert_type: kind,
            data: data.to_vec(),
        });
        at += CERT_ENTRY_LEN;
    }
    let entries_end = at + CERT_ENTRY_LEN;
    for (i, e) in entries.iter().enumerate() {
        let offset = u32::from_le_bytes(
            table[i * CERT_ENTRY_LEN + 16..i * CERT_ENTRY_LEN + 20]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        if !e.data.is_empty() && offset < entries_end {
            return bad(format!("entry {i}'s data overlaps the entries"));
        }
    }
    Ok(entries)
}

/// Lays out a certificate table as a host provides it (the test build's emulated provider).
pub fn encode_cert_table(entries: &[CertTableEntry]) -> Vec<u8> {
    let header = (entries.len() + 1) * CERT_ENTRY_LEN;
    let mut table = vec![0u8; header];
    for (i, e) in entries.iter().enumerate() {
        let guid = match &e.cert_type {
            CertType::OTHER(uuid) => *uuid.as_bytes(),
            kind => CERT_GUIDS
                .iter()
                .find(|(_, k)| k == kind)
                .map(|(hex, _)| guid_bytes(hex))
                .unwrap_or([0; 16]),
        };
        let at = i * CERT_ENTRY_LEN;
        table[at..at + 16].copy_from_slice(&guid);
        let offset = table.len() as u32;
        table[at + 16..at + 20].copy_from_slice(&offset.to_le_bytes());
        table[at + 20..at + 24].copy_from_slice(&(e.data.len() as u32).to_le_bytes());
        table.extend_from_slice(&e.data);
    }
    table
}

/// Trustee's `snp` primary evidence: `{"attestation_report": <sev's serde form>,
/// "cert_chain": [{"cert_type": "VCEK", "data": [...]}, ...] or null}`.
pub fn trustee_evidence(
    report: &Report,
    cert_chain: Option<Vec<CertTableEntry>>,
) -> Result<serde_json::Value, SnpError> {
    use sev::parser::ByteParser;
    let parsed = sev::firmware::guest::AttestationReport::from_bytes(report.bytes())
        .map_err(|e| SnpError::Evidence(format!("the report does not decode: {e}")))?;
    Ok(serde_json::json!({
        "attestation_report": parsed,
        "cert_chain": cert_chain,
    }))
}

/// Reads Trustee's `snp` evidence back: the report encoded to its 1184 bytes and parsed
/// strictly, and the certificates it came with.
pub fn from_trustee_evidence(
    evidence: &serde_json::Value,
) -> Result<(Report, Vec<CertTableEntry>), SnpError> {
    use sev::parser::ByteParser;
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Evidence {
        attestation_report: sev::firmware::guest::AttestationReport,
        cert_chain: Option<Vec<CertTableEntry>>,
    }
    let evidence: Evidence =
        serde_json::from_value(evidence.clone()).map_err(|e| SnpError::Evidence(e.to_string()))?;
    let raw = evidence
        .attestation_report
        .to_bytes()
        .map_err(|e| SnpError::Evidence(format!("the report does not encode: {e}")))?;
    Ok((
        Report::parse(&raw)?,
        evidence.cert_chain.unwrap_or_default(),
    ))
}
