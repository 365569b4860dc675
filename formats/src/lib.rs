//! cvm-formats: what a cvm-init node and its verifier must agree on, and nothing else: event
//! records and their framing, register banks, the JSON-seq log, the verity superblock, the
//! SEV-SNP report and TDX report layouts, the evidence JSON shapes, the escape of host text.
//! No network and no verifier: the static PID 1 links this crate, not `cvm-measure`.

pub mod digests;
pub mod event;
pub mod evidence;
pub mod jsonseq;
pub mod pcrsig;
pub mod registers;
pub mod snp;
pub mod tdx;
pub mod text;
pub mod tpm;
pub mod verity;

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

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
    let file = std::fs::File::open(path).map_err(|source| DigestError::Read {
        path: path.display().to_string(),
        source,
    })?;
    sha256_open_file(file, path)
}

/// SHA-256 of an open file (read from its current offset), streamed; `path` names it in errors.
pub fn sha256_open_file(mut file: std::fs::File, path: &Path) -> Result<[u8; 32], DigestError> {
    let err = |source| DigestError::Read {
        path: path.display().to_string(),
        source,
    };
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

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_of_known_content() {
        let dir = std::env::temp_dir().join(format!("cvm-formats-test-{}", std::process::id()));
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
