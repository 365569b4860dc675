//! TLS to and at the key broker (rustls with ring). A node trusts a broker only through what
//! its measured configuration pins: a CA certificate, or the sha256 of the broker's public key
//! (its SubjectPublicKeyInfo). The system's roots are never consulted.

use std::sync::Arc;

pub use rustls;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

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

/// The sha256 of a certificate's SubjectPublicKeyInfo, as `openssl x509 -pubkey | openssl pkey
/// -pubin -outform DER | sha256sum` prints it.
pub fn public_key_sha256(certificate_der: &[u8]) -> Result<[u8; 32], String> {
    use x509_cert::der::{Decode, Encode};
    let certificate = x509_cert::Certificate::from_der(certificate_der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let spki = certificate
        .tbs_certificate
        .subject_public_key_info
        .to_der()
        .map_err(|e| format!("its public key does not encode: {e}"))?;
    Ok(Sha256::digest(spki).into())
}

/// The client side, trusting only `pin`.
pub fn client_config(pin: &Pin) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
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
