//! systemd's measurement log, `/run/log/systemd/tpm2-measure.log`: an RFC 7464 JSON text
//! sequence (each record is 0x1E, a JSON object, a newline) in the shape systemd-pcrlock reads:
//! `{"pcr":11,"digests":[{"hashAlg":"sha256","digest":"…"}],"content_type":"systemd",
//! "content":{"string":"enter-initrd","eventType":"phase"}}`.

use crate::event::Event;
use crate::registers::{rtmr_for_pcr, Bank, Registers, PCRS};

/// Where systemd (and cvm-init) keep the log.
pub const LOG_PATH: &str = "/run/log/systemd/tpm2-measure.log";
const RECORD_SEPARATOR: u8 = 0x1e;
/// A log larger than this (64 MiB) is not read.
pub const MAX_LOG: usize = 64 << 20;

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The record for one event, 0x1E and newline included. Written by hand so that the init does
/// not carry a JSON library.
pub fn record(event: &Event) -> Vec<u8> {
    let digests: Vec<String> = Bank::ALL
        .iter()
        .map(|b| {
            format!(
                "{{\"hashAlg\":\"{}\",\"digest\":\"{}\"}}",
                b.name(),
                crate::hex(&event.digest(*b))
            )
        })
        .collect();
    let event_type = match event {
        Event::Phase(_) => "phase".to_string(),
        other => format!("cvm-init:{}", other.kind()),
    };
    let json = format!(
        "{{\"pcr\":{},\"digests\":[{}],\"content_type\":\"systemd\",\"content\":{{\"string\":{},\"eventType\":{}}}}}",
        event.pcr(),
        digests.join(","),
        json_string(&event.description()),
        json_string(&event_type),
    );
    let mut out = Vec::with_capacity(json.len() + 2);
    out.push(RECORD_SEPARATOR);
    out.extend_from_slice(json.as_bytes());
    out.push(b'\n');
    out
}

/// One record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub pcr: u32,
    pub digests: Vec<(Bank, Vec<u8>)>,
    pub description: Option<String>,
    pub event_type: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JsonLogError {
    #[error("the log is {0} bytes, more than the {MAX_LOG} read")]
    TooLarge(usize),
    #[error("record {index}: {detail}")]
    Record { index: usize, detail: String },
    #[error("the log does not start with a record separator (0x1E)")]
    NoSeparator,
}

/// Parses a JSON-seq log. Records are checked strictly: a PCR below 24, digests of the right
/// size in hex, algorithms by name (sha1 and sha512 are read and ignored, others are errors).
pub fn parse(bytes: &[u8]) -> Result<Vec<Record>, JsonLogError> {
    if bytes.len() > MAX_LOG {
        return Err(JsonLogError::TooLarge(bytes.len()));
    }
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    if bytes[0] != RECORD_SEPARATOR {
        return Err(JsonLogError::NoSeparator);
    }
    let mut records = Vec::new();
    for (i, chunk) in bytes[1..].split(|&b| b == RECORD_SEPARATOR).enumerate() {
        let index = i + 1;
        let bad = |detail: String| JsonLogError::Record { index, detail };
        let value: serde_json::Value =
            serde_json::from_slice(chunk).map_err(|e| bad(format!("not JSON: {e}")))?;
        let pcr = value
            .get("pcr")
            .and_then(|p| p.as_u64())
            .filter(|&p| (p as usize) < PCRS)
            .ok_or_else(|| bad("no \"pcr\" below 24".into()))? as u32;
        let list = value
            .get("digests")
            .and_then(|d| d.as_array())
            .ok_or_else(|| bad("no \"digests\" array".into()))?;
        let mut digests = Vec::new();
        for d in list {
            let name = d
                .get("hashAlg")
                .and_then(|a| a.as_str())
                .ok_or_else(|| bad("a digest without \"hashAlg\"".into()))?;
            let hex = d
                .get("digest")
                .and_then(|h| h.as_str())
                .ok_or_else(|| bad("a digest without \"digest\"".into()))?;
            let bank = match (Bank::from_name(name), name) {
                (Some(b), _) => b,
                (None, "sha1" | "sha512") => continue,
                (None, other) => return Err(bad(format!("unknown hashAlg {other:?}"))),
            };
            let bytes = crate::verity::parse_hex(hex)
                .filter(|b| b.len() == bank.size())
                .ok_or_else(|| {
                    bad(format!(
                        "{name} digest {hex:?} is not {} bytes of hex",
                        bank.size()
                    ))
                })?;
            digests.push((bank, bytes));
        }
        let content = value.get("content");
        records.push(Record {
            pcr,
            digests,
            description: content
                .and_then(|c| c.get("string"))
                .and_then(|s| s.as_str())
                .map(str::to_string),
            event_type: content
                .and_then(|c| c.get("eventType"))
                .and_then(|s| s.as_str())
                .map(str::to_string),
        });
    }
    Ok(records)
}

/// Replays records into PCRs (each bank that has a digest) and into the RTMR each PCR maps to.
pub fn replay(records: &[Record]) -> Registers {
    let mut regs = Registers::default();
    for r in records {
        for (bank, digest) in &r.digests {
            regs.extend_pcr(*bank, r.pcr as usize, digest);
            if *bank == Bank::Sha384 {
                if let Some(rtmr) = rtmr_for_pcr(r.pcr) {
                    regs.extend_rtmr(rtmr, digest);
                }
            }
        }
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{apply, Phase};
    use proptest::prelude::*;

    #[test]
    fn written_records_read_back_and_replay_like_the_simulation() {
        let events = vec![
            Event::Phase(Phase::EnterInitrd),
            Event::RootHash([7; 32]),
            Event::ConfigFile(Some(b"a \"quoted\"\n config".to_vec())),
            Event::ConfigFile(None),
            Event::Phase(Phase::Ready),
        ];
        let log: Vec<u8> = events.iter().flat_map(record).collect();
        let records = parse(&log).unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(records[0].description.as_deref(), Some("enter-initrd"));
        assert_eq!(records[0].event_type.as_deref(), Some("phase"));
        assert_eq!(records[1].event_type.as_deref(), Some("cvm-init:root-hash"));
        let mut simulated = Registers::default();
        for e in &events {
            apply(&mut simulated, e);
        }
        assert_eq!(replay(&records), simulated);
    }

    #[test]
    fn bad_records_are_named() {
        let e = parse(b"\x1e{\"pcr\":99,\"digests\":[]}\n").unwrap_err();
        assert!(
            e.to_string().contains("record 1: no \"pcr\" below 24"),
            "{e}"
        );
        let e = parse(b"\x1e{\"pcr\":1,\"digests\":[{\"hashAlg\":\"md5\",\"digest\":\"00\"}]}\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown hashAlg \"md5\""), "{e}");
        let e =
            parse(b"\x1e{\"pcr\":1,\"digests\":[{\"hashAlg\":\"sha256\",\"digest\":\"00\"}]}\n")
                .unwrap_err();
        assert!(e.to_string().contains("not 32 bytes"), "{e}");
        let e = parse(b"\x1e{\"pcr\":1,\"digests\":[]}\n\x1e{broken").unwrap_err();
        assert!(e.to_string().contains("record 2: not JSON"), "{e}");
        assert_eq!(parse(b"{}").unwrap_err(), JsonLogError::NoSeparator);
        // sha1 digests (systemd writes every bank) are read and ignored.
        let r = parse(b"\x1e{\"pcr\":1,\"digests\":[{\"hashAlg\":\"sha1\",\"digest\":\"00\"}]}\n")
            .unwrap();
        assert!(r[0].digests.is_empty());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes);
        }

        #[test]
        fn arbitrary_text_after_a_separator_never_panics(text in ".{0,200}") {
            let mut bytes = vec![0x1e];
            bytes.extend_from_slice(text.as_bytes());
            let _ = parse(&bytes);
        }
    }
}
