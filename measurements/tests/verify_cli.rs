//! `cvm-measure verify` on the real reports and quotes of the repository's test data: claims as JSON
//! on success, a refusal naming the file and the reason (exit 1) otherwise.

use std::path::PathBuf;
use std::process::Command;

fn testdata(path: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata")
        .join(path)
        .display()
        .to_string()
}

/// (exit code, stdout, stderr)
fn measure(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cvm-measure"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn snp_reports_verify_and_expectations_are_enforced() {
    let (report, vcek) = (
        testdata("snp/gsg_attestation.bin"),
        testdata("snp/gsg_vcek.der"),
    );
    // This real report's policy allows debugging: refused unless accepted explicitly.
    let (code, _, err) = measure(&[
        "verify",
        "snp-report",
        &report,
        "--vcek",
        &vcek,
        "--waive-min-tcb",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("policy.debug"), "{err}");
    // No minimum TCB: refused by name (and how to give one or waive it).
    let (code, _, err) = measure(&[
        "verify",
        "snp-report",
        &report,
        "--vcek",
        &vcek,
        "--allow-debug",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("min_tcb") && err.contains("--waive-min-tcb"),
        "{err}"
    );
    let (code, out, err) = measure(&[
        "verify",
        "snp-report",
        &report,
        "--vcek",
        &vcek,
        "--allow-debug",
        "--report-data",
        "0102030405",
        "--min-tcb",
        "bootloader=2,tee=0,snp=5,microcode=68",
    ]);
    assert_eq!(code, 0, "{err}");
    let claims: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(claims["policy_decoded"]["debug"], true);
    assert_eq!(claims["reported_tcb"]["microcode"], 68);
    assert_eq!(claims["firmware"], "1.49.3");
    assert!(claims["verified"]["chain"]
        .as_str()
        .unwrap()
        .starts_with("Milan"));
    for (extra, why) in [
        (
            vec!["--min-tcb", "bootloader=2,tee=0,snp=6,microcode=68"],
            "reported_tcb: expected snp at least 6",
        ),
        (
            vec!["--min-tcb", "bootloader=2,tee=0,snp=5,microcode=69"],
            "reported_tcb: expected microcode at least 69",
        ),
        (vec!["--waive-min-tcb", "--min-abi", "1.0"], "policy.abi"),
        (vec!["--waive-min-tcb", "--no-smt"], "policy.smt"),
        (
            vec!["--waive-min-tcb", "--report-data", "ff"],
            "report data",
        ),
        (
            vec!["--waive-min-tcb", "--measurement", "00"],
            "none of the 1 expected",
        ),
    ] {
        let mut args = vec![
            "verify",
            "snp-report",
            &report,
            "--vcek",
            &vcek,
            "--allow-debug",
        ];
        args.extend(extra);
        let (code, _, err) = measure(&args);
        assert_eq!(code, 1, "{args:?}");
        assert!(
            err.contains(why) && err.contains("gsg_attestation.bin"),
            "{err}"
        );
    }
    // Another chip's certificate.
    let (code, _, err) = measure(&[
        "verify",
        "snp-report",
        &report,
        "--vcek",
        &testdata("snp/virtee_vcek_milan.der"),
        "--allow-debug",
        "--waive-min-tcb",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("does not verify"), "{err}");
}

#[test]
fn tdx_quotes_verify_with_their_event_log() {
    let quote = testdata("tdx/gtg_cos-113-tdx-quote.dat");
    let (code, out, err) = measure(&[
        "verify",
        "tdx-quote",
        &quote,
        "--ccel",
        &testdata("tdx/gtg_ccel_data.dat"),
    ]);
    assert_eq!(code, 0, "{err}");
    let claims: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(claims["rtmr"][0].as_str().unwrap().starts_with("3fa2f61f"));
    assert!(claims["verified"]["not_checked"]
        .as_str()
        .unwrap()
        .contains("collateral"));
    let (code, _, err) = measure(&["verify", "tdx-quote", &quote, "--mrtd", &"00".repeat(48)]);
    assert_eq!(code, 1);
    assert!(err.contains("MRTD"), "{err}");
    let (code, out, _) = measure(&[
        "verify",
        "tdx-quote",
        &testdata("tdx/gtg_quote_v5_sample.dat"),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("TD 1.5"));
    // Truncated garbage: a named error, not a panic.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.dat");
    std::fs::write(&bad, &std::fs::read(&quote).unwrap()[..700]).unwrap();
    let (code, _, err) = measure(&["verify", "tdx-quote", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn replay_events_lists_the_real_ccel() {
    let log = testdata("tdx/gtg_ccel_data.dat");
    let (code, out, err) = measure(&["replay", &log, "--ccel", "--events"]);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    // 43 extending events (PROVENANCE.md), every one printed with its register and type.
    assert_eq!(lines.len(), 43, "{out}");
    assert!(
        lines[0].starts_with("RTMR0  EV_EFI_HANDOFF_TABLES2"),
        "{}",
        lines[0]
    );
    assert!(
        lines[42].starts_with("RTMR1  EV_EFI_ACTION"),
        "{}",
        lines[42]
    );
    assert!(lines[42].ends_with("\"Exit Boot Services Returned with Success\""));
    let (code, out, err) = measure(&["replay", &log, "--ccel", "--events", "--json"]);
    assert_eq!(code, 0, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 43);
    assert_eq!(rows[0]["register"], "RTMR0");
    assert_eq!(rows[0]["type_value"], 0x8000_000bu32);
    // A truncated log is refused with the place named.
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.dat");
    std::fs::write(&cut, &std::fs::read(&log).unwrap()[..300]).unwrap();
    let (code, _, err) = measure(&["replay", cut.to_str().unwrap(), "--ccel", "--events"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cut.dat") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn tdx_predicts_rtmr1_for_a_direct_boot_and_refuses_bad_input() {
    let kernel = std::env::var_os("CVM_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/kernel"))
        .join("vmlinuz");
    let kernel = kernel.to_str().unwrap();
    let ovmf = "/usr/share/ovmf/OVMF.fd";
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"an initrd").unwrap();
    let initrd = initrd.to_str().unwrap();
    let run = |memory: &str, append: &str| {
        let (code, out, err) = measure(&[
            "tdx", "--ovmf", ovmf, "--kernel", kernel, "--initrd", initrd, "--memory", memory,
            "--append", append, "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    let base = run("2048", "console=ttyS0");
    assert_eq!(base["rtmr1_events"].as_array().unwrap().len(), 5);
    assert_eq!(base["rtmr2_events"].as_array().unwrap().len(), 2);
    let rtmr1 = base["tdx_rtmrs"]["1"].as_str().unwrap();
    assert_eq!(rtmr1.len(), 96);
    // The broker takes the output as reference values, beside a prediction's PCRs (what
    // `make measurements` merges).
    let mut merged = base.clone();
    merged["pcr"] = serde_json::json!({ "11": { "sha256": "00".repeat(32) } });
    let reference = cvm_measure::broker::Reference::from_prediction(&merged)
        .expect("the broker loads tdx --json output");
    assert_eq!(reference.tdx_rtmrs.len(), 1);
    assert_eq!(cvm_formats::hex(&reference.tdx_rtmrs[0].1), rtmr1);
    assert_eq!(
        reference
            .tdx_rtmr2_before_init
            .map(|d| cvm_formats::hex(&d)),
        base["tdx_rtmr2_before_init"].as_str().map(str::to_string)
    );
    // Memory (below 4 GiB: 1 GiB and 2 GiB differ, 2 GiB and 4 GiB do not on q35) moves the
    // initrd address QEMU patches into the kernel, so RTMR 1; the command line moves
    // RTMR 2's load options and (through the patched header's nothing) not RTMR 1.
    let more_memory = run("1024", "console=ttyS0");
    assert_ne!(more_memory["tdx_rtmrs"]["1"], base["tdx_rtmrs"]["1"]);
    let other_cmdline = run("2048", "console=hvc0");
    assert_eq!(other_cmdline["tdx_rtmrs"]["1"], base["tdx_rtmrs"]["1"]);
    assert_ne!(
        other_cmdline["tdx_rtmr2_before_init"],
        base["tdx_rtmr2_before_init"]
    );
    for (args, code, says) in [
        (
            vec!["tdx", "--ovmf", ovmf, "--kernel", kernel],
            2,
            "--memory",
        ),
        (
            vec!["tdx", "--ovmf", ovmf, "--initrd", initrd],
            2,
            "goes with --kernel",
        ),
        (vec!["tdx", "--ovmf", ovmf, "--uki", kernel], 2, "--disk"),
        (
            vec![
                "tdx", "--ovmf", ovmf, "--kernel", initrd, "--memory", "1024",
            ],
            1,
            "the kernel's setup header at byte 0 needs 4096 bytes",
        ),
        (
            vec![
                "tdx", "--ovmf", ovmf, "--kernel", kernel, "--memory", "lots",
            ],
            2,
            "expected MiB",
        ),
    ] {
        let (got, _, err) = measure(&args);
        assert_eq!(got, code, "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
