//! `/dev/tdx_guest`: TDX_CMD_GET_REPORT0, the TDREPORT of this TD with our report data. A
//! TDREPORT is MACed with a key of this CPU, so only the local quoting enclave can turn it into
//! a quote; the kernel reaches the host's quote service through configfs-tsm only.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;

const DEVICE: &str = "/dev/tdx_guest";
pub const TDREPORT_LEN: usize = 1024;

/// `struct tdx_report_req` of `<linux/tdx-guest.h>`.
#[repr(C)]
pub struct ReportRequest {
    pub report_data: [u8; 64],
    pub tdreport: [u8; TDREPORT_LEN],
}

// TDX_CMD_GET_REPORT0 = _IOWR('T', 1, struct tdx_report_req).
nix::ioctl_readwrite!(get_report0, b'T', 1, ReportRequest);

/// The TDREPORT binding `report_data`.
pub fn report(report_data: &[u8; 64]) -> std::io::Result<Vec<u8>> {
    let device = OpenOptions::new().read(true).write(true).open(DEVICE)?;
    let mut request = ReportRequest {
        report_data: *report_data,
        tdreport: [0; TDREPORT_LEN],
    };
    // SAFETY: the request is the kernel's `struct tdx_report_req` (64 + 1024 bytes, checked
    // in the tests), owned and writable for the call; the fd is open for its duration.
    unsafe { get_report0(device.as_raw_fd(), &mut request) }.map_err(std::io::Error::from)?;
    Ok(request.tdreport.to_vec())
}

/// What the node can say when configfs-tsm is absent: the TDREPORT's MRTD if the device
/// answers, and why that is not evidence a broker can check.
pub fn without_quote_service(report_data: &[u8; 64]) -> String {
    let why = "a quote needs the host's quote service, which Linux reaches through configfs-tsm (6.7 or later, module tsm)";
    match report(report_data).map(|r| cvm_formats::tdx::parse_tdreport(&r)) {
        Ok(Ok(td)) => format!(
            "configfs-tsm is absent: {DEVICE} gave a TDREPORT (MRTD {}), which only this CPU can verify; {why}",
            cvm_formats::hex(&td.mrtd)
        ),
        Ok(Err(e)) => format!("configfs-tsm is absent and {DEVICE} gave a malformed TDREPORT ({e}); {why}"),
        Err(e) => format!("configfs-tsm is absent and {DEVICE} failed ({e}); {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_has_the_kernel_layout() {
        assert_eq!(std::mem::size_of::<ReportRequest>(), 64 + 1024);
        // _IOWR('T', 1, 1088 bytes): direction 3, size 1088, type 'T', number 1.
        let expected = (3u64 << 30) | (1088 << 16) | ((b'T' as u64) << 8) | 1;
        assert_eq!(nix::request_code_readwrite!(b'T', 1, 1088), expected);
    }
}
