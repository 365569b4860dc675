//! The key-broker protocol end to end on the host: the reference broker on loopback, the
//! client with vTPM evidence from swtpm (the init's own quote code), the swtpm manufactured
//! with an EK certificate from a test CA the broker is configured with. The QEMU scenario
//! reuses both; these cases pin the protocol's refusals.

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{connect, start_certified_swtpm, start_swtpm, Tcp};
use cvm_formats::registers::Bank;
use cvm_init::tee::quote::{attestation_key_public, quote, quote_activated};
use cvm_init::tee::tpm::Tpm;
use cvm_kbs::client::{get_resource, get_resources_with, ClientError, Endpoint};
use cvm_kbs::http::{read_message, write_message};
use cvm_measure::broker::{serve, Broker, Reference, TpmEndorsement, TpmEvidence};
use serde_json::{json, Value};

const PCRS: [u32; 2] = [11, 15];

/// A quote with the plain binding (no credential activated), as before endorsement.
fn tpm_evidence(t: &mut Tcp, binding: &[u8; 64]) -> Result<Value, String> {
    let q = quote(t, binding, &PCRS).map_err(|e| e.to_string())?;
    Ok(TpmEvidence::json(
        &q.ak_x,
        &q.ak_y,
        &q.attest,
        (&q.r, &q.s),
        None,
        None,
    ))
}

/// The `auth` extra-params of a node: the EK certificate and attestation key of `t`.
fn endorsement_of(ek_cert: &[u8], ak_public: &[u8]) -> serde_json::Map<String, Value> {
    let mut m = serde_json::Map::new();
    m.insert("tpm".into(), TpmEndorsement::json(ek_cert, ak_public));
    m
}

fn endorsement(t: &mut Tcp) -> serde_json::Map<String, Value> {
    let cert = cvm_init::tee::ek::certificate(t).expect("the EK certificate");
    endorsement_of(&cert, &attestation_key_public(t).unwrap())
}

/// The broker's credential in a challenge's extra-params.
fn credential(extra: &Value) -> Option<(Vec<u8>, Vec<u8>)> {
    let c = extra.get("tpm-credential")?;
    let field = |n: &str| STANDARD.decode(c[n].as_str().unwrap()).unwrap();
    Some((field("credential_blob"), field("encrypted_secret")))
}

/// A node's evidence: the credential activated, the quote over the mixed binding.
fn tpm_evidence_with_log(
    t: &mut Tcp,
    binding: &[u8; 64],
    extra: &Value,
    log: Option<&[u8]>,
) -> Result<Value, String> {
    let c = credential(extra);
    let q = quote_activated(
        t,
        binding,
        &PCRS,
        c.as_ref().map(|(b, s)| (b.as_slice(), s.as_slice())),
    )
    .map_err(|e| e.to_string())?;
    Ok(TpmEvidence::json(
        &q.ak_x,
        &q.ak_y,
        &q.attest,
        (&q.r, &q.s),
        None,
        log,
    ))
}

/// A node asking for `resource` as cvm-init does: its endorsement at auth, the credential
/// activated for the quote.
fn ask(
    address: &str,
    t: &mut Tcp,
    resource: &str,
    log: Option<&[u8]>,
) -> Result<Vec<u8>, ClientError> {
    let extra = endorsement(t);
    get_resources_with(
        &Endpoint::plain(address),
        "tpm",
        &[resource],
        Some(extra),
        &mut |b, challenge| tpm_evidence_with_log(t, b, challenge, log),
    )
    .map(|mut all| std::mem::take(&mut *all.remove(0)))
}

fn start_broker(resources: &std::path::Path, reference: Reference) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let broker = Arc::new(Broker::new(resources.to_path_buf(), reference));
    std::thread::spawn(move || serve(listener, broker));
    address
}

/// A node's TPM (with an EK certificate from the test CA `ca`), its reference values (the CA
/// among them) and the broker's resources.
struct Setup {
    _swtpm: common::Swtpm,
    _ca: tempfile::TempDir,
    port: u16,
    reference: Reference,
    resources: tempfile::TempDir,
    key: Vec<u8>,
}

/// The DER certificates of a test CA's PEM.
fn ca_certificates(ca: &std::path::Path) -> Vec<Vec<u8>> {
    let pem = cvm_init::tee::tpm::swtpm_ca_pem(ca).unwrap();
    cvm_measure::x509::pem_chain(&pem)
        .unwrap()
        .iter()
        .map(|c| c.der().to_vec())
        .collect()
}

fn setup(slot: u16) -> Setup {
    let ca = tempfile::tempdir().unwrap();
    let swtpm = start_certified_swtpm(slot, ca.path());
    let mut tpm = Tpm::new(connect(swtpm.port)).unwrap();
    tpm.extend(11, |b| b.hash(b"enter-initrd")).unwrap();
    let values = tpm.read_bank(Bank::Sha256, &PCRS).unwrap();
    drop(tpm);
    // The broker trusts the test CA; no allow-list: the endorsement admits the key.
    let reference = Reference {
        pcrs: PCRS.iter().copied().zip(values).collect(),
        ek_cas: ca_certificates(ca.path()),
        ..Default::default()
    };
    let resources = tempfile::tempdir().unwrap();
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    std::fs::create_dir_all(resources.path().join("cvm/state-disk")).unwrap();
    std::fs::write(resources.path().join("cvm/state-disk/key"), &key).unwrap();
    Setup {
        port: swtpm.port,
        _swtpm: swtpm,
        _ca: ca,
        reference,
        resources,
        key,
    }
}

#[test]
fn a_node_with_the_expected_measurements_gets_its_key() {
    let s = setup(0);
    let address = start_broker(s.resources.path(), s.reference.clone());
    let mut t = connect(s.port);
    let got = ask(&address, &mut t, "cvm/state-disk/key", None).expect("the key is released");
    assert_eq!(got, s.key);
    // A resource that does not exist, and a path that tries to leave the directory.
    for (path, status) in [("cvm/state-disk/other", 404), ("cvm/../../etc", 400)] {
        match ask(&address, &mut t, path, None) {
            Err(ClientError::Refused { status: s, .. }) => assert_eq!(s, status, "{path}"),
            other => panic!("{path}: {other:?}"),
        }
    }
}

/// c. Another image (other PCR values), or an endorsed attestation key the broker's allow-list
/// does not name (the list restricts on top of the endorsement): refused. Listed: released.
#[test]
fn other_measurements_or_an_unlisted_key_are_refused() {
    let s = setup(1);
    let mut other_image = s.reference.clone();
    other_image.pcrs[0].1[0] ^= 1;
    let mut unlisted_key = s.reference.clone();
    unlisted_key.attestation_keys = vec![(vec![1; 32], vec![2; 32])];
    let mut t = connect(s.port);
    let q = quote(&mut t, &[0; 64], &PCRS).unwrap();
    let mut listed = unlisted_key.clone();
    listed.attestation_keys.push((q.ak_x, q.ak_y));
    let address = start_broker(s.resources.path(), listed);
    assert_eq!(
        ask(&address, &mut t, "cvm/state-disk/key", None).unwrap(),
        s.key
    );
    for (reference, why) in [
        (other_image, "PCR digest does not match"),
        (unlisted_key, "is not one this broker trusts"),
    ] {
        let address = start_broker(s.resources.path(), reference);
        match ask(&address, &mut t, "cvm/state-disk/key", None) {
            Err(ClientError::Refused {
                step: "attest",
                status: 401,
                detail,
            }) => assert!(detail.contains(why), "{detail}"),
            other => panic!("{why}: {other:?}"),
        }
    }
}

fn post(
    address: &str,
    path: &str,
    cookie: Option<&str>,
    body: &Value,
) -> (u16, Value, Option<String>) {
    let mut stream = TcpStream::connect(address).unwrap();
    let cookie = cookie.map(|c| format!("kbs-session-id={c}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(c) = &cookie {
        headers.push(("Cookie", c.as_str()));
    }
    write_message(
        &mut stream,
        &format!("POST {path} HTTP/1.1"),
        &headers,
        body.to_string().as_bytes(),
    )
    .unwrap();
    let answer = read_message(&mut stream).unwrap();
    let status = answer
        .start
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let set_cookie = answer
        .header("set-cookie")
        .and_then(|c| c.split(';').next()?.strip_prefix("kbs-session-id="))
        .map(str::to_string);
    (
        status,
        serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
        set_cookie,
    )
}

/// d. Evidence from an earlier session: refused, whether it carries the old nonce or the new
/// one (then the quote's binding does not match); a session's nonce serves once.
#[test]
fn replayed_evidence_is_refused() {
    let s = setup(2);
    let address = start_broker(s.resources.path(), s.reference.clone());
    let mut t = connect(s.port);
    let auth = json!({"version": "0.4.0", "tee": "tpm", "extra-params": endorsement(&mut t)});
    let (status, challenge, cookie) = post(&address, "/kbs/v0/auth", None, &auth);
    assert_eq!(status, 200);
    let secret = p256::SecretKey::random(&mut rand_core::OsRng);
    let runtime = cvm_kbs::protocol::RuntimeData {
        nonce: challenge["nonce"].as_str().unwrap().into(),
        tee_pubkey: cvm_kbs::protocol::Jwk::from_public(&secret.public_key()),
    };
    let binding = cvm_kbs::protocol::report_data(&runtime, "", "sha384").unwrap();
    let attestation = json!({
        "runtime-data": runtime,
        "tee-evidence": {"primary_evidence": tpm_evidence_with_log(&mut t, &binding, &challenge["extra-params"], None).unwrap(), "additional_evidence": ""},
    });
    let (status, _, _) = post(&address, "/kbs/v0/attest", cookie.as_deref(), &attestation);
    assert_eq!(status, 200, "the first attest");
    // The same evidence again in the same session: its nonce is spent.
    let (status, problem, _) = post(&address, "/kbs/v0/attest", cookie.as_deref(), &attestation);
    assert_eq!(status, 401);
    assert!(problem["detail"].as_str().unwrap().contains("already used"));
    // In a new session, with its old nonce.
    let (_, _, cookie) = post(&address, "/kbs/v0/auth", None, &auth);
    let (status, problem, _) = post(&address, "/kbs/v0/attest", cookie.as_deref(), &attestation);
    assert_eq!(status, 401);
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("another session's nonce"));
    // In a new session, the new nonce but the old quote.
    let (_, newer, cookie) = post(&address, "/kbs/v0/auth", None, &auth);
    let mut relabelled = attestation.clone();
    relabelled["runtime-data"]["nonce"] = newer["nonce"].clone();
    let (status, problem, _) = post(&address, "/kbs/v0/attest", cookie.as_deref(), &relabelled);
    assert_eq!(status, 401);
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("does not carry the activated credential"),
        "{problem}"
    );
}

/// e. A resource altered in transit (a proxy flips the ciphertext): detected, not used.
#[test]
fn a_resource_altered_in_transit_is_detected() {
    let s = setup(3);
    let broker = start_broker(s.resources.path(), s.reference.clone());
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_address = proxy.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for mut client in proxy.incoming().flatten() {
            let request = read_message(&mut client).unwrap();
            let mut upstream = TcpStream::connect(&broker).unwrap();
            let headers: Vec<(&str, &str)> = request
                .headers
                .iter()
                .filter(|(n, _)| n != "content-length" && n != "connection")
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            write_message(&mut upstream, &request.start, &headers, &request.body).unwrap();
            let answer = read_message(&mut upstream).unwrap();
            let mut body = answer.body.clone();
            if request.start.contains("/resource/") {
                let mut jwe: Value = serde_json::from_slice(&body).unwrap();
                let mut c = URL_SAFE_NO_PAD
                    .decode(jwe["ciphertext"].as_str().unwrap())
                    .unwrap();
                c[0] ^= 1;
                jwe["ciphertext"] = URL_SAFE_NO_PAD.encode(c).into();
                body = jwe.to_string().into_bytes();
            }
            let headers: Vec<(&str, &str)> = answer
                .headers
                .iter()
                .filter(|(n, _)| n != "content-length" && n != "connection")
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            write_message(&mut client, &answer.start, &headers, &body).unwrap();
        }
    });
    let mut t = connect(s.port);
    match ask(&proxy_address, &mut t, "cvm/state-disk/key", None) {
        Err(ClientError::Kbs(cvm_kbs::protocol::KbsError::Decrypt)) => {}
        other => panic!("an altered resource was not detected: {other:?}"),
    }
}

/// With the event logs: they must replay to the quoted PCRs, and a mismatch with the
/// reference values is named PCR by PCR.
#[test]
fn event_logs_must_replay_to_the_quote_and_explain_a_mismatch() {
    use cvm_formats::event::{Event, Phase};
    let s = setup(4);
    let record = cvm_formats::jsonseq::record(&Event::Phase(Phase::EnterInitrd));
    let parsed = cvm_formats::jsonseq::parse(&record).unwrap();
    assert_eq!(
        parsed[0].pcr, 11,
        "the setup extends PCR 11 with this event"
    );
    let mut t = connect(s.port);
    let mut ask = |reference: Reference, log: &[u8]| {
        let address = start_broker(s.resources.path(), reference);
        ask(&address, &mut t, "cvm/state-disk/key", Some(log))
    };
    assert_eq!(ask(s.reference.clone(), &record).unwrap(), s.key);
    let refused = |result: Result<Vec<u8>, ClientError>, why: &str| match result {
        Err(ClientError::Refused { detail, .. }) => assert!(detail.contains(why), "{detail}"),
        other => panic!("{why}: {other:?}"),
    };
    // A log with one event more than the TPM saw.
    let doubled = [record.clone(), record.clone()].concat();
    refused(
        ask(s.reference.clone(), &doubled),
        "do not replay to the quoted PCRs",
    );
    // Another image's reference value for PCR 15: the refusal says which PCR differs.
    let mut other = s.reference.clone();
    other.pcrs[1].1[0] ^= 1;
    refused(ask(other, &record), "PCR 15 is 0000");
}

/// The setup's node with both its own and a host TPM's attestation key listed (as printed on
/// a console the host controls), and a checker of refusals at `attest`.
fn listed_keys(s: &Setup, node: &mut Tcp, host: Option<&mut Tcp>) -> Reference {
    let mut reference = s.reference.clone();
    let q = quote(node, &[0; 64], &PCRS).unwrap();
    reference.attestation_keys = vec![(q.ak_x, q.ak_y)];
    if let Some(host) = host {
        let q = quote(host, &[0; 64], &PCRS).unwrap();
        reference.attestation_keys.push((q.ak_x, q.ak_y));
    }
    reference
}

fn refused_at_attest(result: Result<Vec<u8>, ClientError>, why: &str) {
    match result {
        Err(ClientError::Refused {
            step: "attest",
            status: 401,
            detail,
        }) => assert!(detail.contains(why), "expected {why:?}: {detail}"),
        other => panic!("{why}: {other:?}"),
    }
}

/// §2 e. A listed attestation key is still refused unless it lives beside an EK whose
/// certificate chains to the broker's EK CA: the node's own EK certificate when the broker
/// trusts another CA; no endorsement at all.
#[test]
fn an_attestation_key_without_a_trusted_endorsement_is_refused() {
    let s = setup(6);
    let mut node = connect(s.port);
    let reference = listed_keys(&s, &mut node, None);
    let other_ca = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    cvm_init::tee::tpm::manufacture_swtpm(scratch.path(), other_ca.path()).unwrap();
    let mut untrusting = reference.clone();
    untrusting.ek_cas = ca_certificates(other_ca.path());
    let address = start_broker(s.resources.path(), untrusting);
    refused_at_attest(
        ask(&address, &mut node, "cvm/state-disk/key", None),
        "does not chain to a CA this broker is configured with",
    );
    let address = start_broker(s.resources.path(), reference);
    refused_at_attest(
        get_resource(
            &Endpoint::plain(&address),
            "tpm",
            "cvm/state-disk/key",
            &mut |b| tpm_evidence(&mut node, b),
        ),
        "the node sent no endorsement",
    );
}

/// §2 e. The host sends the certified EK's certificate with its own TPM's attestation key
/// (listed by the operator): its TPM cannot activate the credential (its EK is another), so its
/// best quote, over the node's PCR values, lacks the secret and is refused. The node itself,
/// endorsed, is admitted by the same broker.
#[test]
fn an_attestation_key_from_another_tpm_is_refused() {
    let s = setup(5);
    let host = start_swtpm(7);
    // The host's TPM holds the node's PCR values (it can extend what it likes).
    let mut host_tpm = Tpm::new(connect(host.port)).unwrap();
    host_tpm.extend(11, |b| b.hash(b"enter-initrd")).unwrap();
    drop(host_tpm);
    let mut node = connect(s.port);
    let mut other = connect(host.port);
    let reference = listed_keys(&s, &mut node, Some(&mut other));
    let address = start_broker(s.resources.path(), reference);
    let ek_cert = cvm_init::tee::ek::certificate(&mut node).unwrap();
    let forged = endorsement_of(&ek_cert, &attestation_key_public(&mut other).unwrap());
    let mut activation_failed = false;
    refused_at_attest(
        get_resources_with(
            &Endpoint::plain(&address),
            "tpm",
            &["cvm/state-disk/key"],
            Some(forged),
            &mut |b, challenge| {
                let (blob, secret) = credential(challenge).expect("a credential");
                let activated = quote_activated(&mut other, b, &PCRS, Some((&blob, &secret)));
                activation_failed = matches!(
                    activated,
                    Err(cvm_init::tee::tpm::TpmError::Response { .. })
                );
                tpm_evidence(&mut other, b)
            },
        )
        .map(|mut all| std::mem::take(&mut *all.remove(0))),
        "does not carry the activated credential",
    );
    assert!(activation_failed, "the host's TPM activated the credential");
    assert_eq!(
        ask(&address, &mut node, "cvm/state-disk/key", None).unwrap(),
        s.key
    );
}
