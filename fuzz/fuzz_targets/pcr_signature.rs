//! The UKI's signed PCR policy (`.pcrsig`, systemd-measure's JSON), read as the node reads it:
//! whatever parses must write back to the same entries.
#![no_main]

use cvm_formats::pcrsig::{parse, write, Expect};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for sig_len in [256..=256, 8..=72] {
        let expect = Expect {
            pcrs: &[11],
            pkfp: [0x11; 32],
            sig_len,
        };
        if let Ok(entries) = parse(data, &expect) {
            let again = parse(write(&entries).as_bytes(), &expect).expect("written form parses");
            assert_eq!(again, entries);
        }
    }
});
