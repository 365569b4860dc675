//! `cvm-measure kbs-serve` with a directory of references, as an operator runs it through a
//! rolling upgrade: both references judge a node, SIGHUP after a reference is removed drops
//! it, a broken file (seen by the poll) keeps the set, and every reload is logged by name.
//! The node here sends a real SNP report (testdata), which no reference can accept (its report
//! data is not the session's), so the refusals show which references judged it and why; the
//! grants are tested in the broker's unit tests, where vTPM quotes are made for the session.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The binary under test; `CVM_MEASURE_BIN` names another build of it (where several
/// checkouts share a target directory, `target/debug/cvm-measure` is whichever built last).
fn bin() -> std::path::PathBuf {
    std::env::var_os("CVM_MEASURE_BIN")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_cvm-measure").into())
}

/// A request and its answer over one connection: (status line, Set-Cookie value, body).
fn exchange(port: u16, start: &str, cookie: Option<&str>, body: &str) -> (String, String, Value) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let cookie = cookie
        .map(|c| format!("Cookie: {c}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{start} HTTP/1.1\r\nHost: 127.0.0.1\r\n{cookie}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    let set_cookie = head
        .lines()
        .find_map(|l| l.strip_prefix("Set-Cookie: "))
        .map(|c| c.split(';').next().unwrap().to_string())
        .unwrap_or_default();
    (
        status,
        set_cookie,
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A node with the real report: auth, then attest; the refusal's detail.
fn attest_refused(port: u16, evidence: &Value) -> String {
    let (status, cookie, challenge) = exchange(
        port,
        "POST /kbs/v0/auth",
        None,
        r#"{"version":"0.4.0","tee":"snp","extra-params":{}}"#,
    );
    assert!(status.contains("200"), "{status}");
    let key = p256::SecretKey::random(&mut rand_core::OsRng);
    let attestation = json!({
        "runtime-data": {
            "nonce": challenge["nonce"],
            "tee-pubkey": cvm_kbs::protocol::Jwk::from_public(&key.public_key()),
        },
        "tee-evidence": {"primary_evidence": evidence, "additional_evidence": ""},
    });
    let (status, _, body) = exchange(
        port,
        "POST /kbs/v0/attest",
        Some(&cookie),
        &attestation.to_string(),
    );
    assert!(status.contains("401"), "{status} {body}");
    body["detail"].as_str().unwrap().to_string()
}

/// Writes a reference as an operator should: a hidden file beside it (which the broker skips),
/// then renamed over it, so that the poll never reads half a file.
fn put(path: &std::path::Path, text: &str) {
    let hidden = path.with_file_name(format!(
        ".{}.new",
        path.file_name().unwrap().to_str().unwrap()
    ));
    std::fs::write(&hidden, text).unwrap();
    std::fs::rename(&hidden, path).unwrap();
}

struct Serving {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Serving {
    /// Waits for a line of the broker's log containing `what` (after those already seen).
    fn wait_for(&self, what: &str, seen: usize) -> String {
        let start = Instant::now();
        loop {
            let lines = self.lines.lock().unwrap().clone();
            if let Some(line) = lines[seen.min(lines.len())..]
                .iter()
                .find(|l| l.contains(what))
            {
                return line.clone();
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "no {what:?} in {lines:#?}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn seen(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    fn hangup(&self) {
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn references_are_reloaded_on_sighup_and_on_change_and_a_broken_one_keeps_the_set() {
    let raw = std::fs::read(common::testdata("snp/gsg_attestation.bin")).unwrap();
    let report = cvm_measure::snp::Report::parse(&raw).unwrap();
    let vcek = cvm_measure::snp::CertTableEntry {
        cert_type: cvm_measure::snp::CertType::VCEK,
        data: std::fs::read(common::testdata("snp/gsg_vcek.der")).unwrap(),
    };
    let evidence = cvm_measure::snp::trustee_evidence(&report, Some(vec![vcek])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let references = dir.path().join("references");
    std::fs::create_dir(&references).unwrap();
    let snp_reference = |measurement: &[u8]| {
        json!({
            "pcr": {},
            "snp_measurements": [cvm_formats::hex(measurement)],
            "snp_min_tcb": "waived",
        })
        .to_string()
    };
    // A is the reported image's; B another one's.
    std::fs::write(
        references.join("A.json"),
        snp_reference(report.measurement()),
    )
    .unwrap();
    std::fs::write(references.join("B.json"), snp_reference(&[0x0b; 48])).unwrap();
    // Not references: a hidden file (an editor's) and another extension.
    std::fs::write(references.join(".A.json.swp"), "{").unwrap();
    std::fs::write(references.join("notes.txt"), "{").unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(bin())
        .args(["kbs-serve", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--resources")
        .arg(dir.path())
        .arg("--reference")
        .arg(&references)
        .args(["--reload-every", "1"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let capture = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            capture.lock().unwrap().push(line);
        }
    });
    let broker = Serving { child, lines };
    let loaded = broker.wait_for("kbs-serve: loaded", 0);
    let digest = |file: &str| {
        use sha2::Digest;
        cvm_formats::hex(&sha2::Sha256::digest(std::fs::read(references.join(file)).unwrap())[..6])
    };
    assert_eq!(
        loaded,
        format!(
            "kbs-serve: loaded 2 references: A.json (sha256 {}: 0 PCRs, 1 SNP launch digests, 0 TDX MRTDs), B.json (sha256 {}: 0 PCRs, 1 SNP launch digests, 0 TDX MRTDs)",
            digest("A.json"),
            digest("B.json")
        )
    );
    broker.wait_for("listening on", 0);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(25));
    }

    // Both references judge the node, each named with its own reason.
    let why = attest_refused(port, &evidence);
    assert!(
        why.starts_with("no loaded reference matches: A.json: "),
        "{why}"
    );
    assert!(
        why.contains("; B.json: ") && why.contains("launch digest"),
        "{why}"
    );
    let seen = broker.seen();
    let refusal = broker.wait_for("kbs-serve: refused", seen.saturating_sub(1));
    assert!(
        refusal.contains("A.json") && refusal.contains("B.json"),
        "{refusal}"
    );

    // A removed, SIGHUP: only B is loaded and judges.
    std::fs::remove_file(references.join("A.json")).unwrap();
    let seen = broker.seen();
    broker.hangup();
    // (The poll may see the removal first and reload too: the SIGHUP's line is looked for.)
    let reloaded = broker.wait_for("kbs-serve: reloaded (SIGHUP)", seen);
    assert_eq!(
        reloaded,
        format!(
            "kbs-serve: reloaded (SIGHUP): 1 references: B.json (sha256 {}: 0 PCRs, 1 SNP launch digests, 0 TDX MRTDs)",
            digest("B.json")
        )
    );
    let why = attest_refused(port, &evidence);
    assert!(
        why.starts_with("no loaded reference matches: B.json: "),
        "{why}"
    );
    assert!(!why.contains("A.json"), "{why}");

    // B broken (seen by the poll, no signal): the reload fails by name and B stays.
    let seen = broker.seen();
    put(
        &references.join("B.json"),
        r#"{"pcr": {"11": {"sha256": "zz"}}}"#,
    );
    let failed = broker.wait_for("kbs-serve: reload", seen);
    assert!(
        failed.starts_with("kbs-serve: reload (a reference file changed) failed, keeping the 1 references loaded before (B.json): ")
            && failed.contains("B.json: PCR 11: bad hex"),
        "{failed}"
    );
    let why = attest_refused(port, &evidence);
    assert!(
        why.starts_with("no loaded reference matches: B.json: "),
        "{why}"
    );
    // And SIGHUP with the broken file fails the same way, the set kept.
    let seen = broker.seen();
    broker.hangup();
    let failed = broker.wait_for("kbs-serve: reload (SIGHUP)", seen);
    assert!(
        failed.starts_with(
            "kbs-serve: reload (SIGHUP) failed, keeping the 1 references loaded before (B.json): "
        ),
        "{failed}"
    );
    assert!(attest_refused(port, &evidence).starts_with("no loaded reference matches: B.json: "));

    // A back (a new file in the directory) and B repaired: the poll loads both.
    let seen = broker.seen();
    put(
        &references.join("A.json"),
        &snp_reference(report.measurement()),
    );
    put(&references.join("B.json"), &snp_reference(&[0x0b; 48]));
    let reloaded = broker.wait_for(
        "kbs-serve: reloaded (a reference file changed): 2 references: A.json",
        seen,
    );
    assert!(reloaded.contains(", B.json (sha256 "), "{reloaded}");
    let why = attest_refused(port, &evidence);
    assert!(
        why.starts_with("no loaded reference matches: A.json: "),
        "{why}"
    );
    // The broker is still up after all this.
    assert!(TcpStream::connect(("127.0.0.1", port)).is_ok());
}

#[test]
fn a_bad_reference_at_start_is_named_and_the_broker_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.json");
    std::fs::write(&good, r#"{"pcr": {"11": {"sha256": "00"}}}"#).unwrap();
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let same = dir.path().join("again");
    std::fs::create_dir(&same).unwrap();
    std::fs::copy(&good, same.join("good.json")).unwrap();
    for (extra, says) in [
        (
            dir.path().join("missing.json"),
            "missing.json: No such file",
        ),
        (
            empty.clone(),
            "no reference file (*.json) in this directory",
        ),
        (same.clone(), "two references are named \"good.json\""),
    ] {
        let out = Command::new(bin())
            .args(["kbs-serve", "--listen", "127.0.0.1:0", "--resources"])
            .arg(dir.path())
            .arg("--reference")
            .arg(&good)
            .arg("--reference")
            .arg(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("--reference") && err.contains(says), "{err}");
    }
}
