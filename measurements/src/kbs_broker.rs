//! The reference key broker (`cvm-measure kbs-serve`): the Trustee KBS protocol (0.4.0) over
//! HTTP, resources kept as files, released only to a session whose evidence verifies against
//! reference values (`cvm-measure predict --json`). Evidence kinds so far: `tpm` (a vTPM quote
//! over the reference PCRs by an attestation key shown to live beside a certified endorsement
//! key, `tpm_credential`, bound to the session's nonce and the node's ephemeral key), `snp`
//! and `tdx`.

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;

use crate::http::{read_message, write_message, Message};
use crate::kbs::{self, Attestation, Challenge, Jwk, Request};

/// How long a session lives between `auth` and the last resource.
const SESSION_LIFETIME: Duration = Duration::from_secs(300);
const COOKIE: &str = "kbs-session-id";

/// What the broker compares evidence with.
#[derive(Debug, Clone, Default)]
pub struct Reference {
    /// sha256 PCR values by index.
    pub pcrs: Vec<(u32, Vec<u8>)>,
    /// When not empty, the only attestation keys allowed to sign vTPM quotes, as (x, y): a
    /// restriction on top of the endorsement, never a proof by itself.
    pub attestation_keys: Vec<(Vec<u8>, Vec<u8>)>,
    /// CA certificates (DER) that vTPM endorsement key certificates must chain to, up to a
    /// self-signed one among them (`kbs-serve --ek-ca`). None: no vTPM evidence is admitted.
    pub ek_cas: Vec<Vec<u8>>,
    /// SEV-SNP launch digests allowed (the reference JSON's `snp_measurements`).
    pub snp_measurements: Vec<Vec<u8>>,
    /// ARK/ASK pairs trusted beside AMD's built-in roots (`kbs-serve --snp-chain`).
    pub snp_chains: Vec<crate::snp::TrustedChain>,
    /// TDX MRTDs allowed (the firmware; the reference JSON's `tdx_mrtds`).
    pub tdx_mrtds: Vec<Vec<u8>>,
    /// TDX RTMRs that must have exactly these values (`tdx_rtmrs`: at least RTMR 1, the
    /// kernel and initrd the firmware measured).
    pub tdx_rtmrs: Vec<(usize, Vec<u8>)>,
    /// RTMR 2 extended from zero with only cvm-init's events up to the key release
    /// (`tdx_init_rtmr2`, from `predict --at key-release`).
    pub tdx_init_rtmr2: Option<Vec<u8>>,
    /// RTMR 2 as the boot left it for cvm-init (`tdx_rtmr2_before_init`: the load options and
    /// the initrd the kernel's EFI stub measured), checked on the CC event log's RTMR 2 events.
    pub tdx_rtmr2_before_init: Option<Vec<u8>>,
}

impl Reference {
    /// Reads the JSON `cvm-measure predict --json` prints (its `pcr` map, sha256 bank).
    pub fn from_prediction(json: &Value) -> Result<Reference, String> {
        let map = json
            .get("pcr")
            .and_then(Value::as_object)
            .ok_or("no \"pcr\" object in the reference values")?;
        let mut pcrs = Vec::new();
        for (index, banks) in map {
            let index: u32 = index
                .parse()
                .map_err(|_| format!("PCR index {index:?} is not a number"))?;
            let hex = banks
                .get("sha256")
                .and_then(Value::as_str)
                .ok_or(format!("PCR {index} has no sha256 value"))?;
            pcrs.push((
                index,
                crate::verity::parse_hex(hex).ok_or(format!("PCR {index}: bad hex"))?,
            ));
        }
        pcrs.sort();
        let mut snp_measurements = Vec::new();
        for m in json
            .get("snp_measurements")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let hex = m.as_str().ok_or("snp_measurements holds a non-string")?;
            snp_measurements.push(
                crate::verity::parse_hex(hex)
                    .filter(|d| d.len() == 48)
                    .ok_or(format!("snp measurement {hex:?} is not 96 hex digits"))?,
            );
        }
        let digest48 = |name: &str, v: &Value| -> Result<Vec<u8>, String> {
            v.as_str()
                .and_then(crate::verity::parse_hex)
                .filter(|d| d.len() == 48)
                .ok_or(format!("{name}: expected 96 hex digits"))
        };
        let mut tdx_mrtds = Vec::new();
        for m in json
            .get("tdx_mrtds")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            tdx_mrtds.push(digest48("tdx_mrtds", m)?);
        }
        let mut tdx_rtmrs = Vec::new();
        for (index, value) in json
            .get("tdx_rtmrs")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let i: usize = index
                .parse()
                .ok()
                .filter(|i| *i < 4)
                .ok_or(format!("tdx_rtmrs: {index:?} is not 0 to 3"))?;
            tdx_rtmrs.push((i, digest48("tdx_rtmrs", value)?));
        }
        let optional = |name: &str| json.get(name).map(|v| digest48(name, v)).transpose();
        let tdx_init_rtmr2 = optional("tdx_init_rtmr2")?;
        let tdx_rtmr2_before_init = optional("tdx_rtmr2_before_init")?;
        Ok(Reference {
            pcrs,
            attestation_keys: Vec::new(),
            ek_cas: Vec::new(),
            snp_measurements,
            snp_chains: Vec::new(),
            tdx_mrtds,
            tdx_rtmrs,
            tdx_init_rtmr2,
            tdx_rtmr2_before_init,
        })
    }
}

struct Session {
    tee: String,
    nonce: String,
    hash: String,
    created: Instant,
    /// Set once the evidence verified: the key resources are encrypted to.
    tee_pubkey: Option<Jwk>,
    /// The nonce is spent by the first `attest`, whatever its outcome.
    spent: bool,
    /// For `tpm`: the credential made at `auth` to the node's EK, or why there is none.
    tpm: Option<Result<TpmCredential, String>>,
}

/// What a `tpm` session's quote is checked against.
#[derive(Clone)]
struct TpmCredential {
    ak: crate::tpm_credential::AkPublic,
    secret: zeroize::Zeroizing<Vec<u8>>,
}

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

/// The broker's state.
pub struct Broker {
    pub resources: PathBuf,
    reference: Mutex<Reference>,
    sessions: Mutex<HashMap<String, Session>>,
}

/// An HTTP answer.
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

fn problem(status: u16, name: &str, detail: String) -> Answer {
    let body = json!({
        "type": format!("https://github.com/confidential-containers/kbs/errors/{name}"),
        "detail": detail,
    });
    Answer {
        status,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.to_string().into_bytes(),
    }
}

fn ok_json(body: Value, headers: Vec<(String, String)>) -> Answer {
    let mut headers = headers;
    headers.push(("Content-Type".into(), "application/json".into()));
    Answer {
        status: 200,
        headers,
        body: body.to_string().into_bytes(),
    }
}

fn random_id() -> String {
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    crate::hex(&bytes)
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

/// The sha256 PCR values the logs replay to: the firmware's TCG log, then cvm-init's.
fn replay_logs(firmware: Option<&[u8]>, own: &[u8]) -> Result<crate::registers::Registers, String> {
    let mut registers = match firmware {
        Some(log) => crate::tcglog::parse(log)
            .and_then(|l| l.replay_tpm())
            .map_err(|e| format!("eventlog: {e}"))?,
        None => crate::registers::Registers::default(),
    };
    let records = crate::jsonseq::parse(own).map_err(|e| format!("cvm_measure_log: {e}"))?;
    for record in &records {
        for (bank, digest) in &record.digests {
            if *bank == crate::registers::Bank::Sha256
                && (record.pcr as usize) < crate::registers::PCRS
            {
                registers.extend_pcr(*bank, record.pcr as usize, digest);
            }
        }
    }
    Ok(registers)
}

impl Broker {
    pub fn new(resources: PathBuf, reference: Reference) -> Broker {
        Broker {
            resources,
            reference: Mutex::new(reference),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Registers a node's attestation key (an operator admitting a new node).
    pub fn allow_attestation_key(&self, x: Vec<u8>, y: Vec<u8>) {
        self.reference.lock().unwrap().attestation_keys.push((x, y));
    }

    /// Adds a launch digest to the SNP reference values (an operator loading a new image's).
    pub fn allow_snp_measurement(&self, measurement: Vec<u8>) {
        self.reference
            .lock()
            .unwrap()
            .snp_measurements
            .push(measurement);
    }

    /// Answers one request.
    pub fn handle(&self, request: &Message) -> Answer {
        let mut parts = request.start.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        self.sessions
            .lock()
            .unwrap()
            .retain(|_, s| s.created.elapsed() < SESSION_LIFETIME);
        match (method, path) {
            ("POST", "/kbs/v0/auth") => self.auth(request),
            ("POST", "/kbs/v0/attest") => self.attest(request),
            ("GET", p) if p.starts_with("/kbs/v0/resource/") => {
                self.resource(request, &p["/kbs/v0/resource/".len()..])
            }
            _ => problem(404, "NotFound", format!("no endpoint {method} {path}")),
        }
    }

    fn auth(&self, request: &Message) -> Answer {
        let parsed: Request = match serde_json::from_slice(&request.body) {
            Ok(r) => r,
            Err(e) => return problem(400, "InvalidRequest", format!("auth request: {e}")),
        };
        if parsed.version != kbs::PROTOCOL_VERSION {
            return problem(
                400,
                "ProtocolVersion",
                format!(
                    "protocol version {:?}, expected {}",
                    parsed.version,
                    kbs::PROTOCOL_VERSION
                ),
            );
        }
        if !["tpm", "snp", "tdx"].contains(&parsed.tee.as_str()) {
            return problem(
                400,
                "UnsupportedTee",
                format!(
                    "tee {:?}: this broker verifies tpm, snp and tdx evidence",
                    parsed.tee
                ),
            );
        }
        let id = random_id();
        let nonce = kbs::new_nonce();
        let mut extra_params = json!({ "selected-hash-algorithm": "sha384" });
        // vTPM: a credential to the node's EK, bound to its attestation key; the quote at
        // `attest` must carry the secret only that TPM recovers. Refusals wait for `attest`.
        let tpm_credential = match (parsed.tee.as_str(), parsed.extra_params.get("tpm")) {
            ("tpm", Some(endorsement)) => {
                let made = self.make_credential(endorsement);
                if let Ok((_, blob)) = &made {
                    extra_params["tpm-credential"] = blob.clone();
                }
                Some(made.map(|(credential, _)| credential))
            }
            _ => None,
        };
        let challenge = Challenge {
            nonce: nonce.clone(),
            extra_params,
        };
        self.sessions.lock().unwrap().insert(
            id.clone(),
            Session {
                tee: parsed.tee.clone(),
                nonce,
                hash: "sha384".into(),
                created: Instant::now(),
                tee_pubkey: None,
                spent: false,
                tpm: tpm_credential,
            },
        );
        ok_json(
            serde_json::to_value(challenge).expect("serializable"),
            vec![(
                "Set-Cookie".into(),
                format!("{COOKIE}={id}; Path=/kbs/v0; HttpOnly"),
            )],
        )
    }

    fn attest(&self, request: &Message) -> Answer {
        let Some(id) = request.cookie(COOKIE) else {
            return problem(
                401,
                "UnAuthenticated",
                "no session cookie: auth first".into(),
            );
        };
        let (tee, nonce, hash, tpm) = {
            let mut sessions = self.sessions.lock().unwrap();
            let Some(session) = sessions.get_mut(id) else {
                return problem(401, "UnAuthenticated", "unknown or expired session".into());
            };
            if session.spent {
                return problem(
                    401,
                    "AttestationError",
                    "this session's nonce was already used: auth again".into(),
                );
            }
            session.spent = true;
            (
                session.tee.clone(),
                session.nonce.clone(),
                session.hash.clone(),
                session.tpm.clone(),
            )
        };
        let attestation: Attestation = match serde_json::from_slice(&request.body) {
            Ok(a) => a,
            Err(e) => return problem(400, "InvalidRequest", format!("attest request: {e}")),
        };
        if attestation.runtime_data.nonce != nonce {
            return problem(
                401,
                "AttestationError",
                "the runtime data carries another session's nonce (replayed evidence)".into(),
            );
        }
        if let Err(e) = attestation.runtime_data.tee_pubkey.public_key() {
            return problem(400, "InvalidRequest", e.to_string());
        }
        let binding = match kbs::report_data(
            &attestation.runtime_data,
            &attestation.tee_evidence.additional_evidence,
            &hash,
        ) {
            Ok(b) => b,
            Err(e) => return problem(400, "InvalidRequest", e.to_string()),
        };
        let evidence = &attestation.tee_evidence.primary_evidence;
        let verdict = match tee.as_str() {
            "snp" => self.verify_snp(evidence, &binding),
            "tdx" => self.verify_tdx(evidence, &binding),
            _ => self.verify_tpm(evidence, &binding, tpm.as_ref()),
        };
        if let Err(why) = verdict {
            return problem(401, "AttestationError", why);
        }
        if let Some(session) = self.sessions.lock().unwrap().get_mut(id) {
            session.tee_pubkey = Some(attestation.runtime_data.tee_pubkey.clone());
        }
        ok_json(json!({ "token": random_id() }), Vec::new())
    }

    /// Checks a node's endorsement (`TpmEndorsement`): its EK certificate chains to a
    /// configured EK CA and its attestation key is a restricted signing key of a TPM; then makes
    /// a credential to the EK bound to the key's name. Returns the session's side and the
    /// challenge's `tpm-credential` (base64 TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
    /// buffers).
    fn make_credential(&self, endorsement: &Value) -> Result<(TpmCredential, Value), String> {
        use crate::tpm_credential as tc;
        let endorsement: TpmEndorsement = serde_json::from_value(endorsement.clone())
            .map_err(|e| format!("auth extra-params tpm: {e}"))?;
        let decode = |name: &str, v: &str| {
            STANDARD
                .decode(v)
                .map_err(|_| format!("auth extra-params tpm.{name} is not base64"))
        };
        let ak = tc::parse_ak_public(&decode("ak_public", &endorsement.ak_public)?)
            .map_err(|e| e.to_string())?;
        let cas = self.reference.lock().unwrap().ek_cas.clone();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let ek = tc::certified_ek(&decode("ek_cert", &endorsement.ek_cert)?, &cas, now)
            .map_err(|e| e.to_string())?;
        let mut secret = zeroize::Zeroizing::new(vec![0u8; tc::SECRET_LEN]);
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
        let credential = tc::make_credential(&ek, &ak.name, &secret).map_err(|e| e.to_string())?;
        Ok((
            TpmCredential { ak, secret },
            json!({
                "credential_blob": STANDARD.encode(&credential.id_object),
                "encrypted_secret": STANDARD.encode(&credential.encrypted_secret),
            }),
        ))
    }

    fn verify_tpm(
        &self,
        evidence: &Value,
        binding: &[u8; 64],
        credential: Option<&Result<TpmCredential, String>>,
    ) -> Result<(), String> {
        let credential = match credential {
            Some(Ok(c)) => c,
            Some(Err(why)) => return Err(format!("vTPM attestation key not admitted: {why}")),
            None => return Err("vTPM attestation key not admitted: the node sent no endorsement (EK certificate and attestation key) at auth".into()),
        };
        let evidence: TpmEvidence =
            serde_json::from_value(evidence.clone()).map_err(|e| format!("tpm evidence: {e}"))?;
        let b64url = |name: &str, v: &str| {
            URL_SAFE_NO_PAD
                .decode(v)
                .map_err(|_| format!("{name} is not base64url"))
        };
        let b64 = |name: &str, v: &str| {
            STANDARD
                .decode(v)
                .map_err(|_| format!("{name} is not base64"))
        };
        let (x, y) = (
            b64url("ak_x", &evidence.ak_x)?,
            b64url("ak_y", &evidence.ak_y)?,
        );
        if (x.as_slice(), y.as_slice()) != (credential.ak.x.as_slice(), credential.ak.y.as_slice())
        {
            return Err(format!(
                "vTPM attestation key not admitted: the quote's key {}{} is not the one the credential was made for",
                crate::hex(&x),
                crate::hex(&y)
            ));
        }
        let reference = self.reference.lock().unwrap().clone();
        if !reference.attestation_keys.is_empty()
            && !reference
                .attestation_keys
                .iter()
                .any(|(ax, ay)| *ax == x && *ay == y)
        {
            return Err(format!(
                "the quote's attestation key {}{} is not one this broker trusts",
                crate::hex(&x),
                crate::hex(&y)
            ));
        }
        let pcrs: Vec<u32> = reference.pcrs.iter().map(|(i, _)| *i).collect();
        let values: Vec<Vec<u8>> = reference.pcrs.iter().map(|(_, v)| v.clone()).collect();
        let attest = b64("attest", &evidence.attest)?;
        let qualifying = crate::tpm_credential::qualifying_data(binding, &credential.secret);
        let verdict = crate::tpm_quote::verify(
            &attest,
            &b64("signature_r", &evidence.signature_r)?,
            &b64("signature_s", &evidence.signature_s)?,
            (&x, &y),
            &qualifying,
            &pcrs,
            &values,
        );
        if let Err(crate::tpm_quote::QuoteError::Binding) = verdict {
            return Err("vTPM attestation key not admitted: the quote does not carry the activated credential (the key is not in the TPM of the certified EK, or the quote is replayed)".into());
        }
        let Some(own_log) = &evidence.cvm_measure_log else {
            return verdict
                .map(|_| ())
                .map_err(|e| format!("vTPM quote refused: {e}"));
        };
        // With the logs: they must replay to the quoted PCRs (a log that does not is refused
        // even when the quote matches), and a mismatch is named PCR by PCR.
        let firmware_log = match &evidence.eventlog {
            Some(l) => Some(b64("eventlog", l)?),
            None => None,
        };
        let replayed = replay_logs(firmware_log.as_deref(), &b64("cvm_measure_log", own_log)?)?;
        let quoted = match crate::tpm_quote::parse_attest(&attest) {
            Ok(q) => q,
            Err(e) => return Err(format!("vTPM quote refused: {e}")),
        };
        let mut digest = sha2::Sha256::new();
        for &p in &quoted.pcrs {
            digest.update(replayed.pcr(crate::registers::Bank::Sha256, p as usize));
        }
        let consistent = digest.finalize().as_slice() == quoted.pcr_digest;
        match verdict {
            Ok(_) if consistent => Ok(()),
            Ok(_) => Err("the event logs do not replay to the quoted PCRs".into()),
            Err(crate::tpm_quote::QuoteError::PcrDigest) if consistent => {
                let differing: Vec<String> = reference
                    .pcrs
                    .iter()
                    .filter(|(p, v)| {
                        replayed.pcr(crate::registers::Bank::Sha256, *p as usize) != v.as_slice()
                    })
                    .map(|(p, v)| {
                        format!(
                            "PCR {p} is {}, the reference is {}",
                            crate::hex(replayed.pcr(crate::registers::Bank::Sha256, *p as usize)),
                            crate::hex(v)
                        )
                    })
                    .collect();
                Err(format!("vTPM quote refused: the quoted PCR digest does not match the reference values ({})", differing.join("; ")))
            }
            Err(e) => Err(format!("vTPM quote refused: {e}")),
        }
    }

    /// `snp` evidence in Trustee's shape (`snp::trustee_evidence`): the VCEK or VLEK from its
    /// certificate table must chain to AMD's roots (or a configured chain), the report verify
    /// with it and carry an allowed launch digest, VMPL 0, no debugging, and this session's
    /// binding. This broker is offline: evidence without its endorsement certificate is refused
    /// (Trustee would fetch it from AMD's key server).
    pub fn verify_snp(&self, evidence: &Value, binding: &[u8; 64]) -> Result<(), String> {
        use crate::snp::{self, CertType};
        let (report, certs) = snp::from_trustee_evidence(evidence).map_err(|e| e.to_string())?;
        let (wanted, name) = match report.signing_key() {
            0 => (CertType::VCEK, "VCEK"),
            1 => (CertType::VLEK, "VLEK"),
            other => {
                return Err(format!(
                    "the report is signed by key {other}, expected a VCEK (0) or a VLEK (1)"
                ))
            }
        };
        let der = certs.iter().find(|c| c.cert_type == wanted).ok_or(format!(
            "the evidence carries no {name} certificate (this broker does not fetch one)"
        ))?;
        let endorsement = snp::certificate(&der.data).map_err(|e| e.to_string())?;
        let reference = self.reference.lock().unwrap().clone();
        let product = snp::verify_chain_with(&endorsement, &reference.snp_chains)
            .map_err(|e| e.to_string())?;
        report
            .verify_signature(&endorsement)
            .map_err(|e| format!("{e} ({product} chain)"))?;
        let expected = snp::Expectations {
            measurements: reference.snp_measurements,
            report_data: binding.to_vec(),
        };
        snp::appraise(&report, &expected).map_err(|why| format!("SNP report refused: {why}"))
    }

    /// `tdx` evidence in Trustee's shape (`quote`, `cc_eventlog`, both base64) plus cvm-init's
    /// own measurement log (`cvm_measure_log`, base64 of the JSON-seq log): the quote's
    /// signature up to the Intel root (collateral checks are not done: see
    /// `SignatureChecked::NOT_CHECKED`), no debugging, this session's binding, an allowed MRTD,
    /// the reference RTMRs, the CC event log and then cvm-init's log replaying to all four
    /// RTMRs, and cvm-init's own events being this image's (`tdx_init_rtmr2`).
    pub fn verify_tdx(&self, evidence: &Value, binding: &[u8; 64]) -> Result<(), String> {
        use crate::tdx::Quote;
        #[derive(Deserialize)]
        struct TdxEvidence {
            quote: String,
            cc_eventlog: Option<String>,
            cvm_measure_log: Option<String>,
        }
        let evidence: TdxEvidence =
            serde_json::from_value(evidence.clone()).map_err(|e| format!("tdx evidence: {e}"))?;
        let decode = |name: &str, v: &str| {
            STANDARD
                .decode(v)
                .map_err(|_| format!("{name} is not base64"))
        };
        let quote = Quote::parse(&decode("quote", &evidence.quote)?).map_err(|e| e.to_string())?;
        quote.verify_signature().map_err(|e| e.to_string())?;
        if quote.td.debug() {
            return Err("the TD is debuggable (its memory is readable by the host)".into());
        }
        if quote.td.report_data != *binding {
            return Err(
                "the quote's report data is not this session's binding (replayed evidence)".into(),
            );
        }
        let reference = self.reference.lock().unwrap().clone();
        if reference.tdx_mrtds.is_empty() || !reference.tdx_rtmrs.iter().any(|(i, _)| *i == 1) {
            return Err(
                "this broker has no TDX reference values (tdx_mrtds and tdx_rtmrs with RTMR 1)"
                    .into(),
            );
        }
        if !reference.tdx_mrtds.iter().any(|m| m[..] == quote.td.mrtd) {
            return Err(format!(
                "MRTD {} is not one of the {} allowed",
                crate::hex(&quote.td.mrtd),
                reference.tdx_mrtds.len()
            ));
        }
        for (i, value) in &reference.tdx_rtmrs {
            if value[..] != quote.td.rtmr[*i] {
                return Err(format!(
                    "RTMR {i} is {}, the reference is {}",
                    crate::hex(&quote.td.rtmr[*i]),
                    crate::hex(value)
                ));
            }
        }
        let (Some(ccel), Some(init_log)) = (&evidence.cc_eventlog, &evidence.cvm_measure_log)
        else {
            return Err("the evidence lacks the CC event log or cvm-init's measurement log".into());
        };
        let ccel = crate::tcglog::parse(&decode("cc_eventlog", ccel)?)
            .map_err(|e| format!("cc_eventlog: {e}"))?;
        let mut replayed = ccel
            .replay_ccel()
            .map_err(|e| format!("cc_eventlog: {e}"))?;
        if let Some(expected) = &reference.tdx_rtmr2_before_init {
            if replayed.rtmr[2][..] != expected[..] {
                return Err(format!(
                    "the boot's RTMR 2 events (load options and initrd) replay to {}, the reference is {}",
                    crate::hex(&replayed.rtmr[2]),
                    crate::hex(expected)
                ));
            }
        }
        let records = crate::jsonseq::parse(&decode("cvm_measure_log", init_log)?)
            .map_err(|e| format!("cvm_measure_log: {e}"))?;
        let init_only = crate::jsonseq::replay(&records);
        for record in &records {
            for (bank, digest) in &record.digests {
                if *bank == crate::registers::Bank::Sha384 {
                    if let Some(rtmr) = crate::registers::rtmr_for_pcr(record.pcr) {
                        replayed.extend_rtmr(rtmr, digest);
                    }
                }
            }
        }
        for i in 0..4 {
            if replayed.rtmr[i][..] != quote.td.rtmr[i] {
                return Err(format!(
                    "the event logs do not replay to the quote's RTMR {i}"
                ));
            }
        }
        match &reference.tdx_init_rtmr2 {
            Some(expected) if *expected == init_only.rtmr[2] => Ok(()),
            Some(_) => {
                Err("cvm-init's measurements are not this image's (tdx_init_rtmr2 differs)".into())
            }
            None => Err("this broker has no tdx_init_rtmr2 reference value".into()),
        }
    }

    fn resource(&self, request: &Message, path: &str) -> Answer {
        let key = {
            let sessions = self.sessions.lock().unwrap();
            let session = request.cookie(COOKIE).and_then(|id| sessions.get(id));
            match session.and_then(|s| s.tee_pubkey.clone()) {
                Some(k) => k,
                None => {
                    return problem(
                        401,
                        "UnAuthenticated",
                        "no attested session: auth and attest first".into(),
                    )
                }
            }
        };
        let parts: Vec<&str> = path.split('/').collect();
        let valid = parts.len() == 3
            && parts.iter().all(|p| {
                !p.is_empty()
                    && !p.starts_with('.')
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            });
        if !valid {
            return problem(
                400,
                "InvalidRequest",
                format!("resource path {path:?}: expected <repository>/<type>/<tag>"),
            );
        }
        let file: PathBuf = parts.iter().fold(self.resources.clone(), |p, c| p.join(c));
        let Ok(plaintext) = std::fs::read(&file) else {
            return problem(404, "ResourceNotFound", format!("no resource {path}"));
        };
        let recipient = key.public_key().expect("checked at attest");
        let jwe = kbs::jwe_encrypt(&recipient, &plaintext);
        ok_json(serde_json::to_value(jwe).expect("serializable"), Vec::new())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Error",
    }
}

fn serve_one(broker: &Broker, stream: TcpStream, tls: Option<&Arc<rustls::ServerConfig>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    match tls {
        None => answer_one(broker, stream),
        Some(config) => {
            let mut tls = match rustls::ServerConnection::new(config.clone()) {
                Ok(connection) => rustls::StreamOwned::new(connection, stream),
                Err(e) => return eprintln!("kbs-serve: TLS: {e}"),
            };
            // A client that does not complete the handshake gets nothing, not an error page.
            while tls.conn.is_handshaking() {
                if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                    return eprintln!("kbs-serve: TLS handshake: {e}");
                }
            }
            answer_one(broker, tls)
        }
    }
}

fn answer_one(broker: &Broker, mut stream: impl std::io::Read + Write) {
    let answer = match read_message(&mut stream) {
        Ok(request) => broker.handle(&request),
        Err(e) => problem(400, "InvalidRequest", e.to_string()),
    };
    let headers: Vec<(&str, &str)> = answer
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let _ = write_message(
        &mut stream,
        &format!("HTTP/1.1 {} {}", answer.status, reason(answer.status)),
        &headers,
        &answer.body,
    );
    let _ = stream.flush();
}

/// Serves until the listener fails; one thread per connection.
pub fn serve(listener: TcpListener, broker: Arc<Broker>) {
    serve_with(listener, broker, None)
}

/// The same; over TLS with `tls`.
pub fn serve_with(
    listener: TcpListener,
    broker: Arc<Broker>,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    for stream in listener.incoming().flatten() {
        let broker = broker.clone();
        let tls = tls.clone();
        std::thread::spawn(move || serve_one(&broker, stream, tls.as_ref()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn broker(snp_measurements: Vec<Vec<u8>>) -> Broker {
        Broker::new(
            PathBuf::from("/nonexistent"),
            Reference {
                snp_measurements,
                ..Default::default()
            },
        )
    }

    fn evidence_of(raw: &[u8]) -> Value {
        let vcek = crate::snp::CertTableEntry {
            cert_type: crate::snp::CertType::VCEK,
            data: crate::testdata::read("snp/gsg_vcek.der"),
        };
        crate::snp::trustee_evidence(&crate::snp::Report::parse(raw).unwrap(), Some(vec![vcek]))
            .unwrap()
    }

    fn real_evidence() -> Value {
        evidence_of(&crate::testdata::read("snp/gsg_attestation.bin"))
    }

    #[test]
    fn real_snp_evidence_is_verified_and_appraised() {
        let report =
            crate::snp::Report::parse(&crate::testdata::read("snp/gsg_attestation.bin")).unwrap();
        // Signature and chain pass; this real report allows debugging, which is refused.
        let allowed = broker(vec![report.measurement().to_vec()]);
        let mut binding = [0u8; 64];
        binding.copy_from_slice(report.report_data());
        let why = allowed.verify_snp(&real_evidence(), &binding).unwrap_err();
        assert!(why.contains("allows debugging"), "{why}");
        // Another image's digest.
        let why = broker(vec![vec![0; 48]])
            .verify_snp(&real_evidence(), &binding)
            .unwrap_err();
        assert!(why.contains("launch digest"), "{why}");
        // A changed byte in the signed part.
        let mut raw = crate::testdata::read("snp/gsg_attestation.bin");
        raw[0x95] ^= 1;
        let why = allowed
            .verify_snp(&evidence_of(&raw), &binding)
            .unwrap_err();
        assert!(why.contains("does not verify"), "{why}");
        // No certificate.
        let mut bare = real_evidence();
        bare["cert_chain"] = Value::Null;
        let why = allowed.verify_snp(&bare, &binding).unwrap_err();
        assert!(why.contains("no VCEK certificate"), "{why}");
    }

    /// A real TDX quote with its CC event log; the binding is the quote's own report data.
    fn tdx_case() -> (Broker, Value, [u8; 64]) {
        let raw = crate::testdata::read("tdx/gtg_cos-113-tdx-quote.dat");
        let quote = crate::tdx::Quote::parse(&raw).unwrap();
        let broker = Broker::new(
            PathBuf::from("/nonexistent"),
            Reference {
                tdx_mrtds: vec![quote.td.mrtd.to_vec()],
                tdx_rtmrs: vec![(1, quote.td.rtmr[1].to_vec())],
                tdx_init_rtmr2: Some(vec![0; 48]),
                ..Default::default()
            },
        );
        let evidence = json!({
            "quote": STANDARD.encode(&raw),
            "cc_eventlog": STANDARD.encode(crate::testdata::read("tdx/gtg_ccel_data.dat")),
            "cvm_measure_log": "",
        });
        (broker, evidence, quote.td.report_data)
    }

    #[test]
    fn real_tdx_evidence_is_verified_and_appraised() {
        let (broker, evidence, binding) = tdx_case();
        broker.verify_tdx(&evidence, &binding).unwrap();
        let refused = |broker: &Broker, evidence: &Value, binding: &[u8; 64], why: &str| {
            let got = broker.verify_tdx(evidence, binding).unwrap_err();
            assert!(got.contains(why), "{got}");
        };
        refused(&broker, &evidence, &[0x5a; 64], "replayed");
        // Another firmware, another kernel.
        let (other, _, _) = tdx_case();
        other.reference.lock().unwrap().tdx_mrtds = vec![vec![1; 48]];
        refused(&other, &evidence, &binding, "MRTD");
        let (other, _, _) = tdx_case();
        other.reference.lock().unwrap().tdx_rtmrs = vec![(1, vec![1; 48])];
        refused(&other, &evidence, &binding, "RTMR 1 is");
        // The boot's RTMR 2 part (this real log holds no cvm-init events, so it is the whole of
        // the quote's RTMR 2): the reference value passes, another is refused.
        let (other, _, _) = tdx_case();
        let rtmr2 =
            crate::tdx::Quote::parse(&crate::testdata::read("tdx/gtg_cos-113-tdx-quote.dat"))
                .unwrap()
                .td
                .rtmr[2];
        other.reference.lock().unwrap().tdx_rtmr2_before_init = Some(rtmr2.to_vec());
        other.verify_tdx(&evidence, &binding).unwrap();
        other.reference.lock().unwrap().tdx_rtmr2_before_init = Some(vec![2; 48]);
        refused(&other, &evidence, &binding, "the boot's RTMR 2 events");
        // cvm-init's events are not this image's.
        let (other, _, _) = tdx_case();
        other.reference.lock().unwrap().tdx_init_rtmr2 = Some(vec![1; 48]);
        refused(&other, &evidence, &binding, "not this image's");
        // A log that does not replay to the quote: one more event, or a changed digest.
        let mut extra = evidence.clone();
        let record = crate::jsonseq::record(&crate::event::Event::Phase(
            crate::event::Phase::EnterInitrd,
        ));
        extra["cvm_measure_log"] = STANDARD.encode(record).into();
        refused(&broker, &extra, &binding, "do not replay");
        let mut ccel = crate::testdata::read("tdx/gtg_ccel_data.dat");
        let log = crate::tcglog::parse(&ccel).unwrap();
        let first = log.replay_ccel().unwrap();
        // Flip bytes until the replay changes (a digest byte), keeping the log parseable.
        let changed = (100..ccel.len()).find(|&at| {
            ccel[at] ^= 1;
            let replays_otherwise = crate::tcglog::parse(&ccel)
                .ok()
                .and_then(|l| l.replay_ccel().ok())
                .is_some_and(|r| r.rtmr != first.rtmr);
            if !replays_otherwise {
                ccel[at] ^= 1;
            }
            replays_otherwise
        });
        assert!(changed.is_some());
        let mut altered = evidence.clone();
        altered["cc_eventlog"] = STANDARD.encode(&ccel).into();
        refused(&broker, &altered, &binding, "do not replay");
        let mut missing = evidence.clone();
        missing["cc_eventlog"] = Value::Null;
        refused(&broker, &missing, &binding, "lacks the CC event log");
        // No reference values at all: refused, not waved through.
        refused(
            &self::broker(Vec::new()),
            &evidence,
            &binding,
            "no TDX reference values",
        );
    }

    proptest::proptest! {
        /// Whatever arrives (any path, cookie and body, also after a real `auth`), the broker
        /// answers with a refusal and never panics or releases anything.
        #[test]
        fn arbitrary_requests_are_refused_without_panics(
            method in proptest::sample::select(vec!["GET", "POST", "PUT", "X"]),
            path in "(/kbs/v0/(auth|attest|resource/[a-z./]{0,12})|/[ -~]{0,20})",
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            json_body in proptest::option::of("\\{[ -~]{0,80}\\}"),
            with_session in proptest::prelude::any::<bool>(),
        ) {
            let b = broker(vec![vec![0; 48]]);
            let mut headers = Vec::new();
            if with_session {
                let auth = b.handle(&Message {
                    start: "POST /kbs/v0/auth HTTP/1.1".into(),
                    headers: Vec::new(),
                    body: br#"{"version":"0.4.0","tee":"snp","extra-params":{}}"#.to_vec(),
                });
                proptest::prop_assert_eq!(auth.status, 200);
                let cookie = auth.headers.iter().find(|(n, _)| n == "Set-Cookie").unwrap().1.clone();
                headers.push(("cookie".to_string(), cookie.split(';').next().unwrap().to_string()));
            }
            let answer = b.handle(&Message {
                start: format!("{method} {path} HTTP/1.1"),
                headers,
                body: json_body.map(String::into_bytes).unwrap_or(body),
            });
            let is_auth = method == "POST" && path == "/kbs/v0/auth";
            proptest::prop_assert!(answer.status >= 400 || is_auth, "{} for {method} {path}", answer.status);
        }
    }

    #[test]
    fn requests_that_are_not_the_protocol_are_refused() {
        let b = broker(Vec::new());
        for (start, body, status) in [
            ("POST /kbs/v0/auth HTTP/1.1", "{", 400),
            (
                "POST /kbs/v0/auth HTTP/1.1",
                r#"{"version":"0.1.1","tee":"tpm","extra-params":{}}"#,
                400,
            ),
            (
                "POST /kbs/v0/auth HTTP/1.1",
                r#"{"version":"0.4.0","tee":"sgx","extra-params":{}}"#,
                400,
            ),
            ("POST /kbs/v0/attest HTTP/1.1", "{}", 401),
            ("GET /kbs/v0/resource/a/b/c HTTP/1.1", "", 401),
            ("DELETE /kbs/v0/auth HTTP/1.1", "", 404),
        ] {
            let answer = b.handle(&Message {
                start: start.into(),
                headers: Vec::new(),
                body: body.as_bytes().to_vec(),
            });
            assert_eq!(answer.status, status, "{start} {body}");
        }
    }
}
