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

/// TPM_CC_PolicyPCR, the command code a PolicyPCR policy digest is extended with.
pub const TPM_CC_POLICY_PCR: u32 = 0x17f;

/// A TPML_PCR_SELECTION of the sha256 bank (three select bytes: PCRs 0 to 23).
pub fn pcr_selection_sha256(pcrs: &[u32]) -> Vec<u8> {
    let mut select = [0u8; 3];
    for &p in pcrs {
        select[p as usize / 8] |= 1 << (p % 8);
    }
    let mut o = Vec::with_capacity(10);
    o.extend_from_slice(&1u32.to_be_bytes());
    o.extend_from_slice(&0x000bu16.to_be_bytes()); // TPM_ALG_SHA256
    o.push(3);
    o.extend_from_slice(&select);
    o
}

/// The PolicyPCR policy digest (SHA-256 session) for these sha256 PCR values, in PCR order,
/// from a zero digest: what the node seals to, and what a signed PCR policy signs.
pub fn policy_pcr_digest(pcrs: &[u32], values: &[Vec<u8>]) -> [u8; 32] {
    use sha2::Sha256;
    let mut concat = Sha256::new();
    for v in values {
        concat.update(v);
    }
    let pcr_digest = concat.finalize();
    let mut h = Sha256::new();
    h.update([0u8; 32]);
    h.update(TPM_CC_POLICY_PCR.to_be_bytes());
    h.update(pcr_selection_sha256(pcrs));
    h.update(pcr_digest);
    h.finalize().into()
}
