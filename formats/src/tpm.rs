//! What a node and a key broker agree on for a vTPM's credential activation: where the EK
//! certificate is, and how the activated secret enters the quote's qualifying data.

use sha2::{Digest, Sha512};

/// Where a TPM keeps the certificate of its RSA-2048 EK (TCG EK Credential Profile).
pub const EK_RSA_CERT_INDEX: u32 = 0x01c0_0002;

/// The qualifying data of a quote made after activating `secret`: SHA-512 of the session's
/// binding and the secret (64 bytes, the most a TPM2B_DATA holds). The secret never travels.
pub fn qualifying_data(binding: &[u8; 64], secret: &[u8]) -> [u8; 64] {
    Sha512::new()
        .chain_update(binding)
        .chain_update(secret)
        .finalize()
        .into()
}
