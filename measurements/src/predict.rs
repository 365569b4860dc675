//! Prediction of a node's registers from its image alone: what systemd-stub measures into
//! PCR 11 for the UKI's sections, then the events cvm-init extends, in the order it extends
//! them.

use cvm_formats::event::{apply, Event, Phase};
use cvm_formats::registers::{Bank, Registers};

/// The UKI sections systemd-stub measures, in the fixed order it measures them (`.pcrsig` is
/// never measured).
pub const UKI_SECTIONS: &[&str] = &[
    ".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".splash", ".dtb", ".uname", ".sbat",
    ".pcrpkey", ".profile",
];

/// The contents of the section `name` of a PE image's `pe_sections`, if it has one.
pub fn section<'a>(sections: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    sections
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, contents)| contents.as_slice())
}

/// Extends PCR 11 (both banks) with the sections as systemd-stub does: for each present,
/// non-empty section in the fixed order, `H(name ‖ NUL)` then `H(contents)`.
pub fn measure_sections(registers: &mut Registers, sections: &[(String, Vec<u8>)]) {
    for name in UKI_SECTIONS {
        let Some(contents) = section(sections, name) else {
            continue;
        };
        if contents.is_empty() {
            continue;
        }
        let mut tagged = name.as_bytes().to_vec();
        tagged.push(0);
        for bank in Bank::ALL {
            registers.extend_pcr(bank, 11, &bank.hash(&tagged));
            registers.extend_pcr(bank, 11, &bank.hash(contents));
        }
    }
}

use crate::uefi::pe::PeImage;
pub use crate::uefi::pe::{PeError, MAX_ZERO_FILL};

/// The sections of a PE image (a UKI), with their contents as loaded: VirtualSize bytes, the
/// raw data zero-extended when VirtualSize exceeds it.
pub fn pe_sections(image: &[u8]) -> Result<Vec<(String, Vec<u8>)>, PeError> {
    let pe = PeImage::parse(image)?;
    pe.sections
        .iter()
        .map(|s| Ok((s.name.clone(), pe.loaded(s)?)))
        .collect()
}

/// What the prediction starts from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// UKI sections measured by systemd-stub into PCR 11; empty for a direct kernel boot
    /// (no stub measures anything).
    pub sections: Vec<(String, Vec<u8>)>,
    /// The kernel command line (its `cvm.*` options are measured).
    pub cmdline: Vec<u8>,
    pub root_hash: [u8; 32],
    pub config_file: Option<Vec<u8>>,
    pub state_disk: Option<Vec<u8>>,
    /// The state disk's volume-key identity (`Event::VolumeKey`), known from the node's first
    /// boot (its log); measured right after the disk's identity.
    pub volume_key: Option<[u8; 32]>,
    /// `(name, path, sha256 of the binary)` of each service, in configuration order.
    pub workloads: Vec<(String, String, [u8; 32])>,
}

/// cvm-init's events for a boot that reaches `ready`, in the order it extends them.
pub fn boot_events(inputs: &Inputs) -> Vec<Event> {
    let mut events = vec![
        Event::Phase(Phase::EnterInitrd),
        Event::BootOptions(cvm_formats::event::cvm_options(&inputs.cmdline)),
        Event::RootHash(inputs.root_hash),
        Event::Phase(Phase::LeaveInitrd),
        Event::ConfigFile(inputs.config_file.clone()),
        Event::StateDisk(inputs.state_disk.clone()),
    ];
    events.extend(inputs.volume_key.map(Event::VolumeKey));
    events.extend([Event::SealBarrier, Event::Phase(Phase::Sysinit)]);
    for (name, path, sha256) in &inputs.workloads {
        events.push(Event::Workload {
            name: name.clone(),
            path: path.clone(),
            sha256: *sha256,
        });
    }
    events.push(Event::Phase(Phase::Ready));
    events
}

/// The registers at `ready`.
pub fn predict(inputs: &Inputs) -> Registers {
    predict_events(inputs, &boot_events(inputs))
}

/// How many events come before a key broker is asked for the state-disk key (`kbs`): the
/// configuration file is measured, the state disk's identity not yet (a disk's random UUID
/// would make the evidence unpredictable).
pub const KEY_RELEASE_EVENTS: usize = 5;

/// The registers when the node asks a key broker for its state-disk key: what the broker's
/// reference values are.
pub fn predict_key_release(inputs: &Inputs) -> Registers {
    predict_events(inputs, &boot_events(inputs)[..KEY_RELEASE_EVENTS])
}

fn predict_events(inputs: &Inputs, events: &[Event]) -> Registers {
    let mut registers = Registers::default();
    measure_sections(&mut registers, &inputs.sections);
    for event in events {
        apply(&mut registers, event);
    }
    registers
}

/// The services of a configuration file, `(name, path)` in order: what the init will measure.
pub fn services_of_config(text: &str) -> Result<Vec<(String, String)>, String> {
    #[derive(serde::Deserialize)]
    struct Service {
        name: String,
        path: String,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        service: Vec<toml::Value>,
    }
    let config: Config =
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?;
    config
        .service
        .into_iter()
        .map(|v| {
            let s: Service = v
                .try_into()
                .map_err(|e: toml::de::Error| e.to_string().trim().replace('\n', " "))?;
            Ok((s.name, s.path))
        })
        .collect()
}

/// A minimal PE32+ image with these `(name, contents, virtual size)` sections. Enough for
/// what systemd-stub measures; used to make test UKIs.
pub fn minimal_pe(sections: &[(&str, &[u8], u32)]) -> Vec<u8> {
    crate::uefi::pe::build_pe(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str, contents: &[u8]) -> (String, Vec<u8>) {
        (name.to_string(), contents.to_vec())
    }

    #[test]
    fn systemd_vectors() {
        // systemd's own test: .linux "HALLO\n", .initrd "foobar\n", no phases.
        let mut r = Registers::default();
        measure_sections(
            &mut r,
            &[s(".initrd", b"foobar\n"), s(".linux", b"HALLO\n")],
        );
        assert_eq!(
            cvm_formats::hex(r.pcr(Bank::Sha256, 11)),
            "37b48bd0b222394dbe3cceff2fca4660c4b0a90ae9369ec90b42f14489989c13"
        );
        assert_eq!(
            cvm_formats::hex(r.pcr(Bank::Sha384, 11)),
            "5573f9b2caf55b1d0a6a701f890662d682af961899f0419cf1e2d5ea4a6a68c1f25bd4f5b8a0865eeee82af90f5cb087"
        );
        r.extend_pcr(Bank::Sha256, 11, &Bank::Sha256.hash(b"foo"));
        assert_eq!(
            cvm_formats::hex(r.pcr(Bank::Sha256, 11)),
            "21c49c1242042649e09c156546fd7d425ccc3c67359f840507b30be4e0f6f699"
        );
    }

    fn tiny_pe(sections: &[(&str, &[u8], u32)]) -> Vec<u8> {
        minimal_pe(sections)
    }

    #[test]
    fn pe_sections_as_loaded() {
        let image = tiny_pe(&[
            (".linux", b"HALLO\n", 6),
            (".initrd", b"foobar\n", 7),
            (".sbat", b"ab", 4),
        ]);
        let sections = pe_sections(&image).unwrap();
        assert_eq!(sections[0], s(".linux", b"HALLO\n"));
        assert_eq!(sections[2], s(".sbat", b"ab\0\0"));
        let mut r = Registers::default();
        measure_sections(&mut r, &sections[..2]);
        assert_eq!(
            cvm_formats::hex(r.pcr(Bank::Sha256, 11)),
            "37b48bd0b222394dbe3cceff2fca4660c4b0a90ae9369ec90b42f14489989c13"
        );
        assert!(matches!(
            pe_sections(b"MZ"),
            Err(PeError::DosHeaderTruncated { len: 2 })
        ));
        let mut broken = image.clone();
        broken.truncate(broken.len() - 3);
        assert!(matches!(
            pe_sections(&broken),
            Err(PeError::SectionPastEnd { .. })
        ));
        // A hostile VirtualSize is refused, not allocated.
        let huge = tiny_pe(&[(".linux", b"HALLO\n", u32::MAX)]);
        let e = pe_sections(&huge).unwrap_err();
        assert!(
            e.to_string()
                .contains("section .linux would be 4294967295 bytes"),
            "{e}"
        );
        let fill = tiny_pe(&[(".bss", b"", MAX_ZERO_FILL as u32)]);
        assert_eq!(
            pe_sections(&fill).unwrap()[0].1.len(),
            MAX_ZERO_FILL as usize
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes, and real-looking PE headers with arbitrary section tables, never
        /// panic or read out of bounds.
        #[test]
        fn pe_parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024), table in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400), count in 0u16..12) {
            let _ = pe_sections(&bytes);
            let mut image = tiny_pe(&[(".linux", b"x", 1)]);
            image.truncate(0x44 + 20);
            image[0x46..0x48].copy_from_slice(&count.to_le_bytes());
            image.extend_from_slice(&table);
            let _ = pe_sections(&image);
        }
    }

    #[test]
    fn every_input_moves_the_prediction() {
        let base = Inputs {
            cmdline: b"console=ttyS0 cvm.loglevel=info".to_vec(),
            ..Default::default()
        };
        let p = predict(&base);
        let changed = [
            Inputs {
                cmdline: b"console=ttyS0 cvm.loglevel=debug".to_vec(),
                ..base.clone()
            },
            Inputs {
                root_hash: [1; 32],
                ..base.clone()
            },
            Inputs {
                config_file: Some(Vec::new()),
                ..base.clone()
            },
            Inputs {
                workloads: vec![("a".into(), "/a".into(), [0; 32])],
                ..base.clone()
            },
            Inputs {
                volume_key: Some([2; 32]),
                ..base.clone()
            },
        ];
        for c in changed {
            let q = predict(&c);
            assert_ne!(p.sha256[15], q.sha256[15]);
            assert_ne!(p.rtmr[2], q.rtmr[2]);
            assert_eq!(p.sha256[11], q.sha256[11], "phases alone are in PCR 11");
        }
        // Options that are not cvm.* are not measured (the UKI measures the whole line).
        let other = Inputs {
            cmdline: b"console=ttyS1 cvm.loglevel=info".to_vec(),
            ..base.clone()
        };
        assert_eq!(predict(&other), p);
    }

    #[test]
    fn the_init_part_of_rtmr2_is_what_its_log_replays_to() {
        let inputs = Inputs {
            cmdline: b"console=ttyS0 cvm.loglevel=info".to_vec(),
            root_hash: [3; 32],
            config_file: Some(b"[network]\n".to_vec()),
            sections: vec![(".linux".into(), b"kernel".to_vec())],
            ..Default::default()
        };
        let log: Vec<u8> = boot_events(&inputs)[..KEY_RELEASE_EVENTS]
            .iter()
            .flat_map(cvm_formats::jsonseq::record)
            .collect();
        let replayed = cvm_formats::jsonseq::replay(&cvm_formats::jsonseq::parse(&log).unwrap());
        // The predicted RTMRs hold cvm-init's events only (a UKI's sections are in the CC
        // event log): what a broker compares cvm-init's log with.
        assert_eq!(replayed.rtmr[2], predict_key_release(&inputs).rtmr[2]);
    }
}
