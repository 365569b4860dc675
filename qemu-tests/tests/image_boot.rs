//! The node image `make image` built (target/image/out), booted as a cloud boots it: OVMF
//! (UEFI, TCG) → the UKI on the ESP → cvm-init → the verity root → the state disk (vTPM
//! sealed) → containerd and the kubelet → `cvm-init: ready`; the guest's PCR 11 (the UKI's
//! sections as systemd-stub measured them, then cvm-init's phases) must equal what `make
//! measurements` predicted. Run by `make image-test` (it needs the image and takes minutes),
//! not by `make test`.

use std::path::Path;
use std::time::{Duration, Instant};

use qemu_tests::support::{blank_state_disk, must, power_down, press_ctrl_alt_del};
use qemu_tests::{Guest, RunningGuest};

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// Firmware, a 20 MB UKI and the whole node under TCG.
const BOOT: Duration = Duration::from_secs(600);

/// The test image (`TEST_TREE`): the kubelet stand-in runs a pod through CRI from an image it
/// serves on the node; containerd pulls and runs it, the stand-in reaches both containers, and
/// the privileged one, with the node's root at /host, finds nothing an escaped workload could
/// use there.
fn test_pod(guest: &mut RunningGuest) {
    must(guest.wait_for("kubelet-standin: test pod: serving", BOOT));
    let deadline = Instant::now() + BOOT;
    while !["test pod: failed", "stopped and removed"]
        .iter()
        .any(|m| guest.serial_log().contains(m))
    {
        assert!(
            Instant::now() < deadline,
            "the test pod did not end in {BOOT:?}:\n{}",
            guest.serial_log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let log = guest.serial_log();
    let pod: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("kubelet-standin: test pod: "))
        .collect();
    eprintln!("image boot: the test pod:\n{}", pod.join("\n"));
    assert!(
        !log.contains("kubelet-standin: test pod: failed"),
        "the test pod failed"
    );
    // The pod's address, from the bridge network's host-local range.
    let ip = log
        .split("test pod: pod sandbox ")
        .nth(1)
        .and_then(|rest| rest.split(", pod IP ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("no pod IP on the console");
    assert!(ip.starts_with("10.88.0."), "pod IP {ip}");
    for expected in [
        "test pod: pulled cvm-test.invalid/probe:1 as sha256:".to_string(),
        format!("test pod: serve at {ip}:5555: a container of the test image"),
        format!("test pod: scan at {ip}:5556: effective capabilities 000001ffffffffff"),
        format!("test pod: scan at {ip}:5556: /host/usr/bin/containerd is there: this is the node's root"),
        format!("test pod: scan at {ip}:5556: no shell, interpreter, package manager or setuid/setgid file on the file system at /host (the node's root)"),
    ] {
        assert!(log.contains(&expected), "missing: {expected}");
    }
    assert!(
        !log.contains(&format!("test pod: scan at {ip}:5556: found ")),
        "the privileged container found something under /host"
    );
    // It scanned the root alone: the pseudo file systems and the state disk's mounts it saw
    // and did not enter.
    let scanned = log
        .lines()
        .find(|l| l.contains("other file systems not entered: "))
        .expect("the scan did not say what it left out");
    for mount in ["/proc", "/sys", "/var/lib/containerd"] {
        assert!(
            scanned.split_whitespace().any(|w| w == mount),
            "{mount} not among the file systems left out: {scanned}"
        );
    }
}

fn registers(log: &str) -> Vec<(String, String, String)> {
    log.lines()
        .filter_map(|l| l.split("cvm-init: register ").nth(1))
        .map(|rest| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string(), f[2].to_string())
        })
        .collect()
}

#[test]
fn the_image_boots_through_uefi_to_ready_and_measures_what_was_predicted() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/image/out");
    let raw = out.join("cvm.raw");
    assert!(
        raw.exists(),
        "{} missing: run `make image` first",
        raw.display()
    );
    let measurements: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("measurements.json"))
            .expect("measurements.json: run `make measurements` first"),
    )
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let disk = blank_state_disk(work.path());
    let started = Instant::now();
    let mut guest = Guest::uefi("image", Path::new(OVMF_CODE), Path::new(OVMF_VARS), &raw)
        .state_disk(&disk, "cvm-state")
        .network(true)
        .memory_mib(1024)
        .allow_reboot(true)
        .start();
    must(guest.wait_for("cvm-init: ready", BOOT));
    let to_ready = started.elapsed();
    let log = guest.serial_log();
    // The boot drawn (`cvm-measure timeline`) beside the image's outputs.
    let timed = guest.timed_serial_log();
    std::fs::write(out.join("boot.timed.log"), &timed).unwrap();
    match cvm_measure::timeline::svg_from_log(&timed, "make image-test boot") {
        Ok(svg) => {
            std::fs::write(out.join("boot-timeline.svg"), svg).unwrap();
            eprintln!(
                "image boot: timeline in {}",
                out.join("boot-timeline.svg").display()
            );
        }
        Err(e) => panic!("the boot's console cannot be drawn: {e}"),
    }
    // containerd's and the kubelet's digests came from the root's manifest.
    assert!(
        log.contains(
            "cvm-init: services: the digests of 2 of 2 binaries from the verified root's manifest"
        ),
        "the image's digest manifest was not used"
    );
    for phase in [
        "verity-root",
        "switch-root",
        "config-file",
        "modules-late",
        "network",
        "state",
        "modules-late-wait",
    ] {
        assert!(
            log.contains(&format!("cvm-init: phase {phase} ok")),
            "phase {phase} missing"
        );
    }
    assert!(
        log.contains("formatted on this boot"),
        "the state disk was not set up"
    );
    assert!(log.contains("containerd:"), "containerd did not run");
    assert!(
        log.contains("network: eth0 has 10.0.2.15/24"),
        "no DHCP lease on the image's network"
    );
    let observed = registers(&log);
    for bank in ["sha256", "sha384"] {
        let expected = measurements["pcr11_at_ready"][bank]
            .as_str()
            .unwrap_or_else(|| panic!("measurements.json has no PCR 11 {bank}"));
        let seen = observed
            .iter()
            .find(|(r, b, _)| r == "pcr11" && b == bank)
            .unwrap_or_else(|| panic!("the guest printed no PCR 11 {bank}"));
        assert_eq!(
            seen.2, expected,
            "PCR 11 {bank}: guest vs `make measurements`"
        );
    }
    // The boot path as OVMF measured it into the vTPM: the events `cvm-measure tdx --uki`
    // predicts for RTMR 1 (PCRs 4 and 5). With this fresh variable store and a blank state disk
    // attached, OVMF tries one boot option and comes back before booting the node's disk.
    let uki = std::fs::read(out.join("cvm.efi")).unwrap();
    let sections = cvm_measure::predict::pe_sections(&uki).unwrap();
    let disk = std::fs::read(&raw).unwrap();
    let gpt = cvm_measure::tdx::rtmr::gpt_event(&disk, 512).unwrap();
    // And RTMR 2's part before cvm-init (PCR 9): the load options and the initrd systemd-stub
    // serves, the `.initrd` section with the `.osrel` archive it adds.
    type Sections = [(String, Vec<u8>)];
    fn predicted<D: sha2::Digest>(
        gpt: &[u8],
        uki: &[u8],
        sections: &Sections,
    ) -> Vec<(String, String)> {
        use cvm_measure::tdx::rtmr::{tpm_pcrs, uki_rtmr1_events, uki_rtmr2_events};
        let linux = cvm_measure::predict::section(sections, ".linux").unwrap();
        let mut events = uki_rtmr1_events::<D>(gpt, uki, linux, 1).unwrap();
        events.extend(uki_rtmr2_events::<D>(sections));
        tpm_pcrs::<D>(&events)
            .into_iter()
            .map(|(pcr, value)| (format!("pcr{pcr}"), cvm_formats::hex(&value)))
            .collect()
    }
    for (bank, expected) in [
        ("sha256", predicted::<sha2::Sha256>(&gpt, &uki, &sections)),
        ("sha384", predicted::<sha2::Sha384>(&gpt, &uki, &sections)),
    ] {
        assert_eq!(expected.len(), 3, "PCRs 4, 5 and 9");
        for (pcr, value) in expected {
            let seen = observed
                .iter()
                .find(|(r, b, _)| *r == pcr && b == bank)
                .unwrap_or_else(|| panic!("the guest printed no {pcr} {bank}"));
            assert_eq!(
                seen.2, value,
                "{pcr} {bank}: guest vs `cvm-measure tdx --uki`"
            );
        }
    }
    eprintln!(
        "image boot: QEMU start to `cvm-init: ready` in {:.1} s (OVMF, TCG, 1 vCPU)",
        to_ready.as_secs_f64()
    );
    // The test pod is the kubelet stand-in's (a real kubelet, KUBELET=, runs none). The
    // kubelet's first line may come after `ready`: which kubelet this is, it says there.
    must(guest.wait_for("kubelet: ", BOOT));
    if guest
        .serial_log()
        .contains("kubelet: kubelet-standin: this is a stand-in, not a kubelet")
    {
        test_pod(&mut guest);
    } else {
        eprintln!("image boot: no kubelet stand-in, so no test pod");
    }
    // An image built with PCR_KEY (`make image-test-signed`): the state disk was sealed to the
    // UKI's signing key, and the next boot opens it with the UKI's signature.
    if let Some(signature) = measurements.get("pcr_signature") {
        let fingerprint = signature["key_fingerprints"][0].as_str().unwrap();
        assert!(
            log.contains(&format!(
                "cvm-init: state: signed PCR policy of the UKI, key fingerprint {fingerprint}"
            )),
            "the boot did not use the UKI's signed policy (key {fingerprint})"
        );
        press_ctrl_alt_del(&mut guest);
        must(guest.wait_for_count("cvm-init: ready", 2, BOOT));
        let log = guest.serial_log();
        assert_eq!(
            log.matches("formatted on this boot").count(),
            1,
            "the second boot did not open the disk the first one formatted"
        );
        assert_eq!(
            log.matches("signed PCR policy of the UKI, key fingerprint")
                .count(),
            2
        );
        eprintln!("image boot: the second boot opened the state disk with the signed PCR policy");
    }
    power_down(&mut guest);
}
