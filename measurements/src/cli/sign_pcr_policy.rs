//! `cvm-measure sign-pcr-policy`: the signed PCR policy a UKI carries (`.pcrsig`), as
//! `systemd-measure sign` writes it, from PCR 11 values or from `predict --json` output.

use std::path::PathBuf;

use cvm_formats::pcrsig::{self, Entry, Expect};
use cvm_formats::tpm::policy_pcr_digest;

use super::{read, usage, work, Failure};

/// The PCR the signed policy covers: the UKI's sections and the boot phases.
const PCR: u32 = 11;

/// Sign the PolicyPCR digest of PCR 11 values: print systemd's `.pcrsig` JSON
///
/// The node unseals a `key = "tpm"` state disk after `leave-initrd`, so the PCR 11 to sign is
/// `cvm-measure predict --at key-release --json`'s (systemd-measure's phase
/// `enter-initrd:leave-initrd`). The key is RSA-2048 (signed RSASSA-PKCS1-v1_5 with SHA-256,
/// systemd's default) or ECDSA P-256 (DER signature), in PEM (PKCS#8, PKCS#1 or SEC1).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A sha256 PCR 11 value to sign (repeatable: one entry each)
    #[arg(
        long = "pcr11",
        value_name = "HEX",
        required_unless_present = "predicted"
    )]
    pcr11: Vec<String>,
    /// The output of `cvm-measure predict --at key-release --json`: its sha256 PCR 11 is signed
    #[arg(long, value_name = "FILE", conflicts_with = "pcr11")]
    predicted: Option<PathBuf>,
    /// The private key (PEM)
    #[arg(long, value_name = "PEM")]
    private_key: PathBuf,
    /// Also write the public key (PEM SubjectPublicKeyInfo: the UKI's .pcrpkey) to this file
    #[arg(long, value_name = "FILE")]
    write_public_key: Option<PathBuf>,
}

/// A signing key of a type the TPM's TPM2_VerifySignature checks.
enum Key {
    Rsa(Box<rsa::RsaPrivateKey>),
    P256(p256::ecdsa::SigningKey),
}

impl Key {
    fn load(pem: &str, path: &str) -> Result<Key, Failure> {
        use p256::pkcs8::DecodePrivateKey as _;
        use rsa::pkcs1::DecodeRsaPrivateKey as _;
        use rsa::traits::PublicKeyParts as _;
        let rsa_key = rsa::RsaPrivateKey::from_pkcs8_pem(pem)
            .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(pem))
            .ok();
        if let Some(key) = rsa_key {
            let bits = key.n().bits();
            if bits != 2048 {
                return Err(work(format!(
                    "the private key {path} is RSA-{bits}: expected RSA-2048 (what every TPM \
                     verifies) or ECDSA P-256"
                )));
            }
            return Ok(Key::Rsa(Box::new(key)));
        }
        let ec = p256::SecretKey::from_pkcs8_pem(pem)
            .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
            .map_err(|_| {
                work(format!(
                    "the private key {path} is not an RSA-2048 or ECDSA P-256 private key in PEM \
                     (PKCS#8, PKCS#1 or SEC1)"
                ))
            })?;
        Ok(Key::P256(ec.into()))
    }

    /// The public key as `i2d_PublicKey` writes it, what systemd's `pkfp` hashes.
    fn public_raw(&self) -> Vec<u8> {
        match self {
            Key::Rsa(k) => rsa::pkcs1::EncodeRsaPublicKey::to_pkcs1_der(&k.to_public_key())
                .expect("an RSA public key encodes")
                .into_vec(),
            Key::P256(k) => k
                .verifying_key()
                .to_encoded_point(false)
                .as_bytes()
                .to_vec(),
        }
    }

    fn public_pem(&self) -> String {
        use p256::pkcs8::EncodePublicKey as _;
        let lf = p256::pkcs8::LineEnding::LF;
        match self {
            Key::Rsa(k) => rsa::pkcs8::EncodePublicKey::to_public_key_pem(
                &k.to_public_key(),
                rsa::pkcs8::LineEnding::LF,
            )
            .expect("an RSA public key encodes"),
            Key::P256(k) => k
                .verifying_key()
                .to_public_key_pem(lf)
                .expect("a P-256 public key encodes"),
        }
    }

    /// The signature over SHA-256(`message`), as systemd-measure makes it.
    fn sign(&self, message: &[u8]) -> Vec<u8> {
        use rsa::signature::{SignatureEncoding as _, Signer as _};
        match self {
            Key::Rsa(k) => rsa::pkcs1v15::SigningKey::<sha2::Sha256>::new((**k).clone())
                .sign(message)
                .to_vec(),
            Key::P256(k) => {
                let sig: p256::ecdsa::Signature = k.sign(message);
                sig.to_der().as_bytes().to_vec()
            }
        }
    }

    /// Checks a signature the way the node's TPM will (a self-check of what is written).
    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        use rsa::signature::Verifier as _;
        match self {
            Key::Rsa(k) => rsa::pkcs1v15::Signature::try_from(sig).is_ok_and(|s| {
                rsa::pkcs1v15::VerifyingKey::<sha2::Sha256>::new(k.to_public_key())
                    .verify(message, &s)
                    .is_ok()
            }),
            Key::P256(k) => p256::ecdsa::Signature::from_der(sig)
                .is_ok_and(|s| k.verifying_key().verify(message, &s).is_ok()),
        }
    }

    /// The signature lengths the node accepts for this key.
    fn sig_len(&self) -> std::ops::RangeInclusive<usize> {
        match self {
            Key::Rsa(_) => 256..=256,
            Key::P256(_) => 8..=72,
        }
    }
}

fn pcr_value(hex: &str, what: &str) -> Result<Vec<u8>, Failure> {
    cvm_formats::verity::parse_hex(hex)
        .filter(|v| v.len() == 32)
        .ok_or_else(|| {
            usage(format!(
                "{what} {:?} is not a sha256 PCR value (64 hex digits)",
                cvm_formats::text::escape(&hex.chars().take(80).collect::<String>())
            ))
        })
}

/// The sha256 PCR 11 of `predict --at key-release --json` output.
fn predicted(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    let name = path.display().to_string();
    let bytes = read(path, "the prediction")?;
    let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        work(format!(
            "the prediction {name} is not JSON ({e}): expected `cvm-measure predict --at key-release --json` output"
        ))
    })?;
    // `--at key-release` adds cvm-init's RTMR2 part; `--at ready` has PCR 11 after sysinit and
    // ready, which the node has not reached when it unseals.
    if value.get("tdx_init_rtmr2").is_none() {
        return Err(work(format!(
            "the prediction {name} is not the key-release point: the node unseals its disk \
             before sysinit; use `cvm-measure predict --at key-release --json`"
        )));
    }
    let hex = value["pcr"]["11"]["sha256"].as_str().ok_or_else(|| {
        work(format!(
            "the prediction {name} has no pcr.11.sha256 (predict with the sha256 bank)"
        ))
    })?;
    pcr_value(hex, &format!("the prediction {name}'s pcr.11.sha256"))
}

pub fn run(args: Args) -> Result<(), Failure> {
    let values: Vec<Vec<u8>> = match &args.predicted {
        Some(path) => vec![predicted(path)?],
        None => args
            .pcr11
            .iter()
            .map(|v| pcr_value(v, "--pcr11"))
            .collect::<Result<_, _>>()?,
    };
    let key_path = args.private_key.display().to_string();
    let pem = read(&args.private_key, "the private key")?;
    let pem = String::from_utf8(pem)
        .map_err(|_| work(format!("the private key {key_path} is not PEM text")))?;
    let key = Key::load(&pem, &key_path)?;
    let pkfp = pcrsig::key_fingerprint(&key.public_raw());
    let mut entries: Vec<Entry> = Vec::new();
    for value in &values {
        let pol = policy_pcr_digest(&[PCR], std::slice::from_ref(value));
        if entries.iter().any(|e| e.pol == pol) {
            return Err(usage(format!(
                "--pcr11 {} is given twice",
                cvm_formats::hex(value)
            )));
        }
        entries.push(Entry {
            pcrs: vec![PCR],
            pkfp,
            pol,
            sig: key.sign(&pol),
        });
    }
    let text = pcrsig::write(&entries);
    // What is printed is what the node will read: parse it back and check every signature.
    let expect = Expect {
        pcrs: &[PCR],
        pkfp,
        sig_len: key.sig_len(),
    };
    let parsed =
        pcrsig::parse(text.as_bytes(), &expect).map_err(|e| work(format!("self-check: {e}")))?;
    if parsed != entries || !entries.iter().all(|e| key.verify(&e.pol, &e.sig)) {
        return Err(work("self-check: a written signature does not verify"));
    }
    if let Some(out) = &args.write_public_key {
        std::fs::write(out, key.public_pem()).map_err(|e| {
            work(format!(
                "cannot write the public key {}: {e}",
                out.display()
            ))
        })?;
    }
    print!("{text}");
    Ok(())
}
