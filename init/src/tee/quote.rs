//! vTPM evidence: an attestation key created in the vTPM (a restricted ECDSA P-256 signing
//! key, the same on every boot of the same TPM because it is a primary key of the endorsement
//! hierarchy) and a TPM2_Quote over the measured PCRs with the key broker's binding as
//! qualifying data. The verifier's side is `cvm_measure::tpm_quote`.

use super::seal::{
    call, flush, password_auth, pcr_selection, Out, ALG_NULL, ALG_SHA256, TPM_ST_SESSIONS,
};
use super::tpm::{self, TpmError, Transport};

const TPM_CC_CREATE_PRIMARY: u32 = 0x131;
const TPM_CC_QUOTE: u32 = 0x158;
const TPM_RH_ENDORSEMENT: u32 = 0x4000_000b;
const ALG_ECC: u16 = 0x0023;
const ALG_ECDSA: u16 = 0x0018;
const CURVE_NIST_P256: u16 = 0x0003;

/// A quote and what verifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quote {
    /// The TPMS_ATTEST structure the TPM signed.
    pub attest: Vec<u8>,
    /// The ECDSA signature (big-endian r and s).
    pub r: Vec<u8>,
    pub s: Vec<u8>,
    /// The attestation key's public point.
    pub ak_x: Vec<u8>,
    pub ak_y: Vec<u8>,
}

/// The attestation key template: ECC P-256, fixedTPM, fixedParent, sensitiveDataOrigin,
/// userWithAuth, restricted, sign; ECDSA with SHA-256.
fn attestation_key_template() -> Vec<u8> {
    let mut p = Out::default();
    p.u16(ALG_ECC)
        .u16(ALG_SHA256)
        .u32(0x0005_0072)
        .tpm2b(&[]) // no policy
        .u16(ALG_NULL) // symmetric: none (a signing key)
        .u16(ALG_ECDSA)
        .u16(ALG_SHA256)
        .u16(CURVE_NIST_P256)
        .u16(ALG_NULL) // kdf
        .u16(0)
        .u16(0); // unique: empty point
    p.0
}

/// Creates (re-creates: it is deterministic) the attestation key; returns its handle and
/// public point.
fn create_attestation_key<T: Transport>(t: &mut T) -> Result<(u32, Vec<u8>, Vec<u8>), TpmError> {
    let mut b = Out::default();
    b.u32(TPM_RH_ENDORSEMENT)
        .bytes(&password_auth())
        .u16(4)
        .u16(0)
        .u16(0)
        .tpm2b(&attestation_key_template())
        .tpm2b(&[])
        .u32(0);
    let reply = call(t, TPM_ST_SESSIONS, TPM_CC_CREATE_PRIMARY, &b.0)?;
    let mut r = tpm::response(TPM_CC_CREATE_PRIMARY, &reply)?;
    let handle = r.u32()?;
    let _parameter_size = r.u32()?;
    let public = r.tpm2b()?;
    let mut p = tpm::Cursor::nested(public, TPM_CC_CREATE_PRIMARY);
    // type, nameAlg, attributes, authPolicy, symmetric, scheme + hash, curve, kdf
    p.take(2 + 2 + 4)?;
    p.tpm2b()?;
    p.take(2 + 2 + 2 + 2 + 2)?;
    let x = p.tpm2b()?.to_vec();
    let y = p.tpm2b()?.to_vec();
    Ok((handle, x, y))
}

/// Quotes the sha256 values of `pcrs` with `qualifying` (at most 64 bytes) as extra data.
pub fn quote<T: Transport>(t: &mut T, qualifying: &[u8], pcrs: &[u32]) -> Result<Quote, TpmError> {
    let (key, ak_x, ak_y) = create_attestation_key(t)?;
    let result = (|| {
        let mut b = Out::default();
        b.u32(key)
            .bytes(&password_auth())
            .tpm2b(qualifying)
            .u16(ALG_NULL) // the key's own scheme
            .bytes(&pcr_selection(pcrs));
        let reply = call(t, TPM_ST_SESSIONS, TPM_CC_QUOTE, &b.0)?;
        let mut r = tpm::response(TPM_CC_QUOTE, &reply)?;
        let _parameter_size = r.u32()?;
        let attest = r.tpm2b()?.to_vec();
        let algorithm = r.u16()?;
        let hash = r.u16()?;
        if algorithm != ALG_ECDSA || hash != ALG_SHA256 {
            return Err(TpmError::Malformed {
                command: TPM_CC_QUOTE,
                detail: format!(
                    "signed with algorithm {algorithm:#x}/{hash:#x}, expected ECDSA/SHA-256"
                ),
            });
        }
        let sig_r = r.tpm2b()?.to_vec();
        let sig_s = r.tpm2b()?.to_vec();
        Ok(Quote {
            attest,
            r: sig_r,
            s: sig_s,
            ak_x,
            ak_y,
        })
    })();
    flush(t, key);
    result
}
