//! Sealing a secret to PCR values with the vTPM (the `tpm` key source of the state disk): the
//! secret is a keyed-hash object under the owner's deterministic ECC storage key, whose policy
//! is PolicyPCR over the boot-time values; unsealing works only while the PCRs hold them.
//! The policy digest is computed in software, so no trial session is needed.

use cvm_formats::tpm::TPM_CC_POLICY_PCR;
use zeroize::Zeroizing;

use super::tpm::{self, TpmError, Transport};

/// The PCRs the `tpm` key source seals to: the phases and the identity events so far.
pub const SEAL_PCRS: [u32; 2] = [11, 15];

pub(crate) const TPM_ST_NO_SESSIONS: u16 = 0x8001;
pub(crate) const TPM_ST_SESSIONS: u16 = 0x8002;
const TPM_CC_CREATE_PRIMARY: u32 = 0x131;
const TPM_CC_CREATE: u32 = 0x153;
const TPM_CC_LOAD: u32 = 0x157;
const TPM_CC_UNSEAL: u32 = 0x15e;
const TPM_CC_FLUSH_CONTEXT: u32 = 0x165;
const TPM_CC_START_AUTH_SESSION: u32 = 0x176;
const TPM_RH_OWNER: u32 = 0x4000_0001;
const TPM_RH_NULL: u32 = 0x4000_0007;
const TPM_RS_PW: u32 = 0x4000_0009;
pub(crate) const ALG_SHA256: u16 = 0x000b;
pub(crate) const ALG_NULL: u16 = 0x0010;

/// What is stored (in a LUKS2 token) to unseal later: the TPM's private and public blobs and
/// the PCRs the policy covers. None of it is secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedBlob {
    pub private: Vec<u8>,
    pub public: Vec<u8>,
    pub pcrs: Vec<u32>,
}

#[derive(Default)]
pub(crate) struct Out(pub(crate) Vec<u8>);

impl Out {
    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    pub(crate) fn tpm2b(&mut self, v: &[u8]) -> &mut Self {
        self.u16(v.len() as u16).bytes(v)
    }
}

/// The authorization area with the empty password session.
pub(crate) fn password_auth() -> Vec<u8> {
    let mut a = Out::default();
    a.u32(9).u32(TPM_RS_PW).u16(0).u8(0).u16(0);
    a.0
}

/// A TPML_PCR_SELECTION of the sha256 bank.
pub(crate) fn pcr_selection(pcrs: &[u32]) -> Vec<u8> {
    cvm_formats::tpm::pcr_selection_sha256(pcrs)
}

/// The PolicyPCR policy digest for these sha256 PCR values (in PCR order), from a zero digest
/// (shared with `cvm-measure sign-pcr-policy` through cvm-formats).
pub fn policy_digest(pcrs: &[u32], values: &[Vec<u8>]) -> [u8; 32] {
    cvm_formats::tpm::policy_pcr_digest(pcrs, values)
}

/// The storage key template: ECC P-256, AES-128-CFB, restricted decryption. The same template
/// under the same owner seed gives the same key on every boot.
fn storage_template() -> Vec<u8> {
    let mut p = Out::default();
    p.u16(0x0023) // TPM_ALG_ECC
        .u16(ALG_SHA256)
        .u32(0x0003_0072) // fixedTPM fixedParent sensitiveDataOrigin userWithAuth restricted decrypt
        .tpm2b(&[])
        .u16(0x0006) // AES
        .u16(128)
        .u16(0x0043) // CFB
        .u16(ALG_NULL) // scheme
        .u16(0x0003) // NIST P-256
        .u16(ALG_NULL) // kdf
        .u16(0)
        .u16(0); // unique: empty point
    p.0
}

/// Sends a command (retrying as the TPM asks) and checks its response code.
pub(crate) fn call<T: Transport>(
    t: &mut T,
    tag: u16,
    code: u32,
    body: &[u8],
) -> Result<Vec<u8>, TpmError> {
    // The frame copies the body, which may hold a secret (TPM2_Create's sensitive data).
    let frame = Zeroizing::new(tpm::frame(tag, code, body));
    let reply = tpm::send(t, code, &frame)?;
    tpm::response(code, &reply)?;
    Ok(reply)
}

fn create_primary<T: Transport>(t: &mut T) -> Result<u32, TpmError> {
    let reply = create_primary_in(t, TPM_RH_OWNER, &storage_template())?;
    tpm::response(TPM_CC_CREATE_PRIMARY, &reply)?.u32()
}

/// TPM2_CreatePrimary of `template` in `hierarchy` (password authorization, empty auth value
/// and data, no outside info or creation PCRs). Returns the whole reply, handle first, for the
/// caller to read what it needs of the public area.
pub(crate) fn create_primary_in<T: Transport>(
    t: &mut T,
    hierarchy: u32,
    template: &[u8],
) -> Result<Vec<u8>, TpmError> {
    let mut b = Out::default();
    b.u32(hierarchy)
        .bytes(&password_auth())
        .u16(4)
        .u16(0)
        .u16(0) // inSensitive: empty auth, empty data
        .tpm2b(template)
        .tpm2b(&[]) // outsideInfo
        .u32(0); // creationPCR: none
    call(t, TPM_ST_SESSIONS, TPM_CC_CREATE_PRIMARY, &b.0)
}

/// TPM2_StartAuthSession of an unbound, unsalted SHA-256 policy session with a fresh nonce;
/// returns its handle (the caller flushes it).
pub(crate) fn start_policy_session<T: Transport>(t: &mut T) -> Result<u32, TpmError> {
    let mut nonce = [0u8; 16];
    crate::disk::luks2::kernel_random(&mut nonce);
    let mut s = Out::default();
    s.u32(TPM_RH_NULL)
        .u32(TPM_RH_NULL)
        .tpm2b(&nonce)
        .tpm2b(&[])
        .u8(0x01) // TPM_SE_POLICY
        .u16(ALG_NULL)
        .u16(ALG_SHA256);
    let reply = call(t, TPM_ST_NO_SESSIONS, TPM_CC_START_AUTH_SESSION, &s.0)?;
    tpm::response(TPM_CC_START_AUTH_SESSION, &reply)?.u32()
}

pub(crate) fn flush<T: Transport>(t: &mut T, handle: u32) {
    let mut b = Out::default();
    b.u32(handle);
    let _ = call(t, TPM_ST_NO_SESSIONS, TPM_CC_FLUSH_CONTEXT, &b.0);
}

/// Seals `secret` (at most 128 bytes) to the current sha256 values `values` of `pcrs`.
pub fn seal<T: Transport>(
    t: &mut T,
    secret: &[u8],
    pcrs: &[u32],
    values: &[Vec<u8>],
) -> Result<SealedBlob, TpmError> {
    seal_to_policy(t, secret, pcrs, &policy_digest(pcrs, values))
}

/// Seals `secret` (at most 128 bytes) to a policy digest; `pcrs` is recorded in the blob.
pub(crate) fn seal_to_policy<T: Transport>(
    t: &mut T,
    secret: &[u8],
    pcrs: &[u32],
    policy: &[u8; 32],
) -> Result<SealedBlob, TpmError> {
    assert!(secret.len() <= 128, "a sealed secret is at most 128 bytes");
    let primary = create_primary(t)?;
    let mut sensitive = Out::default();
    sensitive.tpm2b(&[]).tpm2b(secret);
    let mut public = Out::default();
    public
        .u16(0x0008) // TPM_ALG_KEYEDHASH
        .u16(ALG_SHA256)
        .u32(0x0000_0012) // fixedTPM fixedParent; no userWithAuth: the policy is the only way in
        .tpm2b(policy)
        .u16(ALG_NULL)
        .tpm2b(&[]);
    // Room for the whole command up front: a buffer that grew would free a copy of the
    // secret.
    let mut b = Out(Vec::with_capacity(64 + sensitive.0.len() + public.0.len()));
    b.u32(primary)
        .bytes(&password_auth())
        .tpm2b(&sensitive.0)
        .tpm2b(&public.0)
        .tpm2b(&[])
        .u32(0);
    let result = call(t, TPM_ST_SESSIONS, TPM_CC_CREATE, &b.0).and_then(|reply| {
        let mut r = tpm::response(TPM_CC_CREATE, &reply)?;
        let _parameter_size = r.u32()?;
        let private = r.tpm2b()?.to_vec();
        let public = r.tpm2b()?.to_vec();
        Ok(SealedBlob {
            private,
            public,
            pcrs: pcrs.to_vec(),
        })
    });
    // The sensitive data was in `sensitive` and in the command: clear both.
    zeroize::Zeroize::zeroize(&mut sensitive.0);
    zeroize::Zeroize::zeroize(&mut b.0);
    flush(t, primary);
    result
}

/// Unseals a blob; fails with the TPM's policy error once the PCRs differ from sealing time.
pub fn unseal<T: Transport>(t: &mut T, blob: &SealedBlob) -> Result<Zeroizing<Vec<u8>>, TpmError> {
    unseal_with(t, blob, |t, session| policy_pcr(t, session, &blob.pcrs))
}

/// TPM2_PolicyPCR on a policy session, over the PCRs' current values.
pub(crate) fn policy_pcr<T: Transport>(
    t: &mut T,
    session: u32,
    pcrs: &[u32],
) -> Result<(), TpmError> {
    let mut p = Out::default();
    p.u32(session).tpm2b(&[]).bytes(&pcr_selection(pcrs));
    call(t, TPM_ST_NO_SESSIONS, TPM_CC_POLICY_PCR, &p.0).map(drop)
}

/// Loads a blob, runs `policy` on a fresh policy session and unseals with it.
pub(crate) fn unseal_with<T: Transport, E: From<TpmError>>(
    t: &mut T,
    blob: &SealedBlob,
    policy: impl FnOnce(&mut T, u32) -> Result<(), E>,
) -> Result<Zeroizing<Vec<u8>>, E> {
    let primary = create_primary(t)?;
    let mut b = Out::default();
    b.u32(primary)
        .bytes(&password_auth())
        .tpm2b(&blob.private)
        .tpm2b(&blob.public);
    let loaded = call(t, TPM_ST_SESSIONS, TPM_CC_LOAD, &b.0)
        .and_then(|r| tpm::response(TPM_CC_LOAD, &r)?.u32());
    flush(t, primary);
    let object = loaded?;
    let result = (|| {
        let session = start_policy_session(t)?;
        if let Err(e) = policy(t, session) {
            flush(t, session);
            return Err(e);
        }
        // The policy session authorizes the unseal; continueSession off ends it.
        let mut u = Out::default();
        u.u32(object).u32(9).u32(session).u16(0).u8(0).u16(0);
        // The reply holds the secret: wiped when dropped.
        let reply = Zeroizing::new(
            call(t, TPM_ST_SESSIONS, TPM_CC_UNSEAL, &u.0).inspect_err(|_| flush(t, session))?,
        );
        let mut r = tpm::response(TPM_CC_UNSEAL, &reply)?;
        let _parameter_size = r.u32()?;
        Ok(Zeroizing::new(r.tpm2b()?.to_vec()))
    })();
    flush(t, object);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leak_check::{self, MARKER};

    /// A TPM that accepts every command: handles for CreatePrimary, Load and
    /// StartAuthSession, a blob for Create, and [`MARKER`] as the unsealed data.
    struct FakeTpm;

    impl Transport for FakeTpm {
        fn transact(&mut self, command: &[u8]) -> std::io::Result<Vec<u8>> {
            let code = u32::from_be_bytes(command[6..10].try_into().unwrap());
            let body: &[u8] = match code {
                TPM_CC_CREATE_PRIMARY | TPM_CC_LOAD | TPM_CC_START_AUTH_SESSION => &[0x80, 0, 0, 1],
                // parameterSize, outPrivate (2 bytes), outPublic (2 bytes)
                TPM_CC_CREATE => &[0, 0, 0, 8, 0, 2, 0xaa, 0xbb, 0, 2, 0xcc, 0xdd],
                TPM_CC_UNSEAL => &[],
                _ => &[],
            };
            let mut reply = Vec::with_capacity(10 + 6 + MARKER.len() + body.len());
            let size = if code == TPM_CC_UNSEAL {
                10 + 6 + MARKER.len()
            } else {
                10 + body.len()
            };
            reply.extend_from_slice(&0x8001u16.to_be_bytes());
            reply.extend_from_slice(&(size as u32).to_be_bytes());
            reply.extend_from_slice(&0u32.to_be_bytes());
            if code == TPM_CC_UNSEAL {
                reply.extend_from_slice(&(2 + MARKER.len() as u32).to_be_bytes());
                reply.extend_from_slice(&(MARKER.len() as u16).to_be_bytes());
                reply.extend_from_slice(&MARKER);
            } else {
                reply.extend_from_slice(body);
            }
            Ok(reply)
        }
    }

    /// Sealing and unsealing leave no copy of the secret in freed memory: the Create command
    /// (its body and its frame) and the Unseal reply are wiped before they are released.
    #[test]
    fn seal_and_unseal_leave_no_freed_copy_of_the_secret() {
        let watch = leak_check::watch();
        {
            let secret = Zeroizing::new(MARKER.to_vec());
            let blob = seal(
                &mut FakeTpm,
                &secret,
                &[11, 15],
                &[vec![0; 32], vec![0; 32]],
            )
            .unwrap();
            assert_eq!(blob.private, [0xaa, 0xbb]);
            let unsealed = unseal(&mut FakeTpm, &blob).unwrap();
            assert_eq!(&unsealed[..], &MARKER);
        }
        assert_eq!(
            watch.freed_copies(),
            0,
            "copies of the secret were freed unwiped"
        );
    }

    #[test]
    fn policy_digest_of_pcr23_reset() {
        // PolicyPCR over sha256:23 after a reset (all zeros), as tpm2_createpolicy computes it
        // (reference/crates.md §8.2).
        assert_eq!(
            policy_digest(&[23], &[vec![0; 32]])
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "3c87a4b3fb85ebeea58c5fb36ac22d3f280cec27a9f6dd0fa23be9ce560deec8"
        );
    }
}
