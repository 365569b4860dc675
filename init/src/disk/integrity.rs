//! dm-integrity under dm-crypt for the state disk: the table parameters and a strict reading
//! of the superblock the kernel writes at the start of the LUKS2 data segment.
//!
//! The superblock is not authenticated, so nothing in it is trusted beyond what the kernel
//! needs to find the tags: every field must equal what cvm-init's table creates, and a
//! superblock that is missing on a committed disk is refused rather than created again (the
//! kernel would otherwise format the integrity device over the data).

use super::luks2::{DATA_OFFSET, SECTOR_SIZE};

/// The tag dm-crypt stores per 4096-byte block: an HMAC-SHA256 (the plain64 IV is not stored).
pub const TAG_SIZE: u16 = 32;
/// The superblock lives in the first sector of the integrity device; 4096 bytes are read and
/// written so that the access fits the disk's logical block size.
pub const SUPERBLOCK_LEN: usize = 4096;
const MAGIC: &[u8; 8] = b"integrt\0";
/// `fix_padding` (the only option cvm-init sets that the kernel records).
const FLAG_FIXED_PADDING: u32 = 8;
/// Superblock version 4: the first with the fixed-padding layout.
const VERSION_FIXED_PADDING: u8 = 4;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IntegrityError {
    #[error(
        "no dm-integrity superblock at the data segment (offset {DATA_OFFSET}): the integrity \
         metadata of a committed disk is gone, and creating it again would destroy the data"
    )]
    Missing,
    #[error("dm-integrity superblock field {field} is {found}, expected {expected}")]
    Field {
        field: &'static str,
        found: String,
        expected: String,
    },
}

/// What cvm-init uses from the superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// The size of the integrity device, in 512-byte sectors: what dm-crypt maps on top.
    pub provided_data_sectors: u64,
}

/// The dm-integrity journal of a new disk, in 512-byte sectors: 8 MiB at every disk size. The
/// kernel's default is 1/128 of the disk up to 64 MiB, and the kernel writes the whole journal
/// out when it formats the device, so the first boot grew with the disk. An existing disk keeps
/// the journal its superblock records.
pub const JOURNAL_SECTORS: u64 = 16384;

/// The dm-integrity parameters: the data segment of `device`, tags supplied by dm-crypt
/// (AEAD), journalled writes (a power cut never leaves a block whose tag does not match),
/// 4096-byte blocks, the padding layout current kernels and cryptsetup use, a fixed journal.
pub fn params(device: (u32, u32)) -> String {
    format!(
        "{}:{} {} {TAG_SIZE} J 3 block_size:{SECTOR_SIZE} fix_padding journal_sectors:{JOURNAL_SECTORS}",
        device.0,
        device.1,
        DATA_OFFSET / 512
    )
}

/// Parses and checks the superblock read from the start of the data segment of a device of
/// `segment_sectors` 512-byte sectors.
pub fn parse(block: &[u8], segment_sectors: u64) -> Result<Superblock, IntegrityError> {
    if block.len() < 64 || block.iter().all(|&b| b == 0) {
        return Err(IntegrityError::Missing);
    }
    let field = |field: &'static str, found: String, expected: String| {
        Err(IntegrityError::Field {
            field,
            found,
            expected,
        })
    };
    let u16_at = |o: usize| u16::from_le_bytes([block[o], block[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(block[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(block[o..o + 8].try_into().expect("8 bytes"));
    if &block[..8] != MAGIC {
        return field(
            "magic",
            format!("{:02x?}", &block[..8]),
            "\"integrt\\0\"".into(),
        );
    }
    if block[8] != VERSION_FIXED_PADDING {
        return field(
            "version",
            block[8].to_string(),
            VERSION_FIXED_PADDING.to_string(),
        );
    }
    if u16_at(10) != TAG_SIZE {
        return field(
            "integrity_tag_size",
            u16_at(10).to_string(),
            TAG_SIZE.to_string(),
        );
    }
    if u32_at(24) != FLAG_FIXED_PADDING {
        return field(
            "flags",
            format!("{:#x}", u32_at(24)),
            format!("{FLAG_FIXED_PADDING:#x} (fixed padding only)"),
        );
    }
    let log2_sectors_per_block = (SECTOR_SIZE / 512).trailing_zeros() as u8;
    if block[28] != log2_sectors_per_block {
        return field(
            "log2_sectors_per_block",
            block[28].to_string(),
            log2_sectors_per_block.to_string(),
        );
    }
    if u64_at(32) != 0 {
        return field("recalc_sector", u64_at(32).to_string(), "0".into());
    }
    if u32_at(12) == 0 {
        return field("journal_sections", "0".into(), "at least 1".into());
    }
    let provided = u64_at(16);
    // Tags and journal take room: the data can never fill the segment, and it is whole blocks.
    let per_block = u64::from(SECTOR_SIZE / 512);
    if provided == 0 || provided >= segment_sectors || provided % per_block != 0 {
        return field(
            "provided_data_sectors",
            provided.to_string(),
            format!("a positive multiple of {per_block} below the segment's {segment_sectors}"),
        );
    }
    Ok(Superblock {
        provided_data_sectors: provided,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A superblock as Linux 6.12 writes it for [`params`] (the fields cvm-init checks).
    fn superblock(provided: u64) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8] = 4;
        b[9] = 15;
        b[10..12].copy_from_slice(&32u16.to_le_bytes());
        b[12..16].copy_from_slice(&1u32.to_le_bytes());
        b[16..24].copy_from_slice(&provided.to_le_bytes());
        b[24..28].copy_from_slice(&8u32.to_le_bytes());
        b[28] = 3;
        b
    }

    #[test]
    fn the_table_is_fixed() {
        assert_eq!(
            params((254, 16)),
            "254:16 32768 32 J 3 block_size:4096 fix_padding journal_sectors:16384"
        );
    }

    #[test]
    fn a_valid_superblock_gives_the_size() {
        assert_eq!(
            parse(&superblock(2_000_000), 2_097_152),
            Ok(Superblock {
                provided_data_sectors: 2_000_000
            })
        );
    }

    #[test]
    fn a_zeroed_superblock_is_missing_not_blank() {
        assert_eq!(
            parse(&[0u8; SUPERBLOCK_LEN], 2_097_152),
            Err(IntegrityError::Missing)
        );
    }

    #[test]
    fn every_changed_field_is_named() {
        for (offset, value, name) in [
            (0usize, 0x58u8, "magic"),
            (8, 5, "version"),
            (10, 16, "integrity_tag_size"),
            (24, 9, "flags"),
            (28, 0, "log2_sectors_per_block"),
            (32, 1, "recalc_sector"),
            (12, 0, "journal_sections"),
        ] {
            let mut b = superblock(2_000_000);
            b[offset] = value;
            match parse(&b, 2_097_152) {
                Err(IntegrityError::Field { field, .. }) => assert_eq!(field, name),
                other => panic!("byte {offset} = {value}: {other:?}"),
            }
        }
        for provided in [0u64, 2_097_152, 3_000_000, 2_000_001] {
            assert!(
                matches!(
                    parse(&superblock(provided), 2_097_152),
                    Err(IntegrityError::Field {
                        field: "provided_data_sectors",
                        ..
                    })
                ),
                "{provided}"
            );
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4200)) {
            let _ = parse(&bytes, 1 << 21);
        }

        #[test]
        fn a_mutated_superblock_is_accepted_only_with_a_sane_size(
            at in 0usize..64, value in any::<u8>()) {
            let mut b = superblock(2_000_000);
            b[at] = value;
            if let Ok(sb) = parse(&b, 2_097_152) {
                prop_assert!(sb.provided_data_sectors < 2_097_152);
                prop_assert_eq!(sb.provided_data_sectors % 8, 0);
            }
        }
    }
}
