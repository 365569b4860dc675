//! Intel TDX's MRTD from the TDVF metadata of an OVMF image: one running SHA-384 over a
//! 128-byte record per page added (MEM.PAGE.ADD) and, for the sections the firmware marks
//! MR_EXTEND, a record and 256 data bytes per chunk measured (MR.EXTEND). QEMU versions add the
//! pages in two orders: page by page (each ADD followed by its EXTENDs), or a section's ADDs
//! first and its EXTENDs after; the caller says which.

use sha2::{Digest, Sha384};

const PAGE: usize = 4096;
const CHUNK: usize = 256;
const TDX_METADATA_OFFSET_GUID: &str = "e47a6535-984a-4798-865e-4685a7bf8ec2";
const TDX_METADATA_GUID: &str = "e9eaf9f3-168e-44d5-a8eb-7f4d8738f6ae";
const MR_EXTEND: u32 = 1;
const PAGE_AUG: u32 = 2;

/// A TDVF section (TDVF design guide, metadata section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Section {
    pub data_offset: u32,
    pub raw_data_size: u32,
    pub memory_address: u64,
    pub memory_data_size: u64,
    /// 0 BFV, 1 CFV, 2 TD_HOB, 3 TempMem, 4 PermMem, 5 Payload, 6 PayloadParam, 7 TD_INFO.
    pub kind: u32,
    pub attributes: u32,
}

/// Which order the host's QEMU adds a section's pages in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageAddOrder {
    /// Each page's ADD followed by its EXTENDs.
    SinglePass,
    /// All of a section's ADDs, then all its EXTENDs.
    TwoPass,
}

fn bad(what: &'static str, offset: usize, detail: String) -> crate::snp::launch::LaunchError {
    crate::snp::launch::LaunchError::Firmware {
        what,
        offset,
        detail,
    }
}

/// The TDVF sections of an OVMF image (its footer table must name the metadata).
pub fn sections(bytes: &[u8]) -> Result<Vec<Section>, crate::snp::launch::LaunchError> {
    let entries = crate::snp::launch::footer_entries(bytes)?;
    let size = bytes.len();
    let (data, at) = entries
        .iter()
        .find(|(guid, _, _)| *guid == crate::snp::launch::guid_le(TDX_METADATA_OFFSET_GUID))
        .map(|(_, d, at)| (d, *at))
        .ok_or_else(|| {
            bad(
                "TDX metadata",
                0,
                "the footer table has no TDX metadata entry: not a TDVF (use the unified OVMF.fd)"
                    .into(),
            )
        })?;
    let from_end = data
        .get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4")) as usize)
        .ok_or_else(|| bad("TDX metadata entry", at, "entry too short".into()))?;
    let desc = size
        .checked_sub(from_end)
        .filter(|&d| d >= 16 && d + 16 <= size)
        .ok_or_else(|| {
            bad(
                "TDX metadata",
                at,
                format!("offset {from_end:#x} from the end is outside the image"),
            )
        })?;
    if bytes[desc - 16..desc] != crate::snp::launch::guid_le(TDX_METADATA_GUID) {
        return Err(bad(
            "TDX metadata",
            desc - 16,
            "no TDVF metadata GUID before the descriptor".into(),
        ));
    }
    let count = crate::snp::launch::metadata_header(bytes, desc, b"TDVF", 32, "TDX metadata")?;
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4"));
    let mut sections = Vec::with_capacity(count);
    for i in 0..count {
        let s = desc + 16 + 32 * i;
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8"));
        let section = Section {
            data_offset: word(s),
            raw_data_size: word(s + 4),
            memory_address: u64_at(s + 8),
            memory_data_size: u64_at(s + 16),
            kind: word(s + 24),
            attributes: word(s + 28),
        };
        let raw_end = section.data_offset as u64 + section.raw_data_size as u64;
        if raw_end > size as u64
            || section.memory_address % PAGE as u64 != 0
            || section.memory_data_size % PAGE as u64 != 0
            || (section.attributes & MR_EXTEND != 0
                && (section.raw_data_size as u64) < section.memory_data_size)
        {
            return Err(bad(
                "TDX metadata section",
                s,
                format!("{section:?}: data outside the image, unaligned memory, or less data than it extends"),
            ));
        }
        sections.push(section);
    }
    Ok(sections)
}

/// MRTD for a launch of this firmware.
pub fn mrtd(
    bytes: &[u8],
    order: PageAddOrder,
) -> Result<[u8; 48], crate::snp::launch::LaunchError> {
    let sections = sections(bytes)?;
    let mut hash = Sha384::new();
    let record = |hash: &mut Sha384, tag: &[u8], gpa: u64| {
        let mut r = [0u8; 128];
        r[..tag.len()].copy_from_slice(tag);
        r[16..24].copy_from_slice(&gpa.to_le_bytes());
        hash.update(r);
    };
    let add = |hash: &mut Sha384, s: &Section, page: u64| {
        if s.attributes & PAGE_AUG == 0 {
            record(hash, b"MEM.PAGE.ADD", s.memory_address + page * PAGE as u64);
        }
    };
    let extend = |hash: &mut Sha384, s: &Section, page: u64| {
        if s.attributes & MR_EXTEND != 0 {
            for chunk in 0..(PAGE / CHUNK) as u64 {
                let offset = page * PAGE as u64 + chunk * CHUNK as u64;
                record(hash, b"MR.EXTEND", s.memory_address + offset);
                let at = (s.data_offset as u64 + offset) as usize;
                hash.update(&bytes[at..at + CHUNK]);
            }
        }
    };
    for s in &sections {
        let pages = s.memory_data_size / PAGE as u64;
        match order {
            PageAddOrder::SinglePass => {
                for page in 0..pages {
                    add(&mut hash, s, page);
                    extend(&mut hash, s, page);
                }
            }
            PageAddOrder::TwoPass => {
                for page in 0..pages {
                    add(&mut hash, s, page);
                }
                for page in 0..pages {
                    extend(&mut hash, s, page);
                }
            }
        }
    }
    Ok(hash.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_bookworm_ovmf_mrtd() {
        let Ok(fw) = std::fs::read("/usr/share/ovmf/OVMF.fd") else {
            eprintln!("no /usr/share/ovmf/OVMF.fd: skipped");
            return;
        };
        if cvm_formats::hex(&sha2::Sha256::digest(&fw)[..8]) != "7b456907dd0786d4" {
            eprintln!("/usr/share/ovmf/OVMF.fd is not the 2022.11-6+deb12u2 build: skipped");
            return;
        }
        let s = sections(&fw).unwrap();
        assert_eq!(
            (s[0].data_offset, s[0].raw_data_size, s[0].memory_address),
            (0x20000, 0x1e0000, 0xffe20000)
        );
        assert_eq!(s[0].attributes & MR_EXTEND, MR_EXTEND);
        assert_eq!(
            cvm_formats::hex(&mrtd(&fw, PageAddOrder::SinglePass).unwrap()),
            "4c7206f0f483c524f12c366c711e9049030a8d47c471ee5aa9c4999a08de4057fb887fed0744d5631a212967fb231c47"
        );
        let two = cvm_formats::hex(&mrtd(&fw, PageAddOrder::TwoPass).unwrap());
        assert!(
            two.starts_with("acccbcc8") && two.ends_with("f7e1"),
            "{two}"
        );
    }

    #[test]
    fn firmware_without_tdvf_metadata_is_refused() {
        let fw = crate::testdata::read("ovmf/ovmf_OvmfX64_suffix.bin");
        let err = mrtd(&fw, PageAddOrder::SinglePass).unwrap_err().to_string();
        assert!(
            err.contains("TDX") || err.contains("TDVF") || err.contains("outside"),
            "{err}"
        );
    }
}
