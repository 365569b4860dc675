//! SEV-SNP requests through `/dev/sev-guest` (the `sev` crate's ioctls), for kernels or hosts
//! without configfs-tsm: the extended report (report and certificate table) and the derived
//! key that the `snp-derived` key source uses.

use zeroize::Zeroizing;

use sev::firmware::guest::{DerivedKey, Firmware, GuestFieldSelect};

#[derive(Debug, thiserror::Error)]
pub enum SnpGuestError {
    #[error("cannot open /dev/sev-guest (is this an SEV-SNP guest with the sev-guest module?)")]
    Open(#[source] std::io::Error),
    #[error("the SNP firmware refused the {request} request: {reason}")]
    Firmware {
        request: &'static str,
        reason: String,
    },
}

/// Message version 1: understood by every SNP firmware and kernel.
const MESSAGE_VERSION: u32 = 1;

/// A report for VMPL 0 binding `report_data`, and the certificate table the host provisioned
/// (empty when it provisioned none).
pub fn extended_report(
    report_data: &[u8; 64],
) -> Result<(Vec<u8>, Option<Vec<cvm_formats::snp::CertTableEntry>>), SnpGuestError> {
    let mut firmware = Firmware::open().map_err(SnpGuestError::Open)?;
    firmware
        .get_ext_report(Some(MESSAGE_VERSION), Some(*report_data), Some(0))
        .map_err(|e| SnpGuestError::Firmware {
            request: "extended report",
            reason: e.to_string(),
        })
}

/// What the derived key mixes in: the guest policy and the launch measurement, so that another
/// image, or the same image launched with a weaker policy (debugging allowed), derives another
/// key. Rooted in the chip's VCEK: the key does not move to another machine.
pub fn derived_key_fields() -> GuestFieldSelect {
    let mut fields = GuestFieldSelect::default();
    fields.set_guest_policy(true);
    fields.set_measurement(true);
    fields
}

/// The 32-byte key the secure processor derives for this launch (VMPL 0, VCEK root).
pub fn derived_key() -> Result<Zeroizing<Vec<u8>>, SnpGuestError> {
    let mut firmware = Firmware::open().map_err(SnpGuestError::Open)?;
    let request = DerivedKey::new(false, derived_key_fields(), 0, 0, 0, None);
    let key = firmware
        .get_derived_key(Some(MESSAGE_VERSION), request)
        .map_err(|e| SnpGuestError::Firmware {
            request: "derived key",
            reason: e.to_string(),
        })?;
    // The array is wiped when it goes; the caller's copy when the caller drops it.
    let key = Zeroizing::new(key);
    Ok(Zeroizing::new(key.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_derived_key_binds_policy_and_measurement_only() {
        // Bits 0 (policy) and 3 (measurement) of GUEST_FIELD_SELECT, nothing that changes
        // with a firmware update (TCB version) or that the launch does not set (IDs, SVN).
        let fields = derived_key_fields();
        assert!(fields.get_guest_policy() && fields.get_measurement());
        assert!(!fields.get_tcb_version() && !fields.get_image_id() && !fields.get_svn());
        assert!(!fields.get_family_id() && !fields.get_launch_mit_vector());
    }
}
