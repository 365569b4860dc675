//! The reference key broker (`cvm-measure kbs-serve`): the Trustee KBS protocol (0.4.0) over
//! HTTP, resources kept as files, released only to a session whose evidence verifies against
//! reference values (`cvm-measure predict --json`). Evidence kinds so far: `tpm` (a vTPM quote
//! over the reference PCRs by an attestation key shown to live beside a certified endorsement
//! key, `tpm::credential`, bound to the session's nonce and the node's ephemeral key), `snp`
//! and `tdx`. Several references may be loaded at once (`set`: a rolling upgrade's old and new
//! image); evidence is judged against each whole and released on the first that accepts it.

use std::collections::HashMap;
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::Digest;

pub mod log;
pub mod reference;
pub mod refusal;
pub mod set;

pub use refusal::Refusal;
pub use set::Named;

pub use cvm_formats::evidence::{TpmEndorsement, TpmEvidence};

use crate::snp::VerifyReport;
use crate::tdx::VerifyQuote;
use cvm_kbs::http::{read_message, write_message, Message};
use cvm_kbs::protocol::{self as kbs, Attestation, Challenge, Jwk, Request};

/// How long a session lives between `auth` and the last resource.
const SESSION_LIFETIME: Duration = Duration::from_secs(300);
const COOKIE: &str = "kbs-session-id";

/// What the broker holds for peers it does not know yet: every `auth` creates a session and
/// every connection a thread, so both are bounded in count and age; beyond the count a peer
/// gets 503 with a JSON error naming the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_sessions: usize,
    pub session_age: Duration,
    pub max_connections: usize,
    /// From accept to the answer written, however slowly the peer sends.
    pub connection_age: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_sessions: 4096,
            session_age: SESSION_LIFETIME,
            max_connections: 64,
            connection_age: Duration::from_secs(30),
        }
    }
}

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
    /// What an SNP guest's policy and TCB must satisfy (`snp_min_tcb`, `snp_policy_required`).
    pub snp_requirements: crate::snp::Requirements,
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
    /// TD attributes, XFAM and configuration registers (`tdx_td_attributes`, `tdx_xfam`,
    /// `tdx_mrconfigid`, `tdx_mrowner`, `tdx_mrownerconfig`).
    pub tdx_requirements: crate::tdx::TdRequirements,
    /// The quoting enclave and the roots a quote's chain may end in (Intel's by default;
    /// `tdx_qe_min_isvsvn`; extra roots for tests and offline stores).
    pub tdx_trust: crate::tdx::Trust,
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
                cvm_formats::verity::parse_hex(hex).ok_or(format!("PCR {index}: bad hex"))?,
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
                cvm_formats::verity::parse_hex(hex)
                    .filter(|d| d.len() == 48)
                    .ok_or(format!("snp measurement {hex:?} is not 96 hex digits"))?,
            );
        }
        let digest48 = |name: &str, v: &Value| -> Result<Vec<u8>, String> {
            v.as_str()
                .and_then(cvm_formats::verity::parse_hex)
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
        if pcrs.is_empty() && snp_measurements.is_empty() && tdx_mrtds.is_empty() {
            return Err("the reference values name no PCR (pcr), no SNP launch digest (snp_measurements) and no TDX MRTD (tdx_mrtds): such a reference would accept any evidence".into());
        }
        let snp_requirements = crate::broker::reference::snp_requirements(json)?;
        let (tdx_requirements, qe) = crate::broker::reference::tdx_requirements(json)?;
        if !snp_measurements.is_empty()
            && snp_requirements.min_tcb == crate::snp::MinimumTcb::Missing
        {
            return Err("snp_min_tcb: the reference allows SNP launch digests but names no minimum TCB (an object with bootloader, tee, snp and microcode, or \"waived\")".into());
        }
        Ok(Reference {
            pcrs,
            attestation_keys: Vec::new(),
            ek_cas: Vec::new(),
            snp_measurements,
            snp_requirements,
            snp_chains: Vec::new(),
            tdx_mrtds,
            tdx_rtmrs,
            tdx_init_rtmr2,
            tdx_rtmr2_before_init,
            tdx_requirements,
            tdx_trust: crate::tdx::Trust {
                extra_roots: Vec::new(),
                qe,
            },
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
    /// Set with `tee_pubkey`: the name of the reference the evidence matched.
    matched: Option<String>,
    /// The nonce is spent by the first `attest`, whatever its outcome.
    spent: bool,
    /// For `tpm`: the credential made at `auth` to the node's EK, or why there is none.
    tpm: Option<Result<TpmCredential, String>>,
}

/// What a `tpm` session's quote is checked against.
#[derive(Clone)]
struct TpmCredential {
    ak: crate::tpm::credential::AkPublic,
    secret: zeroize::Zeroizing<Vec<u8>>,
}

/// The broker's state.
pub struct Broker {
    pub resources: PathBuf,
    /// Replaced whole at a reload; `attest` judges against the set of its moment.
    references: Mutex<Arc<Vec<Named>>>,
    sessions: Mutex<HashMap<String, Session>>,
    limits: Limits,
    connections: AtomicUsize,
    log: crate::broker::log::Sink,
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
    cvm_formats::hex(&bytes)
}

/// The sha256 PCR values the logs replay to: the firmware's TCG log, then cvm-init's.
fn replay_logs(
    firmware: Option<&[u8]>,
    own: &[u8],
) -> Result<cvm_formats::registers::Registers, Refusal> {
    let mut registers = match firmware {
        Some(log) => crate::uefi::tcglog::parse(log)
            .and_then(|l| l.replay_tpm())
            .map_err(|e| Refusal::Log {
                log: "eventlog",
                why: e.to_string(),
            })?,
        None => cvm_formats::registers::Registers::default(),
    };
    let records = cvm_formats::jsonseq::parse(own).map_err(|e| Refusal::Log {
        log: "cvm_measure_log",
        why: e.to_string(),
    })?;
    for record in &records {
        for (bank, digest) in &record.digests {
            if *bank == cvm_formats::registers::Bank::Sha256
                && (record.pcr as usize) < cvm_formats::registers::PCRS
            {
                registers.extend_pcr(*bank, record.pcr as usize, digest);
            }
        }
    }
    Ok(registers)
}

impl Broker {
    pub fn new(resources: PathBuf, reference: Reference) -> Broker {
        Broker::with_references(resources, vec![Named::unnamed(reference)])
    }

    /// A broker releasing to a node whose evidence matches any one of `references` whole.
    pub fn with_references(resources: PathBuf, references: Vec<Named>) -> Broker {
        Broker {
            resources,
            references: Mutex::new(Arc::new(references)),
            sessions: Mutex::new(HashMap::new()),
            limits: Limits::default(),
            connections: AtomicUsize::new(0),
            log: crate::broker::log::stderr(),
        }
    }

    /// The same broker with other limits.
    pub fn with_limits(mut self, limits: Limits) -> Broker {
        self.limits = limits;
        self
    }

    /// The same broker logging its refusals to `sink` instead of stderr.
    pub fn with_log(mut self, sink: crate::broker::log::Sink) -> Broker {
        self.log = sink;
        self
    }

    /// Answers one request from `peer`, logging a refusal (any answer but 200) with what
    /// identifies the node: its address, its session, the evidence's values.
    pub fn handle_from(&self, request: &Message, peer: &str) -> Answer {
        let mut noted = Vec::new();
        let answer = self.answer(request, &mut noted);
        if answer.status != 200 {
            let detail = serde_json::from_slice::<Value>(&answer.body)
                .ok()
                .and_then(|b| b.get("detail").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_default();
            let status = answer.status.to_string();
            let session = request.cookie(COOKIE).unwrap_or("-").to_string();
            let mut fields: Vec<(&str, &str)> = vec![
                ("peer", peer),
                ("request", &request.start),
                ("session", &session),
                ("status", &status),
            ];
            fields.extend(noted.iter().map(|(n, v)| (*n, v.as_str())));
            fields.push(("reason", &detail));
            (self.log)(&crate::broker::log::refusal_line(&fields));
        } else if let Some(reference) = noted.iter().find(|(n, _)| *n == "reference") {
            // A grant: which reference the node matched, at `attest` and at each release.
            let session = request.cookie(COOKIE).unwrap_or("-").to_string();
            let released = noted.iter().find(|(n, _)| *n == "resource");
            let what = match released {
                Some((_, path)) => format!("released resource={path:?} to"),
                None => "attested".to_string(),
            };
            (self.log)(&crate::broker::log::grant_line(
                &what,
                &reference.1,
                &[("peer", peer), ("session", &session)],
            ));
        }
        answer
    }

    /// The references loaded now.
    pub fn references(&self) -> Arc<Vec<Named>> {
        self.references.lock().unwrap().clone()
    }

    /// Replaces the references whole (a reload); an empty set is ignored, so that the broker
    /// never serves with none.
    pub fn replace_references(&self, references: Vec<Named>) {
        if !references.is_empty() {
            *self.references.lock().unwrap() = Arc::new(references);
        }
    }

    /// Changes every loaded reference.
    fn edit(&self, change: impl Fn(&mut Reference)) {
        let mut set = self.references.lock().unwrap();
        for named in Arc::make_mut(&mut set) {
            change(&mut named.reference);
        }
    }

    /// Registers a node's attestation key in every reference (an operator admitting a new
    /// node), until the references are replaced.
    pub fn allow_attestation_key(&self, x: Vec<u8>, y: Vec<u8>) {
        self.edit(|r| r.attestation_keys.push((x.clone(), y.clone())));
    }

    /// Adds a launch digest to every reference's SNP values (an operator loading a new
    /// image's), until the references are replaced.
    pub fn allow_snp_measurement(&self, measurement: Vec<u8>) {
        self.edit(|r| r.snp_measurements.push(measurement.clone()));
    }

    /// The first reference `check` accepts (its name), else why each refused.
    fn judge(&self, check: impl Fn(&Reference) -> Result<(), Refusal>) -> Result<String, Refusal> {
        let set = self.references();
        let mut refusals = Vec::new();
        for named in set.iter() {
            match check(&named.reference) {
                Ok(()) => return Ok(named.name.clone()),
                Err(why) => refusals.push((named.name.clone(), why)),
            }
        }
        Err(Refusal::NoReferenceMatches(refusals))
    }

    /// Answers one request (from a peer whose address is not known).
    pub fn handle(&self, request: &Message) -> Answer {
        self.handle_from(request, "-")
    }

    fn answer(&self, request: &Message, noted: &mut Vec<(&'static str, String)>) -> Answer {
        let mut parts = request.start.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let age = self.limits.session_age;
        self.sessions
            .lock()
            .unwrap()
            .retain(|_, s| s.created.elapsed() < age);
        match (method, path) {
            ("POST", "/kbs/v0/auth") => self.auth(request),
            ("POST", "/kbs/v0/attest") => self.attest(request, noted),
            ("GET", p) if p.starts_with("/kbs/v0/resource/") => {
                self.resource(request, &p["/kbs/v0/resource/".len()..], noted)
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
        let mut sessions = self.sessions.lock().unwrap();
        if sessions.len() >= self.limits.max_sessions {
            return problem(
                503,
                "TooManySessions",
                format!(
                    "the broker holds its maximum of {} sessions (max_sessions; each lives {} s): retry later",
                    self.limits.max_sessions,
                    self.limits.session_age.as_secs()
                ),
            );
        }
        sessions.insert(
            id.clone(),
            Session {
                tee: parsed.tee.clone(),
                nonce,
                hash: "sha384".into(),
                created: Instant::now(),
                tee_pubkey: None,
                matched: None,
                spent: false,
                tpm: tpm_credential,
            },
        );
        drop(sessions);
        ok_json(
            serde_json::to_value(challenge).expect("serializable"),
            vec![(
                "Set-Cookie".into(),
                format!("{COOKIE}={id}; Path=/kbs/v0; HttpOnly"),
            )],
        )
    }

    fn attest(&self, request: &Message, noted: &mut Vec<(&'static str, String)>) -> Answer {
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
        noted.push(("tee", tee.clone()));
        noted.push(("evidence", evidence_identity(&tee, evidence)));
        let verdict = match tee.as_str() {
            "snp" => self.verify_snp(evidence, &binding),
            "tdx" => self.verify_tdx(evidence, &binding),
            _ => self.verify_tpm(evidence, &binding, tpm.as_ref()),
        };
        let matched = match verdict {
            Ok(name) => name,
            Err(why) => return problem(401, "AttestationError", why.to_string()),
        };
        noted.push(("reference", matched.clone()));
        if let Some(session) = self.sessions.lock().unwrap().get_mut(id) {
            session.tee_pubkey = Some(attestation.runtime_data.tee_pubkey.clone());
            session.matched = Some(matched);
        }
        ok_json(json!({ "token": random_id() }), Vec::new())
    }

    /// Checks a node's endorsement (`TpmEndorsement`): its EK certificate chains to a
    /// configured EK CA and its attestation key is a restricted signing key of a TPM; then makes
    /// a credential to the EK bound to the key's name. Returns the session's side and the
    /// challenge's `tpm-credential` (base64 TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET
    /// buffers).
    fn make_credential(&self, endorsement: &Value) -> Result<(TpmCredential, Value), String> {
        use crate::tpm::credential as tc;
        let endorsement: TpmEndorsement = serde_json::from_value(endorsement.clone())
            .map_err(|e| format!("auth extra-params tpm: {e}"))?;
        let decode = |name: &str, v: &str| {
            STANDARD
                .decode(v)
                .map_err(|_| format!("auth extra-params tpm.{name} is not base64"))
        };
        let ak = tc::parse_ak_public(&decode("ak_public", &endorsement.ak_public)?)
            .map_err(|e| e.to_string())?;
        // The EK CAs are the broker's (`--ek-ca`), the same in every reference.
        let mut cas: Vec<Vec<u8>> = Vec::new();
        for named in self.references().iter() {
            for ca in &named.reference.ek_cas {
                if !cas.contains(ca) {
                    cas.push(ca.clone());
                }
            }
        }
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

    /// `tpm` evidence against each loaded reference: the name of the first it matches.
    fn verify_tpm(
        &self,
        evidence: &Value,
        binding: &[u8; 64],
        credential: Option<&Result<TpmCredential, String>>,
    ) -> Result<String, Refusal> {
        self.judge(|reference| Self::tpm_against(reference, evidence, binding, credential))
    }

    fn tpm_against(
        reference: &Reference,
        evidence: &Value,
        binding: &[u8; 64],
        credential: Option<&Result<TpmCredential, String>>,
    ) -> Result<(), Refusal> {
        let credential = match credential {
            Some(Ok(c)) => c,
            Some(Err(why)) => return Err(Refusal::KeyNotAdmitted(why.clone())),
            None => {
                return Err(Refusal::KeyNotAdmitted(
                    "the node sent no endorsement (EK certificate and attestation key) at auth"
                        .into(),
                ))
            }
        };
        let evidence: TpmEvidence =
            serde_json::from_value(evidence.clone()).map_err(|source| Refusal::EvidenceShape {
                kind: "tpm",
                source,
            })?;
        let b64url = |name: &'static str, v: &str| {
            URL_SAFE_NO_PAD
                .decode(v)
                .map_err(|_| Refusal::NotBase64Url(name))
        };
        let b64 =
            |name: &'static str, v: &str| STANDARD.decode(v).map_err(|_| Refusal::NotBase64(name));
        let (x, y) = (
            b64url("ak_x", &evidence.ak_x)?,
            b64url("ak_y", &evidence.ak_y)?,
        );
        if (x.as_slice(), y.as_slice()) != (credential.ak.x.as_slice(), credential.ak.y.as_slice())
        {
            return Err(Refusal::KeyNotAdmitted(format!(
                "the quote's key {}{} is not the one the credential was made for",
                cvm_formats::hex(&x),
                cvm_formats::hex(&y)
            )));
        }
        if reference.pcrs.is_empty() {
            return Err(Refusal::NoPcrReference);
        }
        if !reference.attestation_keys.is_empty()
            && !reference
                .attestation_keys
                .iter()
                .any(|(ax, ay)| *ax == x && *ay == y)
        {
            return Err(Refusal::UntrustedKey(format!(
                "{}{}",
                cvm_formats::hex(&x),
                cvm_formats::hex(&y)
            )));
        }
        let pcrs: Vec<u32> = reference.pcrs.iter().map(|(i, _)| *i).collect();
        let values: Vec<Vec<u8>> = reference.pcrs.iter().map(|(_, v)| v.clone()).collect();
        let attest = b64("attest", &evidence.attest)?;
        let qualifying = crate::tpm::credential::qualifying_data(binding, &credential.secret);
        let verdict = crate::tpm::quote::verify(
            &attest,
            &b64("signature_r", &evidence.signature_r)?,
            &b64("signature_s", &evidence.signature_s)?,
            (&x, &y),
            &qualifying,
            &pcrs,
            &values,
        );
        if let Err(crate::tpm::quote::QuoteError::Binding) = verdict {
            return Err(Refusal::KeyNotAdmitted("the quote does not carry the activated credential (the key is not in the TPM of the certified EK, or the quote is replayed)".into()));
        }
        let Some(own_log) = &evidence.cvm_measure_log else {
            return verdict.map(|_| ()).map_err(Refusal::TpmQuote);
        };
        // With the logs: they must replay to the quoted PCRs (a log that does not is refused
        // even when the quote matches), and a mismatch is named PCR by PCR.
        let firmware_log = match &evidence.eventlog {
            Some(l) => Some(b64("eventlog", l)?),
            None => None,
        };
        let replayed = replay_logs(firmware_log.as_deref(), &b64("cvm_measure_log", own_log)?)?;
        let quoted = match crate::tpm::quote::parse_attest(&attest) {
            Ok(q) => q,
            Err(e) => return Err(Refusal::TpmQuote(e)),
        };
        let mut digest = sha2::Sha256::new();
        for &p in &quoted.pcrs {
            digest.update(replayed.pcr(cvm_formats::registers::Bank::Sha256, p as usize));
        }
        let consistent = digest.finalize().as_slice() == quoted.pcr_digest;
        match verdict {
            Ok(_) if consistent => Ok(()),
            Ok(_) => Err(Refusal::LogsDoNotReplayPcrs),
            Err(crate::tpm::quote::QuoteError::PcrDigest) if consistent => {
                let differing: Vec<String> = reference
                    .pcrs
                    .iter()
                    .filter(|(p, v)| {
                        replayed.pcr(cvm_formats::registers::Bank::Sha256, *p as usize)
                            != v.as_slice()
                    })
                    .map(|(p, v)| {
                        format!(
                            "PCR {p} is {}, the reference is {}",
                            cvm_formats::hex(
                                replayed.pcr(cvm_formats::registers::Bank::Sha256, *p as usize)
                            ),
                            cvm_formats::hex(v)
                        )
                    })
                    .collect();
                Err(Refusal::PcrsDiffer(differing.join("; ")))
            }
            Err(e) => Err(Refusal::TpmQuote(e)),
        }
    }

    /// `snp` evidence in Trustee's shape (`snp::trustee_evidence`): the VCEK or VLEK from its
    /// certificate table must chain to AMD's roots (or a configured chain), the report verify
    /// with it and carry an allowed launch digest, VMPL 0, no debugging, and this session's
    /// binding. This broker is offline: evidence without its endorsement certificate is refused
    /// (Trustee would fetch it from AMD's key server).
    /// `snp` evidence against each loaded reference: the name of the first it matches.
    pub fn verify_snp(&self, evidence: &Value, binding: &[u8; 64]) -> Result<String, Refusal> {
        self.judge(|reference| Self::snp_against(reference, evidence, binding))
    }

    fn snp_against(
        reference: &Reference,
        evidence: &Value,
        binding: &[u8; 64],
    ) -> Result<(), Refusal> {
        use crate::snp::{self, CertType};
        let (report, certs) = snp::from_trustee_evidence(evidence)?;
        let (wanted, name) = match report.signing_key() {
            0 => (CertType::VCEK, "VCEK"),
            1 => (CertType::VLEK, "VLEK"),
            other => return Err(Refusal::SigningKey(other)),
        };
        let der = certs
            .iter()
            .find(|c| c.cert_type == wanted)
            .ok_or(Refusal::NoEndorsement(name))?;
        let endorsement = snp::certificate(&der.data)?;
        let product = snp::verify_chain_with(&endorsement, &reference.snp_chains)?;
        report
            .verify_signature(&endorsement)
            .map_err(|source| Refusal::SnpSignature { source, product })?;
        let expected = snp::Expectations {
            measurements: reference.snp_measurements.clone(),
            report_data: binding.to_vec(),
            requirements: reference.snp_requirements.clone(),
        };
        snp::appraise(&report, product, &expected).map_err(Refusal::SnpAppraisal)
    }

    /// `tdx` evidence in Trustee's shape (`quote`, `cc_eventlog`, both base64) plus cvm-init's
    /// own measurement log (`cvm_measure_log`, base64 of the JSON-seq log): the quote's
    /// signature up to the Intel root (collateral checks are not done: see
    /// `SignatureChecked::NOT_CHECKED`), no debugging, this session's binding, an allowed MRTD,
    /// the reference RTMRs, the CC event log and then cvm-init's log replaying to all four
    /// RTMRs, and cvm-init's own events being this image's (`tdx_init_rtmr2`).
    pub fn verify_tdx(&self, evidence: &Value, binding: &[u8; 64]) -> Result<String, Refusal> {
        self.judge(|reference| Self::tdx_against(reference, evidence, binding))
    }

    fn tdx_against(
        reference: &Reference,
        evidence: &Value,
        binding: &[u8; 64],
    ) -> Result<(), Refusal> {
        use crate::tdx::Quote;
        #[derive(Deserialize)]
        struct TdxEvidence {
            quote: String,
            cc_eventlog: Option<String>,
            cvm_measure_log: Option<String>,
        }
        let evidence: TdxEvidence =
            serde_json::from_value(evidence.clone()).map_err(|source| Refusal::EvidenceShape {
                kind: "tdx",
                source,
            })?;
        let decode =
            |name: &'static str, v: &str| STANDARD.decode(v).map_err(|_| Refusal::NotBase64(name));
        let quote = Quote::parse(&decode("quote", &evidence.quote)?)?;
        quote.verify_signature_with(&reference.tdx_trust)?;
        if quote.td.debug() {
            return Err(Refusal::TdDebug);
        }
        crate::tdx::appraise_td(&quote.td, &reference.tdx_requirements)?;
        if quote.td.report_data != *binding {
            return Err(Refusal::Replayed);
        }
        if reference.tdx_mrtds.is_empty() || !reference.tdx_rtmrs.iter().any(|(i, _)| *i == 1) {
            return Err(Refusal::NoTdxReference);
        }
        if !reference.tdx_mrtds.iter().any(|m| m[..] == quote.td.mrtd) {
            return Err(Refusal::Mrtd {
                mrtd: cvm_formats::hex(&quote.td.mrtd),
                allowed: reference.tdx_mrtds.len(),
            });
        }
        for (i, value) in &reference.tdx_rtmrs {
            if value[..] != quote.td.rtmr[*i] {
                return Err(Refusal::Rtmr {
                    index: *i,
                    found: cvm_formats::hex(&quote.td.rtmr[*i]),
                    reference: cvm_formats::hex(value),
                });
            }
        }
        let (Some(ccel), Some(init_log)) = (&evidence.cc_eventlog, &evidence.cvm_measure_log)
        else {
            return Err(Refusal::NoLogs);
        };
        let ccel = crate::uefi::tcglog::parse(&decode("cc_eventlog", ccel)?).map_err(|e| {
            Refusal::Log {
                log: "cc_eventlog",
                why: e.to_string(),
            }
        })?;
        let mut replayed = ccel.replay_ccel().map_err(|e| Refusal::Log {
            log: "cc_eventlog",
            why: e.to_string(),
        })?;
        if let Some(expected) = &reference.tdx_rtmr2_before_init {
            if replayed.rtmr[2][..] != expected[..] {
                return Err(Refusal::BootRtmr2 {
                    found: cvm_formats::hex(&replayed.rtmr[2]),
                    reference: cvm_formats::hex(expected),
                });
            }
        }
        let records =
            cvm_formats::jsonseq::parse(&decode("cvm_measure_log", init_log)?).map_err(|e| {
                Refusal::Log {
                    log: "cvm_measure_log",
                    why: e.to_string(),
                }
            })?;
        let init_only = cvm_formats::jsonseq::replay(&records);
        for record in &records {
            for (bank, digest) in &record.digests {
                if *bank == cvm_formats::registers::Bank::Sha384 {
                    if let Some(rtmr) = cvm_formats::registers::rtmr_for_pcr(record.pcr) {
                        replayed.extend_rtmr(rtmr, digest);
                    }
                }
            }
        }
        for i in 0..4 {
            if replayed.rtmr[i][..] != quote.td.rtmr[i] {
                return Err(Refusal::LogsDoNotReplayRtmr(i));
            }
        }
        match &reference.tdx_init_rtmr2 {
            Some(expected) if *expected == init_only.rtmr[2] => Ok(()),
            Some(_) => Err(Refusal::InitRtmr2),
            None => Err(Refusal::NoInitRtmr2Reference),
        }
    }

    fn resource(
        &self,
        request: &Message,
        path: &str,
        noted: &mut Vec<(&'static str, String)>,
    ) -> Answer {
        let (key, matched) = {
            let sessions = self.sessions.lock().unwrap();
            let session = request.cookie(COOKIE).and_then(|id| sessions.get(id));
            match session.and_then(|s| Some((s.tee_pubkey.clone()?, s.matched.clone()?))) {
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
        noted.push(("resource", path.to_string()));
        noted.push(("reference", matched));
        ok_json(serde_json::to_value(jwe).expect("serializable"), Vec::new())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

fn serve_one(broker: &Broker, stream: TcpStream, tls: Option<&Arc<rustls::ServerConfig>>) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "-".into());
    let stream = Deadline {
        until: Instant::now() + broker.limits.connection_age,
        stream,
    };
    match tls {
        None => answer_one(broker, stream, &peer),
        Some(config) => {
            let mut tls = match rustls::ServerConnection::new(config.clone()) {
                Ok(connection) => rustls::StreamOwned::new(connection, stream),
                Err(e) => return eprintln!("kbs-serve: TLS: {e}"),
            };
            // A client that does not complete the handshake gets nothing, not an error page.
            while tls.conn.is_handshaking() {
                if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
                    return eprintln!(
                        "kbs-serve: TLS handshake with {}: {}",
                        crate::broker::log::escape(&peer),
                        crate::broker::log::escape(&e.to_string())
                    );
                }
            }
            answer_one(broker, tls, &peer)
        }
    }
}

/// A connection that fails its reads and writes once its age is over (a peer sending a byte
/// now and then would otherwise hold its thread for ever).
struct Deadline {
    until: Instant,
    stream: TcpStream,
}

impl Deadline {
    fn remaining(&self) -> std::io::Result<Duration> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection's age is over (connection_age)",
            ));
        }
        Ok(left)
    }
}

impl std::io::Read for Deadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let left = self.remaining()?;
        self.stream.set_write_timeout(Some(left))?;
        self.stream.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

fn answer_one(broker: &Broker, mut stream: impl std::io::Read + Write, peer: &str) {
    let answer = match read_message(&mut stream) {
        Ok(request) => broker.handle_from(&request, peer),
        Err(e) => {
            let detail = e.to_string();
            (broker.log)(&crate::broker::log::refusal_line(&[
                ("peer", peer),
                ("status", "400"),
                ("reason", &detail),
            ]));
            problem(400, "InvalidRequest", detail)
        }
    };
    write_answer(&mut stream, &answer);
}

fn write_answer(stream: &mut impl Write, answer: &Answer) {
    let headers: Vec<(&str, &str)> = answer
        .headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let _ = write_message(
        stream,
        &format!("HTTP/1.1 {} {}", answer.status, reason(answer.status)),
        &headers,
        &answer.body,
    );
    let _ = stream.flush();
}

/// A connection slot, given back when the connection's thread ends.
struct Slot(Arc<Broker>);

impl Slot {
    fn take(broker: &Arc<Broker>) -> Option<Slot> {
        let max = broker.limits.max_connections;
        broker
            .connections
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(broker.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Turns a connection away when all slots are taken, without a thread: plain HTTP gets 503
/// and a JSON error naming the limit; a TLS client is closed before the handshake (an answer
/// would need one). Either way the broker logs it.
fn refuse_connection(broker: &Broker, mut stream: TcpStream, tls: bool) {
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "-".into());
    let detail = format!(
        "the broker serves its maximum of {} connections (max_connections): retry later",
        broker.limits.max_connections
    );
    (broker.log)(&crate::broker::log::refusal_line(&[
        ("peer", &peer),
        ("status", "503"),
        ("reason", &detail),
    ]));
    if !tls {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        write_answer(&mut stream, &problem(503, "TooManyConnections", detail));
    }
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
        let Some(slot) = Slot::take(&broker) else {
            refuse_connection(&broker, stream, tls.is_some());
            continue;
        };
        let tls = tls.clone();
        std::thread::spawn(move || serve_one(&slot.0, stream, tls.as_ref()));
    }
}

/// What identifies the node in a refusal: the evidence's own values (best effort: evidence
/// that does not parse is named so).
fn evidence_identity(tee: &str, evidence: &Value) -> String {
    match tee {
        "snp" => match crate::snp::from_trustee_evidence(evidence) {
            Ok((r, _)) => format!(
                "chip_id={} measurement={} reported_tcb={:#018x} policy={:#x}",
                cvm_formats::hex(&r.chip_id()[..8]),
                cvm_formats::hex(r.measurement()),
                r.reported_tcb(),
                r.policy()
            ),
            Err(_) => "unparseable snp evidence".into(),
        },
        "tdx" => {
            let quote = evidence
                .get("quote")
                .and_then(Value::as_str)
                .and_then(|q| STANDARD.decode(q).ok())
                .and_then(|q| crate::tdx::Quote::parse(&q).ok());
            match quote {
                Some(q) => format!(
                    "mrtd={} td_attributes={:#x} rtmr1={}",
                    cvm_formats::hex(&q.td.mrtd),
                    q.td.td_attributes,
                    cvm_formats::hex(&q.td.rtmr[1])
                ),
                None => "unparseable tdx evidence".into(),
            }
        }
        _ => match (
            evidence.get("ak_x").and_then(Value::as_str),
            evidence.get("ak_y").and_then(Value::as_str),
        ) {
            (Some(x), Some(y)) => format!("ak_x={x} ak_y={y}"),
            _ => "tpm evidence without an attestation key".into(),
        },
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
        let why = allowed
            .verify_snp(&real_evidence(), &binding)
            .unwrap_err()
            .to_string();
        assert!(why.contains("policy.debug"), "{why}");
        // Another image's digest.
        let why = broker(vec![vec![0; 48]])
            .verify_snp(&real_evidence(), &binding)
            .unwrap_err()
            .to_string();
        assert!(why.contains("launch digest"), "{why}");
        // A changed byte in the signed part.
        let mut raw = crate::testdata::read("snp/gsg_attestation.bin");
        raw[0x95] ^= 1;
        let why = allowed
            .verify_snp(&evidence_of(&raw), &binding)
            .unwrap_err()
            .to_string();
        assert!(why.contains("does not verify"), "{why}");
        // No certificate.
        let mut bare = real_evidence();
        bare["cert_chain"] = Value::Null;
        let why = allowed.verify_snp(&bare, &binding).unwrap_err().to_string();
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
            let got = broker
                .verify_tdx(evidence, binding)
                .unwrap_err()
                .to_string();
            assert!(got.contains(why), "{got}");
        };
        refused(&broker, &evidence, &[0x5a; 64], "replayed");
        // Another firmware, another kernel.
        let (other, _, _) = tdx_case();
        other.edit(|r| r.tdx_mrtds = vec![vec![1; 48]]);
        refused(&other, &evidence, &binding, "MRTD");
        let (other, _, _) = tdx_case();
        other.edit(|r| r.tdx_rtmrs = vec![(1, vec![1; 48])]);
        refused(&other, &evidence, &binding, "RTMR 1 is");
        // The boot's RTMR 2 part (this real log holds no cvm-init events, so it is the whole of
        // the quote's RTMR 2): the reference value passes, another is refused.
        let (other, _, _) = tdx_case();
        let rtmr2 =
            crate::tdx::Quote::parse(&crate::testdata::read("tdx/gtg_cos-113-tdx-quote.dat"))
                .unwrap()
                .td
                .rtmr[2];
        other.edit(|r| r.tdx_rtmr2_before_init = Some(rtmr2.to_vec()));
        other.verify_tdx(&evidence, &binding).unwrap();
        other.edit(|r| r.tdx_rtmr2_before_init = Some(vec![2; 48]));
        refused(&other, &evidence, &binding, "the boot's RTMR 2 events");
        // cvm-init's events are not this image's.
        let (other, _, _) = tdx_case();
        other.edit(|r| r.tdx_init_rtmr2 = Some(vec![1; 48]));
        refused(&other, &evidence, &binding, "not this image's");
        // A log that does not replay to the quote: one more event, or a changed digest.
        let mut extra = evidence.clone();
        let record = cvm_formats::jsonseq::record(&cvm_formats::event::Event::Phase(
            cvm_formats::event::Phase::EnterInitrd,
        ));
        extra["cvm_measure_log"] = STANDARD.encode(record).into();
        refused(&broker, &extra, &binding, "do not replay");
        let mut ccel = crate::testdata::read("tdx/gtg_ccel_data.dat");
        let log = crate::uefi::tcglog::parse(&ccel).unwrap();
        let first = log.replay_ccel().unwrap();
        // Flip bytes until the replay changes (a digest byte), keeping the log parseable.
        let changed = (100..ccel.len()).find(|&at| {
            ccel[at] ^= 1;
            let replays_otherwise = crate::uefi::tcglog::parse(&ccel)
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

    #[test]
    fn a_tdx_quote_from_another_quoting_enclave_is_refused_by_name() {
        let chain = crate::tdx::test_chain::TestChain::new();
        let (broker, mut evidence, _) = tdx_case();
        broker.edit(|r| r.tdx_trust.extra_roots.push(chain.root()));
        let binding = [0x3c; 64];
        // Intel's TD QE identity, signed by the (trusted) test chain: verifies and appraises.
        evidence["quote"] = STANDARD.encode(chain.quote(&binding, |_| {})).into();
        broker.verify_tdx(&evidence, &binding).unwrap();
        // The host's own enclave, its key certified by the same platform key.
        evidence["quote"] = STANDARD
            .encode(chain.quote(&binding, |qe| qe[128..160].fill(0x55)))
            .into();
        let why = broker
            .verify_tdx(&evidence, &binding)
            .unwrap_err()
            .to_string();
        assert!(
            why.contains("qe.mrsigner") && why.contains(&"55".repeat(32)),
            "{why}"
        );
        // The reference's TD requirements: an XFAM other than the quote's.
        let (broker, evidence, binding) = tdx_case();
        broker.edit(|r| r.tdx_requirements.xfam = Some(0x61ae7));
        let why = broker
            .verify_tdx(&evidence, &binding)
            .unwrap_err()
            .to_string();
        assert!(
            why.contains("xfam: expected 0x61ae7, the quote has 0x600e7"),
            "{why}"
        );
    }

    #[test]
    fn a_reference_without_values_is_refused_at_load() {
        let why = Reference::from_prediction(&json!({"pcr": {}})).unwrap_err();
        assert!(
            why.contains("no PCR") && why.contains("accept any evidence"),
            "{why}"
        );
        // SNP launch digests need a minimum TCB (or its waiver by name).
        let snp = json!({"pcr": {}, "snp_measurements": ["11".repeat(48)]});
        let why = Reference::from_prediction(&snp).unwrap_err();
        assert!(why.contains("snp_min_tcb"), "{why}");
        let mut waived = snp.clone();
        waived["snp_min_tcb"] = "waived".into();
        // `predict --launch` writes the policy it assumed as `snp_policy`: not a requirement.
        waived["snp_policy"] = "0x30000".into();
        Reference::from_prediction(&waived).unwrap();
        let pcrs = json!({"pcr": {"11": {"sha256": "00".repeat(32)}}});
        assert_eq!(Reference::from_prediction(&pcrs).unwrap().pcrs.len(), 1);
    }

    /// A TPMS_ATTEST quote of `pcrs` (sha256 bank) with `extra` and `digest`, signed by `ak`.
    fn tpm_quote(ak: &p256::ecdsa::SigningKey, extra: &[u8], pcrs: &[u32], digest: &[u8]) -> Value {
        use p256::ecdsa::signature::Signer;
        let mut a = Vec::new();
        a.extend(0xff54_4347u32.to_be_bytes());
        a.extend(0x8018u16.to_be_bytes());
        a.extend(0u16.to_be_bytes());
        a.extend((extra.len() as u16).to_be_bytes());
        a.extend(extra);
        a.extend([0; 8 + 4 + 4 + 1 + 8]);
        a.extend(1u32.to_be_bytes());
        a.extend(0x000bu16.to_be_bytes());
        let mut bitmap = [0u8; 3];
        for p in pcrs {
            bitmap[*p as usize / 8] |= 1 << (p % 8);
        }
        a.push(3);
        a.extend(bitmap);
        a.extend((digest.len() as u16).to_be_bytes());
        a.extend(digest);
        let signature: p256::ecdsa::Signature = ak.sign(&a);
        let (r, s) = signature.split_bytes();
        let point = ak.verifying_key().to_encoded_point(false);
        TpmEvidence::json(
            point.x().unwrap(),
            point.y().unwrap(),
            &a,
            (&r, &s),
            None,
            None,
        )
    }

    #[test]
    fn an_empty_pcr_reference_accepts_no_tpm_quote() {
        let ak = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
        let point = ak.verifying_key().to_encoded_point(false);
        let binding = [0x44u8; 64];
        let broker = Broker::new(
            PathBuf::from("/nonexistent"),
            Reference {
                attestation_keys: vec![(point.x().unwrap().to_vec(), point.y().unwrap().to_vec())],
                ..Default::default()
            },
        );
        // The key is admitted (as if its credential had been activated): what is left to
        // check is the quote against the reference.
        let credential = Ok(TpmCredential {
            ak: crate::tpm::credential::AkPublic {
                x: point.x().unwrap().to_vec(),
                y: point.y().unwrap().to_vec(),
                name: Vec::new(),
            },
            secret: zeroize::Zeroizing::new(vec![0x33; 32]),
        });
        let qualifying = crate::tpm::credential::qualifying_data(&binding, &[0x33; 32]);
        // A quote of no PCRs by a listed, admitted key.
        let nothing: [u8; 32] = sha2::Sha256::digest([]).into();
        let evidence = tpm_quote(&ak, &qualifying, &[], &nothing);
        let why = broker
            .verify_tpm(&evidence, &binding, Some(&credential))
            .unwrap_err()
            .to_string();
        assert!(why.contains("no PCR reference values"), "{why}");
        // With a reference, a quote of its PCRs passes.
        let value = [0x5a; 32];
        broker.edit(|r| r.pcrs = vec![(11, value.to_vec())]);
        let digest: [u8; 32] = sha2::Sha256::digest(value).into();
        broker
            .verify_tpm(
                &tpm_quote(&ak, &qualifying, &[11], &digest),
                &binding,
                Some(&credential),
            )
            .unwrap();
    }

    /// A vTPM node: its attestation key, admitted as if its credential had been activated.
    struct TpmNode {
        ak: p256::ecdsa::SigningKey,
        credential: TpmCredential,
    }

    impl TpmNode {
        fn new() -> TpmNode {
            let ak = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
            let point = ak.verifying_key().to_encoded_point(false);
            let credential = TpmCredential {
                ak: crate::tpm::credential::AkPublic {
                    x: point.x().unwrap().to_vec(),
                    y: point.y().unwrap().to_vec(),
                    name: Vec::new(),
                },
                secret: zeroize::Zeroizing::new(vec![0x33; 32]),
            };
            TpmNode { ak, credential }
        }

        /// A session as `auth` leaves it for this node (the challenge's nonce, its credential).
        fn auth(&self, broker: &Broker) -> String {
            let id = random_id();
            broker.sessions.lock().unwrap().insert(
                id.clone(),
                Session {
                    tee: "tpm".into(),
                    nonce: format!("nonce-{id}"),
                    hash: "sha384".into(),
                    created: Instant::now(),
                    tee_pubkey: None,
                    matched: None,
                    spent: false,
                    tpm: Some(Ok(self.credential.clone())),
                },
            );
            id
        }

        /// `attest` with a quote of PCRs 11 and 15 holding `values`, then the resource
        /// `default/key/disk`: the two answers, and the resource's bytes when released.
        fn attest(
            &self,
            broker: &Broker,
            session: &str,
            values: [[u8; 32]; 2],
        ) -> (Answer, Answer, Option<Vec<u8>>) {
            let key = p256::SecretKey::random(&mut rand_core::OsRng);
            let mut body = json!({
                "runtime-data": {"nonce": format!("nonce-{session}"), "tee-pubkey": Jwk::from_public(&key.public_key())},
                "tee-evidence": {"primary_evidence": {}, "additional_evidence": ""},
            });
            let parsed: Attestation = serde_json::from_value(body.clone()).unwrap();
            let binding = kbs::report_data(&parsed.runtime_data, "", "sha384").unwrap();
            let qualifying = crate::tpm::credential::qualifying_data(&binding, &[0x33; 32]);
            let digest: [u8; 32] = sha2::Sha256::new()
                .chain_update(values[0])
                .chain_update(values[1])
                .finalize()
                .into();
            body["tee-evidence"]["primary_evidence"] =
                tpm_quote(&self.ak, &qualifying, &[11, 15], &digest);
            let cookie = vec![("cookie".to_string(), format!("{COOKIE}={session}"))];
            let attested = broker.handle_from(
                &Message {
                    start: "POST /kbs/v0/attest HTTP/1.1".into(),
                    headers: cookie.clone(),
                    body: body.to_string().into_bytes(),
                },
                "192.0.2.1:1",
            );
            let released = broker.handle_from(
                &Message {
                    start: "GET /kbs/v0/resource/default/key/disk HTTP/1.1".into(),
                    headers: cookie,
                    body: Vec::new(),
                },
                "192.0.2.1:1",
            );
            let plaintext = (released.status == 200).then(|| {
                let jwe: kbs::Jwe = serde_json::from_slice(&released.body).unwrap();
                kbs::jwe_decrypt(&key, &jwe).unwrap()
            });
            (attested, released, plaintext)
        }
    }

    fn pcr_reference(pcr11: [u8; 32], pcr15: [u8; 32]) -> String {
        json!({"pcr": {
            "11": {"sha256": cvm_formats::hex(&pcr11)},
            "15": {"sha256": cvm_formats::hex(&pcr15)},
        }})
        .to_string()
    }

    fn detail(answer: &Answer) -> String {
        serde_json::from_slice::<Value>(&answer.body).unwrap()["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Three references, as `kbs-serve --reference DIR --reference C.json` loads them: A and
    /// B (the old image's and the new one's) in a directory, C a file of its own. Each node is
    /// released its key by its own reference, a mix of two is not; a reload (by call, and by
    /// the poll) drops a reference removed from the directory, and keeps the set when a named
    /// file is missing or a file is broken.
    #[test]
    fn a_node_matching_any_one_reference_whole_is_released_and_reloads_replace_the_set() {
        let dir = tempfile::tempdir().unwrap();
        let resources = dir.path().join("resources");
        std::fs::create_dir_all(resources.join("default/key")).unwrap();
        std::fs::write(resources.join("default/key/disk"), b"the disk key").unwrap();
        let references = dir.path().join("references");
        std::fs::create_dir(&references).unwrap();
        // Written beside and renamed in, as an operator should, so that the poll never reads
        // half a file (hidden files are not references).
        let put = |path: &std::path::Path, text: String| {
            let hidden = path.with_file_name(format!(
                ".{}.new",
                path.file_name().unwrap().to_str().unwrap()
            ));
            std::fs::write(&hidden, text).unwrap();
            std::fs::rename(&hidden, path).unwrap();
        };
        let (a11, a15, b11, b15) = ([0xa1; 32], [0xa5; 32], [0xb1; 32], [0xb5; 32]);
        let (c11, c15) = ([0xc1; 32], [0xc5; 32]);
        let (file_a, file_b) = (references.join("A.json"), references.join("B.json"));
        let file_c = dir.path().join("C.json");
        put(&file_a, pcr_reference(a11, a15));
        put(&file_b, pcr_reference(b11, b15));
        put(&file_c, pcr_reference(c11, c15));
        let node = TpmNode::new();
        let sources = set::Sources {
            paths: vec![references.clone(), file_c.clone()],
            shared: set::Shared::default(),
        };
        let (loaded, _) = sources.load().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let capture = lines.clone();
        let broker = Arc::new(
            Broker::with_references(resources, loaded).with_log(Arc::new(move |l: &str| {
                capture.lock().unwrap().push(l.into())
            })),
        );
        let took = |lines: &Arc<Mutex<Vec<String>>>| std::mem::take(&mut *lines.lock().unwrap());

        // Evidence of each: released, logged with its reference's name.
        for (values, name) in [
            ([a11, a15], "A.json"),
            ([b11, b15], "B.json"),
            ([c11, c15], "C.json"),
        ] {
            let session = node.auth(&broker);
            let (attested, released, key) = node.attest(&broker, &session, values);
            assert_eq!(attested.status, 200, "{}", detail(&attested));
            assert_eq!(released.status, 200, "{}", detail(&released));
            assert_eq!(key.as_deref(), Some(&b"the disk key"[..]));
            let lines = took(&lines);
            assert_eq!(lines.len(), 2, "{lines:?}");
            assert!(
                lines[0].starts_with(&format!(
                    "kbs-serve: attested a node matching reference=\"{name}\" peer=\"192.0.2.1:1\" session=\"{session}\""
                )),
                "{lines:?}"
            );
            assert!(
                lines[1].starts_with(&format!(
                    "kbs-serve: released resource=\"default/key/disk\" to a node matching reference=\"{name}\""
                )),
                "{lines:?}"
            );
        }
        // A mix (PCR 11 of A, PCR 15 of B) matches none whole: refused, each named.
        let session = node.auth(&broker);
        let (attested, released, key) = node.attest(&broker, &session, [a11, b15]);
        assert_eq!((attested.status, released.status), (401, 401));
        assert!(key.is_none());
        let why = detail(&attested);
        assert!(
            why.starts_with("no loaded reference matches: A.json, B.json, C.json: vTPM quote refused: the quoted PCR digest does not match"),
            "{why}"
        );
        assert!(took(&lines)
            .iter()
            .all(|l| l.starts_with("kbs-serve: refused")));

        // A dropped from the directory, then a reload: a session that passed `auth` before
        // is judged against the set of its `attest`, so A is refused and B still released.
        let before = node.auth(&broker);
        std::fs::remove_file(&file_a).unwrap();
        set::reload(&broker, &sources, "test").unwrap();
        let logged = took(&lines);
        assert!(
            logged[0].starts_with("kbs-serve: reloaded (test): 2 references: B.json (sha256 ")
                && logged[0].contains(", C.json (sha256 ")
                && logged[0].ends_with(": 2 PCRs, 0 SNP launch digests, 0 TDX MRTDs)"),
            "{logged:?}"
        );
        let (attested, _, key) = node.attest(&broker, &before, [a11, a15]);
        assert_eq!(attested.status, 401);
        assert!(key.is_none());
        let why = detail(&attested);
        assert!(
            why.starts_with("no loaded reference matches: B.json, C.json: "),
            "{why}"
        );
        let session = node.auth(&broker);
        assert!(node.attest(&broker, &session, [b11, b15]).2.is_some());

        // C (a file named on the command line) missing: the reload fails, the set stays.
        took(&lines);
        std::fs::remove_file(&file_c).unwrap();
        assert!(set::reload(&broker, &sources, "test").is_none());
        let logged = took(&lines);
        assert!(
            logged[0].starts_with("kbs-serve: reload (test) failed, keeping the 2 references loaded before (B.json, C.json): "),
            "{logged:?}"
        );
        assert!(logged[0].contains("C.json: No such file"), "{logged:?}");
        let session = node.auth(&broker);
        assert!(node.attest(&broker, &session, [c11, c15]).2.is_some());
        put(&file_c, pcr_reference(c11, c15));
        let as_loaded = sources.fingerprint();

        // The file-change path (no signal): a broken file keeps the set, a good one (A back)
        // is loaded.
        let (_signal, signals) = std::sync::mpsc::channel();
        set::watch(
            broker.clone(),
            sources,
            as_loaded,
            Duration::from_millis(100),
            signals,
        );
        let wait_for = |what: &str| {
            let start = Instant::now();
            loop {
                let got = lines.lock().unwrap().clone();
                if let Some(line) = got.iter().find(|l| l.contains(what)) {
                    return line.clone();
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "no {what:?} in {got:?}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        };
        took(&lines);
        put(&file_a, "{\"pcr\": {\"11\": ".into());
        let line = wait_for("failed");
        assert!(
            line.starts_with("kbs-serve: reload (a reference file changed) failed, keeping the 2 references loaded before (B.json, C.json): ")
                && line.contains("A.json: EOF while parsing"),
            "{line}"
        );
        assert_eq!(broker.references().len(), 2);
        let session = node.auth(&broker);
        assert!(node.attest(&broker, &session, [b11, b15]).2.is_some());
        took(&lines);
        put(&file_a, pcr_reference(a11, a15));
        let line = wait_for("reloaded");
        assert!(
            line.starts_with(
                "kbs-serve: reloaded (a reference file changed): 3 references: A.json (sha256 "
            ) && line.contains(", B.json (sha256 ")
                && line.contains(", C.json (sha256 "),
            "{line}"
        );
        let session = node.auth(&broker);
        assert!(node.attest(&broker, &session, [a11, a15]).2.is_some());
    }

    fn auth(b: &Broker, tee: &str) -> Answer {
        b.handle(&Message {
            start: "POST /kbs/v0/auth HTTP/1.1".into(),
            headers: Vec::new(),
            body: format!(r#"{{"version":"0.4.0","tee":"{tee}","extra-params":{{}}}}"#)
                .into_bytes(),
        })
    }

    #[test]
    fn sessions_are_bounded_in_count_and_age() {
        let b = broker(Vec::new()).with_limits(Limits {
            max_sessions: 2,
            session_age: Duration::from_millis(300),
            ..Default::default()
        });
        assert_eq!(auth(&b, "snp").status, 200);
        assert_eq!(auth(&b, "snp").status, 200);
        let full = auth(&b, "snp");
        assert_eq!(full.status, 503);
        let body: Value = serde_json::from_slice(&full.body).unwrap();
        assert!(body["type"].as_str().unwrap().ends_with("TooManySessions"));
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("maximum of 2 sessions (max_sessions"),
            "{body}"
        );
        // Once they are older than their age, they are gone and room is made.
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(auth(&b, "snp").status, 200);
    }

    #[test]
    fn connections_are_bounded_in_count_and_age() {
        use std::io::Read;
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let capture = lines.clone();
        let broker = Arc::new(
            broker(Vec::new())
                .with_limits(Limits {
                    max_connections: 1,
                    connection_age: Duration::from_millis(1500),
                    ..Default::default()
                })
                .with_log(Arc::new(move |l: &str| {
                    capture.lock().unwrap().push(l.into())
                })),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = broker.clone();
        std::thread::spawn(move || serve(listener, serving));
        // A peer that sends a byte now and then, holding the only slot.
        let mut slow = TcpStream::connect(addr).unwrap();
        let start = Instant::now();
        while broker.connections.load(Ordering::SeqCst) == 0 {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut turned_away = String::new();
        TcpStream::connect(addr)
            .unwrap()
            .read_to_string(&mut turned_away)
            .unwrap();
        assert!(turned_away.starts_with("HTTP/1.1 503"), "{turned_away}");
        assert!(
            turned_away.contains("maximum of 1 connections (max_connections)"),
            "{turned_away}"
        );
        // The slow peer is cut off at its age although it keeps sending.
        let dribble = std::thread::spawn(move || {
            let mut answer = String::new();
            for _ in 0..30 {
                if slow.write_all(b"P").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = slow.read_to_string(&mut answer);
            answer
        });
        let answer = dribble.join().unwrap();
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(3) + Duration::from_millis(1500),
            "{took:?}"
        );
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
            "{answer}"
        );
        // The slot is free again.
        let start = Instant::now();
        while broker.connections.load(Ordering::SeqCst) != 0 {
            assert!(start.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut served = TcpStream::connect(addr).unwrap();
        served
            .write_all(b"GET /nothing HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        served.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
        let lines = lines.lock().unwrap();
        assert!(
            lines.iter().any(|l| l.contains("max_connections")),
            "{lines:?}"
        );
    }

    #[test]
    fn every_refusal_is_logged_with_the_node_the_check_and_the_values() {
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let capture = lines.clone();
        let report =
            crate::snp::Report::parse(&crate::testdata::read("snp/gsg_attestation.bin")).unwrap();
        let b = broker(vec![report.measurement().to_vec()]).with_log(Arc::new(move |l: &str| {
            capture.lock().unwrap().push(l.into())
        }));
        let challenge = auth(&b, "snp");
        let cookie = challenge
            .headers
            .iter()
            .find(|(n, _)| n == "Set-Cookie")
            .unwrap()
            .1
            .split(';')
            .next()
            .unwrap()
            .to_string();
        let session = cookie.split('=').nth(1).unwrap().to_string();
        let nonce = serde_json::from_slice::<Value>(&challenge.body).unwrap()["nonce"]
            .as_str()
            .unwrap()
            .to_string();
        let key = p256::SecretKey::random(&mut rand_core::OsRng);
        let attestation = json!({
            "runtime-data": {"nonce": nonce, "tee-pubkey": Jwk::from_public(&key.public_key())},
            "tee-evidence": {"primary_evidence": real_evidence(), "additional_evidence": ""},
        });
        let answer = b.handle_from(
            &Message {
                start: "POST /kbs/v0/attest HTTP/1.1".into(),
                headers: vec![("cookie".into(), cookie)],
                body: attestation.to_string().into_bytes(),
            },
            "192.0.2.7:40000",
        );
        assert_eq!(answer.status, 401);
        {
            let lines = lines.lock().unwrap();
            assert_eq!(lines.len(), 1, "{lines:?}");
            let line = &lines[0];
            for part in [
                "peer=\"192.0.2.7:40000\"",
                &format!("session=\"{session}\""),
                "tee=\"snp\"",
                &format!("measurement={}", cvm_formats::hex(report.measurement())),
                "policy=0xb0000",
                "policy.debug: expected debugging not allowed",
                "the report has policy 0xb0000 allowing it",
            ] {
                assert!(line.contains(part), "{part} not in {line}");
            }
        }
        // Node-supplied text (a cookie, a path) is escaped: one line, no forged ones.
        b.handle_from(
            &Message {
                start: "GET /kbs/v0/resource/a/b/c\x1b[2J HTTP/1.1".into(),
                headers: vec![("cookie".into(), "kbs-session-id=x\ncvm-init: ready".into())],
                body: Vec::new(),
            },
            "192.0.2.8:1",
        );
        let lines = lines.lock().unwrap();
        assert_eq!(lines.len(), 2);
        assert!(!lines[1].chars().any(char::is_control), "{:?}", lines[1]);
        assert!(
            lines[1].contains("x\\ncvm-init: ready") && lines[1].contains("\\x1b[2J"),
            "{}",
            lines[1]
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
