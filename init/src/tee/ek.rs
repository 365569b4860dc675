//! The vTPM's endorsement key (EK): its certificate (NV index 0x01c00002, where TPM makers,
//! clouds and swtpm put the RSA-2048 EK's) and TPM2_ActivateCredential, which recovers a key
//! broker's credential secret only when the attestation key it is bound to is loaded in the
//! same TPM as the certified EK. Marshalled by hand like the rest of the TPM layer (the
//! static PID 1's size); the broker's side is `cvm_measure::tpm::credential`.

use zeroize::Zeroizing;

use super::seal::{
    call, create_primary_in, flush, password_auth, start_policy_session, Out, ALG_NULL, ALG_SHA256,
    TPM_ST_NO_SESSIONS, TPM_ST_SESSIONS,
};
use super::tpm::{self, TpmError, Transport};

const TPM_CC_CREATE_PRIMARY: u32 = 0x131;
const TPM_CC_NV_READ: u32 = 0x14e;
const TPM_CC_NV_READ_PUBLIC: u32 = 0x169;
const TPM_CC_POLICY_SECRET: u32 = 0x151;
const TPM_CC_ACTIVATE_CREDENTIAL: u32 = 0x147;
const TPM_RH_OWNER: u32 = 0x4000_0001;
const TPM_RH_ENDORSEMENT: u32 = 0x4000_000b;
const TPM_RS_PW: u32 = 0x4000_0009;
/// Bytes read from NV per command (below every TPM's MAX_NV_BUFFER_SIZE).
const NV_CHUNK: u16 = 512;
/// An EK certificate larger than this is refused rather than read.
const MAX_CERT: usize = 8192;
/// The default EK's policy: PolicySecret(TPM_RH_ENDORSEMENT) (EK Credential Profile).
const EK_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];

/// The EK Credential Profile's RSA-2048 template (L-1): fixedTPM, fixedParent,
/// sensitiveDataOrigin, adminWithPolicy, restricted, decrypt; AES-128-CFB; the same key as the
/// one its certificate names, because it is derived from the endorsement seed.
fn ek_template() -> Vec<u8> {
    let mut p = Out::default();
    p.u16(0x0001) // TPM_ALG_RSA
        .u16(ALG_SHA256)
        .u32(0x0003_00b2)
        .tpm2b(&EK_POLICY)
        .u16(0x0006) // AES
        .u16(128)
        .u16(0x0043) // CFB
        .u16(ALG_NULL) // scheme
        .u16(2048)
        .u32(0) // exponent: the default 65537
        .tpm2b(&[0u8; 256]);
    p.0
}

fn create_ek<T: Transport>(t: &mut T) -> Result<u32, TpmError> {
    let reply = create_primary_in(t, TPM_RH_ENDORSEMENT, &ek_template())?;
    tpm::response(TPM_CC_CREATE_PRIMARY, &reply)?.u32()
}

/// The DER certificate of the RSA-2048 EK, read from its NV index.
pub fn certificate<T: Transport>(t: &mut T) -> Result<Vec<u8>, TpmError> {
    let index = cvm_formats::tpm::EK_RSA_CERT_INDEX;
    let mut b = Out::default();
    b.u32(index);
    let reply = call(t, TPM_ST_NO_SESSIONS, TPM_CC_NV_READ_PUBLIC, &b.0)?;
    let mut r = tpm::response(TPM_CC_NV_READ_PUBLIC, &reply)?;
    let public = r.tpm2b()?;
    let mut p = tpm::Cursor::nested(public, TPM_CC_NV_READ_PUBLIC);
    p.take(4 + 2 + 4)?; // index, name algorithm, attributes
    p.tpm2b()?; // authPolicy
    let size = p.u16()? as usize;
    if size > MAX_CERT {
        return Err(TpmError::Malformed {
            command: TPM_CC_NV_READ_PUBLIC,
            detail: format!("the EK certificate index holds {size} bytes, at most {MAX_CERT} read"),
        });
    }
    // The index authorizes reads with its empty auth value (TPMA_NV_AUTHREAD), else the owner.
    let read_with = |t: &mut T, auth: u32| -> Result<Vec<u8>, TpmError> {
        let mut cert = Vec::with_capacity(size);
        while cert.len() < size {
            let n = (size - cert.len()).min(NV_CHUNK as usize) as u16;
            let mut b = Out::default();
            b.u32(auth)
                .u32(index)
                .bytes(&password_auth())
                .u16(n)
                .u16(cert.len() as u16);
            let reply = call(t, TPM_ST_SESSIONS, TPM_CC_NV_READ, &b.0)?;
            let mut r = tpm::response(TPM_CC_NV_READ, &reply)?;
            let _parameter_size = r.u32()?;
            let data = r.tpm2b()?;
            if data.len() != n as usize {
                return Err(TpmError::Malformed {
                    command: TPM_CC_NV_READ,
                    detail: format!("{} bytes read, {n} asked", data.len()),
                });
            }
            cert.extend_from_slice(data);
        }
        Ok(cert)
    };
    read_with(t, index).or_else(|_| read_with(t, TPM_RH_OWNER))
}

/// TPM2_ActivateCredential of a key broker's credential (the TPM2B_ID_OBJECT and
/// TPM2B_ENCRYPTED_SECRET buffers) with the attestation key `ak` (loaded) and the EK, whose
/// policy is satisfied with PolicySecret of the endorsement hierarchy. Returns the secret.
pub fn activate<T: Transport>(
    t: &mut T,
    ak: u32,
    id_object: &[u8],
    encrypted_secret: &[u8],
) -> Result<Zeroizing<Vec<u8>>, TpmError> {
    let ek = create_ek(t)?;
    let result = (|| {
        let session = start_policy_session(t)?;
        let mut p = Out::default();
        p.u32(TPM_RH_ENDORSEMENT)
            .u32(session)
            .bytes(&password_auth())
            .tpm2b(&[]) // nonceTPM
            .tpm2b(&[]) // cpHashA
            .tpm2b(&[]) // policyRef
            .u32(0); // expiration
        if let Err(e) = call(t, TPM_ST_SESSIONS, TPM_CC_POLICY_SECRET, &p.0) {
            flush(t, session);
            return Err(e);
        }
        // Two authorizations in handle order: the attestation key's empty password (admin
        // role), then the EK's policy session (continueSession off: it ends here).
        let mut a = Out::default();
        a.u32(ak)
            .u32(ek)
            .u32(18)
            .u32(TPM_RS_PW)
            .u16(0)
            .u8(0)
            .u16(0)
            .u32(session)
            .u16(0)
            .u8(0)
            .u16(0)
            .tpm2b(id_object)
            .tpm2b(encrypted_secret);
        let reply = call(t, TPM_ST_SESSIONS, TPM_CC_ACTIVATE_CREDENTIAL, &a.0)
            .inspect_err(|_| flush(t, session))?;
        // The reply holds the secret: wiped when dropped.
        let reply = Zeroizing::new(reply);
        let mut r = tpm::response(TPM_CC_ACTIVATE_CREDENTIAL, &reply[..])?;
        let _parameter_size = r.u32()?;
        Ok(Zeroizing::new(r.tpm2b()?.to_vec()))
    })();
    flush(t, ek);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ek_policy_is_policy_secret_of_the_endorsement_hierarchy() {
        use sha2::{Digest, Sha256};
        // PolicySecret: H(zeros || TPM_CC_PolicySecret || name of TPM_RH_ENDORSEMENT), then
        // H(that || policyRef (empty)).
        let first = Sha256::new()
            .chain_update([0u8; 32])
            .chain_update(TPM_CC_POLICY_SECRET.to_be_bytes())
            .chain_update(TPM_RH_ENDORSEMENT.to_be_bytes())
            .finalize();
        let policy = Sha256::digest(first);
        assert_eq!(policy.as_slice(), &EK_POLICY);
        assert_eq!(ek_template().len(), 2 + 2 + 4 + 34 + 6 + 2 + 2 + 4 + 258);
    }
}
