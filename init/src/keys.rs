//! Where the state disk's keyslot secret comes from, behind one trait: `tpm` (a random secret
//! sealed to the boot-time PCRs, kept in a LUKS2 token) and `ephemeral` (a new random secret
//! every boot, the disk re-created) and `kbs` (released by a key broker to this image's
//! evidence). `snp-derived` is still to come.

use base64::Engine;
use zeroize::Zeroizing;

use crate::disk::luks2::Token;
use crate::tee::seal::{self, SealedBlob};
use crate::tee::signed_policy::{self, PolicyKey, SignedPolicyError};
use crate::tee::tpm::{TpmError, Transport};

/// Bytes of a keyslot secret.
pub const SECRET_LEN: usize = 32;
/// The LUKS2 token type of TPM-sealed secrets.
pub const TPM_TOKEN: &str = "cvm-tpm2";
/// The LUKS2 token type of secrets sealed to a signed PCR policy (`state.tpm_policy = "signed"`).
pub const TPM_SIGNED_TOKEN: &str = "cvm-tpm2-signed";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the TPM refused to seal or unseal the state-disk secret")]
    Tpm(#[from] TpmError),
    #[error("the signed PCR policy did not open the state-disk secret")]
    Signed(#[from] SignedPolicyError),
    #[error("the secret just sealed to the signed PCR policy does not unseal with this image's signature, so the disk was not formatted")]
    SignedSelfCheck(#[source] SignedPolicyError),
    #[error("the SNP secure processor did not derive the key")]
    Snp(#[from] crate::tee::snp::SnpGuestError),
    #[error("the state disk has no {0} token: it was not made by this key source")]
    NoToken(&'static str),
    #[error("the {kind} token is malformed: {detail}")]
    BadToken { kind: &'static str, detail: String },
}

/// A secret for a disk being formatted, with the token its header keeps.
pub struct Provisioned {
    pub secret: Zeroizing<Vec<u8>>,
    /// Token 0 as a JSON object, when the source needs one to recover the secret.
    pub token: Option<String>,
}

pub trait KeySource {
    fn name(&self) -> &'static str;
    /// A new secret for a blank disk.
    fn provision(&mut self) -> Result<Provisioned, KeyError>;
    /// The secret of an existing disk, from its token.
    fn recover(&mut self, token: Option<&Token>) -> Result<Zeroizing<Vec<u8>>, KeyError>;
    /// True when the disk is re-created every boot (its data never survives).
    fn ephemeral(&self) -> bool {
        false
    }
}

fn random_secret() -> Zeroizing<Vec<u8>> {
    let mut s = Zeroizing::new(vec![0u8; SECRET_LEN]);
    crate::disk::luks2::kernel_random(&mut s);
    s
}

/// A new secret every boot; the disk is formatted every boot. Only when configured.
pub struct Ephemeral;

impl KeySource for Ephemeral {
    fn name(&self) -> &'static str {
        "ephemeral"
    }
    fn provision(&mut self) -> Result<Provisioned, KeyError> {
        Ok(Provisioned {
            secret: random_secret(),
            token: None,
        })
    }
    fn recover(&mut self, _token: Option<&Token>) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        // Never reached: an ephemeral disk is re-created, not opened.
        Err(KeyError::NoToken("ephemeral"))
    }
    fn ephemeral(&self) -> bool {
        true
    }
}

/// A secret sealed by the vTPM to the sha256 values PCR 11 and the identity PCR hold while
/// the state disk is set up (before the seal barrier). Another image, another configuration
/// or another TPM: unsealing fails and the disk stays closed and untouched. At an image
/// upgrade the new image's values differ, so the secret must be re-sealed by the old image
/// before the upgrade (or the disk re-provisioned from a key broker).
pub struct TpmSealed<T: Transport> {
    pub transport: T,
    pub pcrs: Vec<u32>,
    /// The current sha256 values of `pcrs`, in order.
    pub values: Vec<Vec<u8>>,
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

/// A base64 field of a TPM token, the token's kind named when it is missing or malformed.
fn token_bytes(token: &Token, name: &str) -> Result<Vec<u8>, KeyError> {
    let bad = |detail: String| KeyError::BadToken {
        kind: if token.kind == TPM_SIGNED_TOKEN {
            TPM_SIGNED_TOKEN
        } else {
            TPM_TOKEN
        },
        detail,
    };
    let text = token
        .fields
        .get(name)
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad(format!("no {name}")))?;
    b64()
        .decode(text)
        .map_err(|_| bad(format!("{name} is not base64")))
}

impl<T: Transport> KeySource for TpmSealed<T> {
    fn name(&self) -> &'static str {
        "tpm"
    }

    fn provision(&mut self) -> Result<Provisioned, KeyError> {
        let secret = random_secret();
        let blob = seal::seal(&mut self.transport, &secret, &self.pcrs, &self.values)?;
        let token = format!(
            "{{\"type\":\"{TPM_TOKEN}\",\"keyslots\":[\"0\"],\"private\":\"{}\",\"public\":\"{}\",\"pcrs\":{:?},\"pcr_bank\":\"sha256\"}}",
            b64().encode(&blob.private),
            b64().encode(&blob.public),
            blob.pcrs,
        );
        Ok(Provisioned {
            secret,
            token: Some(token),
        })
    }

    fn recover(&mut self, token: Option<&Token>) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let token = token
            .filter(|t| t.kind == TPM_TOKEN)
            .ok_or(KeyError::NoToken(TPM_TOKEN))?;
        let bad = |detail: &str| KeyError::BadToken {
            kind: TPM_TOKEN,
            detail: detail.to_string(),
        };
        let field = |name: &str| token_bytes(token, name);
        let pcrs: Vec<u32> = token
            .fields
            .get("pcrs")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|p| p.as_u64())
                    .filter(|&p| p < 24)
                    .map(|p| p as u32)
                    .collect()
            })
            .ok_or_else(|| bad("no pcrs"))?;
        // The policy is fixed by the configuration, not by the untrusted token.
        if pcrs != self.pcrs
            || token.fields.get("pcr_bank").and_then(|v| v.as_str()) != Some("sha256")
        {
            return Err(bad(&format!(
                "PCRs {pcrs:?} in the token, the configuration seals to {:?}",
                self.pcrs
            )));
        }
        let blob = SealedBlob {
            private: field("private")?,
            public: field("public")?,
            pcrs,
        };
        Ok(seal::unseal(&mut self.transport, &blob)?)
    }
}

/// Sealed by the vTPM with PolicyAuthorize to the operator's PCR key (the UKI's `.pcrpkey`):
/// any image whose PCR 11 that key signed opens it, so an image upgrade keeps the disk.
pub struct TpmSigned<T: Transport> {
    pub transport: T,
    pub key: PolicyKey,
    /// The UKI's signed policies (`.pcrsig`), already checked against `key`.
    pub entries: Vec<cvm_formats::pcrsig::Entry>,
    /// The current sha256 PCR 11.
    pub pcr11: Vec<u8>,
}

impl<T: Transport> KeySource for TpmSigned<T> {
    fn name(&self) -> &'static str {
        "tpm (signed PCR policy)"
    }

    fn provision(&mut self) -> Result<Provisioned, KeyError> {
        let secret = random_secret();
        let blob = signed_policy::seal_signed(&mut self.transport, &secret, &self.key)?;
        // A disk this image cannot open again must not be formatted: unseal once now.
        let again = signed_policy::unseal_signed(
            &mut self.transport,
            &blob,
            &self.key,
            &self.entries,
            &self.pcr11,
        )
        .map_err(KeyError::SignedSelfCheck)?;
        if again[..] != secret[..] {
            return Err(KeyError::BadToken {
                kind: TPM_SIGNED_TOKEN,
                detail: "the TPM unsealed another secret than it sealed".into(),
            });
        }
        let token = format!(
            "{{\"type\":\"{TPM_SIGNED_TOKEN}\",\"keyslots\":[\"0\"],\"private\":\"{}\",\"public\":\"{}\",\"pcrs\":[11],\"pcr_bank\":\"sha256\",\"pkfp\":\"{}\"}}",
            b64().encode(&blob.private),
            b64().encode(&blob.public),
            cvm_formats::hex(&self.key.fingerprint()),
        );
        Ok(Provisioned {
            secret,
            token: Some(token),
        })
    }

    fn recover(&mut self, token: Option<&Token>) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let token = token
            .filter(|t| t.kind == TPM_SIGNED_TOKEN)
            .ok_or(KeyError::NoToken(TPM_SIGNED_TOKEN))?;
        let field = |name: &str| token_bytes(token, name);
        // The token's fields are the host's to choose; the key and the policy are not read
        // from it. A wrong blob is refused by the TPM (it was not sealed to this key).
        let blob = SealedBlob {
            private: field("private")?,
            public: field("public")?,
            pcrs: signed_policy::SIGNED_PCRS.to_vec(),
        };
        Ok(signed_policy::unseal_signed(
            &mut self.transport,
            &blob,
            &self.key,
            &self.entries,
            &self.pcr11,
        )?)
    }
}

/// The secret is released by a key broker (Trustee KBS protocol) to evidence of this image;
/// fetched once, before the disk's identity is measured, so that the evidence is predictable
/// (`cvm-measure predict --at key-release`). Unreachable or refusing: retried with capped
/// backoff, a console line each time, never another key source. Extra resources (for example
/// a kubelet bootstrap kubeconfig) come in the same attested session.
pub struct Kbs {
    secret: Zeroizing<Vec<u8>>,
    /// The extra resources, in the order asked.
    pub extras: Vec<Zeroizing<Vec<u8>>>,
}

/// Between key-broker attempts: 0.5 s, doubling, at most 30 s (the supervisor's backoff).
const KBS_BACKOFF: crate::supervise::Backoff = crate::supervise::Backoff {
    base: std::time::Duration::from_millis(500),
    cap: std::time::Duration::from_secs(30),
    stable: std::time::Duration::ZERO,
};

impl Kbs {
    /// `resources[0]` is the disk secret.
    pub fn fetch(
        endpoint: &cvm_kbs::client::Endpoint,
        evidence: &crate::tee::evidence::Source,
        resources: &[&str],
    ) -> Kbs {
        let address = &endpoint.address;
        let mut attempt = 0;
        let resource = resources[0];
        let mut prove = |binding: &[u8; 64], challenge: &serde_json::Value| {
            evidence
                .evidence_for(binding, challenge)
                .map_err(|e| crate::logger::chain(&e))
        };
        loop {
            attempt += 1;
            let delay = KBS_BACKOFF.delay(attempt);
            // A vTPM's endorsement (EK certificate, attestation key), read again each attempt.
            let auth_extra = match evidence.auth_params() {
                Ok(extra) => extra,
                Err(e) => {
                    log::error!(
                        "kbs: attempt {attempt}: cannot read the vTPM's endorsement: {}; retrying in {}ms",
                        crate::logger::chain(&e),
                        delay.as_millis()
                    );
                    std::thread::sleep(delay);
                    continue;
                }
            };
            match cvm_kbs::client::get_resources_with(endpoint, evidence.tee().as_str(), resources, auth_extra, &mut prove) {
                Ok(mut released) if released[0].len() >= SECRET_LEN => {
                    log::info!(
                        "kbs: {} released by the key broker at {address} (attempt {attempt})",
                        resources.join(", ")
                    );
                    let secret = released.remove(0);
                    return Kbs {
                        secret,
                        extras: released,
                    };
                }
                Ok(released) => log::error!(
                    "kbs: attempt {attempt}: {resource} holds {} bytes, at least {SECRET_LEN} needed; retrying in {}ms",
                    released.first().map_or(0, |s| s.len()),
                    delay.as_millis()
                ),
                Err(e) => log::error!(
                    "kbs: attempt {attempt}: {}; retrying in {}ms",
                    crate::logger::chain(&e),
                    delay.as_millis()
                ),
            }
            std::thread::sleep(delay);
        }
    }
}

/// The SEV-SNP secure processor derives the secret from the chip's key, the launch
/// measurement and the guest policy: the same image on the same machine gets the same key,
/// another image or policy another one. Nothing leaves the machine; the disk does not move.
pub struct SnpDerived;

impl KeySource for SnpDerived {
    fn name(&self) -> &'static str {
        "snp-derived"
    }
    fn provision(&mut self) -> Result<Provisioned, KeyError> {
        Ok(Provisioned {
            secret: self.recover(None)?,
            token: None,
        })
    }
    fn recover(&mut self, _token: Option<&Token>) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        Ok(crate::tee::snp::derived_key()?)
    }
}

impl KeySource for Kbs {
    fn name(&self) -> &'static str {
        "kbs"
    }
    fn provision(&mut self) -> Result<Provisioned, KeyError> {
        Ok(Provisioned {
            secret: self.secret.clone(),
            token: None,
        })
    }
    fn recover(&mut self, _token: Option<&Token>) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        Ok(self.secret.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Resources released in one session are handed out wiped-on-drop, so that those already
    /// decrypted are wiped when a later one fails (the error drops them) as well as after use.
    /// A compile-time check: it does not build while `get_resources` returns plain vectors.
    #[test]
    fn released_resources_are_wiped_on_drop() {
        type Released = Result<Vec<Zeroizing<Vec<u8>>>, cvm_kbs::client::ClientError>;
        type Get = fn(
            &cvm_kbs::client::Endpoint,
            &str,
            &[&str],
            &mut dyn FnMut(&[u8; 64]) -> Result<serde_json::Value, String>,
        ) -> Released;
        let _get: Get = cvm_kbs::client::get_resources;
    }
}
