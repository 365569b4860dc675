//! The evidence JSON a node sends a key broker beside its TEE's report: the vTPM's
//! endorsement (in `auth`) and its quote with the logs that explain it (`primary_evidence`).

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

/// The `tpm` member of the node's `auth` extra-params: its EK certificate (base64 DER, from
/// NV index 0x01c00002) and its attestation key's TPMT_PUBLIC (base64).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmEndorsement {
    pub ek_cert: String,
    pub ak_public: String,
}

impl TpmEndorsement {
    /// The `auth` extra-params member a node sends.
    pub fn json(ek_cert: &[u8], ak_public: &[u8]) -> Value {
        json!({ "ek_cert": STANDARD.encode(ek_cert), "ak_public": STANDARD.encode(ak_public) })
    }
}

/// The `tpm` evidence a node sends as `primary_evidence`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TpmEvidence {
    /// base64url x and y of the attestation key.
    pub ak_x: String,
    pub ak_y: String,
    /// base64 TPMS_ATTEST, and the signature's r and s.
    pub attest: String,
    pub signature_r: String,
    pub signature_s: String,
    /// base64 of the firmware's TCG event log (absent on direct kernel boot).
    #[serde(default)]
    pub eventlog: Option<String>,
    /// base64 of cvm-init's JSON-seq measurement log.
    #[serde(default)]
    pub cvm_measure_log: Option<String>,
}

impl TpmEvidence {
    /// The `primary_evidence` JSON of a quote and the logs that explain it.
    pub fn json(
        ak_x: &[u8],
        ak_y: &[u8],
        attest: &[u8],
        (r, s): (&[u8], &[u8]),
        firmware_log: Option<&[u8]>,
        cvm_measure_log: Option<&[u8]>,
    ) -> Value {
        json!({
            "ak_x": URL_SAFE_NO_PAD.encode(ak_x),
            "ak_y": URL_SAFE_NO_PAD.encode(ak_y),
            "attest": STANDARD.encode(attest),
            "signature_r": STANDARD.encode(r),
            "signature_s": STANDARD.encode(s),
            "eventlog": firmware_log.map(|l| STANDARD.encode(l)),
            "cvm_measure_log": cvm_measure_log.map(|l| STANDARD.encode(l)),
        })
    }
}
