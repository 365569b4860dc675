//! The first-boot decision for the state disk, which must never destroy data: format only a
//! provably blank disk, redo only a format cvm-init itself started and never committed, open
//! only a header that is ours and valid, and refuse everything else without writing.
//!
//! Setup progress lives in the LUKS2 label: a format writes `cvm-state-uncommitted`; once the
//! file system exists, [`COMMITTED`] is written to the secondary copy, then to the primary.
//! No data is written before the commit, so redoing an uncommitted format loses nothing.

use super::luks2::{self, copy_label, Header, Luks2Error, Policy, DATA_OFFSET, HDR_SIZE};

pub const UNCOMMITTED: &str = "cvm-state-uncommitted";
pub const COMMITTED: &str = "cvm-state";

/// How much of the disk must be zero to call it blank: the whole LUKS2 metadata area.
pub const BLANK_PROBE: u64 = DATA_OFFSET;

/// What [`classify`] reads of a disk that starts with the LUKS2 magic: both header copies.
/// Only a disk without it is read through [`BLANK_PROBE`] (16 MiB read on every boot, about
/// 0.2 s under an emulated CPU, proves nothing more about a header).
pub const HEADER_PROBE: u64 = 2 * HDR_SIZE;

/// Whether `first` (at least [`HEADER_PROBE`] bytes, or the whole disk) is all [`classify`]
/// needs: it starts with the LUKS2 magic, or it is the whole disk.
pub fn header_probe_suffices(first: &[u8], device_size: u64) -> bool {
    first.starts_with(b"LUKS\xba\xbe") || first.len() as u64 >= BLANK_PROBE.min(device_size)
}

#[derive(Debug)]
pub enum DiskState {
    /// Zeros where any header would be: format it.
    Blank,
    /// A format of ours that never reached its commit: format it again.
    Uncommitted,
    /// Ours, committed and valid: open it.
    Ours(Box<Header>),
    /// Anything else: refuse, write nothing.
    Foreign(String),
}

/// Names what a non-blank, non-LUKS disk seems to hold, for the refusal message.
fn identify(head: &[u8]) -> String {
    let at = |o: usize, sig: &[u8]| head.get(o..o + sig.len()) == Some(sig);
    if at(1080, &[0x53, 0xef]) {
        "an ext2/3/4 file system".into()
    } else if at(0, b"XFSB") {
        "an XFS file system".into()
    } else if at(512, b"EFI PART") {
        "a GPT partition table".into()
    } else if at(16384, b"SKUL\xba\xbe") {
        "a LUKS2 secondary header behind a damaged primary".into()
    } else if at(510, &[0x55, 0xaa]) {
        "an MBR".into()
    } else {
        let first = head.iter().position(|&b| b != 0).unwrap_or(0);
        format!("unknown data (first non-zero byte at offset {first})")
    }
}

/// Classifies a disk from its first bytes: [`HEADER_PROBE`] of them when they start with the
/// LUKS2 magic, else [`BLANK_PROBE`] (or all of it when smaller). Zeros shorter than that
/// prove nothing: such a disk is refused, never called blank.
pub fn classify(head: &[u8], device_size: u64, policy: &Policy) -> DiskState {
    if !head.starts_with(b"LUKS\xba\xbe") {
        if !header_probe_suffices(head, device_size) {
            return DiskState::Foreign(format!(
                "only its first {} bytes were read, and a disk is blank only when its first {} are zero",
                head.len(),
                BLANK_PROBE.min(device_size)
            ));
        }
        if head.iter().all(|&b| b == 0) {
            return DiskState::Blank;
        }
        return DiskState::Foreign(identify(head));
    }
    match luks2::parse(head, device_size, policy) {
        Ok(header) if header.label == COMMITTED => DiskState::Ours(Box::new(header)),
        Ok(header) if header.label == UNCOMMITTED => DiskState::Uncommitted,
        Ok(header) => DiskState::Foreign(format!(
            "a valid LUKS2 header that is not cvm-init's state disk (label {:?})",
            header.label
        )),
        Err(Luks2Error::CopiesDiffer(why)) => {
            // An interrupted commit: the secondary already says committed, the primary not yet,
            // one sequence number apart. Anything else is a forgery or damage.
            match (copy_label(head, 0), copy_label(head, HDR_SIZE)) {
                (Some((p, ps)), Some((s, ss)))
                    if p == UNCOMMITTED && s == COMMITTED && ps.checked_add(1) == Some(ss) =>
                {
                    DiskState::Uncommitted
                }
                _ => DiskState::Foreign(format!("a LUKS2 header whose two copies differ ({why})")),
            }
        }
        Err(e) => DiskState::Foreign(format!("a LUKS2 header that fails validation: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::luks2::{FormatInput, KdfPolicy};

    const SIZE: u64 = 64 << 20;

    fn policy() -> Policy {
        Policy {
            integrity: false,
            kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
        }
    }

    fn formatted(label: &str) -> Vec<u8> {
        let mut n = 0u8;
        let vk = [9u8; 64];
        luks2::format(FormatInput {
            policy: policy(),
            uuid: "11111111-2222-4333-8444-555555555555",
            secret: b"secret",
            volume_key: &vk,
            label,
            token: None,
            random: &mut |b: &mut [u8]| {
                for x in b {
                    n = n.wrapping_add(31);
                    *x = n;
                }
            },
        })
        .unwrap()
        .to_vec()
    }

    #[test]
    fn blank_only_when_all_zero() {
        let zeros = vec![0u8; BLANK_PROBE as usize];
        assert!(matches!(
            classify(&zeros, SIZE, &policy()),
            DiskState::Blank
        ));
        let mut one = zeros.clone();
        one[BLANK_PROBE as usize - 1] = 1;
        let DiskState::Foreign(why) = classify(&one, SIZE, &policy()) else {
            panic!("not foreign")
        };
        assert!(
            why.contains(&format!("offset {}", BLANK_PROBE - 1)),
            "{why}"
        );
        // Zeros only as far as the header copies: not proof of a blank disk.
        let DiskState::Foreign(why) = classify(&zeros[..HEADER_PROBE as usize], SIZE, &policy())
        else {
            panic!("a short run of zeros called blank")
        };
        assert!(
            why.contains("only its first 32768 bytes were read"),
            "{why}"
        );
        // A disk smaller than the metadata area, read whole.
        assert!(matches!(
            classify(&zeros[..4096], 4096, &policy()),
            DiskState::Blank
        ));
    }

    #[test]
    fn file_systems_and_tables_are_named() {
        let mut ext4 = vec![0u8; BLANK_PROBE as usize];
        ext4[1080..1082].copy_from_slice(&[0x53, 0xef]);
        let DiskState::Foreign(why) = classify(&ext4, SIZE, &policy()) else {
            panic!()
        };
        assert!(why.contains("ext2/3/4"), "{why}");
        // A zeroed primary over our secondary is not blank: refused, never reformatted.
        let mut ours = formatted(COMMITTED);
        ours[..4096].fill(0);
        let DiskState::Foreign(why) = classify(&ours, SIZE, &policy()) else {
            panic!()
        };
        assert!(
            why.contains("secondary header behind a damaged primary"),
            "{why}"
        );
    }

    #[test]
    fn ours_uncommitted_and_foreign_labels() {
        assert!(matches!(
            classify(&formatted(COMMITTED), SIZE, &policy()),
            DiskState::Ours(_)
        ));
        assert!(matches!(
            classify(&formatted(UNCOMMITTED), SIZE, &policy()),
            DiskState::Uncommitted
        ));
        let DiskState::Foreign(why) = classify(&formatted("someone-else"), SIZE, &policy()) else {
            panic!()
        };
        assert!(why.contains("\"someone-else\""), "{why}");
    }

    #[test]
    fn commit_and_an_interrupted_commit() {
        let mut head = formatted(UNCOMMITTED);
        let mut committed = head.clone();
        luks2::relabel(&mut committed, COMMITTED).unwrap();
        assert!(matches!(
            classify(&committed, SIZE, &policy()),
            DiskState::Ours(_)
        ));
        // Power lost between the two copies: the secondary is committed, the primary is not.
        head[HDR_SIZE as usize..2 * HDR_SIZE as usize]
            .copy_from_slice(&committed[HDR_SIZE as usize..2 * HDR_SIZE as usize]);
        assert!(matches!(
            classify(&head, SIZE, &policy()),
            DiskState::Uncommitted
        ));
        // The reverse (primary committed, secondary not) is not something a commit leaves.
        let mut reverse = formatted(UNCOMMITTED);
        reverse[..HDR_SIZE as usize].copy_from_slice(&committed[..HDR_SIZE as usize]);
        assert!(matches!(
            classify(&reverse, SIZE, &policy()),
            DiskState::Foreign(_)
        ));
    }

    /// A primary at the largest sequence ID and a committed secondary at 0: `ps + 1` wrapped
    /// to 0 in release (an "interrupted commit", so the disk would be formatted again) and
    /// panicked in debug. It is a forgery: refused.
    #[test]
    fn a_sequence_id_that_wraps_is_not_an_interrupted_commit() {
        let mut head = formatted(UNCOMMITTED);
        let mut committed = head.clone();
        luks2::relabel(&mut committed, COMMITTED).unwrap();
        let hdr = HDR_SIZE as usize;
        head[hdr..2 * hdr].copy_from_slice(&committed[hdr..2 * hdr]);
        for (offset, seqid) in [(0, u64::MAX), (hdr, 0)] {
            let copy = &mut head[offset..offset + hdr];
            copy[0x10..0x18].copy_from_slice(&seqid.to_be_bytes());
            let sum = luks2::checksum(copy);
            copy[0x1c0..0x1e0].copy_from_slice(&sum);
        }
        let DiskState::Foreign(why) = classify(&head, SIZE, &policy()) else {
            panic!("not foreign")
        };
        assert!(why.contains("two copies differ"), "{why}");
    }

    #[test]
    fn a_header_that_fails_validation_is_foreign() {
        let mut head = formatted(COMMITTED);
        head[4200] ^= 1;
        let DiskState::Foreign(why) = classify(&head, SIZE, &policy()) else {
            panic!()
        };
        assert!(why.contains("fails validation"), "{why}");
    }
}
