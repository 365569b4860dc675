//! GUID partition tables, read strictly: the disk is the host's to rewrite, so every field is
//! checked before it is used. A damaged primary header with a good backup is used and
//! reported; both damaged is an error that says what is wrong with each.

use std::fmt;

use super::crc32::crc32;

/// Reads bytes of a disk. Implemented for files and block devices, and for byte slices in tests.
pub trait BlockRead {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
    fn size(&self) -> u64;
}

impl BlockRead for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        let src = self
            .get(start..end)
            .ok_or(std::io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> u64 {
        self.len() as u64
    }
}

impl BlockRead for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> u64 {
        use std::io::Seek;
        // Block devices report their size through seeking to the end.
        let mut f = self;
        f.seek(std::io::SeekFrom::End(0)).unwrap_or(0)
    }
}

/// A GUID as stored on disk (the first three fields little-endian).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const ZERO: Guid = Guid([0; 16]);

    /// From the 16 bytes in the order the text form shows them (as systemd derives partition
    /// UUIDs from a root hash).
    pub fn from_text_order(b: [u8; 16]) -> Guid {
        let mut d = b;
        d[0..4].reverse();
        d[4..6].reverse();
        d[6..8].reverse();
        Guid(d)
    }

    pub fn text_order(&self) -> [u8; 16] {
        // The swap is its own inverse.
        Guid::from_text_order(self.0).0
    }

    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (either case).
    pub fn parse(text: &str) -> Option<Guid> {
        let groups: Vec<&str> = text.split('-').collect();
        if groups.iter().map(|g| g.len()).collect::<Vec<_>>() != [8, 4, 4, 4, 12] {
            return None;
        }
        let hex = groups.concat();
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Guid::from_text_order(bytes))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.text_order();
        for (i, byte) in b.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Discoverable Partitions Specification type GUIDs for x86-64.
pub const ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
pub const ROOT_VERITY_X86_64: &str = "2c7357ed-ebd2-46d9-aec1-23d437ec2bf5";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// 1-based index in the entry array, as the kernel numbers partitions.
    pub number: u32,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub name: String,
}

impl Partition {
    pub fn sectors(&self) -> u64 {
        self.last_lba - self.first_lba + 1
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpt {
    pub sector_size: u64,
    pub disk_guid: Guid,
    pub partitions: Vec<Partition>,
    /// What was wrong but did not prevent reading (a damaged primary or backup).
    pub warnings: Vec<String>,
    /// The table came from the backup header. The kernel reads the backup only with the `gpt`
    /// option, so these partitions have to be announced to it.
    pub from_backup: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GptError {
    #[error("no protective MBR: {0}")]
    Mbr(String),
    #[error("both GPT headers are unusable: primary (LBA 1): {primary}; backup (LBA {backup_lba}): {backup}")]
    BothDamaged {
        primary: String,
        backup: String,
        backup_lba: u64,
    },
    #[error("the disk is too small for a GPT ({size} bytes)")]
    TooSmall { size: u64 },
    #[error("unsupported sector size {0}")]
    SectorSize(u64),
}

const HEADER_SIGNATURE: &[u8; 8] = b"EFI PART";
const MAX_ENTRIES: u32 = 4096;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// A header that passed its own checks.
struct Header {
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    disk_guid: Guid,
    entries_lba: u64,
    entry_count: u32,
    entry_size: u32,
    entries_crc: u32,
}

fn read_header(
    disk: &(impl BlockRead + ?Sized),
    lba: u64,
    sector: u64,
    sectors: u64,
) -> Result<Header, String> {
    let mut buf = vec![0u8; sector as usize];
    disk.read_at(lba * sector, &mut buf)
        .map_err(|e| format!("cannot read: {e}"))?;
    if &buf[0..8] != HEADER_SIGNATURE {
        return Err("bad signature (expected \"EFI PART\")".into());
    }
    let revision = le32(&buf, 8);
    if revision != 0x0001_0000 {
        return Err(format!("revision {revision:#010x} (expected 0x00010000)"));
    }
    let size = le32(&buf, 12) as u64;
    if !(92..=sector).contains(&size) {
        return Err(format!("header size {size} (expected 92 to {sector})"));
    }
    let stored_crc = le32(&buf, 16);
    let mut copy = buf[..size as usize].to_vec();
    copy[16..20].fill(0);
    let crc = crc32(&copy);
    if crc != stored_crc {
        return Err(format!(
            "header CRC {stored_crc:#010x} does not match the content ({crc:#010x})"
        ));
    }
    if le32(&buf, 20) != 0 {
        return Err("reserved field is not zero".into());
    }
    let my_lba = le64(&buf, 24);
    if my_lba != lba {
        return Err(format!("it says it is at LBA {my_lba}"));
    }
    let header = Header {
        alternate_lba: le64(&buf, 32),
        first_usable: le64(&buf, 40),
        last_usable: le64(&buf, 48),
        disk_guid: Guid(buf[56..72].try_into().unwrap()),
        entries_lba: le64(&buf, 72),
        entry_count: le32(&buf, 80),
        entry_size: le32(&buf, 84),
        entries_crc: le32(&buf, 88),
    };
    if header.alternate_lba >= sectors || header.alternate_lba == lba {
        return Err(format!(
            "alternate LBA {} is not another sector of the disk",
            header.alternate_lba
        ));
    }
    if header.first_usable > header.last_usable || header.last_usable >= sectors {
        return Err(format!(
            "usable LBAs {}..={} do not fit a disk of {sectors} sectors",
            header.first_usable, header.last_usable
        ));
    }
    if header.entry_size < 128
        || !header.entry_size.is_power_of_two()
        || header.entry_size as u64 > sector * 8
    {
        return Err(format!(
            "entry size {} (expected 128 × 2^n)",
            header.entry_size
        ));
    }
    if header.entry_count == 0 || header.entry_count > MAX_ENTRIES {
        return Err(format!(
            "{} entries (expected 1 to {MAX_ENTRIES})",
            header.entry_count
        ));
    }
    // At most 4096 entries of at most 8 sectors each: the product fits; the sum need not.
    let entries_bytes = header.entry_count as u64 * header.entry_size as u64;
    let entries_end = header
        .entries_lba
        .checked_add(entries_bytes.div_ceil(sector))
        .ok_or_else(|| {
            format!(
                "entry array at LBA {} ({entries_bytes} bytes) ends past the largest LBA",
                header.entries_lba
            )
        })?;
    let inside_usable =
        header.entries_lba <= header.last_usable && entries_end > header.first_usable;
    if header.entries_lba < 2
        || entries_end > sectors
        || inside_usable
        || (lba >= header.entries_lba && lba < entries_end)
    {
        return Err(format!(
            "entry array at LBA {} ({entries_bytes} bytes) overlaps the header, the usable space or the end of the disk",
            header.entries_lba
        ));
    }
    Ok(header)
}

fn read_entries(
    disk: &(impl BlockRead + ?Sized),
    h: &Header,
    sector: u64,
) -> Result<Vec<Partition>, String> {
    let mut buf = vec![0u8; h.entry_count as usize * h.entry_size as usize];
    disk.read_at(h.entries_lba * sector, &mut buf)
        .map_err(|e| format!("cannot read the entry array: {e}"))?;
    let crc = crc32(&buf);
    if crc != h.entries_crc {
        return Err(format!(
            "entry array CRC {:#010x} does not match the content ({crc:#010x})",
            h.entries_crc
        ));
    }
    let mut partitions: Vec<Partition> = Vec::new();
    for (i, e) in buf.chunks(h.entry_size as usize).enumerate() {
        let type_guid = Guid(e[0..16].try_into().unwrap());
        if type_guid == Guid::ZERO {
            continue;
        }
        let units: Vec<u16> = e[56..128]
            .chunks(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let p = Partition {
            number: i as u32 + 1,
            type_guid,
            unique_guid: Guid(e[16..32].try_into().unwrap()),
            first_lba: le64(e, 32),
            last_lba: le64(e, 40),
            attributes: le64(e, 48),
            name: String::from_utf16_lossy(&units),
        };
        if p.first_lba > p.last_lba || p.first_lba < h.first_usable || p.last_lba > h.last_usable {
            return Err(format!(
                "partition {} spans LBAs {}..={}, outside the usable {}..={}",
                p.number, p.first_lba, p.last_lba, h.first_usable, h.last_usable
            ));
        }
        if let Some(other) = partitions
            .iter()
            .find(|o| o.first_lba <= p.last_lba && p.first_lba <= o.last_lba)
        {
            return Err(format!(
                "partitions {} and {} overlap",
                other.number, p.number
            ));
        }
        if p.unique_guid == Guid::ZERO || partitions.iter().any(|o| o.unique_guid == p.unique_guid)
        {
            return Err(format!(
                "partition {} has a zero or repeated unique GUID {}",
                p.number, p.unique_guid
            ));
        }
        partitions.push(p);
    }
    Ok(partitions)
}

fn check_mbr(disk: &(impl BlockRead + ?Sized)) -> Result<(), GptError> {
    let mut mbr = [0u8; 512];
    disk.read_at(0, &mut mbr)
        .map_err(|e| GptError::Mbr(format!("cannot read sector 0: {e}")))?;
    if mbr[510..512] != [0x55, 0xaa] {
        return Err(GptError::Mbr(
            "sector 0 lacks the 55 AA boot signature".into(),
        ));
    }
    let protective = (0..4).any(|i| {
        let rec = &mbr[446 + 16 * i..462 + 16 * i];
        rec[4] == 0xee && le32(rec, 8) == 1
    });
    if !protective {
        return Err(GptError::Mbr(
            "no partition record of type EE starting at LBA 1".into(),
        ));
    }
    Ok(())
}

/// One header with its entries, or why not.
fn read_side(
    disk: &(impl BlockRead + ?Sized),
    lba: u64,
    sector: u64,
    sectors: u64,
) -> Result<(Header, Vec<Partition>), String> {
    let h = read_header(disk, lba, sector, sectors)?;
    let parts = read_entries(disk, &h, sector)?;
    Ok((h, parts))
}

/// Reads the GPT of a disk with this logical sector size.
pub fn read_gpt(disk: &(impl BlockRead + ?Sized), sector: u64) -> Result<Gpt, GptError> {
    if sector != 512 && sector != 4096 {
        return Err(GptError::SectorSize(sector));
    }
    let size = disk.size();
    let sectors = size / sector;
    if sectors < 6 {
        return Err(GptError::TooSmall { size });
    }
    check_mbr(disk)?;
    let last = sectors - 1;
    let primary = read_side(disk, 1, sector, sectors);
    let backup_lba = match &primary {
        Ok((h, _)) => h.alternate_lba,
        Err(_) => last,
    };
    let backup = read_side(disk, backup_lba, sector, sectors);
    let mut warnings = Vec::new();
    let mut from_backup = false;
    let (header, partitions) = match (primary, backup) {
        (Ok(p), Ok(b)) => {
            if p.0.disk_guid != b.0.disk_guid || p.1 != b.1 || b.0.alternate_lba != 1 {
                warnings.push(format!(
                    "the backup GPT (LBA {backup_lba}) differs from the primary; using the primary"
                ));
            }
            p
        }
        (Ok(p), Err(why)) => {
            warnings.push(format!(
                "backup GPT header (LBA {backup_lba}) is damaged: {why}; using the primary"
            ));
            p
        }
        (Err(why), Ok(b)) => {
            warnings.push(format!(
                "primary GPT header (LBA 1) is damaged: {why}; using the backup"
            ));
            from_backup = true;
            b
        }
        (Err(primary), Err(backup)) => {
            return Err(GptError::BothDamaged {
                primary,
                backup,
                backup_lba,
            })
        }
    };
    Ok(Gpt {
        sector_size: sector,
        disk_guid: header.disk_guid,
        partitions,
        warnings,
        from_backup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn guid_text_round_trip() {
        let g = Guid::parse(ROOT_X86_64).unwrap();
        // On disk the first three groups are little-endian.
        assert_eq!(&g.0[0..4], &[0xe3, 0xbc, 0x68, 0x4f]);
        assert_eq!(g.to_string(), ROOT_X86_64);
        assert_eq!(Guid::parse("4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"), Some(g));
        assert_eq!(Guid::parse("4f68bce3e8cd4db196e7fbcaf984b709"), None);
        assert_eq!(Guid::parse("4f68bce3-e8cd-4db1-96e7-fbcaf984b7zz"), None);
    }

    /// A disk of `sectors` with a protective MBR and a primary header whose CRC is valid.
    fn disk_with_header(sectors: usize, entries_lba: u64, entry_count: u32) -> Vec<u8> {
        let mut disk = vec![0u8; sectors * 512];
        disk[510] = 0x55;
        disk[511] = 0xaa;
        disk[446 + 4] = 0xee;
        disk[446 + 8] = 1;
        let h = &mut disk[512..604];
        h[0..8].copy_from_slice(HEADER_SIGNATURE);
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&1u64.to_le_bytes());
        h[32..40].copy_from_slice(&(sectors as u64 - 1).to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(sectors as u64 - 34).to_le_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&entry_count.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        let crc = crc32(h);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        disk
    }

    /// An entry array that would end past 2^64 - 1 sectors: the sum wrapped (a panic in debug
    /// builds, a wrapped range that slipped past the bounds checks in release).
    #[test]
    fn an_entry_array_past_the_last_lba_is_refused() {
        let disk = disk_with_header(100, u64::MAX - 1, 128);
        match read_gpt(disk.as_slice(), 512) {
            Err(GptError::BothDamaged { primary, .. }) => {
                assert!(primary.contains("ends past the largest LBA"), "{primary}")
            }
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        /// Arbitrary bytes never panic or index out of bounds.
        #[test]
        fn arbitrary_disks_never_panic(disk in proptest::collection::vec(any::<u8>(), 0..8192)) {
            let _ = read_gpt(disk.as_slice(), 512);
        }

        /// A protective MBR and a header with a valid CRC but arbitrary geometry, and an entry
        /// array whose CRC matches whatever bytes it holds: the deeper checks run, and never
        /// panic or index out of bounds.
        #[test]
        fn shaped_headers_never_panic(
            sectors in 6u64..96,
            alternate in 0u64..100,
            first_usable in 0u64..100,
            last_usable in 0u64..100,
            entries_lba in 0u64..100,
            entry_count in 0u32..40,
            entry_shift in 0u32..4,
            entries in proptest::collection::vec(any::<u8>(), 0..4096),
        ) {
            let mut disk = vec![0u8; sectors as usize * 512];
            disk[510] = 0x55;
            disk[511] = 0xaa;
            disk[446 + 4] = 0xee;
            disk[446 + 8] = 1;
            let entry_size = 128u32 << entry_shift;
            let start = (entries_lba * 512) as usize;
            let len = (entry_count * entry_size) as usize;
            if start < disk.len() {
                let end = (start + entries.len()).min(disk.len());
                disk[start..end].copy_from_slice(&entries[..end - start]);
            }
            let entries_crc = disk.get(start..start + len).map_or(0, crc32);
            let mut h = vec![0u8; 92];
            h[0..8].copy_from_slice(HEADER_SIGNATURE);
            h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
            h[12..16].copy_from_slice(&92u32.to_le_bytes());
            h[24..32].copy_from_slice(&1u64.to_le_bytes());
            h[32..40].copy_from_slice(&alternate.to_le_bytes());
            h[40..48].copy_from_slice(&first_usable.to_le_bytes());
            h[48..56].copy_from_slice(&last_usable.to_le_bytes());
            h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
            h[80..84].copy_from_slice(&entry_count.to_le_bytes());
            h[84..88].copy_from_slice(&entry_size.to_le_bytes());
            h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
            let crc = crc32(&h);
            h[16..20].copy_from_slice(&crc.to_le_bytes());
            disk[512..604].copy_from_slice(&h);
            let _ = read_gpt(disk.as_slice(), 512);
        }
    }
}
