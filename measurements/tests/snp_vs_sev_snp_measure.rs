//! `cvm-measure snp` against sev-snp-measure (the reference calculator, from PyPI, installed
//! into a virtual environment under .cache when PyPI is reachable; skipped with a message
//! otherwise) on many launches: vCPU counts and models, VMM types, guest features, firmware
//! with and without kernel hashes, kernels, initrds and command lines. Errors must agree in
//! kind: where the tool refuses, so do we.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::testdata;

const VERSION: &str = "0.0.13";

/// The reference tool, installed once; None when it cannot be installed here.
fn reference_tool() -> Option<PathBuf> {
    common::python_package("sev-snp-measure", VERSION).map(|venv| venv.join("bin/sev-snp-measure"))
}

/// Runs a command; Ok(stdout's last line) or Err(stderr).
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().expect("runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .trim()
            .to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn both_calculators_agree() {
    let Some(tool) = reference_tool() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("kernel");
    let initrd = dir.path().join("initrd");
    std::fs::write(
        &kernel,
        (0..200_000u32)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    std::fs::write(&initrd, b"an initrd ".repeat(5000)).unwrap();
    let amdsev = testdata("ovmf/ovmf_AmdSev_suffix.bin");
    let x64 = testdata("ovmf/ovmf_OvmfX64_suffix.bin");
    let debian = PathBuf::from("/usr/share/ovmf/OVMF.fd");
    let mut firmware = vec![(amdsev.clone(), true), (x64, false)];
    if debian.exists() {
        firmware.push((debian, false));
    }
    let ours = env!("CARGO_BIN_EXE_cvm-measure");
    let mut compared = 0;
    for (fw, has_hashes) in &firmware {
        for (vcpus, model) in [
            (1, "EPYC-v4"),
            (2, "EPYC-Milan"),
            (4, "EPYC-Genoa"),
            (3, "EPYC-Rome"),
            (2, "EPYC-Turin"),
            (8, "EPYC"),
        ] {
            for vmm in ["QEMU", "ec2", "gce"] {
                for gf in ["0x1", "0x21"] {
                    for with_kernel in [false, true] {
                        let mut args: Vec<String> = vec![
                            "--ovmf".into(),
                            fw.display().to_string(),
                            "--vcpus".into(),
                            vcpus.to_string(),
                            "--vcpu-type".into(),
                            model.into(),
                            "--vmm-type".into(),
                            vmm.into(),
                            "--guest-features".into(),
                            gf.into(),
                        ];
                        if with_kernel {
                            args.extend([
                                "--kernel".into(),
                                kernel.display().to_string(),
                                "--initrd".into(),
                                initrd.display().to_string(),
                                "--append".into(),
                                format!("console=ttyS0 cvm.vcpus={vcpus}"),
                            ]);
                        }
                        let theirs = run(Command::new(&tool)
                            .args(["--mode", "snp", "--output-format", "hex"])
                            .args(&args));
                        let mine = run(Command::new(ours).arg("snp").args(&args));
                        match (&theirs, &mine) {
                            (Ok(a), Ok(b)) => assert_eq!(a, b, "{args:?}"),
                            (Err(_), Err(e)) => {
                                assert!(with_kernel && !has_hashes, "both refused {args:?}: {e}");
                                assert!(e.contains("SNP_KERNEL_HASHES"), "{e}");
                            }
                            _ => {
                                panic!("{args:?}: sev-snp-measure {theirs:?}, cvm-measure {mine:?}")
                            }
                        }
                        compared += 1;
                    }
                }
            }
        }
    }
    // SEV-ES (SHA-256 over firmware, hashes table and VMSAs).
    for (fw, _) in &firmware {
        for vcpus in ["1", "3"] {
            for with_kernel in [false, true] {
                let mut args: Vec<String> = vec![
                    "--ovmf".into(),
                    fw.display().to_string(),
                    "--vcpus".into(),
                    vcpus.into(),
                    "--vcpu-type".into(),
                    "EPYC-Milan".into(),
                ];
                if with_kernel {
                    args.extend([
                        "--kernel".into(),
                        kernel.display().to_string(),
                        "--append".into(),
                        "ro".into(),
                    ]);
                }
                let theirs = run(Command::new(&tool)
                    .args(["--mode", "seves", "--output-format", "hex"])
                    .args(&args));
                let mine = run(Command::new(ours)
                    .args(["snp", "--mode", "seves"])
                    .args(&args));
                match (&theirs, &mine) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "seves {args:?}"),
                    (Err(_), Err(_)) => assert!(with_kernel, "both refused seves {args:?}"),
                    _ => panic!("seves {args:?}: sev-snp-measure {theirs:?}, cvm-measure {mine:?}"),
                }
                compared += 1;
            }
        }
    }
    // The firmware digest seed.
    let theirs = run(Command::new(&tool)
        .args(["--mode", "snp:ovmf-hash", "--ovmf"])
        .arg(&amdsev))
    .unwrap();
    let mine = run(Command::new(ours)
        .args(["snp", "--firmware-digest", "--ovmf"])
        .arg(&amdsev))
    .unwrap();
    assert_eq!(theirs, mine);
    eprintln!("{compared} launches compared with sev-snp-measure {VERSION}: all agree");
}
