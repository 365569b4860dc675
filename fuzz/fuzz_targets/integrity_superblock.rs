//! dm-integrity superblocks as a hostile host leaves them at the start of the state disk's
//! data segment, against a fixed segment size and against one the input chooses (its last
//! eight bytes).
#![no_main]

use cvm_init::disk::integrity::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse(data, 1 << 21);
    if data.len() >= 8 {
        let tail: [u8; 8] = data[data.len() - 8..].try_into().unwrap();
        let _ = parse(data, u64::from_le_bytes(tail));
    }
});
