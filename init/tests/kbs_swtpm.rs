//! The key-broker protocol end to end on the host: the reference broker on loopback, the
//! client with vTPM evidence from swtpm (the init's own quote code). The QEMU scenario reuses
//! both; these cases pin the protocol's refusals.

mod common;

use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{connect, start_swtpm, Tcp};
use cvm_init::tee::quote::quote;
use cvm_init::tee::tpm::Tpm;
use cvm_measure::http::{read_message, write_message};
use cvm_measure::kbs_broker::{serve, Broker, Reference, TpmEvidence};
use cvm_measure::kbs_client::{get_resource, ClientError, Endpoint};
use cvm_measure::registers::Bank;
use serde_json::{json, Value};

const PCRS: [u32; 2] = [11, 15];

fn tpm_evidence(t: &mut Tcp, binding: &[u8; 64]) -> Result<Value, String> {
    tpm_evidence_with_log(t, binding, None)
}

/// The same, with cvm-init's measurement log.
fn tpm_evidence_with_log(
    t: &mut Tcp,
    binding: &[u8; 64],
    log: Option<&[u8]>,
) -> Result<Value, String> {
    let q = quote(t, binding, &PCRS).map_err(|e| e.to_string())?;
    Ok(TpmEvidence::json(
        &q.ak_x,
        &q.ak_y,
        &q.attest,
        (&q.r, &q.s),
        None,
        log,
    ))
}

fn start_broker(resources: &std::path::Path, reference: Reference) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let broker = Arc::new(Broker::new(resources.to_path_buf(), reference));
    std::thread::spawn(move || serve(listener, broker));
    address
}

/// A node's TPM, its reference values and the broker's resources.
struct Setup {
    _swtpm: common::Swtpm,
    port: u16,
    reference: Reference,
    resources: tempfile::TempDir,
    key: Vec<u8>,
}

fn setup(slot: u16) -> Setup {
    let swtpm = start_swtpm(slot);
    let mut tpm = Tpm::new(connect(swtpm.port)).unwrap();
    tpm.extend(11, |b| b.hash(b"enter-initrd")).unwrap();
    let values = tpm.read_bank(Bank::Sha256, &PCRS).unwrap();
    drop(tpm);
    // The operator registers the node's attestation key (swtpm has no endorsement chain).
    let q = quote(&mut connect(swtpm.port), &[0; 64], &PCRS).unwrap();
    let reference = Reference {
        pcrs: PCRS.iter().copied().zip(values).collect(),
        attestation_keys: vec![(q.ak_x, q.ak_y)],
        ..Default::default()
    };
    let resources = tempfile::tempdir().unwrap();
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0xa5).collect();
    std::fs::create_dir_all(resources.path().join("cvm/state-disk")).unwrap();
    std::fs::write(resources.path().join("cvm/state-disk/key"), &key).unwrap();
    Setup {
        port: swtpm.port,
        _swtpm: swtpm,
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
    let got = get_resource(
        &Endpoint::plain(&address),
        "tpm",
        "cvm/state-disk/key",
        &mut |b| tpm_evidence(&mut t, b),
    )
    .expect("the key is released");
    assert_eq!(got, s.key);
    // A resource that does not exist, and a path that tries to leave the directory.
    for (path, status) in [("cvm/state-disk/other", 404), ("cvm/../../etc", 400)] {
        match get_resource(&Endpoint::plain(&address), "tpm", path, &mut |b| {
            tpm_evidence(&mut t, b)
        }) {
            Err(ClientError::Refused { status: s, .. }) => assert_eq!(s, status, "{path}"),
            other => panic!("{path}: {other:?}"),
        }
    }
}

/// c. Another image (other PCR values) or an unregistered attestation key: refused.
#[test]
fn other_measurements_or_an_unknown_key_are_refused() {
    let s = setup(1);
    let mut other_image = s.reference.clone();
    other_image.pcrs[0].1[0] ^= 1;
    let mut unknown_key = s.reference.clone();
    unknown_key.attestation_keys.clear();
    let mut t = connect(s.port);
    for (reference, why) in [
        (other_image, "PCR digest does not match"),
        (unknown_key, "is not one this broker trusts"),
    ] {
        let address = start_broker(s.resources.path(), reference);
        match get_resource(
            &Endpoint::plain(&address),
            "tpm",
            "cvm/state-disk/key",
            &mut |b| tpm_evidence(&mut t, b),
        ) {
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
    let auth = json!({"version": "0.4.0", "tee": "tpm", "extra-params": {}});
    let (status, challenge, cookie) = post(&address, "/kbs/v0/auth", None, &auth);
    assert_eq!(status, 200);
    let secret = p256::SecretKey::random(&mut rand_core::OsRng);
    let runtime = cvm_measure::kbs::RuntimeData {
        nonce: challenge["nonce"].as_str().unwrap().into(),
        tee_pubkey: cvm_measure::kbs::Jwk::from_public(&secret.public_key()),
    };
    let binding = cvm_measure::kbs::report_data(&runtime, "", "sha384").unwrap();
    let attestation = json!({
        "runtime-data": runtime,
        "tee-evidence": {"primary_evidence": tpm_evidence(&mut t, &binding).unwrap(), "additional_evidence": ""},
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
            .contains("qualifying data"),
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
    match get_resource(
        &Endpoint::plain(&proxy_address),
        "tpm",
        "cvm/state-disk/key",
        &mut |b| tpm_evidence(&mut t, b),
    ) {
        Err(ClientError::Kbs(cvm_measure::kbs::KbsError::Decrypt)) => {}
        other => panic!("an altered resource was not detected: {other:?}"),
    }
}

/// With the event logs: they must replay to the quoted PCRs, and a mismatch with the
/// reference values is named PCR by PCR.
#[test]
fn event_logs_must_replay_to_the_quote_and_explain_a_mismatch() {
    use cvm_measure::event::{Event, Phase};
    let s = setup(4);
    let record = cvm_measure::jsonseq::record(&Event::Phase(Phase::EnterInitrd));
    let parsed = cvm_measure::jsonseq::parse(&record).unwrap();
    assert_eq!(
        parsed[0].pcr, 11,
        "the setup extends PCR 11 with this event"
    );
    let mut t = connect(s.port);
    let mut ask = |reference: Reference, log: &[u8]| {
        let address = start_broker(s.resources.path(), reference);
        get_resource(
            &Endpoint::plain(&address),
            "tpm",
            "cvm/state-disk/key",
            &mut |b| tpm_evidence_with_log(&mut t, b, Some(log)),
        )
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
