//! The reference broker through a rolling upgrade, end to end on the host: the broker loads
//! two images' references from a directory, the client sends real vTPM evidence from swtpm
//! (the init's own quote code, the credential activated). A node of either image gets its key
//! while both references are loaded; after one image's reference is removed and the broker
//! reloads, a node of that image is refused, and the refusal names the reference left.
//! (A test file of its own: its swtpm has a port slot of its own process.)

#[allow(dead_code)] // start_swtpm: a node without an EK certificate is not needed here
mod common;

use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use common::{connect, start_certified_swtpm, Tcp};
use cvm_formats::registers::Bank;
use cvm_init::tee::quote::{attestation_key_public, quote_activated};
use cvm_init::tee::tpm::Tpm;
use cvm_kbs::client::{get_resources_with, ClientError, Endpoint};
use cvm_measure::broker::set::{self, Shared, Sources};
use cvm_measure::broker::{serve, Broker, TpmEndorsement, TpmEvidence};
use serde_json::json;

const PCRS: [u32; 2] = [11, 15];

/// A node asking for `resource` as cvm-init does: its endorsement at auth, the credential
/// activated for the quote.
fn ask(address: &str, t: &mut Tcp, resource: &str) -> Result<Vec<u8>, ClientError> {
    let cert = cvm_init::tee::ek::certificate(t).expect("the EK certificate");
    let mut extra = serde_json::Map::new();
    extra.insert(
        "tpm".into(),
        TpmEndorsement::json(&cert, &attestation_key_public(t).unwrap()),
    );
    get_resources_with(
        &Endpoint::plain(address),
        "tpm",
        &[resource],
        Some(extra),
        &mut |binding, challenge| {
            let c = challenge.get("tpm-credential").map(|c| {
                let field = |n: &str| STANDARD.decode(c[n].as_str().unwrap()).unwrap();
                (field("credential_blob"), field("encrypted_secret"))
            });
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
                None,
            ))
        },
    )
    .map(|mut all| std::mem::take(&mut *all.remove(0)))
}

/// A reference file of PCR 11 and 15 (sha256).
fn reference(values: &[Vec<u8>]) -> String {
    json!({"pcr": {
        "11": {"sha256": cvm_formats::hex(&values[0])},
        "15": {"sha256": cvm_formats::hex(&values[1])},
    }})
    .to_string()
}

#[test]
fn nodes_of_both_images_get_keys_until_one_reference_is_removed() {
    use sha2::Digest;
    let ca = tempfile::tempdir().unwrap();
    let swtpm = start_certified_swtpm(0, ca.path());
    let pem = cvm_init::tee::tpm::swtpm_ca_pem(ca.path()).unwrap();
    let ek_cas: Vec<Vec<u8>> = cvm_measure::x509::pem_chain(&pem)
        .unwrap()
        .iter()
        .map(|c| c.der().to_vec())
        .collect();
    // Two images: B's boot measures one event into PCR 11, A's one more ("image A"). One TPM
    // is a node of B, then, extended, a node of A; A's values are computed ahead.
    let mut tpm = Tpm::new(connect(swtpm.port)).unwrap();
    tpm.extend(11, |b| b.hash(b"enter-initrd")).unwrap();
    let b_values = tpm.read_bank(Bank::Sha256, &PCRS).unwrap();
    drop(tpm);
    let mut a_values = b_values.clone();
    a_values[0] = sha2::Sha256::new()
        .chain_update(&b_values[0])
        .chain_update(sha2::Sha256::digest(b"image A"))
        .finalize()
        .to_vec();
    let references = tempfile::tempdir().unwrap();
    std::fs::write(references.path().join("A.json"), reference(&a_values)).unwrap();
    std::fs::write(references.path().join("B.json"), reference(&b_values)).unwrap();
    let sources = Sources {
        paths: vec![references.path().to_path_buf()],
        shared: Shared {
            ek_cas,
            ..Default::default()
        },
    };
    let (loaded, _) = sources.load().unwrap();
    assert_eq!(loaded.len(), 2);
    let resources = tempfile::tempdir().unwrap();
    let key: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(29) ^ 0x5a).collect();
    std::fs::create_dir_all(resources.path().join("cvm/state-disk")).unwrap();
    std::fs::write(resources.path().join("cvm/state-disk/key"), &key).unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let capture = lines.clone();
    let broker = Arc::new(
        Broker::with_references(resources.path().to_path_buf(), loaded).with_log(Arc::new(
            move |l: &str| capture.lock().unwrap().push(l.to_string()),
        )),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let serving = broker.clone();
    std::thread::spawn(move || serve(listener, serving));
    let released_to = |name: &str| {
        lines.lock().unwrap().iter().any(|l| {
            l.starts_with(&format!(
                "kbs-serve: released resource=\"cvm/state-disk/key\" to a node matching reference=\"{name}\""
            ))
        })
    };

    // Both references loaded: the node of B, then the node of A, each get the key.
    let mut t = connect(swtpm.port);
    assert_eq!(ask(&address, &mut t, "cvm/state-disk/key").unwrap(), key);
    assert!(released_to("B.json") && !released_to("A.json"), "{lines:?}");
    // (swtpm serves one connection at a time.)
    drop(t);
    Tpm::new(connect(swtpm.port))
        .unwrap()
        .extend(11, |b| b.hash(b"image A"))
        .unwrap();
    let mut t = connect(swtpm.port);
    assert_eq!(ask(&address, &mut t, "cvm/state-disk/key").unwrap(), key);
    assert!(released_to("A.json"), "{lines:?}");

    // A's reference removed, the broker reloaded: the node of A is refused, by B's reason.
    std::fs::remove_file(references.path().join("A.json")).unwrap();
    set::reload(&broker, &sources, "SIGHUP").expect("the reload");
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("kbs-serve: reloaded (SIGHUP): 1 references: B.json (sha256 ")),
        "{lines:?}"
    );
    match ask(&address, &mut t, "cvm/state-disk/key") {
        Err(ClientError::Refused {
            step: "attest",
            status: 401,
            detail,
        }) => assert!(
            detail.starts_with("no loaded reference matches: B.json: vTPM quote refused: the quoted PCR digest does not match"),
            "{detail}"
        ),
        other => panic!("the node of A after A's reference was removed: {other:?}"),
    }
}
