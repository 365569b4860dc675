//! The `cvm-measure` binary as a user meets it: help and version, `--opt=value`, repeatable
//! options, one-line usage errors (exit 2), sev-snp-measure's and systemd-measure's flag
//! names, and the broker's and the TDX verifier's options.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_cvm-measure");

/// (exit code, stdout, stderr)
fn measure<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn testdata(path: &str) -> String {
    common::testdata(path).display().to_string()
}

/// A usage error: exit 2, nothing on stdout, one line and the hint on stderr.
fn assert_usage_error(args: &[&str], says: &str) {
    let (code, out, err) = measure(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert!(out.is_empty(), "{args:?}: {out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{args:?}: {err}");
    assert!(lines[0].starts_with("cvm-measure"), "{err}");
    assert!(lines[0].contains(says), "{args:?}: {err}");
    assert!(lines[1].starts_with("For more information, try '"), "{err}");
    assert!(lines[1].ends_with("--help'."), "{err}");
}

#[test]
fn help_and_version() {
    for flag in ["--help", "-h"] {
        let (code, out, err) = measure(&[flag]);
        assert_eq!(code, 0, "{err}");
        assert!(out.contains("Usage: cvm-measure <COMMAND>"), "{out}");
        for sub in [
            "digest",
            "verity",
            "predict",
            "replay",
            "sign-pcr-policy",
            "evidence",
            "snp",
            "tdx",
            "launch",
            "verify",
            "kbs-serve",
        ] {
            assert!(
                out.contains(&format!("  {sub} ")),
                "{sub} missing from {out}"
            );
        }
        assert!(!out.contains("generate-assets"), "{out}");
    }
    for flag in ["--version", "-V"] {
        let (code, out, _) = measure(&[flag]);
        assert_eq!(code, 0);
        assert_eq!(
            out.trim(),
            format!("cvm-measure {}", env!("CARGO_PKG_VERSION"))
        );
    }
    let (code, out, _) = measure(&["verify", "tdx-quote", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Usage: cvm-measure verify tdx-quote [OPTIONS] <QUOTE>"),
        "{out}"
    );
    assert!(out.contains("--qe-min-isvsvn <N>"), "{out}");
    let (code, out, _) = measure(&["help", "snp"]);
    assert_eq!(code, 0);
    assert!(out.contains("--snp-ovmf-hash"), "{out}");
}

#[test]
fn usage_errors_are_one_line_and_a_hint() {
    assert_usage_error(&["frobnicate"], "unrecognized subcommand 'frobnicate'");
    assert_usage_error(&[], "requires a subcommand");
    assert_usage_error(&["verify"], "requires a subcommand");
    assert_usage_error(
        &["snp", "--ovmf", "x", "--vcpu", "2"],
        "similar argument exists: '--vcpus'",
    );
    assert_usage_error(&["digest"], "required arguments were not provided");
    assert_usage_error(
        &["predict", "--root-hash", "xyz"],
        "--root-hash \"xyz\" is not 64 hex digits",
    );
    assert_usage_error(
        &["verify", "snp-report", "r", "--vcek"],
        "a value is required for '--vcek",
    );
    assert_usage_error(
        &["predict", "--launch", "a.toml", "--json"],
        "cannot be used with",
    );
    // A single-valued option given twice is still refused.
    assert_usage_error(
        &["tdx", "--ovmf", "a", "--ovmf", "b"],
        "cannot be used multiple times",
    );
    // A failure of the work: exit 1, one line naming the input.
    let (code, _, err) = measure(&["digest", "/nonexistent/file"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("/nonexistent/file"), "{err}");
}

#[test]
fn options_take_equals_and_repeat() {
    let (report, vcek) = (
        testdata("snp/gsg_attestation.bin"),
        testdata("snp/gsg_vcek.der"),
    );
    let (code, out, err) = measure(&["evidence", &report]);
    assert_eq!(code, 0, "{err}");
    let measurement = out
        .lines()
        .find_map(|l| l.strip_prefix("measurement  "))
        .unwrap()
        .to_string();
    let base = [
        "verify",
        "snp-report",
        &report,
        "--allow-debug",
        "--waive-min-tcb",
    ];
    let vcek_eq = format!("--vcek={vcek}");
    // Any of several measurements (refused as "given twice" before).
    let (code, out, err) = measure(
        &[
            &base[..],
            &[
                &vcek_eq,
                "--measurement",
                &"00".repeat(48),
                "--measurement",
                &measurement,
            ],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"policy_decoded\""));
    let other = format!("--measurement={}", "11".repeat(48));
    let (code, _, err) = measure(
        &[
            &base[..],
            &["--vcek", &vcek, "--measurement", &"00".repeat(48), &other],
        ]
        .concat(),
    );
    assert_eq!(code, 1);
    assert!(err.contains("none of the 2 expected"), "{err}");
    // The same with --opt=value throughout.
    let (code, out_eq, _) = measure(&[
        "replay",
        &testdata("tdx/gtg_ccel_data.dat"),
        "--ccel",
        "--json",
    ]);
    assert_eq!(code, 0);
    let firmware = testdata("ovmf/ovmf_AmdSev_suffix.bin");
    let spaced = measure(&[
        "snp",
        "--ovmf",
        &firmware,
        "--vcpus",
        "2",
        "--vcpu-type",
        "EPYC-Milan",
    ]);
    let equals = measure(&[
        "snp",
        &format!("--ovmf={firmware}"),
        "--vcpus=2",
        "--vcpu-type=EPYC-Milan",
    ]);
    assert_eq!(spaced.0, 0, "{}", spaced.2);
    assert_eq!(spaced, equals);
    assert!(out_eq.contains("\"rtmr\""));
}

#[test]
fn sev_snp_measure_flags_give_our_digest() {
    let firmware = testdata("ovmf/ovmf_AmdSev_suffix.bin");
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, vec![7u8; 100_000]).unwrap();
    let kernel = kernel.to_str().unwrap();
    let ours = |args: &[&str]| {
        let (code, out, err) = measure(&[&["snp", "--ovmf", &firmware][..], args].concat());
        assert_eq!(code, 0, "{args:?}: {err}");
        out.trim().to_string()
    };
    let reference = ours(&[
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-Genoa",
        "--kernel",
        kernel,
        "--append",
        "console=ttyS0",
    ]);
    assert_eq!(reference.len(), 96);
    // The firmware digest as sev-snp-measure names its mode, and as a seed.
    let seed = ours(&["--firmware-digest"]);
    assert_eq!(ours(&["--mode", "snp:ovmf-hash"]), seed);
    let seeded = ours(&[
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-Genoa",
        "--kernel",
        kernel,
        "--append",
        "console=ttyS0",
        "--snp-ovmf-hash",
        &seed,
    ]);
    assert_eq!(seeded, reference);
    // The model as family, model and stepping (EPYC-Genoa: 25, 17, 0).
    let by_numbers = ours(&[
        "--mode=snp",
        "--vcpus=4",
        "--vcpu-family=25",
        "--vcpu-model=17",
        "--vcpu-stepping=0",
        &format!("--kernel={kernel}"),
        "--append=console=ttyS0",
        "--output-format=hex",
    ]);
    assert_eq!(by_numbers, reference);
    // base64 output is the same bytes.
    use base64::Engine;
    let b64 = ours(&[
        "--vcpus",
        "4",
        "--vcpu-type",
        "EPYC-Genoa",
        "--kernel",
        kernel,
        "--append",
        "console=ttyS0",
        "--output-format",
        "base64",
    ]);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    assert_eq!(cvm_formats::hex(&bytes), reference);
    // And sev-snp-measure itself agrees on those spellings, where it can be installed.
    let Some(venv) = common::python_package("sev-snp-measure", "0.0.13") else {
        return;
    };
    let theirs = common::stdout_of(
        Command::new(venv.join("bin/sev-snp-measure"))
            .args([
                "--mode=snp",
                "--vcpus=4",
                "--vcpu-family=25",
                "--vcpu-model=17",
                "--vcpu-stepping=0",
            ])
            .arg(format!("--ovmf={firmware}"))
            .arg(format!("--kernel={kernel}"))
            .args([
                "--append=console=ttyS0",
                "--output-format=hex",
                "--snp-ovmf-hash",
                &seed,
            ]),
    );
    assert_eq!(String::from_utf8_lossy(&theirs).trim(), reference);
}

#[test]
fn systemd_measure_section_flags_give_its_pcr11() {
    let systemd_measure = Path::new("/usr/lib/systemd/systemd-measure");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = [
        ("linux", "kernel"),
        ("pcrpkey", "a public key"),
        ("sbat", "sbat,1\n"),
        ("dtb", "a tree"),
        ("splash", "BM"),
    ];
    for (name, text) in files {
        std::fs::write(d.join(name), text).unwrap();
    }
    let path = |name: &str| d.join(name).display().to_string();
    let flags: Vec<String> = files
        .iter()
        .map(|(n, _)| format!("--{n}={}", path(n)))
        .collect();
    let (code, out, err) = measure(
        &[
            &[
                "predict".to_string(),
                format!("--root-hash={}", "ab".repeat(32)),
                "--bank=sha256".into(),
            ][..],
            &flags,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    // --bank selects the bank shown.
    assert!(
        !out.lines()
            .any(|l| l.starts_with("pcr") && l.contains("sha384")),
        "{out}"
    );
    let ours = out
        .lines()
        .find_map(|l| l.strip_prefix("pcr11 sha256 "))
        .unwrap()
        .trim()
        .to_string();
    // The sections without the boot phases, as systemd-measure computes them.
    let theirs = common::stdout_of(
        Command::new(systemd_measure)
            .arg("calculate")
            .args(&flags)
            .args([
                "--bank=sha256",
                "--phase=enter-initrd:leave-initrd:sysinit:ready",
            ]),
    );
    let theirs = String::from_utf8_lossy(&theirs);
    let theirs = theirs
        .lines()
        .find_map(|l| l.strip_prefix("11:sha256="))
        .unwrap();
    assert_eq!(ours, theirs);
    // A section flag without --linux is refused.
    assert_usage_error(
        &["predict", "--root-hash", &"ab".repeat(32), "--pcrpkey", "k"],
        "--linux",
    );
}

#[test]
fn tdx_quote_requirements() {
    let quote = testdata("tdx/gtg_cos-113-tdx-quote.dat");
    let (code, out, err) = measure(&["verify", "tdx-quote", &quote]);
    assert_eq!(code, 0, "{err}");
    let claims: serde_json::Value = serde_json::from_str(&out).unwrap();
    let field = |name: &str| claims[name].as_str().unwrap().to_string();
    // The exact values pass; others are refused by the check's name.
    let exact = [
        "--td-attributes",
        &field("td_attributes"),
        "--xfam",
        &field("xfam"),
        "--mrconfigid",
        &field("mrconfigid"),
        "--mrowner",
        &field("mrowner"),
        "--mrownerconfig",
        &field("mrownerconfig"),
        "--qe-min-isvsvn",
        "4",
    ]
    .map(String::from);
    let (code, _, err) = measure(
        &[
            &["verify".to_string(), "tdx-quote".into(), quote.clone()][..],
            &exact,
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{err}");
    let other = format!("{}01", "00".repeat(47));
    for (flag, value, check) in [
        ("--td-attributes", "0x1", "td_attributes"),
        ("--xfam", "0x3", "xfam"),
        ("--mrconfigid", other.as_str(), "mrconfigid"),
        ("--mrowner", other.as_str(), "mrowner"),
        ("--mrownerconfig", other.as_str(), "mrownerconfig"),
        ("--qe-min-isvsvn", "65535", "qe.isvsvn"),
    ] {
        let (code, _, err) = measure(&["verify", "tdx-quote", &quote, flag, value]);
        assert_eq!(code, 1, "{flag} {value}: {err}");
        assert!(
            err.contains(check) && err.contains("gtg_cos-113-tdx-quote.dat"),
            "{flag}: {err}"
        );
    }
    assert_usage_error(
        &["verify", "tdx-quote", &quote, "--mrowner", "00"],
        "expected 96 hex digits",
    );
    assert_usage_error(
        &["verify", "tdx-quote", &quote, "--xfam", "x"],
        "hexadecimal number",
    );
    // It passed without --td-attributes because it meets the default requirements
    // (SEPT_VE_DISABLE set, not migratable; refusals of the others: tdx::appraise_td's tests).
    let attributes =
        u64::from_str_radix(field("td_attributes").trim_start_matches("0x"), 16).unwrap();
    assert_ne!(
        attributes & (1 << 28),
        0,
        "the real quote has SEPT_VE_DISABLE"
    );
    assert_eq!(
        attributes & (1 << 29),
        0,
        "the real quote is not migratable"
    );
}

/// A port free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn post_auth(port: u16) -> String {
    let body = r#"{"version":"0.4.0","tee":"snp","extra-params":{}}"#;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST /kbs/v0/auth HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
}

#[test]
fn kbs_serve_limits_and_roots() {
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.json");
    std::fs::write(
        &reference,
        format!(
            r#"{{"pcr": {{"11": {{"sha256": "{}"}}}}}}"#,
            "00".repeat(32)
        ),
    )
    .unwrap();
    let reference = reference.display().to_string();
    let resources = dir.path().display().to_string();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let base = [
        "kbs-serve",
        "--listen",
        &listen,
        "--resources",
        &resources,
        "--reference",
        &reference,
    ];
    assert_usage_error(
        &[&base[..], &["--max-sessions", "0"]].concat(),
        "--max-sessions",
    );
    assert_usage_error(
        &[&base[..], &["--connection-age", "soon"]].concat(),
        "--connection-age",
    );
    let (code, _, err) = measure(&[&base[..], &["--tdx-root", &reference]].concat());
    assert_eq!(code, 1);
    assert!(
        err.contains("--tdx-root") && err.contains("reference.json"),
        "{err}"
    );
    // One session at most: the second challenge is refused until the first expires.
    let mut broker = Command::new(BIN)
        .args(base)
        .args(["--max-sessions", "1", "--session-age=60", "--tdx-root"])
        .arg(testdata("snp/ask_ark_milan.pem"))
        .arg(format!("--tdx-root={}", testdata("snp/gsg_vcek.pem")))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the broker did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let first = post_auth(port);
    let second = post_auth(port);
    broker.kill().unwrap();
    let out = broker.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(
        second.starts_with("HTTP/1.1 503") && second.contains("max_sessions"),
        "{second}"
    );
    assert!(
        log.contains("3 extra TDX roots") && log.contains("at most 1 sessions of 60 s"),
        "{log}"
    );
}

/// `predict --root-tree` with the root's digest manifest: the node measures a listed binary
/// with the manifest's digest, so a line that is not the file's digest is an error naming the
/// file and both digests; a matching manifest predicts what reading the binary predicts.
#[test]
fn predict_checks_the_roots_digest_manifest() {
    let tree = tempfile::tempdir().unwrap();
    let bin = tree.path().join("usr/bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("containerd"), b"abc").unwrap();
    let config = tree.path().join("config.toml");
    std::fs::write(
        &config,
        "[[service]]\nname = \"containerd\"\npath = \"/usr/bin/containerd\"\n",
    )
    .unwrap();
    let predict = || {
        measure(&[
            "predict".to_string(),
            "--root-hash".to_string(),
            "ab".repeat(32),
            "--config".to_string(),
            config.display().to_string(),
            "--root-tree".to_string(),
            tree.path().display().to_string(),
            "--json".to_string(),
        ])
    };
    let (code, without, err) = predict();
    assert_eq!(code, 0, "{err}");
    let manifest = tree.path().join("usr/lib/cvm-init/sha256sums");
    std::fs::create_dir_all(manifest.parent().unwrap()).unwrap();
    let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
    std::fs::write(&manifest, format!("{abc}  /usr/bin/containerd\n")).unwrap();
    let (code, with, err) = predict();
    assert_eq!(code, 0, "{err}");
    assert_eq!(with, without);
    let wrong = "11".repeat(32);
    std::fs::write(&manifest, format!("{wrong}  /usr/bin/containerd\n")).unwrap();
    let (code, out, err) = predict();
    assert_eq!(code, 1, "{out}");
    assert!(
        err.contains("sha256sums: lists 1111") && err.contains(&format!("SHA-256 is {abc}")),
        "{err}"
    );
    std::fs::write(&manifest, format!("{abc} /usr/bin/containerd\n")).unwrap();
    let (code, _, err) = predict();
    assert_eq!(code, 1);
    assert!(err.contains("line 1: expected two spaces"), "{err}");
}
