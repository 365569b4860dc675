//! TDX quotes (v4, v5: header, body, signature data, QE report, certification chain) and
//! TDREPORTs.
#![no_main]

use cvm_measure::tdx::{self, VerifyQuote};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(quote) = tdx::Quote::parse(data) {
        let _ = quote.verify_signature();
        let _ = quote.tee_tcb_svn();
    }
    let _ = tdx::parse_tdreport(data);
});
