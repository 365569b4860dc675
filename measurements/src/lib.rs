//! cvm-measure: predicts and verifies what a correct cvm-init node measures. For now it holds
//! the digest helper the other parts share; event framing, prediction and verification follow
//! with the measured-boot and launch-measurement issues.

pub mod broker_log;
pub mod broker_reference;
pub mod elsewhere;
pub mod event;
pub mod http;
pub mod jsonseq;
pub mod kbs;
pub mod kbs_broker;
pub mod kbs_client;
pub mod launch;
pub mod mapped;
pub mod page_sha384;
pub mod predict;
pub mod registers;
pub mod snp;
pub mod snp_launch;
pub mod tcglog;
pub mod tdx;
pub mod tdx_launch;
pub mod tdx_rtmr;
pub mod text;
pub mod tls;
pub mod tpm_credential;
pub mod tpm_quote;
pub mod verity;
pub mod x509;

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<[u8; 32], DigestError> {
    let err = |source| DigestError::Read {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

/// SHA-256 of a file, mapped rather than copied (see [`mapped`]): for the command-line tools.
pub fn sha256_file_mapped(path: &Path) -> Result<[u8; 32], DigestError> {
    let bytes = mapped::FileBytes::open(path).map_err(|source| DigestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Sha256::digest(&*bytes).into())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_known_content() {
        let dir = std::env::temp_dir().join(format!("cvm-measure-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("abc");
        std::fs::write(&file, b"abc").unwrap();
        assert_eq!(
            hex(&sha256_file(&file).unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let missing = sha256_file(&dir.join("nope")).unwrap_err();
        assert!(missing.to_string().contains("nope"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The real hardware outputs in the repository's `testdata/` (see its PROVENANCE.md).
#[cfg(test)]
pub(crate) mod testdata {
    pub fn read(path: &str) -> Vec<u8> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata");
        std::fs::read(root.join(path)).unwrap_or_else(|e| panic!("testdata/{path}: {e}"))
    }
}
