//! Measured boot end to end, with swtpm: the PCRs the init reads back at ready, the replay of
//! the event log taken out of the guest, and `cvm-measure predict` for the image must agree;
//! a changed `cvm.*` option or root image moves the prediction and the guest alike.

use std::collections::BTreeMap;
use std::path::Path;

use cvm_formats::registers::{Bank, Registers};
use cvm_measure::predict::{predict, Inputs};
use qemu_tests::guest::BASE_CMDLINE;
use qemu_tests::support::{
    assert_fatal_before_workload, must, power_down, prepare, Prepared, BOOT,
};

const DUMP: &str = "[[service]]\nname = \"dump\"\npath = \"/bin/payload\"\nargs = [\"dump-log\"]\n";

/// What the guest showed: the registers it read back, and its event log.
struct Observed {
    registers: BTreeMap<(String, String), String>,
    log: Vec<u8>,
}

fn observe(prepared: &Prepared, name: &str, extra: &str) -> Observed {
    let mut guest = prepared.boot(name, extra, |g| g.tpm(true));
    must(guest.wait_for("dump: payload: log-end", BOOT));
    let text = guest.serial_log();
    let mut registers = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.split("cvm-init: register ").nth(1) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            registers.insert(
                (fields[0].to_string(), fields[1].to_string()),
                fields[2].to_string(),
            );
        }
    }
    let mut log = Vec::new();
    for line in text.lines() {
        if let Some(hex) = line.split("dump: payload: log-record ").nth(1) {
            log.push(0x1e);
            log.extend(cvm_formats::verity::parse_hex(hex.trim()).expect("hex record"));
        }
    }
    assert!(!registers.is_empty(), "the init printed no registers");
    assert!(!log.is_empty(), "no event log came out of the guest");
    Observed { registers, log }
}

fn prediction(prepared: &Prepared, config: &str, extra: &str) -> Registers {
    let payload = cvm_formats::sha256_file(&prepared.artifacts.payload).unwrap();
    let cmdline = format!(
        "{BASE_CMDLINE} {} {extra}",
        prepared.image.roothash_option()
    );
    predict(&Inputs {
        sections: Vec::new(), // direct kernel boot: no stub measures into PCR 11
        cmdline: cmdline.into_bytes(),
        root_hash: prepared.image.root.tree.root_hash,
        config_file: Some(config.as_bytes().to_vec()),
        state_disk: None,
        volume_key: None,
        workloads: vec![("dump".into(), "/bin/payload".into(), payload)],
    })
}

/// The three views agree, register by register, in both banks.
fn assert_agree(observed: &Observed, predicted: &Registers) {
    let records = cvm_formats::jsonseq::parse(&observed.log).expect("the guest's log parses");
    let replayed = cvm_formats::jsonseq::replay(&records);
    for pcr in [11usize, 15] {
        for bank in Bank::ALL {
            let key = (format!("pcr{pcr}"), bank.name().to_string());
            let guest = observed
                .registers
                .get(&key)
                .unwrap_or_else(|| panic!("the guest did not report {key:?}"));
            let replay = cvm_formats::hex(replayed.pcr(bank, pcr));
            let predict = cvm_formats::hex(predicted.pcr(bank, pcr));
            assert_eq!(
                guest,
                &replay,
                "PCR {pcr} {}: guest vs replay of its log",
                bank.name()
            );
            assert_eq!(
                guest,
                &predict,
                "PCR {pcr} {}: guest vs prediction",
                bank.name()
            );
        }
    }
    // The same number of events every boot of this configuration: 4 phases, 6 identity events
    // (options, root hash, config, state disk, seal barrier, one workload).
    assert_eq!(records.len(), 10, "events in the log");
}

#[test]
fn registers_log_and_prediction_agree_and_an_option_moves_them() {
    let prepared = prepare(Some(DUMP));
    let base = observe(&prepared, "measured", "");
    let base_prediction = prediction(&prepared, DUMP, "");
    assert_agree(&base, &base_prediction);

    // One cvm.* option more: the prediction and the guest move together.
    let option = "cvm.loglevel=info";
    let changed = observe(&prepared, "measured-option", option);
    let changed_prediction = prediction(&prepared, DUMP, option);
    assert_agree(&changed, &changed_prediction);
    assert_ne!(base_prediction.sha256[15], changed_prediction.sha256[15]);
    assert_ne!(base.registers, changed.registers);
    // Phases alone are in PCR 11: it does not move.
    assert_eq!(base_prediction.sha256[11], changed_prediction.sha256[11]);
}

#[test]
fn a_changed_root_image_moves_prediction_and_guest() {
    let variant = format!("{DUMP}# a different image\n");
    let base = prepare(Some(DUMP));
    let other = prepare(Some(&variant));
    assert_ne!(
        base.image.root.tree.root_hash,
        other.image.root.tree.root_hash
    );
    let base_prediction = prediction(&base, DUMP, "");
    let other_prediction = prediction(&other, &variant, "");
    assert_ne!(base_prediction.sha256[15], other_prediction.sha256[15]);
    let observed = observe(&other, "measured-image", "");
    assert_agree(&observed, &other_prediction);
    assert_ne!(
        observed.registers[&("pcr15".to_string(), "sha256".to_string())],
        cvm_formats::hex(&base_prediction.sha256[15])
    );
}

#[test]
fn without_a_tee_the_boot_stops_unless_told() {
    let prepared = prepare(Some(DUMP));
    let mut guest = prepared.boot("no-tee", "", |g| g.tpm(false));
    assert_fatal_before_workload(
        &mut guest,
        "no TEE found (no TDX guest device, no /dev/sev-guest, no /dev/tpmrm0)",
        "dump: payload:",
    );

    let mut guest = prepared.boot("tee-none", "cvm.tee=none", |g| g.tpm(false));
    must(guest.wait_for("cvm-init: ready", BOOT));
    let log = guest.serial_log();
    assert!(log.contains("cvm.tee=none: this boot is not measured"));
    assert!(log.contains("measuring into none"));
}

const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
const FIRMWARE_DUMP: &str =
    "[[service]]\nname = \"fwlog\"\npath = \"/bin/payload\"\nargs = [\"dump-firmware-log\"]\n";

/// The firmware's view of a direct boot is the part of a TDX prediction no TDX hardware is
/// needed to check: OVMF measures the same kernel image, actions, load options and initrd
/// into a vTPM's PCRs 2–6 and 9 that TDVF measures into RTMR 1 and 2 (PCR → RTMR mapping of
/// UEFI 2.10 §38.4.1; a TPM gets a separator per PCR where an RTMR gets one). So the real
/// OVMF and QEMU here, with swtpm, check `tdx::rtmr`'s kernel patching, Authenticode, event
/// order and load options, in both banks.
#[test]
fn ovmf_measures_a_direct_boot_as_the_rtmr_prediction_says() {
    use cvm_measure::tdx::rtmr::{DirectBoot, KernelAsMeasured, Predicted};
    let prepared = prepare(Some(FIRMWARE_DUMP));
    // Above 896 MiB, so that the kernel's XLF_CAN_BE_LOADED_ABOVE_4G (not initrd_addr_max) bounds
    // where QEMU puts the initrd.
    let memory_mib = 1536u64;
    let mut cmdline = String::new();
    let mut guest = prepared.boot("ovmf-direct", "", |g| {
        cmdline = g.kernel_cmdline().to_string();
        g.memory_mib(memory_mib as u32)
            .direct_uefi(Path::new(OVMF_CODE), Path::new(OVMF_VARS))
    });
    must(guest.wait_for("fwlog: payload: firmware-log-end", BOOT));
    let mut bytes = Vec::new();
    for line in guest.serial_log().lines() {
        if let Some(hex) = line.split("fwlog: payload: firmware-log ").nth(1) {
            bytes.extend(cvm_formats::verity::parse_hex(hex.trim()).expect("hex"));
        }
    }
    let log = cvm_measure::uefi::tcglog::parse(&bytes).expect("the firmware's log parses");
    let kernel = std::fs::read(&prepared.artifacts.kernel.vmlinuz).unwrap();
    let initrd = std::fs::read(&prepared.image.initrd).unwrap();
    let boot = DirectBoot {
        kernel: &kernel,
        initrd: Some(&initrd),
        cmdline: &cmdline,
        memory_bytes: memory_mib << 20,
        kernel_as_measured: KernelAsMeasured::QemuPatched,
    };
    // What the log says each RTMR would have received, one bank at a time.
    let observed = |alg: u16, rtmr1: bool| -> Vec<String> {
        let mut seen_separator = false;
        log.events
            .iter()
            .filter(|e| {
                if rtmr1 {
                    (2..=6).contains(&e.index)
                } else {
                    e.index == 9
                }
            })
            .filter(|e| e.event_type != cvm_measure::uefi::tcglog::EV_NO_ACTION)
            .filter(|e| {
                let separator = e.event_type == 0x4;
                let keep = !(separator && seen_separator);
                seen_separator |= separator;
                keep
            })
            .map(|e| {
                let digest = e.digests.iter().find(|(id, _)| *id == alg);
                cvm_formats::hex(&digest.expect("the bank's digest").1)
            })
            .collect()
    };
    let hex = |events: Vec<Predicted>| -> Vec<String> {
        events.iter().map(|e| cvm_formats::hex(&e.digest)).collect()
    };
    let banks: Vec<u16> = log.algorithms.iter().map(|a| a.id).collect();
    assert!(
        banks.contains(&0x000b),
        "the firmware log has no SHA-256 bank"
    );
    let mut checked = 0;
    for alg in banks {
        let (rtmr1, rtmr2) = match alg {
            0x000b => (
                hex(boot.rtmr1_events::<sha2::Sha256>().unwrap()),
                hex(boot.rtmr2_events::<sha2::Sha256>()),
            ),
            0x000c => (
                hex(boot.rtmr1_events::<sha2::Sha384>().unwrap()),
                hex(boot.rtmr2_events::<sha2::Sha384>()),
            ),
            _ => continue,
        };
        assert_eq!(
            observed(alg, true),
            rtmr1,
            "PCRs 2-6 (RTMR 1), bank {alg:#x}"
        );
        assert_eq!(observed(alg, false), rtmr2, "PCR 9 (RTMR 2), bank {alg:#x}");
        checked += 1;
    }
    // cvm-init reads the boot path's PCRs back at ready: they are those events folded, the
    // separator in each PCR (what `tdx::rtmr::tpm_pcrs` says a vTPM holds).
    must(guest.wait_for("cvm-init: ready", BOOT));
    let text = guest.serial_log();
    let printed = |register: &str, bank: &str| -> String {
        let prefix = format!("cvm-init: register {register} {bank} ");
        text.lines()
            .find_map(|l| l.split(&prefix).nth(1))
            .unwrap_or_else(|| panic!("the init printed no {register} {bank}"))
            .trim()
            .to_string()
    };
    fn pcrs<D: sha2::Digest>(boot: &DirectBoot) -> Vec<(u32, String)> {
        let mut events = boot.rtmr1_events::<D>().unwrap();
        events.extend(boot.rtmr2_events::<D>());
        cvm_measure::tdx::rtmr::tpm_pcrs::<D>(&events)
            .into_iter()
            .map(|(pcr, value)| (pcr, cvm_formats::hex(&value)))
            .collect()
    }
    for (bank, expected) in [
        ("sha256", pcrs::<sha2::Sha256>(&boot)),
        ("sha384", pcrs::<sha2::Sha384>(&boot)),
    ] {
        assert_eq!(
            expected.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            vec![4, 5, 9]
        );
        for (pcr, value) in expected {
            assert_eq!(
                printed(&format!("pcr{pcr}"), bank),
                value,
                "PCR {pcr} {bank}"
            );
        }
    }
    // The kernel OVMF measured is the one QEMU patched, not the file.
    let unpatched = DirectBoot {
        kernel_as_measured: KernelAsMeasured::Unpatched,
        ..boot
    };
    assert_ne!(
        observed(0x000b, true)[0],
        hex(unpatched.rtmr1_events::<sha2::Sha256>().unwrap())[0]
    );
    eprintln!("OVMF direct boot: RTMR 1 and 2 events as predicted in {checked} bank(s)");
    power_down(&mut guest);
}
