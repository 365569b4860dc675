//! LUKS2 headers as a hostile host writes them: both binary copies, the JSON area, and the
//! first-boot classification (an interrupted commit, a foreign label). Each input is tried as
//! it is, with both checksums made valid, and with the secondary copy made a valid mirror of
//! the primary, so that the JSON schema and the policy checks behind the checksums are
//! reached. Bytes after the two copies, when present, give the device size.
#![no_main]

use cvm_init::disk::luks2::{self, checksum, KdfPolicy, Policy, HDR_SIZE};
use cvm_init::disk::state::{classify, COMMITTED};
use libfuzzer_sys::fuzz_target;

const POLICIES: [Policy; 3] = [
    Policy {
        integrity: false,
        kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
    },
    Policy {
        integrity: true,
        kdf: KdfPolicy::Pbkdf2 { iterations: 1000 },
    },
    Policy {
        integrity: false,
        kdf: KdfPolicy::Argon2id {
            time: 4,
            memory_kib: 32,
            cpus: 2,
        },
    },
];

const HDR: usize = HDR_SIZE as usize;

fn try_all(head: &[u8], device_size: u64) {
    for policy in &POLICIES {
        let _ = luks2::parse(head, device_size, policy);
        let _ = classify(head, device_size, policy);
    }
    let _ = luks2::copy_label(head, 0);
    let _ = luks2::copy_label(head, HDR_SIZE);
    if head.len() >= 2 * HDR {
        let mut copy = head[..2 * HDR].to_vec();
        if luks2::relabel(&mut copy, COMMITTED).is_ok() {
            let _ = luks2::parse(&copy, device_size, &POLICIES[0]);
        }
    }
}

fn fix_checksums(head: &mut [u8]) {
    for offset in [0, HDR] {
        let copy = &mut head[offset..offset + HDR];
        let sum = checksum(copy);
        copy[0x1c0..0x1e0].copy_from_slice(&sum);
    }
}

fuzz_target!(|data: &[u8]| {
    let device_size = data
        .get(2 * HDR..2 * HDR + 8)
        .map_or(1 << 30, |b| u64::from_le_bytes(b.try_into().unwrap()));
    try_all(data, device_size);
    if data.len() < 2 * HDR {
        return;
    }
    let mut head = data[..2 * HDR].to_vec();
    fix_checksums(&mut head);
    try_all(&head, device_size);
    // The secondary as a mirror of the primary: its own magic and offset, the same rest.
    let (primary, secondary) = head.split_at_mut(HDR);
    secondary.copy_from_slice(primary);
    secondary[0..6].copy_from_slice(b"SKUL\xba\xbe");
    secondary[0x100..0x108].copy_from_slice(&HDR_SIZE.to_be_bytes());
    fix_checksums(&mut head);
    try_all(&head, device_size);
});
