//! TLS to and at the key broker (rustls with ring). A node trusts a broker only through what
//! its measured configuration pins: a CA certificate, or the sha256 of the broker's public key
//! (its SubjectPublicKeyInfo). The system's roots are never consulted.

use std::sync::Arc;

pub use rustls;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    CryptoProvider, GetRandomFailed, KeyProvider, SecureRandom, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

mod nistp256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: no PEM {expected} in it")]
    Pem {
        what: String,
        expected: &'static str,
    },
    #[error("{what}: {detail}")]
    Invalid { what: String, detail: String },
    #[error("TLS configuration")]
    Rustls(#[from] rustls::Error),
}

/// What the node trusts the broker by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pin {
    /// CA certificates (PEM): the broker's chain must end in one, for the URL's host name.
    Ca(Vec<u8>),
    /// sha256 of the broker certificate's SubjectPublicKeyInfo (DER).
    PublicKeySha256([u8; 32]),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The node's side: ring's TLS 1.3 AES-GCM suites, X25519 and P-384, P-256 from RustCrypto
/// (`nistp256.rs`), and every signature webpki verifies. Not ChaCha20-Poly1305 (every TLS 1.3 server has
/// AES-128-GCM) and no private-key loading (the node proves itself by attestation, never by a
/// client certificate): the static PID 1 then links neither.
fn client_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite as cs, kx_group};
    Arc::new(CryptoProvider {
        cipher_suites: vec![cs::TLS13_AES_256_GCM_SHA384, cs::TLS13_AES_128_GCM_SHA256],
        kx_groups: vec![kx_group::X25519, &nistp256::Secp256r1, kx_group::SECP384R1],
        signature_verification_algorithms: VERIFY_ALGORITHMS,
        secure_random: &KernelRandom,
        key_provider: &NoClientKeys,
    })
}

/// The signatures webpki verifies with ring (P-256 with RustCrypto), and which TLS scheme maps
/// to which (the table of rustls's ring provider, which it does not export without its whole
/// provider).
static VERIFY_ALGORITHMS: WebPkiSupportedAlgorithms = {
    use webpki::ring as alg;
    WebPkiSupportedAlgorithms {
        all: &[
            nistp256::ECDSA_P256_SHA256,
            nistp256::ECDSA_P256_SHA384,
            alg::ECDSA_P384_SHA256,
            alg::ECDSA_P384_SHA384,
            alg::ED25519,
            alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
            alg::RSA_PKCS1_2048_8192_SHA256,
            alg::RSA_PKCS1_2048_8192_SHA384,
            alg::RSA_PKCS1_2048_8192_SHA512,
            alg::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
        ],
        mapping: &[
            (
                SignatureScheme::ECDSA_NISTP384_SHA384,
                &[alg::ECDSA_P384_SHA384, nistp256::ECDSA_P256_SHA384],
            ),
            (
                SignatureScheme::ECDSA_NISTP256_SHA256,
                &[nistp256::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256],
            ),
            (SignatureScheme::ED25519, &[alg::ED25519]),
            (
                SignatureScheme::RSA_PSS_SHA512,
                &[alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY],
            ),
            (
                SignatureScheme::RSA_PSS_SHA384,
                &[alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY],
            ),
            (
                SignatureScheme::RSA_PSS_SHA256,
                &[alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY],
            ),
            (
                SignatureScheme::RSA_PKCS1_SHA512,
                &[alg::RSA_PKCS1_2048_8192_SHA512],
            ),
            (
                SignatureScheme::RSA_PKCS1_SHA384,
                &[alg::RSA_PKCS1_2048_8192_SHA384],
            ),
            (
                SignatureScheme::RSA_PKCS1_SHA256,
                &[alg::RSA_PKCS1_2048_8192_SHA256],
            ),
        ],
    }
};

/// Randomness for the handshake, from the kernel (getrandom).
#[derive(Debug)]
struct KernelRandom;

impl SecureRandom for KernelRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        use rand_core::RngCore;
        rand_core::OsRng
            .try_fill_bytes(buf)
            .map_err(|_| GetRandomFailed)
    }
}

/// The node loads no private key into TLS.
#[derive(Debug)]
struct NoClientKeys;

impl KeyProvider for NoClientKeys {
    fn load_private_key(
        &self,
        _key_der: PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        Err(rustls::Error::General(
            "the node's TLS loads no private key".into(),
        ))
    }
}

/// The sha256 of a certificate's SubjectPublicKeyInfo, as `openssl x509 -pubkey | openssl pkey
/// -pubin -outform DER | sha256sum` prints it. Parsed by webpki, the parser rustls already
/// links, so that the node carries one X.509 parser.
pub fn public_key_sha256(certificate_der: &[u8]) -> Result<[u8; 32], String> {
    let certificate = CertificateDer::from(certificate_der);
    let certificate = webpki::EndEntityCert::try_from(&certificate)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    Ok(Sha256::digest(certificate.subject_public_key_info()).into())
}

/// The client side, trusting only `pin`.
pub fn client_config(pin: &Pin) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = client_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match pin {
        Pin::Ca(pem) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| TlsError::Invalid {
                    what: "the pinned CA".into(),
                    detail: e.to_string(),
                })?;
                roots.add(cert).map_err(|e| TlsError::Invalid {
                    what: "the pinned CA".into(),
                    detail: e.to_string(),
                })?;
            }
            if roots.is_empty() {
                return Err(TlsError::Pem {
                    what: "the pinned CA".into(),
                    expected: "certificate",
                });
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Pin::PublicKeySha256(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedKey {
                pin: *pin,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The broker's side: its certificate chain and key (PEM).
pub fn server_config(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Invalid {
            what: "the certificate chain".into(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            what: "the certificate chain".into(),
            expected: "certificate",
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Invalid {
        what: "the private key".into(),
        detail: e.to_string(),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(Arc::new(config))
}

/// Accepts exactly the pinned public key; the handshake signatures are still checked with it.
#[derive(Debug)]
struct PinnedKey {
    pin: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let found = public_key_sha256(end_entity).map_err(rustls::Error::General)?;
        if found != self.pin {
            return Err(rustls::Error::General(format!(
                "the key broker's public key (sha256 {}) is not the pinned one ({})",
                crate::hex(&found),
                crate::hex(&self.pin)
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
