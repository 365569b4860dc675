//! The node's name when neither the command line nor the configuration names it. The host
//! chooses MAC addresses and answers DHCP; a name taken from either would let it choose
//! which Kubernetes node this one claims to be (and, with automatic CSR approval, obtain
//! that node's credentials). So the network phase names the node randomly, and with a state
//! disk the state phase renames it after the disk's volume key: the same name on every boot of
//! that disk (where the kubelet's credentials for it live), computable by no one without the
//! key, and kept in no file a workload could rewrite.

use hmac::Mac;

/// The HMAC's message: a label of its own, so the name says nothing of the volume key's
/// measured identity (another label under the same key).
const LABEL: &[u8] = b"cvm-init:v1:node-name";

/// Hex digits after `node-`: 64 bits, so no one finds a volume key that yields a chosen name,
/// and two nodes of a cluster share one with a chance of 1 in 10^19 per pair.
const DIGITS: usize = 16;

/// A name for this boot of a node nobody named.
pub fn generate() -> String {
    let mut bytes = [0u8; DIGITS / 2];
    crate::disk::luks2::kernel_random(&mut bytes);
    format!("node-{}", cvm_formats::hex(&bytes))
}

/// The name of a node nobody named, from its state disk's volume key.
pub fn derive(volume_key: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(volume_key)
        .expect("HMAC takes a key of any length");
    mac.update(LABEL);
    let digest = mac.finalize().into_bytes();
    format!("node-{}", cvm_formats::hex(&digest[..DIGITS / 2]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(name: &str) -> bool {
        name.len() == "node-".len() + DIGITS
            && crate::net::dhcp::valid_dns_name(name)
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    }

    #[test]
    fn generated_names_are_valid_and_differ() {
        let a = generate();
        assert!(valid(&a), "{a}");
        assert_ne!(a, generate());
    }

    #[test]
    fn a_disk_gives_its_name_on_every_boot_and_another_disk_another() {
        let key = [7u8; 64];
        let name = derive(&key);
        assert!(valid(&name), "{name}");
        assert_eq!(derive(&key), name);
        let mut other = key;
        other[0] ^= 1;
        assert_ne!(derive(&other), name);
        // Not the volume key's measured identity under another name.
        let identity = cvm_formats::hex(&crate::state_disk::volume_key_identity(&key));
        assert!(!identity.starts_with(&name["node-".len()..]));
    }
}
