//! OVMF images: the footer GUID table, SEV metadata (SNP and SEV-ES), TDVF metadata, and the
//! launch digests over whatever parses.
#![no_main]

use cvm_measure::snp::launch as snp_launch;
use cvm_measure::tdx::launch as tdx_launch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = snp_launch::Ovmf::parse_for(data, false);
    if snp_launch::Ovmf::parse(data).is_ok() && data.len() <= 1 << 20 {
        let _ = snp_launch::firmware_digest(data);
    }
    if let Ok(sections) = tdx_launch::sections(data) {
        let pages: u64 = sections.iter().map(|s| s.memory_data_size / 4096).sum();
        if pages <= 256 {
            let _ = tdx_launch::mrtd(data, tdx_launch::PageAddOrder::TwoPass);
        }
    }
});
