//! P-256 for the node's TLS client through RustCrypto's `p256`, which the node already links for
//! its JWE key, instead of ring's P-256: ring's carries a 150 KB table of precomputed multiples
//! of the base point that a client making one handshake per boot does not need, and the static
//! PID 1 has a size budget. Strict like ring: public keys only in uncompressed form.

use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature, VerifyingKey};
use rustls::crypto::{ActiveKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::pki_types::{
    alg_id, AlgorithmIdentifier, InvalidSignature, SignatureVerificationAlgorithm,
};
use rustls::{Error, NamedGroup, PeerMisbehaved};
use sha2::{Digest, Sha256, Sha384};

/// An uncompressed SEC1 point: 0x04, x, y.
const UNCOMPRESSED_LEN: usize = 65;

fn uncompressed(point: &[u8]) -> bool {
    point.len() == UNCOMPRESSED_LEN && point[0] == 0x04
}

/// ECDHE on secp256r1 (TLS 1.3 key shares are uncompressed points, RFC 8446 4.2.8.2).
#[derive(Debug)]
pub struct Secp256r1;

impl SupportedKxGroup for Secp256r1 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let secret = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
        let public = p256::EncodedPoint::from(secret.public_key());
        Ok(Box::new(ActiveSecp256r1 {
            secret,
            public: public.as_bytes().to_vec(),
        }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::secp256r1
    }
}

struct ActiveSecp256r1 {
    secret: p256::ecdh::EphemeralSecret,
    public: Vec<u8>,
}

impl ActiveKeyExchange for ActiveSecp256r1 {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, Error> {
        if !uncompressed(peer) {
            return Err(PeerMisbehaved::InvalidKeyShare.into());
        }
        // Decoding checks that the point is on the curve and not the identity.
        let peer = p256::PublicKey::from_sec1_bytes(peer)
            .map_err(|_| Error::from(PeerMisbehaved::InvalidKeyShare))?;
        let shared = self.secret.diffie_hellman(&peer);
        Ok(SharedSecret::from(shared.raw_secret_bytes().as_slice()))
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::secp256r1
    }
}

/// ECDSA on P-256 with SHA-256 or SHA-384 (the digest truncated to the curve's 256 bits),
/// a DER signature, as webpki's ring algorithms of the same names verify it.
#[derive(Debug)]
pub struct EcdsaP256 {
    sha384: bool,
}

pub static ECDSA_P256_SHA256: &dyn SignatureVerificationAlgorithm = &EcdsaP256 { sha384: false };
pub static ECDSA_P256_SHA384: &dyn SignatureVerificationAlgorithm = &EcdsaP256 { sha384: true };

impl SignatureVerificationAlgorithm for EcdsaP256 {
    fn verify_signature(
        &self,
        public_key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), InvalidSignature> {
        if !uncompressed(public_key) {
            return Err(InvalidSignature);
        }
        let key = VerifyingKey::from_sec1_bytes(public_key).map_err(|_| InvalidSignature)?;
        let signature = Signature::from_der(signature).map_err(|_| InvalidSignature)?;
        let verified = if self.sha384 {
            key.verify_prehash(&Sha384::digest(message), &signature)
        } else {
            key.verify_prehash(&Sha256::digest(message), &signature)
        };
        verified.map_err(|_| InvalidSignature)
    }

    fn public_key_alg_id(&self) -> AlgorithmIdentifier {
        alg_id::ECDSA_P256
    }

    fn signature_alg_id(&self) -> AlgorithmIdentifier {
        if self.sha384 {
            alg_id::ECDSA_SHA384
        } else {
            alg_id::ECDSA_SHA256
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use ring::rand::SystemRandom;
    use ring::signature::{self as ring_sig, EcdsaKeyPair, KeyPair};

    fn ring_key(alg: &'static ring_sig::EcdsaSigningAlgorithm) -> EcdsaKeyPair {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("key");
        EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).expect("key")
    }

    /// What webpki's ring algorithm of the same name says, beside what ours says.
    fn both(
        ours: &dyn SignatureVerificationAlgorithm,
        ring: &dyn SignatureVerificationAlgorithm,
        key: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> (bool, bool) {
        (
            ours.verify_signature(key, message, signature).is_ok(),
            ring.verify_signature(key, message, signature).is_ok(),
        )
    }

    #[test]
    fn key_exchange_agrees_with_ring() {
        for _ in 0..8 {
            let ours = Secp256r1.start().expect("ours");
            let theirs = rustls::crypto::ring::kx_group::SECP256R1
                .start()
                .expect("ring");
            let (our_public, their_public) = (ours.pub_key().to_vec(), theirs.pub_key().to_vec());
            assert_eq!(our_public.len(), UNCOMPRESSED_LEN);
            let a = ours.complete(&their_public).expect("ours completes");
            let b = theirs.complete(&our_public).expect("ring completes");
            assert_eq!(a.secret_bytes(), b.secret_bytes());
        }
    }

    #[test]
    fn key_shares_off_the_curve_compressed_or_empty_are_refused() {
        let peer = Secp256r1.start().expect("peer").pub_key().to_vec();
        let mut off_curve = peer.clone();
        off_curve[64] ^= 1;
        let mut compressed = vec![2 + (peer[64] & 1)];
        compressed.extend_from_slice(&peer[1..33]);
        let mut identity = vec![0u8; UNCOMPRESSED_LEN];
        identity[0] = 4;
        for (what, share) in [
            ("off the curve", off_curve),
            ("compressed", compressed),
            ("all zero", identity),
            ("empty", Vec::new()),
            ("too long", [peer.as_slice(), &[0]].concat()),
        ] {
            let ours = Secp256r1.start().expect("ours");
            assert!(ours.complete(&share).is_err(), "{what} was accepted");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Ours and ring's agree on good signatures, on a flipped message bit and on a flipped
        /// signature byte, with SHA-256 and with SHA-384.
        #[test]
        fn signatures_are_judged_as_ring_judges_them(
            message in proptest::collection::vec(any::<u8>(), 0..300),
            flip_message in any::<prop::sample::Index>(),
            flip_signature in any::<prop::sample::Index>(),
            sha384 in any::<bool>(),
        ) {
            // ring signs with SHA-256 only: SHA-384 signatures come from RustCrypto's signer,
            // and ring's verifier is then the independent judge.
            let (public, signature, ours, ring) = if sha384 {
                let key = p256::ecdsa::SigningKey::random(&mut rand_core::OsRng);
                let signature: Signature = p256::ecdsa::signature::hazmat::PrehashSigner::sign_prehash(
                    &key,
                    &Sha384::digest(&message),
                )
                .expect("signs");
                let public = VerifyingKey::from(&key).to_encoded_point(false).as_bytes().to_vec();
                (public, signature.to_der().as_bytes().to_vec(), ECDSA_P256_SHA384, webpki::ring::ECDSA_P256_SHA384)
            } else {
                let key = ring_key(&ring_sig::ECDSA_P256_SHA256_ASN1_SIGNING);
                let signature = key.sign(&SystemRandom::new(), &message).expect("signs");
                (key.public_key().as_ref().to_vec(), signature.as_ref().to_vec(), ECDSA_P256_SHA256, webpki::ring::ECDSA_P256_SHA256)
            };
            prop_assert_eq!(both(ours, ring, &public, &message, &signature), (true, true));

            if !message.is_empty() {
                let mut changed = message.clone();
                changed[flip_message.index(message.len())] ^= 0x01;
                prop_assert_eq!(both(ours, ring, &public, &changed, &signature), (false, false));
            }
            let mut forged = signature.clone();
            forged[flip_signature.index(signature.len())] ^= 0x40;
            let verdict = both(ours, ring, &public, &message, &forged);
            prop_assert_eq!(verdict.0, verdict.1);
            prop_assert!(!verdict.0);
        }
    }

    #[test]
    fn compressed_or_foreign_public_keys_are_refused() {
        let key = ring_key(&ring_sig::ECDSA_P256_SHA256_ASN1_SIGNING);
        let public = key.public_key().as_ref().to_vec();
        let signature = key.sign(&SystemRandom::new(), b"m").expect("signs");
        let mut compressed = vec![2 + (public[64] & 1)];
        compressed.extend_from_slice(&public[1..33]);
        let other = ring_key(&ring_sig::ECDSA_P256_SHA256_ASN1_SIGNING);
        for (what, key) in [
            ("compressed", compressed),
            ("another key", other.public_key().as_ref().to_vec()),
            ("empty", Vec::new()),
        ] {
            assert!(
                ECDSA_P256_SHA256
                    .verify_signature(&key, b"m", signature.as_ref())
                    .is_err(),
                "{what} was accepted"
            );
        }
        assert!(ECDSA_P256_SHA256
            .verify_signature(&public, b"m", signature.as_ref())
            .is_ok());
    }
}
