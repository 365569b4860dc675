//! Evidence for a key broker, in the shapes Trustee's verifiers read, chosen by the TEE this
//! boot measures into: `tpm` (a vTPM quote), `snp` (a report and its certificate table) or
//! `tdx` (a quote and the CC event log). Each binds the broker's challenge (`binding`, the
//! hash of the session's nonce and the node's ephemeral key).

use std::path::Path;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::{json, Value};

use super::tpm::DeviceTransport;
use super::tsm::{self, TsmFs};
use super::Tee;

/// The TCG event log of the firmware (and a UKI's stub), where securityfs shows it.
const FIRMWARE_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
/// The CC event log the TDX firmware leaves (ACPI CCEL table data).
const CCEL: &str = "/sys/firmware/acpi/tables/data/CCEL";

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("cvm.tee={0}: a key broker needs hardware evidence (tpm, snp or tdx)")]
    NoEvidence(Tee),
    #[error("vTPM quote")]
    Tpm(#[from] super::tpm::TpmError),
    #[error("configfs-tsm report")]
    Tsm(#[from] tsm::TsmError),
    #[error("SNP report from /dev/sev-guest")]
    SevGuest(#[source] super::snp::SnpGuestError),
    #[error("the SNP report")]
    Report(#[from] cvm_formats::snp::SnpError),
    #[error("cannot read the CC event log {CCEL}")]
    Ccel(#[source] std::io::Error),
    #[error("cannot read cvm-init's measurement log")]
    OwnLog(#[source] std::io::Error),
    #[error("{0}")]
    TdxNoQuote(String),
    #[error("the key broker's tpm-credential is malformed: {0}")]
    Credential(&'static str),
}

/// Where evidence comes from.
pub enum Source {
    Tpm,
    /// configfs-tsm (the kernel's, or the test build's emulation) when present, else the
    /// TEE's device.
    Snp(Option<Box<dyn TsmFs>>),
    Tdx(Option<Box<dyn TsmFs>>),
}

impl Source {
    /// The source for the TEE this boot measures into (`Measurer::tee`).
    pub fn for_tee(tee: Tee) -> Result<Source, EvidenceError> {
        let tsm = || -> Option<Box<dyn TsmFs>> {
            #[cfg(feature = "test-hooks")]
            if let Some(emulated) = emulated_snp() {
                return Some(Box::new(emulated));
            }
            Path::new(tsm::REPORT_ROOT)
                .is_dir()
                .then(|| Box::new(tsm::Configfs) as Box<dyn TsmFs>)
        };
        match tee {
            Tee::Tpm => Ok(Source::Tpm),
            Tee::Snp => Ok(Source::Snp(tsm())),
            Tee::Tdx => Ok(Source::Tdx(tsm())),
            Tee::None => Err(EvidenceError::NoEvidence(tee)),
        }
    }

    /// The TEE of the evidence (its `as_str` is Trustee's tee name for the `auth` request).
    pub fn tee(&self) -> Tee {
        match self {
            Source::Tpm => Tee::Tpm,
            Source::Snp(_) => Tee::Snp,
            Source::Tdx(_) => Tee::Tdx,
        }
    }

    /// Members of `auth`'s extra-params: for a vTPM, its endorsement (the EK certificate and
    /// the attestation key's public area), which the broker answers with a credential.
    pub fn auth_params(&self) -> Result<Option<serde_json::Map<String, Value>>, EvidenceError> {
        match self {
            Source::Tpm => {
                let mut transport = DeviceTransport::open()?;
                let ek_cert = super::ek::certificate(&mut transport)?;
                let ak_public = super::quote::attestation_key_public(&mut transport)?;
                let mut params = serde_json::Map::new();
                params.insert(
                    "tpm".into(),
                    cvm_formats::evidence::TpmEndorsement::json(&ek_cert, &ak_public),
                );
                Ok(Some(params))
            }
            _ => Ok(None),
        }
    }

    /// The primary evidence binding `binding`, for a challenge with `challenge_extra` as its
    /// extra-params (a vTPM activates the broker's `tpm-credential` there).
    pub fn evidence_for(
        &self,
        binding: &[u8; 64],
        challenge_extra: &Value,
    ) -> Result<Value, EvidenceError> {
        match self {
            Source::Tpm => {
                let Some(credential) = challenge_extra.get("tpm-credential") else {
                    return tpm(binding, None);
                };
                let field = |name: &str| {
                    credential
                        .get(name)
                        .and_then(Value::as_str)
                        .and_then(|v| STANDARD.decode(v).ok())
                        .ok_or(EvidenceError::Credential(
                            "credential_blob and encrypted_secret must be base64",
                        ))
                };
                let (blob, secret) = (field("credential_blob")?, field("encrypted_secret")?);
                tpm(binding, Some((&blob, &secret)))
            }
            _ => self.evidence(binding),
        }
    }

    /// The primary evidence binding `binding`.
    pub fn evidence(&self, binding: &[u8; 64]) -> Result<Value, EvidenceError> {
        match self {
            Source::Tpm => tpm(binding, None),
            Source::Snp(Some(fs)) => {
                let report = tsm::report(
                    fs.as_ref(),
                    Path::new(tsm::REPORT_ROOT),
                    binding,
                    Some("sev_guest"),
                )?;
                let certs = match &report.auxblob {
                    Some(table) => Some(cvm_formats::snp::parse_cert_table(table)?),
                    None => None,
                };
                snp(&report.outblob, certs)
            }
            Source::Snp(None) => {
                let (report, certs) =
                    super::snp::extended_report(binding).map_err(EvidenceError::SevGuest)?;
                snp(&report, certs)
            }
            Source::Tdx(Some(fs)) => {
                let report = tsm::report(
                    fs.as_ref(),
                    Path::new(tsm::REPORT_ROOT),
                    binding,
                    Some("tdx_guest"),
                )?;
                let ccel = std::fs::read(CCEL).map_err(EvidenceError::Ccel)?;
                let own =
                    std::fs::read(cvm_formats::jsonseq::LOG_PATH).map_err(EvidenceError::OwnLog)?;
                Ok(tdx(&report.outblob, &ccel, &own))
            }
            Source::Tdx(None) => Err(EvidenceError::TdxNoQuote(
                super::tdx_guest::without_quote_service(binding),
            )),
        }
    }
}

/// Test builds only: the emulated SNP provider of `cvm.test-snp-emulator=`.
#[cfg(feature = "test-hooks")]
fn emulated_snp() -> Option<super::emulated_snp::EmulatedSnp> {
    let dir = crate::test_hooks::snp_emulator_dir()?;
    log::warn!(
        "test build: SNP evidence comes from an emulated provider ({})",
        dir.display()
    );
    match super::emulated_snp::EmulatedSnp::load(&dir) {
        Ok(emulated) => Some(emulated),
        Err(e) => {
            log::error!("test build: the emulated SNP provider cannot start: {e}");
            None
        }
    }
}

fn tpm(binding: &[u8; 64], credential: Option<(&[u8], &[u8])>) -> Result<Value, EvidenceError> {
    let mut transport = DeviceTransport::open()?;
    let q = super::quote::quote_activated(
        &mut transport,
        binding,
        &super::seal::SEAL_PCRS,
        credential,
    )?;
    log::info!(
        "kbs: this node's vTPM attestation key is {}{} ({}; a broker may also list it)",
        cvm_formats::hex(&q.ak_x),
        cvm_formats::hex(&q.ak_y),
        if credential.is_some() {
            "credential activated with the vTPM's endorsement key"
        } else {
            "the broker sent no credential for it"
        }
    );
    // The firmware's log exists on UEFI boots only; cvm-init's own always does.
    let firmware_log = std::fs::read(FIRMWARE_LOG).ok();
    let own_log = std::fs::read(cvm_formats::jsonseq::LOG_PATH).map_err(EvidenceError::OwnLog)?;
    Ok(cvm_formats::evidence::TpmEvidence::json(
        &q.ak_x,
        &q.ak_y,
        &q.attest,
        (&q.r, &q.s),
        firmware_log.as_deref(),
        Some(&own_log),
    ))
}

fn snp(
    report: &[u8],
    certs: Option<Vec<cvm_formats::snp::CertTableEntry>>,
) -> Result<Value, EvidenceError> {
    let report = cvm_formats::snp::Report::parse(report)?;
    log::info!(
        "kbs: SNP report, launch digest {}, {} certificate(s)",
        cvm_formats::hex(report.measurement()),
        certs.as_ref().map_or(0, Vec::len)
    );
    Ok(cvm_formats::snp::trustee_evidence(&report, certs)?)
}

/// Trustee's `tdx` evidence: the quote and the CC event log area as the firmware left it
/// (its unused tail is 0xff, where a replay stops); with cvm-init's own measurement log, whose
/// events extend RTMR 2 after the firmware's (a field Trustee does not read).
fn tdx(quote: &[u8], ccel: &[u8], own_log: &[u8]) -> Value {
    json!({
        "quote": STANDARD.encode(quote),
        "cc_eventlog": STANDARD.encode(ccel),
        "cvm_measure_log": STANDARD.encode(own_log),
    })
}
