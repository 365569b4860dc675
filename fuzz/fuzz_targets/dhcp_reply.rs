//! DHCP replies as a hostile host's server sends them: malformed options, lengths past the
//! end, overlong names, overload. Also as a reply to the transaction and address they carry,
//! so that the checks past the header are reached.
#![no_main]

use cvm_init::net::dhcp::parse_reply;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let _ = parse_reply(data, 7, &mac);
    if data.len() >= 34 {
        let xid = u32::from_be_bytes(data[4..8].try_into().unwrap());
        let theirs: [u8; 6] = data[28..34].try_into().unwrap();
        let _ = parse_reply(data, xid, &theirs);
    }
});
