//! GUID partition tables as a hostile host writes them, read with 512- and 4096-byte sectors.
//! Each input is also tried with the CRCs of the header at LBA 1 (512-byte sectors) and of
//! the entry array it names recomputed, so that the geometry and entry checks are reached.
#![no_main]

use cvm_init::disk::crc32::crc32;
use cvm_init::disk::gpt::read_gpt;
use libfuzzer_sys::fuzz_target;

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Recomputes the CRCs of the primary header (512-byte sectors) where they can be.
fn fix_crcs(disk: &mut [u8]) {
    if disk.len() < 1024 {
        return;
    }
    let h = 512;
    let entries_lba = le64(disk, h + 72);
    let count = le32(disk, h + 80) as u64;
    let size = le32(disk, h + 84) as u64;
    let range = entries_lba
        .checked_mul(512)
        .and_then(|start| Some((start, start.checked_add(count.checked_mul(size)?)?)))
        .and_then(|(s, e)| Some((usize::try_from(s).ok()?, usize::try_from(e).ok()?)));
    if let Some((start, end)) = range {
        if let Some(entries) = disk.get(start..end) {
            let crc = crc32(entries);
            disk[h + 88..h + 92].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let header_size = (le32(disk, h + 12) as usize).clamp(92, 512);
    disk[h + 16..h + 20].fill(0);
    let crc = crc32(&disk[h..h + header_size]);
    disk[h + 16..h + 20].copy_from_slice(&crc.to_le_bytes());
}

fuzz_target!(|data: &[u8]| {
    let _ = read_gpt(data, 512);
    let _ = read_gpt(data, 4096);
    let mut fixed = data.to_vec();
    fix_crcs(&mut fixed);
    let _ = read_gpt(fixed.as_slice(), 512);
});
