//! Measurement registers, simulated: TPM PCRs in the sha256 and sha384 banks and TDX RTMRs
//! (sha384), each extended as `new = H(old ‖ digest)` from all zeros.

use sha2::{Digest, Sha256, Sha384};

/// A hash bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Bank {
    Sha256,
    Sha384,
}

impl Bank {
    pub const ALL: [Bank; 2] = [Bank::Sha256, Bank::Sha384];

    pub fn name(self) -> &'static str {
        match self {
            Bank::Sha256 => "sha256",
            Bank::Sha384 => "sha384",
        }
    }

    pub fn from_name(name: &str) -> Option<Bank> {
        match name {
            "sha256" => Some(Bank::Sha256),
            "sha384" => Some(Bank::Sha384),
            _ => None,
        }
    }

    /// The TPM algorithm ID (TPM_ALG_ID).
    pub fn alg_id(self) -> u16 {
        match self {
            Bank::Sha256 => 0x000b,
            Bank::Sha384 => 0x000c,
        }
    }

    pub fn from_alg_id(id: u16) -> Option<Bank> {
        match id {
            0x000b => Some(Bank::Sha256),
            0x000c => Some(Bank::Sha384),
            _ => None,
        }
    }

    pub fn size(self) -> usize {
        match self {
            Bank::Sha256 => 32,
            Bank::Sha384 => 48,
        }
    }

    pub fn hash(self, data: &[u8]) -> Vec<u8> {
        match self {
            Bank::Sha256 => Sha256::digest(data).to_vec(),
            Bank::Sha384 => Sha384::digest(data).to_vec(),
        }
    }

    /// `H(old ‖ digest)`.
    pub fn extend(self, old: &[u8], digest: &[u8]) -> Vec<u8> {
        let mut data = Vec::with_capacity(old.len() + digest.len());
        data.extend_from_slice(old);
        data.extend_from_slice(digest);
        self.hash(&data)
    }
}

/// The TCG/Intel mapping of PCRs to TDX measurement registers: `Some(0..=3)` for an RTMR,
/// `None` for PCR 0 (MRTD, not extendable) and PCRs above 15 (undefined).
pub fn rtmr_for_pcr(pcr: u32) -> Option<usize> {
    match pcr {
        1 | 7 => Some(0),
        2..=6 => Some(1),
        8..=15 => Some(2),
        _ => None,
    }
}

pub const PCRS: usize = 24;

/// Every PCR of both banks and the four RTMRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registers {
    pub sha256: Vec<Vec<u8>>,
    pub sha384: Vec<Vec<u8>>,
    pub rtmr: Vec<Vec<u8>>,
}

impl Default for Registers {
    fn default() -> Self {
        Registers {
            sha256: vec![vec![0; 32]; PCRS],
            sha384: vec![vec![0; 48]; PCRS],
            rtmr: vec![vec![0; 48]; 4],
        }
    }
}

impl Registers {
    pub fn pcr(&self, bank: Bank, pcr: usize) -> &[u8] {
        match bank {
            Bank::Sha256 => &self.sha256[pcr],
            Bank::Sha384 => &self.sha384[pcr],
        }
    }

    /// Extends one bank of one PCR with a digest of that bank.
    pub fn extend_pcr(&mut self, bank: Bank, pcr: usize, digest: &[u8]) {
        let slot = match bank {
            Bank::Sha256 => &mut self.sha256[pcr],
            Bank::Sha384 => &mut self.sha384[pcr],
        };
        *slot = bank.extend(slot, digest);
    }

    pub fn extend_rtmr(&mut self, rtmr: usize, digest: &[u8]) {
        self.rtmr[rtmr] = Bank::Sha384.extend(&self.rtmr[rtmr], digest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_phase_on_a_zeroed_pcr() {
        // systemd-pcrphase enter-initrd on a zeroed PCR (reference/attestation.md §5.1).
        let mut r = Registers::default();
        r.extend_pcr(Bank::Sha256, 11, &Bank::Sha256.hash(b"enter-initrd"));
        assert_eq!(
            crate::hex(r.pcr(Bank::Sha256, 11)),
            "d15b0e8e244e65c40f024e95773f2347ce4ef3ffe6b597c9a14b50bbab6df319"
        );
    }

    #[test]
    fn pcr_to_rtmr_mapping() {
        assert_eq!(rtmr_for_pcr(0), None);
        assert_eq!(rtmr_for_pcr(1), Some(0));
        assert_eq!(rtmr_for_pcr(7), Some(0));
        assert_eq!(rtmr_for_pcr(4), Some(1));
        assert_eq!(rtmr_for_pcr(11), Some(2));
        assert_eq!(rtmr_for_pcr(15), Some(2));
        assert_eq!(rtmr_for_pcr(16), None);
    }
}
