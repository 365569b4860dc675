//! TCG PC Client crypto-agile event logs (`binary_bios_measurements`) and the TDX CC event log
//! (CCEL), which has the same format with CC measurement-register indices. Every size field is
//! bounded; unknown algorithms are errors.

use cvm_formats::registers::{Bank, Registers};

pub const EV_NO_ACTION: u32 = 0x3;
const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
/// More digests per event than this is not a log any firmware writes.
const MAX_ALGORITHMS: u32 = 8;
/// A single event larger than this (16 MiB) is rejected.
const MAX_EVENT_SIZE: u32 = 16 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LogError {
    #[error("the log is truncated: {what} at byte {offset} needs {needed} bytes, {left} are left")]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        left: usize,
    },
    #[error("the first event is not a Spec ID event (EV_NO_ACTION with \"Spec ID Event03\"): {0}")]
    NoSpecId(String),
    #[error("unknown algorithm ID {id:#06x} in {place}")]
    UnknownAlgorithm { id: u16, place: &'static str },
    #[error(
        "algorithm {id:#06x} has digest size {size} in the Spec ID event, expected {expected}"
    )]
    DigestSize { id: u16, size: u16, expected: u16 },
    #[error("event {index} at byte {offset}: {detail}")]
    BadEvent {
        index: usize,
        offset: usize,
        detail: String,
    },
}

/// The TCG PC Client name of an event type, or its value in hex.
pub fn event_type_name(event_type: u32) -> String {
    let name = match event_type {
        0x1 => "EV_POST_CODE",
        0x3 => "EV_NO_ACTION",
        0x4 => "EV_SEPARATOR",
        0x5 => "EV_ACTION",
        0x6 => "EV_EVENT_TAG",
        0x7 => "EV_S_CRTM_CONTENTS",
        0x8 => "EV_S_CRTM_VERSION",
        0x9 => "EV_CPU_MICROCODE",
        0xa => "EV_PLATFORM_CONFIG_FLAGS",
        0xb => "EV_TABLE_OF_DEVICES",
        0xc => "EV_COMPACT_HASH",
        0xd => "EV_IPL",
        0xe => "EV_IPL_PARTITION_DATA",
        0xf => "EV_NONHOST_CODE",
        0x10 => "EV_NONHOST_CONFIG",
        0x11 => "EV_NONHOST_INFO",
        0x12 => "EV_OMIT_BOOT_DEVICE_EVENTS",
        0x8000_0001 => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        0x8000_0002 => "EV_EFI_VARIABLE_BOOT",
        0x8000_0003 => "EV_EFI_BOOT_SERVICES_APPLICATION",
        0x8000_0004 => "EV_EFI_BOOT_SERVICES_DRIVER",
        0x8000_0005 => "EV_EFI_RUNTIME_SERVICES_DRIVER",
        0x8000_0006 => "EV_EFI_GPT_EVENT",
        0x8000_0007 => "EV_EFI_ACTION",
        0x8000_0008 => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        0x8000_0009 => "EV_EFI_HANDOFF_TABLES",
        0x8000_000a => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        0x8000_000b => "EV_EFI_HANDOFF_TABLES2",
        0x8000_000c => "EV_EFI_VARIABLE_BOOT2",
        0x8000_00e0 => "EV_EFI_VARIABLE_AUTHORITY",
        other => return format!("{other:#010x}"),
    };
    name.to_string()
}

/// One algorithm of the log: its ID and digest size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Algorithm {
    pub id: u16,
    pub size: u16,
}

fn known_size(id: u16) -> Option<u16> {
    match id {
        0x0004 => Some(20), // sha1
        0x000b => Some(32), // sha256
        0x000c => Some(48), // sha384
        0x000d => Some(64), // sha512
        0x0012 => Some(32), // sm3_256
        _ => None,
    }
}

/// One parsed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEvent {
    pub index: u32,
    pub event_type: u32,
    pub digests: Vec<(u16, Vec<u8>)>,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    pub algorithms: Vec<Algorithm>,
    /// Events after the Spec ID event, EV_NO_ACTION ones included.
    pub events: Vec<LogEvent>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], LogError> {
        let left = self.bytes.len() - self.at;
        if n > left {
            return Err(LogError::Truncated {
                what,
                offset: self.at,
                needed: n,
                left,
            });
        }
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, LogError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, LogError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn rest_is_padding(&self) -> bool {
        let rest = &self.bytes[self.at..];
        rest.iter().all(|&b| b == 0xff) || rest.iter().all(|&b| b == 0)
    }
}

/// Parses a crypto-agile log (TPM or CCEL).
pub fn parse(bytes: &[u8]) -> Result<EventLog, LogError> {
    let mut r = Reader { bytes, at: 0 };
    // The Spec ID event, in the SHA-1 event format.
    let _index = r.u32("the first event's index")?;
    let event_type = r.u32("the first event's type")?;
    let _digest = r.take(20, "the first event's digest")?;
    let size = r.u32("the first event's size")?;
    if event_type != EV_NO_ACTION {
        return Err(LogError::NoSpecId(format!("type {event_type:#x}")));
    }
    if size > MAX_EVENT_SIZE {
        return Err(LogError::NoSpecId(format!("size {size}")));
    }
    let spec = r.take(size as usize, "the Spec ID event")?;
    let mut s = Reader { bytes: spec, at: 0 };
    if s.take(16, "the Spec ID signature")? != SPEC_ID_SIGNATURE {
        return Err(LogError::NoSpecId("wrong signature".into()));
    }
    let _platform = s.u32("the platform class")?;
    let _versions = s.take(4, "the spec version")?;
    let count = s.u32("the number of algorithms")?;
    if count == 0 || count > MAX_ALGORITHMS {
        return Err(LogError::NoSpecId(format!("{count} algorithms")));
    }
    let mut algorithms = Vec::new();
    for _ in 0..count {
        let id = s.u16("an algorithm ID")?;
        let size = s.u16("a digest size")?;
        let expected = known_size(id).ok_or(LogError::UnknownAlgorithm {
            id,
            place: "the Spec ID event",
        })?;
        if size != expected {
            return Err(LogError::DigestSize { id, size, expected });
        }
        algorithms.push(Algorithm { id, size });
    }
    let mut events = Vec::new();
    while r.at < bytes.len() {
        if r.rest_is_padding() {
            break;
        }
        let offset = r.at;
        let index_no = events.len() + 1;
        let bad = |detail: String| LogError::BadEvent {
            index: index_no,
            offset,
            detail,
        };
        let index = r.u32("an event index")?;
        let event_type = r.u32("an event type")?;
        let digest_count = r.u32("a digest count")?;
        if digest_count > count {
            return Err(bad(format!(
                "{digest_count} digests, the log has {count} algorithms"
            )));
        }
        let mut digests = Vec::new();
        for _ in 0..digest_count {
            let id = r.u16("a digest's algorithm")?;
            let alg = algorithms
                .iter()
                .find(|a| a.id == id)
                .ok_or(LogError::UnknownAlgorithm {
                    id,
                    place: "an event",
                })?;
            digests.push((id, r.take(alg.size as usize, "a digest")?.to_vec()));
        }
        let size = r.u32("an event size")?;
        if size > MAX_EVENT_SIZE {
            return Err(bad(format!("event size {size} is beyond {MAX_EVENT_SIZE}")));
        }
        let data = r.take(size as usize, "event data")?.to_vec();
        events.push(LogEvent {
            index,
            event_type,
            digests,
            data,
        });
    }
    Ok(EventLog { algorithms, events })
}

impl EventLog {
    fn digest_of(event: &LogEvent, bank: Bank) -> Option<&[u8]> {
        event
            .digests
            .iter()
            .find(|(id, _)| *id == bank.alg_id())
            .map(|(_, d)| d.as_slice())
    }

    /// Replays a TPM log into PCRs (sha256 and sha384 banks, where the log has them).
    /// EV_NO_ACTION is never extended; a StartupLocality event sets PCR 0's initial value.
    pub fn replay_tpm(&self) -> Result<Registers, LogError> {
        let mut regs = Registers::default();
        for (i, e) in self.events.iter().enumerate() {
            if e.event_type == EV_NO_ACTION {
                if let Some(rest) = e.data.strip_prefix(b"StartupLocality\0") {
                    let locality = *rest.first().unwrap_or(&0);
                    regs.sha256[0][31] = locality;
                    regs.sha384[0][47] = locality;
                }
                continue;
            }
            if e.index as usize >= cvm_formats::registers::PCRS {
                return Err(LogError::BadEvent {
                    index: i + 1,
                    offset: 0,
                    detail: format!("PCR {} does not exist", e.index),
                });
            }
            for bank in Bank::ALL {
                if let Some(d) = Self::digest_of(e, bank) {
                    regs.extend_pcr(bank, e.index as usize, d);
                }
            }
        }
        Ok(regs)
    }

    /// Replays a CCEL into RTMRs: index k (1..=4) extends RTMR k-1 with the sha384 digest.
    pub fn replay_ccel(&self) -> Result<Registers, LogError> {
        let mut regs = Registers::default();
        for (i, e) in self.events.iter().enumerate() {
            if e.event_type == EV_NO_ACTION {
                continue;
            }
            let bad = |detail: String| LogError::BadEvent {
                index: i + 1,
                offset: 0,
                detail,
            };
            let rtmr = match e.index {
                1..=4 => e.index as usize - 1,
                other => {
                    return Err(bad(format!(
                        "CC measurement register index {other} is not an RTMR"
                    )))
                }
            };
            let d =
                Self::digest_of(e, Bank::Sha384).ok_or_else(|| bad("no sha384 digest".into()))?;
            regs.extend_rtmr(rtmr, d);
        }
        Ok(regs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn testdata(path: &str) -> Vec<u8> {
        crate::testdata::read(path)
    }

    #[test]
    fn ccel_replay_reproduces_the_quote() {
        let log = parse(&testdata("tdx/gtg_ccel_data.dat")).unwrap();
        assert_eq!(
            log.algorithms,
            vec![Algorithm {
                id: 0x000c,
                size: 48
            }]
        );
        let regs = log.replay_ccel().unwrap();
        let quote = testdata("tdx/gtg_cos-113-tdx-quote.dat");
        for (i, offset) in [328usize, 376, 424, 472].iter().enumerate() {
            let expected = &quote[48 + offset..48 + offset + 48];
            assert_eq!(
                cvm_formats::hex(&regs.rtmr[i]),
                cvm_formats::hex(expected),
                "RTMR{i}"
            );
        }
        assert!(cvm_formats::hex(&regs.rtmr[0]).starts_with("3fa2f61f"));
    }

    #[test]
    fn tpm_log_replays() {
        let log = parse(&testdata("tpm/ubuntu-2104-no-secure-boot.bin")).unwrap();
        assert!(log.algorithms.iter().any(|a| a.id == 0x000b));
        assert!(log.events.len() > 20);
        let regs = log.replay_tpm().unwrap();
        // Firmware measures into PCRs 0-7; each of them moved.
        for pcr in 0..8 {
            assert_ne!(regs.sha256[pcr], vec![0u8; 32], "PCR {pcr}");
        }
    }

    #[test]
    fn truncation_and_bad_fields_are_named() {
        let bytes = testdata("tdx/gtg_ccel_data.dat");
        let err = parse(&bytes[..30]).unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        let mut unknown = bytes.clone();
        // The first algorithm ID of the Spec ID event: after the 32-byte event header, the
        // signature (16), platform class (4), versions (4) and the count (4).
        unknown[60] = 0x77;
        let err = parse(&unknown).unwrap_err();
        assert!(
            err.to_string().contains("unknown algorithm ID 0x0077"),
            "{err}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            if let Ok(log) = parse(&bytes) {
                let _ = log.replay_tpm();
                let _ = log.replay_ccel();
            }
        }

        #[test]
        fn mutated_real_logs_never_panic(at in 0usize..4096, value in any::<u8>(), cut in 0usize..8192) {
            let mut bytes = testdata("tdx/gtg_ccel_data.dat");
            let at = at % bytes.len();
            bytes[at] = value;
            bytes.truncate(cut.max(1));
            if let Ok(log) = parse(&bytes) {
                let _ = log.replay_ccel();
            }
        }
    }
}
