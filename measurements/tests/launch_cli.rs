//! One launch description, two uses: `cvm-measure launch qemu` (the QEMU arguments) and
//! `cvm-measure predict --launch` (what the hardware will measure). Each input of the
//! description changed in turn must change the prediction; the SNP digest must equal
//! sev-snp-measure's on the same inputs (when it can be installed); the TDX values must equal
//! `cvm-measure tdx`'s; and this host's QEMU must accept the SNP arguments up to the point
//! where it needs the hardware.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{stdout_of, testdata};

const OURS: &str = env!("CARGO_BIN_EXE_cvm-measure");

struct Snp {
    vcpus: u32,
    model: &'static str,
    cmdline: String,
    initrd: PathBuf,
}

fn snp_description(dir: &Path, name: &str, launch: &Snp, kernel: &Path) -> PathBuf {
    let file = dir.join(format!("{name}.toml"));
    let text = format!(
        "tee = \"snp\"\nvcpus = {}\nmemory_mib = 2048\nfirmware = {:?}\nkernel = {:?}\ninitrd = {:?}\ncmdline = {:?}\n[snp]\nvcpu_model = {:?}\n",
        launch.vcpus,
        testdata("ovmf/ovmf_AmdSev_suffix.bin"),
        kernel,
        launch.initrd,
        launch.cmdline,
        launch.model
    );
    std::fs::write(&file, text).unwrap();
    file
}

fn predict(file: &Path) -> serde_json::Value {
    serde_json::from_slice(&stdout_of(
        Command::new(OURS).arg("predict").arg("--launch").arg(file),
    ))
    .expect("JSON")
}

#[test]
fn each_snp_input_moves_the_digest_and_sev_snp_measure_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"a kernel ".repeat(30_000)).unwrap();
    let (initrd, other_initrd) = (dir.path().join("initrd"), dir.path().join("initrd2"));
    std::fs::write(&initrd, b"an initrd ".repeat(9_000)).unwrap();
    std::fs::write(&other_initrd, b"an initrd ".repeat(9_001)).unwrap();
    let variants = [
        ("base", copy(&initrd)),
        (
            "one-vcpu-more",
            Snp {
                vcpus: 3,
                ..copy(&initrd)
            },
        ),
        (
            "another-model",
            Snp {
                model: "EPYC-Milan",
                ..copy(&initrd)
            },
        ),
        (
            "one-byte-of-cmdline",
            Snp {
                cmdline: "console=ttyS0 roothash=0124".into(),
                ..copy(&initrd)
            },
        ),
        (
            "another-initrd",
            Snp {
                initrd: other_initrd,
                ..copy(&initrd)
            },
        ),
    ];
    let tool = common::python_package("sev-snp-measure", "0.0.13")
        .map(|venv| venv.join("bin/sev-snp-measure"));
    let mut seen = Vec::new();
    for (name, launch) in &variants {
        let file = snp_description(dir.path(), name, launch, &kernel);
        let values = predict(&file);
        let digest = values["snp_measurements"][0].as_str().unwrap().to_string();
        assert_eq!(values["trustee"]["snp_launch_measurement"][0], digest);
        assert_eq!(values["snp_policy"], "0x30000");
        assert_eq!(values["snp_guest_features"], "0x1");
        assert!(!seen.contains(&digest), "{name}: the digest did not move");
        seen.push(digest.clone());
        if let Some(tool) = &tool {
            let theirs = stdout_of(
                Command::new(tool)
                    .args(["--mode", "snp", "--output-format", "hex", "--ovmf"])
                    .arg(testdata("ovmf/ovmf_AmdSev_suffix.bin"))
                    .args([
                        "--vcpus",
                        &launch.vcpus.to_string(),
                        "--vcpu-type",
                        launch.model,
                    ])
                    .args(["--guest-features", "0x1", "--kernel"])
                    .arg(&kernel)
                    .arg("--initrd")
                    .arg(&launch.initrd)
                    .args(["--append", &launch.cmdline]),
            );
            let theirs = String::from_utf8_lossy(&theirs);
            assert_eq!(
                theirs.trim().lines().last(),
                Some(digest.as_str()),
                "{name}"
            );
        }
    }
    eprintln!(
        "{} launches, {} distinct digests{}",
        variants.len(),
        seen.len(),
        if tool.is_some() {
            ", each equal to sev-snp-measure's"
        } else {
            " (sev-snp-measure not installable here)"
        }
    );
}

fn copy(initrd: &Path) -> Snp {
    Snp {
        vcpus: 2,
        model: "EPYC-v4",
        cmdline: "console=ttyS0 roothash=0123".into(),
        initrd: initrd.to_path_buf(),
    }
}

#[test]
fn qemu_takes_the_snp_arguments_up_to_the_hardware() {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"k").unwrap();
    let file = snp_description(dir.path(), "launch", &copy(&kernel), &kernel);
    let args = String::from_utf8(stdout_of(
        Command::new(OURS).args(["launch", "qemu"]).arg(&file),
    ))
    .unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert!(args.contains(
        &"sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,policy=0x30000,kernel-hashes=on"
    ));
    let out = Command::new("qemu-system-x86_64")
        .args(&args)
        .args(["-display", "none", "-nodefaults"])
        .output()
        .expect("qemu-system-x86_64 is installed by make deps");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    // Past every option and object: only KVM (or SNP in KVM) is missing here.
    assert!(
        stderr.contains("KVM") || stderr.contains("kvm"),
        "QEMU refused the arguments before reaching KVM: {stderr}"
    );
    assert!(!stderr.contains("Invalid parameter"), "{stderr}");
    // A property QEMU does not know is refused before that: the check above can fail.
    let bogus: Vec<String> = args
        .iter()
        .map(|a| a.replace("kernel-hashes=on", "kernel-hashes=on,no-such-property=1"))
        .collect();
    let out = Command::new("qemu-system-x86_64")
        .args(&bogus)
        .args(["-display", "none", "-nodefaults"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Invalid parameter"));
    // And this host has no SEV-SNP: `launch check` says what is missing.
    let out = Command::new(OURS)
        .args(["launch", "check"])
        .arg(&file)
        .output()
        .unwrap();
    if !Path::new("/sys/module/kvm_amd/parameters/sev_snp").exists() {
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stderr).contains("SEV-SNP in KVM"));
    }
}

#[test]
fn the_tdx_prediction_is_cvm_measure_tdx_on_the_same_inputs() {
    let firmware = Path::new("/usr/share/ovmf/OVMF.fd");
    let Some(kernel) = std::fs::read_dir(common::workspace().join(".cache/kernel/root/boot"))
        .ok()
        .and_then(|mut d| d.find_map(|e| e.ok().map(|e| e.path())))
        .filter(|p| p.to_string_lossy().contains("vmlinuz"))
    else {
        eprintln!("no Debian kernel in .cache (make deps fetches it): skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"an initrd ".repeat(1000)).unwrap();
    let describe = |name: &str, memory: u32, cmdline: &str| {
        let file = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &file,
            format!(
                "tee = \"tdx\"\nvcpus = 2\nmemory_mib = {memory}\nfirmware = {firmware:?}\nkernel = {kernel:?}\ninitrd = {initrd:?}\ncmdline = {cmdline:?}\n"
            ),
        )
        .unwrap();
        file
    };
    let base = predict(&describe("base", 2048, "console=ttyS0"));
    let direct: serde_json::Value = serde_json::from_slice(&stdout_of(
        Command::new(OURS)
            .args(["tdx", "--ovmf"])
            .arg(firmware)
            .arg("--kernel")
            .arg(&kernel)
            .args(["--memory", "2048", "--initrd"])
            .arg(&initrd)
            .args(["--append", "console=ttyS0", "--json"]),
    ))
    .unwrap();
    assert_eq!(base["tdx_mrtds"], direct["tdx_mrtds"]);
    assert_eq!(base["tdx_rtmrs"], direct["tdx_rtmrs"]);
    assert_eq!(
        base["tdx_rtmr2_before_init"],
        direct["tdx_rtmr2_before_init"]
    );
    assert_eq!(base["trustee"]["mr_td"], direct["tdx_mrtds"]);
    // Less memory below 4 GiB moves the initrd QEMU patches into the kernel (RTMR 1); the
    // command line moves RTMR 2 only; the firmware alone decides MRTD.
    let less_memory = predict(&describe("memory", 1024, "console=ttyS0"));
    assert_ne!(less_memory["tdx_rtmrs"]["1"], base["tdx_rtmrs"]["1"]);
    let cmdline = predict(&describe("cmdline", 2048, "console=ttyS1"));
    assert_eq!(cmdline["tdx_rtmrs"]["1"], base["tdx_rtmrs"]["1"]);
    assert_ne!(
        cmdline["tdx_rtmr2_before_init"],
        base["tdx_rtmr2_before_init"]
    );
    assert_eq!(cmdline["tdx_mrtds"], base["tdx_mrtds"]);
}
