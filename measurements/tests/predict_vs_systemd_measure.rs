//! `cvm-measure predict` agrees with `systemd-measure calculate` (Debian's systemd) on PCR 11
//! for the same UKI sections and the boot phases cvm-init measures.

mod common;

use std::path::Path;
use std::process::Command;

const SYSTEMD_MEASURE: &str = "/usr/lib/systemd/systemd-measure";
const PHASES: &str = "enter-initrd:leave-initrd:sysinit:ready";

fn systemd_measure(dir: &Path) -> (String, String) {
    let out = Command::new(SYSTEMD_MEASURE)
        .current_dir(dir)
        .args([
            "calculate",
            "--linux=linux",
            "--initrd=initrd",
            "--osrel=osrel",
            "--cmdline=cmdline",
        ])
        .args(["--bank=sha256", "--bank=sha384"])
        .arg(format!("--phase={PHASES}"))
        .output()
        .expect("systemd-measure (Debian's systemd package) is on the machine");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |bank: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("11:{bank}=")))
            .unwrap_or_else(|| panic!("no {bank} line in {text}"))
            .to_string()
    };
    (value("sha256"), value("sha384"))
}

fn predict(args: &[&str]) -> serde_json::Value {
    let out = common::stdout_of(
        Command::new(env!("CARGO_BIN_EXE_cvm-measure"))
            .arg("predict")
            .args(["--root-hash", &"ab".repeat(32), "--json"])
            .args(args),
    );
    serde_json::from_slice(&out).unwrap()
}

/// A UKI with these sections (what the stub measures).
fn uki(sections: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let with_sizes: Vec<(&str, &[u8], u32)> = sections
        .iter()
        .map(|(n, c)| (*n, c.as_slice(), c.len() as u32))
        .collect();
    cvm_measure::predict::minimal_pe(&with_sizes)
}

#[test]
fn pcr11_matches_systemd_measure() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let linux = b"fake-kernel-bytes".to_vec();
    let initrd = b"fake-initrd".to_vec();
    let osrel = b"ID=cvm-test\n".to_vec();
    let cmdline = b"console=ttyS0 cvm.loglevel=debug".to_vec();
    for (name, bytes) in [
        ("linux", &linux),
        ("initrd", &initrd),
        ("osrel", &osrel),
        ("cmdline", &cmdline),
    ] {
        std::fs::write(d.join(name), bytes).unwrap();
    }
    let (sha256, sha384) = systemd_measure(d);

    let from_files = predict(&[
        "--linux",
        d.join("linux").to_str().unwrap(),
        "--initrd",
        d.join("initrd").to_str().unwrap(),
        "--osrel",
        d.join("osrel").to_str().unwrap(),
        "--cmdline",
        "console=ttyS0 cvm.loglevel=debug",
    ]);
    assert_eq!(from_files["pcr"]["11"]["sha256"], sha256);
    assert_eq!(from_files["pcr"]["11"]["sha384"], sha384);

    // The same sections inside a UKI, in file order different from the measuring order.
    let image = uki(&[
        (".initrd", initrd),
        (".cmdline", cmdline),
        (".osrel", osrel),
        (".linux", linux),
    ]);
    std::fs::write(d.join("uki.efi"), image).unwrap();
    let from_uki = predict(&["--uki", d.join("uki.efi").to_str().unwrap()]);
    assert_eq!(from_uki["pcr"]["11"]["sha256"], sha256);
    assert_eq!(from_uki["pcr"]["11"]["sha384"], sha384);
    // The UKI's command line carries the cvm.* options, so PCR 15 agrees too.
    assert_eq!(from_uki["pcr"]["15"], from_files["pcr"]["15"]);
}

#[test]
fn predict_names_bad_input() {
    let out = Command::new(env!("CARGO_BIN_EXE_cvm-measure"))
        .args(["predict", "--root-hash", "xyz"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--root-hash \"xyz\" is not 64 hex digits")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_cvm-measure"))
        .args([
            "predict",
            "--root-hash",
            &"00".repeat(32),
            "--uki",
            "/nonexistent.efi",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the UKI /nonexistent.efi"));
}
