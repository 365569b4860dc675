//! PE images (the one parser, its Authenticode digest and UKI sections), bzImage setup headers
//! as QEMU patches them, and GPT disks.
#![no_main]

use cvm_measure::predict;
use cvm_measure::tdx::rtmr as tdx_rtmr;
use cvm_measure::uefi::pe::PeImage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(pe) = PeImage::parse(data) {
        let _ = pe.authenticode::<sha2::Sha384>();
        for section in &pe.sections {
            let _ = pe.loaded(section);
        }
    }
    let _ = tdx_rtmr::authenticode::<sha2::Sha384>(data);
    let _ = predict::pe_sections(data);
    let size = data.len() as u64 * 977;
    let _ = tdx_rtmr::qemu_loaded_kernel(data, Some(size), 1 << 30, "console=ttyS0");
    let _ = tdx_rtmr::gpt_event(data, 512);
});
