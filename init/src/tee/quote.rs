//! vTPM evidence: an attestation key created in the vTPM (a restricted ECDSA P-256 signing
//! key, the same on every boot of the same TPM because it is a primary key of the endorsement
//! hierarchy) and a TPM2_Quote over the measured PCRs with the key broker's binding as
//! qualifying data. The verifier's side is `cvm_measure::tpm::quote`. With a key broker's
//! credential (`quote_activated`), the credential is first activated with the TPM's EK
//! (`super::ek`) and the recovered secret mixed into the qualifying data, which proves that the
//! attestation key lives in the TPM of the certified EK.

use super::seal::{
    call, create_primary_in, flush, password_auth, pcr_selection, Out, ALG_NULL, ALG_SHA256,
    TPM_ST_SESSIONS,
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
    /// The attestation key's TPMT_PUBLIC (its TPM name is computed from it).
    pub ak_public: Vec<u8>,
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

/// The attestation key's TPMT_PUBLIC (what a node sends a key broker to be endorsed).
pub fn attestation_key_public<T: Transport>(t: &mut T) -> Result<Vec<u8>, TpmError> {
    let (handle, _, _, public) = create_attestation_key(t)?;
    flush(t, handle);
    Ok(public)
}

/// Creates (re-creates: it is deterministic) the attestation key; returns its handle, public
/// point and TPMT_PUBLIC.
#[allow(clippy::type_complexity)]
fn create_attestation_key<T: Transport>(
    t: &mut T,
) -> Result<(u32, Vec<u8>, Vec<u8>, Vec<u8>), TpmError> {
    let reply = create_primary_in(t, TPM_RH_ENDORSEMENT, &attestation_key_template())?;
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
    Ok((handle, x, y, public.to_vec()))
}

/// Quotes the sha256 values of `pcrs` with `qualifying` (at most 64 bytes) as extra data.
pub fn quote<T: Transport>(t: &mut T, qualifying: &[u8], pcrs: &[u32]) -> Result<Quote, TpmError> {
    quote_activated(t, qualifying, pcrs, None)
}

/// Quotes as `quote`; with a credential (TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET buffers),
/// first activates it with this attestation key and the EK, and quotes with
/// `cvm_formats::tpm::qualifying_data(binding, secret)` instead of `binding`.
pub fn quote_activated<T: Transport>(
    t: &mut T,
    binding: &[u8],
    pcrs: &[u32],
    credential: Option<(&[u8], &[u8])>,
) -> Result<Quote, TpmError> {
    let (key, ak_x, ak_y, ak_public) = create_attestation_key(t)?;
    let result = (|| {
        let mixed;
        let qualifying = match credential {
            Some((id_object, encrypted_secret)) => {
                let secret = super::ek::activate(t, key, id_object, encrypted_secret)?;
                let binding: &[u8; 64] = binding.try_into().map_err(|_| TpmError::Malformed {
                    command: TPM_CC_QUOTE,
                    detail: format!("a {}-byte binding, 64 expected", binding.len()),
                })?;
                mixed = cvm_formats::tpm::qualifying_data(binding, &secret);
                &mixed[..]
            }
            None => binding,
        };
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
            ak_public,
        })
    })();
    flush(t, key);
    result
}
