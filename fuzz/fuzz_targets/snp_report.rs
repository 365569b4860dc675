//! SNP attestation reports and the certificate table of an extended report.
#![no_main]

use cvm_formats::snp;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(report) = snp::Report::parse(data) {
        let _ = report.claims("Milan");
        let _ = report.claims("Turin");
    }
    let _ = snp::parse_cert_table(data);
});
