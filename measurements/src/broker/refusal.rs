//! Why the broker refuses a node's evidence, one variant per check. The text is what the node
//! reads in the `AttestationError` reply and what the refusal log records.

use crate::snp::SnpError;
use crate::tdx::TdxError;
use crate::tpm::quote::QuoteError;

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0} is not base64")]
    NotBase64(&'static str),
    #[error("{0} is not base64url")]
    NotBase64Url(&'static str),
    #[error("{kind} evidence: {source}")]
    EvidenceShape {
        kind: &'static str,
        source: serde_json::Error,
    },
    #[error("{log}: {why}")]
    Log { log: &'static str, why: String },
    #[error("vTPM attestation key not admitted: {0}")]
    KeyNotAdmitted(String),
    #[error("this broker has no PCR reference values (a quote of no PCRs proves nothing)")]
    NoPcrReference,
    #[error("the quote's attestation key {0} is not one this broker trusts")]
    UntrustedKey(String),
    #[error("vTPM quote refused: {0}")]
    TpmQuote(QuoteError),
    #[error("vTPM quote refused: the quoted PCR digest does not match the reference values ({0})")]
    PcrsDiffer(String),
    #[error("the event logs do not replay to the quoted PCRs")]
    LogsDoNotReplayPcrs,
    #[error(transparent)]
    Snp(#[from] SnpError),
    #[error("the report is signed by key {0}, expected a VCEK (0) or a VLEK (1)")]
    SigningKey(u32),
    #[error("the evidence carries no {0} certificate (this broker does not fetch one)")]
    NoEndorsement(&'static str),
    #[error("{source} ({product} chain)")]
    SnpSignature {
        source: SnpError,
        product: &'static str,
    },
    #[error("SNP report refused: {0}")]
    SnpAppraisal(String),
    #[error(transparent)]
    Tdx(#[from] TdxError),
    #[error("the TD is debuggable (its memory is readable by the host)")]
    TdDebug,
    #[error("the quote's report data is not this session's binding (replayed evidence)")]
    Replayed,
    #[error("this broker has no TDX reference values (tdx_mrtds and tdx_rtmrs with RTMR 1)")]
    NoTdxReference,
    #[error("MRTD {mrtd} is not one of the {allowed} allowed")]
    Mrtd { mrtd: String, allowed: usize },
    #[error("RTMR {index} is {found}, the reference is {reference}")]
    Rtmr {
        index: usize,
        found: String,
        reference: String,
    },
    #[error("the evidence lacks the CC event log or cvm-init's measurement log")]
    NoLogs,
    #[error("the boot's RTMR 2 events (load options and initrd) replay to {found}, the reference is {reference}")]
    BootRtmr2 { found: String, reference: String },
    #[error("the event logs do not replay to the quote's RTMR {0}")]
    LogsDoNotReplayRtmr(usize),
    #[error("cvm-init's measurements are not this image's (tdx_init_rtmr2 differs)")]
    InitRtmr2,
    #[error("this broker has no tdx_init_rtmr2 reference value")]
    NoInitRtmr2Reference,
    /// Each loaded reference's refusal, by its name; the evidence must match one whole.
    #[error("no loaded reference matches: {}", by_reference(.0))]
    NoReferenceMatches(Vec<(String, Refusal)>),
}

/// `A.json: why; B.json, C.json: why`: references refusing for the same reason share it.
fn by_reference(refusals: &[(String, Refusal)]) -> String {
    let mut grouped: Vec<(Vec<&str>, String)> = Vec::new();
    for (name, why) in refusals {
        let why = why.to_string();
        match grouped.iter_mut().find(|(_, w)| *w == why) {
            Some((names, _)) => names.push(name),
            None => grouped.push((vec![name], why)),
        }
    }
    if grouped.is_empty() {
        return "no reference is loaded".into();
    }
    grouped
        .iter()
        .map(|(names, why)| format!("{}: {why}", names.join(", ")))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_reference_is_named_with_its_reason_once() {
        let refusal = Refusal::NoReferenceMatches(vec![
            (
                "A.json".into(),
                Refusal::PcrsDiffer("PCR 15 is 00, the reference is 11".into()),
            ),
            ("B.json".into(), Refusal::LogsDoNotReplayPcrs),
            ("C.json".into(), Refusal::LogsDoNotReplayPcrs),
        ]);
        assert_eq!(
            refusal.to_string(),
            "no loaded reference matches: A.json: vTPM quote refused: the quoted PCR digest does not match the reference values (PCR 15 is 00, the reference is 11); B.json, C.json: the event logs do not replay to the quoted PCRs"
        );
    }
}
