//! What the host controls on the way to a driver or a resolver: kernel uevent messages (their
//! device paths and modaliases come from devices the host presents), modalias matching against
//! modules.alias patterns, and DHCP's domain search list with its compression pointers. The
//! input is split at its first NUL into a pattern and a text for the matcher.
#![no_main]

use cvm_init::devices::parse_uevent;
use cvm_init::modules::glob_matches;
use cvm_init::net::dhcp::domain_search_list;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = parse_uevent(data);
    let _ = domain_search_list(data);
    let (pattern, text) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"pci:v00001AF4d00001041sv00001AF4sd00001100bc02sc00i00"[..]),
    };
    let _ = glob_matches(pattern, text);
});
