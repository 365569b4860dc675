//! The events cvm-init measures, and their framing.
//!
//! Boot phases go into PCR 11 exactly as systemd-pcrphase measures them (`H(word)`, UTF-8, no
//! NUL), so that systemd's tools predict them. Everything else is an identity event in
//! [`IDENTITY_PCR`], whose measured bytes are `cvm-init:v1:<kind>:` followed by the payload:
//! kinds never contain `:`, so no two kinds (and no two versions) can produce the same bytes.
//! Absent inputs are measured as absent (a kind of their own), never skipped, so every boot of
//! the same configuration makes the same number of extends.

use crate::registers::{rtmr_for_pcr, Bank, Registers};

/// systemd-pcrphase's PCR.
pub const PHASE_PCR: u32 = 11;
/// The PCR of cvm-init's identity events. PCR 15 is systemd's "system identity" PCR (machine
/// ID, root file system, volume keys); with no systemd on the node it is ours. It maps to
/// RTMR2 on TDX, like PCR 11.
pub const IDENTITY_PCR: u32 = 15;
pub const FRAMING_VERSION: &str = "v1";

/// The boot phases, in order (systemd-pcrphase's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    EnterInitrd,
    LeaveInitrd,
    Sysinit,
    Ready,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::EnterInitrd,
        Phase::LeaveInitrd,
        Phase::Sysinit,
        Phase::Ready,
    ];

    pub fn word(self) -> &'static str {
        match self {
            Phase::EnterInitrd => "enter-initrd",
            Phase::LeaveInitrd => "leave-initrd",
            Phase::Sysinit => "sysinit",
            Phase::Ready => "ready",
        }
    }
}

/// One measured event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Phase(Phase),
    /// The verity root hash of the root file system.
    RootHash([u8; 32]),
    /// The `cvm.*` options of the kernel command line, in order.
    BootOptions(Vec<(String, Option<String>)>),
    /// The configuration file's bytes, or `None` when there is none.
    ConfigFile(Option<Vec<u8>>),
    /// The identity of the state disk, or `None` when the node has none.
    StateDisk(Option<Vec<u8>>),
    /// A workload binary right before its first exec.
    Workload {
        name: String,
        path: String,
        sha256: [u8; 32],
    },
    /// The identity of the state disk's volume key, right after it is unlocked (or made):
    /// HMAC-SHA256 keyed with the volume key over `cvm-init volume key identity`, never the
    /// key itself. A verifier that knows a node's value from its first boot sees a header and
    /// token the host substituted (they open another volume key).
    VolumeKey([u8; 32]),
    /// Moves the registers on once the state-disk key has been used, so that nothing sealed to
    /// the values before it unseals later in the same boot.
    SealBarrier,
}

impl Event {
    pub fn pcr(&self) -> u32 {
        match self {
            Event::Phase(_) => PHASE_PCR,
            _ => IDENTITY_PCR,
        }
    }

    /// The kind, as it appears in the framing and in the log.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Phase(_) => "phase",
            Event::RootHash(_) => "root-hash",
            Event::BootOptions(_) => "boot-options",
            Event::ConfigFile(Some(_)) => "config-file",
            Event::ConfigFile(None) => "config-file-absent",
            Event::StateDisk(Some(_)) => "state-disk",
            Event::StateDisk(None) => "state-disk-absent",
            Event::VolumeKey(_) => "volume-key",
            Event::Workload { .. } => "workload",
            Event::SealBarrier => "seal-barrier",
        }
    }

    /// The bytes that are hashed into the register.
    pub fn measured_bytes(&self) -> Vec<u8> {
        if let Event::Phase(p) = self {
            return p.word().as_bytes().to_vec();
        }
        let mut out = format!("cvm-init:{FRAMING_VERSION}:{}:", self.kind()).into_bytes();
        match self {
            Event::Phase(_) => unreachable!("handled above"),
            Event::RootHash(h) | Event::VolumeKey(h) => {
                out.extend_from_slice(crate::hex(h).as_bytes())
            }
            Event::BootOptions(options) => {
                for (key, value) in options {
                    out.extend_from_slice(key.as_bytes());
                    if let Some(v) = value {
                        out.push(b'=');
                        out.extend_from_slice(v.as_bytes());
                    }
                    out.push(b'\n');
                }
            }
            Event::ConfigFile(Some(bytes)) | Event::StateDisk(Some(bytes)) => {
                out.extend_from_slice(bytes)
            }
            Event::ConfigFile(None) | Event::StateDisk(None) | Event::SealBarrier => {}
            Event::Workload { name, path, sha256 } => {
                out.extend_from_slice(name.as_bytes());
                out.push(0);
                out.extend_from_slice(path.as_bytes());
                out.push(0);
                out.extend_from_slice(crate::hex(sha256).as_bytes());
            }
        }
        out
    }

    /// A short human description for the log (never secret: events carry no secrets).
    pub fn description(&self) -> String {
        match self {
            Event::Phase(p) => p.word().to_string(),
            Event::RootHash(h) => format!("root-hash {}", crate::hex(h)),
            Event::BootOptions(o) => format!("boot-options ({} options)", o.len()),
            Event::ConfigFile(Some(b)) => {
                format!("config-file sha256:{}", crate::hex(&Bank::Sha256.hash(b)))
            }
            Event::ConfigFile(None) => "config-file absent".into(),
            Event::StateDisk(Some(b)) => {
                format!("state-disk sha256:{}", crate::hex(&Bank::Sha256.hash(b)))
            }
            Event::StateDisk(None) => "state-disk absent".into(),
            Event::VolumeKey(h) => format!("volume-key {}", crate::hex(h)),
            Event::Workload { name, path, sha256 } => {
                format!("workload {name} {path} sha256:{}", crate::hex(sha256))
            }
            Event::SealBarrier => "seal-barrier".into(),
        }
    }

    /// The digest of this event in a bank.
    pub fn digest(&self, bank: Bank) -> Vec<u8> {
        bank.hash(&self.measured_bytes())
    }
}

/// Applies an event to simulated registers: both PCR banks, and the RTMR the PCR maps to.
pub fn apply(registers: &mut Registers, event: &Event) {
    let pcr = event.pcr() as usize;
    for bank in Bank::ALL {
        registers.extend_pcr(bank, pcr, &event.digest(bank));
    }
    if let Some(rtmr) = rtmr_for_pcr(event.pcr()) {
        registers.extend_rtmr(rtmr, &event.digest(Bank::Sha384));
    }
}

/// Splits a kernel command line into `(key, value)` parameters the way the kernel does
/// (`lib/cmdline.c`): space-separated, double quotes group spaces and are stripped, `--` ends
/// the kernel's parameters.
pub fn split_cmdline(cmdline: &[u8]) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
    let mut params = Vec::new();
    let mut rest = cmdline;
    loop {
        while let Some((&c, tail)) = rest.split_first() {
            if c.is_ascii_whitespace() {
                rest = tail;
            } else {
                break;
            }
        }
        if rest.is_empty() {
            break;
        }
        let mut in_quote = false;
        let mut end = rest.len();
        for (i, &c) in rest.iter().enumerate() {
            if c == b'"' {
                in_quote = !in_quote;
            } else if c.is_ascii_whitespace() && !in_quote {
                end = i;
                break;
            }
        }
        let token = &rest[..end];
        rest = &rest[end..];
        if token == b"--" {
            break;
        }
        params.push(split_token(token));
    }
    params
}

fn split_token(token: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    let strip = |s: &[u8]| -> Vec<u8> { s.iter().copied().filter(|&c| c != b'"').collect() };
    let mut in_quote = false;
    for (i, &c) in token.iter().enumerate() {
        if c == b'"' {
            in_quote = !in_quote;
        } else if c == b'=' && !in_quote {
            return (strip(&token[..i]), Some(strip(&token[i + 1..])));
        }
    }
    (strip(token), None)
}

/// The `cvm.*` options of a command line, in order, as the boot-options event carries them.
pub fn cvm_options(cmdline: &[u8]) -> Vec<(String, Option<String>)> {
    split_cmdline(cmdline)
        .into_iter()
        .filter(|(k, _)| k.starts_with(b"cvm."))
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(&k).into_owned(),
                v.map(|v| String::from_utf8_lossy(&v).into_owned()),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_measured_like_systemd() {
        assert_eq!(
            Event::Phase(Phase::EnterInitrd).measured_bytes(),
            b"enter-initrd"
        );
        assert_eq!(Event::Phase(Phase::Ready).pcr(), 11);
    }

    #[test]
    fn framing_separates_kinds_and_absence() {
        let present_empty = Event::ConfigFile(Some(Vec::new())).measured_bytes();
        let absent = Event::ConfigFile(None).measured_bytes();
        assert_eq!(present_empty, b"cvm-init:v1:config-file:");
        assert_eq!(absent, b"cvm-init:v1:config-file-absent:");
        assert_ne!(present_empty, absent);
        // A config file whose bytes imitate another kind still differs from it.
        let sneaky = Event::ConfigFile(Some(b"x".to_vec())).measured_bytes();
        assert!(sneaky.starts_with(b"cvm-init:v1:config-file:"));
        let w = Event::Workload {
            name: "a".into(),
            path: "/b".into(),
            sha256: [0; 32],
        };
        assert_eq!(
            w.measured_bytes(),
            [
                b"cvm-init:v1:workload:a\0/b\0".as_slice(),
                "00".repeat(32).as_bytes()
            ]
            .concat()
        );
        assert_eq!(w.pcr(), IDENTITY_PCR);
        let v = Event::VolumeKey([0xab; 32]);
        assert_eq!(
            v.measured_bytes(),
            [
                b"cvm-init:v1:volume-key:".as_slice(),
                "ab".repeat(32).as_bytes()
            ]
            .concat()
        );
        assert_eq!(v.pcr(), IDENTITY_PCR);
        assert_ne!(
            v.digest(Bank::Sha256),
            Event::RootHash([0xab; 32]).digest(Bank::Sha256)
        );
    }

    #[test]
    fn options_are_framed_in_order() {
        let options = cvm_options(
            b"console=ttyS0 cvm.debug cvm.loglevel=\"debug\" roothash=ab -- cvm.after=1",
        );
        assert_eq!(
            options,
            vec![
                ("cvm.debug".into(), None),
                ("cvm.loglevel".into(), Some("debug".into()))
            ]
        );
        assert_eq!(
            Event::BootOptions(options).measured_bytes(),
            b"cvm-init:v1:boot-options:cvm.debug\ncvm.loglevel=debug\n"
        );
    }

    #[test]
    fn apply_extends_both_banks_and_the_mapped_rtmr() {
        let mut r = Registers::default();
        apply(&mut r, &Event::Phase(Phase::EnterInitrd));
        assert_ne!(r.pcr(Bank::Sha256, 11), &[0u8; 32][..]);
        assert_ne!(r.pcr(Bank::Sha384, 11), &[0u8; 48][..]);
        assert_eq!(
            r.rtmr[2],
            Bank::Sha384.extend(&[0; 48], &Bank::Sha384.hash(b"enter-initrd"))
        );
    }
}
